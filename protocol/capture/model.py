"""The values a capture is read into: connections, ATT operations, counts.

Produced by :func:`protocol.capture.reader.read_capture`; frozen except
:class:`HciStats`, which the reader fills as it goes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

from protocol.capture.att import opcode_name
from protocol.capture.containers import LINKTYPE_NAMES, CaptureFormat

__all__ = [
    "AttOp",
    "Capture",
    "Connection",
    "Direction",
    "HciStats",
    "Transport",
]


class Direction(enum.IntEnum):
    """Which way a packet went, from the capturing host's point of view.

    Over the air (272) SENT means central to peripheral.
    """

    SENT = 0
    """Host to controller: this device sent it."""
    RECEIVED = 1
    """Controller to host: this device received it."""
    UNKNOWN = 2
    """The link type does not say (LINKTYPE 187 ACL data)."""


class Transport(enum.StrEnum):
    """What kind of link a connection is."""

    LE = "le"
    BR_EDR = "br_edr"
    UNKNOWN = "unknown"
    """Data on a handle whose Connection Complete is not in the capture."""


@dataclass(frozen=True, slots=True)
class AttOp:
    """One ATT PDU.

    Attributes:
        packet: index of the packet that completed the PDU (tshark frame
            number minus 1).
        timestamp_ns: that packet's timestamp.
        connection: index into :attr:`Capture.connections`.
        direction: SENT, RECEIVED or UNKNOWN.
        opcode: the ATT opcode byte.
        handle: the attribute handle; for responses (read, write) the
            handle of the request they answer; ``None`` if unknown.
        value: the attribute value (writes, notifications, indications,
            reads); empty for other PDUs.
        uuid: the handle's UUID when the capture holds its discovery.
        truncated: the capture kept fewer bytes than the PDU had.
        comment: the pcapng comment of that packet (the writer's
            ``comment=``), if any.
    """

    packet: int
    timestamp_ns: int
    connection: int
    direction: Direction
    opcode: int
    handle: int | None
    value: bytes
    uuid: str | None
    truncated: bool = False
    comment: str | None = None

    @property
    def name(self) -> str:
        """Short opcode name: ``notify``, ``write_cmd``, ``read_rsp``..."""
        return opcode_name(self.opcode)


@dataclass(frozen=True, slots=True)
class Connection:
    """One connection: from its Connection Complete (or first packet) to its end.

    Attributes:
        index: position in :attr:`Capture.connections`.
        adapter: controller index (btsnoop 2001 / LINKTYPE 254), else 0.
        handle: HCI connection handle; over the air, the access address.
        transport: LE, BR/EDR, or unknown when the capture starts mid-link.
        over_the_air: decoded from a sniffer (272), not from HCI.
        peer: peer address ``AA:BB:CC:DD:EE:FF`` when the capture has it.
        peer_random: the peer address is random (LE).
        central: this host's role (LE), when known.
        start_ns: timestamp of the Connection Complete or first packet.
        end_ns: timestamp of the Disconnection Complete or last packet.
        implicit: no Connection Complete in the capture: the link was up
            before it started (or the file lost the event).
        disconnected: a Disconnection Complete (or terminate) was seen.
        disconnect_reason: its HCI reason code.
        packets: HCI packets (events and ACL fragments) on this connection.
        bytes: bytes of those packets as stored.
        uuids: handle -> UUID pairs learnt from discovery, sorted.
    """

    index: int
    adapter: int
    handle: int
    transport: Transport
    over_the_air: bool
    peer: str | None
    peer_random: bool | None
    central: bool | None
    start_ns: int
    end_ns: int
    implicit: bool
    disconnected: bool
    disconnect_reason: int | None
    packets: int
    bytes: int
    uuids: tuple[tuple[int, str], ...]

    @property
    def duration_s(self) -> float:
        """Seconds from start to end."""
        return max(0, self.end_ns - self.start_ns) / 1e9

    def uuid_map(self) -> dict[int, str]:
        """The handle -> UUID map as a dict."""
        return dict(self.uuids)


@dataclass(slots=True)
class HciStats:
    """What the reader saw and skipped (counts)."""

    commands: int = 0
    events: int = 0
    acl: int = 0
    sco: int = 0
    iso: int = 0
    other: int = 0
    """Records with no HCI (monitor notes, index events, sniffer messages)."""
    advertising: int = 0
    """Advertising-channel packets (over the air)."""
    air_data: int = 0
    """Data-channel packets (over the air)."""
    encrypted: int = 0
    """Over-the-air data packets on an encrypted link (not decodable)."""
    bad_crc: int = 0
    """Over-the-air packets whose CRC failed (skipped)."""
    retransmissions: int = 0
    """Over-the-air data packets repeating the previous sequence number."""
    malformed: int = 0
    """Packets or events too short for their own headers (skipped)."""
    unsupported: int = 0
    """Packets of a link type we do not decode."""
    truncated: int = 0
    """Records stored shorter than on the wire (incl_len < orig_len)."""
    l2cap_pdus: int = 0
    l2cap_incomplete: int = 0
    """L2CAP PDUs abandoned: a new start before the end, or cut short."""
    l2cap_orphans: int = 0
    """Continuation fragments with no PDU in progress."""

    def to_dict(self) -> dict[str, int]:
        """Counts by name."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Capture:
    """A capture read down to ATT.

    Attributes:
        format: container format.
        linktype: link type of the first interface (btsnoop: its datalink).
        linktypes: every link type in the file.
        packets: number of records.
        first_ns: timestamp of the first record (0 if none).
        last_ns: timestamp of the last record (0 if none).
        connections: every connection, in order of appearance.
        att: every ATT PDU, in file order.
        stats: HCI-level counts.
        comments: section and interface comments (pcapng).
        warnings: container damage (see :func:`read_capture`).
    """

    format: CaptureFormat
    linktype: int
    linktypes: tuple[int, ...]
    packets: int
    first_ns: int
    last_ns: int
    connections: tuple[Connection, ...]
    att: tuple[AttOp, ...]
    stats: HciStats
    comments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def linktype_name(self) -> str:
        """A readable name for :attr:`linktype`."""
        return LINKTYPE_NAMES.get(self.linktype, f"LINKTYPE {self.linktype}")

    @property
    def duration_s(self) -> float:
        """Seconds between the first and the last record."""
        return max(0, self.last_ns - self.first_ns) / 1e9
