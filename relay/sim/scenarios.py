"""Named scenarios: what the emulated glasses do, step by step.

A scenario is an endless iterator of :class:`Step` (a delay, then an action)
built from a seed, so two runs with one seed do the same. The glasses' app
(:mod:`relay.sim.glasses`) turns actions into protocol messages.

- ``day``: a user's few minutes: spoken questions, a photo price look-up,
  navigation, a payment confirmation, music, the time and the battery, with
  gestures and telemetry in between; one request every 3 s or faster, a
  photo and voice questions within the first 20 s.
- ``soak``: mixed kinds at 10 messages per second or more: telemetry, gaze
  and head pose, voice chunks, text questions, and a photo every 10 s.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from protocol.bodies import EventType, MediaAction, RequestKind

__all__ = ["SCENARIOS", "Ask", "Gesture", "Step", "TelemetryTick", "scenario"]


@dataclass(frozen=True, slots=True)
class Ask:
    """A request: speak (``voice_s`` seconds), photograph (``photo_bytes``), or type.

    ``text`` is the transcript hint the glasses' on-device recogniser gives
    (or the typed text); the cloud sees it inside the sealed envelope only.
    """

    kind: RequestKind
    text: str | None = None
    voice_s: float = 0.0
    photo_bytes: int = 0
    intent: str | None = None
    media: MediaAction | None = None
    volume: int | None = None


@dataclass(frozen=True, slots=True)
class Gesture:
    """An input event (button, gesture, gaze, head pose)."""

    type: EventType
    name: str | None = None
    x: float | None = None
    y: float | None = None
    z: float | None = None


@dataclass(frozen=True, slots=True)
class TelemetryTick:
    """Battery and temperature report."""


Action = Ask | Gesture | TelemetryTick


@dataclass(frozen=True, slots=True)
class Step:
    """Wait ``delay`` seconds, then do ``action``."""

    delay: float
    action: Action


_DAY_SCRIPT: Final[tuple[tuple[float, Action], ...]] = (
    (0.5, Ask(RequestKind.VOICE_QUERY, "what's the weather like this afternoon", 2.2)),
    (2.5, Ask(RequestKind.TIME, "what time is it", 1.0)),
    (2.5, Gesture(EventType.BUTTON, "double_tap")),
    (
        0.3,
        Ask(
            RequestKind.PHOTO_QUERY,
            "how much is this cheaper online",
            1.8,
            photo_bytes=100_000,
            intent="price",
        ),
    ),
    (2.8, Ask(RequestKind.MEDIA, "play some music", 1.0, media=MediaAction.PLAY)),
    (
        2.5,
        Ask(
            RequestKind.NAVIGATION,
            "walk me to the nearest pharmacy",
            2.0,
            intent="navigate",
        ),
    ),
    (2.7, Ask(RequestKind.BATTERY, "how much battery do I have", 1.2)),
    (
        2.5,
        Ask(
            RequestKind.VOICE_QUERY,
            "translate thank you very much into Italian",
            2.4,
            intent="translate",
        ),
    ),
    (2.6, Ask(RequestKind.PAYMENT, "pay for the coffee", 1.0, intent="pay")),
    (2.5, Ask(RequestKind.VOLUME, "volume up", 0.8, media=MediaAction.VOLUME_UP)),
    (
        2.5,
        Ask(RequestKind.TEXT_QUERY, "remind me what the pharmacy's opening hours are"),
    ),
    (2.6, Ask(RequestKind.TIMER, "set a timer for five minutes", 1.4)),
    (
        2.5,
        Ask(
            RequestKind.PHOTO_QUERY,
            "what kind of plant is this",
            1.5,
            photo_bytes=60_000,
            intent="identify",
        ),
    ),
    (2.8, Ask(RequestKind.MEDIA, "next song", 0.8, media=MediaAction.NEXT)),
    (
        2.5,
        Ask(RequestKind.VOICE_QUERY, "who wrote the book I was reading yesterday", 2.6),
    ),
)


def _day(rng: random.Random) -> Iterator[Step]:
    """The day scenario, looping its script with small jitter and side traffic."""
    for delay, action in itertools.cycle(_DAY_SCRIPT):
        jitter = rng.uniform(-0.2, 0.2)
        yield Step(max(0.1, delay + jitter), action)
        if rng.random() < 0.5:
            yield Step(0.05, TelemetryTick())
        if rng.random() < 0.3:
            yield Step(
                0.05,
                Gesture(
                    EventType.HEAD_POSE,
                    None,
                    rng.uniform(-30, 30),
                    rng.uniform(-10, 10),
                    0.0,
                ),
            )


_SOAK_TEXT: Final = ("what's on my calendar", "read my last message", "how far is home")


def _soak(rng: random.Random) -> Iterator[Step]:
    """Mixed kinds at 10+ messages/s, voice every 5 s, a photo every 10 s."""
    tick = 0
    while True:
        tick += 1
        yield Step(0.05, TelemetryTick())
        yield Step(
            0.05, Gesture(EventType.GAZE, None, rng.uniform(-1, 1), rng.uniform(-1, 1))
        )
        if tick % 50 == 0:
            text = f"{rng.choice(_SOAK_TEXT)} (#{tick // 50})"  # never a cache hit
            yield Step(0.0, Ask(RequestKind.VOICE_QUERY, text, 2.0))
        if tick % 100 == 0:
            yield Step(
                0.0,
                Ask(
                    RequestKind.PHOTO_QUERY,
                    "what is this",
                    1.0,
                    photo_bytes=rng.randint(20_000, 200_000),
                ),
            )
        if tick % 30 == 0:
            # Each question new: the phone's answer cache must not answer it.
            text = f"{rng.choice(_SOAK_TEXT)} (#{tick // 4})"
            yield Step(0.0, Ask(RequestKind.TEXT_QUERY, text))


def _stress(rng: random.Random) -> Iterator[Step]:
    """As fast as the link and the phone take them: telemetry, events, questions.

    Everything here goes to the cloud, so every message the phone acknowledges
    must be processed by a gateway (the chaos tests check exactly that).
    """
    tick = 0
    while True:
        tick += 1
        yield Step(0.0, TelemetryTick())
        yield Step(0.0, Gesture(EventType.BUTTON, rng.choice(("tap", "double_tap"))))
        if tick % 4 == 0:
            # Each question new: the phone's answer cache must not answer it.
            text = f"{rng.choice(_SOAK_TEXT)} (#{tick // 4})"
            yield Step(0.0, Ask(RequestKind.TEXT_QUERY, text))


SCENARIOS: Final[dict[str, tuple[str, Callable[[random.Random], Iterator[Step]]]]] = {
    "day": (
        "a user's few minutes: questions, photo price look-up, navigation, "
        "payment, music",
        _day,
    ),
    "soak": ("mixed kinds at 10+ messages/s, voice and a photo every 10 s", _soak),
    "stress": (
        "telemetry, events and questions as fast as the link takes them",
        _stress,
    ),
}


def scenario(name: str, seed: int = 0) -> Iterator[Step]:
    """The steps of scenario ``name``.

    Raises:
        KeyError: no such scenario (see :data:`SCENARIOS`).
    """
    return SCENARIOS[name][1](random.Random(seed))
