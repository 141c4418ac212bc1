"""Capture codecs: pcapng/btsnoop writer and btsnoop/pcap/pcapng readers.

Sans-I/O (no files, sockets, clocks or logging): bytes in, values out.
../shared/design/CAPTURE-FORMATS.md is the reference for formats and
Wireshark decoding.

- Write: :class:`CaptureWriter` synthesizes a pcapng LINKTYPE 201 file from
  GATT client events (connect, MTU, discovery from a service table, writes,
  notifications, indications, disconnect) that tshark decodes with zero
  expert errors; :meth:`CaptureWriter.to_btsnoop` exports btsnoop 1002.
- Read: :func:`read_capture` reads btsnoop 1001/1002/2001 and pcap/pcapng
  with link types 187, 201, 254 and (best effort, over the air) 272, found
  by magic bytes, down to connections and ATT operations;
  :func:`read_packets` stops at the container level.
- Summarize: :func:`summarize` counts ATT operations per connection, opcode
  and handle.
- Plaintext comments: :func:`plaintext_comment` and
  :func:`messages_in_comment` carry decrypted messages beside the packets
  that carried them (``sniff --plaintext``).

Errors: every reader, given any bytes, returns a value or raises
:class:`CaptureError` (a :class:`~protocol.errors.MalformedError`, hence a
:class:`~protocol.errors.RemoteProtocolError` and a ``ValueError``); nothing
else. The writer raises :class:`~protocol.errors.LocalProtocolError` on
caller mistakes.
"""

from __future__ import annotations

from protocol.capture.att import AttOpcode, normalize_uuid, opcode_name
from protocol.capture.containers import (
    LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR,
    CaptureFormat,
    Packet,
    PacketFile,
    detect_format,
    read_packets,
)
from protocol.capture.errors import CaptureError
from protocol.capture.plaintext import (
    PLAINTEXT_PREFIX,
    messages_in_comment,
    plaintext_comment,
)
from protocol.capture.reader import (
    AttOp,
    Capture,
    Connection,
    Direction,
    HciStats,
    Transport,
    decode_packets,
    read_capture,
)
from protocol.capture.services import (
    CharacteristicSpec,
    CharProps,
    HandleMap,
    ServiceSpec,
    glasses_services,
)
from protocol.capture.summary import (
    AttCounts,
    CaptureSummary,
    ConnectionSummary,
    OperationCount,
    summarize,
)
from protocol.capture.writer import CaptureWriter

__all__ = [
    "LINKTYPE_BLUETOOTH_HCI_H4_WITH_PHDR",
    "PLAINTEXT_PREFIX",
    "AttCounts",
    "AttOp",
    "AttOpcode",
    "Capture",
    "CaptureError",
    "CaptureFormat",
    "CaptureSummary",
    "CaptureWriter",
    "CharProps",
    "CharacteristicSpec",
    "Connection",
    "ConnectionSummary",
    "Direction",
    "HandleMap",
    "HciStats",
    "OperationCount",
    "Packet",
    "PacketFile",
    "ServiceSpec",
    "Transport",
    "decode_packets",
    "detect_format",
    "glasses_services",
    "messages_in_comment",
    "normalize_uuid",
    "opcode_name",
    "plaintext_comment",
    "read_capture",
    "read_packets",
    "summarize",
]
