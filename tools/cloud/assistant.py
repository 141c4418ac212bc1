"""Assistant backends of the gateway, and the built-in offline one.

An :class:`Assistant` turns one assembled request into a stream of text
pieces; the gateway sends each piece down as a RESPONSE_TEXT message as soon
as it exists. The built-in assistant needs no network: it answers the
questions of the emulated glasses' scenarios (weather, translation, the price
of an item in a photo, navigation, payment, books, plants, calendar,
messages) deterministically, from what the decrypted request carries and
nothing else: the request's text or transcript hint, its intent, the length
of its audio and the bytes of its photo.

Its first-token time follows a :class:`LatencyModel`: by default lognormal
with median 0.8 s and p95 2.0 s (PERFORMANCE.md §5), drawn from a generator
seeded with the request's message id, so a resent request is answered after
the same delay.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from protocol.bodies import Request, RequestKind
from relay.errors import ConfigError

__all__ = [
    "DEFAULT_LATENCY",
    "AssembledRequest",
    "Assistant",
    "BuiltinAssistant",
    "LatencyModel",
    "compose_answer",
]

_Z95: Final = 1.645
"""The standard normal quantile of 0.95."""
PIECE_DELAY_S: Final = (0.05, 0.15)
"""Bounds of the uniform pause between two pieces of a built-in answer."""


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """The built-in assistant's first-token time.

    Attributes:
        kind: ``lognormal``, ``fixed`` or ``none`` (answer at once, no pauses).
        median_s: Lognormal median, or the fixed delay.
        p95_s: Lognormal 95th percentile.
    """

    kind: Literal["lognormal", "fixed", "none"]
    median_s: float = 0.0
    p95_s: float = 0.0

    def __post_init__(self) -> None:
        """Reject impossible parameters.

        Raises:
            ConfigError: a negative delay, or a p95 not above the median.
        """
        if self.kind == "fixed" and not self.median_s >= 0:
            raise ConfigError("latency model fixed:SECONDS needs SECONDS >= 0")
        if self.kind == "lognormal" and not 0 < self.median_s < self.p95_s:
            raise ConfigError(
                "latency model lognormal:MEDIAN:P95 needs 0 < MEDIAN < P95"
            )

    @classmethod
    def parse(cls, spec: str) -> LatencyModel:
        """Parse ``lognormal:MEDIAN:P95``, ``fixed:SECONDS`` or ``none``.

        Raises:
            ConfigError: anything else (one line, naming the forms).
        """
        parts = spec.strip().lower().split(":")
        try:
            if parts == ["none"]:
                return cls("none")
            if parts[0] == "fixed" and len(parts) == 2:
                return cls("fixed", _finite(parts[1]))
            if parts[0] == "lognormal" and len(parts) == 3:
                return cls("lognormal", _finite(parts[1]), _finite(parts[2]))
        except ValueError:
            pass
        raise ConfigError(
            f"latency model {spec!r} is not lognormal:MEDIAN:P95, fixed:SECONDS "
            "or none (seconds, e.g. lognormal:0.8:2.0)"
        )

    @property
    def sigma(self) -> float:
        """The lognormal shape: ln(p95 / median) / 1.645."""
        if self.kind != "lognormal":
            return 0.0
        return math.log(self.p95_s / self.median_s) / _Z95

    def sample(self, rng: random.Random) -> float:
        """Draw one first-token delay in seconds."""
        if self.kind == "none":
            return 0.0
        if self.kind == "fixed":
            return self.median_s
        return rng.lognormvariate(math.log(self.median_s), self.sigma)

    def describe(self) -> str:
        """The model in its command-line form."""
        if self.kind == "none":
            return "none"
        if self.kind == "fixed":
            return f"fixed:{self.median_s:g}"
        return f"lognormal:{self.median_s:g}:{self.p95_s:g}"


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


DEFAULT_LATENCY: Final = LatencyModel("lognormal", 0.8, 2.0)


@dataclass(frozen=True, slots=True)
class AssembledRequest:
    """A complete request: its REQUEST message and the media that followed.

    Attributes:
        message_id: The REQUEST message's 16-byte id.
        request_id: The request id shared by the REQUEST and its chunks.
        request: The decoded REQUEST body.
        audio: The AUDIO_CHUNK bytes in index order (empty if none).
        photo: The PHOTO_CHUNK bytes in index order (empty if none).
    """

    message_id: bytes
    request_id: int
    request: Request
    audio: bytes = b""
    photo: bytes = b""


class Assistant(Protocol):
    """What the gateway asks for an answer.

    Implement :meth:`answer` as an async generator. The gateway sends every
    piece as soon as it is yielded; it marks the last one FINAL, so yield a
    piece as soon as it exists and return right after the last one.
    """

    @property
    def name(self) -> str:
        """The backend's name, for logs."""
        ...

    def answer(self, request: AssembledRequest) -> AsyncIterator[str]:
        """Stream the answer to ``request`` as text pieces (at least one).

        Raises:
            Exception: a backend failure; the gateway answers with an apology.
        """
        ...


class BuiltinAssistant:
    """The offline assistant: deterministic answers after a modelled delay.

    Args:
        latency: First-token time model.
    """

    __slots__ = ("_latency",)

    def __init__(self, latency: LatencyModel = DEFAULT_LATENCY) -> None:
        """Create the assistant with ``latency`` as its first-token model."""
        self._latency = latency

    @property
    def name(self) -> str:
        """``builtin``."""
        return "builtin"

    @property
    def latency(self) -> LatencyModel:
        """The first-token time model."""
        return self._latency

    def first_token_delay(self, request: AssembledRequest) -> float:
        """The seconds before the first piece of ``request``'s answer.

        Drawn from ``random.Random(int.from_bytes(message_id))``, so the same
        request always waits the same time.
        """
        return self._latency.sample(_rng(request))

    async def answer(self, request: AssembledRequest) -> AsyncIterator[str]:
        """Yield the answer sentence by sentence (see :class:`Assistant`)."""
        rng = _rng(request)
        delay = self._latency.sample(rng)
        sentences = compose_answer(request)
        if delay > 0:
            await asyncio.sleep(delay)
        for index, sentence in enumerate(sentences):
            if index:
                if self._latency.kind != "none":
                    await asyncio.sleep(rng.uniform(*PIECE_DELAY_S))
                yield " " + sentence
            else:
                yield sentence


def _rng(request: AssembledRequest) -> random.Random:
    return random.Random(int.from_bytes(request.message_id, "big"))


# --- answers -----------------------------------------------------------------

_PHRASEBOOK: Final[dict[str, dict[str, str]]] = {
    "thank you very much": {
        "italian": "grazie mille",
        "french": "merci beaucoup",
        "spanish": "muchas gracias",
        "german": "vielen Dank",
    },
    "thank you": {
        "italian": "grazie",
        "french": "merci",
        "spanish": "gracias",
        "german": "danke",
    },
    "good morning": {
        "italian": "buongiorno",
        "french": "bonjour",
        "spanish": "buenos días",
        "german": "guten Morgen",
    },
    "where is the station": {
        "italian": "dov'è la stazione",
        "french": "où est la gare",
        "spanish": "dónde está la estación",
        "german": "wo ist der Bahnhof",
    },
}
_TRANSLATE: Final = re.compile(
    r"translate\s+(?P<phrase>.+?)\s+(?:into|to|in)\s+(?P<lang>[a-z]+)"
)
_DESTINATION: Final = re.compile(r"\b(?:to|for)\s+(?P<place>[a-z' ]+)$")
_STREETS: Final = ("Market Street", "Oak Avenue", "Station Road", "Elm Street")
_PLANTS: Final = (
    ("a Monstera deliciosa, the Swiss cheese plant", "the top 3 cm of soil are dry"),
    ("a peace lily", "its leaves start to droop"),
    ("a snake plant", "the soil is completely dry, about every two weeks"),
    ("a fiddle-leaf fig", "the top 5 cm of soil are dry"),
)
_OBJECTS: Final = ("a coffee mug", "a paperback book", "a pair of headphones", "a lamp")


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _has(text: str, *words: str) -> bool:
    return any(word in text for word in words)


def _translate(text: str) -> list[str]:
    match = _TRANSLATE.search(text)
    if match is None:
        return [
            "Tell me what to translate and into which language.",
            'For example: "translate thank you into Italian".',
        ]
    phrase = match["phrase"].strip(" \"'")
    lang = match["lang"]
    translated = _PHRASEBOOK.get(phrase, {}).get(lang)
    if translated is None:
        return [
            f'I have no offline translation of "{phrase}" into {lang.title()}.',
            "Try a shorter everyday phrase.",
        ]
    return [
        f'In {lang.title()}, "{phrase}" is "{translated}".',
        f'Say it slowly: "{translated}".',
    ]


def _price(request: AssembledRequest) -> list[str]:
    if not request.photo:
        return [
            "I need a photo of the item to check its price.",
            "Point the camera at it and ask again.",
        ]
    digest = _digest(request.photo + len(request.photo).to_bytes(8, "big"))
    cents = 500 + int.from_bytes(digest[:4], "big") % 9500
    discount = 5 + digest[4] % 21
    online = cents * (100 - discount) // 100
    return [
        f"This item costs about {cents / 100:.2f} EUR here.",
        f"Online it is {online / 100:.2f} EUR, {discount}% cheaper.",
    ]


def _navigate(text: str) -> list[str]:
    match = _DESTINATION.search(text)
    place = match["place"].strip() if match else "your destination"
    street = _STREETS[_digest(text.encode())[0] % len(_STREETS)]
    return [
        f"Head north on {street} for 350 m.",
        f"Then turn left; {place} is on your right.",
    ]


def _identify(request: AssembledRequest, text: str) -> list[str]:
    digest = _digest(request.photo)
    size_kb = max(1, round(len(request.photo) / 1000))
    if _has(text, "plant", "flower", "leaf", "tree"):
        plant, water = _PLANTS[digest[0] % len(_PLANTS)]
        return [f"This looks like {plant}.", f"Water it when {water}."]
    thing = _OBJECTS[digest[0] % len(_OBJECTS)]
    return [
        f"This looks like {thing}.",
        f"I looked at a photo of about {size_kb} KB to tell.",
    ]


def compose_answer(request: AssembledRequest) -> list[str]:
    """The built-in answer to ``request``, as two or more sentences.

    Pure and deterministic: the same request always gets the same words.
    """
    req = request.request
    text = (req.text or "").strip().lower()
    intent = (req.intent or "").strip().lower()
    if intent == "translate" or text.startswith("translate"):
        return _translate(text)
    if intent == "price" or (
        request.photo and _has(text, "price", "how much", "cost", "cheaper")
    ):
        return _price(request)
    if (
        intent in ("navigate", "navigation")
        or req.kind is RequestKind.NAVIGATION
        or _has(text, "walk me", "directions", "navigate", "take me")
    ):
        return _navigate(text)
    if intent in ("pay", "payment") or req.kind is RequestKind.PAYMENT:
        return ["Paid 3.20 EUR to Cafe Central.", "The receipt is in your wallet."]
    if request.photo or intent == "identify":
        return _identify(request, text)
    if _has(text, "weather", "rain", "forecast", "temperature"):
        return [
            "This afternoon will be mostly sunny, around 19 °C.",
            "There is a 10% chance of rain after 18:00.",
        ]
    if _has(text, "book", "wrote", "author"):
        return [
            'That was "The Name of the Rose" by Umberto Eco.',
            "You stopped at chapter 7, about halfway through.",
        ]
    if _has(text, "calendar", "meeting", "schedule", "agenda"):
        return [
            "You have two events today: a design review at 14:00 and dinner at 19:30.",
            "Nothing else is scheduled.",
        ]
    if _has(text, "message", "inbox", "texts"):
        return [
            'Your last message is from Alex: "Running ten minutes late."',
            "Do you want to reply?",
        ]
    if _has(text, "opening hours", "open"):
        return [
            "The pharmacy on Market Street is open until 20:00 today.",
            "It is closed on Sundays.",
        ]
    if _has(text, "how far", "distance"):
        return [
            "Home is 2.4 km away, about 30 minutes on foot.",
            "The next tram is in 9 minutes.",
        ]
    if not text and request.audio:
        return [
            f"I received {len(request.audio)} bytes of audio but no transcript.",
            "Please ask again.",
        ]
    if not text:
        return ["I did not catch a question.", "Please ask again."]
    return [
        f'Here is what I know about "{req.text}".',
        "The built-in assistant works offline, so its answers are short.",
    ]
