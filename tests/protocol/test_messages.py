"""Messages, bodies, records, delivery rules and clock sync."""

from __future__ import annotations

import os

import cbor2
import pytest
from golden_cases import BODIES
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bodies import (
    Ack,
    Credit,
    Request,
    RequestKind,
    Telemetry,
    decode_body,
    encode_body,
)
from protocol.clock import ClockEstimator, sample
from protocol.constants import (
    PROTOCOL_VERSION,
    AlertCode,
    Limits,
    MessageFlags,
    MessageKind,
    RecordType,
)
from protocol.delivery import AckCollector, DuplicateFilter, ReliableSender
from protocol.errors import (
    LimitExceededError,
    LocalProtocolError,
    MalformedError,
    RemoteProtocolError,
    UnsupportedVersionError,
)
from protocol.message import Message, MessageReader, decode_messages
from protocol.record import Alert, Record, RecordHeader

IDS = st.binary(min_size=16, max_size=16)


@pytest.mark.parametrize(("name", "body", "flags"), BODIES, ids=[b[0] for b in BODIES])
def test_every_body_round_trips(name: str, body: object, flags: MessageFlags) -> None:
    kind, data = encode_body(body)  # type: ignore[arg-type]
    assert decode_body(kind, data) == body


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(list(RequestKind)),
    deadline=st.integers(0, 2**32),
    capture=st.integers(-(2**63), 2**63 - 1),
    size=st.integers(0, 2**40),
    intent=st.none() | st.text(max_size=20),
    text=st.none() | st.text(max_size=200),
    codec=st.none() | st.sampled_from(["opus", "lc3", "jpeg"]),
)
def test_request_round_trips(
    kind: RequestKind,
    deadline: int,
    capture: int,
    size: int,
    intent: str | None,
    text: str | None,
    codec: str | None,
) -> None:
    request = Request(kind, deadline, capture, size, intent, text, codec)
    assert Request.decode(request.encode()) == request


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(list(MessageKind)),
    mid=IDS,
    body=st.binary(max_size=300),
    flags=st.integers(0, 15),
    request_id=st.integers(0, 2**32 - 1),
)
def test_message_header_round_trips(
    kind: MessageKind, mid: bytes, body: bytes, flags: int, request_id: int
) -> None:
    message = Message(kind, mid, body, MessageFlags(flags), request_id)
    assert decode_messages(message.encode()) == [message]


@pytest.mark.parametrize(
    "raw",
    [
        cbor2.dumps({"k": 1, "d": 1, "t": 1, "n": 0, "zz": 1}),  # unknown field
        cbor2.dumps({"k": 99, "d": 1, "t": 1, "n": 0}),  # unknown kind
        cbor2.dumps({"k": 1, "d": -1, "t": 1, "n": 0}),  # negative deadline
        cbor2.dumps({"k": 1, "d": "x", "t": 1, "n": 0}),  # wrong type
        cbor2.dumps({"k": 1, "d": True, "t": 1, "n": 0}),  # bool is not an int
        cbor2.dumps({"d": 1, "t": 1, "n": 0}),  # missing field
        cbor2.dumps([1, 2, 3]),  # not a map
        cbor2.dumps({1: 1}),  # non-text key
        bytes.fromhex("d82363612a62"),  # a CBOR tag (regex): refused before use
        bytes.fromhex("c11a514b67b0"),  # a CBOR tag (datetime)
        bytes.fromhex("bf6161ff"),  # indefinite-length map
        bytes.fromhex("a2616b01616b02"),  # duplicate key
        b"",
        b"\xff",
        cbor2.dumps({"k": 1, "d": 2**70, "t": 1, "n": 0}),  # bignum
    ],
)
def test_strict_body_decoding_refuses(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_body(MessageKind.REQUEST, raw)


def test_telemetry_battery_over_100_refused() -> None:
    raw = cbor2.dumps({"b": 101, "g": False, "t": 0})
    with pytest.raises(MalformedError):
        Telemetry.decode(raw)


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (MessageKind.ACK, b""),
        (MessageKind.ACK, bytes(17)),
        (MessageKind.CREDIT, bytes(3)),
        (MessageKind.HEARTBEAT, bytes(7)),
        (MessageKind.AUDIO_CHUNK, bytes(3)),
    ],
)
def test_raw_bodies_check_their_sizes(kind: MessageKind, raw: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_body(kind, raw)


def test_local_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Message(MessageKind.ACK, b"short")
    with pytest.raises(LocalProtocolError):
        Ack(()).encode()
    with pytest.raises(LocalProtocolError):
        Credit(-1).encode()


def test_message_reader_refuses_oversize_header_before_buffering_body() -> None:
    reader = MessageReader(Limits(max_message_size=10))
    big = Message(MessageKind.PHOTO_CHUNK, bytes(16), bytes(11)).encode(
        Limits(max_message_size=100)
    )
    with pytest.raises(LimitExceededError) as info:
        reader.feed(big[:26])
    assert info.value.limit_name == "max_message_size"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes([0x7F]) + bytes(25),  # unknown kind
        bytes([0x01, 0x80]) + bytes(24),  # unknown flag
        Message(MessageKind.ACK, bytes(16), bytes(16)).encode()[:-1],  # truncated
        Message(MessageKind.ACK, bytes(16), bytes(16)).encode() + b"\x00",  # trailing
    ],
)
def test_decode_messages_refuses(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_messages(raw)


def test_record_of_another_version_is_refused_with_the_versions() -> None:
    raw = bytearray(Record(RecordHeader(RecordType.HANDSHAKE, 1, 0), b"x").encode())
    raw[0] = 2
    with pytest.raises(UnsupportedVersionError) as info:
        Record.decode(bytes(raw))
    assert (info.value.got, info.value.supported) == (2, PROTOCOL_VERSION)
    # The refusal we send names our version.
    alert = Record.decode(Alert(AlertCode.UNSUPPORTED_VERSION).to_record().encode())
    assert Alert.decode(alert.body).supported_version == PROTOCOL_VERSION


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(13),
        bytes([1, 0x7F]) + bytes(12),
        bytes([1, 2]) + bytes(12) + bytes(15),
    ],
)
def test_record_decoding_refuses(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        Record.decode(raw)


def test_data_record_exposes_ciphertext_and_tag() -> None:
    record = Record(RecordHeader(RecordType.DATA, 9, 3), b"c" * 5 + b"t" * 16)
    parsed = Record.decode(record.encode())
    assert (parsed.ciphertext, parsed.tag) == (b"c" * 5, b"t" * 16)


def _msg(i: int, size: int = 10) -> Message:
    return Message(
        MessageKind.TELEMETRY, i.to_bytes(16, "big"), bytes(size), MessageFlags.RELIABLE
    )


def test_reliable_sender_keeps_until_acked_and_resends_in_order() -> None:
    sender = ReliableSender()
    for i in range(5):
        sender.track(_msg(i))
    sender.track(_msg(2))  # same id again: kept once
    done = sender.acknowledge([_msg(1).message_id, _msg(3).message_id, b"\xff" * 16])
    assert [m.message_id for m in done] == [_msg(1).message_id, _msg(3).message_id]
    resend = sender.unacknowledged()
    assert [m.message_id for m in resend] == [_msg(i).message_id for i in (0, 2, 4)]
    assert all(m.flags & MessageFlags.RETRANSMIT for m in resend)
    assert sender.stats.messages == 3


def test_reliable_sender_is_bounded_by_count_and_bytes() -> None:
    sender = ReliableSender(Limits(max_unacked_messages=2, max_unacked_bytes=100))
    sender.track(_msg(0))
    sender.track(_msg(1))
    assert not sender.has_room(1)
    with pytest.raises(LocalProtocolError):
        sender.track(_msg(2))
    sender.acknowledge([_msg(0).message_id])
    assert sender.has_room(_msg(2).size)
    assert not sender.has_room(101)


def test_duplicate_filter_is_bounded_and_forgets_oldest() -> None:
    dedup = DuplicateFilter(Limits(dedup_window=3))
    for i in range(4):
        dedup.remember(bytes([i]) * 16)
    assert not dedup.seen(bytes([0]) * 16)
    assert all(dedup.seen(bytes([i]) * 16) for i in (1, 2, 3))
    assert len(dedup) == 3


def test_ack_collector_batches_ids() -> None:
    collector = AckCollector()
    ids = [os.urandom(16) for _ in range(1500)]
    for i in ids:
        collector.add(i)
    first = collector.take(bytes(16))
    second = collector.take(bytes(16))
    assert first is not None
    assert second is not None
    assert collector.take(bytes(16)) is None
    got = Ack.decode(first.body).ids + Ack.decode(second.body).ids
    assert list(got) == ids


def test_clock_sync_recovers_offset_from_least_delayed_sample() -> None:
    estimator = ClockEstimator()
    offset = 5_000_000
    # A fast exchange and a slow, asymmetric one.
    estimator.add(sample(1000, 1000 + offset + 500, 1000 + offset + 600, 2100))
    estimator.add(sample(3000, 3000 + offset + 9000, 3000 + offset + 9100, 12_200))
    assert estimator.offset_us == pytest.approx(offset, abs=50)
    assert estimator.to_local(offset + 10) == pytest.approx(10, abs=50)
    assert ClockEstimator().offset_us is None
