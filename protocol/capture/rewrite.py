"""Rewrite captures: redact one for sharing, or turn pcapng into btsnoop.

Sans-I/O: bytes in, bytes out. ../shared/design/CAPTURE-FORMATS.md §8.5
sets the redaction rules:

- **Addresses** (BD_ADDR) are pseudonymised consistently: one address
  always becomes the same pseudonym within a file (HMAC-SHA256 under a key
  the caller picks, e.g. a fresh random one per file), a random static
  address (top bits ``11``). Device names in advertising data and remote
  name events become ``dev-`` and a pseudonym of the same length.
- **Keys** are cut out, the packet kept up to the field that carries them:
  SMP Pairing Confirm/Random (legacy pairing lets them reveal the key),
  Encryption Information (LTK), Central Identification (EDIV/Rand),
  Identity Information (IRK), Signing Information (CSRK) and DHKey Check;
  the HCI commands LE Enable Encryption, LE Long Term Key Request Reply, Link
  Key Request Reply, LE Add Device To Resolving List, and the events Link Key
  Notification and LE Long Term Key Request.
- **Values**: with ``truncate=N`` every ATT attribute value keeps its first
  N bytes.
- **Comments** are dropped (``--plaintext`` comments carry messages, a
  user's comments may name anything); the section comment says the file was
  redacted and how.

A packet cut short keeps its true ``orig_len``; its ``incl_len`` is what was
kept, as Android's filtered snoop logs do. When the cut PDU is whole in one
ACL packet, its ACL and L2CAP length fields are set to what is kept, so
Wireshark decodes the rest without "length" warnings.

Link types: 201 (H4 with direction), 187 (H4) and btsnoop 1002 (H4) are
rewritten; a file with any other link type raises :class:`CaptureError`, since
its addresses and keys could not be found.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from typing import Final

from protocol.capture.containers import (
    DLT_BTSNOOP_H4,
    LINKTYPE_BLUETOOTH_HCI_H4,
    LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
    CaptureFormat,
    Packet,
    encode_btsnoop,
    encode_pcapng_epb,
    encode_pcapng_idb,
    encode_pcapng_shb,
    read_packets,
)
from protocol.capture.errors import CaptureError

__all__ = ["Pseudonyms", "RedactStats", "pcapng_to_btsnoop", "redact"]

REDACTED_NOTE: Final = (
    "Redacted by glasses-relay: addresses pseudonymised, keys removed"
)

_H4_COMMAND: Final = 0x01
_H4_ACL: Final = 0x02
_H4_EVENT: Final = 0x04
_SMP_CIDS: Final = frozenset((0x0006, 0x0007))
_ATT_CID: Final = 0x0004
_SMP_CUT: Final = frozenset((0x03, 0x04, 0x06, 0x07, 0x08, 0x0A, 0x0D))
"""SMP codes whose parameters are (or reveal) keys: cut after the code."""
_SMP_IDENTITY_ADDRESS: Final = 0x09
_ATT_VALUE_AT: Final = {
    0x0B: 1,  # Read Response
    0x0D: 1,  # Read Blob Response
    0x12: 3,  # Write Request
    0x16: 5,  # Prepare Write Request
    0x17: 5,  # Prepare Write Response
    0x1B: 3,  # Handle Value Notification
    0x1D: 3,  # Handle Value Indication
    0x52: 3,  # Write Command
    0xD2: 3,  # Signed Write Command
}
"""ATT opcode -> offset of the attribute value in the PDU."""

# HCI commands: opcode -> (address offsets in the parameters, keep this many
# parameter bytes or None for all).
_COMMANDS: Final[dict[int, tuple[tuple[int, ...], int | None]]] = {
    0x0405: ((0,), None),  # Create Connection
    0x0409: ((0,), None),  # Accept Connection Request
    0x040A: ((0,), None),  # Reject Connection Request
    0x040B: ((0,), 6),  # Link Key Request Reply: address, then the key
    0x040C: ((0,), None),  # Link Key Request Negative Reply
    0x0419: ((0,), None),  # Remote Name Request
    0x2005: ((0,), None),  # LE Set Random Address
    0x200D: ((6,), None),  # LE Create Connection
    0x2011: ((1,), None),  # LE Add Device To Filter Accept List
    0x2012: ((1,), None),  # LE Remove Device From Filter Accept List
    0x2019: ((), 2),  # LE Enable Encryption: handle, then Rand, EDIV, LTK
    0x201A: ((), 2),  # LE Long Term Key Request Reply: handle, then LTK
    0x2027: ((1,), 7),  # LE Add Device To Resolving List: address, then IRKs
    0x2028: ((1,), None),  # LE Remove Device From Resolving List
    0x2043: ((3,), None),  # LE Extended Create Connection
}
# HCI events: code -> (address offsets in the parameters, keep or None).
_EVENTS: Final[dict[int, tuple[tuple[int, ...], int | None]]] = {
    0x03: ((3,), None),  # Connection Complete
    0x04: ((0,), None),  # Connection Request
    0x07: ((1,), None),  # Remote Name Request Complete (the name: below)
    0x16: ((0,), None),  # PIN Code Request
    0x17: ((0,), None),  # Link Key Request
    0x18: ((0,), 6),  # Link Key Notification: address, then the key
}
# LE meta subevents: code -> (address offsets after the subevent byte, keep).
_LE_EVENTS: Final[dict[int, tuple[tuple[int, ...], int | None]]] = {
    0x01: ((5,), None),  # LE Connection Complete
    0x05: ((), 2),  # LE Long Term Key Request: handle, then Rand, EDIV
    0x0A: ((5, 11, 17), None),  # LE Enhanced Connection Complete
    0x29: ((5, 11, 17), None),  # LE Enhanced Connection Complete v2
}
_EVT_LE_META: Final = 0x3E
_EVT_COMMAND_COMPLETE: Final = 0x0E
_EVT_REMOTE_NAME: Final = 0x07
_LE_ADVERTISING_REPORT: Final = 0x02
_LE_EXTENDED_ADVERTISING_REPORT: Final = 0x0D
_READ_BD_ADDR: Final = 0x1009
_AD_NAMES: Final = frozenset((0x08, 0x09))
_PHDR: Final = struct.Struct(">I")


class Pseudonyms:
    """Consistent pseudonyms under one key (never stored in the output)."""

    __slots__ = ("_key", "addresses")

    def __init__(self, key: bytes) -> None:
        """Pseudonymise under ``key`` (a fresh random key per file is best)."""
        if len(key) < 16:
            raise ValueError("a pseudonym key needs at least 16 bytes")
        self._key = key
        self.addresses: set[bytes] = set()
        """Original addresses seen (HCI byte order), for the statistics."""

    def _mac(self, kind: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, kind + data, hashlib.sha256).digest()

    def address(self, hci: bytes) -> bytes:
        """The pseudonym of a 6-byte address in HCI (little-endian) order."""
        if hci in (bytes(6), b"\xff" * 6):
            return hci  # "none" and "any" say nothing about a device
        self.addresses.add(hci)
        digest = self._mac(b"addr", hci)
        return digest[:5] + bytes([digest[5] | 0xC0])

    def text(self, address: str) -> str:
        """The pseudonym of ``AA:BB:CC:DD:EE:FF`` in the same notation."""
        hci = bytes(int(p, 16) for p in reversed(address.split(":")))
        return ":".join(f"{b:02X}" for b in reversed(self.address(hci)))

    def name(self, name: bytes) -> bytes:
        """A pseudonym of the same length for a device name."""
        if not name.strip(b"\x00"):
            return name
        token = b"dev-" + self._mac(b"name", name.rstrip(b"\x00")).hex().encode()
        return (token * (len(name) // len(token) + 1))[: len(name)]


@dataclass(slots=True)
class RedactStats:
    """What :func:`redact` changed."""

    packets: int = 0
    addresses: int = 0
    """Distinct original addresses pseudonymised."""
    keys_removed: int = 0
    """Packets whose key material was cut out (HCI commands, events, SMP)."""
    values_truncated: int = 0
    comments_dropped: int = 0
    linktypes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Cut:
    """Per connection and direction: the rest of this L2CAP PDU is cut."""

    remaining: int
    keep: int


class _Redactor:
    def __init__(self, pseudonyms: Pseudonyms, truncate: int | None) -> None:
        self.names = pseudonyms
        self.truncate = truncate
        self.stats = RedactStats()
        self._cuts: dict[tuple[int, int], _Cut] = {}

    def h4(self, data: bytes, direction: int) -> bytes:
        """Redact one H4 packet; return the bytes kept."""
        if not data:
            return data
        kind = data[0]
        body = bytearray(data[1:])
        if kind == _H4_COMMAND:
            keep = self._command(body)
        elif kind == _H4_EVENT:
            keep = self._event(body)
        elif kind == _H4_ACL:
            keep = self._acl(body, direction)
        else:
            return data
        if keep is not None:
            del body[keep:]
        return bytes([kind]) + bytes(body)

    def _key_cut(self, keep: int | None, at: int) -> int | None:
        """Keep ``at + keep`` bytes (a key follows), or all if ``keep`` is None."""
        if keep is None:
            return None
        self.stats.keys_removed += 1
        return at + keep

    def _addresses(self, buf: bytearray, offsets: tuple[int, ...], base: int) -> None:
        for offset in offsets:
            at = base + offset
            if at + 6 <= len(buf):
                buf[at : at + 6] = self.names.address(bytes(buf[at : at + 6]))

    def _command(self, body: bytearray) -> int | None:
        if len(body) < 3:
            return None
        opcode = int.from_bytes(body[:2], "little")
        rule = _COMMANDS.get(opcode)
        if rule is None:
            return None
        offsets, keep = rule
        self._addresses(body, offsets, 3)
        return self._key_cut(keep, 3)

    def _event(self, body: bytearray) -> int | None:
        if len(body) < 2:
            return None
        code = body[0]
        if code == _EVT_LE_META and len(body) >= 3:
            sub = body[2]
            if sub == _LE_ADVERTISING_REPORT:
                self._advertising(body, 3, legacy=True)
                return None
            if sub == _LE_EXTENDED_ADVERTISING_REPORT:
                self._advertising(body, 3, legacy=False)
                return None
            rule = _LE_EVENTS.get(sub)
            if rule is None:
                return None
            offsets, keep = rule
            self._addresses(body, offsets, 3)
            return self._key_cut(keep, 3)
        if code == _EVT_COMMAND_COMPLETE and len(body) >= 12:
            if int.from_bytes(body[3:5], "little") == _READ_BD_ADDR:
                self._addresses(body, (4,), 2)
            return None
        rule = _EVENTS.get(code)
        if rule is None:
            return None
        offsets, keep = rule
        self._addresses(body, offsets, 2)
        if code == _EVT_REMOTE_NAME and len(body) > 9:
            body[9:] = self.names.name(bytes(body[9:]))
        return self._key_cut(keep, 2)

    def _advertising(self, body: bytearray, at: int, *, legacy: bool) -> None:
        """Addresses and names of the first report (one per event in practice)."""
        if len(body) <= at:
            return
        if legacy:
            address, length_at = at + 3, at + 9
            direct = None
        else:
            address, length_at = at + 4, at + 24
            direct = at + 18
        self._addresses(body, (address,) if direct is None else (address, direct), 0)
        if length_at < len(body):
            start = length_at + 1
            end = min(len(body), start + body[length_at])
            self._names_in_ad(body, start, end)

    def _names_in_ad(self, body: bytearray, start: int, end: int) -> None:
        pos = start
        while pos < end:
            size = body[pos]
            if size == 0 or pos + 1 + size > end:
                return
            if body[pos + 1] in _AD_NAMES:
                name = bytes(body[pos + 2 : pos + 1 + size])
                body[pos + 2 : pos + 1 + size] = self.names.name(name)
            pos += 1 + size

    def _acl(self, body: bytearray, direction: int) -> int | None:
        if len(body) < 4:
            return None
        header = int.from_bytes(body[:2], "little")
        handle = header & 0x0FFF
        continuing = (header >> 12) & 0b11 == 0b01
        key = (handle, direction)
        payload = len(body) - 4
        if continuing:
            cut = self._cuts.get(key)
            if cut is None:
                return None
            kept = max(0, min(payload, cut.keep))
            cut.keep -= kept
            cut.remaining -= payload
            if cut.remaining <= 0:
                del self._cuts[key]
            return 4 + kept
        self._cuts.pop(key, None)
        if payload < 5:
            return None
        length = int.from_bytes(body[4:6], "little")
        cid = int.from_bytes(body[6:8], "little")
        keep = None
        if cid in _SMP_CIDS:
            code = body[8]
            if code in _SMP_CUT:
                keep = 1
                self.stats.keys_removed += 1
            elif code == _SMP_IDENTITY_ADDRESS:
                self._addresses(body, (10,), 0)
        elif cid == _ATT_CID and self.truncate is not None:
            at = _ATT_VALUE_AT.get(body[8])
            if at is not None and length > at + self.truncate:
                keep = at + self.truncate
                self.stats.values_truncated += 1
        if keep is None:
            return None
        if length > payload - 4:
            # The PDU goes on in continuation fragments: cut those too.
            self._cuts[key] = _Cut(length - (payload - 4), max(0, keep - (payload - 4)))
            return 8 + min(keep, payload - 4)
        # A whole PDU: the ACL and L2CAP lengths say what is kept, so the rest
        # decodes cleanly; the frame's original length stays the true one.
        body[2:4] = (4 + keep).to_bytes(2, "little")
        body[4:6] = keep.to_bytes(2, "little")
        return 8 + keep


def redact(data: bytes, *, key: bytes, truncate: int | None = None) -> bytes:
    """Return a redacted copy of a capture (pcapng out, btsnoop in gives btsnoop).

    Args:
        data: a btsnoop (1002), pcap or pcapng (187, 201) capture.
        key: the pseudonym key (at least 16 bytes; not written anywhere).
        truncate: keep this many bytes of every ATT value; None: all.

    Raises:
        CaptureError: not a capture, or a link type that cannot be redacted.
        ValueError: ``key`` too short or ``truncate`` negative.
    """
    return redact_with_stats(data, key=key, truncate=truncate)[0]


def redact_with_stats(
    data: bytes, *, key: bytes, truncate: int | None = None
) -> tuple[bytes, RedactStats]:
    """:func:`redact`, also returning what changed."""
    if truncate is not None and truncate < 0:
        raise ValueError("truncate must be 0 or more")
    pf = read_packets(data)
    supported = (
        LINKTYPE_BLUETOOTH_HCI_H4,
        LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
        DLT_BTSNOOP_H4,
    )
    for linktype in pf.linktypes:
        if linktype not in supported:
            raise CaptureError(f"cannot redact link type {linktype}")
    redactor = _Redactor(Pseudonyms(key), truncate)
    stats = redactor.stats
    stats.linktypes = list(pf.linktypes)
    note = REDACTED_NOTE
    if truncate is not None:
        note += f", ATT values cut to {truncate} bytes"
    out: list[tuple[Packet, bytes]] = []
    for packet in pf.packets:
        raw = packet.data
        if packet.linktype == LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR:
            if len(raw) < 4:
                out.append((packet, raw))
                continue
            direction = _PHDR.unpack_from(raw)[0] & 1
            kept = raw[:4] + redactor.h4(raw[4:], direction)
        elif packet.linktype == DLT_BTSNOOP_H4:
            kept = redactor.h4(raw, packet.flags & 1)
        else:
            kept = redactor.h4(raw, 2)
        stats.comments_dropped += packet.comment is not None
        out.append((packet, kept))
    stats.packets = len(out)
    stats.addresses = len(redactor.names.addresses)
    if pf.format is CaptureFormat.BTSNOOP:
        records = [
            (p.timestamp_ns // 1000, p.flags, kept, p.orig_len) for p, kept in out
        ]
        return encode_btsnoop(pf.linktype, records), stats
    # Section and interface comments are not copied: a user's may name anything.
    blocks = [encode_pcapng_shb(comment=note, application="glasses-relay")]
    interfaces = {lt: i for i, lt in enumerate(pf.linktypes)}
    blocks += [encode_pcapng_idb(lt, name="glasses-relay") for lt in pf.linktypes]
    for packet, kept in out:
        blocks.append(
            encode_pcapng_epb(
                packet.timestamp_ns // 1000,
                kept,
                interface=interfaces[packet.linktype],
                orig_len=packet.orig_len,
            )
        )
    return b"".join(blocks), stats


def pcapng_to_btsnoop(data: bytes) -> bytes:
    """Turn a LINKTYPE 201 pcapng (what sniff records) into btsnoop 1002.

    Flags: bit 0 the direction (1 received), bit 1 set for commands and
    events, as Android writes them; ``orig_len`` is kept.

    Raises:
        CaptureError: not a capture, or a link type other than 201.
    """
    pf = read_packets(data)
    if any(lt != LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR for lt in pf.linktypes):
        raise CaptureError("only LINKTYPE 201 (H4 with direction) converts to btsnoop")
    records: list[tuple[int, int, bytes, int]] = []
    for packet in pf.packets:
        raw = packet.data
        if len(raw) < 5:
            continue
        flags = _PHDR.unpack_from(raw)[0] & 1
        if raw[4] in (_H4_COMMAND, _H4_EVENT):
            flags |= 0b10
        records.append(
            (packet.timestamp_ns // 1000, flags, raw[4:], packet.orig_len - 4)
        )
    return encode_btsnoop(DLT_BTSNOOP_H4, records)
