r"""``python -m tools.netem``: run the trace-driven link proxy until SIGINT/SIGTERM.

Example::

    python -m tools.netem --listen 127.0.0.1:18830 --target 127.0.0.1:1883 \
        --uplink-trace ATT-LTE-driving-2016.up \
        --downlink-trace ATT-LTE-driving-2016.down

then point the daemon's MQTT or WebSocket URL at 127.0.0.1:18830. One line
``netem: listening on 127.0.0.1:PORT -> ...`` goes to standard error once the
proxy listens (PORT is the bound port, also with ``:0``); a summary line when it
stops, and with ``--json`` the final counters as one JSON object on standard
output. Errors are one line on standard error, exit status 2 (1 if the address
cannot be bound).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from relay import log
from relay.errors import ConfigError
from tools.netem.models import (
    DEFAULT_IDLE_S,
    DEFAULT_RADIO_TYPE,
    RRC_PROBE_DIR,
    SPEEDTEST_CSV,
    Distribution,
    default_rtt_model,
    default_wakeup_model,
)
from tools.netem.proxy import NetemConfig, NetemProxy, NetemStats
from tools.netem.shaper import DEFAULT_QUEUE_LIMIT_BYTES
from tools.netem.trace import Trace, load_trace
from tools.output import emit_json, say

__all__ = ["build_parser", "main"]

PROG: Final = "python -m tools.netem"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m tools.netem``."""
    parser = _Parser(
        prog=PROG,
        description="A TCP proxy on 127.0.0.1 that shapes each direction with a "
        "mahimahi trace (1500-byte delivery opportunities at the trace's "
        "millisecond offsets, looped), a bounded queue, a base RTT drawn from "
        "Speedtest latencies and an RRC wake-up delay after idle periods.",
    )
    parser.add_argument(
        "--listen", type=_address, required=True, metavar="127.0.0.1:PORT"
    )
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--uplink-trace",
        type=Path,
        required=True,
        metavar="FILE",
        help="mahimahi trace for client -> target",
    )
    parser.add_argument(
        "--downlink-trace",
        type=Path,
        required=True,
        metavar="FILE",
        help="mahimahi trace for target -> client",
    )
    parser.add_argument(
        "--queue-limit",
        type=int,
        default=DEFAULT_QUEUE_LIMIT_BYTES,
        metavar="BYTES",
        help=f"bottleneck queue per direction (default {DEFAULT_QUEUE_LIMIT_BYTES})",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        metavar="MS",
        help="fixed base round trip (default: one draw from --latency-data)",
    )
    parser.add_argument(
        "--latency-data",
        type=Path,
        default=SPEEDTEST_CSV,
        metavar="CSV",
        help="Ookla Speedtest CSV; documented 4G constants if it does not exist",
    )
    parser.add_argument(
        "--radio-type",
        default=DEFAULT_RADIO_TYPE,
        help=f"Speedtest radio_type (default {DEFAULT_RADIO_TYPE})",
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=DEFAULT_IDLE_S,
        help=f"idle seconds before the radio sleeps (default {DEFAULT_IDLE_S:g})",
    )
    parser.add_argument(
        "--rrc-data",
        type=Path,
        default=RRC_PROBE_DIR,
        metavar="PATH",
        help="RRC-Probe CSV or directory; documented constants "
        "(0.8-1.6 s) if it does not exist",
    )
    parser.add_argument(
        "--no-wakeup",
        action="store_true",
        help="no radio model (never pay a wake-up delay)",
    )
    parser.add_argument(
        "--idle-at-start",
        action="store_true",
        help="the radio sleeps at start: the first bytes pay",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the RTT and wake-up draws"
    )
    parser.add_argument(
        "--start-offset",
        type=float,
        default=0.0,
        metavar="S",
        help="trace time at start, seconds into the traces",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the final counters as one JSON object",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to standard error (-v info, -vv debug)",
    )
    return parser  # fmt: skip


def _config(args: argparse.Namespace) -> NetemConfig:
    if args.rtt_ms is not None:
        if args.rtt_ms < 0:
            raise ConfigError("--rtt-ms must be >= 0")
        rtt = Distribution.constant(args.rtt_ms / 1000.0, "--rtt-ms")
    else:
        rtt = default_rtt_model(data=args.latency_data, radio_type=args.radio_type)
    wakeup = (
        None
        if args.no_wakeup
        else default_wakeup_model(idle_s=args.idle_s, data=args.rrc_data)
    )
    return NetemConfig(
        queue_limit_bytes=args.queue_limit,
        rtt=rtt,
        wakeup=wakeup,
        idle_s=args.idle_s,
        idle_at_start=args.idle_at_start,
        seed=args.seed,
        start_offset_s=args.start_offset,
    )


def _describe(trace: Trace) -> str:
    return f"{trace.name} ({trace.mean_bytes_per_s * 8e-6:.2f} Mbit/s mean)"


async def _serve(
    args: argparse.Namespace, config: NetemConfig, up: Trace, down: Trace
) -> NetemStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    proxy = NetemProxy(
        listen_host, listen_port, target_host, target_port, up, down, config=config
    )
    async with proxy:
        wakeup = config.wakeup.source if config.wakeup is not None else "off"
        rtt_source = config.rtt.source if config.rtt is not None else "none"
        say(
            f"netem: listening on {args.listen[0]}:{proxy.port} -> "
            f"{args.target[0]}:{args.target[1]}; uplink {_describe(up)}, downlink "
            f"{_describe(down)}; base RTT {proxy.rtt_s * 1000:.0f} ms ({rtt_source}); "
            f"wake-up after {config.idle_s:g} s idle: {wakeup}"
        )
        await stop.wait()
        stats = proxy.stats()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGINT or SIGTERM; return the exit status."""
    args = build_parser().parse_args(argv)
    log.configure(args.verbose)
    try:
        up = load_trace(args.uplink_trace)
        down = load_trace(args.downlink_trace)
        config = _config(args)
        stats = asyncio.run(_serve(args, config, up, down))
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2 if exc.filename else 1
    except KeyboardInterrupt:
        return 130
    say(
        f"netem: stopped; {stats.connections_total} connections, "
        f"{stats.uplink.bytes_delivered} bytes up, "
        f"{stats.downlink.bytes_delivered} down, "
        f"{stats.radio.wakeups} wake-ups"
    )
    if args.json:
        emit_json(dataclasses.asdict(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
