"""The link layer: records cut into GATT values and put back together.

docs/protocol.md §2. A fragment is a 2-byte header and a piece of one record::

    bit 15     FIRST   this fragment starts a record
    bit 14     LAST    this fragment ends a record
    bits 13-12 channel (:class:`~protocol.constants.Channel`)
    bits 11-0  sequence number, per direction, modulo 4096

Every fragment of a direction takes the next sequence number, whatever its
channel, so a lost, duplicated or reordered fragment is always seen. Records
on different channels interleave: a voice chunk need not wait behind a photo.

:class:`LinkSender` and :class:`Reassembler` are sans-I/O: no clock is read,
``now`` is an argument, and nothing here blocks.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from protocol.constants import (
    CHANNELS,
    DEFAULT_LIMITS,
    FRAGMENT_HEADER_SIZE,
    FRAGMENT_SEQ_MODULUS,
    MAX_FRAGMENT_SIZE,
    MIN_FRAGMENT_SIZE,
    Channel,
    Limits,
)
from protocol.errors import LocalProtocolError, MalformedError, MessageTooLargeError
from protocol.events import (
    DropReason,
    FragmentDuplicated,
    FragmentReordered,
    FragmentsLost,
    LinkEvent,
    RecordDropped,
    RecordReassembled,
)

__all__ = [
    "SEND_PRIORITY",
    "FragmentHeader",
    "LinkSender",
    "Reassembler",
    "fragment_record",
]

_HEADER: Final = struct.Struct(">H")
_FIRST: Final = 0x8000
_LAST: Final = 0x4000
_SEQ_MASK: Final = FRAGMENT_SEQ_MODULUS - 1
_HALF: Final = FRAGMENT_SEQ_MODULUS // 2
_CHANNEL: Final = tuple(Channel)
_NO_EVENTS: Final[list[LinkEvent]] = []
"""Returned (never mutated) when a fragment completes nothing."""
_HISTORY: Final = 256
"""Recent sequence numbers remembered to tell duplicates from late arrivals."""

SEND_PRIORITY: Final = (
    Channel.CONTROL,
    Channel.STREAM,
    Channel.INTERACTIVE,
    Channel.BULK,
)
"""Order in which :class:`LinkSender` serves channels (strict priority)."""


@dataclass(frozen=True, slots=True)
class FragmentHeader:
    """The 2-byte fragment header (docs/protocol.md §2.1)."""

    first: bool
    last: bool
    channel: Channel
    seq: int

    def encode(self) -> bytes:
        """Return the two header bytes."""
        if not 0 <= self.seq < FRAGMENT_SEQ_MODULUS:
            raise LocalProtocolError("fragment sequence out of range")
        value = (
            (_FIRST if self.first else 0)
            | (_LAST if self.last else 0)
            | (int(self.channel) << 12)
            | self.seq
        )
        return _HEADER.pack(value)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> FragmentHeader:
        """Parse the header at the start of ``data``.

        Raises:
            MalformedError: fewer than two bytes.
        """
        if len(data) < FRAGMENT_HEADER_SIZE:
            raise MalformedError("fragment shorter than its 2-byte header")
        (value,) = _HEADER.unpack_from(data)
        return cls(
            first=bool(value & _FIRST),
            last=bool(value & _LAST),
            channel=Channel((value >> 12) & 0x3),
            seq=value & _SEQ_MASK,
        )


def _check_fragment_size(size: int) -> None:
    if not MIN_FRAGMENT_SIZE <= size <= MAX_FRAGMENT_SIZE:
        raise LocalProtocolError(
            f"max_fragment_size must be {MIN_FRAGMENT_SIZE}..{MAX_FRAGMENT_SIZE}, "
            f"got {size}"
        )


def fragment_record(
    record: bytes,
    max_fragment_size: int,
    *,
    channel: Channel = Channel.INTERACTIVE,
    first_seq: int = 0,
) -> list[bytes]:
    """Cut one record into fragments with consecutive sequence numbers.

    A convenience for tests and tools; the daemon uses :class:`LinkSender`,
    which numbers fragments as they are sent.

    Raises:
        LocalProtocolError: ``max_fragment_size`` is outside 20..514.
    """
    sender = LinkSender(first_seq=first_seq)
    sender.queue(record, channel)
    out: list[bytes] = []
    while (piece := sender.pull(max_fragment_size)) is not None:
        out.append(piece)
    return out


@dataclass(slots=True)
class _Outgoing:
    record: bytes
    offset: int = 0


class LinkSender:
    """Numbers and cuts outgoing records into fragments, one per :meth:`pull`.

    Records queue per channel; :meth:`pull` serves channels in
    :data:`SEND_PRIORITY` order and records of one channel in FIFO order. The
    fragment size is given on every pull, so it follows the link's
    ``max_write_without_response_size`` as it changes.
    """

    __slots__ = ("_limits", "_pending_bytes", "_queues", "_seq")

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, first_seq: int = 0) -> None:
        """Start a fresh direction (a new connection starts at sequence 0)."""
        self._limits = limits
        self._seq = first_seq & _SEQ_MASK
        self._queues: tuple[deque[_Outgoing], ...] = tuple(
            deque() for _ in range(CHANNELS)
        )
        self._pending_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Record bytes queued and not yet pulled."""
        return self._pending_bytes

    @property
    def next_seq(self) -> int:
        """The sequence number the next fragment will carry."""
        return self._seq

    def queue(self, record: bytes, channel: Channel) -> None:
        """Queue a whole record for sending on ``channel``.

        Raises:
            MessageTooLargeError: the record exceeds ``Limits.max_record_size``.
        """
        if len(record) > self._limits.max_record_size:
            raise MessageTooLargeError(
                "record exceeds max_record_size",
                size=len(record),
                limit=self._limits.max_record_size,
            )
        self._queues[channel].append(_Outgoing(bytes(record)))
        self._pending_bytes += len(record)

    def pull(self, max_fragment_size: int) -> bytes | None:
        """Return the next fragment to write, or ``None`` when idle.

        Raises:
            LocalProtocolError: ``max_fragment_size`` is outside 20..514.
        """
        if not MIN_FRAGMENT_SIZE <= max_fragment_size <= MAX_FRAGMENT_SIZE:
            _check_fragment_size(max_fragment_size)
        queues = self._queues
        for channel in SEND_PRIORITY:
            queue = queues[channel]
            if queue:
                break
        else:
            return None
        out = queue[0]
        record = out.record
        start = out.offset
        end = start + max_fragment_size - FRAGMENT_HEADER_SIZE
        header = (channel << 12) | self._seq
        if start == 0:
            header |= _FIRST
        if end >= len(record):
            end = len(record)
            header |= _LAST
            queue.popleft()
        else:
            out.offset = end
        self._seq = (self._seq + 1) & _SEQ_MASK
        self._pending_bytes -= end - start
        return _HEADER.pack(header) + record[start:end]

    def clear(self) -> None:
        """Forget every queued record (the link was lost)."""
        for queue in self._queues:
            queue.clear()
        self._pending_bytes = 0


@dataclass(slots=True)
class _Partial:
    buffer: bytearray = field(default_factory=bytearray)
    fragments: int = 0
    started: float = 0.0
    touched: float = 0.0


class Reassembler:
    """Puts fragments back into records and reports what went wrong.

    Feed every GATT value of one direction, in arrival order, to
    :meth:`feed`. Loss, duplication and reordering are reported as events and
    never merged silently: after a gap every partial record is dropped.
    """

    __slots__ = ("_expected", "_limits", "_partials", "_recent")

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, first_seq: int = 0) -> None:
        """Start a fresh direction; a new connection starts at sequence 0."""
        self._limits = limits
        self._expected = first_seq & _SEQ_MASK
        self._partials: dict[Channel, _Partial] = {}
        self._recent: deque[int] = deque(maxlen=_HISTORY)

    @property
    def expected_seq(self) -> int:
        """The sequence number the next fragment should carry."""
        return self._expected

    @property
    def partial_records(self) -> int:
        """Records currently being reassembled."""
        return len(self._partials)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in partial records."""
        return sum(len(p.buffer) for p in self._partials.values())

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> list[LinkEvent]:
        """Take one GATT value; return what it completed or broke.

        Raises:
            MalformedError: shorter than the header or longer than 514 bytes.
                The fragment is dropped; the reassembler stays usable.
        """
        size = len(data)
        if size < FRAGMENT_HEADER_SIZE:
            raise MalformedError("fragment shorter than its 2-byte header")
        if size > MAX_FRAGMENT_SIZE:
            raise MalformedError("fragment longer than 514 bytes")
        value = (data[0] << 8) | data[1]
        seq = value & _SEQ_MASK
        distance = (seq - self._expected) & _SEQ_MASK
        if distance >= _HALF:
            if seq in self._recent:
                return [FragmentDuplicated(seq)]
            return [FragmentReordered(seq)]
        events: list[LinkEvent] = []
        if distance:
            events.append(FragmentsLost(self._expected, seq, distance))
            for lost_channel, lost in self._partials.items():
                events.append(
                    RecordDropped(lost_channel, DropReason.GAP, len(lost.buffer))
                )
            self._partials.clear()
        self._expected = (seq + 1) & _SEQ_MASK
        self._recent.append(seq)
        channel = _CHANNEL[(value >> 12) & 0x3]
        partial = self._partials.get(channel)
        if not value & (_FIRST | _LAST) and partial is not None and not events:
            # The common case: a middle fragment of a record in progress.
            partial.buffer += memoryview(data)[2:]
            partial.fragments += 1
            partial.touched = now
            if len(partial.buffer) > self._limits.max_record_size:
                del self._partials[channel]
                return [
                    RecordDropped(channel, DropReason.OVERSIZE, len(partial.buffer))
                ]
            return _NO_EVENTS
        if value & _FIRST:
            if partial is not None:
                events.append(
                    RecordDropped(channel, DropReason.RESTARTED, len(partial.buffer))
                )
                del self._partials[channel]
            if value & _LAST:
                events.append(RecordReassembled(channel, bytes(data[2:]), 1))
                return events
            if len(self._partials) >= self._limits.max_partial_records:
                oldest = min(self._partials, key=lambda c: self._partials[c].started)
                dropped = self._partials.pop(oldest)
                events.append(
                    RecordDropped(
                        oldest, DropReason.TOO_MANY_PARTIAL, len(dropped.buffer)
                    )
                )
            partial = self._partials[channel] = _Partial(started=now)
        elif partial is None:
            events.append(RecordDropped(channel, DropReason.ORPHAN, size - 2))
            return events
        buffer = partial.buffer
        buffer += memoryview(data)[2:]
        partial.fragments += 1
        partial.touched = now
        if len(buffer) > self._limits.max_record_size:
            del self._partials[channel]
            events.append(RecordDropped(channel, DropReason.OVERSIZE, len(buffer)))
        elif value & _LAST:
            del self._partials[channel]
            events.append(RecordReassembled(channel, bytes(buffer), partial.fragments))
        return events

    def expire(self, now: float) -> list[LinkEvent]:
        """Drop partial records idle for longer than ``max_reassembly_age``."""
        limit = self._limits.max_reassembly_age
        events: list[LinkEvent] = []
        for channel in [
            c for c, p in self._partials.items() if now - p.touched > limit
        ]:
            partial = self._partials.pop(channel)
            events.append(
                RecordDropped(channel, DropReason.EXPIRED, len(partial.buffer))
            )
        return events

    def get_timer(self) -> float | None:
        """When :meth:`expire` should next be called, or ``None``."""
        if not self._partials:
            return None
        age = self._limits.max_reassembly_age
        return min(p.touched for p in self._partials.values()) + age
