"""Synthesize a pcapng (LINKTYPE 201) recording from GATT-level events.

bleak gives no HCI, so the writer makes up what Wireshark needs to decode
every ATT PDU with its handle's UUID and zero expert errors
(../shared/design/CAPTURE-FORMATS.md §3): an LE Connection Complete per
connection, a GATT discovery built from the service table, then the traffic,
and a Disconnection Complete. One HCI ACL frame per ATT PDU (optionally cut
into fragments to exercise reassembly).

Directions follow LINKTYPE 201: 0 = sent by this host (the phone, GATT
client: requests, writes, confirmations), 1 = received (responses,
notifications, indications, HCI events). Timestamps are seconds as floats on
any clock the caller chooses; they are stored in microseconds. Nothing here
reads a clock or a file: every method returns the bytes to append.

Example::

    writer = CaptureWriter(glasses_services())
    out = writer.header
    out += writer.connect(0x40, "C0:11:22:33:44:55", 0.0)
    out += writer.discover(0x40, 0.01)
    out += writer.att_notify(0x40, TX_CHAR_UUID, fragment, 0.5)
    out += writer.disconnect(0x40, 9.0)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocol.capture.att import (
    ATT_CID,
    UUID_CCCD,
    UUID_CHARACTERISTIC,
    UUID_PRIMARY_SERVICE,
    AttOpcode,
    uuid_to_le,
)
from protocol.capture.containers import (
    DLT_BTSNOOP_H4,
    LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
    encode_btsnoop,
    encode_pcapng_epb,
    encode_pcapng_idb,
    encode_pcapng_shb,
)
from protocol.capture.services import HandleMap, ServiceSpec
from protocol.errors import LocalProtocolError

__all__ = [
    "DEFAULT_ATT_MTU",
    "SENT",
    "RECEIVED",
    "CaptureWriter",
]

SENT: Final = 0
"""LINKTYPE 201 direction: host to controller (what this device sent)."""
RECEIVED: Final = 1
"""LINKTYPE 201 direction: controller to host (what this device received)."""
DEFAULT_ATT_MTU: Final = 23
"""ATT MTU before an exchange (Core Vol 3 Part F §3.2.8)."""
SYNTHESIZED_NOTE: Final = (
    "Synthesized by glasses-relay from GATT client events: the HCI events, "
    "handles and discovery PDUs are made up; ATT values, directions and times "
    "are as recorded."
)
"""The section comment that marks a file as synthesized."""

_H4_COMMAND: Final = 0x01
_H4_ACL: Final = 0x02
_H4_EVENT: Final = 0x04
_EVT_DISCONNECTION_COMPLETE: Final = 0x05
_EVT_LE_META: Final = 0x3E
_LE_CONNECTION_COMPLETE: Final = 0x01
_PB_FIRST_NON_FLUSHABLE: Final = 0b00
_PB_CONTINUING: Final = 0b01
_PB_FIRST_FLUSHABLE: Final = 0b10
_ERR_ATTRIBUTE_NOT_FOUND: Final = 0x0A
_MAX_L2CAP_PAYLOAD: Final = 0xFFFF
_MAX_TIMESTAMP_US: Final = (1 << 63) - 1 - 0x00DCDDB30F2F8000

_PHDR: Final = struct.Struct(">I")
_ACL: Final = struct.Struct("<HH")
_L2CAP: Final = struct.Struct("<HH")
_U16: Final = struct.Struct("<H")
_HANDLE_VALUE: Final = struct.Struct("<BH")
_RANGE_TYPE: Final = struct.Struct("<BHHH")
_CONN_COMPLETE: Final = struct.Struct("<BBHBB6sHHHB")
_DISCONNECT: Final = struct.Struct("<BHB")
_ERROR_RSP: Final = struct.Struct("<BBHB")
_MTU: Final = struct.Struct("<BH")


def _address(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise LocalProtocolError("a Bluetooth address is six hex bytes, AA:BB:..")
    try:
        return bytes(int(p, 16) for p in reversed(parts))
    except ValueError:
        raise LocalProtocolError("a Bluetooth address is six hex bytes") from None


def _microseconds(t: float) -> int:
    if not t >= 0:  # also refuses NaN
        raise LocalProtocolError("timestamps must be >= 0 seconds")
    us = round(t * 1_000_000)
    if us > _MAX_TIMESTAMP_US:
        raise LocalProtocolError("timestamp too large")
    return us


@dataclass(frozen=True, slots=True)
class _Frame:
    timestamp_us: int
    direction: int
    h4: bytes
    comment: str | None


@dataclass(slots=True)
class _Link:
    mtu: int = DEFAULT_ATT_MTU


class CaptureWriter:
    """Builds a pcapng LINKTYPE 201 recording, one method per GATT event.

    Every method returns the pcapng blocks it produced, so a recorder can
    append them to a file as they come (start with :attr:`header`). With
    ``keep=True`` (the default) the frames are also kept for
    :meth:`getvalue` and :meth:`to_btsnoop`; a long-running recorder passes
    ``keep=False`` so memory stays flat.

    Values are recorded as given: the writer does not cut them to the ATT
    MTU (a value longer than MTU - 3 is written whole, and tshark warns).

    Raises (every method):
        LocalProtocolError: an unknown connection or UUID, a negative time,
            a value too large for one L2CAP PDU, or a kept-frames call with
            ``keep=False``.
    """

    __slots__ = ("_frames", "_handles", "_header", "_keep", "_links", "_max_acl")

    def __init__(
        self,
        services: Iterable[ServiceSpec] | HandleMap,
        *,
        first_handle: int = 0x0010,
        comment: str | None = None,
        keep: bool = True,
        max_acl_payload: int | None = None,
    ) -> None:
        """Prepare a recording of ``services``.

        Args:
            services: the GATT table (UUIDs and properties), or a ready map.
            first_handle: handle of the first service declaration.
            comment: extra text for the section comment (e.g. bleak backend).
            keep: keep frames for :meth:`getvalue` and :meth:`to_btsnoop`.
            max_acl_payload: cut each L2CAP PDU into HCI ACL fragments of at
                most this many bytes (``None``: one fragment per PDU).
        """
        if isinstance(services, HandleMap):
            self._handles = services
        else:
            self._handles = HandleMap.allocate(services, first_handle=first_handle)
        if max_acl_payload is not None and not 1 <= max_acl_payload <= 0xFFFF:
            raise LocalProtocolError("max_acl_payload must be 1..65535")
        self._max_acl = max_acl_payload
        self._keep = keep
        self._frames: list[_Frame] = []
        self._links: dict[int, _Link] = {}
        note = SYNTHESIZED_NOTE if comment is None else f"{SYNTHESIZED_NOTE}\n{comment}"
        self._header = encode_pcapng_shb(
            comment=note, application="glasses-relay"
        ) + encode_pcapng_idb(
            LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
            name="glasses-relay",
            comment=self._handles.describe(),
        )

    @property
    def handles(self) -> HandleMap:
        """The synthetic handle map (UUID of every handle)."""
        return self._handles

    @property
    def header(self) -> bytes:
        """Section header and interface blocks: the first bytes of the file."""
        return self._header

    def mtu_of(self, conn: int) -> int:
        """The ATT MTU of an open connection (23 until :meth:`mtu`)."""
        return self._link(conn).mtu

    # --- output ----------------------------------------------------------

    def getvalue(self) -> bytes:
        """Return the whole pcapng file so far.

        Raises:
            LocalProtocolError: the writer was made with ``keep=False``.
        """
        self._check_keep()
        blocks = [self._header]
        blocks += [self._epb(f) for f in self._frames]
        return b"".join(blocks)

    def to_btsnoop(self) -> bytes:
        """Return the same frames as a btsnoop 1002 (Android H4) file.

        Byte-for-byte what ``editcap -F btsnoop`` makes of :meth:`getvalue`.

        Raises:
            LocalProtocolError: the writer was made with ``keep=False``.
        """
        self._check_keep()
        records = []
        for frame in self._frames:
            flags = frame.direction & 1
            if frame.h4[0] in (_H4_COMMAND, _H4_EVENT):
                flags |= 0b10
            records.append((frame.timestamp_us, flags, frame.h4))
        return encode_btsnoop(DLT_BTSNOOP_H4, records)

    # --- connection events -----------------------------------------------

    def connect(
        self,
        conn: int,
        peer: str,
        t: float,
        *,
        peer_random: bool = True,
        central: bool = True,
        interval: int = 24,
        latency: int = 0,
        supervision_timeout: int = 400,
    ) -> bytes:
        """Record an LE Connection Complete for connection handle ``conn``.

        Args:
            conn: the HCI connection handle (0..0x0EFF) naming this link in
                every later call; a handle may be reused after
                :meth:`disconnect`.
            peer: the glasses' address, ``AA:BB:CC:DD:EE:FF``.
            t: seconds.
            peer_random: random (True) or public address.
            central: this host's role (the phone is central).
            interval: connection interval in 1.25 ms units.
            latency: peripheral latency in events.
            supervision_timeout: in 10 ms units.
        """
        if not 0 <= conn <= 0x0EFF:
            raise LocalProtocolError("connection handle must be 0..0x0EFF")
        if conn in self._links:
            raise LocalProtocolError(f"connection 0x{conn:03x} is already open")
        params = _CONN_COMPLETE.pack(
            _LE_CONNECTION_COMPLETE,
            0,
            conn,
            0 if central else 1,
            1 if peer_random else 0,
            _address(peer),
            interval,
            latency,
            supervision_timeout,
            0,
        )
        us = _microseconds(t)
        self._links[conn] = _Link()
        return self._emit(us, RECEIVED, _event(_EVT_LE_META, params), None)

    def disconnect(self, conn: int, t: float, *, reason: int = 0x13) -> bytes:
        """Record a Disconnection Complete (default reason: remote user).

        The connection handle may then be reused by :meth:`connect`.
        """
        self._link(conn)
        us = _microseconds(t)
        del self._links[conn]
        params = _DISCONNECT.pack(0, conn, reason & 0xFF)
        return self._emit(
            us, RECEIVED, _event(_EVT_DISCONNECTION_COMPLETE, params), None
        )

    # --- ATT -------------------------------------------------------------

    def mtu(
        self, conn: int, client_mtu: int, t: float, *, server_mtu: int | None = None
    ) -> bytes:
        """Record an Exchange MTU request and response.

        The connection's MTU becomes ``min(client_mtu, server_mtu)``
        (``server_mtu`` defaults to ``client_mtu``); it bounds discovery PDUs.
        """
        server = client_mtu if server_mtu is None else server_mtu
        if not 23 <= client_mtu <= 0xFFFF or not 23 <= server <= 0xFFFF:
            raise LocalProtocolError("an ATT MTU is 23..65535")
        link = self._link(conn)
        us = _microseconds(t)
        out = self._att(
            conn, us, SENT, _MTU.pack(AttOpcode.EXCHANGE_MTU_REQ, client_mtu)
        )
        out += self._att(
            conn, us, RECEIVED, _MTU.pack(AttOpcode.EXCHANGE_MTU_RSP, server)
        )
        link.mtu = min(client_mtu, server)
        return out

    def discover(self, conn: int, t: float) -> bytes:
        """Record a full discovery of the service table.

        Read By Group Type (primary services), Read By Type (characteristic
        declarations) per service and Find Information (CCCDs), each search
        ended by an *Attribute Not Found* error response, as a client does.
        PDUs respect the connection's MTU.
        """
        link = self._link(conn)
        us = _microseconds(t)
        mtu = link.mtu
        out = bytearray()
        services = self._handles.services
        entries = [
            (s.start, _U16.pack(s.start) + _U16.pack(s.end) + uuid_to_le(s.uuid))
            for s in services
        ]
        out += self._search(
            conn, us, AttOpcode.READ_BY_GROUP_TYPE_REQ, 0x0001, 0xFFFF,
            UUID_PRIMARY_SERVICE, entries, [s.end for s in services], mtu,
        )  # fmt: skip
        for service in services:
            chars = service.characteristics
            entries = [
                (
                    c.declaration,
                    _U16.pack(c.declaration)
                    + bytes([c.properties & 0xFF])
                    + _U16.pack(c.value)
                    + uuid_to_le(c.uuid),
                )
                for c in chars
            ]
            out += self._search(
                conn, us, AttOpcode.READ_BY_TYPE_REQ, service.start, service.end,
                UUID_CHARACTERISTIC, entries, [c.value for c in chars], mtu,
            )  # fmt: skip
            for char in chars:
                if char.cccd is None:
                    continue
                req = _RANGE_TYPE.pack(
                    AttOpcode.FIND_INFORMATION_REQ, char.value + 1, char.cccd, 0
                )[:5]
                out += self._att(conn, us, SENT, req)
                rsp = bytes([AttOpcode.FIND_INFORMATION_RSP, 0x01])
                rsp += _U16.pack(char.cccd) + _U16.pack(UUID_CCCD)
                out += self._att(conn, us, RECEIVED, rsp)
        return bytes(out)

    def subscribe(
        self, conn: int, target: str | int, t: float, *, indicate: bool = False
    ) -> bytes:
        """Record a CCCD write (notifications or indications on) and its response."""
        char = self._handles.characteristic(target)
        if char.cccd is None:
            raise LocalProtocolError("that characteristic cannot notify or indicate")
        return self.att_write_req(
            conn, char.cccd, b"\x02\x00" if indicate else b"\x01\x00", t
        )

    def att_write_cmd(
        self,
        conn: int,
        target: str | int,
        value: bytes,
        t: float,
        *,
        comment: str | None = None,
    ) -> bytes:
        """Record a Write Command (``write_gatt_char(response=False)``).

        Args:
            conn: the connection handle given to :meth:`connect`.
            target: characteristic UUID, or a raw ATT handle.
            value: the bytes written.
            t: seconds.
            comment: packet comment (e.g. the frame decoded, for --plaintext).
        """
        handle = self._handles.value_handle(target)
        return self._handle_value(
            conn, t, SENT, AttOpcode.WRITE_CMD, handle, value, comment
        )

    def att_write_req(
        self,
        conn: int,
        target: str | int,
        value: bytes,
        t: float,
        *,
        comment: str | None = None,
    ) -> bytes:
        """Record a Write Request and its Write Response."""
        handle = self._handles.value_handle(target)
        out = self._handle_value(
            conn, t, SENT, AttOpcode.WRITE_REQ, handle, value, comment
        )
        return out + self._att(
            conn, _microseconds(t), RECEIVED, bytes([AttOpcode.WRITE_RSP])
        )

    def att_notify(
        self,
        conn: int,
        target: str | int,
        value: bytes,
        t: float,
        *,
        comment: str | None = None,
    ) -> bytes:
        """Record a Handle Value Notification from the glasses."""
        handle = self._handles.value_handle(target)
        return self._handle_value(
            conn, t, RECEIVED, AttOpcode.HANDLE_VALUE_NTF, handle, value, comment
        )

    def att_indicate(
        self,
        conn: int,
        target: str | int,
        value: bytes,
        t: float,
        *,
        comment: str | None = None,
    ) -> bytes:
        """Record a Handle Value Indication and this host's confirmation."""
        handle = self._handles.value_handle(target)
        out = self._handle_value(
            conn, t, RECEIVED, AttOpcode.HANDLE_VALUE_IND, handle, value, comment
        )
        cfm = bytes([AttOpcode.HANDLE_VALUE_CFM])
        return out + self._att(conn, _microseconds(t), SENT, cfm)

    def att_read(
        self,
        conn: int,
        target: str | int,
        value: bytes,
        t: float,
        *,
        comment: str | None = None,
    ) -> bytes:
        """Record a Read Request and the Read Response carrying ``value``."""
        handle = self._handles.value_handle(target)
        us = _microseconds(t)
        out = self._att(conn, us, SENT, _HANDLE_VALUE.pack(AttOpcode.READ_REQ, handle))
        rsp = bytes([AttOpcode.READ_RSP]) + value
        return out + self._att(conn, us, RECEIVED, rsp, comment)

    # --- internals -------------------------------------------------------

    def _check_keep(self) -> None:
        if not self._keep:
            raise LocalProtocolError("this writer was made with keep=False")

    def _link(self, conn: int) -> _Link:
        link = self._links.get(conn)
        if link is None:
            raise LocalProtocolError(f"connection 0x{conn:03x} is not open")
        return link

    def _handle_value(
        self,
        conn: int,
        t: float,
        direction: int,
        opcode: int,
        handle: int,
        value: bytes,
        comment: str | None,
    ) -> bytes:
        pdu = _HANDLE_VALUE.pack(opcode, handle) + bytes(value)
        return self._att(conn, _microseconds(t), direction, pdu, comment)

    def _search(
        self,
        conn: int,
        us: int,
        req_opcode: int,
        start: int,
        end: int,
        type_uuid: int,
        entries: list[tuple[int, bytes]],
        last_handles: list[int],
        mtu: int,
    ) -> bytes:
        """A Read By (Group) Type search: requests, responses, final error."""
        rsp_opcode = req_opcode + 1
        out = bytearray()
        i = 0
        while True:
            out += self._att(
                conn, us, SENT, _RANGE_TYPE.pack(req_opcode, start, end, type_uuid)
            )
            if i >= len(entries):
                err = _ERROR_RSP.pack(
                    AttOpcode.ERROR_RSP, req_opcode, start, _ERR_ATTRIBUTE_NOT_FOUND
                )
                out += self._att(conn, us, RECEIVED, err)
                return bytes(out)
            size = len(entries[i][1])
            chunk = [entries[i][1]]
            j = i + 1
            while (
                j < len(entries)
                and len(entries[j][1]) == size
                and 2 + size * (len(chunk) + 1) <= mtu
            ):
                chunk.append(entries[j][1])
                j += 1
            rsp = bytes([rsp_opcode, size]) + b"".join(chunk)
            out += self._att(conn, us, RECEIVED, rsp)
            start = last_handles[j - 1] + 1
            i = j
            if start > end:
                return bytes(out)

    def _att(
        self, conn: int, us: int, direction: int, pdu: bytes, comment: str | None = None
    ) -> bytes:
        self._link(conn)
        if len(pdu) > _MAX_L2CAP_PAYLOAD:
            raise LocalProtocolError("an ATT PDU must fit one L2CAP PDU (65535 bytes)")
        l2cap = _L2CAP.pack(len(pdu), ATT_CID) + pdu
        first = _PB_FIRST_NON_FLUSHABLE if direction == SENT else _PB_FIRST_FLUSHABLE
        size = self._max_acl or len(l2cap)
        out = bytearray()
        for offset in range(0, len(l2cap), size):
            piece = l2cap[offset : offset + size]
            pb = first if offset == 0 else _PB_CONTINUING
            h4 = bytes([_H4_ACL]) + _ACL.pack(conn | pb << 12, len(piece)) + piece
            out += self._emit(us, direction, h4, comment if offset == 0 else None)
        return bytes(out)

    def _emit(self, us: int, direction: int, h4: bytes, comment: str | None) -> bytes:
        frame = _Frame(us, direction, h4, comment)
        if self._keep:
            self._frames.append(frame)
        return self._epb(frame)

    @staticmethod
    def _epb(frame: _Frame) -> bytes:
        return encode_pcapng_epb(
            frame.timestamp_us,
            _PHDR.pack(frame.direction) + frame.h4,
            comment=frame.comment,
        )


def _event(code: int, params: bytes) -> bytes:
    return bytes([_H4_EVENT, code, len(params)]) + params
