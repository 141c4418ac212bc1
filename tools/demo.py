"""``glasses-relay demo``: the whole path on one machine, nothing to configure.

Emulated glasses (scenario ``day``) on a shaped BLE link, the daemon, and a
local gateway with the built-in assistant, started together in this process
(with ``--uplink mqtt``, through a real mosquitto). A user's day plays for
``--duration`` seconds; a live view shows each request as it is answered;
at the end, a summary: every request with its route, its response time
against the 3 s budget (from the end of the utterance or photo capture on
the glasses to the first answer byte at the glasses, BLE upload included)
and where the time went. State lives in ``<state>/demo``, apart from a real
daemon's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.errors import ConfigError
from relay.state import ensure_state_dir, resolve_state_dir
from tools.output import emit_json, say

__all__ = ["register"]

BUDGET_MS: Final = 3000.0
GRACE_S: Final = 10.0
"""After the scenario stops: how long answers still on their way are awaited."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    parser = sub.add_parser(
        "demo",
        help="emulated glasses, the daemon and a gateway: a user's day, summarised",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of the day (default 60)"
    )
    parser.add_argument(
        "--uplink",
        choices=("ws", "mqtt"),
        default="ws",
        help="ws (default): WebSocket to the demo's gateway; mqtt: through mosquitto",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="with --uplink mqtt: this broker (default: a private one)",
    )
    parser.add_argument(
        "--profile", default="android-2m", help="BLE link profile (default android-2m)"
    )
    parser.add_argument(
        "--latency-model",
        default="lognormal:0.8:2.0",
        metavar="SPEC",
        help="the built-in assistant's first-token time: lognormal:MEDIAN:P95 or "
        "fixed:S",
    )
    parser.add_argument("--seed", type=int, default=0, help="scenario seed")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_run)


@dataclass(slots=True)
class _Broker:
    url: str
    process: subprocess.Popen[bytes] | None
    workdir: Path | None


def _private_broker() -> _Broker:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        raise ConfigError(
            "--uplink mqtt needs a broker: install the 'mosquitto' package "
            "(apt-get install mosquitto) or pass --broker mqtt://HOST:PORT"
        )
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    workdir = Path(tempfile.mkdtemp(prefix="glasses-relay-demo-broker-"))
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
    )
    process = subprocess.Popen(  # noqa: S603
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return _Broker(f"mqtt://127.0.0.1:{port}", process, workdir)
        time.sleep(0.05)
    process.kill()
    raise ConfigError(
        "the private mosquitto did not start; see its log in " + str(workdir)
    )


def _run(args: argparse.Namespace) -> int:
    from relay.sim.profiles import PROFILES
    from tools.cloud.assistant import LatencyModel

    if not 5 <= args.duration <= 3600:
        raise ConfigError(f"--duration {args.duration:g}: use 5 to 3600 seconds")
    if args.profile not in PROFILES:
        raise ConfigError(
            f"--profile {args.profile!r}: one of {', '.join(sorted(PROFILES))}"
        )
    latency = LatencyModel.parse(args.latency_model)
    if args.broker and args.uplink != "mqtt":
        raise ConfigError("--broker goes with --uplink mqtt")
    root = ensure_state_dir(resolve_state_dir(args.state_dir))
    state = ensure_state_dir(root / "demo")
    broker: _Broker | None = None
    if args.uplink == "mqtt":
        if args.broker:
            from relay.uplink import parse_broker_url

            parse_broker_url(args.broker)
            broker = _Broker(args.broker, None, None)
        else:
            broker = _private_broker()
    try:
        summary = asyncio.run(_demo(args, state, broker, latency))
    finally:
        if broker is not None and broker.process is not None:
            broker.process.terminate()
            broker.process.wait(timeout=10)
            if broker.workdir is not None:
                shutil.rmtree(broker.workdir, ignore_errors=True)
    _print_summary(summary)
    if args.json:
        emit_json(summary)
    return 0


async def _demo(
    args: argparse.Namespace, state: Path, broker: _Broker | None, latency: object
) -> dict[str, object]:
    from relay.cloudlink import CloudConfig
    from relay.daemon import Daemon, DaemonConfig
    from relay.outbox import Outbox
    from relay.sim.bed import in_process
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import get_profile
    from relay.uplink.factory import uplink_factory
    from tools.cloud.app import CloudGateway
    from tools.cloud.assistant import LatencyModel
    from tools.cloud.config import GatewayConfig

    assert isinstance(latency, LatencyModel)  # noqa: S101
    gateway_config = GatewayConfig(
        state_dir=state,
        broker_url=None if broker is None else broker.url,
        listen=None if broker is not None else ("127.0.0.1", 0),
        latency=latency,
    )
    # The phone's keys and record first: the gateway knows the device from
    # its first second, as after any earlier start.
    from relay.identity import PhoneIdentity

    device_id = PhoneIdentity(state).device_id
    gateway = CloudGateway(gateway_config)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(gateway.serving())
        glasses_config = GlassesAppConfig(scenario="day", seed=args.seed)
        bed = await stack.enter_async_context(
            in_process(state, get_profile(args.profile), glasses_config)
        )
        ensure_state_dir(state / "phone")
        outbox = await Outbox.open(state / "phone" / "outbox.sqlite3")
        stack.push_async_callback(outbox.close)
        config = DaemonConfig(
            state_dir=state,
            cloud=CloudConfig(announce_presence=broker is not None),
        )
        holder: list[Daemon] = []
        from relay.identity import PhoneIdentity

        device_id = PhoneIdentity(state).device_id
        factory = uplink_factory(
            "mqtt" if broker is not None else "ws",
            device_id=device_id,
            broker=None if broker is None else broker.url,
            gateway=None if broker is not None else f"ws://127.0.0.1:{gateway.ws_port}",
            will=lambda: holder[0].offline_will(),
        )
        daemon = Daemon(config, bed.backend, factory, outbox=outbox)
        holder.append(daemon)
        daemon_task = asyncio.create_task(daemon.run(), name="demo daemon")

        async def stop_daemon() -> None:
            daemon_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(5):
                    await daemon_task
            await daemon.close()

        stack.push_async_callback(stop_daemon)
        started = time.monotonic()
        live = _Live(bed.app, daemon, args.duration, enabled=sys.stderr.isatty())
        with live:
            while (elapsed := time.monotonic() - started) < args.duration:
                live.update(elapsed)
                await asyncio.sleep(0.5)
            bed.app.stop_scenario()  # the user stops asking; answers still arrive
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and not _settled(bed.app, daemon):
                live.update(time.monotonic() - started)
                await asyncio.sleep(0.25)
        return _summary(bed.app, daemon, latency, started)


def _settled(app: object, daemon: object) -> bool:
    from relay.daemon import Daemon
    from relay.sim.glasses import GlassesApp

    assert isinstance(app, GlassesApp)  # noqa: S101
    assert isinstance(daemon, Daemon)  # noqa: S101
    unanswered = [rid for rid in app.asked if rid not in app.answer_times]
    pending = app.delivery.sender.stats.messages
    box = daemon.status()["outbox"]
    assert isinstance(box, dict)  # noqa: S101
    return not unanswered and pending == 0 and box.get("rows") == 0


def _summary(
    app: object, daemon: object, latency: object, started: float
) -> dict[str, object]:
    from relay.daemon import Daemon
    from relay.sim.glasses import GlassesApp

    assert isinstance(app, GlassesApp)  # noqa: S101
    assert isinstance(daemon, Daemon)  # noqa: S101
    requests = []
    for rid, (kind, _asked_at) in app.asked.items():
        trace = daemon.traces.get(rid)
        seconds = app.answer_times.get(rid)
        response_ms = None if seconds is None else round(seconds * 1000, 1)
        hops = Daemon._trace_json(trace)["hops_ms"] if trace is not None else {}
        requests.append(
            {
                "id": rid,
                "kind": kind.name.lower(),
                "route": trace.route if trace is not None else "unknown",
                "response_ms": response_ms,
                "within_budget": response_ms is not None and response_ms <= BUDGET_MS,
                "hops_ms": hops,
                "reason": trace.reason if trace is not None else None,
            }
        )
    answered = sum(1 for r in requests if r["response_ms"] is not None)
    within = sum(1 for r in requests if r["within_budget"])
    box = daemon.status()["outbox"]
    assert isinstance(box, dict)  # noqa: S101
    unacked = app.delivery.sender.stats.messages
    lost = unacked + int(box.get("rows") or 0)
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "requests": requests,
        "answered": answered,
        "within_budget_ratio": round(within / len(requests), 4) if requests else 0.0,
        "lost": lost,
        "routes": sorted({str(r["route"]) for r in requests}),
        "assistant_latency_model": getattr(latency, "describe", lambda: str(latency))(),
        "messages_sent_by_glasses": app.stats.messages_sent,
    }


class _Live:
    """A live table on standard error while the demo runs (a terminal only)."""

    def __init__(
        self, app: object, daemon: object, duration: float, *, enabled: bool
    ) -> None:
        self._app = app
        self._daemon = daemon
        self._duration = duration
        self._enabled = enabled
        self._live: object | None = None

    def __enter__(self) -> _Live:
        if self._enabled:
            from rich.console import Console
            from rich.live import Live

            live = Live(
                console=Console(file=sys.stderr), refresh_per_second=4, transient=True
            )
            live.__enter__()
            self._live = live
        else:
            say(f"demo: a user's day for {self._duration:g} s ...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)  # type: ignore[attr-defined]

    def update(self, elapsed: float) -> None:
        if self._live is None:
            return
        from rich.table import Table

        summary = _summary(self._app, self._daemon, "", time.monotonic() - elapsed)
        table = Table(title=f"glasses-relay demo  {elapsed:5.1f}/{self._duration:g} s")
        for column in ("request", "route", "answer", "budget"):
            table.add_column(column)
        requests = summary["requests"]
        assert isinstance(requests, list)  # noqa: S101
        for item in requests[-12:]:
            ms = item["response_ms"]
            table.add_row(
                str(item["kind"]),
                str(item["route"]),
                "…" if ms is None else f"{ms:,.0f} ms",
                "" if ms is None else ("ok" if item["within_budget"] else "LATE"),
            )
        self._live.update(table)  # type: ignore[attr-defined]


def _print_summary(summary: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stderr)
    table = Table(title="glasses-relay demo: every request (ms from end of capture)")
    for column in (
        "#",
        "kind",
        "route",
        "answer",
        "3 s",
        "phone got it",
        "routed",
        "cloud ack",
        "answer sent",
    ):
        table.add_column(column)
    requests = summary["requests"]
    assert isinstance(requests, list)  # noqa: S101
    for n, item in enumerate(requests, 1):
        hops = item.get("hops_ms") or {}
        ms = item["response_ms"]

        def cell(value: object) -> str:
            return "-" if value is None else f"{float(value):,.0f}"  # type: ignore[arg-type]

        table.add_row(
            str(n), str(item["kind"]), str(item["route"]),
            "unanswered" if ms is None else f"{ms:,.0f}",
            "ok" if item["within_budget"] else "LATE",
            cell(hops.get("phone_received")), cell(hops.get("routed")),
            cell(hops.get("cloud_acked")), cell(hops.get("first_answer_sent")),
        )  # fmt: skip
    console.print(table)
    ratio = summary["within_budget_ratio"]
    routes = summary["routes"]
    assert isinstance(ratio, float)  # noqa: S101
    assert isinstance(routes, list)  # noqa: S101
    console.print(
        f"{len(requests)} requests, {summary['answered']} answered, "
        f"{ratio:.0%} within 3 s, lost {summary['lost']}; "
        f"routes {', '.join(routes)}; "
        f"assistant latency {summary['assistant_latency_model']}"
    )
