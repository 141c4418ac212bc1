"""Phone-side skills: the declared skill table and the one entry point.

:data:`SKILLS` declares what the phone can answer on its own, for which
request kinds, whether the cloud could answer it too (:class:`Scope`), how
good the phone's answer is and what it costs; :class:`LocalSkills` matches a
request to a skill (:meth:`~LocalSkills.match`, pure and fast, no media),
answers it (:meth:`~LocalSkills.answer`, ``None`` when the skill turns out
unable: the caller then goes to the cloud), learns from cloud answers
(:meth:`~LocalSkills.remember`) and words the holding reply for what needs
the cloud while offline (:func:`holding_reply`).

Skills, in matching order for a query::

    kind               skill           scope       quality  cost
    TIME               time_date       PHONE_ONLY  1.0      0.3 s
    BATTERY            battery         PHONE_ONLY  1.0      0.3 s
    VOLUME, MEDIA      media_keys      PHONE_ONLY  1.0      0.3 s
    TIMER              timers          PHONE_ONLY  1.0      0.3 s
    NAVIGATION, query  next_step       EITHER      0.6      0.3 s  (cached route)
    query              repeat          EITHER      0.6      0.3 s  (answer cache)
    PHOTO_QUERY        barcode_price   EITHER      0.6      0.3 s  (intent "barcode")
    query              answerer        EITHER      0.6      1.2 s  (simple questions)

("query" is VOICE_QUERY or TEXT_QUERY.) PAYMENT, a photo with intent
"price" (visual price comparison) and open questions are cloud-only.

Pure and synchronous (times are passed in); not thread-safe. The original
phone-only API, :class:`PhoneState` and :func:`answer`, is re-exported from
:mod:`relay.local.phone`.
"""

from __future__ import annotations

import datetime
import enum
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from protocol.bodies import Request, RequestKind
from relay.local import answerer
from relay.local.barcode import MAX_PHOTO_BYTES, MAX_PHOTO_PIXELS, read_product_codes
from relay.local.caches import PriceBook, RouteCache, TtlLruCache, is_product_code
from relay.local.phone import PHONE_ONLY_KINDS, PhoneState, answer, phone_answer

__all__ = [
    "ANSWERER_COST_S",
    "ANSWERER_SKILL",
    "ANSWER_TTL_S",
    "BARCODE_SKILL",
    "BATTERY_SKILL",
    "CLOUD_QUALITY",
    "DEMO_CATALOGUE",
    "EITHER_QUALITY",
    "MAX_ANSWER_CHARS",
    "MAX_CACHED_ANSWERS",
    "MAX_LEARNED_PRICES",
    "MAX_QUESTION_KEY_CHARS",
    "MEDIA_KEYS_SKILL",
    "NEXT_STEP_SKILL",
    "PHONE_ONLY_QUALITY",
    "REPEAT_SKILL",
    "ROUTE_TTL_S",
    "SKILLS",
    "SKILL_COST_S",
    "TIMERS_SKILL",
    "TIME_DATE_SKILL",
    "LocalAnswer",
    "LocalSkills",
    "PhoneState",
    "Scope",
    "SkillInfo",
    "answer",
    "holding_reply",
    "skills",
]

# The fixed evaluation numbers of issue 7: declared, not measured.
SKILL_COST_S: Final = 0.3
"""Declared phone service time of a skill, seconds (issue 7's number)."""
ANSWERER_COST_S: Final = 1.2
"""Declared phone service time of the on-phone answerer (issue 7's number)."""
PHONE_ONLY_QUALITY: Final = 1.0
"""Answer quality of a phone-only skill (nobody answers better)."""
EITHER_QUALITY: Final = 0.6
"""Answer quality of the phone's answer where the cloud could answer too."""
CLOUD_QUALITY: Final = 1.0
"""Answer quality of the cloud's answer, for comparison."""

ANSWER_TTL_S: Final = 300.0
"""Default life of a cached answer (for "say that again" and identical questions)."""
ROUTE_TTL_S: Final = 1800.0
"""Default life of a cached route, from when it was stored."""
MAX_CACHED_ANSWERS: Final = 64
"""Default bound on cached answers by question; least recently used evicted."""
MAX_LEARNED_PRICES: Final = 256
"""Default bound on prices learned from the cloud; least recently used evicted."""
MAX_ANSWER_CHARS: Final = 2000
"""Default bound on a cached answer's length; longer answers are not cached."""
MAX_QUESTION_KEY_CHARS: Final = 500
"""Questions longer than this are not cached nor looked up."""


class Scope(enum.StrEnum):
    """Who can answer what a skill answers."""

    PHONE_ONLY = "phone_only"
    """Only the phone can (its clock, the glasses' telemetry, media, timers)."""
    EITHER = "either"
    """The cloud could answer too, better (:data:`CLOUD_QUALITY`)."""


@dataclass(frozen=True, slots=True)
class SkillInfo:
    """A declared phone-side skill.

    ``quality`` and ``cost_s`` are the fixed evaluation numbers of issue 7,
    not measurements: quality :data:`PHONE_ONLY_QUALITY` (1.0) for a
    phone-only skill, :data:`EITHER_QUALITY` (0.6) where the cloud could
    answer too (its answer would score :data:`CLOUD_QUALITY`, 1.0); a
    declared phone service time of :data:`SKILL_COST_S` (0.3 s) per skill and
    :data:`ANSWERER_COST_S` (1.2 s) for the on-phone answerer. (Measured: the
    barcode skill reads a 100 KB photo in about 10 ms; see
    :mod:`relay.local.barcode`.)

    Attributes:
        name: Short identifier, e.g. ``"time_date"``.
        kinds: The request kinds it may answer.
        scope: Whether the cloud could answer too.
        quality: Score of the phone's answer, 0..1.
        cost_s: Declared service time on the phone, seconds.
        description: One line for docs and ``glasses-relay status``.
    """

    name: str
    kinds: frozenset[RequestKind]
    scope: Scope
    quality: float
    cost_s: float
    description: str

    def __post_init__(self) -> None:
        """Check the declaration.

        Raises:
            ValueError: Quality outside 0..1, a non-positive cost or no kinds.
        """
        if not 0.0 <= self.quality <= 1.0:
            raise ValueError("quality is between 0 and 1")
        if not self.cost_s > 0:
            raise ValueError("cost_s must be above 0")
        if not self.kinds:
            raise ValueError("a skill answers at least one kind")


_QUERIES: Final = frozenset({RequestKind.VOICE_QUERY, RequestKind.TEXT_QUERY})

TIME_DATE_SKILL: Final = SkillInfo(
    "time_date",
    frozenset({RequestKind.TIME}),
    Scope.PHONE_ONLY,
    PHONE_ONLY_QUALITY,
    SKILL_COST_S,
    "The time, and the date when asked, from the phone's clock.",
)
BATTERY_SKILL: Final = SkillInfo(
    "battery",
    frozenset({RequestKind.BATTERY}),
    Scope.PHONE_ONLY,
    PHONE_ONLY_QUALITY,
    SKILL_COST_S,
    "The glasses' battery level from their last telemetry.",
)
MEDIA_KEYS_SKILL: Final = SkillInfo(
    "media_keys",
    frozenset({RequestKind.VOLUME, RequestKind.MEDIA}),
    Scope.PHONE_ONLY,
    PHONE_ONLY_QUALITY,
    SKILL_COST_S,
    "Volume up/down and play, pause, next track on the phone's media session.",
)
TIMERS_SKILL: Final = SkillInfo(
    "timers",
    frozenset({RequestKind.TIMER}),
    Scope.PHONE_ONLY,
    PHONE_ONLY_QUALITY,
    SKILL_COST_S,
    "Sets a timer on the phone.",
)
NEXT_STEP_SKILL: Final = SkillInfo(
    "next_step",
    frozenset({RequestKind.NAVIGATION}) | _QUERIES,
    Scope.EITHER,
    EITHER_QUALITY,
    SKILL_COST_S,
    'The next step of the cached route ("what\'s next", intent next_step).',
)
REPEAT_SKILL: Final = SkillInfo(
    "repeat",
    _QUERIES,
    Scope.EITHER,
    EITHER_QUALITY,
    SKILL_COST_S,
    'A recent answer again: "say that again" (intent repeat), or the same question.',
)
BARCODE_SKILL: Final = SkillInfo(
    "barcode_price",
    frozenset({RequestKind.PHOTO_QUERY}),
    Scope.EITHER,
    EITHER_QUALITY,
    SKILL_COST_S,
    "Reads a product barcode in the photo and says its cached price.",
)
ANSWERER_SKILL: Final = SkillInfo(
    "answerer",
    _QUERIES,
    Scope.EITHER,
    EITHER_QUALITY,
    ANSWERER_COST_S,
    "Arithmetic, unit conversions, the calendar and spelling, on the phone.",
)

SKILLS: Final = (
    TIME_DATE_SKILL,
    BATTERY_SKILL,
    MEDIA_KEYS_SKILL,
    TIMERS_SKILL,
    NEXT_STEP_SKILL,
    REPEAT_SKILL,
    BARCODE_SKILL,
    ANSWERER_SKILL,
)
"""Every phone-side skill, in matching order."""

_BY_KIND: Final = types.MappingProxyType(
    {
        RequestKind.TIME: TIME_DATE_SKILL,
        RequestKind.BATTERY: BATTERY_SKILL,
        RequestKind.VOLUME: MEDIA_KEYS_SKILL,
        RequestKind.MEDIA: MEDIA_KEYS_SKILL,
        RequestKind.TIMER: TIMERS_SKILL,
    }
)

DEMO_CATALOGUE: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "4006381333931": "Highlighter pen, yellow: 1.49 €",
        "5901234123457": "Dark chocolate 100 g: 1.99 €",
        "2000000000015": "Oat milk 1 L: 2.29 €",
        "2000000000022": "Sparkling water 1.5 L: 0.89 €",
        "2000000000039": "Espresso beans 500 g: 7.49 €",
        "9780140449136": "Paperback, The Odyssey: 12.99 €",
    }
)
"""A small demo price catalogue (EAN-13 code to what the display says)."""


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """The phone's answer to a request.

    Attributes:
        text: What the glasses show or say.
        skill: The skill that answered.
    """

    text: str
    skill: SkillInfo


def skills() -> tuple[SkillInfo, ...]:
    """Every phone-side skill, in matching order (for docs and status).

    Returns:
        :data:`SKILLS`.
    """
    return SKILLS


# --- what a request asks, from its text and intent ---------------------------

_REPEAT: Final = re.compile(
    r"^(?:(?:sorry|pardon|please|hey|ok|okay|can you|could you)\s+)*"
    r"(?:say (?:that|it) again|repeat(?: that| it)?|come again|"
    r"what did you (?:just )?say|pardon)(?:\s+please)?$"
)
_NEXT_PHRASE: Final = (
    r"(?:whats next|what is next|next (?:turn|step|direction|instruction)|"
    r"(?:whats|what is) the next (?:turn|step|direction)|where do i turn(?: next)?|"
    r"where next|which way now)"
)
_NEXT_EXACT: Final = re.compile(
    rf"^(?:(?:ok|okay|so|and|hey)\s+)*{_NEXT_PHRASE}(?:\s+please)?$"
)
_NEXT_ANYWHERE: Final = re.compile(rf"\b{_NEXT_PHRASE}\b")
_PRICE: Final = re.compile(
    r"(?:[$€£]\s?\d+(?:[.,]\d{1,2})?)|"
    r"(?:\d+(?:[.,]\d{1,2})?\s?(?:€|\$|£|eur|euros?|usd|dollars?|gbp|pounds?)(?![a-z]))",
    re.IGNORECASE,
)
_CODE_IN_TEXT: Final = re.compile(r"(?<!\d)(\d{13}|\d{12}|\d{8})(?!\d)")
_STEP_SPLIT: Final = re.compile(r"[;\n]+")


def _normalise(text: str | None) -> str:
    """Lower case, apostrophes dropped, punctuation to spaces, spaces collapsed."""
    if not text or len(text) > MAX_QUESTION_KEY_CHARS:
        return ""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _asks_repeat(intent: str, text: str) -> bool:
    return intent == "repeat" or bool(_REPEAT.match(text))


def _asks_next_step(intent: str, text: str, *, anywhere: bool) -> bool:
    if intent in ("next_step", "next step"):
        return True
    pattern = _NEXT_ANYWHERE if anywhere else _NEXT_EXACT
    return bool(pattern.search(text))


# --- holding replies ---------------------------------------------------------

_HOLDING_DEFAULT: Final = (
    "I need a connection for that; I'll answer when I'm back online."
)
_HOLDING: Final = types.MappingProxyType(
    {
        RequestKind.PHOTO_QUERY: (
            "I need a connection to look at this photo; "
            "I'll answer when I'm back online."
        ),
        RequestKind.NAVIGATION: (
            "I need a connection for directions; I'll guide you when I'm back online."
        ),
        RequestKind.PAYMENT: (
            "Payments need a connection; I'll send this one when I'm back online."
        ),
    }
)
_HOLDING_PHOTO: Final = types.MappingProxyType(
    {
        "price": (
            "I need a connection to compare prices; I'll answer when I'm back online."
        ),
        "barcode": (
            "I don't know this product's price offline; "
            "I'll look it up when I'm back online."
        ),
    }
)


def holding_reply(request: Request) -> str:
    """What to say at once when ``request`` needs the cloud and it is offline.

    Args:
        request: The request waiting for the cloud.

    Returns:
        A short, kind-specific text promising the answer once back online.
    """
    if request.kind is RequestKind.PHOTO_QUERY:
        photo = _HOLDING_PHOTO.get(_normalise(request.intent))
        if photo is not None:
            return photo
    return _HOLDING.get(request.kind, _HOLDING_DEFAULT)


# --- the entry point ---------------------------------------------------------


class LocalSkills:
    """The phone-side skills, with their state and caches.

    Limits and their policies (all configurable here):

    - ``answer_ttl_s``: a cached answer (the last one, for "say that
      again", and answers by question) is used while younger than this;
    - ``max_cached``: answers cached by question; storing one more evicts
      the least recently used;
    - ``max_answer_chars``: longer answers are not cached;
    - ``route_ttl_s``: the cached route expires this long after it was
      stored (reading steps does not extend it); a new route replaces it;
    - ``max_prices``: prices learned from the cloud; storing one more
      evicts the least recently used (the catalogue is fixed);
    - ``max_photo_bytes``, ``max_photo_pixels``: bigger photos are not
      decoded on the phone (the barcode skill gives way to the cloud);
    - codes read from a photo whose price is unknown wait for the cloud's
      answer (to learn the price) under the ``max_cached`` and
      ``answer_ttl_s`` policies above.

    The answerer's own bounds (question length, operands, magnitude) are
    the constants of :mod:`relay.local.answerer`. Questions are cached
    under their normalised text (lower case, punctuation and extra spaces
    dropped) and intent.
    """

    __slots__ = (
        "_answers",
        "_last",
        "_max_answer_chars",
        "_max_photo_bytes",
        "_max_photo_pixels",
        "_pending_codes",
        "_prices",
        "_route",
        "state",
    )

    def __init__(
        self,
        state: PhoneState | None = None,
        *,
        answer_ttl_s: float = ANSWER_TTL_S,
        route_ttl_s: float = ROUTE_TTL_S,
        max_cached: int = MAX_CACHED_ANSWERS,
        max_prices: int = MAX_LEARNED_PRICES,
        max_answer_chars: int = MAX_ANSWER_CHARS,
        max_photo_bytes: int = MAX_PHOTO_BYTES,
        max_photo_pixels: int = MAX_PHOTO_PIXELS,
        catalogue: Mapping[str, str] = DEMO_CATALOGUE,
    ) -> None:
        """Create the skills.

        Args:
            state: The phone's state (a fresh one if omitted); phone-only
                skills read and change it.
            answer_ttl_s: Life of a cached answer, seconds.
            route_ttl_s: Life of a cached route, seconds.
            max_cached: Bound on answers cached by question.
            max_prices: Bound on prices learned from the cloud.
            max_answer_chars: Longer answers are not cached.
            max_photo_bytes: Bigger photos are not decoded.
            max_photo_pixels: Photos with more pixels are not decoded.
            catalogue: Fixed product texts by EAN-8/UPC-A/EAN-13 code.

        Raises:
            ValueError: A limit out of range or a bad catalogue code.
        """
        if max_answer_chars < 1 or max_photo_bytes < 1 or max_photo_pixels < 1:
            raise ValueError("limits must be at least 1")
        self.state = PhoneState() if state is None else state
        self._answers: TtlLruCache[tuple[str, str], str] = TtlLruCache(
            max_entries=max_cached, ttl_s=answer_ttl_s
        )
        self._last: TtlLruCache[None, str] = TtlLruCache(
            max_entries=1, ttl_s=answer_ttl_s
        )
        self._pending_codes: TtlLruCache[Request, tuple[str, ...]] = TtlLruCache(
            max_entries=max_cached, ttl_s=answer_ttl_s
        )
        self._route = RouteCache(ttl_s=route_ttl_s)
        self._prices = PriceBook(catalogue, max_learned=max_prices)
        self._max_answer_chars = max_answer_chars
        self._max_photo_bytes = max_photo_bytes
        self._max_photo_pixels = max_photo_pixels

    def match(self, request: Request, *, mono: float | None = None) -> SkillInfo | None:
        """Which skill would answer ``request``, without its media.

        Pure and fast (no media, no I/O; with ``mono`` it drops expired
        cache entries it meets). Cache-backed skills match only when their
        cache holds something; with ``mono``, only when it has not expired.

        Args:
            request: The request.
            mono: The monotonic time now, to check cache expiry.

        Returns:
            The skill, or ``None`` when only the cloud can answer.
        """
        skill = _BY_KIND.get(request.kind)
        if skill is not None:
            return skill
        intent = _normalise(request.intent)
        text = _normalise(request.text)
        if request.kind is RequestKind.NAVIGATION:
            if _asks_next_step(intent, text, anywhere=True) and self._route.has_next(
                mono
            ):
                return NEXT_STEP_SKILL
            return None
        if request.kind is RequestKind.PHOTO_QUERY:
            return BARCODE_SKILL if intent == "barcode" else None
        if request.kind not in _QUERIES:
            return None  # PAYMENT, and kinds added later
        if _asks_repeat(intent, text):
            return REPEAT_SKILL if self._last.get(None, mono) is not None else None
        if _asks_next_step(intent, text, anywhere=False):
            return NEXT_STEP_SKILL if self._route.has_next(mono) else None
        if text and self._answers.get((intent, text), mono) is not None:
            return REPEAT_SKILL
        if not intent and answerer.understand(request.text) is not None:
            return ANSWERER_SKILL
        return None

    def answer(
        self,
        request: Request,
        media: bytes,
        now: datetime.datetime,
        mono: float,
        *,
        codes: tuple[str, ...] | None = None,
    ) -> LocalAnswer | None:
        """Answer ``request`` on the phone, if a skill can.

        Phone-only skills change :attr:`state` (volume, media, timers).

        Args:
            request: The request.
            media: Its media (the JPEG of a photo query; may be empty).
            now: The local wall-clock time.
            mono: The monotonic time now (cache expiry).
            codes: The product codes :meth:`read_codes` found in ``media``,
                if the caller decoded them already (off its event loop);
                None: decoded here.

        Returns:
            The answer, or ``None`` when no skill matches or the matched one
            cannot answer after all (no barcode in the photo, unknown
            product, route or answer expired): the caller goes to the cloud.
        """
        skill = self.match(request, mono=mono)
        if skill is None:
            return None
        text = self._run(skill, request, media, now, mono, codes)
        if text is None:
            return None
        self._remember_last(text, mono)
        return LocalAnswer(text, skill)

    def _run(
        self,
        skill: SkillInfo,
        request: Request,
        media: bytes,
        now: datetime.datetime,
        mono: float,
        codes: tuple[str, ...] | None,
    ) -> str | None:
        if request.kind in PHONE_ONLY_KINDS:
            return phone_answer(request, self.state, now)
        if skill is NEXT_STEP_SKILL:
            return self._route.next_step(mono)
        if skill is REPEAT_SKILL:
            intent = _normalise(request.intent)
            question = _normalise(request.text)
            if _asks_repeat(intent, question):
                return self._last.get(None, mono)
            return self._answers.get((intent, question), mono)
        if skill is BARCODE_SKILL:
            if codes is None:
                codes = self.read_codes(media)
            if not codes:
                return None
            text = self._prices.look_up(codes)
            if text is None:
                self._pending_codes.put(request, codes, mono)
            return text
        return answerer.solve(request.text, now)

    def read_codes(self, media: bytes) -> tuple[str, ...]:
        """The product codes in a photo (stateless: safe in a worker thread).

        Decoding a 100 KB JPEG takes ~10 ms, a 3 MP one ~60 ms: an asyncio
        caller runs this with ``asyncio.to_thread`` and passes the result to
        :meth:`answer`.
        """
        return read_product_codes(
            media, max_bytes=self._max_photo_bytes, max_pixels=self._max_photo_pixels
        )

    def remember(self, request: Request, answer_text: str, mono: float) -> None:
        """Learn from the cloud's answer to ``request``.

        The answer becomes the last one (for "say that again") and, for a
        query, the cached answer to its question; a NAVIGATION answer fills
        the route cache (steps split on ``;`` or new lines; an answer to a
        next-step question replaces the route only when it carries two or
        more steps, the first counted as given); a barcode photo's answer
        carrying a price becomes that product's price (the code as decoded
        here earlier, or as written in the answer).

        Args:
            request: The request the cloud answered.
            answer_text: The cloud's answer.
            mono: The monotonic time now.
        """
        text = answer_text.strip()
        if not text:
            return
        self._remember_last(text, mono)
        intent = _normalise(request.intent)
        question = _normalise(request.text)
        if request.kind in _QUERIES and question:
            asks_repeat = _asks_repeat(intent, question)
            asks_next = _asks_next_step(intent, question, anywhere=False)
            if (
                not asks_repeat
                and not asks_next
                and len(text) <= self._max_answer_chars
            ):
                self._answers.put((intent, question), text, mono)
        elif request.kind is RequestKind.NAVIGATION:
            steps = _STEP_SPLIT.split(text)
            if not _asks_next_step(intent, question, anywhere=True):
                self._route.store(steps, mono)
            elif sum(1 for step in steps if step.strip()) >= 2:
                self._route.store(steps, mono, cursor=1)
        elif request.kind is RequestKind.PHOTO_QUERY and intent == "barcode":
            codes = self._pending_codes.pop(request, mono) or tuple(
                code for code in _CODE_IN_TEXT.findall(text) if is_product_code(code)
            )
            if codes and _PRICE.search(text):
                self._prices.learn(codes[0], text)

    def remember_route(self, steps: Sequence[str], mono: float) -> int:
        """Cache a route; the next "what's next" reads its first step.

        Args:
            steps: The steps in order (blank ones skipped; at most
                :data:`~relay.local.caches.MAX_ROUTE_STEPS` kept).
            mono: The monotonic time now.

        Returns:
            The number of steps kept.
        """
        return self._route.store(steps, mono)

    def remember_price(self, code: str, text: str) -> None:
        """Cache what to say about a product (its name and price).

        Args:
            code: Its EAN-8, UPC-A or EAN-13 code.
            text: What to say, e.g. "Oat milk 1 L: 2.29 €".

        Raises:
            ValueError: ``code`` is not a valid product code or ``text`` is blank.
        """
        self._prices.learn(code, text)

    def holding_reply(self, request: Request) -> str:
        """What to say at once when ``request`` waits for the cloud offline.

        Args:
            request: The request.

        Returns:
            See :func:`holding_reply`.
        """
        return holding_reply(request)

    def _remember_last(self, text: str, mono: float) -> None:
        if len(text) <= self._max_answer_chars:
            self._last.put(None, text, mono)
