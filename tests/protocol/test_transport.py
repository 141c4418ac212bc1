"""protocol.transport: sealing, receive order, replay window, crypto negatives.

SECURITY.md §1.2 and the §4 Tier 0 "Crypto negatives" / "Thresholds" rows.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.constants import PROTOCOL_VERSION, RecordType
from protocol.errors import (
    AuthenticationError,
    LimitExceededError,
    LocalProtocolError,
    MalformedError,
    MessageTooLargeError,
    ReplayError,
    UnsupportedVersionError,
)
from protocol.record import Record, RecordHeader
from protocol.transport import (
    DropReason,
    ReplayWindow,
    TransportLimits,
    TransportSession,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzz_transport

SID = 0x0000_BEEF
OLD_SID = 0x0000_BEEE
U32 = 1 << 32
HEADER = 14
TAG = 16
# Crypto-negative runs send thousands of forgeries on purpose; teardown is
# tested on its own below.
NO_TEARDOWN = TransportLimits(
    max_consecutive_auth_failures=1 << 40, max_auth_failures=1 << 40
)
PLAINTEXT_SIZES = (0, 1, 15, 16, 17, 63, 64, 100, 255, 300)


@dataclass
class Pair:
    """Both ends of one session: ``phone`` receives what ``glasses`` seals."""

    phone: TransportSession
    glasses: TransportSession
    phone_key: bytes  # phone -> glasses
    glasses_key: bytes  # glasses -> phone


def make_pair(
    limits: TransportLimits = NO_TEARDOWN, sid: int = SID, seed: int = 1
) -> Pair:
    rng = random.Random(seed)
    phone_key, glasses_key = rng.randbytes(32), rng.randbytes(32)
    phone = TransportSession(phone_key, glasses_key, sid, limits, started_at=0.0)
    glasses = TransportSession(glasses_key, phone_key, sid, limits, started_at=0.0)
    return Pair(phone, glasses, phone_key, glasses_key)


def forge(key: bytes, counter: int, plaintext: bytes = b"x", sid: int = SID) -> bytes:
    """An authentic record for any counter, bypassing the sender's checks."""
    header = RecordHeader(RecordType.DATA, sid, counter).encode()
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return header + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit >> 3] ^= 1 << (bit & 7)
    return bytes(out)


def state(session: TransportSession) -> tuple[int, int, int]:
    window = session.replay_window
    return window.highest, window.bitmap, session.send_counter


def expected_reason(
    session: TransportSession, data: bytes, limits: TransportLimits = NO_TEARDOWN
) -> DropReason:
    """Independent model of the receive order for a non-genuine input."""
    if not HEADER + TAG <= len(data) <= HEADER + TAG + limits.max_record_plaintext:
        return DropReason.MALFORMED
    if data[0] != PROTOCOL_VERSION or data[1] != RecordType.DATA:
        return DropReason.MALFORMED
    if int.from_bytes(data[2:6], "big") != session.session_id:
        return DropReason.UNKNOWN_SESSION
    counter = int.from_bytes(data[6:14], "big")
    if counter >= limits.reject_after_messages:
        return DropReason.EXHAUSTED
    if not session.replay_window.accepts(counter):
        return DropReason.REPLAY
    return DropReason.AUTH_FAIL


def assert_dropped(
    session: TransportSession, data: bytes, reason: DropReason | None = None
) -> None:
    """``data`` is dropped for ``reason`` (default: the model's), state intact."""
    if reason is None:
        reason = expected_reason(session, data, session.limits)
    before, drops = state(session), session.drops
    assert session.open(data) is None
    after = session.drops
    assert after[reason] == drops[reason] + 1, (reason, after)
    assert sum(after.values()) == sum(drops.values()) + 1
    assert state(session) == before


# -- round trip and layout ----------------------------------------------------


def test_round_trip_and_record_layout() -> None:
    pair = make_pair()
    for i, size in enumerate(PLAINTEXT_SIZES):
        plaintext = random.Random(i).randbytes(size)
        frame = pair.glasses.seal(plaintext)
        assert len(frame) == HEADER + size + TAG
        record = Record.decode(frame)
        assert record.header == RecordHeader(RecordType.DATA, SID, i)
        assert pair.phone.open(frame) == plaintext
    assert pair.glasses.send_counter == len(PLAINTEXT_SIZES)
    assert pair.phone.replay_window.highest == len(PLAINTEXT_SIZES) - 1
    assert sum(pair.phone.drops.values()) == 0


def test_nonce_and_aad_follow_the_noise_layout() -> None:
    pair = make_pair()
    for _ in range(3):
        pair.glasses.seal(b"skip")
    frame = pair.glasses.seal(b"hello")
    assert frame == forge(pair.glasses_key, 3, b"hello")


def test_accepts_buffers() -> None:
    pair = make_pair()
    frame = pair.glasses.seal(bytearray(b"abc"))
    assert pair.phone.open(memoryview(bytearray(frame))) == b"abc"


def test_counter_advances_before_encrypting_and_never_repeats() -> None:
    pair = make_pair()
    counters = [int.from_bytes(pair.glasses.seal(b"")[6:14]) for _ in range(50)]
    assert counters == list(range(50))


def test_drops_is_a_snapshot_with_every_reason() -> None:
    pair = make_pair()
    drops = pair.phone.drops
    assert set(drops) == set(DropReason)
    assert [r.value for r in DropReason] == [
        "malformed",
        "unknown_session",
        "replay",
        "exhausted",
        "auth_fail",
    ]
    pair.phone.open(b"")
    assert drops[DropReason.MALFORMED] == 0
    assert pair.phone.drops[DropReason.MALFORMED] == 1


# -- the crypto-negative table ------------------------------------------------


@pytest.fixture
def negatives() -> tuple[Pair, list[bytes], list[bytes]]:
    """A pair whose phone opened frames 0..4; frames 5..14 are the targets."""
    pair = make_pair()
    plaintexts = [bytes([i]) * size for i, size in enumerate(PLAINTEXT_SIZES * 2)]
    frames = [pair.glasses.seal(p) for p in plaintexts]
    for frame, plaintext in zip(frames[:5], plaintexts, strict=False):
        assert pair.phone.open(frame) == plaintext
    return pair, frames, plaintexts


def test_every_single_bit_flip_is_rejected_for_the_right_reason(
    negatives: tuple[Pair, list[bytes], list[bytes]],
) -> None:
    pair, frames, plaintexts = negatives
    phone = pair.phone
    seen: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
    flips = 0
    for frame in frames[5:15]:
        for bit in range(len(frame) * 8):
            mutated = flip(frame, bit)
            reason = expected_reason(phone, mutated)
            byte = bit >> 3
            if byte < 2:
                assert reason is DropReason.MALFORMED
            elif byte < 6:
                assert reason is DropReason.UNKNOWN_SESSION
            elif byte >= HEADER:
                assert reason is DropReason.AUTH_FAIL
            assert_dropped(phone, mutated, reason)
            seen[reason] += 1
            flips += 1
    assert flips == sum(len(f) * 8 for f in frames[5:15])
    # Counter flips hit all three counter outcomes: a seen counter, one past
    # reject_after, and a fresh one whose nonce/AAD no longer match.
    assert all(seen[reason] > 0 for reason in DropReason), seen
    assert phone.drops == seen
    # The genuine frames still open, out of order within the window ...
    order = list(range(5, 15))
    random.Random(3).shuffle(order)
    for i in order:
        assert phone.open(frames[i]) == plaintexts[i]
    # ... and in order.
    for i in range(15, 20):
        assert phone.open(frames[i]) == plaintexts[i]


def test_every_truncation_and_extension_is_rejected(
    negatives: tuple[Pair, list[bytes], list[bytes]],
) -> None:
    pair, frames, plaintexts = negatives
    phone = pair.phone
    rng = random.Random(4)
    count = 0
    for frame in frames[5:15]:
        for size in range(len(frame)):
            short = size < HEADER + TAG
            reason = DropReason.MALFORMED if short else DropReason.AUTH_FAIL
            assert_dropped(phone, frame[:size], reason)
            count += 1
        for size in range(1, len(frame)):  # cut from the front
            assert_dropped(phone, frame[size:])
            count += 1
        for extra in range(1, 17):
            assert_dropped(phone, frame + bytes(extra), DropReason.AUTH_FAIL)
            assert_dropped(phone, frame + rng.randbytes(extra), DropReason.AUTH_FAIL)
            count += 2
    # Past max_record_plaintext: malformed before any crypto.
    limit = phone.limits.max_record_plaintext
    big = pair.glasses.seal(bytes(limit))
    assert_dropped(phone, big + b"\0", DropReason.MALFORMED)
    count += 1
    assert sum(phone.drops.values()) == count
    for i in range(5, 20):
        assert phone.open(frames[i]) == plaintexts[i]
    assert phone.open(big) == bytes(limit)


def test_replays_rejected_including_after_the_window_moved(
    negatives: tuple[Pair, list[bytes], list[bytes]],
) -> None:
    pair, frames, plaintexts = negatives
    phone, glasses = pair.phone, pair.glasses
    for i in (7, 5, 9, 6, 8):
        assert phone.open(frames[i]) == plaintexts[i]
    for _ in range(3):
        for i in range(10):
            assert_dropped(phone, frames[i], DropReason.REPLAY)
    # Slide the window W + 1 past frame 19; 10..19 never opened but are old now.
    window = phone.replay_window.size
    for _ in range(window + 1):
        assert phone.open(glasses.seal(b"tick")) == b"tick"
    assert phone.replay_window.highest == 20 + window
    for frame in frames:
        assert_dropped(phone, frame, DropReason.REPLAY)
    # Authentic frames for 20 (just fell out) and 21.. (opened by the ticks).
    for i in range(20, 21 + window):
        assert_dropped(phone, forge(pair.glasses_key, i), DropReason.REPLAY)
    assert phone.drops[DropReason.REPLAY] == 30 + 20 + window + 1
    assert phone.open(glasses.seal(b"next")) == b"next"


def test_window_out_of_order_within_window() -> None:
    pair = make_pair()
    frames = [pair.glasses.seal(i.to_bytes(2)) for i in range(2000)]
    assert pair.phone.open(frames[1500]) == (1500).to_bytes(2)
    assert pair.phone.open(frames[1500 - 1023]) == (1500 - 1023).to_bytes(2)
    assert_dropped(pair.phone, frames[1500 - 1024], DropReason.REPLAY)
    for i in range(1501, 2000):
        assert pair.phone.open(frames[i]) is not None


def test_previous_session_frames_rejected() -> None:
    old = make_pair(sid=OLD_SID, seed=7)
    old_frames = [old.glasses.seal(b"old") for _ in range(5)]
    assert old.phone.open(old_frames[0]) == b"old"
    new = make_pair(sid=SID, seed=8)
    assert new.phone.open(new.glasses.seal(b"new")) == b"new"
    for frame in old_frames:  # after reconnect: other keys, other session id
        assert_dropped(new.phone, frame, DropReason.UNKNOWN_SESSION)
    # Even if the new session reused the id, the old keys do not verify.
    colliding = make_pair(sid=OLD_SID, seed=9)
    assert_dropped(colliding.phone, old_frames[0], DropReason.AUTH_FAIL)
    colliding.phone.open(colliding.glasses.seal(b"a"))
    assert_dropped(colliding.phone, old_frames[3], DropReason.AUTH_FAIL)


def test_reflected_frames_rejected() -> None:
    pair = make_pair()
    ours = [pair.phone.seal(b"to glasses") for _ in range(5)]
    for frame in ours:  # our own frames, same session id, fresh counters
        assert_dropped(pair.phone, frame, DropReason.AUTH_FAIL)
    assert pair.glasses.open(ours[0]) == b"to glasses"
    with pytest.raises(LocalProtocolError):
        TransportSession(bytes(32), bytes(32), SID, started_at=0.0)


def test_wrong_session_ids_rejected() -> None:
    pair = make_pair()
    frame = pair.glasses.seal(b"x")
    for sid in (0, SID - 1, SID + 1, SID ^ 0x8000_0000, U32 - 1):
        swapped = frame[:2] + sid.to_bytes(4, "big") + frame[6:]
        assert_dropped(pair.phone, swapped, DropReason.UNKNOWN_SESSION)
    assert pair.phone.open(frame) == b"x"


def test_exhausted_counters_rejected_before_the_aead() -> None:
    pair = make_pair()
    for counter in (U32, U32 + 1, (1 << 63), (1 << 64) - 1):
        authentic = forge(pair.glasses_key, counter)
        assert_dropped(pair.phone, authentic, DropReason.EXHAUSTED)
    assert pair.phone.open(forge(pair.glasses_key, U32 - 1)) == b"x"
    assert pair.phone.replay_window.highest == U32 - 1


def test_non_data_records_and_other_versions_are_malformed() -> None:
    pair = make_pair()
    frame = pair.glasses.seal(b"payload")
    for rtype in (0, RecordType.HANDSHAKE, RecordType.ALERT, 0xFF):
        assert_dropped(pair.phone, frame[:1] + bytes([rtype]) + frame[2:])
    for version in (0, 2, 0xFF):
        assert_dropped(pair.phone, bytes([version]) + frame[1:])
    assert sum(pair.phone.drops.values()) == 7
    assert pair.phone.drops[DropReason.MALFORMED] == 7


# -- open_or_raise ------------------------------------------------------------


def test_open_or_raise_maps_each_reason_and_shares_counters() -> None:
    pair = make_pair()
    phone = pair.phone
    frame = pair.glasses.seal(b"ok")
    cases: list[tuple[bytes, type[Exception], DropReason]] = [
        (b"short", MalformedError, DropReason.MALFORMED),
        (frame[:1] + b"\x01" + frame[2:], MalformedError, DropReason.MALFORMED),
        (b"\x07" + frame[1:], UnsupportedVersionError, DropReason.MALFORMED),
        (
            frame[:2] + b"\0\0\0\0" + frame[6:],
            MalformedError,
            DropReason.UNKNOWN_SESSION,
        ),
        (forge(pair.glasses_key, U32), LimitExceededError, DropReason.EXHAUSTED),
        (flip(frame, 8 * 20), AuthenticationError, DropReason.AUTH_FAIL),
    ]
    for data, error, reason in cases:
        before = phone.drops[reason]
        with pytest.raises(error) as info:
            phone.open_or_raise(data)
        assert phone.drops[reason] == before + 1
        assert "ok" not in str(info.value)
    with pytest.raises(UnsupportedVersionError) as version:
        phone.open_or_raise(b"\x07" + frame[1:])
    assert (version.value.got, version.value.supported) == (7, PROTOCOL_VERSION)
    with pytest.raises(LimitExceededError) as limit:
        phone.open_or_raise(forge(pair.glasses_key, U32))
    assert (limit.value.limit_name, limit.value.limit) == ("reject_after_messages", U32)
    assert phone.open_or_raise(frame) == b"ok"
    with pytest.raises(ReplayError):
        phone.open_or_raise(frame)
    assert phone.drops[DropReason.REPLAY] == 1


# -- thresholds (SECURITY.md §1.2 rekey table) ---------------------------------


def test_send_counter_thresholds() -> None:
    limits = TransportLimits(rekey_after_messages=4, reject_after_messages=8)
    pair = make_pair(limits)
    glasses = pair.glasses
    for _ in range(3):
        glasses.seal(b"")
    assert not glasses.needs_rekey(0.0)  # REKEY - 1
    glasses.seal(b"")
    assert glasses.needs_rekey(0.0)  # = REKEY
    for _ in range(3):
        glasses.seal(b"")
    assert glasses.send_counter == 7
    assert not glasses.is_expired(0.0)
    glasses.seal(b"last")  # counter 7
    assert glasses.is_expired(0.0)
    for _ in range(2):  # REJECT, REJECT + 1: refused, counter never reused
        with pytest.raises(LocalProtocolError):
            glasses.seal(b"")
    assert glasses.send_counter == 8


def test_receive_counter_thresholds() -> None:
    limits = TransportLimits(
        rekey_after_messages=4, reject_after_messages=8, **_no_teardown()
    )
    pair = make_pair(limits)
    phone, key = pair.phone, pair.glasses_key
    assert phone.open(forge(key, 2)) is not None
    assert not phone.needs_rekey(0.0)  # peer counter REKEY - 1
    assert phone.open(forge(key, 3)) is not None
    assert phone.needs_rekey(0.0)  # = REKEY
    assert phone.open(forge(key, 7)) is not None  # REJECT - 1
    assert_dropped(phone, forge(key, 8), DropReason.EXHAUSTED)  # = REJECT
    assert_dropped(phone, forge(key, 9), DropReason.EXHAUSTED)  # REJECT + 1


def _no_teardown() -> dict[str, int]:
    return {"max_consecutive_auth_failures": 1 << 40, "max_auth_failures": 1 << 40}


def test_time_thresholds() -> None:
    limits = TransportLimits(rekey_after_time=600.0, reject_after_time=1200.0)
    rng = random.Random(5)
    k1, k2 = rng.randbytes(32), rng.randbytes(32)
    start = 5000.0
    phone = TransportSession(k1, k2, SID, limits, started_at=start)
    glasses = TransportSession(k2, k1, SID, limits, started_at=start)
    assert not phone.needs_rekey(start + 599.999)
    assert phone.needs_rekey(start + 600.0)
    assert not phone.is_expired(start + 1199.999)
    assert phone.is_expired(start + 1200.0)
    frame = glasses.seal(b"late", now=start + 1199.0)
    with pytest.raises(LocalProtocolError):
        glasses.seal(b"too late", now=start + 1200.0)
    before = state(phone)
    assert phone.open(frame, now=start + 1200.0) is None
    assert phone.drops[DropReason.EXHAUSTED] == 1
    assert state(phone) == before
    assert phone.open(frame, now=start + 1199.999) == b"late"


def test_retired_session_accepts_for_the_grace_period_only() -> None:
    pair = make_pair(TransportLimits(rekey_grace=60.0))
    late = [pair.glasses.seal(b"in flight") for _ in range(2)]
    pair.phone.retire(100.0)
    pair.phone.retire(150.0)  # first retirement counts
    assert pair.phone.is_retired
    with pytest.raises(LocalProtocolError):
        pair.phone.seal(b"use the new session")
    assert pair.phone.open(late[0], now=159.9) == b"in flight"
    assert not pair.phone.is_expired(159.9)
    assert pair.phone.open(late[1], now=160.0) is None
    assert pair.phone.drops[DropReason.EXHAUSTED] == 1
    assert pair.phone.is_expired(160.0)


def test_teardown_after_consecutive_auth_failures() -> None:
    pair = make_pair(TransportLimits())
    phone, glasses = pair.phone, pair.glasses
    good = [glasses.seal(b"g") for _ in range(3)]
    forged = flip(glasses.seal(b"f"), 8 * 20)
    for _ in range(63):
        assert_dropped(phone, forged, DropReason.AUTH_FAIL)
    assert phone.open(good[0]) == b"g"  # resets the run
    assert phone.consecutive_auth_failures == 0
    for _ in range(63):
        assert_dropped(phone, forged, DropReason.AUTH_FAIL)
    assert not phone.is_expired(0.0)  # not torn down yet
    assert_dropped(phone, forged, DropReason.AUTH_FAIL)  # the 64th in a row
    assert phone.is_torn_down
    assert phone.needs_rekey(0.0)
    assert phone.is_expired(0.0)
    assert_dropped(phone, good[1], DropReason.UNKNOWN_SESSION)
    with pytest.raises(LocalProtocolError):
        phone.seal(b"")
    assert phone.auth_failures == 127


def test_teardown_after_total_auth_failures() -> None:
    pair = make_pair(TransportLimits(max_auth_failures=10))
    phone, glasses = pair.phone, pair.glasses
    forged = flip(glasses.seal(b"f"), 8 * 20)
    for _ in range(9):
        assert_dropped(phone, forged, DropReason.AUTH_FAIL)
        assert phone.open(glasses.seal(b"g")) == b"g"
    assert not phone.is_torn_down
    assert_dropped(phone, forged, DropReason.AUTH_FAIL)
    assert phone.is_torn_down


def test_close_forgets_the_keys() -> None:
    pair = make_pair()
    frame = pair.glasses.seal(b"x")
    pair.phone.close()
    assert pair.phone.is_closed
    assert pair.phone.is_expired(0.0)
    assert_dropped(pair.phone, frame, DropReason.UNKNOWN_SESSION)
    with pytest.raises(LocalProtocolError):
        pair.phone.seal(b"x")


def test_seal_refuses_oversize_plaintext() -> None:
    pair = make_pair(TransportLimits(max_record_plaintext=100))
    with pytest.raises(MessageTooLargeError) as info:
        pair.glasses.seal(bytes(101))
    assert (info.value.size, info.value.limit) == (101, 100)
    assert pair.glasses.send_counter == 0
    assert pair.phone.open(pair.glasses.seal(bytes(100))) == bytes(100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_record_plaintext": -1},
        {"rekey_after_messages": 0},
        {"rekey_after_messages": 10, "reject_after_messages": 9},
        {"reject_after_messages": 1 << 64},
        {"rekey_after_time": 0.0},
        {"rekey_after_time": 10.0, "reject_after_time": 5.0},
        {"rekey_grace": -1.0},
        {"max_consecutive_auth_failures": 0},
        {"max_auth_failures": 0},
        {"replay_window": 0},
    ],
)
def test_limits_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by field
        TransportLimits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("send_key", "recv_key", "sid"),
    [(bytes(31), bytes([1]) * 32, SID), (bytes(32), bytes([1]) * 33, SID)]
    + [(bytes(32), bytes([1]) * 32, sid) for sid in (-1, U32)],
)
def test_constructor_validation(send_key: bytes, recv_key: bytes, sid: int) -> None:
    with pytest.raises(LocalProtocolError):
        TransportSession(send_key, recv_key, sid, started_at=0.0)


def test_no_keys_or_plaintext_in_repr_or_errors() -> None:
    pair = make_pair()
    secret = b"attack at dawn, the key is hunter2"
    frame = pair.glasses.seal(secret)
    texts = [repr(pair.phone), repr(pair.glasses), repr(pair.phone.replay_window)]
    for data in (b"\x09" + frame[1:], flip(frame, 200), frame[:20], b""):
        with pytest.raises(Exception) as info:  # noqa: PT011 - any reason
            pair.phone.open_or_raise(data)
        texts += [str(info.value), repr(info.value)]
    assert pair.phone.open_or_raise(frame) == secret
    with pytest.raises(ReplayError) as replay:
        pair.phone.open_or_raise(frame)
    texts += [str(replay.value), repr(pair.phone)]
    for text in texts:
        for key in (pair.phone_key, pair.glasses_key):
            assert key.hex() not in text.lower()
            assert repr(key)[2:-1] not in text
        assert "attack" not in text
        assert "hunter2" not in text
    assert not hasattr(pair.phone, "__dict__")


# -- ReplayWindow against a set model ---------------------------------------------


class SetModel:
    """The replay window's specification: a set of every accepted counter."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def accepts(self, counter: int) -> bool:
        if counter in self.seen:
            return False
        return not self.seen or counter > self.highest - self.size

    def add(self, counter: int) -> None:
        self.seen.add(counter)
        self.highest = max(self.highest, counter)


counter_steps = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 80),
            st.integers(0, 3000),
            st.integers(0, (1 << 64) - 1),
        ),
        st.booleans(),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(size=st.sampled_from([1, 2, 8, 64, 1024]), steps=counter_steps)
def test_replay_window_matches_set_model(
    size: int, steps: list[tuple[int, bool]]
) -> None:
    window, model = ReplayWindow(size), SetModel(size)
    for counter, forged in steps:
        before = (window.highest, window.bitmap)
        ok = model.accepts(counter)
        assert window.accepts(counter) is ok
        try:
            window.check(counter)
        except ReplayError:
            assert not ok
        else:
            assert ok
        assert (window.highest, window.bitmap) == before  # check is side-effect free
        if ok and not forged:  # forged: the AEAD failed, nothing is committed
            window.commit(counter)
            model.add(counter)
        assert window.highest == model.highest
        assert window.bitmap < (1 << size)
    # Probe every counter around the window's edge, not only the drawn ones.
    for counter in range(max(0, model.highest - size - 2), model.highest + 3):
        assert window.accepts(counter) is model.accepts(counter)


def test_replay_window_rejects_misuse() -> None:
    window = ReplayWindow(4)
    with pytest.raises(LocalProtocolError):
        window.check(-1)
    assert not window.accepts(-1)
    window.commit(10)
    with pytest.raises(LocalProtocolError):
        window.commit(10)
    with pytest.raises(LocalProtocolError):
        window.commit(6)  # older than the window
    window.commit(7)
    assert (window.highest, window.bitmap) == (10, 0b1001)
    with pytest.raises(ValueError):  # noqa: PT011
        ReplayWindow(0)


# -- fuzzing ------------------------------------------------------------------------


def test_fuzz_100k_random_and_mutated_inputs() -> None:
    stats = fuzz_transport.run_random(100_000, seed=2024)
    assert stats.inputs == 100_000
    assert stats.accepted + stats.rejected == stats.inputs
    assert sum(stats.drops.values()) == stats.rejected
    assert all(stats.drops[reason] > 0 for reason in DropReason), stats.drops
    assert stats.accepted > 0


def test_fuzz_atheris_entry_point_runs_without_atheris() -> None:
    rng = random.Random(6)
    for _ in range(3000):
        fuzz_transport.TestOneInput(rng.randbytes(rng.randrange(0, 90)))
    target = fuzz_transport._TARGET
    assert target is not None
    target.check()


mutations = st.sampled_from(
    ["flip", "truncate", "extend", "junk", "session", "counter", "replay", "splice"]
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(
        st.tuples(mutations, st.integers(0, 19), st.integers(0, 1 << 16), st.binary()),
        min_size=1,
        max_size=30,
    )
)
def test_structured_mutations_rejected_unless_genuine(
    ops: list[tuple[str, int, int, bytes]],
) -> None:
    pair = _cached_pair()
    phone = TransportSession(
        pair.phone_key, pair.glasses_key, SID, NO_TEARDOWN, started_at=0.0
    )
    frames = _cached_frames()
    genuine = {frame: i for i, frame in enumerate(frames)}
    accepted: set[int] = set()
    rejections = 0
    for op, index, n, blob in ops:
        data = _apply(op, frames[index], frames[(index + 1) % 20], n, blob)
        which = genuine.get(data)
        before = state(phone)
        result = phone.open(data)
        if result is None:
            rejections += 1
            # Only mutations and replays are refused, never a fresh genuine frame.
            assert which is None or which in accepted
            assert state(phone) == before
            continue
        assert which is not None
        assert which not in accepted
        assert result == bytes([which]) * which
        accepted.add(which)
        assert state(phone) != before
    assert sum(phone.drops.values()) == rejections


def _apply(op: str, frame: bytes, other: bytes, n: int, blob: bytes) -> bytes:
    if op == "flip":
        return flip(frame, n % (len(frame) * 8))
    if op == "truncate":
        return frame[: n % len(frame)]
    if op == "extend":
        return frame + (blob or b"\0")
    if op == "junk":
        return blob
    if op == "session":
        sid = n if n != SID else n + 1
        return frame[:2] + sid.to_bytes(4, "big") + frame[6:]
    if op == "counter":
        return frame[:6] + (n << (n % 48)).to_bytes(8, "big") + frame[14:]
    if op == "splice":
        return frame[: n % (len(frame) + 1)] + other[n % len(other) :]
    return frame  # replay / genuine


_CACHE: dict[str, tuple[Pair, list[bytes]]] = {}


def _cached() -> tuple[Pair, list[bytes]]:
    if "pair" not in _CACHE:
        pair = make_pair()
        _CACHE["pair"] = (pair, [pair.glasses.seal(bytes([i]) * i) for i in range(20)])
    return _CACHE["pair"]


def _cached_pair() -> Pair:
    return _cached()[0]


def _cached_frames() -> list[bytes]:
    return _cached()[1]


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    pair = _cached_pair()
    phone = TransportSession(
        pair.phone_key, pair.glasses_key, SID, NO_TEARDOWN, started_at=0.0
    )
    assert phone.open(data) is None
    assert sum(phone.drops.values()) == 1
