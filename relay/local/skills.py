"""Phone-side skills: time, battery, media keys, volume, timers.

Each skill answers from what only the phone has (its clock, the glasses'
last telemetry, the media session, its timers); answers are short texts for
the glasses' display.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Final

from protocol.bodies import Request, RequestKind

__all__ = ["PhoneState", "answer"]

_NUMBERS: Final = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30,
}  # fmt: skip


@dataclass(slots=True)
class PhoneState:
    """What the phone-side skills know and change."""

    battery_pct: int | None = None
    volume: int = 5
    playing: bool = False
    track: int = 1
    timers: list[int] = field(default_factory=list)


def _minutes(text: str) -> int:
    match = re.search(r"(\d+)\s*(?:min|minute)", text)
    if match:
        return int(match.group(1))
    for word, value in _NUMBERS.items():
        if re.search(rf"\b{word}\s+minute", text):
            return value
    return 5


def answer(request: Request, state: PhoneState, now: datetime.datetime) -> str:
    """The phone's answer to a phone-only request (updates ``state``)."""
    text = (request.text or "").lower()
    intent = (request.intent or "").lower()
    if request.kind is RequestKind.TIME:
        return f"It is {now:%H:%M}."
    if request.kind is RequestKind.BATTERY:
        if state.battery_pct is None:
            return "Battery level not reported yet."
        return f"Your glasses are at {state.battery_pct}% battery."
    if request.kind is RequestKind.VOLUME:
        if "down" in text or "down" in intent:
            state.volume = max(0, state.volume - 1)
        else:
            state.volume = min(10, state.volume + 1)
        return f"Volume {state.volume}."
    if request.kind is RequestKind.MEDIA:
        if "next" in text or "next" in intent:
            state.track += 1
            state.playing = True
            return f"Playing track {state.track}."
        if "pause" in text or "stop" in text or "pause" in intent:
            state.playing = False
            return "Paused."
        state.playing = True
        return f"Playing track {state.track}."
    if request.kind is RequestKind.TIMER:
        minutes = _minutes(text)
        state.timers.append(minutes)
        return f"Timer set for {minutes} minutes."
    return "I can't do that on the phone."
