"""Records: what the link layer carries (docs/protocol.md §3).

::

    offset 0  version  u8   PROTOCOL_VERSION (1)
           1  type     u8   RecordType
           2  session  u32  big-endian session id
           6  counter  u64  big-endian, per session and direction
          14  body          HANDSHAKE/ALERT: cleartext; DATA: ciphertext || 16-byte tag

The 14 header bytes are the AEAD's associated data; the nonce is
``0x00000000 || LE64(counter)``. Sealing and opening live in the session
layer; this module only frames.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocol.constants import (
    PROTOCOL_VERSION,
    RECORD_HEADER_SIZE,
    TAG_SIZE,
    AlertCode,
    RecordType,
)
from protocol.errors import LocalProtocolError, MalformedError, UnsupportedVersionError

__all__ = ["Alert", "Record", "RecordHeader"]

_HEADER: Final = struct.Struct(">BBIQ")
_ALERT: Final = struct.Struct(">BB")
_U32: Final = 1 << 32
_U64: Final = 1 << 64


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The fixed 14-byte record header."""

    type: RecordType
    session_id: int
    counter: int
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """Return the 14 header bytes (also the AEAD associated data).

        Raises:
            LocalProtocolError: a field does not fit its width.
        """
        if not 0 <= self.session_id < _U32 or not 0 <= self.counter < _U64:
            raise LocalProtocolError("session id or counter out of range")
        return _HEADER.pack(self.version, self.type, self.session_id, self.counter)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> RecordHeader:
        """Parse a header; refuse other versions and unknown types.

        Raises:
            MalformedError: too short or unknown record type.
            UnsupportedVersionError: the version byte is not ours.
        """
        if len(data) < RECORD_HEADER_SIZE:
            raise MalformedError("record shorter than its 14-byte header")
        version, rtype, session_id, counter = _HEADER.unpack_from(data)
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersionError(
                "record from another protocol version",
                got=version,
                supported=PROTOCOL_VERSION,
            )
        try:
            record_type = RecordType(rtype)
        except ValueError:
            raise MalformedError(f"unknown record type 0x{rtype:02x}") from None
        return cls(record_type, session_id, counter, version)


@dataclass(frozen=True, slots=True)
class Record:
    """One record: header plus body (opaque here)."""

    header: RecordHeader
    body: bytes

    def encode(self) -> bytes:
        """Return header and body as one byte string."""
        return self.header.encode() + self.body

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Record:
        """Parse a whole record as reassembled by the link layer.

        Raises:
            MalformedError: bad header, or a DATA record too short for its tag.
            UnsupportedVersionError: the version byte is not ours.
        """
        header = RecordHeader.decode(data)
        body = bytes(data[RECORD_HEADER_SIZE:])
        if header.type is RecordType.DATA and len(body) < TAG_SIZE:
            raise MalformedError("DATA record shorter than its tag")
        return cls(header, body)

    @property
    def ciphertext(self) -> bytes:
        """For DATA records: the ciphertext without the tag."""
        return self.body[:-TAG_SIZE]

    @property
    def tag(self) -> bytes:
        """For DATA records: the 16-byte AEAD tag at the end of the body."""
        return self.body[-TAG_SIZE:]


@dataclass(frozen=True, slots=True)
class Alert:
    """The body of an ALERT record: why a peer refuses (docs/protocol.md §3.3)."""

    code: AlertCode
    supported_version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """Return the two body bytes."""
        return _ALERT.pack(self.code, self.supported_version)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Alert:
        """Parse an alert body.

        Raises:
            MalformedError: not exactly two bytes, or an unknown code.
        """
        if len(data) != _ALERT.size:
            raise MalformedError("alert body must be 2 bytes")
        code, version = _ALERT.unpack(data)
        try:
            return cls(AlertCode(code), version)
        except ValueError:
            raise MalformedError(f"unknown alert code {code}") from None

    def to_record(self) -> Record:
        """Wrap this alert in a cleartext ALERT record (session 0, counter 0).

        The header carries our version even when refusing another one, so the
        peer learns what we speak.
        """
        return Record(RecordHeader(RecordType.ALERT, 0, 0), self.encode())
