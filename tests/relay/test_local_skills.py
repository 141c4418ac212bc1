"""Phone-side skills: the table, every skill, the caches and their limits."""

from __future__ import annotations

import datetime
import io
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol.bodies import Request, RequestKind
from relay.local import answerer
from relay.local.barcode import read_product_codes
from relay.local.caches import (
    MAX_ROUTE_STEPS,
    MAX_STEP_CHARS,
    PriceBook,
    RouteCache,
    TtlLruCache,
    is_product_code,
)
from relay.local.skills import (
    ANSWERER_COST_S,
    ANSWERER_SKILL,
    BARCODE_SKILL,
    BATTERY_SKILL,
    DEMO_CATALOGUE,
    EITHER_QUALITY,
    MEDIA_KEYS_SKILL,
    NEXT_STEP_SKILL,
    PHONE_ONLY_QUALITY,
    REPEAT_SKILL,
    SKILL_COST_S,
    SKILLS,
    TIME_DATE_SKILL,
    TIMERS_SKILL,
    LocalAnswer,
    LocalSkills,
    PhoneState,
    Scope,
    SkillInfo,
    answer,
    holding_reply,
    skills,
)
from relay.sim.media import barcode_photo, photo

NOW = datetime.datetime(2025, 3, 4, 14, 5, tzinfo=datetime.UTC)
CODE = "4006381333931"  # in DEMO_CATALOGUE
UNKNOWN_CODE = "5000112637922"  # a valid EAN-13, not in the catalogue


def req(
    kind: RequestKind,
    text: str | None = None,
    intent: str | None = None,
    *,
    size: int = 0,
    at_us: int = 0,
) -> Request:
    return Request(kind, 5_000, at_us, size, intent, text)


def ask(
    skills_: LocalSkills, request: Request, mono: float = 0.0, media: bytes = b""
) -> str | None:
    got = skills_.answer(request, media, NOW, mono)
    return None if got is None else got.text


# --- the table ---------------------------------------------------------------


def test_skill_table_declares_scope_quality_and_cost() -> None:
    assert skills() == SKILLS
    assert len({s.name for s in SKILLS}) == len(SKILLS)
    for skill in SKILLS:
        expected = (
            PHONE_ONLY_QUALITY if skill.scope is Scope.PHONE_ONLY else EITHER_QUALITY
        )
        assert skill.quality == expected
        assert skill.cost_s == (
            ANSWERER_COST_S if skill is ANSWERER_SKILL else SKILL_COST_S
        )
        assert skill.description
        assert "\n" not in skill.description
    assert SKILL_COST_S == 0.3
    assert ANSWERER_COST_S == 1.2
    phone_only = {s.name for s in SKILLS if s.scope is Scope.PHONE_ONLY}
    assert phone_only == {"time_date", "battery", "media_keys", "timers"}
    kinds = set().union(*(s.kinds for s in SKILLS))
    assert RequestKind.PAYMENT not in kinds
    assert Scope("either") is Scope.EITHER


def test_skill_info_is_checked() -> None:
    with pytest.raises(ValueError, match="quality"):
        SkillInfo("x", frozenset({RequestKind.TIME}), Scope.EITHER, 1.5, 0.3, "x")
    with pytest.raises(ValueError, match="cost"):
        SkillInfo("x", frozenset({RequestKind.TIME}), Scope.EITHER, 0.6, 0.0, "x")
    with pytest.raises(ValueError, match="kind"):
        SkillInfo("x", frozenset(), Scope.EITHER, 0.6, 0.3, "x")


# --- phone-only skills -------------------------------------------------------


def test_phone_only_kinds_match_and_answer() -> None:
    state = PhoneState(battery_pct=42)
    local = LocalSkills(state)
    cases = [
        (req(RequestKind.TIME, "what time is it"), TIME_DATE_SKILL, "It is 14:05."),
        (
            req(RequestKind.TIME, "what's the date"),
            TIME_DATE_SKILL,
            "Today is Tuesday, 4 March 2025; it is 14:05.",
        ),
        (req(RequestKind.BATTERY), BATTERY_SKILL, "Your glasses are at 42% battery."),
        (req(RequestKind.VOLUME, "volume up", "up"), MEDIA_KEYS_SKILL, "Volume 6."),
        (req(RequestKind.VOLUME, "quieter", "down"), MEDIA_KEYS_SKILL, "Volume 5."),
        (
            req(RequestKind.MEDIA, "next track", "next"),
            MEDIA_KEYS_SKILL,
            "Playing track 2.",
        ),
        (req(RequestKind.MEDIA, "pause"), MEDIA_KEYS_SKILL, "Paused."),
        (
            req(RequestKind.TIMER, "set a timer for five minutes"),
            TIMERS_SKILL,
            "Timer set for 5 minutes.",
        ),
    ]
    for request, skill, text in cases:
        assert local.match(request) is skill
        assert local.answer(request, b"", NOW, 0.0) == LocalAnswer(text, skill)
    assert state.timers == [5]
    assert state.playing is False
    assert state.track == 2


def test_legacy_answer_is_unchanged() -> None:
    state = PhoneState()
    assert answer(req(RequestKind.TIME, "what's the date"), state, NOW) == (
        "It is 14:05."
    )
    assert answer(req(RequestKind.BATTERY), state, NOW) == (
        "Battery level not reported yet."
    )
    assert answer(req(RequestKind.TIMER, "10 min"), state, NOW) == (
        "Timer set for 10 minutes."
    )
    assert answer(req(RequestKind.PAYMENT), state, NOW) == (
        "I can't do that on the phone."
    )


# --- cloud-only --------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        req(RequestKind.VOICE_QUERY, "why is the sky blue"),
        req(RequestKind.TEXT_QUERY, "what is the capital of France"),
        req(RequestKind.VOICE_QUERY, "tell me a joke"),
        req(RequestKind.VOICE_QUERY, "what is 12"),
        req(RequestKind.VOICE_QUERY, "repeat the word banana five times"),
        req(RequestKind.VOICE_QUERY, "what is 12 times 7", "translate"),
        req(RequestKind.VOICE_QUERY, None),
        req(RequestKind.PAYMENT, "pay for the coffee", "pay"),
        req(RequestKind.PHOTO_QUERY, "is this cheaper online", "price", size=100_000),
        req(RequestKind.PHOTO_QUERY, "what is this", "identify", size=100_000),
        req(RequestKind.PHOTO_QUERY, "what is 12 times 7", size=100_000),
        req(RequestKind.NAVIGATION, "walk me to the station", "navigate"),
        req(RequestKind.NAVIGATION, "what's my next turn", "next_step"),  # no route
    ],
)
def test_cloud_only_requests_are_not_matched(request_: Request) -> None:
    local = LocalSkills()
    assert local.match(request_) is None
    assert local.match(request_, mono=0.0) is None
    assert local.answer(request_, photo(), NOW, 0.0) is None


# --- the on-phone answerer ---------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("what is 12 times 7", "12 \N{MULTIPLICATION SIGN} 7 = 84."),
        ("What's 15 percent of 80?", "15% of 80 is 12."),
        ("whats twenty one plus three", "21 + 3 = 24."),
        ("3.5 + 4 * 2", "3.5 + 4 \N{MULTIPLICATION SIGN} 2 = 11.5."),
        ("one hundred and five divided by two", "105 \N{DIVISION SIGN} 2 = 52.5."),
        ("10 / 0", "You can't divide by zero."),
        ("square root of 81", "The square root of 81 is 9."),
        ("7 squared", "7 squared is 49."),
        ("convert 10 km to miles", "10 km is 6.21 miles."),
        ("how many kilometers is 1 mile", "1 mile is 1.61 km."),
        ("how many pounds is 70 kg", "70 kg is 154.32 lb."),
        ("5 lbs in kilograms", "5 lb is 2.27 kg."),
        ("20 degrees in fahrenheit", "20 °C is 68 °F."),
        ("98.6 °F to celsius", "98.6 °F is 37 °C."),
        ("what day is it", "It's Tuesday."),
        ("What's the date today?", "Today is Tuesday, 4 March 2025."),
        ("what day is tomorrow", "Tomorrow is Wednesday, 5 March 2025."),
        ("what time is it", "It is 14:05."),
        ("what year is it", "It's 2025."),
        ("how do you spell necessary", "Necessary: N-E-C-E-S-S-A-R-Y."),
        ("spell one please", "One: O-N-E."),
    ],
)
def test_answerer(question: str, expected: str) -> None:
    local = LocalSkills()
    request = req(RequestKind.VOICE_QUERY, question, size=16_000)
    assert local.match(request) is ANSWERER_SKILL
    assert local.answer(request, b"", NOW, 0.0) == LocalAnswer(expected, ANSWERER_SKILL)
    assert answerer.solve(question, NOW) == expected


def test_answerer_bounds() -> None:
    assert answerer.understand("1 + " * 100 + "1") is None  # too long
    assert answerer.understand("1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9") is None
    assert answerer.understand("99999999999999999 times 2") is None
    assert answerer.understand("5 km in km") is None
    assert answerer.understand("5 km in kg") is None


# --- next navigation step ----------------------------------------------------


def test_next_step_from_remembered_route_then_expiry() -> None:
    local = LocalSkills(route_ttl_s=600.0)
    nav = req(RequestKind.NAVIGATION, "what's my next turn", "next_step")
    spoken = req(RequestKind.VOICE_QUERY, "what's next")
    assert local.match(nav) is None
    assert (
        local.remember_route(
            ["Turn left onto Main Street", " ", "Continue 300 m"], 10.0
        )
        == 2
    )
    assert local.match(nav) is NEXT_STEP_SKILL
    assert local.match(spoken) is NEXT_STEP_SKILL
    assert local.answer(nav, b"", NOW, 20.0) == LocalAnswer(
        "Turn left onto Main Street", NEXT_STEP_SKILL
    )
    assert ask(local, spoken, 30.0) == "Continue 300 m"
    assert local.match(nav) is None  # read to its end
    assert ask(local, nav, 40.0) is None
    local.remember_route(["Turn right", "Arrive"], 100.0)
    assert local.match(nav, mono=699.9) is NEXT_STEP_SKILL
    assert local.match(nav, mono=700.0) is None  # expired
    assert ask(local, nav, 700.0) is None


def test_next_step_phrasings() -> None:
    local = LocalSkills()
    local.remember_route(["Turn right"], 0.0)
    assert (
        local.match(req(RequestKind.NAVIGATION, "where do I turn next?"))
        is NEXT_STEP_SKILL
    )
    assert (
        local.match(req(RequestKind.VOICE_QUERY, "Next turn, please"))
        is NEXT_STEP_SKILL
    )
    assert (
        local.match(req(RequestKind.VOICE_QUERY, "what's next on my calendar")) is None
    )


def test_route_from_cloud_answers() -> None:
    local = LocalSkills()
    navigate = req(RequestKind.NAVIGATION, "walk me to the station", "navigate")
    nav = req(RequestKind.NAVIGATION, "next step", "next_step")
    local.remember(
        navigate, "Head north on Elm St;\nTurn left at the bakery\nArrive", 0.0
    )
    assert [ask(local, nav, t) for t in (1.0, 2.0, 3.0, 4.0)] == [
        "Head north on Elm St",
        "Turn left at the bakery",
        "Arrive",
        None,
    ]
    # A one-step answer to "next step" does not replace the route ...
    local.remember(nav, "In 200 m, turn left", 5.0)
    assert local.match(nav) is None
    # ... a multi-step one does, its first step counted as given.
    local.remember(nav, "Turn left; Cross the bridge; Arrive", 6.0)
    assert ask(local, nav, 7.0) == "Cross the bridge"


def test_route_cache_limits() -> None:
    route = RouteCache(ttl_s=1.0)
    kept = route.store(["x" * 1000] + [f"step {i}" for i in range(100)], 0.0)
    assert kept == MAX_ROUTE_STEPS
    first = route.next_step(0.5)
    assert first is not None
    assert len(first) == MAX_STEP_CHARS
    with pytest.raises(ValueError, match="ttl_s"):
        RouteCache(ttl_s=0)


# --- repeat and recent answers -----------------------------------------------


def test_say_that_again_repeats_the_last_answer_until_it_expires() -> None:
    local = LocalSkills(answer_ttl_s=60.0)
    again = req(RequestKind.VOICE_QUERY, "Say that again?", size=8_000)
    by_intent = req(RequestKind.VOICE_QUERY, "hm", "repeat")
    assert local.match(again) is None
    local.remember(
        req(RequestKind.VOICE_QUERY, "why is the sky blue"), "Rayleigh.", 0.0
    )
    assert local.match(again) is REPEAT_SKILL
    assert local.answer(again, b"", NOW, 10.0) == LocalAnswer("Rayleigh.", REPEAT_SKILL)
    assert ask(local, by_intent, 20.0) == "Rayleigh."
    assert local.match(again, mono=80.0) is None
    assert ask(local, again, 80.0) is None
    # Local answers are repeated too.
    assert ask(local, req(RequestKind.TIME), 100.0) == "It is 14:05."
    assert ask(local, req(RequestKind.TEXT_QUERY, "repeat"), 101.0) == "It is 14:05."


def test_identical_question_is_answered_from_cache_within_ttl() -> None:
    local = LocalSkills(answer_ttl_s=60.0)
    question = req(RequestKind.VOICE_QUERY, "Why is the sky blue?", size=32_000)
    same = req(RequestKind.TEXT_QUERY, "why is  the sky blue")
    other_intent = req(RequestKind.VOICE_QUERY, "why is the sky blue", "translate")
    assert local.match(question) is None
    local.remember(question, "Rayleigh scattering.", 0.0)
    local.remember(req(RequestKind.VOICE_QUERY, "tell me a joke"), "Knock knock.", 1.0)
    assert local.match(same) is REPEAT_SKILL
    assert local.answer(same, b"", NOW, 59.0) == LocalAnswer(
        "Rayleigh scattering.", REPEAT_SKILL
    )
    assert local.match(other_intent) is None
    assert local.match(same, mono=60.0) is None
    assert ask(local, same, 60.0) is None


def test_answer_cache_is_lru_bounded() -> None:
    local = LocalSkills(max_cached=2)
    questions = [req(RequestKind.TEXT_QUERY, f"open question {i}") for i in range(3)]
    local.remember(questions[0], "a0", 0.0)
    local.remember(questions[1], "a1", 1.0)
    assert ask(local, questions[0], 2.0) == "a0"  # now the most recently used
    local.remember(questions[2], "a2", 3.0)  # evicts question 1
    assert ask(local, questions[1], 4.0) is None
    assert ask(local, questions[0], 4.0) == "a0"
    assert ask(local, questions[2], 4.0) == "a2"


def test_long_answers_are_not_cached() -> None:
    local = LocalSkills(max_answer_chars=10)
    question = req(RequestKind.TEXT_QUERY, "why")
    local.remember(question, "x" * 11, 0.0)
    assert local.match(question) is None
    assert local.match(req(RequestKind.TEXT_QUERY, "say that again")) is None


def test_ttl_lru_cache() -> None:
    cache: TtlLruCache[str, int] = TtlLruCache(max_entries=2, ttl_s=10.0)
    cache.put("a", 1, 0.0)
    cache.put("b", 2, 5.0)
    assert cache.get("a") == 1  # pure look-up: no recency change
    cache.put("c", 3, 6.0)
    assert cache.get("a", 6.0) is None
    assert cache.get("b", 14.9) == 2
    assert cache.get("b", 15.0) is None
    assert len(cache) == 1
    assert cache.expire(16.0) == 1
    assert cache.pop("c") is None
    with pytest.raises(ValueError, match="max_entries"):
        TtlLruCache(max_entries=0, ttl_s=1.0)
    with pytest.raises(ValueError, match="ttl_s"):
        TtlLruCache(max_entries=1, ttl_s=0.0)


# --- barcode -----------------------------------------------------------------


def _barcode_request(at_us: int = 0) -> Request:
    return req(
        RequestKind.PHOTO_QUERY,
        "how much is this",
        "barcode",
        size=100_000,
        at_us=at_us,
    )


@pytest.mark.parametrize("size", [100_000, 20_000])
def test_barcode_photo_is_decoded_on_the_phone(size: int) -> None:
    jpeg = barcode_photo(CODE, size, 1)
    assert 0.8 * size <= len(jpeg) <= 1.1 * size
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG"
    assert read_product_codes(jpeg) == (CODE,)
    local = LocalSkills()
    request = _barcode_request()
    assert local.match(request) is BARCODE_SKILL
    assert local.answer(request, jpeg, NOW, 0.0) == LocalAnswer(
        DEMO_CATALOGUE[CODE], BARCODE_SKILL
    )


def test_barcode_decoding_is_well_under_the_declared_cost() -> None:
    jpeg = barcode_photo(CODE, 100_000, 0)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        assert read_product_codes(jpeg) == (CODE,)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < BARCODE_SKILL.cost_s  # ~10 ms measured


def test_no_barcode_or_no_price_falls_back_to_the_cloud() -> None:
    local = LocalSkills()
    request = _barcode_request()
    assert local.answer(request, photo(100_000, 0), NOW, 0.0) is None
    assert local.answer(request, b"", NOW, 0.0) is None
    assert local.answer(request, b"\xff\xd8\xff garbage", NOW, 0.0) is None
    unknown = barcode_photo(UNKNOWN_CODE, 100_000, 2)
    assert read_product_codes(unknown) == (UNKNOWN_CODE,)
    assert local.answer(request, unknown, NOW, 0.0) is None
    # The cloud's answer with a price teaches the phone (code from the photo).
    local.remember(request, "Ginger beer 330 ml: 1.29 €", 1.0)
    assert ask(local, _barcode_request(at_us=1), 2.0, unknown) == (
        "Ginger beer 330 ml: 1.29 €"
    )


def test_photo_limits_and_learned_prices() -> None:
    jpeg = barcode_photo(CODE, 100_000, 1)
    assert (
        ask(LocalSkills(max_photo_bytes=50_000), _barcode_request(), 0.0, jpeg) is None
    )
    assert (
        ask(LocalSkills(max_photo_pixels=100_000), _barcode_request(), 0.0, jpeg)
        is None
    )
    local = LocalSkills(catalogue={}, max_prices=1)
    assert ask(local, _barcode_request(), 0.0, jpeg) is None
    local.remember(_barcode_request(at_us=5), f"{CODE} is a highlighter, $2.50", 1.0)
    assert (
        ask(local, _barcode_request(), 2.0, jpeg) == f"{CODE} is a highlighter, $2.50"
    )
    local.remember_price(UNKNOWN_CODE, "Ginger beer: 1.29 €")  # evicts CODE
    assert ask(local, _barcode_request(), 3.0, jpeg) is None
    with pytest.raises(ValueError, match="EAN"):
        local.remember_price("4006381333932", "bad check digit")
    with pytest.raises(ValueError, match="blank"):
        local.remember_price(CODE, "  ")
    with pytest.raises(ValueError, match="EAN"):
        LocalSkills(catalogue={"123": "x"})


def test_product_codes() -> None:
    assert is_product_code(CODE)
    assert is_product_code("96385074")  # EAN-8
    assert is_product_code("036000291452")  # UPC-A
    assert not is_product_code("4006381333932")
    assert not is_product_code("40063813339\N{FULLWIDTH DIGIT THREE}1")
    book = PriceBook({"036000291452": "Tissues: 2 €"}, max_learned=1)
    assert book.look_up(["0036000291452"]) == "Tissues: 2 €"


def test_barcode_photo_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="check digit"):
        barcode_photo("4006381333932", 100_000, 0)
    with pytest.raises(ValueError, match="13 digits"):
        barcode_photo("12345", 100_000, 0)
    with pytest.raises(ValueError, match="KB"):
        barcode_photo(CODE, 1_000, 0)


# --- holding replies ---------------------------------------------------------


def test_holding_replies_are_kind_specific() -> None:
    replies = {
        kind: holding_reply(req(kind))
        for kind in (
            RequestKind.VOICE_QUERY,
            RequestKind.PHOTO_QUERY,
            RequestKind.NAVIGATION,
            RequestKind.PAYMENT,
        )
    }
    assert len(set(replies.values())) == 4
    assert replies[RequestKind.VOICE_QUERY] == (
        "I need a connection for that; I'll answer when I'm back online."
    )
    assert "Payments" in replies[RequestKind.PAYMENT]
    price = holding_reply(req(RequestKind.PHOTO_QUERY, None, "price"))
    assert "prices" in price
    assert (
        LocalSkills().holding_reply(req(RequestKind.PHOTO_QUERY, None, "price"))
        == price
    )
    for text in [*replies.values(), price]:
        assert "back online" in text


# --- never raise -------------------------------------------------------------

_TEXTS = (
    st.none()
    | st.text(max_size=80)
    | st.sampled_from(
        [
            "say that again",
            "what's next",
            "what is 12 times 7",
            "convert 1e309 km to miles",
            "9" * 17 + " times 9",
            "20 degrees in degrees",
            "spell " + "a" * 40,
            "how many c is 5 f",
        ]
    )
)
_INTENTS = (
    st.none()
    | st.text(max_size=20)
    | st.sampled_from(["barcode", "price", "repeat", "next_step", "pay", "translate"])
)


@settings(max_examples=300)
@given(
    kind=st.sampled_from(RequestKind),
    text=_TEXTS,
    intent=_INTENTS,
    media=st.binary(max_size=64),
    mono=st.floats(min_value=0, max_value=1e6),
)
def test_match_and_answer_never_raise(
    kind: RequestKind, text: str | None, intent: str | None, media: bytes, mono: float
) -> None:
    local = LocalSkills()
    local.remember_route(["Turn left"], 0.0)
    request = req(kind, text, intent)
    skill = local.match(request)
    assert skill is None or kind in skill.kinds
    got = local.answer(request, media, NOW, mono)
    assert got is None or (got.text and kind in got.skill.kinds)
    local.remember(request, text or "ok", mono)
    assert holding_reply(request)


@settings(max_examples=50)
@given(cut=st.integers(min_value=0, max_value=5_000), flip=st.integers(0, 4_999))
def test_damaged_photos_never_raise(cut: int, flip: int) -> None:
    jpeg = bytearray(barcode_photo(CODE, 20_000, 0)[: 400 + cut])
    jpeg[flip % len(jpeg)] ^= 0x55
    assert read_product_codes(bytes(jpeg)) in ((), (CODE,))


def test_codes_decoded_off_the_loop_are_used_as_given() -> None:
    """The daemon decodes in a worker thread (read_codes) and passes the codes."""
    local = LocalSkills()
    request = _barcode_request()
    jpeg = barcode_photo(CODE, 100_000, 2)
    codes = local.read_codes(jpeg)
    assert codes == (CODE,)
    expected = LocalAnswer(DEMO_CATALOGUE[CODE], BARCODE_SKILL)
    assert local.answer(request, jpeg, NOW, 0.0, codes=codes) == expected
    # Given codes are not decoded again: no photo needed.
    assert local.answer(request, b"", NOW, 0.0, codes=codes) == expected
    assert local.answer(request, jpeg, NOW, 0.0, codes=()) is None
