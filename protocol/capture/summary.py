"""What a capture holds, per connection and in total (``replay --summary``).

:func:`summarize` counts ATT operations by opcode and handle (with the
handle's UUID when the capture holds its discovery), packets, bytes and
durations per connection, and the totals of the five operations a replay
cares about: ``notify``, ``indicate``, ``write_req``, ``write_cmd`` and
``read_rsp`` (ATT opcodes 0x1B, 0x1D, 0x12, 0x52, 0x0B; tshark's
``btatt.opcode`` agrees on them).

Device addresses are redacted to their last two bytes unless asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.capture.att import AttOpcode, opcode_name
from protocol.capture.reader import AttOp, Capture, Connection

__all__ = [
    "AttCounts",
    "CaptureSummary",
    "ConnectionSummary",
    "OperationCount",
    "redact_address",
    "summarize",
]


def redact_address(address: str | None) -> str | None:
    """Keep only the last two bytes: ``**:**:**:**:44:55``."""
    if address is None:
        return None
    return "**:**:**:**:" + address[-5:]


@dataclass(frozen=True, slots=True)
class AttCounts:
    """Counts of the ATT operations a replay uses."""

    notify: int = 0
    indicate: int = 0
    write_req: int = 0
    write_cmd: int = 0
    read_rsp: int = 0

    @classmethod
    def of(cls, ops: Iterable[AttOp]) -> AttCounts:
        """Count ``ops`` by opcode."""
        by_opcode = Counter(op.opcode for op in ops)
        return cls(
            notify=by_opcode[AttOpcode.HANDLE_VALUE_NTF],
            indicate=by_opcode[AttOpcode.HANDLE_VALUE_IND],
            write_req=by_opcode[AttOpcode.WRITE_REQ],
            write_cmd=by_opcode[AttOpcode.WRITE_CMD],
            read_rsp=by_opcode[AttOpcode.READ_RSP],
        )

    def to_dict(self) -> dict[str, int]:
        """The five counts by name."""
        return {
            "notify": self.notify,
            "indicate": self.indicate,
            "write_req": self.write_req,
            "write_cmd": self.write_cmd,
            "read_rsp": self.read_rsp,
        }


@dataclass(frozen=True, slots=True)
class OperationCount:
    """ATT PDUs of one opcode on one handle of one connection."""

    opcode: int
    handle: int | None
    uuid: str | None
    count: int
    value_bytes: int

    @property
    def name(self) -> str:
        """Short opcode name."""
        return opcode_name(self.opcode)

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return {
            "opcode": f"0x{self.opcode:02x}",
            "name": self.name,
            "handle": None if self.handle is None else f"0x{self.handle:04x}",
            "uuid": self.uuid,
            "count": self.count,
            "value_bytes": self.value_bytes,
        }


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """One connection's counts."""

    index: int
    adapter: int
    handle: int
    transport: str
    over_the_air: bool
    implicit: bool
    peer: str | None
    start_s: float
    duration_s: float
    packets: int
    bytes: int
    disconnect_reason: int | None
    att: AttCounts
    att_total: int
    operations: tuple[OperationCount, ...]
    uuids: int

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return {
            "index": self.index,
            "adapter": self.adapter,
            "handle": f"0x{self.handle:04x}",
            "transport": self.transport,
            "over_the_air": self.over_the_air,
            "implicit": self.implicit,
            "peer": self.peer,
            "start_s": round(self.start_s, 6),
            "duration_s": round(self.duration_s, 6),
            "packets": self.packets,
            "bytes": self.bytes,
            "disconnect_reason": self.disconnect_reason,
            "att": self.att.to_dict(),
            "att_total": self.att_total,
            "operations": [o.to_dict() for o in self.operations],
            "uuids_known": self.uuids,
        }


@dataclass(frozen=True, slots=True)
class CaptureSummary:
    """The whole file's counts (the ``replay --summary --json`` object)."""

    format: str
    linktype: int
    linktype_name: str
    packets: int
    duration_s: float
    att: AttCounts
    att_total: int
    connections: tuple[ConnectionSummary, ...]
    truncated_packets: int
    hci: dict[str, int]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON; ``connections`` is the count."""
        return {
            "format": self.format,
            "linktype": self.linktype,
            "linktype_name": self.linktype_name,
            "packets": self.packets,
            "duration_s": round(self.duration_s, 6),
            "connections": len(self.connections),
            "att": self.att.to_dict(),
            "att_total": self.att_total,
            "truncated_packets": self.truncated_packets,
            "hci": dict(self.hci),
            "warnings": list(self.warnings),
            "per_connection": [c.to_dict() for c in self.connections],
        }


def _operations(ops: list[AttOp]) -> tuple[OperationCount, ...]:
    counts: Counter[tuple[int, int | None, str | None]] = Counter()
    sizes: Counter[tuple[int, int | None, str | None]] = Counter()
    for op in ops:
        key = (op.opcode, op.handle, op.uuid)
        counts[key] += 1
        sizes[key] += len(op.value)
    keys = sorted(
        counts, key=lambda k: (k[0], -1 if k[1] is None else k[1], k[2] or "")
    )
    return tuple(OperationCount(*k, counts[k], sizes[k]) for k in keys)


def _connection(
    conn: Connection, ops: list[AttOp], first_ns: int, addresses: bool
) -> ConnectionSummary:
    return ConnectionSummary(
        index=conn.index,
        adapter=conn.adapter,
        handle=conn.handle,
        transport=str(conn.transport),
        over_the_air=conn.over_the_air,
        implicit=conn.implicit,
        peer=conn.peer if addresses else redact_address(conn.peer),
        start_s=(conn.start_ns - first_ns) / 1e9,
        duration_s=conn.duration_s,
        packets=conn.packets,
        bytes=conn.bytes,
        disconnect_reason=conn.disconnect_reason,
        att=AttCounts.of(ops),
        att_total=len(ops),
        operations=_operations(ops),
        uuids=len(conn.uuids),
    )


def summarize(capture: Capture, *, addresses: bool = False) -> CaptureSummary:
    """Count what ``capture`` holds.

    Args:
        capture: from :func:`~protocol.capture.reader.read_capture`.
        addresses: show full device addresses (default: last two bytes).
    """
    per_conn: list[list[AttOp]] = [[] for _ in capture.connections]
    for op in capture.att:
        per_conn[op.connection].append(op)
    return CaptureSummary(
        format=str(capture.format),
        linktype=capture.linktype,
        linktype_name=capture.linktype_name,
        packets=capture.packets,
        duration_s=capture.duration_s,
        att=AttCounts.of(capture.att),
        att_total=len(capture.att),
        connections=tuple(
            _connection(conn, per_conn[conn.index], capture.first_ns, addresses)
            for conn in capture.connections
        ),
        truncated_packets=capture.stats.truncated,
        hci=capture.stats.to_dict(),
        warnings=capture.warnings,
    )
