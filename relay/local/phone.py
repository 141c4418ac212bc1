"""Phone-only skills: time and date, battery, volume and media keys, timers.

Each skill answers from what only the phone has (its clock, the glasses'
last telemetry, the media session, its timers); answers are short texts for
the glasses' display. Pure and synchronous: the time is passed in.

:func:`answer` is the original entry point (kept as it was for the daemon);
:func:`phone_answer` is the same with the date skill added, used by
:class:`relay.local.skills.LocalSkills`.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Final

from protocol.bodies import Request, RequestKind

__all__ = ["PHONE_ONLY_KINDS", "PhoneState", "answer", "long_date", "phone_answer"]

PHONE_ONLY_KINDS: Final = frozenset(
    {
        RequestKind.TIME,
        RequestKind.BATTERY,
        RequestKind.VOLUME,
        RequestKind.MEDIA,
        RequestKind.TIMER,
    }
)
"""The request kinds only the phone can answer."""

_NUMBERS: Final = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30,
}  # fmt: skip

# A TIME request whose text or intent matches this asks for the date.
_DATE_WORDS: Final = re.compile(r"\b(?:date|day|today|month|year)\b")


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
    """The phone's answer to a phone-only request (updates ``state``).

    Args:
        request: A request of one of :data:`PHONE_ONLY_KINDS`.
        state: The phone's state, read and changed (volume, media, timers).
        now: The local wall-clock time.

    Returns:
        The answer text; "I can't do that on the phone." for other kinds.
    """
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


def long_date(day: datetime.date) -> str:
    """A date as the display shows it, e.g. "Tuesday, 4 March 2025".

    Args:
        day: The date.

    Returns:
        Weekday, day of the month, month name and year.
    """
    return f"{day:%A}, {day.day} {day:%B %Y}"


def phone_answer(request: Request, state: PhoneState, now: datetime.datetime) -> str:
    """Like :func:`answer`, and a TIME request asking for the date gets it.

    Args:
        request: A request of one of :data:`PHONE_ONLY_KINDS`.
        state: The phone's state, read and changed (volume, media, timers).
        now: The local wall-clock time.

    Returns:
        The answer text.
    """
    if request.kind is RequestKind.TIME:
        asked = f"{request.text or ''} {request.intent or ''}".lower()
        if _DATE_WORDS.search(asked):
            return f"Today is {long_date(now.date())}; it is {now:%H:%M}."
    return answer(request, state, now)
