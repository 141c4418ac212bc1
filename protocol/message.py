"""Messages: what a record's plaintext carries (docs/protocol.md §4).

::

    offset 0   kind        u8    MessageKind
           1   flags       u8    MessageFlags
           2   message id  16 B  stable across retransmissions and hops
          18   request id  u32   the request this message belongs to (0: none)
          22   length      u32   body length
          26   body              CBOR for structured kinds, raw bytes for media

A record carries one or more messages back to back. :class:`MessageReader`
parses incrementally (feed any chunk sizes); :func:`decode_messages` parses a
whole plaintext.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocol.constants import (
    DEFAULT_LIMITS,
    KNOWN_FLAGS,
    MESSAGE_HEADER_SIZE,
    MESSAGE_ID_SIZE,
    Limits,
    MessageFlags,
    MessageKind,
)
from protocol.errors import (
    LimitExceededError,
    LocalProtocolError,
    MalformedError,
    MessageTooLargeError,
)

__all__ = ["Message", "MessageReader", "decode_messages", "encode_messages"]

_HEADER: Final = struct.Struct(">BB16sII")
_U32: Final = 1 << 32


@dataclass(frozen=True, slots=True)
class Message:
    """One message; its body is already encoded (see :mod:`protocol.bodies`)."""

    kind: MessageKind
    message_id: bytes
    body: bytes = b""
    flags: MessageFlags = MessageFlags.NONE
    request_id: int = 0

    def __post_init__(self) -> None:
        """Check the fixed-size fields."""
        if len(self.message_id) != MESSAGE_ID_SIZE:
            raise LocalProtocolError("message id must be 16 bytes")
        if not 0 <= self.request_id < _U32:
            raise LocalProtocolError("request id must fit 32 bits")

    @property
    def size(self) -> int:
        """Encoded size, header included."""
        return MESSAGE_HEADER_SIZE + len(self.body)

    def encode(self, limits: Limits = DEFAULT_LIMITS) -> bytes:
        """Return header and body.

        Raises:
            MessageTooLargeError: the body exceeds ``Limits.max_message_size``.
        """
        if len(self.body) > limits.max_message_size:
            raise MessageTooLargeError(
                "message body exceeds max_message_size",
                size=len(self.body),
                limit=limits.max_message_size,
            )
        header = _HEADER.pack(
            self.kind, self.flags, self.message_id, self.request_id, len(self.body)
        )
        return header + self.body

    def with_flags(self, flags: MessageFlags) -> Message:
        """Return a copy with ``flags`` added (e.g. RETRANSMIT on a resend)."""
        return Message(
            self.kind, self.message_id, self.body, self.flags | flags, self.request_id
        )


def encode_messages(messages: list[Message], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Concatenate messages into one record plaintext.

    Raises:
        LocalProtocolError: no messages, or more than
            ``Limits.max_messages_per_record``.
        MessageTooLargeError: a body is over its limit.
    """
    if not messages:
        raise LocalProtocolError("a record carries at least one message")
    if len(messages) > limits.max_messages_per_record:
        raise LocalProtocolError("too many messages for one record")
    return b"".join(m.encode(limits) for m in messages)


class MessageReader:
    """Incremental message parser, fed any chunk sizes (docs/protocol.md §4.2).

    Call :meth:`feed` with bytes as they come, then :meth:`next_message`
    until it returns ``None``. Errors leave the reader unusable.
    """

    __slots__ = ("_buffer", "_failed", "_limits")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Create an empty reader."""
        self._limits = limits
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes.

        Raises:
            MalformedError: the pending header has an unknown kind or flags.
            LimitExceededError: the pending header announces a body longer
                than ``Limits.max_message_size``.
        """
        if self._failed:
            raise LocalProtocolError("reader failed earlier; make a new one")
        self._buffer += data
        if len(self._buffer) >= MESSAGE_HEADER_SIZE:
            # Refuse a bad or oversized header now, before buffering its body.
            self._check_header()

    def _check_header(self) -> tuple[MessageKind, MessageFlags, bytes, int, int]:
        kind_b, flags_b, message_id, request_id, length = _HEADER.unpack_from(
            self._buffer
        )
        try:
            kind = MessageKind(kind_b)
        except ValueError:
            self._failed = True
            raise MalformedError(f"unknown message kind 0x{kind_b:02x}") from None
        if flags_b & ~KNOWN_FLAGS:
            self._failed = True
            raise MalformedError(f"unknown message flags 0x{flags_b:02x}")
        if length > self._limits.max_message_size:
            self._failed = True
            raise LimitExceededError(
                "message body exceeds max_message_size",
                limit_name="max_message_size",
                limit=self._limits.max_message_size,
            )
        return kind, MessageFlags(flags_b), bytes(message_id), request_id, length

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed.

        Raises:
            MalformedError: unknown kind or flags.
            LimitExceededError: a body longer than ``Limits.max_message_size``.
        """
        if self._failed:
            raise LocalProtocolError("reader failed earlier; make a new one")
        if len(self._buffer) < MESSAGE_HEADER_SIZE:
            return None
        kind, flags, message_id, request_id, length = self._check_header()
        end = MESSAGE_HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[MESSAGE_HEADER_SIZE:end])
        del self._buffer[:end]
        return Message(kind, message_id, body, flags, request_id)


def decode_messages(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> list[Message]:
    """Parse a whole record plaintext into its messages.

    Raises:
        MalformedError: empty, truncated, trailing bytes, unknown kind or flags.
        LimitExceededError: a body or the message count over its limit.
    """
    if not data:
        raise MalformedError("empty record plaintext")
    reader = MessageReader(limits)
    reader.feed(data)
    out: list[Message] = []
    while (message := reader.next_message()) is not None:
        out.append(message)
        if len(out) > limits.max_messages_per_record:
            raise LimitExceededError(
                "too many messages in one record",
                limit_name="max_messages_per_record",
                limit=limits.max_messages_per_record,
            )
    if reader.buffered:
        raise MalformedError("record plaintext ends inside a message")
    return out
