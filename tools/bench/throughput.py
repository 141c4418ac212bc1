"""``glasses-relay bench throughput`` and ``bench soak``: the relay under full load.

Two modes, each run twice in one invocation on the same input: once with the
daemon as shipped (``batched``) and once as a ``naive`` relay (the same daemon
code configured with batching off: one envelope per publish, one outbox
commit per message), and the ratio between the two is reported.

``e2e``
    Everything in its own process: a private mosquitto (MQTT uplink), the
    reference gateway (``glasses-relay cloud --ledger``), emulated glasses
    saturating a link profile (:func:`glasses_main`, bumble served as HCI over
    TCP) and the daemon itself (``glasses-relay run --sim tcp-client:...``
    under :func:`probe_main`). The window starts after connect, discovery,
    handshake and a warm-up. The daemon's CPU is read from procfs; the probe
    inside it samples its main thread to split off the emulated phone-side
    Bluetooth host stack (bumble, bleak and the bumble backend).

``pipeline``
    The daemon in this process, its BLE seam replaced by a bleak backend whose
    peer hands over records sealed before timing starts (:class:`_FakeClient`,
    :class:`_Injector`) as fast as the daemon takes them: paced by the phone's
    acknowledgements and by a backlog of half a second at the gateway, so the
    rate measured is the one the daemon sustains end to end. The gateway runs
    in its own process. CPU is this process's (``getrusage``) minus the
    harness's own time, measured with ``perf_counter``.

The naive relay is configuration only (:func:`relay_settings`): one envelope
per payload, one outbox transaction per message and, where the daemon has the
knob, one payload per pump round, each QoS 1 publish awaited in turn.

Payload messages are EVENTs whose body starts with a magic, a sequence number
and the send time, then filler to ``--message-bytes``; the gateway's ledger
gives each id's receipt time, matched with what reached the daemon to count
loss, duplicates (lines per id after the gateway's de-duplication),
reordering (ledger order against sequence numbers) and the added latency
(last fragment at the daemon to the gateway's ``processed`` line). Timestamps
compared across processes are wall-clock (the ledger's clock); durations
inside one process use ``perf_counter``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import IO, Any, Final

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError

from protocol.constants import (
    MESSAGE_HEADER_SIZE,
    Channel,
    Limits,
    MessageFlags,
    MessageKind,
)
from protocol.gatt import NAME_PREFIX, RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID
from protocol.message import Message
from protocol.session import (
    Delivery,
    HandshakeCompleted,
    Identity,
    MessageReceived,
    MessagesAcknowledged,
    PeerPolicy,
    Role,
    Session,
    SessionConfig,
    SessionEvent,
)
from relay.errors import ConfigError
from relay.sim.profiles import PROFILES, LinkProfile
from tools.bench.children import CODE_ROOT, code_env, module_command

__all__ = [
    "REFERENCE_CEILING",
    "BenchSpec",
    "RelayFigures",
    "ThroughputResult",
    "glasses_main",
    "probe_main",
    "run_e2e",
    "run_pipeline",
]

REFERENCE_CEILING: Final = PROFILES["android-2m"].ceiling_bytes_per_s
"""162,667 B/s: the 2M PHY link with events filled (the pipeline's yardstick)."""

DEFAULT_MESSAGE_BYTES: Final = 4096
"""Payload per message: the glasses' photo chunk (relay.sim.glasses)."""
PIPELINE_FRAGMENT: Final = 244
"""Notification size at the link seam in pipeline mode (ATT MTU 247)."""

_MAGIC: Final = b"GRTB"
_PAYLOAD_HEADER: Final = struct.Struct(">4sQQ")
"""Bench payload header: magic, sequence number, send time (ns since the epoch)."""
_LAST: Final = 0x4000
_BENCH_CHANNEL: Final = Channel.INTERACTIVE
"""EVENT messages travel on this channel; nothing else the bench sends does."""
_ATT_NOTIFICATION: Final = 0x1B
_ATT_CID: Final = b"\x04\x00"
_NOTIFY_OUTSTANDING: Final = 2048
"""Pipeline: fragments handed to bleak's callback and not yet acknowledged
(half the daemon's notify queue, so the harness never overflows it)."""
_BACKLOG_S: Final = 0.5
_QUIET_S: Final = 2.0
"""Pipeline: the longest the harness leaves the link silent (the phone's
supervision timeout is 8 s)."""
_PREPARE_SLICE: Final = 2048
"""Pipeline: messages sealed per step of the preparation; between steps the
event loop runs (the daemon, and a prepared message a second to keep the link
alive), so a long preparation never silences the link past the supervision
timeout."""
_CALIBRATION_S: Final = 2.0
_DRAIN_S: Final = 15.0
_SAMPLE_S: Final = 0.003
_GLASSES_WINDOW_S: Final = 0.25
"""Emulated glasses keep this much link time unacknowledged at most, beyond the
daemon's ``outbox.write_delay`` (the longest it holds a message unwritten, and
so unacknowledged, waiting for the gateway's ack), so their queue stays short
(nothing ages past the session's resend timer) yet never stalls the link."""
_REFERENCE_LOOPS: Final = 60_000
"""Iterations of the reference workload (8-10 ms on an uncontended core of the
machines in docs/benchmarks.md and docs/benchmarks-history.md)."""
_REFERENCE_EVERY_S: Final = 0.5
_MB: Final = 1_000_000
_FAKE_ADDRESS: Final = "C0:FF:EE:00:BE:01"
_FAKE_NAME: Final = f"{NAME_PREFIX}-bench"


# -- what a run measures ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchSpec:
    """One invocation: the input both relays get, and where the uplink goes.

    Attributes:
        mode: ``e2e``, ``pipeline`` or ``soak`` (e2e, batched relay only).
        profile: Link profile (e2e); None in pipeline mode unless given.
        uplink: ``mqtt`` or ``ws``.
        duration: Timed window, seconds.
        warmup: Seconds of full load before the window opens.
        message_bytes: Application payload per message.
        broker: An external broker URL (else a private mosquitto).
        gateway: An external gateway URL (``ws://``), with ``gateway_state``
            (its state directory) and ``gateway_ledger`` (its ``--ledger``).
        naive: Also run the naive relay.
        progress: Draw a progress line on standard error.
        cprofile: Write cProfile statistics of each daemon here (slow: the
            figures of such a run are not comparable).
    """

    mode: str
    profile: LinkProfile | None
    uplink: str
    duration: float
    warmup: float
    message_bytes: int = DEFAULT_MESSAGE_BYTES
    broker: str | None = None
    gateway: str | None = None
    gateway_state: Path | None = None
    gateway_ledger: Path | None = None
    naive: bool = True
    progress: bool = False
    cprofile: Path | None = None

    @property
    def fragment_size(self) -> int:
        """Notification size: ATT MTU - 3 of the profile (capped at 512)."""
        if self.profile is None:
            return PIPELINE_FRAGMENT
        return min(512, self.profile.att_payload)

    @property
    def ceiling(self) -> float:
        """The link's goodput ceiling (the reference one in pipeline mode)."""
        if self.mode == "pipeline" or self.profile is None:
            return REFERENCE_CEILING
        return self.profile.ceiling_bytes_per_s


@dataclass(slots=True)
class RelayFigures:
    """What one relay (batched or naive) achieved in its window."""

    relay: str
    settings: dict[str, object]
    window_s: float
    messages_offered: int
    messages_delivered: int
    bytes_delivered: int
    goodput_bytes_per_s: float
    ceiling_bytes_per_s: float | None
    goodput_ratio: float
    link_efficiency: float | None
    cpu_fraction: float
    cpu_s_per_mb: float | None
    bytes_per_cpu_s: float | None
    bt_host_cpu_fraction: float | None
    bt_host_share: float | None
    cpu_fraction_without_bt_host: float | None
    added_latency_ms: dict[str, float | None]
    peak_rss_mb: float
    lost: int
    duplicated: int
    reordered: int
    queued_at_end: int = 0
    gateway_cpu_fraction: float | None = None
    broker_cpu_fraction: float | None = None
    reference_ms: dict[str, float | None] = field(default_factory=dict)
    """The reference workload's CPU ms over the window (p10, p50, p90)."""
    hot_spots: list[tuple[str, float]] = field(default_factory=list)
    hot_spots_own: list[tuple[str, float]] = field(default_factory=list)
    resources: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The fields as a JSON-ready mapping."""
        out = dataclasses.asdict(self)
        out["hot_spots"] = [{"where": w, "share": s} for w, s in self.hot_spots]
        out["hot_spots_own"] = [{"where": w, "share": s} for w, s in self.hot_spots_own]
        return out


@dataclass(slots=True)
class ThroughputResult:
    """One invocation: the batched relay's figures, the naive one's, the ratios."""

    mode: str
    profile: str | None
    uplink: str
    message_bytes: int
    fragment_size: int
    encryption: dict[str, str]
    outbox_sync: str
    batched: RelayFigures
    naive: RelayFigures | None
    machine: dict[str, object]

    def ratios(self) -> dict[str, float | None]:
        """Batched over naive (for CPU per MB: naive over batched)."""
        naive = self.naive
        if naive is None:
            return {}
        b = self.batched

        def div(a: float | None, c: float | None) -> float | None:
            if a is None or c is None or c <= 0:
                return None
            return round(a / c, 3)

        return {
            "goodput": div(b.goodput_bytes_per_s, naive.goodput_bytes_per_s),
            "bytes_per_cpu_s": div(b.bytes_per_cpu_s, naive.bytes_per_cpu_s),
            "cpu_s_per_mb": div(naive.cpu_s_per_mb, b.cpu_s_per_mb),
        }

    def to_json(self) -> dict[str, object]:
        """One JSON object: the batched figures at the top, ``naive`` nested."""
        out: dict[str, object] = {
            "mode": self.mode,
            "profile": self.profile,
            "uplink": self.uplink,
            "message_bytes": self.message_bytes,
            "fragment_size": self.fragment_size,
            "encryption": self.encryption,
            "outbox_sync": self.outbox_sync,
            "machine": self.machine,
        }
        out.update(self.batched.to_json())
        out["naive"] = None if self.naive is None else self.naive.to_json()
        out["batched_over_naive"] = self.ratios()
        if self.mode == "pipeline":
            out["ceiling_multiple"] = round(
                self.batched.goodput_bytes_per_s / REFERENCE_CEILING, 2
            )
            out["naive_ceiling_multiple"] = (
                None
                if self.naive is None
                else round(self.naive.goodput_bytes_per_s / REFERENCE_CEILING, 2)
            )
        return out


def machine() -> dict[str, object]:
    """Where the run happened (CPU model, cores, load, Python)."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_1m": round(load[0], 2),
        "python": platform.python_version(),
    }


# -- counting what arrived -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sent:
    """A payload message as the daemon got it."""

    seq: int
    size: int
    arrived: float
    """Wall-clock time its last fragment reached the daemon."""


@dataclass(frozen=True, slots=True)
class _Window:
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def __contains__(self, t: float) -> bool:
        return self.start <= t <= self.end


@dataclass(slots=True)
class _Tally:
    """Delivery figures of one window, from what was sent and the gateway's ledger."""

    offered: int
    delivered: int
    bytes_delivered: int
    lost: int
    duplicated: int
    reordered: int
    latencies: list[float]
    queued: int = 0

    @classmethod
    def count(
        cls,
        sent: dict[str, _Sent],
        ledger: Sequence[tuple[str, float]],
        window: _Window,
        queued: frozenset[str] = frozenset(),
    ) -> _Tally:
        """Judge the messages whose last fragment reached the daemon in ``window``.

        ``ledger`` is the gateway's ``processed`` lines in file order;
        ``queued`` the ids still in the daemon's outbox once it stopped
        (durable, not delivered yet: not lost).
        """
        first: dict[str, float] = {}
        lines: collections.Counter[str] = collections.Counter()
        order: list[str] = []
        for mid, t in ledger:
            if mid not in sent:
                continue
            lines[mid] += 1
            if mid not in first:
                first[mid] = t
                order.append(mid)
        offered = {mid for mid, s in sent.items() if s.arrived in window}
        delivered = offered & first.keys()
        reordered = 0
        highest = -1
        for mid in order:
            if mid not in offered:
                continue
            seq = sent[mid].seq
            if seq < highest:
                reordered += 1
            highest = max(highest, seq)
        waiting = (offered - delivered) & queued
        return cls(
            offered=len(offered),
            delivered=len(delivered),
            bytes_delivered=sum(
                sent[mid].size for mid, t in first.items() if t in window
            ),
            lost=len(offered) - len(delivered) - len(waiting),
            queued=len(waiting),
            duplicated=sum(lines[mid] - 1 for mid in offered if lines[mid] > 1),
            reordered=reordered,
            latencies=sorted(first[mid] - sent[mid].arrived for mid in delivered),
        )

    def latency_ms(self) -> dict[str, float | None]:
        """p50, p99 and max of the added latency, in milliseconds."""
        values = self.latencies
        if not values:
            return {"p50": None, "p99": None, "max": None}
        return {
            "p50": round(_percentile(values, 0.50) * 1000, 2),
            "p99": round(_percentile(values, 0.99) * 1000, 2),
            "max": round(values[-1] * 1000, 2),
        }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class _LedgerTail:
    """The gateway's ledger, read incrementally: ``processed`` lines in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self.lines: list[tuple[str, float]] = []

    def read(self) -> int:
        """Read what was appended; return how many new ``processed`` lines."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        before = len(self.lines)
        for raw in complete.splitlines():
            entry = json.loads(raw)
            if entry.get("event") == "processed":
                self.lines.append((str(entry["id"]), float(entry["t"])))
        return len(self.lines) - before


# -- process figures (procfs) ----------------------------------------------------

_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or one of its threads)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    text = Path(path).read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB), Threads, and open file descriptors of a process."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return out


def _rss_mb(kb: int) -> float:
    return round(kb * 1024 / _MB, 1)


# -- the reference workload: how fast the machine ran during a window ------------


def reference_workload(loops: int = _REFERENCE_LOOPS) -> float:
    """Run a fixed pure-Python workload; return the CPU milliseconds it took.

    Dictionary stores and lookups, the interpreter's everyday work: a core
    shared with a busy neighbour (a hyperthread sibling on a cloud host, a
    noisy VM) runs it, like the daemon, more slowly, and CPU time counts
    that slowness as use.
    """
    started = time.thread_time()
    table: dict[int, int] = {}
    total = 0
    for i in range(loops):
        table[i & 1023] = i
        total += table.get((i >> 3) & 1023, 0)
    return (time.thread_time() - started) * 1000.0


def reference_main(argv: Sequence[str]) -> int:
    """``python -m tools.bench.throughput reference SECONDS``.

    Runs :func:`reference_workload` every 0.5 s for ``SECONDS`` (about 2%
    of a core) and prints the times in milliseconds as one JSON list.
    """
    parser = argparse.ArgumentParser(prog="throughput reference")
    parser.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    end = time.monotonic() + args.seconds
    times: list[float] = []
    while time.monotonic() < end:
        times.append(round(reference_workload(), 3))
        time.sleep(_REFERENCE_EVERY_S)
    sys.stdout.write(json.dumps(times) + "\n")
    return 0


class _Reference:
    """The reference workload, timed in its own process over one window."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start timing (at the window's start)."""
        self._proc = await asyncio.create_subprocess_exec(
            *module_command("tools.bench.throughput", "reference", str(self._seconds)),
            env=code_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def result(self) -> dict[str, float | None]:
        """Percentiles of the times, in ms; empty if the process failed."""
        proc = self._proc
        if proc is None:
            return {}
        try:
            async with asyncio.timeout(self._seconds + 30):
                out, _ = await proc.communicate()
            times = [float(t) for t in json.loads(out or b"[]")]
        except (TimeoutError, ValueError, TypeError):
            return {}
        finally:
            self.stop()
        return reference_summary(times)

    def stop(self) -> None:
        """Kill the process if it still runs (a window that ended in an error)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()


def reference_summary(times: Sequence[float]) -> dict[str, float | None]:
    """p10, p50 and p90 of the reference times (ms) and how many there were."""
    ordered = sorted(times)
    if not ordered:
        return {"p10": None, "p50": None, "p90": None, "samples": 0}
    at = {
        f"p{round(q * 100)}": round(_percentile(ordered, q), 2) for q in (0.1, 0.5, 0.9)
    }
    return {**at, "samples": len(ordered)}


# -- the sampler: who spends the daemon's CPU ------------------------------------

_BT_PARTS: Final = ("/bumble/", "/bleak/", "/bleak_retry_connector/", "/relay/sim/")
_OWN_PARTS: Final = ("/relay/", "/protocol/", "/tools/")


class Sampler:
    """Samples the main thread's Python stack to split its CPU by component.

    A SIGPROF every ``interval`` seconds of the process's CPU time interrupts
    the main thread (signal handlers run there, between bytecodes), so a
    sample lands where the main thread spends CPU, whether in pure Python or
    in a C call (counted on return); a main thread found waiting in the
    selector is ``idle`` (another thread had the CPU). A sample's category
    is that of its innermost frame in the project (``daemon``), the emulated
    Bluetooth host (``bt_host``: bumble, bleak, the bumble backend) or this
    harness (``harness``); :meth:`classify` says how the rest is judged. Only
    ratios of busy samples are used, times the main thread's measured CPU;
    the handler's own CPU is measured so that it can be subtracted.

    Call :meth:`start` and :meth:`stop` from the main thread.
    """

    def __init__(self, interval: float = _SAMPLE_S) -> None:
        """Prepare; nothing is sampled before :meth:`start`."""
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self.hot: collections.Counter[str] = collections.Counter()
        self.own: collections.Counter[str] = collections.Counter()
        self.cpu_s = 0.0
        self.active = False
        """Count samples only while set (any thread may set it)."""
        self._kinds: dict[CodeType, str | None] = {}
        self._previous: Any = None

    def start(self) -> None:
        """Install the SIGPROF handler and start the profiling timer."""
        self._previous = signal.signal(signal.SIGPROF, self._on_signal)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        """Stop the timer and restore the previous handler."""
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        if self._previous is not None:
            signal.signal(signal.SIGPROF, self._previous)
            self._previous = None

    def _kind(self, code: CodeType) -> str | None:
        kind = self._kinds.get(code, "?")
        if kind != "?":
            return kind
        name = code.co_filename
        if name == __file__:
            kind = "harness"
        elif any(part in name for part in _BT_PARTS):
            kind = "bt_host"
        elif name.startswith(CODE_ROOT) and any(part in name for part in _OWN_PARTS):
            kind = "daemon"
        else:
            kind = None
        self._kinds[code] = kind
        return kind

    @staticmethod
    def where(code: CodeType) -> str:
        """``path:function`` of a code object, the path shortened."""
        name = code.co_filename
        if "site-packages/" in name:
            name = name.split("site-packages/", 1)[1]
        elif name.startswith(CODE_ROOT + "/"):
            name = name[len(CODE_ROOT) + 1 :]
        elif "/lib/python3" in name:
            name = name.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return f"{name}:{code.co_name}"

    def classify(self, frame: FrameType) -> tuple[str, str, str]:
        """Return (category, innermost function, innermost own function).

        Library code run as an event-loop callback belongs to the owner of
        the callback (bumble's HCI transport: ``bt_host``; aiomqtt, paho,
        aiohttp: ``daemon``); the loop's own bookkeeping is ``loop``.
        """
        code = frame.f_code
        if code.co_name == "select" and code.co_filename.endswith("selectors.py"):
            return "idle", "", ""
        walker: FrameType | None = frame
        while walker is not None:
            walker_code = walker.f_code
            kind = self._kind(walker_code)
            if kind is not None:
                return kind, self.where(code), self.where(walker_code)
            if walker_code.co_name == "_run" and walker_code.co_filename.endswith(
                "asyncio/events.py"
            ):
                return self._callback_owner(walker), self.where(code), ""
            if walker_code.co_name == "_run_once":
                break  # the loop's own bookkeeping
            walker = walker.f_back
        return "loop", self.where(code), ""

    @staticmethod
    def _callback_owner(frame: FrameType) -> str:
        callback = getattr(frame.f_locals.get("self"), "_callback", None)
        owner = getattr(callback, "__self__", None)
        owner = getattr(owner, "_protocol", owner)
        module = (
            type(owner).__module__
            if owner is not None
            else str(getattr(callback, "__module__", ""))
        )
        if module.startswith(("bumble", "bleak", "relay.sim")):
            return "bt_host"
        if module.startswith(("aiomqtt", "paho", "aiohttp", "relay", "protocol")):
            return "daemon"
        if module.startswith("tools.bench"):
            return "harness"
        return "loop"

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum
        if not self.active or frame is None:
            return
        started = time.thread_time()
        kind, where, own = self.classify(frame)
        self.counts[kind] += 1
        if kind != "idle":
            self.hot[f"{kind}  {where}"] += 1
            self.own[f"{kind}  {own or where}"] += 1
        self.cpu_s += time.thread_time() - started

    def split(self) -> dict[str, float]:
        """Shares of the busy samples by category."""
        busy = sum(n for k, n in self.counts.items() if k != "idle")
        if not busy:
            return {}
        return {k: n / busy for k, n in self.counts.items() if k != "idle"}

    @staticmethod
    def _top(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        busy = sum(counter.values())
        if not busy:
            return []
        return [(k, round(v / busy, 4)) for k, v in counter.most_common(n)]

    def top(self, n: int = 15) -> list[tuple[str, float]]:
        """The ``n`` busiest innermost functions, as shares of busy samples."""
        return self._top(self.hot, n)

    def top_own(self, n: int = 15) -> list[tuple[str, float]]:
        """The ``n`` busiest innermost project functions (callers of libraries)."""
        return self._top(self.own, n)

    def report(self) -> dict[str, object]:
        """Counts, shares and hot spots, JSON-ready."""
        return {
            "counts": dict(self.counts),
            "split": {k: round(v, 4) for k, v in self.split().items()},
            "top": self.top(20),
            "top_own": self.top_own(20),
            "sampler_cpu_s": round(self.cpu_s, 4),
        }


# -- the probe: the daemon process, sampled ---------------------------------------


class _RecordingPolicy(asyncio.DefaultEventLoopPolicy):
    """The default policy, remembering the loop it makes (for counting tasks)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: asyncio.AbstractEventLoop | None = None

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        self.loop = loop
        return loop


class _Probe:
    """Watches the control file; samples and measures inside the bench window."""

    def __init__(self, out: Path, control: Path, policy: _RecordingPolicy) -> None:
        self.out = out
        self.control = control
        self.policy = policy
        self.sampler = Sampler()
        self.tasks: dict[str, int] = {}
        self.marks: dict[str, dict[str, float]] = {}
        self.written = False
        self._stop = threading.Event()
        self._main_clock = time.pthread_getcpuclockid(
            threading.main_thread().ident or 0
        )
        self._thread = threading.Thread(target=self._run, name="bench-probe")
        self._thread.daemon = True

    def start(self) -> None:
        self.sampler.start()
        self._thread.start()

    def _mark(self, name: str) -> None:
        times = os.times()
        self.marks[name] = {
            "t": time.time(),
            "process_cpu_s": times.user + times.system,
            "main_cpu_s": time.clock_gettime(self._main_clock),
        }
        loop = self.policy.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._count_tasks, name)

    def _count_tasks(self, name: str) -> None:
        self.tasks[name] = len(asyncio.all_tasks())

    def _run(self) -> None:
        window: tuple[float, float] | None = None
        while window is None:
            if self._stop.wait(0.05):
                return
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(self.control.read_text())
                window = (float(data["start"]), float(data["end"]))
        # Asleep until each mark, not polling: this thread's wake-ups would be
        # charged to the daemon's CPU (20 a second inside the window before).
        if self._stop.wait(max(0.0, window[0] - time.time())):
            return
        self._mark("start")
        self.sampler.active = True
        if self._stop.wait(max(0.0, window[1] - time.time())):
            return
        self.sampler.active = False
        self._mark("end")
        self._stop.wait(0.2)  # let the loop count its tasks
        self.write()

    def write(self) -> None:
        self.written = True
        report: dict[str, object] = {
            "marks": self.marks,
            "tasks": self.tasks,
            "sampler": self.sampler.report(),
        }
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(self.out)

    def close(self) -> None:
        self._stop.set()
        self.sampler.stop()
        if not self.written and "end" in self.marks:
            self.write()


def probe_main(argv: Sequence[str]) -> int:
    """``python -m tools.bench.throughput probe --out F --control C -- ARGS``.

    Runs ``glasses-relay ARGS`` (the daemon, unchanged) in this process with a
    sampling thread; between the times the bench writes into the control
    file it samples the main thread and notes CPU and asyncio tasks, then
    writes them to ``--out``.
    """
    parser = argparse.ArgumentParser(prog="throughput probe")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--cprofile", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cli_args = args.args[1:] if args.args[:1] == ["--"] else list(args.args)
    policy = _RecordingPolicy()
    asyncio.set_event_loop_policy(policy)
    probe = _Probe(args.out, args.control, policy)
    probe.start()
    from tools.cli import main

    with _cprofiled(args.cprofile):
        try:
            return main(cli_args)
        finally:
            probe.close()


@contextlib.contextmanager
def _cprofiled(path: Path | None) -> Iterator[None]:
    """Run the body under cProfile and write stats to ``path`` (and a .txt)."""
    if path is None:
        yield
        return
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        path.with_suffix(".txt").write_text(text.getvalue())


# -- the emulated glasses process ------------------------------------------------


def _payload(seq: int, size: int, pad: bytes) -> bytes:
    """A bench payload: magic, sequence number, send time, then filler."""
    header = _PAYLOAD_HEADER.pack(_MAGIC, seq, time.time_ns())
    return header + pad[: size - len(header)]


def _filler(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _glasses_window(profile: LinkProfile, message_bytes: int) -> int:
    """Unacknowledged bytes the emulated glasses allow themselves."""
    from relay.outbox import OutboxConfig

    record = message_bytes + MESSAGE_HEADER_SIZE
    if not profile.shaped:
        return max(8 * record, 1 << 19)
    seconds = _GLASSES_WINDOW_S + OutboxConfig().write_delay
    return max(4 * record, int(profile.ceiling_bytes_per_s * seconds))


def _make_glasses_app(
    peripheral: Any,
    state_dir: Path,
    message_bytes: int,
    window: int,
    arrivals: IO[str],
) -> Any:
    """The bench's glasses app: a GlassesApp whose scenario saturates the link."""
    from relay.sim.glasses import GlassesApp, GlassesAppConfig

    class BenchGlasses(GlassesApp):
        """Pairs and talks like the emulated glasses; sends bench EVENTs only."""

        def __init__(self) -> None:
            super().__init__(peripheral, state_dir, GlassesAppConfig(scenario="bench"))
            # A short queue: nothing may wait past the session's resend timer.
            self.delivery = Delivery(Limits(max_unacked_bytes=window))
            self.queued: collections.deque[tuple[int, str, float]] = collections.deque()
            self.unacked: dict[bytes, tuple[int, str, float]] = {}
            self.unmatched = 0
            self.lines: list[str] = []

        def on_arrival(self) -> None:
            """The last fragment of the oldest bench record went to the phone's host."""
            now = time.time()
            if not self.queued:
                self.unmatched += 1
                return
            seq, mid, queued = self.queued.popleft()
            self.lines.append(f"{seq} {mid} {message_bytes} {queued:.6f} {now:.6f}\n")

        def _on_event(self, event: SessionEvent) -> None:
            super()._on_event(event)
            if isinstance(event, MessagesAcknowledged):
                for message in event.messages:
                    self.unacked.pop(message.message_id, None)
            elif isinstance(event, HandshakeCompleted) and self.stats.handshakes > 1:
                # A new session (the phone renews keys every 10 minutes) sends
                # every unacknowledged message again first, in this order.
                self.queued = collections.deque(
                    self.unacked[m.message_id]
                    for m in self.delivery.sender.unacknowledged()
                    if m.message_id in self.unacked
                )

        def flush(self) -> None:
            if self.lines:
                arrivals.write("".join(self.lines))
                arrivals.flush()
                self.lines.clear()

        async def _play(self) -> None:
            await self._established.wait()
            pad = _filler(message_bytes)
            seq = 0
            while True:
                body = _payload(seq, message_bytes, pad)
                message = Message(
                    MessageKind.EVENT, os.urandom(16), body, MessageFlags.RELIABLE
                )
                await self._send(message)  # waits while the window is full
                entry = (seq, message.message_id.hex(), time.time())
                self.queued.append(entry)
                self.unacked[message.message_id] = entry
                seq += 1
                if seq % 64 == 0:
                    await asyncio.sleep(0)

    return BenchGlasses()


class _ArrivalHook:
    """Sees ACL data the phone's controller hands to the daemon's host."""

    def __init__(self) -> None:
        self.on_last: Callable[[], None] = lambda: None

    def observe(self, data: bytes) -> None:
        """Call ``on_last`` for a notification carrying a bench record's end."""
        # L2CAP basic header (length, CID 4 = ATT), ATT opcode and handle,
        # then the value: our 2-byte fragment header.
        if len(data) >= 9 and data[2:4] == _ATT_CID and data[4] == _ATT_NOTIFICATION:
            header = int.from_bytes(data[7:9], "big")
            if header & _LAST and (header >> 12) & 0x3 == _BENCH_CHANNEL:
                self.on_last()


async def _serve_glasses(args: argparse.Namespace) -> int:
    from bumble import hci

    from relay.sim.controller_fixes import FixedController, HciTcpServer
    from relay.sim.peripheral import (
        PHONE_CONTROLLER_ADDRESS,
        GlassesConfig,
        GlassesPeripheral,
    )
    from relay.sim.profiles import get_profile
    from relay.sim.shaped_link import ShapedLink, make_link

    hook = _ArrivalHook()

    class ArrivalController(FixedController):
        """The phone's controller, noting when bench records reach the host."""

        def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
            if isinstance(packet, hci.HCI_AclDataPacket) and packet.pb_flag != 1:
                hook.observe(packet.data)
            super().send_hci_packet(packet)

    profile = get_profile(args.profile)
    config = GlassesConfig()
    if profile.shaped:
        config = dataclasses.replace(config, max_mtu=profile.att_mtu)
    link = make_link(profile)
    glasses = GlassesPeripheral(link, config)
    controller = ArrivalController(
        "phone", link=link, public_address=PHONE_CONTROLLER_ADDRESS
    )
    server = HciTcpServer(controller, "127.0.0.1", args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with args.arrivals.open("w", encoding="ascii") as arrivals:
        app = _make_glasses_app(
            glasses,
            args.state_dir,
            args.message_bytes,
            _glasses_window(profile, args.message_bytes),
            arrivals,
        )
        hook.on_last = app.on_arrival
        await glasses.start()
        await server.start()
        sys.stdout.write(f"READY {server.port}\n")
        sys.stdout.flush()
        task = asyncio.create_task(app.run(), name="bench glasses")
        next_drop = time.monotonic() + args.drop_every
        try:
            while not stop.is_set() and not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await stop.wait()
                app.flush()
                if args.drop_every and time.monotonic() >= next_drop:
                    next_drop = time.monotonic() + args.drop_every
                    await app.drop_link()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            app.flush()
            arrivals.write(
                f"# handshakes {app.stats.handshakes} connections "
                f"{app.stats.connections} unmatched {app.unmatched}\n"
            )
            await app.close()
            await server.close()
            await glasses.stop()
            if isinstance(link, ShapedLink):
                link.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return 0


def glasses_main(argv: Sequence[str]) -> int:
    """``python -m tools.bench.throughput glasses``: saturating emulated glasses.

    Serves the phone's controller as HCI over TCP on 127.0.0.1 (``READY PORT``
    on standard output once listening), pairs through the shared state
    directory like ``glasses-relay sim``, then sends bench EVENTs as fast as
    the link and the phone's acknowledgements allow. Each record whose last
    fragment the phone's controller hands to the daemon's host is written to
    ``--arrivals`` (``seq id bytes queued_at arrived_at``, wall clock).
    """
    parser = argparse.ArgumentParser(prog="throughput glasses")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", default="android-2m", choices=sorted(PROFILES))
    parser.add_argument("--message-bytes", type=int, default=DEFAULT_MESSAGE_BYTES)
    parser.add_argument("--arrivals", type=Path, required=True)
    parser.add_argument(
        "--drop-every",
        type=float,
        default=0.0,
        help="drop the link every S seconds (to check the bench across reconnects)",
    )
    args = parser.parse_args(argv)
    from relay import log

    log.configure(0)
    return asyncio.run(_serve_glasses(args))


# -- child processes -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _child_env() -> dict[str, str]:
    """This environment, less the daemon's settings, with this code first on the path.

    The bench sets the daemon's settings itself; the path is
    :mod:`tools.bench.children`'s.
    """
    return code_env(
        {k: v for k, v in os.environ.items() if not k.startswith("GLASSES_RELAY_")}
    )


class _Child:
    """One child process; its standard error (and output) goes to a log file."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = workdir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, *, ready_line: bool = False) -> None:
        """Start it; with ``ready_line`` its output is kept for :meth:`ready`."""
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready_line else log,
                stderr=log,
                env=_child_env(),
            )

    async def ready(self) -> str:
        """Wait for its first line of output (started with ``ready_line``).

        Raises:
            ConfigError: it printed nothing within 30 s, or exited.
        """
        assert self.process is not None  # noqa: S101
        assert self.process.stdout is not None  # noqa: S101
        try:
            async with asyncio.timeout(30):
                line = await self.process.stdout.readline()
        except TimeoutError:
            line = b""
        if not line:
            raise ConfigError(f"{self.name} did not start: {self.tail()}")
        return line.decode().strip()

    def tail(self) -> str:
        """The end of its log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-6:]) or "(empty log)"

    def cpu_s(self) -> float | None:
        if not self.running:
            return None
        with contextlib.suppress(OSError, ValueError):
            return proc_cpu_s(self.pid)
        return None

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


class _Cpu:
    """CPU seconds of some processes at two instants."""

    def __init__(self, children: Sequence[_Child | None]) -> None:
        self._children = [c for c in children if c is not None]
        self._start = [c.cpu_s() for c in self._children]

    def fractions(self, seconds: float) -> list[float | None]:
        out: list[float | None] = []
        for child, start in zip(self._children, self._start, strict=True):
            end = child.cpu_s()
            out.append(
                None if start is None or end is None else (end - start) / seconds
            )
        return out


@dataclass(slots=True)
class _Cloud:
    """The broker (MQTT) and gateway an invocation uses, and the gateway's ledger."""

    state: Path
    uplink: str
    ledger: Path
    key_file: Path
    broker_url: str | None = None
    ws_url: str | None = None
    gateway: _Child | None = None
    broker_process: subprocess.Popen[bytes] | None = None

    @property
    def daemon_flags(self) -> list[str]:
        """``glasses-relay run`` flags that reach this cloud."""
        flags = ["--gateway-key", str(self.key_file)]
        if self.uplink == "mqtt":
            assert self.broker_url is not None  # noqa: S101
            return [*flags, "--broker", self.broker_url]
        assert self.ws_url is not None  # noqa: S101
        return [*flags, "--gateway", self.ws_url]

    def broker_cpu_s(self) -> float | None:
        if self.broker_process is None or self.broker_process.poll() is not None:
            return None
        with contextlib.suppress(OSError, ValueError):
            return proc_cpu_s(self.broker_process.pid)
        return None


def _start_broker(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A private mosquitto on a free loopback port (blocking; run in a thread).

    Persistence off, as in PERFORMANCE.md §1, and ``set_tcp_nodelay true``:
    mosquitto's default leaves Nagle's algorithm on, which stalls small QoS 1
    exchanges by the peer's delayed ACK (40 ms); that is the broker's
    configuration, not the daemon's cost.

    Raises:
        ConfigError: mosquitto is not installed or did not start.
    """
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        raise ConfigError(
            "--uplink mqtt needs a broker: install the 'mosquitto' package "
            "(apt-get install mosquitto) or pass --broker mqtt://HOST:PORT"
        )
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"set_tcp_nodelay true\nmax_queued_messages 100000\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
    )
    process = subprocess.Popen(  # noqa: S603
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return f"mqtt://127.0.0.1:{port}", process
        time.sleep(0.05)
    process.kill()
    raise ConfigError(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")


@contextlib.asynccontextmanager
async def _cloud(spec: BenchSpec, state: Path, workdir: Path) -> AsyncIterator[_Cloud]:
    """Start what the uplink needs (unless given): mosquitto, the gateway."""
    if spec.gateway is not None:
        # An external gateway: it must know this device, and we its key.
        assert spec.gateway_state is not None  # noqa: S101
        assert spec.gateway_ledger is not None  # noqa: S101
        from relay.identity import PhoneIdentity

        identity = PhoneIdentity(state)
        devices = spec.gateway_state / "gateway" / "devices"
        devices.mkdir(parents=True, exist_ok=True)
        record = devices / f"bench-{identity.device_id.hex()[:12]}.json"
        shutil.copyfile(state / "phone" / "device.json", record)
        key_file = spec.gateway_state / "gateway" / "public.json"
        if not key_file.exists():
            raise ConfigError(f"--gateway-state: {key_file} does not exist")
        yield _Cloud(state, "ws", spec.gateway_ledger, key_file, ws_url=spec.gateway)
        return
    cloud = _Cloud(
        state, spec.uplink, workdir / "gateway.jsonl", state / "gateway" / "public.json"
    )
    try:
        where: list[str]
        if spec.uplink == "mqtt":
            if spec.broker is not None:
                cloud.broker_url = spec.broker
            else:
                url, process = await asyncio.to_thread(_start_broker, workdir)
                cloud.broker_url = url
                cloud.broker_process = process
            where = ["--broker", cloud.broker_url, "--group", f"bench{os.getpid()}"]
        else:
            port = _free_port()
            cloud.ws_url = f"ws://127.0.0.1:{port}"
            where = ["--listen", f"127.0.0.1:{port}"]
        cloud.gateway = _Child(
            "gateway",
            [
                *module_command("tools.cli"), "--state-dir", str(state), "-v",
                "cloud", *where, "--ledger", str(cloud.ledger),
                "--latency-model", "none",
            ],
            workdir,
        )  # fmt: skip
        await cloud.gateway.start()
        deadline = time.monotonic() + 30
        while "cloud gateway started" not in cloud.gateway.log.read_text(
            errors="replace"
        ):
            if not cloud.gateway.running or time.monotonic() > deadline:
                raise ConfigError(f"the gateway did not start: {cloud.gateway.tail()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # its MQTT subscription, usually well under this
        yield cloud
    finally:
        if cloud.gateway is not None:
            await cloud.gateway.stop()
        if cloud.broker_process is not None:
            cloud.broker_process.terminate()
            await asyncio.to_thread(cloud.broker_process.wait, 10)


# -- relay settings --------------------------------------------------------------


def relay_settings(relay: str) -> dict[str, object]:
    """Configuration keys of a relay: none for ``batched`` (as shipped).

    ``naive``: one envelope per payload (``cloud.batch_items = 1``), one
    payload per pump round (``cloud.batches_per_send = 1``: each QoS 1
    publish awaited in order), and one outbox transaction per message, each
    awaited before the next message is taken (``outbox.commit_max_batch =
    1``, ``cloud.max_pending_puts = 1``, ``outbox.write_delay = 0``: every
    message written, none left unwritten for the gateway's acknowledgement).
    """
    if relay == "batched":
        return {}
    return {
        "cloud.batch_items": 1,
        "cloud.batches_per_send": 1,
        "cloud.max_pending_puts": 1,
        "outbox.commit_max_batch": 1,
        "outbox.write_delay": 0,
    }


def _effective(relay: str) -> dict[str, object]:
    """Every batching/commit setting in force, for the report."""
    from relay.cloudlink import CloudConfig
    from relay.outbox import OutboxConfig

    cloud, outbox = CloudConfig(), OutboxConfig()
    out: dict[str, object] = {
        "cloud.batch_items": cloud.batch_items,
        "cloud.batch_bytes": cloud.batch_bytes,
        "cloud.max_in_flight": cloud.max_in_flight,
        "cloud.batches_per_send": cloud.batches_per_send,
        "cloud.max_pending_puts": cloud.max_pending_puts,
        "outbox.commit_interval": outbox.commit_interval,
        "outbox.commit_max_batch": outbox.commit_max_batch,
        "outbox.write_delay": outbox.write_delay,
        "outbox.synchronous": str(outbox.synchronous),
    }
    out.update(relay_settings(relay))
    return out


def _toml(settings: dict[str, object]) -> str:
    sections: dict[str, list[str]] = {}
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {json.dumps(value)}")
    return "".join(
        f"[{section}]\n" + "\n".join(lines) + "\n"
        for section, lines in sections.items()
    )


def _configs(relay: str) -> tuple[Any, Any]:
    """(CloudConfig, OutboxConfig) of a relay, for the in-process daemon."""
    from relay.cloudlink import CloudConfig
    from relay.outbox import OutboxConfig

    cloud: dict[str, Any] = {}
    outbox: dict[str, Any] = {}
    for dotted, value in relay_settings(relay).items():
        section, key = dotted.split(".", 1)
        (cloud if section == "cloud" else outbox)[key] = value
    return CloudConfig(**cloud), OutboxConfig(**outbox)


async def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``check`` until true.

    Raises:
        ConfigError: still false after ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def _progress(elapsed: float, total: float, rate: float, label: str) -> None:
    width = 24
    done = min(width, int(width * elapsed / total)) if total else width
    sys.stderr.write(
        f"\r  {label:<8} [{'#' * done}{'.' * (width - done)}] "
        f"{elapsed:5.1f}/{total:.0f} s  {rate / 1000:8.1f} kB/s"
    )
    sys.stderr.flush()


# -- e2e: every part in its own process --------------------------------------------


async def _queued(outbox: Any, topic: str) -> frozenset[str]:
    """Ids of the messages still in an (open) outbox under ``topic``."""
    rows = await outbox.rows_with_topic(topic, 1 << 30)
    return frozenset(mid.hex() for mid, _ in rows)


async def _queued_in_file(state: Path) -> frozenset[str]:
    """Ids still in the outbox a stopped daemon left in ``state``."""
    from protocol.cloud import Channels
    from relay.identity import PhoneIdentity
    from relay.outbox import Outbox

    path = state / "phone" / "outbox.sqlite3"
    if not path.exists():
        return frozenset()
    topic = Channels.for_device(PhoneIdentity(state).device_id).up
    outbox = await Outbox.open(path)
    try:
        return await _queued(outbox, topic)
    finally:
        await outbox.close()


def _read_arrivals(path: Path) -> tuple[dict[str, _Sent], dict[str, int]]:
    """The glasses' arrivals file: what reached the daemon, and their counters."""
    sent: dict[str, _Sent] = {}
    counters: dict[str, int] = {}
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return sent, counters
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "#":
            counters = {parts[i]: int(parts[i + 1]) for i in range(1, len(parts), 2)}
            continue
        if len(parts) == 5:
            if parts[1] in sent:  # sent again on a new link: it arrived before
                counters["arrived_again"] = counters.get("arrived_again", 0) + 1
                continue
            sent[parts[1]] = _Sent(int(parts[0]), int(parts[2]), float(parts[4]))
    return sent, counters


@dataclass(slots=True)
class _Measured:
    """What the bench read at the edges of a window (e2e)."""

    window: _Window
    cpu_s: float
    status_start: dict[str, int]
    status_end: dict[str, int]
    gateway_cpu: float | None
    broker_cpu: float | None
    reference_ms: dict[str, float | None]


async def _e2e_relay(
    spec: BenchSpec, cloud: _Cloud, relay: str, workdir: Path, label: str
) -> RelayFigures:
    """Start glasses and daemon for one relay; measure one window; stop them."""
    assert spec.profile is not None  # noqa: S101
    state = cloud.state
    for stale in (state / "phone").glob("outbox.sqlite3*"):
        stale.unlink()
    run_dir = workdir / relay
    run_dir.mkdir()
    config = run_dir / "config.toml"
    config.write_text(_toml(relay_settings(relay)))
    arrivals = run_dir / "arrivals.txt"
    control = run_dir / "window.json"
    probe_out = run_dir / "probe.json"
    port = _free_port()
    glasses = _Child(
        f"{relay}-glasses",
        [
            *module_command("tools.bench.throughput", "glasses"),
            "--state-dir", str(state), "--port", str(port),
            "--profile", spec.profile.name,
            "--message-bytes", str(spec.message_bytes),
            "--arrivals", str(arrivals),
        ],
        workdir,
    )  # fmt: skip
    daemon = _Child(
        f"{relay}-daemon",
        [
            *module_command("tools.bench.throughput", "probe"),
            "--out", str(probe_out), "--control", str(control),
            *_cprofile_flag(spec, relay), "--",
            "--state-dir", str(state), "run", "--config", str(config),
            "--sim", f"tcp-client:127.0.0.1:{port}", *cloud.daemon_flags,
        ],
        workdir,
    )  # fmt: skip
    ledger = _LedgerTail(cloud.ledger)
    try:
        await glasses.start(ready_line=True)
        await daemon.start()  # it retries until the glasses listen
        await glasses.ready()
        deadline = time.monotonic() + 60
        while len(ledger.lines) < 5:
            for child in (glasses, daemon):
                if not child.running:
                    raise ConfigError(f"{child.name} stopped: {child.tail()}")
            if time.monotonic() > deadline:
                raise ConfigError(f"nothing reached the gateway: {daemon.tail()}")
            await asyncio.sleep(0.2)
            ledger.read()
        await _sleep_with_progress(spec, spec.warmup, ledger, "warm-up")
        measured = await _e2e_window(spec, cloud, daemon, control, ledger, label)
        # Drain: what reached the daemon in the window reaches the gateway.
        deadline = time.monotonic() + _DRAIN_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            sent, _ = _read_arrivals(arrivals)
            if (
                max((s.arrived for s in sent.values()), default=0)
                <= measured.window.end
            ):
                continue  # the glasses have not written past the window yet
            ledger.read()
            offered = {m for m, s in sent.items() if s.arrived in measured.window}
            if offered <= {mid for mid, _ in ledger.lines}:
                break
    finally:
        await asyncio.gather(glasses.stop(), daemon.stop())
    ledger.read()
    sent, counters = _read_arrivals(arrivals)
    probe: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        probe = json.loads(probe_out.read_text())
    queued = await _queued_in_file(state)
    return _e2e_figures(spec, relay, sent, counters, ledger, measured, probe, queued)


async def _sleep_with_progress(
    spec: BenchSpec, seconds: float, ledger: _LedgerTail, label: str
) -> None:
    start = time.monotonic()
    count = len(ledger.lines)
    while (elapsed := time.monotonic() - start) < seconds:
        await asyncio.sleep(min(1.0, seconds - elapsed))
        if spec.progress:
            ledger.read()
            done = (len(ledger.lines) - count) * spec.message_bytes
            now = time.monotonic() - start
            _progress(now, seconds, done / now, label)


async def _e2e_window(
    spec: BenchSpec,
    cloud: _Cloud,
    daemon: _Child,
    control: Path,
    ledger: _LedgerTail,
    label: str,
) -> _Measured:
    start = time.time()
    window = json.dumps({"start": start, "end": start + spec.duration})
    await asyncio.to_thread(control.write_text, window)
    cpu_start = proc_cpu_s(daemon.pid)
    status_start = proc_status(daemon.pid)
    others = _Cpu([cloud.gateway])
    broker_start = cloud.broker_cpu_s()
    reference = _Reference(spec.duration)
    await reference.start()
    try:
        await _sleep_with_progress(spec, spec.duration, ledger, label)
    except BaseException:
        reference.stop()
        raise
    end = time.time()
    cpu_end = proc_cpu_s(daemon.pid)
    status_end = proc_status(daemon.pid)
    seconds = end - start
    (gateway_cpu,) = others.fractions(seconds) or [None]
    broker_end = cloud.broker_cpu_s()
    broker_cpu = (
        None
        if broker_start is None or broker_end is None
        else (broker_end - broker_start) / seconds
    )
    if spec.progress:
        sys.stderr.write("\n")
    return _Measured(
        _Window(start, end),
        cpu_end - cpu_start,
        status_start,
        status_end,
        gateway_cpu,
        broker_cpu,
        await reference.result(),
    )


def _e2e_figures(
    spec: BenchSpec,
    relay: str,
    sent: dict[str, _Sent],
    counters: dict[str, int],
    ledger: _LedgerTail,
    measured: _Measured,
    probe: dict[str, Any],
    queued: frozenset[str],
) -> RelayFigures:
    window = measured.window
    tally = _Tally.count(sent, ledger.lines, window, queued)
    sampler = probe.get("sampler", {})
    marks = probe.get("marks", {})
    notes: list[str] = []
    cpu_s = measured.cpu_s - float(sampler.get("sampler_cpu_s", 0.0))
    bt_cpu: float | None = None
    if "start" in marks and "end" in marks and sampler.get("split"):
        main_cpu = marks["end"]["main_cpu_s"] - marks["start"]["main_cpu_s"]
        bt_cpu = main_cpu * float(sampler["split"].get("bt_host", 0.0))
    else:
        notes.append("the probe wrote no samples: no Bluetooth host split")
    if counters.get("handshakes", 1) > 1:
        notes.append(
            f"the link was re-established {counters['handshakes'] - 1} time(s) "
            "(the phone renews its session keys every 10 minutes); what was "
            "unacknowledged then was sent again and counted once"
        )
    if counters.get("unmatched", 0):
        notes.append(
            f"{counters['unmatched']} record ends reached the daemon that the "
            "glasses did not expect: some latencies may be mismatched"
        )
    tasks = probe.get("tasks", {})
    resources: dict[str, object] = {
        "link_handshakes": counters.get("handshakes"),
        "records_arrived_again": counters.get("arrived_again", 0),
        "rss_mb": [
            _rss_mb(measured.status_start["VmRSS"]),
            _rss_mb(measured.status_end["VmRSS"]),
        ],
        "rss_growth_mb": round(
            _rss_mb(measured.status_end["VmRSS"])
            - _rss_mb(measured.status_start["VmRSS"]),
            1,
        ),
        "fds": [measured.status_start["fds"], measured.status_end["fds"]],
        "threads": [measured.status_start["Threads"], measured.status_end["Threads"]],
        "asyncio_tasks": [tasks.get("start"), tasks.get("end")],
    }
    return _figures(
        spec,
        relay,
        window,
        tally,
        cpu_s,
        bt_cpu,
        _rss_mb(measured.status_end["VmHWM"]),
        gateway_cpu=measured.gateway_cpu,
        broker_cpu=measured.broker_cpu,
        reference_ms=measured.reference_ms,
        hot=[(str(k), float(v)) for k, v in sampler.get("top", [])],
        hot_own=[(str(k), float(v)) for k, v in sampler.get("top_own", [])],
        resources=resources,
        notes=notes,
    )


def _figures(
    spec: BenchSpec,
    relay: str,
    window: _Window,
    tally: _Tally,
    cpu_s: float,
    bt_cpu: float | None,
    peak_rss_mb: float,
    *,
    gateway_cpu: float | None,
    broker_cpu: float | None,
    reference_ms: dict[str, float | None],
    hot: list[tuple[str, float]],
    hot_own: list[tuple[str, float]],
    resources: dict[str, object],
    notes: list[str],
) -> RelayFigures:
    seconds = window.seconds
    goodput = tally.bytes_delivered / seconds
    if tally.queued:
        notes.append(
            f"{tally.queued} messages of the window were still queued in the "
            f"outbox (durable, not lost) when the {_DRAIN_S:g} s drain ended: "
            "this relay takes messages faster than it delivers them"
        )
    ceiling = spec.ceiling
    finite = math.isfinite(ceiling)
    mb = tally.bytes_delivered / _MB
    return RelayFigures(
        relay=relay,
        settings=_effective(relay),
        window_s=round(seconds, 3),
        messages_offered=tally.offered,
        messages_delivered=tally.delivered,
        bytes_delivered=tally.bytes_delivered,
        goodput_bytes_per_s=round(goodput, 1),
        ceiling_bytes_per_s=round(ceiling, 1) if finite else None,
        goodput_ratio=round(tally.delivered / tally.offered, 6)
        if tally.offered
        else 0.0,
        link_efficiency=round(goodput / ceiling, 4) if finite else None,
        cpu_fraction=round(cpu_s / seconds, 4),
        cpu_s_per_mb=round(cpu_s / mb, 4) if mb else None,
        bytes_per_cpu_s=round(tally.bytes_delivered / cpu_s, 1) if cpu_s > 0 else None,
        bt_host_cpu_fraction=None if bt_cpu is None else round(bt_cpu / seconds, 4),
        bt_host_share=None
        if bt_cpu is None or cpu_s <= 0
        else round(bt_cpu / cpu_s, 4),
        cpu_fraction_without_bt_host=(
            None if bt_cpu is None else round((cpu_s - bt_cpu) / seconds, 4)
        ),
        added_latency_ms=tally.latency_ms(),
        peak_rss_mb=peak_rss_mb,
        lost=tally.lost,
        duplicated=tally.duplicated,
        reordered=tally.reordered,
        queued_at_end=tally.queued,
        gateway_cpu_fraction=None if gateway_cpu is None else round(gateway_cpu, 4),
        broker_cpu_fraction=None if broker_cpu is None else round(broker_cpu, 4),
        reference_ms=reference_ms,
        hot_spots=hot,
        hot_spots_own=hot_own,
        resources=resources,
        notes=notes,
    )


def _cprofile_path(spec: BenchSpec, relay: str) -> Path | None:
    if spec.cprofile is None:
        return None
    spec.cprofile.mkdir(parents=True, exist_ok=True)
    return spec.cprofile / f"{spec.mode}-{relay}.prof"


def _cprofile_flag(spec: BenchSpec, relay: str) -> list[str]:
    path = _cprofile_path(spec, relay)
    return [] if path is None else ["--cprofile", str(path)]


def _relays(spec: BenchSpec) -> list[str]:
    return ["batched", "naive"] if spec.naive else ["batched"]


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="glasses-relay-bench-"))
    try:
        (path / "state").mkdir(mode=0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def run_e2e(spec: BenchSpec) -> ThroughputResult:
    """Run the e2e bench (see the module docstring): batched, then naive."""
    with _workdir() as workdir:
        state = workdir / "state"
        async with _cloud(spec, state, workdir) as cloud:
            figures = [
                await _e2e_relay(spec, cloud, relay, workdir, label=relay)
                for relay in _relays(spec)
            ]
    return _result(spec, figures)


def _result(spec: BenchSpec, figures: list[RelayFigures]) -> ThroughputResult:
    from protocol.session import SESSION_PROTOCOL
    from relay.outbox import OutboxConfig

    return ThroughputResult(
        mode=spec.mode,
        profile=None if spec.profile is None else spec.profile.name,
        uplink=spec.uplink,
        message_bytes=spec.message_bytes,
        fragment_size=spec.fragment_size,
        encryption={"link": SESSION_PROTOCOL, "envelope": "hpke"},
        outbox_sync=str(OutboxConfig().synchronous),
        batched=figures[0],
        naive=figures[1] if len(figures) > 1 else None,
        machine=machine(),
    )


# -- pipeline: the daemon in this process, records injected at its BLE seam --------


class _Peer:
    """The glasses end of the pipeline: one Session, no timers, no radio.

    Until :meth:`seal` it answers the handshake and acknowledges the phone's
    messages at once; from then on everything it sends was sealed in advance
    and is handed over by :class:`_Injector` (acknowledgements from the phone
    are still read, which paces the injection).
    """

    def __init__(self, identity: Identity, phone_public: bytes, fragment: int) -> None:
        limits = Limits(max_unacked_messages=1 << 30, max_unacked_bytes=1 << 40)
        self.session = Session(
            Role.GLASSES,
            identity,
            PeerPolicy(pinned=frozenset({phone_public})),
            delivery=Delivery(limits),
            # No timers here: acknowledge at once (no delayed ACK).
            config=SessionConfig(limits=limits, ack_delay=0),
        )
        self.fragment = fragment
        self.notify: Callable[[bytearray], None] | None = None
        self.established = asyncio.Event()
        self.on_acked: Callable[[tuple[Message, ...]], None] = lambda _: None
        self.acked_event = asyncio.Event()
        self.busy_s = 0.0
        self.dropped = False
        """Set when the daemon disconnects: the run cannot go on."""
        self._live = True

    def receive(self, data: bytes) -> None:
        """A write from the phone (its handshake, ACKs, MODE, heartbeats)."""
        started = time.perf_counter()
        session = self.session
        session.receive_fragment(data, time.monotonic())
        for event in session.events_received():
            if isinstance(event, HandshakeCompleted):
                self.established.set()
            elif isinstance(event, MessagesAcknowledged):
                self.on_acked(event.messages)
                self.acked_event.set()
            elif isinstance(event, MessageReceived) and (
                event.message.flags & MessageFlags.RELIABLE
            ):
                session.acknowledge(event.message.message_id)
        if self._live:
            self._flush()
        self.busy_s += time.perf_counter() - started

    def _flush(self) -> None:
        notify = self.notify
        while (piece := self.session.pull_fragment(self.fragment)) is not None:
            if notify is not None:
                notify(bytearray(piece))

    def seal(self, messages: Sequence[Message]) -> tuple[list[bytes], list[int]]:
        """Seal ``messages`` into fragments now; return them and each one's last."""
        self._live = False
        session = self.session
        now = time.monotonic()
        fragments: list[bytes] = []
        ends: list[int] = []
        for message in messages:
            session.send(message, now)
            while (piece := session.pull_fragment(self.fragment)) is not None:
                fragments.append(piece)
            ends.append(len(fragments) - 1)
        return fragments, ends


class _FakeScanner(BaseBleakScanner):
    """bleak scanner backend that sees the bench peer advertise every 50 ms."""

    def __init__(
        self,
        detection_callback: Any,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        bench_peer: _Peer | None = None,
        **kwargs: Any,
    ) -> None:
        del scanning_mode, kwargs, bench_peer
        super().__init__(detection_callback, service_uuids)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.seen_devices = {}
        self._task = asyncio.create_task(self._advertise())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _advertise(self) -> None:
        data = AdvertisementData(
            local_name=_FAKE_NAME,
            manufacturer_data={},
            service_data={},
            service_uuids=[SERVICE_UUID],
            tx_power=None,
            rssi=-40,
            platform_data=(),
        )
        while True:
            device = self.create_or_update_device(
                _FAKE_ADDRESS, _FAKE_ADDRESS, _FAKE_NAME, None, data
            )
            self.call_detection_callbacks(device, data)
            await asyncio.sleep(0.05)


class _FakeClient(BaseBleakClient):
    """bleak client backend whose GATT server is the bench peer (no radio)."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        services: set[str] | None = None,
        *,
        bench_peer: _Peer | None = None,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        del services, kwargs
        super().__init__(
            address_or_ble_device,
            disconnected_callback=disconnected_callback,
            timeout=timeout,
        )
        if bench_peer is None:
            raise BleakError("_FakeClient needs bench_peer=")
        self._peer = bench_peer
        self._connected = False

    @property
    def name(self) -> str:
        return _FAKE_NAME

    @property
    def mtu_size(self) -> int:
        return self._peer.fragment + 3

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        del pair, kwargs
        collection = BleakGATTServiceCollection()
        service = BleakGATTService(None, 1, SERVICE_UUID)
        collection.add_service(service)

        def size() -> int:
            return self._peer.fragment

        for handle, uuid, props in (
            (2, TX_CHAR_UUID, ["notify"]),
            (5, RX_CHAR_UUID, ["write-without-response"]),
        ):
            collection.add_characteristic(
                BleakGATTCharacteristic(None, handle, uuid, props, size, service)  # type: ignore[arg-type]
            )
        self.services = collection
        self._connected = True

    async def disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self._peer.notify = None
            self._peer.dropped = True
            if self._disconnected_callback is not None:
                asyncio.get_running_loop().call_soon(self._disconnected_callback)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    async def unpair(self) -> None:
        return

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, **kwargs: Any
    ) -> bytearray:
        del characteristic, kwargs
        return bytearray()

    async def read_gatt_descriptor(self, descriptor: Any, **kwargs: Any) -> bytearray:
        del descriptor, kwargs
        return bytearray()

    async def write_gatt_char(
        self, characteristic: BleakGATTCharacteristic, data: Any, response: bool
    ) -> None:
        del characteristic, response
        if not self._connected:
            raise BleakError("Not connected")
        self._peer.receive(bytes(data))

    async def write_gatt_descriptor(self, descriptor: Any, data: Any) -> None:
        del descriptor, data

    async def start_notify(
        self,
        characteristic: BleakGATTCharacteristic,
        callback: NotifyCallback,
        **kwargs: Any,
    ) -> None:
        del characteristic, kwargs
        self._peer.notify = callback

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        del characteristic
        self._peer.notify = None


class _Injector:
    """Hands sealed fragments to bleak's callback as fast as the daemon takes them.

    Two windows pace it, like a real sender's: fragments not yet acknowledged
    by the phone (so bleak's notification queue never overflows) and
    messages not yet acknowledged by the gateway (so the outbox holds a
    bounded backlog and the rate measured is the one the daemon sustains end
    to end, not the rate at which it can fill its outbox).
    """

    def __init__(self, peer: _Peer, delivered: Callable[[], int], size: int) -> None:
        self.peer = peer
        self.delivered = delivered
        self.window = min(64, max(16, (4 << 20) // size))
        self.fragments: list[bytes] = []
        self.ends: list[int] = []
        self.ids: list[str] = []
        self.arrived: list[float] = []
        self.busy_s = 0.0
        self._next = 0
        self._loaded: set[bytes] = set()
        self._acked = 0
        self._handed_before = 0
        self._delivered_base = delivered()
        self._last = time.monotonic()
        self.stop = asyncio.Event()
        peer.on_acked = self._on_acked

    def load(self, messages: Sequence[Message]) -> None:
        """Seal the next batch (before timing); continues the same session."""
        self.fragments, self.ends, self.ids = [], [], []
        self._loaded = set()
        self._extend(messages)
        self._acked = 0
        self._handed_before += len(self.arrived)
        self.arrived = []
        self._next = 0
        self.stop.clear()

    def _extend(self, messages: Sequence[Message]) -> None:
        """Seal ``messages`` onto the end of the loaded batch."""
        fragments, ends = self.peer.seal(messages)
        base = len(self.fragments)
        self.fragments += fragments
        self.ends += (base + end for end in ends)
        self.ids += (m.message_id.hex() for m in messages)
        self._loaded.update(m.message_id for m in messages)

    async def prepare(self, count: int, first: int, size: int) -> None:
        """:meth:`load` ``count`` messages of ``size`` bytes in steps.

        Their sequence numbers start at ``first``. Making and sealing a
        gigabyte takes seconds; done in one call it would leave the daemon's
        link silent past its supervision timeout (and its event loop
        stopped). Between steps the loop runs and, once a second, the next
        prepared message is handed over (:meth:`keep_alive`); those arrive
        before the window opens and are not counted in it.
        """
        self.load(_messages(min(count, _PREPARE_SLICE), first, size))
        alive = asyncio.create_task(self.keep_alive(), name="bench keep-alive")
        try:
            for at in range(_PREPARE_SLICE, count, _PREPARE_SLICE):
                await asyncio.sleep(0)
                if self.peer.dropped:
                    raise ConfigError("the daemon dropped the bench link")
                self._extend(
                    _messages(min(_PREPARE_SLICE, count - at), first + at, size)
                )
        finally:
            alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await alive

    def _on_acked(self, messages: tuple[Message, ...]) -> None:
        loaded = self._loaded
        self._acked += sum(1 for m in messages if m.message_id in loaded)

    @property
    def done(self) -> bool:
        """Whether every loaded message was handed over."""
        return len(self.arrived) == len(self.ends)

    @property
    def backlog(self) -> int:
        """Messages handed over and not yet acknowledged by the gateway."""
        handed = self._handed_before + len(self.arrived)
        return handed - (self.delivered() - self._delivered_base)

    async def run(self) -> None:
        """Inject until everything is handed over or :attr:`stop` is set."""
        peer = self.peer
        fragments = self.fragments
        ends = self.ends
        total = len(fragments)
        arrived = self.arrived
        while not self.stop.is_set() and self._next < total:
            acked = min(self._acked, len(arrived))  # the phone acks in order
            done = ends[acked - 1] + 1 if acked else 0
            room = _NOTIFY_OUTSTANDING - (self._next - done)
            messages = self.window - self.backlog
            if room <= 0:
                peer.acked_event.clear()
                # Bounded, so a set :attr:`stop` is seen even if no ack comes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_QUIET_S):
                        await peer.acked_event.wait()
                continue
            if messages <= 0 and time.monotonic() - self._last < _QUIET_S:
                await asyncio.sleep(0.005)
                continue
            messages = max(1, messages)  # a slow daemon still sees its link alive
            started = time.perf_counter()
            notify = peer.notify
            if notify is None:
                raise ConfigError("the daemon dropped the bench link")
            stop_at = min(total, self._next + room)
            index = self._next
            message = len(arrived)
            last = message + messages
            while index < stop_at and message < last:
                notify(bytearray(fragments[index]))
                if index == ends[message]:
                    arrived.append(time.time())
                    message += 1
                index += 1
            self._next = index
            self._last = time.monotonic()
            self.busy_s += time.perf_counter() - started
            await asyncio.sleep(0)

    async def keep_alive(self) -> None:
        """After :attr:`stop`: one message a second, so the link stays up."""
        while self._next < len(self.fragments):
            await asyncio.sleep(1.0)
            notify = self.peer.notify
            if notify is None:
                return
            message = len(self.arrived)
            while self._next <= self.ends[message]:
                notify(bytearray(self.fragments[self._next]))
                self._next += 1
            self.arrived.append(time.time())


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _messages(count: int, start: int, size: int) -> list[Message]:
    pad = _filler(size)
    return [
        Message(
            MessageKind.EVENT,
            os.urandom(16),
            _payload(start + i, size, pad),
            MessageFlags.RELIABLE,
        )
        for i in range(count)
    ]


async def _pipeline_relay(
    spec: BenchSpec, cloud: _Cloud, relay: str, label: str
) -> RelayFigures:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from relay.ble.link import BackendSpec, LinkConfig
    from relay.ble.manager import LinkState
    from relay.daemon import Daemon, DaemonConfig
    from relay.identity import PhoneIdentity
    from relay.outbox import Outbox
    from relay.uplink.factory import uplink_factory

    state = cloud.state
    identity = PhoneIdentity(state)
    key = X25519PrivateKey.generate()
    glasses = Identity(key.private_bytes_raw(), key.public_key().public_bytes_raw())
    identity.pin_glasses(glasses.public)
    peer = _Peer(glasses, identity.static.public, spec.fragment_size)
    cloud_config, outbox_config = _configs(relay)
    outbox = await Outbox.open(
        state / "phone" / f"outbox-{relay}.sqlite3", outbox_config
    )
    config = DaemonConfig(
        state_dir=state,
        link=LinkConfig(address=_FAKE_ADDRESS),
        outbox=outbox_config,
        cloud=cloud_config,
        gateway_key_file=cloud.key_file,
    )
    holder: list[Daemon] = []
    factory = uplink_factory(
        cloud.uplink,
        device_id=identity.device_id,
        broker=cloud.broker_url,
        gateway=cloud.ws_url,
        will=lambda: holder[0].offline_will(),
    )
    daemon = Daemon(
        config,
        BackendSpec(_FakeClient, _FakeScanner, {"bench_peer": peer}),
        factory,
        outbox=outbox,
    )
    holder.append(daemon)
    ledger = _LedgerTail(cloud.ledger)
    sampler = Sampler()
    injector = _Injector(
        peer, lambda: daemon.cloud.stats.acks_received, spec.message_bytes
    )
    task = asyncio.create_task(daemon.run(), name=f"bench daemon {relay}")
    injecting: asyncio.Task[None] | None = None
    try:
        await _until(
            lambda: (
                peer.established.is_set()
                and daemon.links[0].state is LinkState.CONNECTED
                and daemon.cloud.connected
            ),
            30,
            "the daemon's link and uplink",
        )
        await asyncio.sleep(0.3)  # MODE and clock sync come and go
        # Calibrate (untimed): how many messages a run of this length needs.
        # Small batches, each handed over whole (sealed fragments are numbered).
        sent = 0
        chunk = max(4, min(64, (128 << 10) // spec.message_bytes))
        base = daemon.cloud.stats.acks_received
        started = time.perf_counter()
        async with asyncio.timeout(60):
            while time.perf_counter() - started < _CALIBRATION_S:
                injector.load(_messages(chunk, sent, spec.message_bytes))
                sent += chunk
                await injector.run()
        delivered = daemon.cloud.stats.acks_received - base
        rate = max(20.0, delivered / (time.perf_counter() - started))
        # Half a second of backlog at most: enough to keep the pump's batches
        # full, short of the resend timer (cloud.resend_after).
        injector.window = min(1024, max(32, int(rate * _BACKLOG_S)))
        budget = (spec.warmup + spec.duration) * 2 + _DRAIN_S
        count = max(1000, int(rate * budget))
        count = min(count, (1 << 30) // (spec.message_bytes + 200))
        # Sealed before timing starts.
        await injector.prepare(count, sent, spec.message_bytes)
        prepared_mb = sum(len(f) for f in injector.fragments) / _MB
        sampler.start()
        injecting = asyncio.create_task(injector.run(), name="bench injector")
        await _pipeline_sleep(spec, spec.warmup, daemon, peer, "warm-up")
        start, cpu_start = time.time(), _self_cpu_s()
        harness_start = injector.busy_s + peer.busy_s
        others = _Cpu([cloud.gateway])
        broker_start = cloud.broker_cpu_s()
        pump_start = dataclasses.replace(daemon.cloud.stats)
        reference = _Reference(spec.duration)
        await reference.start()
        sampler.active = True
        try:
            with _cprofiled(_cprofile_path(spec, relay)):
                await _pipeline_sleep(
                    spec, spec.duration, daemon, peer, label, injecting
                )
        except BaseException:
            reference.stop()
            raise
        sampler.active = False
        end, cpu_end = time.time(), _self_cpu_s()
        harness = injector.busy_s + peer.busy_s - harness_start
        ran_out = injector.done
        injector.stop.set()
        pump = daemon.cloud.stats
        payloads = pump.payloads - pump_start.payloads
        envelopes = pump.envelopes_sent - pump_start.envelopes_sent
        resent = pump.resent - pump_start.resent
        await injecting
        injecting = asyncio.create_task(injector.keep_alive(), name="bench keep-alive")
        (gateway_cpu,) = others.fractions(end - start) or [None]
        reference_ms = await reference.result()
        broker_end = cloud.broker_cpu_s()
        broker_cpu = (
            None
            if broker_start is None or broker_end is None
            else (broker_end - broker_start) / (end - start)
        )
        if spec.progress:
            sys.stderr.write("\n")
        window = _Window(start, end)
        arrived = dict(zip(injector.ids, injector.arrived, strict=False))
        wanted = {m for m, t in arrived.items() if t in window}
        arrived = {m: t for m, t in arrived.items() if t <= end}
        deadline = time.monotonic() + _DRAIN_S
        while time.monotonic() < deadline:
            ledger.read()
            if wanted <= {mid for mid, _ in ledger.lines}:
                break
            await asyncio.sleep(0.2)
        ledger.read()
    finally:
        sampler.stop()
        injector.stop.set()
        peer.acked_event.set()
        for pending in (injecting, task):
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    async with asyncio.timeout(5):
                        await pending
        await daemon.close()
        queued = await _queued(outbox, daemon.cloud.channels.up)
        await outbox.close()
    sent_map = {
        mid: _Sent(seq, spec.message_bytes, t)
        for seq, (mid, t) in enumerate(arrived.items())
    }
    tally = _Tally.count(sent_map, ledger.lines, window, queued)
    cpu_s = cpu_end - cpu_start - harness - sampler.cpu_s
    notes: list[str] = []
    if ran_out:
        notes.append("the prepared input ran out before the window ended")
    split = sampler.split()
    status = proc_status(os.getpid())
    return _figures(
        spec,
        relay,
        window,
        tally,
        cpu_s,
        None,
        _rss_mb(status["VmHWM"]),
        gateway_cpu=gateway_cpu,
        broker_cpu=broker_cpu,
        reference_ms=reference_ms,
        hot=sampler.top(),
        hot_own=sampler.top_own(),
        resources={
            "prepared_input_mb": round(prepared_mb, 1),
            "harness_cpu_s": round(harness, 3),
            "sampler_cpu_s": round(sampler.cpu_s, 3),
            "main_thread_split": {k: round(v, 4) for k, v in split.items()},
            "calibration_rate_msg_per_s": round(rate, 1),
            "backlog_window_messages": injector.window,
            "uplink_payloads": payloads,
            "envelopes_per_payload": round(envelopes / payloads, 2)
            if payloads
            else None,
            "envelopes_resent": resent,
        },
        notes=notes,
    )


async def _pipeline_sleep(
    spec: BenchSpec,
    seconds: float,
    daemon: Any,
    peer: _Peer,
    label: str,
    injecting: asyncio.Task[None] | None = None,
) -> None:
    start = time.monotonic()
    acked = daemon.cloud.stats.acks_received
    while (elapsed := time.monotonic() - start) < seconds:
        await asyncio.sleep(min(1.0, seconds - elapsed))
        if injecting is not None and injecting.done():
            injecting.result()
            return
        if peer.dropped:
            # The peer's session cannot start over; a run without it would
            # wait for acks that never come.
            raise ConfigError("the daemon dropped the bench link")
        if spec.progress:
            done = (daemon.cloud.stats.acks_received - acked) * spec.message_bytes
            now = time.monotonic() - start
            _progress(now, seconds, done / now, label)


async def run_pipeline(spec: BenchSpec) -> ThroughputResult:
    """Run the pipeline bench (see the module docstring): batched, then naive."""
    with _workdir() as workdir:
        state = workdir / "state"
        from relay.identity import PhoneIdentity

        PhoneIdentity(state)  # the device record, before the gateway starts
        async with _cloud(spec, state, workdir) as cloud:
            await _until(cloud.key_file.exists, 30, "the gateway's key")
            figures = [
                await _pipeline_relay(spec, cloud, relay, label=relay)
                for relay in _relays(spec)
            ]
    return _result(spec, figures)


# -- the command line (``glasses-relay bench throughput|soak``) --------------------


def spec_from_args(args: argparse.Namespace, mode: str) -> BenchSpec:
    """Check the flags of ``bench throughput`` / ``bench soak``; build the spec.

    Raises:
        ConfigError: flags that do not go together, or out of range (one line).
    """
    from relay.sim.profiles import get_profile

    if args.uplink == "ws" and args.broker:
        raise ConfigError("--broker goes with --uplink mqtt")
    if args.gateway is not None:
        if args.uplink != "ws" or not args.gateway.startswith(("ws://", "wss://")):
            raise ConfigError("--gateway ws://HOST:PORT goes with --uplink ws")
        if args.gateway_state is None or args.gateway_ledger is None:
            raise ConfigError("--gateway needs --gateway-state and --gateway-ledger")
    if args.broker is not None:
        from relay.uplink import parse_broker_url

        parse_broker_url(args.broker)
    if not _PAYLOAD_HEADER.size <= args.message_bytes <= 65536:
        raise ConfigError(f"--message-bytes {args.message_bytes}: use 20 to 65536")
    if not 0 <= args.warmup <= 600:
        raise ConfigError(f"--warmup {args.warmup:g}: use 0 to 600 seconds")
    profile = None
    if args.profile is not None or mode != "pipeline":
        profile = get_profile(args.profile or "android-2m")
    return BenchSpec(
        mode=mode,
        profile=profile,
        uplink=args.uplink,
        duration=args.duration,
        warmup=args.warmup,
        message_bytes=args.message_bytes,
        broker=args.broker,
        gateway=args.gateway,
        gateway_state=args.gateway_state,
        gateway_ledger=args.gateway_ledger,
        naive=mode != "soak",
        progress=sys.stderr.isatty(),
        cprofile=args.cprofile,
    )


def run_cli(args: argparse.Namespace, mode: str) -> int:
    """Run ``bench throughput`` (``mode`` e2e/pipeline) or ``bench soak``.

    Prints the table on standard error and, with ``--json``, one object on
    standard output: the result itself for one profile, or ``{"mode",
    "uplink", "runs": [result, ...]}`` for several (``--profile a,b`` or
    ``all``, run one after another). ``--plot FILE`` draws them as PNG.

    Raises:
        ConfigError: bad flags, or a part that did not start (one line).
    """
    from tools.output import emit_json, say

    names = args.profile if isinstance(args.profile, list) else [args.profile]
    results: list[ThroughputResult] = []
    for number, name in enumerate(names, 1):
        spec = spec_from_args(
            argparse.Namespace(**{**vars(args), "profile": name}), mode
        )
        where = "" if spec.profile is None else f"{spec.profile.name}, "
        count = f" [{number}/{len(names)}]" if len(names) > 1 else ""
        say(
            f"bench {'soak' if mode == 'soak' else 'throughput'}{count}: "
            f"{'' if mode == 'soak' else mode + ', '}{where}{spec.uplink}, "
            f"{spec.message_bytes} B messages, {spec.duration:g} s"
            f"{'' if mode == 'soak' else ' per relay'}"
        )
        run = run_pipeline if mode == "pipeline" else run_e2e
        result = asyncio.run(run(spec))
        print_result(result)
        results.append(result)
    objects = [result.to_json() for result in results]
    plot = getattr(args, "plot", None)
    if plot is not None:
        from tools.bench.plot import write_throughput_chart

        write_throughput_chart(objects, plot)
        say(f"chart written to {plot}")
    if args.json:
        if len(objects) == 1:
            emit_json(objects[0])
        else:
            emit_json({"mode": mode, "uplink": args.uplink, "runs": objects})
    return 0


def print_result(result: ThroughputResult) -> None:
    """The table for people, on standard error."""
    from tools.output import say

    relays = (
        [result.batched] if result.naive is None else [result.batched, result.naive]
    )

    def num(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    rows: list[tuple[str, list[str]]] = [
        ("goodput", [num(r.goodput_bytes_per_s, unit=" B/s") for r in relays]),
        ("ceiling", [num(r.ceiling_bytes_per_s, unit=" B/s") for r in relays]),
        ("goodput ratio", [num(r.goodput_ratio, ".4f") for r in relays]),
        ("link efficiency", [num(r.link_efficiency, ".3f") for r in relays]),
        ("daemon CPU", [num(r.cpu_fraction, ".1%") for r in relays]),
        ("  of it BT host", [num(r.bt_host_share, ".0%") for r in relays]),
        ("CPU s per MB", [num(r.cpu_s_per_mb, ".3f") for r in relays]),
        ("bytes per CPU s", [num(r.bytes_per_cpu_s) for r in relays]),
        (
            "latency p50/p99",
            [
                f"{num(r.added_latency_ms['p50'], '.1f')} / "
                f"{num(r.added_latency_ms['p99'], '.1f')} ms"
                for r in relays
            ],
        ),
        ("peak RSS", [num(r.peak_rss_mb, ".1f", " MB") for r in relays]),
        (
            "messages",
            [f"{r.messages_delivered:,}/{r.messages_offered:,}" for r in relays],
        ),
        (
            "lost/dup/reord",
            [f"{r.lost} / {r.duplicated} / {r.reordered}" for r in relays],
        ),
        ("queued at end", [f"{r.queued_at_end:,}" for r in relays]),
        (
            "reference p50/p10",
            [
                f"{num(r.reference_ms.get('p50'), '.1f')} / "
                f"{num(r.reference_ms.get('p10'), '.1f')} ms"
                for r in relays
            ],
        ),
    ]
    if result.mode == "pipeline":
        # goodput / 162,667 B/s is the row below; as a "link efficiency" (the
        # JSON field, kept) the same figure would read as a fraction.
        rows = [row for row in rows if row[0] != "link efficiency"]
        rows.insert(
            1,
            (
                "x 162,667 B/s",
                [
                    num(r.goodput_bytes_per_s / REFERENCE_CEILING, ".1f", "x")
                    for r in relays
                ],
            ),
        )
    if result.mode == "soak":
        res = result.batched.resources
        rows += [
            ("RSS start/end", [f"{res.get('rss_mb')} MB"]),
            ("RSS growth", [f"{res.get('rss_growth_mb')} MB"]),
            ("fds start/end", [f"{res.get('fds')}"]),
            ("threads start/end", [f"{res.get('threads')}"]),
            ("tasks start/end", [f"{res.get('asyncio_tasks')}"]),
        ]
    say(f"  {'':<18} " + "".join(f"{r.relay:>22}" for r in relays))
    for name, values in rows:
        say(f"  {name:<18} " + "".join(f"{v:>22}" for v in values))
    for name, value in result.ratios().items():
        say(f"  batched/naive {name}: {num(value, '.2f', 'x')}")
    for relay in relays:
        for note in relay.notes:
            say(f"  note ({relay.relay}): {note}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``python -m tools.bench.throughput probe|glasses|reference ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["probe"]:
        return probe_main(args[1:])
    if args[:1] == ["glasses"]:
        return glasses_main(args[1:])
    if args[:1] == ["reference"]:
        return reference_main(args[1:])
    sys.stderr.write(
        "usage: python -m tools.bench.throughput probe|glasses|reference ...\n"
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
