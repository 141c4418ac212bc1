"""``glasses-relay replay FILE``: what a Bluetooth capture holds.

Reads btsnoop (Android ``btsnoop_hci.log``, ``btmon -w``), pcap and pcapng
(LINKTYPE 201, 254, 187; nRF Sniffer 272 best effort), whatever the file is
called: the format comes from its magic bytes.

--summary (the default) prints, to standard error, per connection the ATT
operations by opcode and handle (with UUIDs when the capture holds the
discovery), packet and byte counts and durations, and the file's totals of
notify / indicate / write_req / write_cmd / read_rsp. --decode prints one
line per glasses-relay record found in the values of our TX and RX
characteristics (fragments reassembled per connection and direction; record
headers shown, ciphertext left opaque). --json prints one JSON object on
standard output instead of the lines.

Device addresses are shown as their last two bytes unless --addresses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.capture import (
    AttOpcode,
    Capture,
    CaptureError,
    CaptureSummary,
    Connection,
    read_capture,
    summarize,
)
from protocol.errors import RemoteProtocolError
from protocol.events import (
    FragmentDuplicated,
    FragmentReordered,
    FragmentsLost,
    LinkEvent,
    RecordDropped,
    RecordReassembled,
)
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID
from protocol.link import Reassembler
from protocol.record import RecordHeader
from relay.errors import ConfigError
from tools.output import emit_json, say

__all__ = ["FrameLine", "decode_frames", "load_capture", "register", "run"]

MAX_CAPTURE_BYTES: Final = 1 << 30
"""Largest file read (1 GiB): the reader holds the whole file in memory."""
UP: Final = "glasses>phone"
DOWN: Final = "phone>glasses"
_UP_OPCODES: Final = frozenset((AttOpcode.HANDLE_VALUE_NTF, AttOpcode.HANDLE_VALUE_IND))
_DOWN_OPCODES: Final = frozenset((AttOpcode.WRITE_CMD, AttOpcode.WRITE_REQ))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``replay`` subcommand."""
    parser = sub.add_parser(
        "replay",
        help="summarize a Bluetooth capture or decode our frames in it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="the capture")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="per-connection ATT counts (the default when --decode is not given)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="one line per glasses-relay record in our characteristics' values",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--addresses", action="store_true", help="show whole device addresses"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a damaged file instead of reading it up to the damage",
    )
    parser.add_argument(
        "--tx-handle",
        type=_handle,
        metavar="HANDLE",
        help="ATT value handle of TX (glasses to phone) if the capture has no "
        "discovery, e.g. 0x0012",
    )
    parser.add_argument(
        "--rx-handle",
        type=_handle,
        metavar="HANDLE",
        help="ATT value handle of RX (phone to glasses), e.g. 0x0015",
    )
    parser.set_defaults(handler=run)


def _handle(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a handle: {text!r}") from None
    if not 0 < value <= 0xFFFF:
        raise argparse.ArgumentTypeError("an ATT handle is 0x0001..0xffff")
    return value


def load_capture(path: Path, *, strict: bool = False) -> Capture:
    """Read and decode the capture at ``path``.

    Raises:
        ConfigError: the file cannot be read, is too large, or is not a
            capture we can read (the reason is in the message).
    """
    try:
        size = path.stat().st_size
        if size > MAX_CAPTURE_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is more than the {MAX_CAPTURE_BYTES} read"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return read_capture(data, strict=strict)
    except CaptureError as exc:
        raise ConfigError(f"{path}: not a capture we can read: {exc}") from exc


@dataclass(frozen=True, slots=True)
class FrameLine:
    """One thing --decode found: a record, or a fragment-level problem."""

    t: float
    connection: int
    direction: str
    event: str
    """``record``, ``bad_record``, ``lost``, ``duplicate``, ``reordered``,
    ``dropped``, ``bad_fragment`` or ``truncated``."""
    channel: str | None = None
    record_type: str | None = None
    session_id: int | None = None
    counter: int | None = None
    size: int | None = None
    fragments: int | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON (absent fields left out)."""
        out: dict[str, object] = {
            "t": round(self.t, 6),
            "connection": self.connection,
            "direction": self.direction,
            "event": self.event,
        }
        for name in (
            "channel", "record_type", "session_id", "counter", "size",
            "fragments", "note",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def render(self) -> str:
        """The line printed by --decode."""
        head = f"+{self.t:.6f} conn {self.connection} {self.direction}"
        if self.event == "record":
            return (
                f"{head} {self.channel} {self.record_type} "
                f"session=0x{self.session_id or 0:08x} counter={self.counter} "
                f"size={self.size} fragments={self.fragments}"
            )
        return f"{head} ! {self.event}: {self.note}"


def _handles(conn: Connection, uuid: str, extra: int | None) -> frozenset[int]:
    found = {handle for handle, u in conn.uuids if u == uuid}
    if extra is not None:
        found.add(extra)
    return frozenset(found)


def _lines_for(
    events: list[LinkEvent], t: float, conn: int, direction: str
) -> list[FrameLine]:
    out = []
    for ev in events:
        if isinstance(ev, RecordReassembled):
            try:
                header = RecordHeader.decode(ev.record)
            except RemoteProtocolError as exc:
                out.append(
                    FrameLine(
                        t,
                        conn,
                        direction,
                        "bad_record",
                        channel=ev.channel.name,
                        size=len(ev.record),
                        fragments=ev.fragments,
                        note=str(exc),
                    )
                )
                continue
            out.append(
                FrameLine(
                    t,
                    conn,
                    direction,
                    "record",
                    channel=ev.channel.name,
                    record_type=header.type.name,
                    session_id=header.session_id,
                    counter=header.counter,
                    size=len(ev.record),
                    fragments=ev.fragments,
                )
            )
        elif isinstance(ev, FragmentsLost):
            note = f"{ev.count} fragments lost (expected {ev.expected}, got {ev.seq})"
            out.append(FrameLine(t, conn, direction, "lost", note=note))
        elif isinstance(ev, FragmentDuplicated):
            note = f"fragment {ev.seq} again"
            out.append(FrameLine(t, conn, direction, "duplicate", note=note))
        elif isinstance(ev, FragmentReordered):
            note = f"fragment {ev.seq} late"
            out.append(FrameLine(t, conn, direction, "reordered", note=note))
        elif isinstance(ev, RecordDropped):
            note = f"{ev.channel.name} record dropped ({ev.reason}, {ev.size} bytes)"
            out.append(FrameLine(t, conn, direction, "dropped", note=note))
    return out


def decode_frames(
    capture: Capture, *, tx_handle: int | None = None, rx_handle: int | None = None
) -> list[FrameLine]:
    """Find this project's records in a capture.

    Notifications and indications on TX and writes on RX are fed, per
    connection and direction, to the link layer's reassembler
    (docs/protocol.md §2); each record's header is decoded (§3.1). TX and RX
    are found by UUID from the capture's discovery, or given as handles.
    """
    tx = [_handles(c, TX_CHAR_UUID, tx_handle) for c in capture.connections]
    rx = [_handles(c, RX_CHAR_UUID, rx_handle) for c in capture.connections]
    reassemblers: dict[tuple[int, str], Reassembler] = {}
    lines: list[FrameLine] = []
    for op in capture.att:
        if op.opcode in _UP_OPCODES and op.handle in tx[op.connection]:
            direction = UP
        elif op.opcode in _DOWN_OPCODES and op.handle in rx[op.connection]:
            direction = DOWN
        else:
            continue
        t = (op.timestamp_ns - capture.first_ns) / 1e9
        if op.truncated:
            note = f"value cut short in the capture ({len(op.value)} bytes kept)"
            lines.append(FrameLine(t, op.connection, direction, "truncated", note=note))
            continue
        key = (op.connection, direction)
        reassembler = reassemblers.get(key)
        if reassembler is None:
            first_seq = 0
            if capture.connections[op.connection].implicit and len(op.value) >= 2:
                first_seq = int.from_bytes(op.value[:2], "big") & 0x0FFF
            reassembler = reassemblers[key] = Reassembler(first_seq=first_seq)
        events = reassembler.expire(t)
        try:
            events += reassembler.feed(op.value, t)
        except RemoteProtocolError as exc:
            lines += _lines_for(events, t, op.connection, direction)
            lines.append(
                FrameLine(t, op.connection, direction, "bad_fragment", note=str(exc))
            )
            continue
        lines += _lines_for(events, t, op.connection, direction)
    return lines


def _print_summary(path: Path, summary: CaptureSummary) -> None:
    att = summary.att
    say(
        f"{path.name}: {summary.format}, {summary.linktype_name} "
        f"({summary.linktype}), {summary.packets} packets, "
        f"{summary.duration_s:.3f} s, {len(summary.connections)} connection(s)"
    )
    say(
        f"ATT: notify {att.notify}, indicate {att.indicate}, write_req "
        f"{att.write_req}, write_cmd {att.write_cmd}, read_rsp {att.read_rsp} "
        f"(all ATT PDUs: {summary.att_total})"
    )
    if summary.truncated_packets:
        say(f"{summary.truncated_packets} packets stored shorter than sent")
    for warning in summary.warnings:
        say(f"warning: {warning}")
    if not summary.connections:
        return
    say("")
    say(
        f"{'conn':>4} {'handle':>10} {'transport':<9} {'peer':<17} "
        f"{'start s':>10} {'dur s':>9} {'packets':>8} {'bytes':>9} {'ATT':>6}"
    )
    for c in summary.connections:
        transport = c.transport + (" (air)" if c.over_the_air else "")
        say(
            f"{c.index:>4} {c.handle:>#10x} {transport:<9} {c.peer or '-':<17} "
            f"{c.start_s:>10.3f} {c.duration_s:>9.3f} {c.packets:>8} "
            f"{c.bytes:>9} {c.att_total:>6}"
        )
        for o in c.operations:
            handle = "-" if o.handle is None else f"0x{o.handle:04x}"
            uuid = o.uuid or ""
            say(
                f"{'':>6}{o.name:<24} {handle:>6} {o.count:>7} x "
                f"{o.value_bytes:>9} B  {uuid}"
            )


def run(args: argparse.Namespace) -> int:
    """Run ``replay`` with parsed arguments; return the exit status.

    Raises:
        ConfigError: the file is missing, unreadable or not a capture.
    """
    path: Path = args.file
    capture = load_capture(path, strict=args.strict)
    summary = summarize(capture, addresses=args.addresses)
    lines = None
    if args.decode:
        lines = decode_frames(
            capture, tx_handle=args.tx_handle, rx_handle=args.rx_handle
        )
    if args.summary or not args.decode:
        _print_summary(path, summary)
    if args.json:
        doc = summary.to_dict()
        if lines is not None:
            doc["records"] = [line.to_dict() for line in lines]
        emit_json(doc)
    elif lines is not None:
        if not lines:
            say("no glasses-relay frames found (no TX/RX discovery? see --tx-handle)")
        sys.stdout.writelines(line.render() + "\n" for line in lines)
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.replay FILE ...``: the subcommand without the dispatcher."""
    parser = argparse.ArgumentParser(prog="glasses-relay")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        sys.stderr.write(f"glasses-relay: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
