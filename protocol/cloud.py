"""The cloud wire between phone and gateway, sans-I/O (docs/cloud.md).

Every payload on every cloud channel (MQTT topic or WebSocket frame) is a
*batch*: one or more items, each a u32 big-endian length and the item bytes.
An item is one object of :mod:`protocol.envelope`: an uplink envelope (phone
to gateway), a downlink envelope or a signed ack (gateway to phone). Several
small envelopes share one publish; nothing is in clear but lengths.

Channels, named the same on both transports (and bound into every envelope)::

    {prefix}/{pseudonym}/up        phone -> gateway: requests, chunks, telemetry,
                                   the phone's acks of downlink messages
    {prefix}/{pseudonym}/down      gateway -> phone: signed acks, answers
    {prefix}/{pseudonym}/presence  phone -> gateway: sealed presence (last will)

The pseudonym is derived from the device id by a hash, so a broker sees no
identity. Registration records (what a gateway needs to know of a device, and
a phone of a gateway) are small JSON documents of public keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Final

from protocol.errors import LimitExceededError, LocalProtocolError, MalformedError

__all__ = [
    "ACK_DELAY_S",
    "ACK_INTERVAL_S",
    "DEFAULT_PREFIX",
    "MAX_BATCH_ITEMS",
    "Channels",
    "DeviceRecord",
    "GatewayRecord",
    "decode_batch",
    "encode_batch",
    "pseudonym_for",
]

DEFAULT_PREFIX: Final = "gr/v1"
ACK_DELAY_S: Final = 0.005
"""Default seconds a gateway gathers a device's acks before signing them."""
ACK_INTERVAL_S: Final = 0.25
"""Default least seconds between a gateway's acks to a streaming device.

With :data:`ACK_DELAY_S`, the longest a gateway holds an ack: the phone's
round-trip estimator allows for their sum before it calls a send overdue.
"""
MAX_BATCH_ITEMS: Final = 1024
MAX_BATCH_BYTES: Final = 4 << 20
_LEN: Final = struct.Struct(">I")


def encode_batch(items: list[bytes]) -> bytes:
    """Pack items into one payload.

    Raises:
        LocalProtocolError: no items, or more than ``MAX_BATCH_ITEMS``.
    """
    if not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise LocalProtocolError(f"a batch carries 1..{MAX_BATCH_ITEMS} items")
    return b"".join(_LEN.pack(len(item)) + item for item in items)


def decode_batch(
    data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_BATCH_BYTES
) -> list[bytes]:
    """Split a payload into its items.

    Raises:
        MalformedError: empty, truncated, or an empty item.
        LimitExceededError: over ``max_bytes`` or ``MAX_BATCH_ITEMS`` items.
    """
    if len(data) > max_bytes:
        raise LimitExceededError(
            "batch larger than allowed", limit_name="max_batch_bytes", limit=max_bytes
        )
    view = memoryview(data)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < _LEN.size:
            raise MalformedError("batch ends inside an item length")
        (size,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if size == 0 or size > len(view) - offset:
            raise MalformedError("batch item length out of range")
        items.append(bytes(view[offset : offset + size]))
        offset += size
        if len(items) > MAX_BATCH_ITEMS:
            raise LimitExceededError(
                "too many items in a batch",
                limit_name="max_batch_items",
                limit=MAX_BATCH_ITEMS,
            )
    if not items:
        raise MalformedError("empty batch")
    return items


def pseudonym_for(device_id: bytes) -> str:
    """The topic pseudonym of a device: 24 hex digits of a hash of its id."""
    return hashlib.sha256(b"glasses-relay/pseudonym\x00" + device_id).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Channels:
    """The three channel names of one device."""

    up: str
    down: str
    presence: str

    @classmethod
    def for_device(cls, device_id: bytes, prefix: str = DEFAULT_PREFIX) -> Channels:
        """Channel names for ``device_id`` under ``prefix``."""
        base = f"{prefix}/{pseudonym_for(device_id)}"
        return cls(f"{base}/up", f"{base}/down", f"{base}/presence")


def _hex(doc: dict[str, object], key: str, size: int) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise MalformedError(f"registration: {key!r} missing or not text")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MalformedError(f"registration: {key!r} is not hex") from None
    if len(raw) != size:
        raise MalformedError(f"registration: {key!r} must be {size} bytes")
    return raw


def _load(text: str | bytes) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise MalformedError("registration is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedError("registration must be a JSON object")
    return doc


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What a gateway knows of a phone: its id and public keys."""

    device_id: bytes
    encryption: bytes
    verify: bytes

    @property
    def pseudonym(self) -> str:
        """The device's topic pseudonym."""
        return pseudonym_for(self.device_id)

    def encode(self) -> str:
        """Return the JSON document."""
        return json.dumps(
            {
                "device_id": self.device_id.hex(),
                "pseudonym": self.pseudonym,
                "encryption": self.encryption.hex(),
                "verify": self.verify.hex(),
            },
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: str | bytes) -> DeviceRecord:
        """Parse the JSON document; raises ``MalformedError``."""
        doc = _load(text)
        return cls(
            _hex(doc, "device_id", 16),
            _hex(doc, "encryption", 32),
            _hex(doc, "verify", 32),
        )


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    """What a phone pins of a gateway key epoch."""

    kid: int
    encryption: bytes
    verify: bytes

    def encode(self) -> str:
        """Return the JSON document."""
        return json.dumps(
            {
                "kid": self.kid,
                "encryption": self.encryption.hex(),
                "verify": self.verify.hex(),
            },
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: str | bytes) -> GatewayRecord:
        """Parse the JSON document; raises ``MalformedError``."""
        doc = _load(text)
        kid = doc.get("kid")
        if type(kid) is not int or not 0 <= kid < 1 << 32:
            raise MalformedError("registration: 'kid' must be a u32")
        return cls(kid, _hex(doc, "encryption", 32), _hex(doc, "verify", 32))
