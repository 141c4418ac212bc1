"""Over-the-air packets from the nRF Sniffer (LINKTYPE_NORDIC_BLE, 272).

Best effort, read-only (../shared/design/CAPTURE-FORMATS.md §2, §4). Layout
(Wireshark ``packet-nordic_ble.c``): board id (1); then either the legacy
``BE EF`` marker (unsupported here) or header version 1 (header length u8,
payload length u8) / version >= 2 (payload length u16 LE), followed by
protocol version (1), packet counter (2) and packet id (1); for packet ids
0x02 (advertising) and 0x06 (data) an event header: its length (1, normally
10), flags, channel, RSSI, event counter (2), time (4); then the link-layer
packet: access address (4, LE), PDU header (2), payload, CRC (3).

Data-packet flags: bit 0 CRC OK, bit 1 central to peripheral, bit 2
encrypted, bit 3 MIC OK.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["ADVERTISING_ACCESS_ADDRESS", "AirPacket", "decode_nordic"]

ADVERTISING_ACCESS_ADDRESS: Final = 0x8E89BED6
"""The access address of every advertising-channel packet."""

_U32: Final = struct.Struct("<I")
_BOARD_HEADER: Final = 7
_MIN_EVENT_HEADER: Final = 10
_PACKET_IDS: Final = frozenset((0x02, 0x06))


@dataclass(frozen=True, slots=True)
class AirPacket:
    """One link-layer packet as the sniffer saw it.

    Attributes:
        access_address: the connection's (or the advertising) access address.
        crc_ok: the sniffer checked the CRC and it matched.
        encrypted: the link was encrypted.
        mic_ok: the sniffer decrypted the packet and its MIC matched: the
            payload is plaintext followed by the 4-byte MIC.
        central_to_peripheral: direction, for data packets.
        header: the two PDU header bytes.
        payload: the PDU payload (CRC removed), as many bytes as were stored.
        length: the payload length the PDU header declares.
    """

    access_address: int
    crc_ok: bool
    encrypted: bool
    mic_ok: bool
    central_to_peripheral: bool
    header: bytes
    payload: bytes
    length: int

    @property
    def advertising(self) -> bool:
        """Whether this is an advertising-channel packet."""
        return self.access_address == ADVERTISING_ACCESS_ADDRESS


def decode_nordic(data: bytes) -> AirPacket | None:
    """Decode one LINKTYPE_NORDIC_BLE packet.

    Returns:
        The link-layer packet, or ``None`` for sniffer messages that carry
        none (follow, ping, legacy format) and for packets too short to hold
        an access address and a PDU header. Never raises.
    """
    if len(data) < _BOARD_HEADER + 1 or data[1:3] == b"\xbe\xef":
        return None
    if data[6] not in _PACKET_IDS:
        return None
    event_len = data[_BOARD_HEADER]
    if event_len < _MIN_EVENT_HEADER:
        return None
    ll = _BOARD_HEADER + event_len
    if len(data) < ll + 6:
        return None
    flags = data[_BOARD_HEADER + 1]
    (access_address,) = _U32.unpack_from(data, ll)
    header = data[ll + 4 : ll + 6]
    length = header[1]
    payload = data[ll + 6 : ll + 6 + length]
    return AirPacket(
        access_address=access_address,
        crc_ok=bool(flags & 0x01),
        encrypted=bool(flags & 0x04),
        mic_ok=bool(flags & 0x08),
        central_to_peripheral=bool(flags & 0x02),
        header=header,
        payload=payload,
        length=length,
    )
