"""Capture containers: btsnoop, pcap and pcapng, read and written as bytes.

This layer knows file framing only: it yields :class:`Packet` values (link
type, timestamp, bytes) and leaves HCI, L2CAP and ATT to
:mod:`protocol.capture.reader`. Formats (../shared/design/CAPTURE-FORMATS.md
§1-2):

- btsnoop v1, datalinks 1001 (H1), 1002 (H4) and 2001 (Linux monitor); all
  integers big-endian; timestamps in microseconds since "0000-01-01", i.e.
  Unix time plus :data:`BTSNOOP_EPOCH_DELTA_US`;
- pcap (micro- and nanosecond, either byte order) and pcapng (any number of
  sections and interfaces, ``if_tsresol``/``if_tsoffset``, EPB/SPB/PB blocks,
  packet comments).

The format is found from magic bytes, never from a file name. ``incl_len`` is
used, never ``orig_len``; a packet with fewer bytes than it had on the wire is
kept and reports :attr:`Packet.truncated`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocol.capture.errors import CaptureError

__all__ = [
    "BTSNOOP_EPOCH_DELTA_US",
    "DLT_BTSNOOP_H1",
    "DLT_BTSNOOP_H4",
    "DLT_BTSNOOP_MONITOR",
    "LINKTYPE_BLUETOOTH_HCI_H4",
    "LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR",
    "LINKTYPE_BLUETOOTH_LINUX_MONITOR",
    "LINKTYPE_NAMES",
    "LINKTYPE_NORDIC_BLE",
    "MAX_PACKET_SIZE",
    "CaptureFormat",
    "Packet",
    "PacketFile",
    "detect_format",
    "encode_btsnoop",
    "encode_pcapng_epb",
    "encode_pcapng_idb",
    "encode_pcapng_shb",
    "read_packets",
]

LINKTYPE_BLUETOOTH_HCI_H4: Final = 187
"""H4 type byte + HCI; no direction."""
LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR: Final = 201
"""u32 BE direction (0 sent, 1 received) + H4 type byte + HCI."""
LINKTYPE_BLUETOOTH_LINUX_MONITOR: Final = 254
"""u16 BE adapter + u16 BE monitor opcode + payload."""
LINKTYPE_NORDIC_BLE: Final = 272
"""nRF Sniffer header + over-the-air link-layer packet."""
DLT_BTSNOOP_H1: Final = 1001
"""btsnoop: HCI without the H4 type byte; kind and direction in the flags."""
DLT_BTSNOOP_H4: Final = 1002
"""btsnoop: H4 type byte + HCI (Android)."""
DLT_BTSNOOP_MONITOR: Final = 2001
"""btsnoop: Linux monitor (``btmon -w``); flags = adapter << 16 | opcode."""

LINKTYPE_NAMES: Final[dict[int, str]] = {
    LINKTYPE_BLUETOOTH_HCI_H4: "BLUETOOTH_HCI_H4",
    LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR: "BLUETOOTH_HCI_H4_WITH_PHDR",
    LINKTYPE_BLUETOOTH_LINUX_MONITOR: "BLUETOOTH_LINUX_MONITOR",
    LINKTYPE_NORDIC_BLE: "NORDIC_BLE",
    DLT_BTSNOOP_H1: "btsnoop HCI (H1)",
    DLT_BTSNOOP_H4: "btsnoop UART (H4)",
    DLT_BTSNOOP_MONITOR: "btsnoop Linux monitor",
}
"""Names of the link types (pcap) and datalinks (btsnoop) we read."""

BTSNOOP_EPOCH_DELTA_US: Final = 0x00DCDDB30F2F8000
"""btsnoop time minus Unix time, in µs (719,540 days; a magic constant)."""
MAX_PACKET_SIZE: Final = 262_144
"""Largest ``incl_len`` accepted (Wireshark's standard maximum); beyond: damage."""

_BTSNOOP_MAGIC: Final = b"btsnoop\x00"
_PCAPNG_SHB: Final = 0x0A0D0D0A
_PCAPNG_BOM: Final = 0x1A2B3C4D
_PCAP_MAGICS: Final[dict[bytes, tuple[str, int]]] = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
"""pcap magic -> (byte order, nanoseconds per fractional-second unit)."""

_BTSNOOP_HEADER: Final = struct.Struct(">8sII")
_BTSNOOP_RECORD: Final = struct.Struct(">IIIIq")
_PCAP_HEADERS: Final = {"<": struct.Struct("<IHHiIII"), ">": struct.Struct(">IHHiIII")}
_PCAP_RECORDS: Final = {"<": struct.Struct("<IIII"), ">": struct.Struct(">IIII")}
_U32S: Final = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_EPBS: Final = {"<": struct.Struct("<IIIII"), ">": struct.Struct(">IIIII")}
_PBS: Final = {"<": struct.Struct("<HHIIII"), ">": struct.Struct(">HHIIII")}
_IDBS: Final = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}
_OPTS: Final = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_I64S: Final = {"<": struct.Struct("<q"), ">": struct.Struct(">q")}
_SHB_BODY: Final = struct.Struct("<IHHq")
_LE_EPB: Final = struct.Struct("<IIIII")
_LE_OPT: Final = struct.Struct("<HH")

_BLOCK_IDB: Final = 1
_BLOCK_PB: Final = 2
_BLOCK_SPB: Final = 3
_BLOCK_EPB: Final = 6
_OPT_END: Final = 0
_OPT_COMMENT: Final = 1
_OPT_SHB_USERAPPL: Final = 4
_OPT_IF_NAME: Final = 2
_OPT_IF_TSRESOL: Final = 9
_OPT_IF_TSOFFSET: Final = 14
_NS: Final = 1_000_000_000


class CaptureFormat(enum.StrEnum):
    """Container formats, told apart by their magic bytes."""

    BTSNOOP = "btsnoop"
    PCAP = "pcap"
    PCAPNG = "pcapng"


@dataclass(frozen=True, slots=True)
class Packet:
    """One record of a capture file, framing removed.

    Attributes:
        index: position in the file, from 0 (tshark's frame number minus 1).
        linktype: pcap link type, or the btsnoop datalink (1001/1002/2001).
        timestamp_ns: nanoseconds in the file's own time base (Unix time
            for sane files; btsnoop converted with the standard delta). Use
            differences only: real logs carry odd epochs.
        data: the bytes stored (``incl_len`` of them).
        orig_len: length on the wire as the file claims it.
        flags: btsnoop record flags (direction, kind; adapter and opcode for
            2001); 0 for pcap and pcapng.
        comment: pcapng packet comment(s), joined by newlines.
    """

    index: int
    linktype: int
    timestamp_ns: int
    data: bytes
    orig_len: int
    flags: int = 0
    comment: str | None = None

    @property
    def truncated(self) -> bool:
        """Whether fewer bytes were stored than were on the wire."""
        return len(self.data) < self.orig_len


@dataclass(frozen=True, slots=True)
class PacketFile:
    """A whole capture at the container level.

    Attributes:
        format: the container.
        linktype: link type of the first interface (btsnoop: its datalink).
        linktypes: every distinct link type, in order of appearance (empty
            for a pcapng file without interfaces; ``linktype`` is then 0).
        packets: the records.
        comments: section and interface comments (pcapng), in file order.
        warnings: why reading stopped early or skipped something; empty
            for a clean file.
    """

    format: CaptureFormat
    linktype: int
    linktypes: tuple[int, ...]
    packets: tuple[Packet, ...]
    comments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def detect_format(data: bytes | bytearray | memoryview) -> CaptureFormat:
    """Name the container from its magic bytes.

    Raises:
        CaptureError: no known magic at the start of ``data``.
    """
    head = bytes(data[:8])
    if head == _BTSNOOP_MAGIC:
        return CaptureFormat.BTSNOOP
    if head[:4] in _PCAP_MAGICS:
        return CaptureFormat.PCAP
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == _PCAPNG_SHB:
        return CaptureFormat.PCAPNG
    if head.startswith(b"\x1f\x8b"):
        raise CaptureError("gzip-compressed file: decompress it first", offset=0)
    raise CaptureError("not a btsnoop, pcap or pcapng file (unknown magic)", offset=0)


class _Damage:
    """Collects why reading stopped; raises instead when strict."""

    __slots__ = ("strict", "warnings")

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.warnings: list[str] = []

    def note(self, msg: str, offset: int) -> None:
        if self.strict:
            raise CaptureError(msg, offset=offset)
        self.warnings.append(f"{msg} at byte {offset}")


def read_packets(
    data: bytes | bytearray | memoryview, *, strict: bool = False
) -> PacketFile:
    """Read every record of a btsnoop, pcap or pcapng file.

    Args:
        data: the whole file.
        strict: raise on damage after the header instead of stopping there
            with a warning.

    Returns:
        The packets read, with warnings if the file was cut short or damaged.

    Raises:
        CaptureError: unknown magic, unreadable or unsupported header
            (version, datalink), or any damage when ``strict``.
    """
    buf = bytes(data)
    fmt = detect_format(buf)
    damage = _Damage(strict)
    if fmt is CaptureFormat.BTSNOOP:
        return _read_btsnoop(buf, damage)
    if fmt is CaptureFormat.PCAP:
        return _read_pcap(buf, damage)
    return _read_pcapng(buf, damage)


def _read_btsnoop(buf: bytes, damage: _Damage) -> PacketFile:
    if len(buf) < _BTSNOOP_HEADER.size:
        raise CaptureError("btsnoop header cut short", offset=0)
    _, version, datalink = _BTSNOOP_HEADER.unpack_from(buf)
    if version != 1:
        raise CaptureError(f"btsnoop version {version} is not 1", offset=8)
    if datalink not in (DLT_BTSNOOP_H1, DLT_BTSNOOP_H4, DLT_BTSNOOP_MONITOR):
        raise CaptureError(f"btsnoop datalink {datalink} is not supported", offset=12)
    packets: list[Packet] = []
    pos = _BTSNOOP_HEADER.size
    end = len(buf)
    record = _BTSNOOP_RECORD
    while pos < end:
        if end - pos < record.size:
            damage.note("record header cut short", pos)
            break
        orig_len, incl_len, flags, _drops, ts = record.unpack_from(buf, pos)
        pos += record.size
        if incl_len > MAX_PACKET_SIZE:
            damage.note(f"record length {incl_len} is too large", pos - record.size)
            break
        if incl_len > end - pos:
            damage.note("record cut short", pos)
            break
        packets.append(
            Packet(
                len(packets),
                datalink,
                (ts - BTSNOOP_EPOCH_DELTA_US) * 1_000,
                buf[pos : pos + incl_len],
                orig_len,
                flags,
            )
        )
        pos += incl_len
    return PacketFile(
        CaptureFormat.BTSNOOP,
        datalink,
        (datalink,),
        tuple(packets),
        warnings=tuple(damage.warnings),
    )


def _read_pcap(buf: bytes, damage: _Damage) -> PacketFile:
    order, unit_ns = _PCAP_MAGICS[buf[:4]]
    header = _PCAP_HEADERS[order]
    if len(buf) < header.size:
        raise CaptureError("pcap header cut short", offset=0)
    _, major, _minor, _zone, _sigfigs, _snaplen, network = header.unpack_from(buf)
    if major != 2:
        raise CaptureError(f"pcap version {major} is not 2", offset=4)
    linktype = network & 0xFFFF
    record = _PCAP_RECORDS[order]
    packets: list[Packet] = []
    pos = header.size
    end = len(buf)
    while pos < end:
        if end - pos < record.size:
            damage.note("record header cut short", pos)
            break
        sec, frac, incl_len, orig_len = record.unpack_from(buf, pos)
        pos += record.size
        if incl_len > MAX_PACKET_SIZE:
            damage.note(f"record length {incl_len} is too large", pos - record.size)
            break
        if incl_len > end - pos:
            damage.note("record cut short", pos)
            break
        packets.append(
            Packet(
                len(packets),
                linktype,
                sec * _NS + frac * unit_ns,
                buf[pos : pos + incl_len],
                orig_len,
            )
        )
        pos += incl_len
    return PacketFile(
        CaptureFormat.PCAP,
        linktype,
        (linktype,),
        tuple(packets),
        warnings=tuple(damage.warnings),
    )


@dataclass(slots=True)
class _Interface:
    linktype: int
    snaplen: int
    units_per_s: int = 1_000_000
    offset_s: int = 0


def _options(body: bytes, start: int, order: str) -> list[tuple[int, bytes]]:
    """Parse pcapng options from ``start``; stop quietly at a malformed one."""
    opt = _OPTS[order]
    out: list[tuple[int, bytes]] = []
    pos = start
    end = len(body)
    while end - pos >= opt.size:
        code, length = opt.unpack_from(body, pos)
        pos += opt.size
        if code == _OPT_END or length > end - pos:
            break
        out.append((code, body[pos : pos + length]))
        pos += (length + 3) & ~3
    return out


def _comments(options: Iterable[tuple[int, bytes]]) -> list[str]:
    return [
        value.decode("utf-8", "replace").rstrip("\x00")
        for code, value in options
        if code == _OPT_COMMENT
    ]


def _interface(body: bytes, order: str) -> tuple[_Interface, list[str]]:
    linktype, _reserved, snaplen = _IDBS[order].unpack_from(body)
    iface = _Interface(linktype, snaplen)
    options = _options(body, _IDBS[order].size, order)
    for code, value in options:
        if code == _OPT_IF_TSRESOL and len(value) >= 1:
            exp = value[0] & 0x7F
            iface.units_per_s = 2**exp if value[0] & 0x80 else 10**exp
        elif code == _OPT_IF_TSOFFSET and len(value) >= 8:
            (iface.offset_s,) = _I64S[order].unpack_from(value)
    return iface, _comments(options)


def _read_pcapng(buf: bytes, damage: _Damage) -> PacketFile:
    packets: list[Packet] = []
    comments: list[str] = []
    linktypes: list[int] = []
    interfaces: list[_Interface] = []
    order = "<"
    pos = 0
    end = len(buf)
    while pos < end:
        if end - pos < 12:
            if pos == 0:
                raise CaptureError("pcapng section header cut short", offset=0)
            damage.note("block header cut short", pos)
            break
        if int.from_bytes(buf[pos : pos + 4], "little") == _PCAPNG_SHB:
            bom = buf[pos + 8 : pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                order = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                order = ">"
            elif pos == 0:
                raise CaptureError("bad pcapng byte-order magic", offset=8)
            else:
                damage.note("bad byte-order magic in a section header", pos)
                break
            interfaces = []
            btype = _PCAPNG_SHB
        else:
            (btype,) = _U32S[order].unpack_from(buf, pos)
        (length,) = _U32S[order].unpack_from(buf, pos + 4)
        problem = None
        if length < 12 or length % 4:
            problem = f"bad block length {length}"
        elif length > end - pos:
            problem = "block cut short"
        elif _U32S[order].unpack_from(buf, pos + length - 4)[0] != length:
            problem = "block lengths disagree"
        elif btype == _PCAPNG_SHB and length < 28:
            problem = "section header too short"
        if problem is not None:
            if pos == 0:
                raise CaptureError(f"pcapng section header: {problem}", offset=0)
            damage.note(problem, pos)
            break
        body = buf[pos + 8 : pos + length - 4]
        block_at = pos
        pos += length
        if btype == _PCAPNG_SHB:
            major = int.from_bytes(body[4:6], "little" if order == "<" else "big")
            if major != 1:
                if block_at == 0:
                    raise CaptureError(f"pcapng version {major} is not 1", offset=12)
                damage.note(f"pcapng version {major} is not 1", block_at)
                break
            comments += _comments(_options(body, 16, order))
        elif btype == _BLOCK_IDB:
            if len(body) < _IDBS[order].size:
                damage.note("interface block too short", block_at)
                continue
            iface, iface_comments = _interface(body, order)
            interfaces.append(iface)
            comments += iface_comments
            if iface.linktype not in linktypes:
                linktypes.append(iface.linktype)
        elif btype in (_BLOCK_EPB, _BLOCK_PB, _BLOCK_SPB):
            packet = _packet_block(btype, body, order, interfaces, len(packets))
            if isinstance(packet, str):
                damage.note(packet, block_at)
                continue
            if packet is not None:
                packets.append(packet)
    return PacketFile(
        CaptureFormat.PCAPNG,
        linktypes[0] if linktypes else 0,
        tuple(linktypes),
        tuple(packets),
        tuple(comments),
        tuple(damage.warnings),
    )


def _packet_block(
    btype: int, body: bytes, order: str, interfaces: list[_Interface], index: int
) -> Packet | str | None:
    """Decode an EPB, SPB or obsolete PB; return a damage note on error."""
    if btype == _BLOCK_SPB:
        if len(body) < 4:
            return "simple packet block too short"
        if not interfaces:
            return "packet before any interface"
        (orig_len,) = _U32S[order].unpack_from(body)
        iface = interfaces[0]
        caplen = min(orig_len, len(body) - 4)
        if iface.snaplen:
            caplen = min(caplen, iface.snaplen)
        if caplen > MAX_PACKET_SIZE:
            return f"packet length {caplen} is too large"
        return Packet(index, iface.linktype, 0, body[4 : 4 + caplen], orig_len)
    if btype == _BLOCK_EPB:
        fixed = _EPBS[order]
        if len(body) < fixed.size:
            return "packet block too short"
        iface_id, ts_hi, ts_lo, caplen, orig_len = fixed.unpack_from(body)
    else:
        fixed = _PBS[order]
        if len(body) < fixed.size:
            return "packet block too short"
        iface_id, _drops, ts_hi, ts_lo, caplen, orig_len = fixed.unpack_from(body)
    if iface_id >= len(interfaces):
        return f"packet on undeclared interface {iface_id}"
    if caplen > MAX_PACKET_SIZE:
        return f"packet length {caplen} is too large"
    if caplen > len(body) - fixed.size:
        return "packet data overruns its block"
    iface = interfaces[iface_id]
    start = fixed.size
    options = _options(body, start + ((caplen + 3) & ~3), order)
    notes = _comments(options)
    ts = (ts_hi << 32) | ts_lo
    return Packet(
        index,
        iface.linktype,
        ts * _NS // iface.units_per_s + iface.offset_s * _NS,
        body[start : start + caplen],
        orig_len,
        comment="\n".join(notes) if notes else None,
    )


# --- writing -------------------------------------------------------------


def _option(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return _LE_OPT.pack(code, len(value)) + value + b"\x00" * pad


def _with_options(options: list[bytes]) -> bytes:
    if not options:
        return b""
    return b"".join(options) + _LE_OPT.pack(_OPT_END, 0)


def _block(btype: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", btype, length) + body + struct.pack("<I", length)


def encode_pcapng_shb(*, comment: str | None = None, application: str = "") -> bytes:
    """Return a little-endian pcapng Section Header Block (version 1.0)."""
    options = []
    if comment:
        options.append(_option(_OPT_COMMENT, comment.encode()))
    if application:
        options.append(_option(_OPT_SHB_USERAPPL, application.encode()))
    body = _SHB_BODY.pack(_PCAPNG_BOM, 1, 0, -1) + _with_options(options)
    return _block(_PCAPNG_SHB, body)


def encode_pcapng_idb(
    linktype: int, *, name: str | None = None, comment: str | None = None
) -> bytes:
    """Return an Interface Description Block (microsecond timestamps)."""
    options = []
    if comment:
        options.append(_option(_OPT_COMMENT, comment.encode()))
    if name:
        options.append(_option(_OPT_IF_NAME, name.encode()))
    body = struct.pack("<HHI", linktype, 0, 0) + _with_options(options)
    return _block(_BLOCK_IDB, body)


def encode_pcapng_epb(
    timestamp_us: int,
    data: bytes,
    *,
    interface: int = 0,
    comment: str | None = None,
    orig_len: int | None = None,
) -> bytes:
    """Return an Enhanced Packet Block of ``data``.

    ``orig_len`` (default: ``len(data)``) is the packet's length on the wire
    when ``data`` keeps only its start (a truncated or redacted packet).
    """
    options = [_option(_OPT_COMMENT, comment.encode())] if comment else []
    fixed = _LE_EPB.pack(
        interface,
        (timestamp_us >> 32) & 0xFFFFFFFF,
        timestamp_us & 0xFFFFFFFF,
        len(data),
        max(len(data), len(data) if orig_len is None else orig_len),
    )
    body = fixed + data + b"\x00" * (-len(data) % 4) + _with_options(options)
    return _block(_BLOCK_EPB, body)


def encode_btsnoop(
    datalink: int,
    records: Iterable[tuple[int, int, bytes] | tuple[int, int, bytes, int]],
) -> bytes:
    """Return a btsnoop v1 file.

    Args:
        datalink: 1001, 1002 or 2001.
        records: ``(timestamp_us, flags, data)`` per record, Unix time, or
            ``(timestamp_us, flags, data, orig_len)`` for a record that keeps
            only the start of its packet.
    """
    out = [_BTSNOOP_HEADER.pack(_BTSNOOP_MAGIC, 1, datalink)]
    for record in records:
        timestamp_us, flags, data = record[0], record[1], record[2]
        orig_len = max(len(data), record[3] if len(record) == 4 else len(data))
        out.append(
            _BTSNOOP_RECORD.pack(
                orig_len, len(data), flags, 0, timestamp_us + BTSNOOP_EPOCH_DELTA_US
            )
        )
        out.append(data)
    return b"".join(out)
