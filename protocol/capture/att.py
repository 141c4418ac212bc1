"""ATT opcodes, their short names, and Bluetooth UUIDs as bytes and text.

Bluetooth Core Specification Vol 3 Part F §3.4. UUIDs are handled as
lower-case dashed 128-bit strings (as bleak normalises them); 16-bit UUIDs
expand with the Bluetooth base UUID. On the wire a UUID is little-endian.
"""

from __future__ import annotations

import enum
from typing import Final

from protocol.errors import LocalProtocolError

__all__ = [
    "ATT_CID",
    "BASE_UUID_SUFFIX",
    "UUID_CCCD",
    "UUID_CHARACTERISTIC",
    "UUID_PRIMARY_SERVICE",
    "UUID_SECONDARY_SERVICE",
    "AttOpcode",
    "normalize_uuid",
    "opcode_name",
    "short_uuid",
    "uuid_from_le",
    "uuid_to_le",
]

ATT_CID: Final = 0x0004
"""The fixed L2CAP channel of ATT on LE."""
BASE_UUID_SUFFIX: Final = "-0000-1000-8000-00805f9b34fb"
"""The Bluetooth base UUID after its first 8 hex digits."""

UUID_PRIMARY_SERVICE: Final = 0x2800
UUID_SECONDARY_SERVICE: Final = 0x2801
UUID_CHARACTERISTIC: Final = 0x2803
UUID_CCCD: Final = 0x2902
"""Client Characteristic Configuration Descriptor."""

_HEX: Final = frozenset("0123456789abcdef")


class AttOpcode(enum.IntEnum):
    """ATT PDU opcodes (Core Vol 3 Part F §3.4.8)."""

    ERROR_RSP = 0x01
    EXCHANGE_MTU_REQ = 0x02
    EXCHANGE_MTU_RSP = 0x03
    FIND_INFORMATION_REQ = 0x04
    FIND_INFORMATION_RSP = 0x05
    FIND_BY_TYPE_VALUE_REQ = 0x06
    FIND_BY_TYPE_VALUE_RSP = 0x07
    READ_BY_TYPE_REQ = 0x08
    READ_BY_TYPE_RSP = 0x09
    READ_REQ = 0x0A
    READ_RSP = 0x0B
    READ_BLOB_REQ = 0x0C
    READ_BLOB_RSP = 0x0D
    READ_MULTIPLE_REQ = 0x0E
    READ_MULTIPLE_RSP = 0x0F
    READ_BY_GROUP_TYPE_REQ = 0x10
    READ_BY_GROUP_TYPE_RSP = 0x11
    WRITE_REQ = 0x12
    WRITE_RSP = 0x13
    PREPARE_WRITE_REQ = 0x16
    PREPARE_WRITE_RSP = 0x17
    EXECUTE_WRITE_REQ = 0x18
    EXECUTE_WRITE_RSP = 0x19
    READ_MULTIPLE_VARIABLE_REQ = 0x20
    READ_MULTIPLE_VARIABLE_RSP = 0x21
    MULTIPLE_HANDLE_VALUE_NTF = 0x23
    HANDLE_VALUE_NTF = 0x1B
    HANDLE_VALUE_IND = 0x1D
    HANDLE_VALUE_CFM = 0x1E
    WRITE_CMD = 0x52
    SIGNED_WRITE_CMD = 0xD2


_NAMES: Final[dict[int, str]] = {
    AttOpcode.ERROR_RSP: "error_rsp",
    AttOpcode.EXCHANGE_MTU_REQ: "mtu_req",
    AttOpcode.EXCHANGE_MTU_RSP: "mtu_rsp",
    AttOpcode.FIND_INFORMATION_REQ: "find_info_req",
    AttOpcode.FIND_INFORMATION_RSP: "find_info_rsp",
    AttOpcode.FIND_BY_TYPE_VALUE_REQ: "find_by_type_value_req",
    AttOpcode.FIND_BY_TYPE_VALUE_RSP: "find_by_type_value_rsp",
    AttOpcode.READ_BY_TYPE_REQ: "read_by_type_req",
    AttOpcode.READ_BY_TYPE_RSP: "read_by_type_rsp",
    AttOpcode.READ_REQ: "read_req",
    AttOpcode.READ_RSP: "read_rsp",
    AttOpcode.READ_BLOB_REQ: "read_blob_req",
    AttOpcode.READ_BLOB_RSP: "read_blob_rsp",
    AttOpcode.READ_MULTIPLE_REQ: "read_multiple_req",
    AttOpcode.READ_MULTIPLE_RSP: "read_multiple_rsp",
    AttOpcode.READ_BY_GROUP_TYPE_REQ: "read_by_group_type_req",
    AttOpcode.READ_BY_GROUP_TYPE_RSP: "read_by_group_type_rsp",
    AttOpcode.WRITE_REQ: "write_req",
    AttOpcode.WRITE_RSP: "write_rsp",
    AttOpcode.PREPARE_WRITE_REQ: "prepare_write_req",
    AttOpcode.PREPARE_WRITE_RSP: "prepare_write_rsp",
    AttOpcode.EXECUTE_WRITE_REQ: "execute_write_req",
    AttOpcode.EXECUTE_WRITE_RSP: "execute_write_rsp",
    AttOpcode.READ_MULTIPLE_VARIABLE_REQ: "read_multiple_variable_req",
    AttOpcode.READ_MULTIPLE_VARIABLE_RSP: "read_multiple_variable_rsp",
    AttOpcode.MULTIPLE_HANDLE_VALUE_NTF: "multiple_notify",
    AttOpcode.HANDLE_VALUE_NTF: "notify",
    AttOpcode.HANDLE_VALUE_IND: "indicate",
    AttOpcode.HANDLE_VALUE_CFM: "confirm",
    AttOpcode.WRITE_CMD: "write_cmd",
    AttOpcode.SIGNED_WRITE_CMD: "signed_write_cmd",
}


def opcode_name(opcode: int) -> str:
    """Return the short name (``notify``, ``write_cmd``) or ``0xNN``."""
    return _NAMES.get(opcode, f"0x{opcode:02x}")


def normalize_uuid(uuid: str | int) -> str:
    """Return ``uuid`` as a lower-case dashed 128-bit string.

    Accepts a 16- or 32-bit value (int, ``"2902"``, ``"0x2902"``) or a
    128-bit string with or without dashes.

    Raises:
        LocalProtocolError: not a UUID.
    """
    if isinstance(uuid, int):
        if not 0 <= uuid < 1 << 32:
            raise LocalProtocolError("a short UUID must fit 32 bits")
        return f"{uuid:08x}{BASE_UUID_SUFFIX}"
    text = uuid.strip().lower()
    text = text.removeprefix("0x")
    digits = text.replace("-", "")
    if not digits or not set(digits) <= _HEX:
        raise LocalProtocolError("not a UUID")
    if len(digits) in (4, 8) and "-" not in text:
        return f"{int(digits, 16):08x}{BASE_UUID_SUFFIX}"
    if len(digits) != 32:
        raise LocalProtocolError("a UUID has 4, 8 or 32 hex digits")
    d = digits
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"


def short_uuid(uuid: str) -> int | None:
    """Return the 16-bit alias of a normalized UUID, or ``None``."""
    if uuid.endswith(BASE_UUID_SUFFIX) and uuid.startswith("0000"):
        return int(uuid[4:8], 16)
    return None


def uuid_to_le(uuid: str) -> bytes:
    """Encode a normalized UUID for the wire: 2 bytes if it has a 16-bit alias."""
    alias = short_uuid(uuid)
    if alias is not None:
        return alias.to_bytes(2, "little")
    return bytes.fromhex(uuid.replace("-", ""))[::-1]


def uuid_from_le(data: bytes | memoryview) -> str:
    """Decode a 2-, 4- or 16-byte little-endian UUID; other sizes give hex."""
    if len(data) in (2, 4):
        return normalize_uuid(int.from_bytes(data, "little"))
    digits = bytes(data)[::-1].hex()
    if len(digits) != 32:
        return digits
    return normalize_uuid(digits)
