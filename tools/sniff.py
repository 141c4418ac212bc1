"""``glasses-relay sniff``: record the GATT traffic between glasses and the daemon.

Runs the daemon's own link and session code (``relay.daemon.Daemon``: the
BLE link, the Noise handshake, routing, the outbox; no uplink) and records
every ATT value it exchanges with the glasses, in full, as it crossed the
air: writes from the phone, notifications from the glasses. The file is a
pcapng (LINKTYPE 201) that Wireshark and tshark decode with no plugin, or a
btsnoop (Android's format) when ``--out`` ends in ``.btsnoop``; bleak gives
no HCI, so the connection event, the MTU exchange and the GATT discovery are
synthesized from what bleak reports (docs/capture.md).

- ``--sim``: emulated glasses playing the ``day`` scenario, in this process,
  paired through the real pairing flow in a throw-away state directory.
- ``--address ADDR``: real glasses through the platform's Bluetooth stack,
  with the keys in the state directory (pair first with ``glasses-relay
  pair``); messages go to that state directory's outbox, as with ``run``.
- ``--from-daemon``: the link of the daemon already running for the state
  directory (``glasses-relay run --capture-ring MINUTES``), through its
  status API (tools/sniff_daemon.py): what crosses it from now on.

``--plaintext`` puts the decrypted messages in packet comments beside the
packets that carried them (``replay --decode`` and the Wireshark dissector
show them); keys are never written anywhere. ``--redact`` makes a capture to
share: addresses pseudonymised, key material and comments removed, values
cut to ``--truncate`` bytes if given. Progress goes to standard error;
``--json`` prints one summary object on standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Protocol

from protocol.capture import plaintext_comment, read_capture, summarize
from protocol.capture.rewrite import pcapng_to_btsnoop, redact
from protocol.capture.stream import LinkCapture
from protocol.constants import Channel, RecordType
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.events import RecordReassembled
from protocol.link import Reassembler
from protocol.message import Message
from protocol.record import RecordHeader
from relay.capture_ring import link_info
from relay.errors import ConfigError
from tools.output import emit_json, say

if TYPE_CHECKING:
    from bleak import BleakClient

    from protocol.session import Session, SessionEvent
    from relay.ble.link import BleLink
    from relay.ble.manager import LinkManager
    from relay.daemon import Daemon

__all__ = ["Recorder", "register", "run"]

_LOGGER: Final = logging.getLogger(__name__)

FORMATS: Final = {".pcapng": "pcapng", ".btsnoop": "btsnoop"}
"""Output formats by file extension."""
PLAINTEXT_HOLD_S: Final = 2.0
"""With --plaintext, how long a notification waits for its decrypted messages
before it is written without them (records that never open)."""
PLAINTEXT_KEPT: Final = 4096
"""Decrypted messages waiting for their packet, at most (oldest dropped)."""
FLUSH_INTERVAL_S: Final = 0.25
PROGRESS_INTERVAL_S: Final = 1.0
MAX_DURATION_S: Final = 24 * 3600.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sniff`` subcommand."""
    parser = sub.add_parser(
        "sniff",
        help="record the GATT traffic with the glasses to a pcapng or btsnoop file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--sim", action="store_true", help="emulated glasses in this process"
    )
    source.add_argument("--address", help="real glasses with this Bluetooth address")
    source.add_argument(
        "--from-daemon",
        action="store_true",
        help="the running daemon's link, through its status API (the daemon "
        "must run with --capture-ring MINUTES)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help="FILE.pcapng or FILE.btsnoop (the extension picks the format)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds to record (default 15)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="add the decrypted messages as packet comments (never keys)",
    )
    parser.add_argument(
        "--redact",
        action="store_true",
        help="for sharing: pseudonymise addresses, remove keys and comments",
    )
    parser.add_argument(
        "--truncate",
        type=int,
        metavar="N",
        help="with --redact: keep only the first N bytes of every ATT value",
    )
    parser.add_argument(
        "--profile", help="link profile of the emulated glasses (default android-2m)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="scenario seed of the emulated glasses"
    )
    parser.add_argument(
        "--port",
        type=int,
        help="with --from-daemon: a daemon started with --status-port PORT",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


@dataclass(frozen=True, slots=True)
class SniffOptions:
    """What to record and where (validated command line)."""

    out: Path
    format: str
    duration: float
    sim: bool
    address: str | None
    from_daemon: bool
    port: int | None
    plaintext: bool
    redact: bool
    truncate: int | None
    profile: str
    seed: int

    @property
    def source(self) -> str:
        """``sim``, ``address`` or ``daemon``."""
        if self.from_daemon:
            return "daemon"
        return "sim" if self.sim else "address"


def _options(args: argparse.Namespace) -> SniffOptions:
    """Check the command line; every mistake is one ConfigError line."""
    out: Path = args.out
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {out}: the file name must end in .pcapng or .btsnoop")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no directory {out.parent}")
    duration = float(args.duration)
    if not 0 < duration <= MAX_DURATION_S:
        raise ConfigError(f"--duration must be > 0 and at most {MAX_DURATION_S:g} s")
    if args.truncate is not None and not args.redact:
        raise ConfigError("--truncate needs --redact")
    if args.truncate is not None and args.truncate < 0:
        raise ConfigError("--truncate must be 0 or more")
    if args.plaintext and args.redact:
        raise ConfigError("--plaintext and --redact exclude each other")
    if args.plaintext and args.from_daemon:
        raise ConfigError(
            "--plaintext is for --sim and --address: the daemon keeps ciphertext only"
        )
    if args.port is not None and not args.from_daemon:
        raise ConfigError("--port is for --from-daemon")
    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError("--port must be 1 to 65535")
    from relay.sim.profiles import DEFAULT_PROFILE, PROFILES

    profile = args.profile or DEFAULT_PROFILE
    if args.profile is not None and not args.sim:
        raise ConfigError("--profile is for --sim")
    if profile not in PROFILES:
        raise ConfigError(
            f"--profile {profile!r}: one of {', '.join(sorted(PROFILES))}"
        )
    address = args.address
    if address is not None and not _is_address(address):
        raise ConfigError(f"--address {address!r}: use AA:BB:CC:DD:EE:FF")
    return SniffOptions(
        out=out,
        format=fmt,
        duration=duration,
        sim=bool(args.sim),
        address=address,
        from_daemon=bool(args.from_daemon),
        port=args.port,
        plaintext=bool(args.plaintext),
        redact=bool(args.redact),
        truncate=args.truncate,
        profile=profile,
        seed=int(args.seed),
    )


def _is_address(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    )


# --- the recorder -------------------------------------------------------------


@dataclass(slots=True)
class _Connection:
    link: int
    """The link's number in the capture."""
    up: Reassembler
    down: Reassembler
    session: Session | None = None
    opened: int = -1
    """Highest counter the phone's session has opened (plaintext)."""


@dataclass(slots=True)
class _Held:
    """A packet waiting to be written (so file order stays time order)."""

    emit: Callable[[str | None], bytes]
    t: float
    key: tuple[int, int] | None = None
    """(link, counter) of the record whose plaintext it waits for."""


class Recorder:
    """A :class:`relay.ble.link.LinkTap` that writes what it sees as pcapng.

    Every link gets an HCI connection handle, an LE Connection Complete, an
    MTU exchange, the discovery of its service table and the CCCD write;
    then one ATT PDU per value, and a Disconnection Complete when it
    closes (:class:`protocol.capture.stream.LinkCapture`, which the daemon's
    capture ring uses too). :meth:`take` returns the pcapng bytes produced
    so far.

    With ``plaintext``, call :meth:`watch` with the daemon's link managers:
    the recorder then looks at each link's session (see :meth:`_observe`) and
    comments the packet that completed a record with its messages.
    """

    def __init__(
        self,
        *,
        plaintext: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: float | None = None,
    ) -> None:
        """Prepare; ``wall`` is the Unix time that ``clock()`` now stands for."""
        self._plaintext = plaintext
        self._clock = clock
        self._offset = (time.time() if wall is None else wall) - clock()
        self._capture = LinkCapture(
            comment="Recorded by glasses-relay sniff from the daemon's BLE link."
        )
        self._connections: dict[int, _Connection] = {}
        self._out: list[bytes] = []
        self._held: deque[_Held] = deque()
        self._managers: Sequence[LinkManager] = ()
        self._sent: dict[tuple[int, int], list[Message]] = {}
        self._received: dict[tuple[int, int], list[Message]] = {}
        self.values = 0
        """ATT values seen so far (writes and notifications)."""
        self.comments = 0
        """Packets that got a plaintext comment."""
        self.links = 0
        self.packets = 0
        """Packets written so far."""
        self.bytes = 0
        """Bytes of pcapng produced so far."""

    def watch(self, managers: Sequence[LinkManager]) -> None:
        """Decrypted messages come from these managers' sessions (--plaintext)."""
        self._managers = managers

    def now(self) -> float:
        """Capture time: Unix seconds, on the monotonic clock."""
        return self._clock() + self._offset

    # -- LinkTap ------------------------------------------------------------

    def link_up(self, link: BleLink, client: BleakClient) -> None:
        """Synthesize connection, MTU exchange, discovery and subscription."""
        t = self.now()
        info = link_info(client)
        self.links += 1
        number = self.links
        self._connections[id(link)] = _Connection(number, Reassembler(), Reassembler())
        capture = self._capture

        def emit(_comment: str | None) -> bytes:
            return capture.link_up(number, info, t)

        self._hold(_Held(emit, t))

    def value_received(self, link: BleLink, value: bytes) -> None:
        """A notification: TX value, glasses to phone."""
        conn = self._connections.get(id(link))
        if conn is None:
            return
        t = self.now()
        self.values += 1
        key = None
        if self._plaintext:
            self._observe(link, conn)
            counter = _data_counter(conn.up, value, t)
            key = None if counter is None else (conn.link, counter)
        number = conn.link
        capture = self._capture

        def emit(comment: str | None) -> bytes:
            return capture.notify(number, value, t, comment=comment)

        self._hold(_Held(emit, t, key))

    def value_written(self, link: BleLink, value: bytes) -> None:
        """A write without response: RX value, phone to glasses."""
        conn = self._connections.get(id(link))
        if conn is None:
            return
        t = self.now()
        self.values += 1
        comment = None
        if self._plaintext:
            self._observe(link, conn)
            counter = _data_counter(conn.down, value, t)
            if counter is not None:
                messages = self._sent.pop((conn.link, counter), None)
                if messages:
                    comment = plaintext_comment(messages)
                    self.comments += 1
        number = conn.link
        capture = self._capture

        def emit(_comment: str | None) -> bytes:
            return capture.write(number, value, t, comment=comment)

        self._hold(_Held(emit, t))

    def link_down(self, link: BleLink) -> None:
        """The link closed: a Disconnection Complete."""
        conn = self._connections.pop(id(link), None)
        if conn is not None:
            self._hold_down(conn.link, self.now())

    # -- output -----------------------------------------------------------

    def take(self, *, final: bool = False) -> bytes:
        """Return the bytes produced since the last call.

        With ``final``, every held packet is written first.
        """
        self._release(final=final)
        out, self._out = self._out, []
        return b"".join(out)

    def close_all(self) -> None:
        """Write a Disconnection Complete for every link still open."""
        t = self.now()
        for conn in self._connections.values():
            self._hold_down(conn.link, t)
        self._connections.clear()

    def _hold_down(self, number: int, t: float) -> None:
        capture = self._capture

        def emit(_comment: str | None) -> bytes:
            return capture.link_down(number, t)

        self._hold(_Held(emit, t))

    def _hold(self, held: _Held) -> None:
        self._held.append(held)
        self._release()

    def _release(self, *, final: bool = False) -> None:
        held = self._held
        now = self.now()
        while held:
            first = held[0]
            comment = None
            if first.key is not None:
                messages = self._received.pop(first.key, None)
                if messages is not None:
                    comment = plaintext_comment(messages)
                elif not (
                    final
                    or now - first.t >= PLAINTEXT_HOLD_S
                    or self._opened(first.key)
                ):
                    return
            held.popleft()
            if comment:
                self.comments += 1
            try:
                data = first.emit(comment)
            except LocalProtocolError:
                # A link that closed before its first packet was written.
                _LOGGER.debug("sniff: a packet of a closed connection skipped")
                continue
            self._out.append(data)
            self.packets = self._capture.packets
            self.bytes = self._capture.bytes

    def _opened(self, key: tuple[int, int]) -> bool:
        for conn in self._connections.values():
            if conn.link == key[0]:
                return conn.opened >= key[1]
        return True  # the link is gone: nothing more will open

    # -- plaintext ------------------------------------------------------------

    def _observe(self, link: BleLink, conn: _Connection) -> None:
        """Watch the session of ``link``'s manager, once, for decrypted messages.

        protocol.session.Session has no observer seam, so the recorder wraps
        two of this one session object's public methods: ``send`` (a message
        sealed into one record, whose counter ``transport.send_counter``
        tells) and ``events_received`` (messages opened from the record just
        received, whose counter the replay window's ``highest`` tells). Only
        messages and counters are kept; keys stay inside the session.
        """
        if conn.session is not None:
            return
        for manager in self._managers:
            driver = manager.driver
            if manager.link is link and driver is not None:
                session = driver.session
                break
        else:
            return
        conn.session = session
        number = conn.link
        send = session.send
        events_received = session.events_received
        sent, received = self._sent, self._received

        def observed_send(
            message: Message, now: float, channel: Channel | None = None
        ) -> None:
            transport = session.transport
            before = None if transport is None else transport.send_counter
            send(message, now, channel)
            transport = session.transport
            if (
                transport is not None
                and before is not None
                and transport.send_counter == before + 1
            ):
                _bounded_put(sent, (number, before), message)

        def observed_events() -> list[SessionEvent]:
            from protocol.session import MessageReceived

            events = events_received()
            transport = session.transport
            if transport is not None:
                highest = transport.replay_window.highest
                for event in events:
                    if isinstance(event, MessageReceived):
                        _bounded_put(received, (number, highest), event.message)
                conn.opened = max(conn.opened, highest)
            return events

        setattr(session, "send", observed_send)  # noqa: B010
        setattr(session, "events_received", observed_events)  # noqa: B010


def _bounded_put(
    table: dict[tuple[int, int], list[Message]], key: tuple[int, int], message: Message
) -> None:
    table.setdefault(key, []).append(message)
    while len(table) > PLAINTEXT_KEPT:
        del table[next(iter(table))]


def _data_counter(reassembler: Reassembler, value: bytes, t: float) -> int | None:
    """Feed one value; the counter of the DATA record it completes, if any."""
    try:
        events = reassembler.feed(value, t)
    except RemoteProtocolError:
        return None
    for event in events:
        if isinstance(event, RecordReassembled):
            try:
                header = RecordHeader.decode(event.record)
            except RemoteProtocolError:
                return None
            if header.type is RecordType.DATA:
                return header.counter
    return None


# --- running ----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``sniff`` with parsed arguments; return the exit status.

    Raises:
        ConfigError: a bad option, an unusable output path, no Bluetooth
            adapter, glasses not found, or (``--from-daemon``) no daemon
            keeping a capture ring.
    """
    options = _options(args)
    if options.from_daemon:
        from tools.sniff_daemon import record_from_daemon

        summary = asyncio.run(record_from_daemon(options, args.state_dir))
    else:
        summary = asyncio.run(_sniff(options, args.state_dir))
    if args.json:
        emit_json(summary)
    return 0


@contextlib.asynccontextmanager
async def part_file(out: Path) -> AsyncIterator[tuple[Path, BinaryIO]]:
    """``OUT.part``, where the recording goes: closed at the end, removed on errors."""
    part = out.with_name(out.name + ".part")
    try:
        file = await asyncio.to_thread(part.open, "wb")
    except OSError as exc:
        raise ConfigError(f"cannot write {part}: {exc.strerror or exc}") from exc
    try:
        yield part, file
    except BaseException:
        await asyncio.to_thread(file.close)
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(file.close)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by Ctrl-C or SIGTERM: the recording ends early, still written."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def finish(
    options: SniffOptions,
    part: Path,
    elapsed: float,
    *,
    nothing: str,
    comments: int = 0,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """Redact or convert the closed ``part`` as asked, move it to ``--out``.

    Returns the summary; raises ConfigError(``nothing``) if nothing was
    recorded.
    """
    data = await asyncio.to_thread(part.read_bytes)
    if not data:
        await asyncio.to_thread(part.unlink)
        raise ConfigError(nothing)
    if options.redact:
        data = redact(data, key=secrets.token_bytes(32), truncate=options.truncate)
    if options.format == "btsnoop":
        data = pcapng_to_btsnoop(data)
    await asyncio.to_thread(part.write_bytes, data)
    await asyncio.to_thread(part.replace, options.out)
    return _summary(options, data, comments, elapsed, extra or {})


async def _sniff(options: SniffOptions, state_flag: str | None) -> dict[str, object]:
    recorder = Recorder(plaintext=options.plaintext)
    async with part_file(options.out) as (part, file):
        started = time.monotonic()
        with stop_on_signals() as stop:
            async with contextlib.AsyncExitStack() as stack:
                daemon = await stack.enter_async_context(
                    _daemon(options, state_flag, recorder)
                )
                if options.plaintext:
                    recorder.watch(daemon.links)
                task = asyncio.create_task(daemon.run(), name="sniff daemon")
                try:
                    await _record(options, recorder, file, task, started, stop)
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await daemon.close()
        recorder.close_all()
        await asyncio.to_thread(file.write, recorder.take(final=True))
    return await finish(
        options,
        part,
        time.monotonic() - started,
        nothing="no glasses connected: nothing was recorded",
        comments=recorder.comments if options.plaintext else 0,
    )


async def _record(
    options: SniffOptions,
    recorder: Recorder,
    file: BinaryIO,
    task: asyncio.Task[None],
    started: float,
    stop: asyncio.Event,
) -> None:
    """Flush to the file and show progress until the time is up (or ``stop``)."""
    write = file.write
    deadline = started + options.duration
    next_progress = started + PROGRESS_INTERVAL_S
    tty = sys.stderr.isatty()
    while (
        (now := time.monotonic()) < deadline and not task.done() and not stop.is_set()
    ):
        await asyncio.sleep(min(FLUSH_INTERVAL_S, deadline - now))
        chunk = recorder.take()
        if chunk:
            await asyncio.to_thread(write, chunk)
        now = time.monotonic()
        if next_progress <= now < deadline and not stop.is_set():
            next_progress += PROGRESS_INTERVAL_S
            progress(recorder, now - started, tty=tty)
    if task.done() and not task.cancelled():
        task.result()  # the daemon stopped: say why
    progress(recorder, time.monotonic() - started, tty=tty, last=True)


class Counts(Protocol):
    """What the progress line shows."""

    @property
    def values(self) -> int:
        """ATT values recorded."""

    @property
    def packets(self) -> int:
        """Packets written."""

    @property
    def bytes(self) -> int:
        """Bytes written."""


def progress(counts: Counts, elapsed: float, *, tty: bool, last: bool = False) -> None:
    """The progress line on standard error (rewritten in place on a terminal)."""
    line = (
        f"sniff: {elapsed:5.1f} s, {counts.values} ATT values, "
        f"{counts.packets} packets, {counts.bytes} bytes"
    )
    if tty:
        sys.stderr.write("\r" + line + ("\n" if last else ""))
        sys.stderr.flush()
    else:
        say(line)


@contextlib.asynccontextmanager
async def _daemon(
    options: SniffOptions, state_flag: str | None, recorder: Recorder
) -> AsyncIterator[Daemon]:
    """The daemon (no uplink) with the recorder tapping its links."""
    from relay.ble.link import BackendSpec, LinkConfig
    from relay.cloudlink import CloudConfig
    from relay.daemon import Daemon, DaemonConfig
    from relay.outbox import Outbox
    from relay.state import ensure_state_dir, resolve_state_dir

    async with contextlib.AsyncExitStack() as stack:
        if options.sim:
            from relay.sim.bed import in_process
            from relay.sim.glasses import GlassesAppConfig
            from relay.sim.profiles import get_profile

            temp = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="glasses-relay-sniff-")
            )
            state = ensure_state_dir(Path(temp) / "state")
            bed = await stack.enter_async_context(
                in_process(
                    state,
                    get_profile(options.profile),
                    GlassesAppConfig(scenario="day", seed=options.seed),
                )
            )
            backend = dataclasses.replace(bed.backend, tap=recorder)
            link = LinkConfig(scan_timeout=5.0, connect_timeout=10.0)
        else:
            state = ensure_state_dir(resolve_state_dir(state_flag))
            address = options.address
            assert address is not None  # noqa: S101
            backend = BackendSpec(tap=recorder)
            link = LinkConfig(address=address)
            await _check_adapter(address, link.scan_timeout)
        ensure_state_dir(state / "phone")
        outbox = await Outbox.open(state / "phone" / "outbox.sqlite3")
        stack.push_async_callback(outbox.close)
        config = DaemonConfig(
            state_dir=state, link=link, cloud=CloudConfig(announce_presence=False)
        )
        yield Daemon(config, backend, None, outbox=outbox)


async def _check_adapter(address: str, scan_s: float) -> None:
    """Fail with one line when there is no adapter or the glasses are absent."""
    from bleak import BleakScanner
    from bleak.exc import BleakError

    try:
        device = await BleakScanner.find_device_by_address(address, timeout=scan_s)
    except (BleakError, OSError) as exc:
        raise ConfigError(
            f"no usable Bluetooth adapter ({type(exc).__name__}: {exc}); "
            "is the adapter on and BlueZ running?"
        ) from None
    if device is None:
        raise ConfigError(
            f"glasses {address} not seen within {scan_s:g} s; are they on, in "
            "range and not connected to another phone?"
        )


def _summary(
    options: SniffOptions,
    data: bytes,
    comments: int,
    elapsed: float,
    extra: dict[str, object],
) -> dict[str, object]:
    capture = read_capture(data)
    summary = summarize(capture)
    att = summary.att.to_dict()
    pdus = sum(1 for op in capture.att if op.opcode in (0x1B, 0x1D, 0x12, 0x52))
    duration = capture.duration_s
    doc: dict[str, object] = {
        "out": str(options.out),
        "format": options.format,
        "source": options.source,
        "duration_s": round(elapsed, 3),
        "capture_duration_s": round(duration, 3),
        "packets": capture.packets,
        "bytes": len(data),
        "connections": len(capture.connections),
        "att": att,
        "att_pdus": summary.att_total,
        "values": pdus,
        "values_per_s": round(pdus / duration, 2) if duration > 0 else 0.0,
        "plaintext_comments": comments,
        "redacted": options.redact,
        "truncate": options.truncate,
        **extra,
    }
    say(
        f"sniff: wrote {options.out} ({options.format}, {capture.packets} packets, "
        f"{len(data)} bytes, {pdus} ATT values, {doc['values_per_s']}/s)"
    )
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.sniff ...``: the subcommand without the dispatcher."""
    from tools.cli import main as cli_main

    return cli_main(["sniff", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
