"""Wire constants and named limits of protocol v1 (docs/protocol.md §1).

Every limit is a field of :class:`Limits` with a default, so a deployment can
change it, and each has an overflow policy stated in docs/protocol.md §6.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

PROTOCOL_VERSION: Final = 1
"""The one version this implementation speaks (record header byte 0)."""

FRAGMENT_HEADER_SIZE: Final = 2
RECORD_HEADER_SIZE: Final = 14
TAG_SIZE: Final = 16
MESSAGE_HEADER_SIZE: Final = 26
MESSAGE_ID_SIZE: Final = 16

MIN_FRAGMENT_SIZE: Final = 20
"""Smallest GATT value the link layer works with (ATT MTU 23 minus 3)."""
MAX_FRAGMENT_SIZE: Final = 514
"""Largest GATT value (ATT MTU 517 minus 3)."""

FRAGMENT_SEQ_MODULUS: Final = 4096
"""Fragment sequence numbers are 12 bits and wrap."""
CHANNELS: Final = 4
"""Independent record channels per direction (2 bits in the fragment header)."""


class Channel(enum.IntEnum):
    """Record channels: records on different channels interleave on the link."""

    CONTROL = 0
    """Handshake, acknowledgements, credits, heartbeats, cancel."""
    INTERACTIVE = 1
    """Requests, text and response chunks, events."""
    BULK = 2
    """Photo chunks and other large media."""
    STREAM = 3
    """Live audio."""


class RecordType(enum.IntEnum):
    """Record header byte 1 (docs/protocol.md §3)."""

    HANDSHAKE = 0x01
    """A Noise handshake message; body is the handshake bytes, no tag."""
    DATA = 0x02
    """AEAD-sealed messages; body is ciphertext followed by a 16-byte tag."""
    ALERT = 0x03
    """A cleartext refusal before a session exists (version, busy); no tag."""


class AlertCode(enum.IntEnum):
    """Why a peer refuses a connection before any session exists."""

    UNSUPPORTED_VERSION = 1
    BUSY = 2
    NOT_PAIRED = 3
    HANDSHAKE_FAILED = 4


class MessageKind(enum.IntEnum):
    """Message header byte 0 (docs/protocol.md §4)."""

    ACK = 0x01
    CREDIT = 0x02
    ERROR = 0x03
    CLOCK_SYNC = 0x04
    CANCEL = 0x05
    HEARTBEAT = 0x06
    MODE = 0x07
    PRESENCE = 0x08
    REQUEST = 0x10
    AUDIO_CHUNK = 0x11
    PHOTO_CHUNK = 0x12
    WAKE_WORD = 0x13
    RESPONSE_TEXT = 0x20
    RESPONSE_AUDIO = 0x21
    HOLDING = 0x22
    DISPLAY = 0x23
    EVENT = 0x30
    TELEMETRY = 0x31
    NAVIGATION = 0x32
    PAYMENT = 0x33
    MEDIA_CONTROL = 0x34


class MessageFlags(enum.IntFlag):
    """Message header byte 1."""

    NONE = 0
    FINAL = 0x01
    """Last chunk of a stream (audio, photo, response)."""
    RELIABLE = 0x02
    """The sender keeps the message until acknowledged and resends it."""
    REALTIME = 0x04
    """Stale copies may be dropped (live audio); drops are counted."""
    RETRANSMIT = 0x08
    """This transmission repeats an earlier one with the same message id."""


KNOWN_FLAGS: Final = int(
    MessageFlags.FINAL
    | MessageFlags.RELIABLE
    | MessageFlags.REALTIME
    | MessageFlags.RETRANSMIT
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Named receive and send limits (docs/protocol.md §6).

    Attributes:
        max_record_size: Largest reassembled record, header and tag included.
            Policy: the record is discarded and reported as oversize.
        max_partial_records: Records being reassembled at once (one per
            channel at most). Policy: the oldest partial record is dropped.
        max_reassembly_age: Seconds a partial record may wait for its next
            fragment. Policy: it is dropped on the next ``expire(now)``.
        max_message_size: Largest message body. Policy: refused on send
            (:class:`~protocol.errors.MessageTooLargeError`), dropped and
            reported on receive.
        max_messages_per_record: Messages one record may carry.
        max_unacked_messages: Reliable messages a sender keeps unacknowledged.
            Policy: the sender stops taking new reliable messages
            (backpressure) until acknowledgements arrive.
        max_unacked_bytes: Bytes of those messages. Same policy.
        dedup_window: Message ids remembered for duplicate detection.
            Policy: the oldest id is forgotten first.
    """

    max_record_size: int = (1 << 20) + 4096
    max_partial_records: int = CHANNELS
    max_reassembly_age: float = 30.0
    max_message_size: int = 1 << 20
    max_messages_per_record: int = 256
    max_unacked_messages: int = 1024
    max_unacked_bytes: int = 8 << 20
    dedup_window: int = 4096

    def __post_init__(self) -> None:
        """Reject limits that cannot work."""
        minimum = RECORD_HEADER_SIZE + TAG_SIZE + MESSAGE_HEADER_SIZE
        if self.max_record_size < minimum:
            raise ValueError(f"max_record_size must be at least {minimum}")
        if not 1 <= self.max_partial_records <= CHANNELS:
            raise ValueError(f"max_partial_records must be 1..{CHANNELS}")
        if self.max_reassembly_age <= 0:
            raise ValueError("max_reassembly_age must be positive")
        for name in (
            "max_message_size",
            "max_messages_per_record",
            "max_unacked_messages",
            "max_unacked_bytes",
            "dedup_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


DEFAULT_LIMITS: Final = Limits()
