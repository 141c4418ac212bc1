"""Link events to pcapng: what ``sniff`` and the daemon's capture ring record.

bleak reports a link coming up (with the service table it discovered),
values written and notified, and the link going down; :class:`LinkCapture`
turns those events into pcapng blocks with :class:`CaptureWriter`,
synthesizing for each link the LE Connection Complete, the MTU exchange, the
GATT discovery and the CCCD write that tshark needs to decode every ATT PDU
with zero expert errors (../shared/design/CAPTURE-FORMATS.md §3). A link
whose "up" was not seen (a ring that has dropped it, a stream joined while
the link was up) is synthesized at its first value from its
:class:`LinkInfo`, so any window of events makes a valid file.

:class:`LinkEvent` and :class:`LinkInfo` have a JSON form, which is how the
daemon's status API hands its ring to ``sniff --from-daemon``. Values are
the bytes as they crossed the air (ciphertext after the handshake); nothing
here ever sees a key.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from protocol.capture.errors import CaptureError
from protocol.capture.services import CharacteristicSpec, CharProps, ServiceSpec
from protocol.capture.writer import CaptureWriter
from protocol.errors import LocalProtocolError
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID

__all__ = [
    "FIRST_CONNECTION_HANDLE",
    "EventKind",
    "LinkCapture",
    "LinkEvent",
    "LinkInfo",
    "count_blocks",
    "peer_address",
    "render",
]

FIRST_CONNECTION_HANDLE: Final = 0x0040
"""HCI handle of the first link of a file; later ones count up."""
CONNECTION_HANDLES: Final = 0x0E00
"""Handles used before they wrap around (HCI allows up to 0x0EFF)."""
_ATT_MTU_MIN: Final = 23
_ATT_MTU_MAX: Final = 0xFFFF


class EventKind(enum.StrEnum):
    """What happened on a link."""

    UP = "up"
    """Connected, services discovered, about to subscribe."""
    NOTIFY = "notify"
    """A notification from the glasses (TX characteristic)."""
    WRITE = "write"
    """A write without response from the phone (RX characteristic)."""
    DOWN = "down"
    """The link closed."""


def _is_address(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    )


def peer_address(address: str) -> str:
    """A Bluetooth address for a capture (CoreBluetooth gives UUIDs instead).

    An address is kept (upper case); anything else becomes a random static
    address derived from it, the same every time.
    """
    if _is_address(address):
        return address.upper()
    digest = hashlib.sha256(address.encode()).digest()
    return ":".join(f"{b:02X}" for b in (bytes([digest[0] | 0xC0]) + digest[1:6]))


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What a capture needs of a link: peer address, ATT MTU, service table."""

    peer: str
    mtu: int
    services: tuple[ServiceSpec, ...]

    def __post_init__(self) -> None:
        """Refuse what the writer could not use."""
        if not _is_address(self.peer):
            raise LocalProtocolError("LinkInfo.peer is an address AA:BB:CC:DD:EE:FF")
        if not _ATT_MTU_MIN <= self.mtu <= _ATT_MTU_MAX:
            raise LocalProtocolError("LinkInfo.mtu is 23..65535")

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (see :meth:`from_json`)."""
        return {
            "peer": self.peer,
            "mtu": self.mtu,
            "services": [
                {
                    "uuid": s.uuid,
                    "characteristics": [
                        [c.uuid, int(c.properties)] for c in s.characteristics
                    ],
                }
                for s in self.services
            ],
        }

    @classmethod
    def from_json(cls, doc: object) -> LinkInfo:
        """Read :meth:`to_json`'s form.

        Raises:
            CaptureError: not that form.
        """
        if not isinstance(doc, dict):
            raise CaptureError("link info: not an object")
        peer, mtu, services = doc.get("peer"), doc.get("mtu"), doc.get("services")
        if not isinstance(peer, str) or not isinstance(mtu, int):
            raise CaptureError("link info: no peer or mtu")
        if not isinstance(services, list):
            raise CaptureError("link info: no services")
        table = []
        for service in services:
            if not isinstance(service, dict):
                raise CaptureError("link info: a service is not an object")
            uuid, chars = service.get("uuid"), service.get("characteristics")
            if not isinstance(uuid, str) or not isinstance(chars, list):
                raise CaptureError("link info: a service without uuid")
            specs = []
            for char in chars:
                if not (
                    isinstance(char, list)
                    and len(char) == 2
                    and isinstance(char[0], str)
                    and isinstance(char[1], int)
                    and 0 <= char[1] <= 0xFF
                ):
                    raise CaptureError("link info: a bad characteristic")
                specs.append(CharacteristicSpec(char[0], CharProps(char[1])))
            table.append(ServiceSpec(uuid, tuple(specs)))
        try:
            return cls(peer, mtu, tuple(table))
        except LocalProtocolError as exc:
            raise CaptureError(f"link info: {exc}") from None


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """One event of one link, numbered.

    Attributes:
        seq: Position in the recorder's sequence (1, 2, ...).
        t: Seconds (Unix time in the daemon and sniff).
        link: The link's number in the recorder (not an HCI handle).
        kind: What happened.
        value: The ATT value of NOTIFY and WRITE, in full; else empty.
    """

    seq: int
    t: float
    link: int
    kind: EventKind
    value: bytes = b""

    def to_json(self) -> list[object]:
        """``[seq, t, link, kind, value in base64]``."""
        return [
            self.seq,
            round(self.t, 6),
            self.link,
            self.kind.value,
            base64.b64encode(self.value).decode(),
        ]

    @classmethod
    def from_json(cls, item: object) -> LinkEvent:
        """Read :meth:`to_json`'s form.

        Raises:
            CaptureError: not that form.
        """
        if not isinstance(item, list) or len(item) != 5:
            raise CaptureError("link event: not a list of five")
        seq, t, link, kind, value = item
        if (
            not isinstance(seq, int)
            or not isinstance(t, int | float)
            or not isinstance(link, int)
            or not isinstance(value, str)
            or kind not in tuple(EventKind)
        ):
            raise CaptureError("link event: bad fields")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise CaptureError("link event: value is not base64") from None
        if t < 0:
            raise CaptureError("link event: negative time")
        return cls(seq, float(t), link, EventKind(kind), data)


def count_blocks(data: bytes) -> int:
    """Number of pcapng blocks in ``data``."""
    count = offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if size < 12:
            break
        offset += size
        count += 1
    return count


class LinkCapture:
    """pcapng blocks from link events; every method returns the bytes to append.

    The first :meth:`link_up` also returns the file's header (section and
    interface blocks), made from that link's service table. Links are named
    by the caller's numbers; each open link gets an HCI connection handle.

    Raises (every method):
        LocalProtocolError: a value or ``down`` on a link that is not open,
            or a link opened twice.
    """

    __slots__ = ("_comment", "_handles", "_next", "_writer", "bytes", "packets")

    def __init__(self, *, comment: str | None = None) -> None:
        """Prepare; ``comment`` goes into the section comment."""
        self._comment = comment
        self._writer: CaptureWriter | None = None
        self._handles: dict[int, int] = {}
        self._next = 0
        self.packets = 0
        """Packets (pcapng blocks after the header) produced so far."""
        self.bytes = 0
        """Bytes produced so far, header included."""

    @property
    def started(self) -> bool:
        """Whether the header has been produced."""
        return self._writer is not None

    def is_open(self, link: int) -> bool:
        """Whether ``link`` is up in this capture."""
        return link in self._handles

    def header(self, services: Iterable[ServiceSpec]) -> bytes:
        """The header alone, for a file with no link (once; else empty)."""
        if self._writer is not None:
            return b""
        self._writer = CaptureWriter(services, comment=self._comment, keep=False)
        return self._count_header(self._writer.header)

    def link_up(self, link: int, info: LinkInfo, t: float) -> bytes:
        """Connection, MTU exchange, discovery and subscription of ``link``."""
        if link in self._handles:
            raise LocalProtocolError(f"link {link} is already up")
        out = self.header(info.services)
        writer = self._writer
        assert writer is not None  # noqa: S101 - set by header()
        handle = FIRST_CONNECTION_HANDLE + self._next % CONNECTION_HANDLES
        self._next += 1
        data = writer.connect(handle, info.peer, t)
        data += writer.mtu(handle, info.mtu, t)
        data += writer.discover(handle, t)
        data += writer.subscribe(handle, TX_CHAR_UUID, t)
        self._handles[link] = handle
        return out + self._count(data)

    def notify(
        self, link: int, value: bytes, t: float, *, comment: str | None = None
    ) -> bytes:
        """A notification from the glasses (TX value)."""
        writer, handle = self._open(link)
        return self._count(
            writer.att_notify(handle, TX_CHAR_UUID, value, t, comment=comment)
        )

    def write(
        self, link: int, value: bytes, t: float, *, comment: str | None = None
    ) -> bytes:
        """A write without response from the phone (RX value)."""
        writer, handle = self._open(link)
        return self._count(
            writer.att_write_cmd(handle, RX_CHAR_UUID, value, t, comment=comment)
        )

    def link_down(self, link: int, t: float) -> bytes:
        """A Disconnection Complete for ``link``."""
        writer, handle = self._open(link)
        del self._handles[link]
        return self._count(writer.disconnect(handle, t))

    def feed(self, event: LinkEvent, infos: Mapping[int, LinkInfo]) -> bytes:
        """Record one event; a value of a link not up brings it up first.

        ``infos`` holds the :class:`LinkInfo` of every link the events name.
        Events of a link with no info, a second ``up`` and a ``down`` of a link
        not up produce nothing.
        """
        link, kind = event.link, event.kind
        if kind is EventKind.DOWN:
            return self.link_down(link, event.t) if link in self._handles else b""
        out = b""
        if link not in self._handles:
            info = infos.get(link)
            if info is None:
                return b""
            out = self.link_up(link, info, event.t)
        elif kind is EventKind.UP:
            return b""
        if kind is EventKind.NOTIFY:
            out += self.notify(link, event.value, event.t)
        elif kind is EventKind.WRITE:
            out += self.write(link, event.value, event.t)
        return out

    def _open(self, link: int) -> tuple[CaptureWriter, int]:
        handle = self._handles.get(link)
        if handle is None or self._writer is None:
            raise LocalProtocolError(f"link {link} is not up")
        return self._writer, handle

    def _count_header(self, data: bytes) -> bytes:
        self.bytes += len(data)
        return data

    def _count(self, data: bytes) -> bytes:
        self.packets += count_blocks(data)
        self.bytes += len(data)
        return data


def render(
    events: Iterable[LinkEvent],
    infos: Mapping[int, LinkInfo],
    *,
    comment: str | None = None,
    services: Iterable[ServiceSpec] = (),
) -> bytes:
    """A whole pcapng file of ``events`` (see :meth:`LinkCapture.feed`).

    With no event that makes a packet, the file is the header alone, made
    from ``services`` (empty bytes if none is given).
    """
    capture = LinkCapture(comment=comment)
    out = [capture.feed(event, infos) for event in events]
    if not capture.started:
        services = tuple(services)
        if services:
            out.append(capture.header(services))
    return b"".join(out)
