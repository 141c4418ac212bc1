"""Delivery rules, sans-I/O (docs/protocol.md §6).

- Every message has a 16-byte id that stays the same across retransmissions
  and hops.
- A receiver acknowledges a message once it is durable or answered
  (:class:`AckCollector` batches the ids into ACK messages).
- A sender keeps reliable messages until they are acknowledged
  (:class:`ReliableSender`, bounded) and resends them, in order, after a
  reconnect.
- A receiver recognises duplicates by id and drops them
  (:class:`DuplicateFilter`, bounded).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocol.bodies import Ack
from protocol.constants import (
    DEFAULT_LIMITS,
    MESSAGE_ID_SIZE,
    Limits,
    MessageFlags,
    MessageKind,
)
from protocol.errors import LocalProtocolError
from protocol.message import Message

__all__ = ["AckCollector", "DuplicateFilter", "ReliableSender", "SenderStats"]

MAX_IDS_PER_ACK = 1024


@dataclass(frozen=True, slots=True)
class SenderStats:
    """What a :class:`ReliableSender` holds."""

    messages: int
    bytes: int


class ReliableSender:
    """Keeps reliable messages until acknowledged; bounded.

    Call :meth:`has_room` before :meth:`track`; when it says no, stop taking
    new reliable messages (backpressure) until :meth:`acknowledge` frees room.
    """

    __slots__ = ("_bytes", "_limits", "_pending")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Create an empty sender."""
        self._limits = limits
        self._pending: OrderedDict[bytes, Message] = OrderedDict()
        self._bytes = 0

    def has_room(self, size: int) -> bool:
        """Whether a message of ``size`` encoded bytes can be tracked now."""
        return (
            len(self._pending) < self._limits.max_unacked_messages
            and self._bytes + size <= self._limits.max_unacked_bytes
        )

    def track(self, message: Message) -> None:
        """Keep ``message`` until acknowledged. Tracking an id twice is a no-op.

        Raises:
            LocalProtocolError: no room (see :meth:`has_room`).
        """
        if message.message_id in self._pending:
            return
        if not self.has_room(message.size):
            raise LocalProtocolError("unacknowledged-message limit reached")
        self._pending[message.message_id] = message
        self._bytes += message.size

    def acknowledge(self, ids: tuple[bytes, ...] | list[bytes]) -> list[Message]:
        """Forget acknowledged messages; return those that were pending."""
        done: list[Message] = []
        for message_id in ids:
            message = self._pending.pop(message_id, None)
            if message is not None:
                self._bytes -= message.size
                done.append(message)
        return done

    def message(self, message_id: bytes) -> Message | None:
        """The pending message with ``message_id``, if any."""
        return self._pending.get(message_id)

    def is_pending(self, message_id: bytes) -> bool:
        """Whether ``message_id`` awaits acknowledgement."""
        return message_id in self._pending

    def unacknowledged(self) -> list[Message]:
        """Every pending message, oldest first, marked RETRANSMIT for resending."""
        return [m.with_flags(MessageFlags.RETRANSMIT) for m in self._pending.values()]

    @property
    def stats(self) -> SenderStats:
        """Count and bytes of pending messages."""
        return SenderStats(len(self._pending), self._bytes)


class DuplicateFilter:
    """Remembers the last ``Limits.dedup_window`` ids; the oldest is forgotten first."""

    __slots__ = ("_ids", "_window")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Create an empty filter."""
        self._window = limits.dedup_window
        self._ids: OrderedDict[bytes, None] = OrderedDict()

    def seen(self, message_id: bytes) -> bool:
        """Whether ``message_id`` was remembered; does not remember it."""
        return message_id in self._ids

    def remember(self, message_id: bytes) -> None:
        """Remember ``message_id`` (call once it has been processed)."""
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._window:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        """How many ids are remembered."""
        return len(self._ids)


class AckCollector:
    """Collects ids to acknowledge and turns them into ACK messages."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        """Create an empty collector."""
        self._ids: list[bytes] = []

    def add(self, message_id: bytes) -> None:
        """Acknowledge ``message_id`` in the next ACK.

        Raises:
            LocalProtocolError: the id is not 16 bytes.
        """
        if len(message_id) != MESSAGE_ID_SIZE:
            raise LocalProtocolError("message id must be 16 bytes")
        self._ids.append(message_id)

    def __len__(self) -> int:
        """How many ids wait to be acknowledged."""
        return len(self._ids)

    def take(self, new_id: bytes) -> Message | None:
        """Return one ACK message for up to 1,024 waiting ids, or ``None``.

        ``new_id`` is the ACK's own message id (ACKs are not acknowledged).
        """
        if not self._ids:
            return None
        ids, self._ids = self._ids[:MAX_IDS_PER_ACK], self._ids[MAX_IDS_PER_ACK:]
        return Message(MessageKind.ACK, new_id, Ack(tuple(ids)).encode())
