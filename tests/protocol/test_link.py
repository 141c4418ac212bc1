"""The link layer: fragment then reassemble is the identity; faults are reported."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.constants import FRAGMENT_SEQ_MODULUS, Channel, Limits, MessageKind
from protocol.errors import LocalProtocolError, MalformedError, MessageTooLargeError
from protocol.events import (
    DropReason,
    FragmentDuplicated,
    FragmentReordered,
    FragmentsLost,
    RecordDropped,
    RecordReassembled,
)
from protocol.link import LinkSender, Reassembler, fragment_record
from protocol.message import Message, MessageReader, decode_messages, encode_messages

SIZES = st.integers(min_value=20, max_value=514)
MID = bytes(16)


def reassemble(fragments: list[bytes], limits: Limits | None = None) -> list[object]:
    reassembler = Reassembler(limits or Limits())
    events: list[object] = []
    for piece in fragments:
        events += reassembler.feed(piece, 0.0)
    return events


@settings(max_examples=300, deadline=None)
@given(record=st.binary(min_size=0, max_size=5000), size=SIZES)
def test_fragment_then_reassemble_is_identity(record: bytes, size: int) -> None:
    fragments = fragment_record(record, size)
    assert all(len(f) <= size for f in fragments)
    assert reassemble(fragments) == [
        RecordReassembled(Channel.INTERACTIVE, record, len(fragments))
    ]


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=700), min_size=1, max_size=6),
    size=SIZES,
)
def test_messages_survive_fragmentation_fed_whole_and_byte_by_byte(
    bodies: list[bytes], size: int
) -> None:
    messages = [
        Message(MessageKind.PHOTO_CHUNK, os.urandom(16), b, request_id=i)
        for i, b in enumerate(bodies)
    ]
    plaintext = encode_messages(messages)
    events = reassemble(fragment_record(plaintext, size))
    assert len(events) == 1
    record = events[0]
    assert isinstance(record, RecordReassembled)
    # Whole.
    assert decode_messages(record.record) == messages
    # Byte by byte through the incremental reader.
    reader = MessageReader()
    got = []
    for i in range(len(record.record)):
        reader.feed(record.record[i : i + 1])
        while (m := reader.next_message()) is not None:
            got.append(m)
    assert got == messages
    assert reader.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.sampled_from(list(Channel)), st.binary(max_size=1500)),
        min_size=1,
        max_size=8,
    ),
    sizes=st.lists(SIZES, min_size=1, max_size=20),
)
def test_interleaved_channels_each_arrive_whole_and_in_channel_order(
    records: list[tuple[Channel, bytes]], sizes: list[int]
) -> None:
    sender = LinkSender()
    for channel, record in records:
        sender.queue(record, channel)
    fragments = []
    i = 0
    while (piece := sender.pull(sizes[i % len(sizes)])) is not None:
        fragments.append(piece)
        i += 1
    assert sender.pending_bytes == 0
    events = reassemble(fragments)
    assert all(isinstance(e, RecordReassembled) for e in events)
    for channel in Channel:
        sent = [r for c, r in records if c == channel]
        got = [e.record for e in events if e.channel == channel]  # type: ignore[attr-defined]
        assert got == sent


def test_one_mib_message_round_trips_at_every_fragment_size() -> None:
    body = os.urandom(1 << 20)
    message = Message(MessageKind.PHOTO_CHUNK, MID, body)
    plaintext = message.encode()
    for size in range(20, 515):
        sender = LinkSender()
        sender.queue(plaintext, Channel.BULK)
        reassembler = Reassembler()
        done = []
        while (piece := sender.pull(size)) is not None:
            done += reassembler.feed(piece, 0.0)
        assert len(done) == 1, size
        assert decode_messages(done[0].record) == [message], size  # type: ignore[union-attr]


def test_sequence_wraps_without_false_alarms() -> None:
    sender = LinkSender(first_seq=FRAGMENT_SEQ_MODULUS - 3)
    reassembler = Reassembler(first_seq=FRAGMENT_SEQ_MODULUS - 3)
    record = os.urandom(200)
    for _ in range(3):
        sender.queue(record, Channel.INTERACTIVE)
    events = []
    while (piece := sender.pull(20)) is not None:
        events += reassembler.feed(piece, 0.0)
    assert [type(e) for e in events] == [RecordReassembled] * 3


def _fragments(n_records: int = 3, size: int = 20) -> list[bytes]:
    sender = LinkSender()
    for i in range(n_records):
        sender.queue(bytes([i]) * 50, Channel.BULK)
    out = []
    while (piece := sender.pull(size)) is not None:
        out.append(piece)
    return out


def test_lost_fragment_is_reported_and_never_merged() -> None:
    fragments = _fragments()  # 3 fragments per record
    del fragments[1]  # the middle of record 0
    events = reassemble(fragments)
    assert FragmentsLost(expected=1, seq=2, count=1) in events
    # Record 0 is gone (its tail is an orphan), records 1 and 2 arrive intact.
    whole = [e.record for e in events if isinstance(e, RecordReassembled)]
    assert whole == [bytes([1]) * 50, bytes([2]) * 50]
    assert RecordDropped(Channel.BULK, DropReason.GAP, 18) in events


def test_duplicated_fragment_is_reported_and_dropped() -> None:
    fragments = _fragments()
    fragments.insert(2, fragments[1])
    events = reassemble(fragments)
    assert FragmentDuplicated(1) in events
    whole = [e.record for e in events if isinstance(e, RecordReassembled)]
    assert whole == [bytes([i]) * 50 for i in range(3)]


def test_reordered_fragment_is_reported_not_merged() -> None:
    fragments = _fragments()
    fragments[1], fragments[2] = fragments[2], fragments[1]
    events = reassemble(fragments)
    assert FragmentsLost(expected=1, seq=2, count=1) in events
    assert FragmentReordered(1) in events
    whole = [e.record for e in events if isinstance(e, RecordReassembled)]
    assert bytes([0]) * 50 not in whole


def test_record_size_limit_drops_oversize_record() -> None:
    limits = Limits(max_record_size=100)
    sender = LinkSender(Limits(max_record_size=1000))
    sender.queue(os.urandom(300), Channel.BULK)
    sender.queue(b"ok", Channel.BULK)
    pieces = []
    while (piece := sender.pull(100)) is not None:
        pieces.append(piece)
    events = reassemble(pieces, limits)
    assert any(
        isinstance(e, RecordDropped) and e.reason is DropReason.OVERSIZE for e in events
    )
    assert RecordReassembled(Channel.BULK, b"ok", 1) in events


def test_sender_refuses_oversize_record() -> None:
    sender = LinkSender(Limits(max_record_size=100))
    with pytest.raises(MessageTooLargeError) as info:
        sender.queue(bytes(101), Channel.BULK)
    assert (info.value.size, info.value.limit) == (101, 100)


def test_partial_record_limit_drops_oldest() -> None:
    limits = Limits(max_partial_records=2)
    reassembler = Reassembler(limits)
    sender = LinkSender()
    for channel in (Channel.BULK, Channel.STREAM, Channel.INTERACTIVE):
        sender.queue(bytes(100), channel)
    # Pull one fragment of each of the three channels by hand.
    firsts = []
    for channel, seq in (
        (Channel.STREAM, 0),
        (Channel.INTERACTIVE, 1),
        (Channel.BULK, 2),
    ):
        piece = fragment_record(bytes(100), 20, channel=channel, first_seq=seq)[0]
        firsts.append(piece)
    events = []
    for t, piece in enumerate(firsts):
        events += reassembler.feed(piece, float(t))
    assert RecordDropped(Channel.STREAM, DropReason.TOO_MANY_PARTIAL, 18) in events
    assert reassembler.partial_records == 2


def test_reassembly_age_limit_expires_with_now_argument() -> None:
    reassembler = Reassembler(Limits(max_reassembly_age=5.0))
    piece = fragment_record(bytes(100), 20)[0]
    assert reassembler.feed(piece, 100.0) == []
    assert reassembler.get_timer() == 105.0
    assert reassembler.expire(104.9) == []
    assert reassembler.expire(105.1) == [
        RecordDropped(Channel.INTERACTIVE, DropReason.EXPIRED, 18)
    ]
    assert reassembler.get_timer() is None


def test_orphan_continuation_is_reported() -> None:
    pieces = fragment_record(bytes(100), 20)
    events = reassemble(pieces[1:])
    assert events[0] == FragmentsLost(expected=0, seq=1, count=1)
    assert RecordDropped(Channel.INTERACTIVE, DropReason.ORPHAN, 18) in events


@pytest.mark.parametrize("size", [19, 515, 0, -1])
def test_fragment_size_out_of_range_is_a_local_error(size: int) -> None:
    sender = LinkSender()
    sender.queue(b"x", Channel.BULK)
    with pytest.raises(LocalProtocolError):
        sender.pull(size)


@pytest.mark.parametrize("data", [b"", b"\x80", bytes(515)])
def test_malformed_fragment_raises_the_documented_error(data: bytes) -> None:
    with pytest.raises(MalformedError):
        Reassembler().feed(data, 0.0)


def test_header_costs_two_bytes_so_20_carries_18() -> None:
    pieces = fragment_record(bytes(36), 20)
    assert [len(p) for p in pieces] == [20, 20]
