"""Read a capture down to ATT: connections, L2CAP reassembly, ATT operations.

:func:`read_capture` takes the bytes of any file :mod:`.containers` reads and
returns a :class:`Capture`:

- every record is normalised to an HCI packet (H4 type, direction, adapter)
  whatever the link type (201, 187, 254; btsnoop 1001, 1002, 2001), or, for
  nRF Sniffer files (272), to a link-layer data PDU;
- connections are tracked from LE Connection Complete (and the Enhanced
  variants), Classic Connection Complete and Disconnection Complete; a
  handle reused by a new Connection Complete starts a new connection; ACL
  data on a handle with no open connection opens an *implicit* one;
- HCI ACL fragments (PB flags) are reassembled into L2CAP PDUs per
  connection and direction, by Wireshark's rules: a PDU in one fragment
  stored shorter than its header claims (Android filtered and btsnooz
  logs) still counts, with ``truncated=True``; a PDU in several fragments
  completes only when the stored bytes add up, so a truncated fragment
  loses it;
- ATT PDUs on CID 4 become :class:`AttOp` values (opcode, handle, value),
  responses take their handle from the pending request, and discovery
  responses fill each connection's handle -> UUID map.

Over the air (272), packets with a bad CRC, retransmissions (same sequence
number again) and encrypted packets the sniffer could not decrypt are
counted in :class:`HciStats` and skipped; tshark still dissects them, so
its ATT counts can be higher on such files.

Nothing here raises on content: malformed events and PDUs are counted in
:class:`HciStats` and skipped, as tshark does. Only the container can make
:func:`read_capture` raise :class:`~protocol.capture.errors.CaptureError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from protocol.capture.air import AirPacket, decode_nordic
from protocol.capture.att import (
    ATT_CID,
    UUID_CHARACTERISTIC,
    UUID_PRIMARY_SERVICE,
    UUID_SECONDARY_SERVICE,
    AttOpcode,
    normalize_uuid,
    uuid_from_le,
)
from protocol.capture.containers import (
    DLT_BTSNOOP_H1,
    DLT_BTSNOOP_H4,
    DLT_BTSNOOP_MONITOR,
    LINKTYPE_BLUETOOTH_HCI_H4,
    LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
    LINKTYPE_BLUETOOTH_LINUX_MONITOR,
    LINKTYPE_NAMES,
    LINKTYPE_NORDIC_BLE,
    Packet,
    PacketFile,
    read_packets,
)
from protocol.capture.errors import CaptureError
from protocol.capture.model import (
    AttOp,
    Capture,
    Connection,
    Direction,
    HciStats,
    Transport,
)

__all__ = [
    "SUPPORTED_LINKTYPES",
    "AttOp",
    "Capture",
    "Connection",
    "Direction",
    "HciStats",
    "Transport",
    "decode_packets",
    "read_capture",
]

SUPPORTED_LINKTYPES: Final = frozenset(
    (
        LINKTYPE_BLUETOOTH_HCI_H4,
        LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
        LINKTYPE_BLUETOOTH_LINUX_MONITOR,
        LINKTYPE_NORDIC_BLE,
        DLT_BTSNOOP_H1,
        DLT_BTSNOOP_H4,
        DLT_BTSNOOP_MONITOR,
    )
)
"""Link types (and btsnoop datalinks) whose packets are decoded."""


_H4_COMMAND: Final = 1
_H4_ACL: Final = 2
_H4_SCO: Final = 3
_H4_EVENT: Final = 4
_H4_ISO: Final = 5
_MONITOR_H4: Final[dict[int, tuple[int, Direction]]] = {
    2: (_H4_COMMAND, Direction.SENT),
    3: (_H4_EVENT, Direction.RECEIVED),
    4: (_H4_ACL, Direction.SENT),
    5: (_H4_ACL, Direction.RECEIVED),
    6: (_H4_SCO, Direction.SENT),
    7: (_H4_SCO, Direction.RECEIVED),
    18: (_H4_ISO, Direction.SENT),
    19: (_H4_ISO, Direction.RECEIVED),
}
"""Linux monitor opcode -> (H4 type, direction)."""
_MONITOR_DELETE_INDEX: Final = 1
_MONITOR_CLOSE_INDEX: Final = 9

_EVT_CONNECTION_COMPLETE: Final = 0x03
_EVT_DISCONNECTION_COMPLETE: Final = 0x05
_EVT_LE_META: Final = 0x3E
_LE_CONNECTION_COMPLETE_EVENTS: Final = frozenset((0x01, 0x0A, 0x29))
_LINK_TYPE_ACL: Final = 0x01
_PB_CONTINUING: Final = 0b01
_SOURCE_HCI: Final = 0
_SOURCE_AIR: Final = 1
_LLID_CONTINUATION: Final = 1
_LLID_START: Final = 2
_LLID_CONTROL: Final = 3
_LL_TERMINATE_IND: Final = 0x02
_ADV_CONNECT_IND: Final = 0x05
_SIGNATURE: Final = 12
_MIC: Final = 4

_ACL: Final = struct.Struct("<HH")
_U16: Final = struct.Struct("<H")
_BE_U32: Final = struct.Struct(">I")
_BE_U16X2: Final = struct.Struct(">HH")
_LE_CONN: Final = struct.Struct("<BHBB6s")
_CLASSIC_CONN: Final = struct.Struct("<BH6sB")
_DISCONN: Final = struct.Struct("<BHB")
_RANGE: Final = struct.Struct("<HH")
_U32: Final = struct.Struct("<I")

_OTHER: Final = {
    Direction.SENT: Direction.RECEIVED,
    Direction.RECEIVED: Direction.SENT,
    Direction.UNKNOWN: Direction.UNKNOWN,
}
_HANDLE_VALUE_OPS: Final = frozenset(
    (
        AttOpcode.WRITE_REQ,
        AttOpcode.WRITE_CMD,
        AttOpcode.SIGNED_WRITE_CMD,
        AttOpcode.HANDLE_VALUE_NTF,
        AttOpcode.HANDLE_VALUE_IND,
    )
)
_REQUESTS: Final = frozenset(
    (0x02, 0x04, 0x06, 0x08, 0x0A, 0x0C, 0x0E, 0x10, 0x12, 0x16, 0x18, 0x20)
)
_RESPONSES: Final = frozenset(
    (0x01, 0x03, 0x05, 0x07, 0x09, 0x0B, 0x0D, 0x0F, 0x11, 0x13, 0x17, 0x19, 0x21)
)
_HANDLE_REQUESTS: Final = frozenset(
    (AttOpcode.READ_REQ, AttOpcode.READ_BLOB_REQ, AttOpcode.PREPARE_WRITE_REQ)
)
"""Requests (besides writes) whose first field is one attribute handle."""
_TYPED_REQUESTS: Final = frozenset(
    (AttOpcode.READ_BY_TYPE_REQ, AttOpcode.READ_BY_GROUP_TYPE_REQ)
)
_SERVICE_TYPES: Final = frozenset(
    (normalize_uuid(UUID_PRIMARY_SERVICE), normalize_uuid(UUID_SECONDARY_SERVICE))
)
_CHARACTERISTIC_TYPE: Final = normalize_uuid(UUID_CHARACTERISTIC)

_Key = tuple[int, int, int]
"""(source: HCI or air, adapter index, connection handle or access address)."""


def read_capture(
    data: bytes | bytearray | memoryview, *, strict: bool = False
) -> Capture:
    """Read a btsnoop, pcap or pcapng capture down to ATT operations.

    Args:
        data: the whole file (any bytes).
        strict: raise on container damage after the header instead of
            keeping what came before it (and a warning).

    Returns:
        Connections, ATT operations and counts.

    Raises:
        CaptureError: not a capture (unknown magic, unsupported version or
            btsnoop datalink), no Bluetooth link type we read, or damage
            when ``strict``. Nothing else.
    """
    return decode_packets(read_packets(data, strict=strict))


def decode_packets(packets: PacketFile) -> Capture:
    """Decode a container already read by :func:`read_packets`.

    Raises:
        CaptureError: none of the file's link types is one we read.
    """
    if packets.linktypes and not SUPPORTED_LINKTYPES.intersection(packets.linktypes):
        name = LINKTYPE_NAMES.get(packets.linktype, str(packets.linktype))
        raise CaptureError(f"link type {name} is not a Bluetooth link type we read")
    decoder = _Decoder()
    for packet in packets.packets:
        decoder.packet(packet)
    return decoder.finish(packets)


@dataclass(slots=True)
class _Partial:
    buffer: bytearray
    expected: int


@dataclass(slots=True)
class _Conn:
    index: int
    key: _Key
    transport: Transport
    start_ns: int
    last_ns: int
    peer: str | None = None
    peer_random: bool | None = None
    central: bool | None = None
    implicit: bool = False
    disconnected: bool = False
    reason: int | None = None
    packets: int = 0
    bytes: int = 0
    uuids: dict[int, str] = field(default_factory=dict)
    pending: dict[Direction, tuple[int, int | None, str | None]] = field(
        default_factory=dict
    )
    last_sn: dict[Direction, int] = field(default_factory=dict)

    def freeze(self) -> Connection:
        return Connection(
            index=self.index,
            adapter=self.key[1],
            handle=self.key[2],
            transport=self.transport,
            over_the_air=self.key[0] == _SOURCE_AIR,
            peer=self.peer,
            peer_random=self.peer_random,
            central=self.central,
            start_ns=self.start_ns,
            end_ns=self.last_ns,
            implicit=self.implicit,
            disconnected=self.disconnected,
            disconnect_reason=self.reason,
            packets=self.packets,
            bytes=self.bytes,
            uuids=tuple(sorted(self.uuids.items())),
        )


def _address(raw: bytes) -> str:
    return ":".join(f"{b:02X}" for b in reversed(raw))


class _Decoder:
    """State of one pass over the packets of a file."""

    __slots__ = ("att", "conns", "first_ns", "last_ns", "open", "partials", "stats")

    def __init__(self) -> None:
        self.conns: list[_Conn] = []
        self.open: dict[_Key, _Conn] = {}
        self.partials: dict[tuple[_Key, Direction], _Partial] = {}
        self.att: list[AttOp] = []
        self.stats = HciStats()
        self.first_ns: int | None = None
        self.last_ns = 0

    def finish(self, packets: PacketFile) -> Capture:
        return Capture(
            format=packets.format,
            linktype=packets.linktype,
            linktypes=packets.linktypes,
            packets=len(packets.packets),
            first_ns=self.first_ns or 0,
            last_ns=self.last_ns,
            connections=tuple(c.freeze() for c in self.conns),
            att=tuple(self.att),
            stats=self.stats,
            comments=packets.comments,
            warnings=packets.warnings,
        )

    # --- packets -> HCI ----------------------------------------------------

    def packet(self, p: Packet) -> None:
        if self.first_ns is None:
            self.first_ns = p.timestamp_ns
        self.last_ns = p.timestamp_ns
        if p.truncated:
            self.stats.truncated += 1
        lt = p.linktype
        data = p.data
        if lt == LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR:
            if len(data) < 5:
                self.stats.malformed += 1
                return
            (raw_dir,) = _BE_U32.unpack_from(data)
            direction = Direction(raw_dir) if raw_dir < 2 else Direction.UNKNOWN
            self.h4(p, 0, data[4], direction, data[5:])
        elif lt == DLT_BTSNOOP_H4:
            if not data:
                self.stats.malformed += 1
                return
            self.h4(p, 0, data[0], Direction(p.flags & 1), data[1:])
        elif lt == DLT_BTSNOOP_H1:
            direction = Direction(p.flags & 1)
            if p.flags & 2:
                kind = _H4_EVENT if direction is Direction.RECEIVED else _H4_COMMAND
            else:
                kind = _H4_ACL
            self.h4(p, 0, kind, direction, data)
        elif lt == LINKTYPE_BLUETOOTH_HCI_H4:
            if not data:
                self.stats.malformed += 1
                return
            kind = data[0]
            direction = {
                _H4_COMMAND: Direction.SENT,
                _H4_EVENT: Direction.RECEIVED,
            }.get(kind, Direction.UNKNOWN)
            self.h4(p, 0, kind, direction, data[1:])
        elif lt == DLT_BTSNOOP_MONITOR:
            self.monitor(p, p.flags >> 16, p.flags & 0xFFFF, data)
        elif lt == LINKTYPE_BLUETOOTH_LINUX_MONITOR:
            if len(data) < 4:
                self.stats.malformed += 1
                return
            adapter, opcode = _BE_U16X2.unpack_from(data)
            self.monitor(p, adapter, opcode, data[4:])
        elif lt == LINKTYPE_NORDIC_BLE:
            self.air(p, decode_nordic(data))
        else:
            self.stats.unsupported += 1

    def monitor(self, p: Packet, adapter: int, opcode: int, data: bytes) -> None:
        mapped = _MONITOR_H4.get(opcode)
        if mapped is not None:
            self.h4(p, adapter, mapped[0], mapped[1], data)
            return
        self.stats.other += 1
        if opcode in (_MONITOR_DELETE_INDEX, _MONITOR_CLOSE_INDEX):
            for key in [
                k for k in self.open if k[0] == _SOURCE_HCI and k[1] == adapter
            ]:
                self.close(key, p, None)

    def h4(
        self, p: Packet, adapter: int, kind: int, direction: Direction, data: bytes
    ) -> None:
        stats = self.stats
        if kind == _H4_ACL:
            stats.acl += 1
            self.acl(p, adapter, direction, data)
        elif kind == _H4_EVENT:
            stats.events += 1
            self.event(p, adapter, data)
        elif kind == _H4_COMMAND:
            stats.commands += 1
        elif kind == _H4_SCO:
            stats.sco += 1
        elif kind == _H4_ISO:
            stats.iso += 1
        else:
            stats.malformed += 1

    # --- connections -------------------------------------------------------

    def event(self, p: Packet, adapter: int, data: bytes) -> None:
        if len(data) < 2:
            self.stats.malformed += 1
            return
        code = data[0]
        params = data[2 : 2 + data[1]]
        if code == _EVT_LE_META and params:
            if params[0] in _LE_CONNECTION_COMPLETE_EVENTS:
                if len(params) < 1 + _LE_CONN.size:
                    self.stats.malformed += 1
                    return
                status, handle, role, peer_type, peer = _LE_CONN.unpack_from(params, 1)
                if status == 0:
                    conn = self.connect(
                        (_SOURCE_HCI, adapter, handle & 0xFFF), Transport.LE, p
                    )
                    conn.peer = _address(peer)
                    conn.peer_random = bool(peer_type & 1)
                    conn.central = role == 0
                    self.count(conn, p)
        elif code == _EVT_CONNECTION_COMPLETE:
            if len(params) < _CLASSIC_CONN.size:
                self.stats.malformed += 1
                return
            status, handle, peer, link_type = _CLASSIC_CONN.unpack_from(params)
            if status == 0 and link_type == _LINK_TYPE_ACL:
                conn = self.connect(
                    (_SOURCE_HCI, adapter, handle & 0xFFF), Transport.BR_EDR, p
                )
                conn.peer = _address(peer)
                self.count(conn, p)
        elif code == _EVT_DISCONNECTION_COMPLETE:
            if len(params) < _DISCONN.size:
                self.stats.malformed += 1
                return
            status, handle, reason = _DISCONN.unpack_from(params)
            key = (_SOURCE_HCI, adapter, handle & 0xFFF)
            if status == 0 and key in self.open:
                self.count(self.open[key], p)
                self.close(key, p, reason)

    def connect(self, key: _Key, transport: Transport, p: Packet) -> _Conn:
        if key in self.open:
            self.close(key, p, None)
        conn = _Conn(len(self.conns), key, transport, p.timestamp_ns, p.timestamp_ns)
        self.conns.append(conn)
        self.open[key] = conn
        return conn

    def close(self, key: _Key, p: Packet, reason: int | None) -> None:
        conn = self.open.pop(key)
        conn.last_ns = p.timestamp_ns
        conn.disconnected = reason is not None
        conn.reason = reason
        for direction in Direction:
            if self.partials.pop((key, direction), None) is not None:
                self.stats.l2cap_incomplete += 1

    def conn_for(self, key: _Key, p: Packet) -> _Conn:
        conn = self.open.get(key)
        if conn is None:
            transport = Transport.LE if key[0] == _SOURCE_AIR else Transport.UNKNOWN
            conn = self.connect(key, transport, p)
            conn.implicit = True
        return conn

    def count(self, conn: _Conn, p: Packet) -> None:
        conn.packets += 1
        conn.bytes += len(p.data)
        conn.last_ns = p.timestamp_ns

    # --- ACL and L2CAP -----------------------------------------------------

    def acl(self, p: Packet, adapter: int, direction: Direction, data: bytes) -> None:
        if len(data) < _ACL.size:
            self.stats.malformed += 1
            return
        header, declared = _ACL.unpack_from(data)
        conn = self.conn_for((_SOURCE_HCI, adapter, header & 0xFFF), p)
        self.count(conn, p)
        start = (header >> 12) & 0b11 != _PB_CONTINUING
        self.l2cap(conn, direction, start, data[4 : 4 + declared], declared, p)

    def l2cap(
        self,
        conn: _Conn,
        direction: Direction,
        start: bool,
        fragment: bytes,
        declared: int,
        p: Packet,
    ) -> None:
        """Reassemble as Wireshark's bthci_acl does.

        A start fragment whose declared length covers the whole L2CAP PDU is
        complete (and ``truncated`` if fewer bytes were stored, or the packet
        was stored shorter than it was on the wire). Otherwise
        stored bytes are collected and the PDU completes when they add up
        exactly to its length; a continuation that would overrun is ignored,
        so a PDU with a truncated fragment never completes.
        """
        key = (conn.key, direction)
        partials = self.partials
        if start:
            if partials.pop(key, None) is not None:
                self.stats.l2cap_incomplete += 1
            if len(fragment) < 2:
                self.stats.malformed += 1
                return
            expected = _U16.unpack_from(fragment)[0] + 4
            if declared >= expected:
                pdu = fragment[:expected]
                # Short of its length, or cut by a redactor that fixed the
                # lengths up (the packet is still shorter than on the wire).
                self.pdu(conn, direction, pdu, len(pdu) < expected or p.truncated, p)
            else:
                partials[key] = _Partial(bytearray(fragment), expected)
            return
        part = partials.get(key)
        if part is None:
            self.stats.l2cap_orphans += 1
            return
        if len(part.buffer) + len(fragment) > part.expected:
            return
        part.buffer += fragment
        if len(part.buffer) == part.expected:
            del partials[key]
            self.pdu(conn, direction, bytes(part.buffer), False, p)

    def pdu(
        self, conn: _Conn, direction: Direction, pdu: bytes, truncated: bool, p: Packet
    ) -> None:
        self.stats.l2cap_pdus += 1
        if len(pdu) > 4 and _U16.unpack_from(pdu, 2)[0] == ATT_CID:
            self.att_pdu(conn, direction, pdu[4:], truncated, p)

    # --- ATT ---------------------------------------------------------------

    def att_pdu(
        self, conn: _Conn, direction: Direction, att: bytes, truncated: bool, p: Packet
    ) -> None:
        op = att[0]
        body = att[1:]
        handle: int | None = None
        value = b""
        pending = conn.pending
        if op in _HANDLE_VALUE_OPS:
            if len(body) >= 2:
                (handle,) = _U16.unpack_from(body)
                value = body[2:]
                if op == AttOpcode.SIGNED_WRITE_CMD:
                    value = value[:-_SIGNATURE]
            if op == AttOpcode.WRITE_REQ:
                pending[direction] = (op, handle, None)
        elif op in _REQUESTS:
            type_uuid = None
            if op in _HANDLE_REQUESTS and len(body) >= 2:
                (handle,) = _U16.unpack_from(body)
            if op in _TYPED_REQUESTS and len(body) in (6, 20):
                type_uuid = uuid_from_le(body[4:])
            if op == AttOpcode.PREPARE_WRITE_REQ:
                value = body[4:]
            pending[direction] = (op, handle, type_uuid)
        elif op in _RESPONSES:
            request = pending.pop(_OTHER[direction], None)
            if op in (AttOpcode.READ_RSP, AttOpcode.READ_BLOB_RSP):
                value = body
            elif op == AttOpcode.PREPARE_WRITE_RSP:
                value = body[4:]
            if op == AttOpcode.ERROR_RSP:
                if len(body) >= 3:
                    (handle,) = _U16.unpack_from(body, 1)
            elif request is not None and request[0] == op - 1:
                handle = request[1]
                if op == AttOpcode.READ_BY_GROUP_TYPE_RSP:
                    self.services(conn, body, request[2])
                    handle = None
                elif op == AttOpcode.READ_BY_TYPE_RSP:
                    self.characteristics(conn, body, request[2])
                    handle = None
                elif op == AttOpcode.FIND_INFORMATION_RSP:
                    handle = None
            elif request is None:
                if op == AttOpcode.READ_BY_GROUP_TYPE_RSP:
                    self.services(conn, body, None)
                elif op == AttOpcode.READ_BY_TYPE_RSP:
                    self.characteristics(conn, body, None)
            if op == AttOpcode.FIND_INFORMATION_RSP:
                self.descriptors(conn, body)
        self.att.append(
            AttOp(
                packet=p.index,
                timestamp_ns=p.timestamp_ns,
                connection=conn.index,
                direction=direction,
                opcode=op,
                handle=handle,
                value=value,
                uuid=None if handle is None else conn.uuids.get(handle),
                truncated=truncated,
                comment=p.comment,
            )
        )

    def services(self, conn: _Conn, body: bytes, type_uuid: str | None) -> None:
        if type_uuid is not None and type_uuid not in _SERVICE_TYPES:
            return
        if not body or body[0] not in (6, 20):
            return
        size = body[0]
        for pos in range(1, len(body) - size + 1, size):
            start, _end = _RANGE.unpack_from(body, pos)
            conn.uuids[start] = uuid_from_le(body[pos + 4 : pos + size])

    def characteristics(self, conn: _Conn, body: bytes, type_uuid: str | None) -> None:
        if type_uuid is not None and type_uuid != _CHARACTERISTIC_TYPE:
            return
        if not body or body[0] not in (7, 21):
            return
        size = body[0]
        for pos in range(1, len(body) - size + 1, size):
            (value_handle,) = _U16.unpack_from(body, pos + 3)
            conn.uuids[value_handle] = uuid_from_le(body[pos + 5 : pos + size])

    def descriptors(self, conn: _Conn, body: bytes) -> None:
        if not body or body[0] not in (1, 2):
            return
        size = 4 if body[0] == 1 else 18
        for pos in range(1, len(body) - size + 1, size):
            (handle,) = _U16.unpack_from(body, pos)
            conn.uuids[handle] = uuid_from_le(body[pos + 2 : pos + size])

    # --- over the air ------------------------------------------------------

    def air(self, p: Packet, packet: AirPacket | None) -> None:
        stats = self.stats
        if packet is None:
            stats.other += 1
            return
        if not packet.crc_ok:
            stats.bad_crc += 1
            return
        header = packet.header
        if packet.advertising:
            stats.advertising += 1
            payload = packet.payload
            if header[0] & 0x0F == _ADV_CONNECT_IND and len(payload) >= 16:
                (access_address,) = _U32.unpack_from(payload, 12)
                conn = self.connect((_SOURCE_AIR, 0, access_address), Transport.LE, p)
                conn.peer = _address(payload[6:12])
                conn.peer_random = bool(header[0] & 0x80)
            return
        stats.air_data += 1
        conn = self.conn_for((_SOURCE_AIR, 0, packet.access_address), p)
        self.count(conn, p)
        direction = (
            Direction.SENT if packet.central_to_peripheral else Direction.RECEIVED
        )
        sn = (header[0] >> 3) & 1
        if conn.last_sn.get(direction) == sn:
            stats.retransmissions += 1
            return
        conn.last_sn[direction] = sn
        payload = packet.payload
        length = packet.length
        if packet.encrypted:
            if not packet.mic_ok:
                stats.encrypted += 1
                return
            payload = payload[: max(0, length - _MIC)]
            length = max(0, length - _MIC)
        llid = header[0] & 0b11
        if llid == _LLID_START:
            self.l2cap(conn, direction, True, payload, length, p)
        elif llid == _LLID_CONTINUATION and length:
            self.l2cap(conn, direction, False, payload, length, p)
        elif llid == _LLID_CONTROL and payload[:1] == bytes([_LL_TERMINATE_IND]):
            reason = payload[1] if len(payload) > 1 else 0
            self.close(conn.key, p, reason)
