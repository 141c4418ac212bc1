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

--into-daemon plays the glasses' side of a capture recorded with ``sniff
--plaintext`` into a real daemon (in this process, on emulated glasses, with
no uplink): a fresh pairing and handshake, then the recorded glasses
messages sealed again under the new keys, with --timing asap (all at once),
faithful (at the recorded times, divided by --speed) or lockstep (each one
once the daemon has written what it had written before it, or after
--step-timeout). The daemon's messages are compared with the recorded ones,
ids, times, counters and ciphertext masked (protocol.capture.expect); a
difference is printed as a diff on standard output and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from protocol.capture import (
    AttOpcode,
    Capture,
    CaptureError,
    CaptureSummary,
    Connection,
    read_capture,
    summarize,
)
from protocol.capture.expect import Step, diff_messages, script_from_capture
from protocol.constants import MessageFlags, MessageKind
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
from protocol.message import Message
from protocol.record import RecordHeader
from relay.errors import ConfigError
from tools.output import emit_json, say

if TYPE_CHECKING:
    from protocol.session import PeerPolicy, SessionEvent
    from relay.connection import FragmentLink, SessionDriver
    from relay.sim.peripheral import GlassesPeripheral

__all__ = [
    "FrameLine",
    "IntoDaemonResult",
    "decode_frames",
    "into_daemon",
    "load_capture",
    "register",
    "run",
]

MAX_CAPTURE_BYTES: Final = 1 << 30
"""Largest file read (1 GiB): the reader holds the whole file in memory."""
TIMINGS: Final = ("asap", "faithful", "lockstep")
SETTLE_S: Final = 5.0
"""After the last message sent, how long to wait for the daemon's remaining
recorded writes."""
CONNECT_TIMEOUT_S: Final = 30.0
"""Longest wait for the daemon to connect, pair and finish the handshake."""
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
    play = parser.add_argument_group("playing into a daemon")
    play.add_argument(
        "--into-daemon",
        action="store_true",
        help="play the glasses' side of a sniff --plaintext capture into a daemon "
        "and diff what it writes against the recording",
    )
    play.add_argument(
        "--timing",
        choices=TIMINGS,
        default="asap",
        help="asap (default), faithful (recorded times) or lockstep (wait for "
        "the daemon's recorded answers)",
    )
    play.add_argument(
        "--speed",
        type=float,
        metavar="X",
        help="with --timing faithful: play X times as fast (default 1)",
    )
    play.add_argument(
        "--step-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="lockstep: longest wait for the daemon before going on (default 5)",
    )
    play.add_argument(
        "--connection",
        type=int,
        metavar="N",
        help="the connection to play (default: the first with plaintext)",
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
    if args.into_daemon:
        return _run_into_daemon(args, path, capture)
    if args.speed is not None or args.timing != "asap" or args.connection is not None:
        raise ConfigError("--timing, --speed and --connection need --into-daemon")
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


# --- playing into a daemon --------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntoDaemonResult:
    """What a replay into the daemon found."""

    timing: str
    sent: int
    expected: int
    observed: int
    extra: int
    """Daemon messages after the last recorded one (the capture had ended)."""
    diff: list[str]

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return {
            "timing": self.timing,
            "sent": self.sent,
            "expected": self.expected,
            "observed": self.observed,
            "extra_after_recording": self.extra,
            "equal": not self.diff,
            "diff": self.diff,
        }


def _run_into_daemon(args: argparse.Namespace, path: Path, capture: Capture) -> int:
    if args.decode:
        raise ConfigError("--into-daemon and --decode exclude each other")
    if args.speed is not None and args.timing != "faithful":
        raise ConfigError("--speed is for --timing faithful")
    speed = 1.0 if args.speed is None else float(args.speed)
    if not 0 < speed <= 1000:
        raise ConfigError("--speed must be > 0 and at most 1000")
    if not 0 < args.step_timeout <= 600:
        raise ConfigError("--step-timeout must be > 0 and at most 600 s")
    connection = args.connection
    if connection is not None and not 0 <= connection < len(capture.connections):
        raise ConfigError(
            f"--connection {connection}: the capture has "
            f"{len(capture.connections)} connection(s)"
        )
    try:
        steps = script_from_capture(capture, connection)
    except CaptureError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not steps:
        raise ConfigError(
            f"{path}: no plaintext comments to play; record the capture with "
            "'glasses-relay sniff --plaintext'"
        )
    result = asyncio.run(
        into_daemon(
            steps, timing=args.timing, speed=speed, step_timeout=args.step_timeout
        )
    )
    if args.json:
        emit_json(result.to_dict())
    else:
        sys.stdout.writelines(line + "\n" for line in result.diff)
        sys.stdout.flush()
    verdict = "differs from" if result.diff else "matches"
    say(
        f"replay: sent {result.sent} glasses messages ({result.timing}); the daemon "
        f"wrote {result.observed}, {verdict} the {result.expected} recorded"
        + (f" ({result.extra} more after the recording ended)" if result.extra else "")
    )
    return 1 if result.diff else 0


async def into_daemon(
    steps: Sequence[Step],
    *,
    timing: str = "asap",
    speed: float = 1.0,
    step_timeout: float = 5.0,
) -> IntoDaemonResult:
    """Play ``steps`` as emulated glasses into a daemon in this process.

    The daemon (``relay.daemon.Daemon``, no uplink, a throw-away state
    directory) pairs with the emulated glasses through the real pairing flow
    and handshake; the glasses then send the recorded messages and record
    what the daemon writes.

    Raises:
        ConfigError: the daemon did not connect and finish the handshake.
    """
    import tempfile

    from relay.ble.link import LinkConfig
    from relay.cloudlink import CloudConfig
    from relay.daemon import Daemon, DaemonConfig
    from relay.outbox import Outbox
    from relay.sim.bed import backend_for
    from relay.sim.bleak_bumble import BumbleAdapter
    from relay.sim.peripheral import GlassesPeripheral
    from relay.sim.profiles import UNSHAPED
    from relay.sim.shaped_link import make_link
    from relay.state import ensure_state_dir

    with tempfile.TemporaryDirectory(prefix="glasses-relay-replay-") as temp:
        state = ensure_state_dir(Path(temp) / "state")
        ensure_state_dir(state / "phone")
        link = make_link(UNSHAPED)
        peripheral = GlassesPeripheral(link)
        adapter = BumbleAdapter.on_link(link)
        await peripheral.start()
        outbox = await Outbox.open(state / "phone" / "outbox.sqlite3")
        config = DaemonConfig(
            state_dir=state,
            link=LinkConfig(scan_timeout=5.0, connect_timeout=10.0),
            cloud=CloudConfig(announce_presence=False),
        )
        daemon = Daemon(config, backend_for(adapter), None, outbox=outbox)
        glasses = _ReplayGlasses(peripheral, state)
        daemon_task = asyncio.create_task(daemon.run(), name="replay daemon")
        try:
            return await glasses.play(
                steps, timing=timing, speed=speed, step_timeout=step_timeout
            )
        finally:
            await glasses.close()
            daemon_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await daemon_task
            await daemon.close()
            await outbox.close()
            await adapter.close()
            await peripheral.stop()


class _CountingLink:
    """A fragment link that sets an event after every write (see ``_send``)."""

    def __init__(self, link: FragmentLink, wrote: asyncio.Event) -> None:
        self._link = link
        self._wrote = wrote

    @property
    def max_fragment_size(self) -> int:
        return self._link.max_fragment_size

    async def recv(self) -> bytes:
        return await self._link.recv()

    def recv_nowait(self) -> bytes | None:
        return self._link.recv_nowait()

    async def write(self, fragment: bytes) -> None:
        await self._link.write(fragment)
        self._wrote.set()


class _ReplayGlasses:
    """Emulated glasses that send recorded messages and keep what they get."""

    def __init__(self, peripheral: GlassesPeripheral, state: Path) -> None:
        from protocol.session import Identity

        self._peripheral = peripheral
        self._state = state
        self._identity = Identity.generate()
        self._driver: SessionDriver | None = None
        self._task: asyncio.Task[None] | None = None
        self._established = asyncio.Event()
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._wrote = asyncio.Event()
        self.observed: list[Message] = []

    async def _policy(self) -> PeerPolicy:
        """Pair with the phone whose pairing code is in the state directory."""
        from protocol.pairing import PairingPayload
        from protocol.session import PeerPolicy

        path = self._state / "phone" / "pairing.txt"
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while True:
                with contextlib.suppress(
                    OSError, UnicodeDecodeError, RemoteProtocolError
                ):
                    text = await asyncio.to_thread(path.read_text, encoding="ascii")
                    payload = PairingPayload.decode(text)
                    return PeerPolicy(
                        pairing_psk=payload.psk, expected_peer=payload.phone_public
                    )
                await asyncio.sleep(0.05)

    async def _connect(self) -> None:
        from protocol.session import Role, Session
        from relay.connection import SessionDriver
        from relay.sim.glasses import PeripheralLink

        peripheral = self._peripheral
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await peripheral.subscribed.wait()
                peripheral.discard_received()
                policy = await self._policy()
                session = Session(Role.GLASSES, self._identity, policy)
                link = _CountingLink(PeripheralLink(peripheral, ()), self._wrote)
                driver = SessionDriver(session, link, self._on_event, name="replay")
                self._driver = driver
                self._task = asyncio.create_task(driver.run(), name="replay glasses")
                await self._established.wait()
        except TimeoutError:
            raise ConfigError(
                f"the daemon did not pair with the emulated glasses within "
                f"{CONNECT_TIMEOUT_S:g} s"
            ) from None

    def _on_event(self, event: SessionEvent) -> None:
        from protocol.bodies import ClockSync
        from protocol.session import (
            HandshakeCompleted,
            MessageReceived,
            MessagesAcknowledged,
        )

        if isinstance(event, HandshakeCompleted):
            self._established.set()
        elif isinstance(event, MessagesAcknowledged):
            self._acked.set()
        elif isinstance(event, MessageReceived):
            message = event.message
            driver = self._driver
            self.observed.append(message)
            self._changed.set()
            if driver is None:
                return
            if message.kind is MessageKind.CLOCK_SYNC:
                with contextlib.suppress(RemoteProtocolError):
                    sync = ClockSync.decode(message.body)
                    now = int(time.monotonic() * 1e6)
                    reply = ClockSync(sync.t1, now, now).encode()
                    driver.send(Message(MessageKind.CLOCK_SYNC, os.urandom(16), reply))
            if message.flags & MessageFlags.RELIABLE:
                driver.acknowledge(message.message_id)

    async def _wait_observed(self, count: int, wait_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while len(self.observed) < count:
                    self._changed.clear()
                    await self._changed.wait()

    async def _send(self, message: Message, wait_s: float) -> None:
        driver = self._driver
        assert driver is not None  # noqa: S101
        session = driver.session
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while message.flags & MessageFlags.RELIABLE and not (
                    session.can_send_reliable(len(message.body))
                ):
                    self._acked.clear()
                    await self._acked.wait()
        if self._task is not None and self._task.done():
            raise ConfigError("the daemon dropped the link during the replay")
        driver.send(message)
        # Keep the recorded order: the link layer serves channels by priority
        # (a voice chunk would overtake the request queued just before it), so
        # the next message waits until this one is on the air.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                while session.queued_bytes:
                    self._wrote.clear()
                    await self._wrote.wait()

    async def play(
        self, steps: Sequence[Step], *, timing: str, speed: float, step_timeout: float
    ) -> IntoDaemonResult:
        """Connect, send the recorded messages, then compare."""
        await self._connect()
        loop = asyncio.get_running_loop()
        start = loop.time()
        expected = [s.expect for s in steps if s.expect is not None]
        sent = 0
        before = 0  # recorded daemon writes before the current step
        for step in steps:
            if step.expect is not None:
                before += 1
                continue
            if step.send is None:
                continue
            if timing == "lockstep":
                await self._wait_observed(before, step_timeout)
            elif timing == "faithful":
                await asyncio.sleep(max(0.0, start + step.t / speed - loop.time()))
            await self._send(step.send, step_timeout)
            sent += 1
        if timing == "faithful" and steps:
            await asyncio.sleep(max(0.0, start + steps[-1].t / speed - loop.time()))
        await self._wait_observed(len(expected), SETTLE_S)
        observed = list(self.observed)
        diff = diff_messages(expected, observed[: len(expected)])
        return IntoDaemonResult(
            timing,
            sent,
            len(expected),
            min(len(observed), len(expected)),
            max(0, len(observed) - len(expected)),
            diff,
        )

    async def close(self) -> None:
        """Stop the glasses' session."""
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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
