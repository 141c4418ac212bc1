"""``glasses-relay bench``: benchmarks, a table for people, ``--json`` for machines."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from relay.errors import ConfigError
from relay.sim.profiles import PROFILES, get_profile
from tools.output import emit_json, say

__all__ = ["register"]

_BENCH_PROFILES = sorted(name for name, p in PROFILES.items() if p.shaped)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` and its subcommands."""
    bench = sub.add_parser(
        "bench",
        help="measure the relay against the BLE ceiling and a naive relay",
        description="Benchmarks. A table and progress go to standard error; "
        "--json prints one JSON object to standard output.",
    )
    kinds = bench.add_subparsers(title="benchmarks", dest="bench", metavar="BENCH")
    bench.set_defaults(handler=lambda args: _usage(bench))
    link = kinds.add_parser(
        "link",
        help="the BLE link layer alone (fragments, no crypto) against the ceiling",
        description="Saturate one direction of the emulated BLE link through the "
        "daemon's own link code for --duration seconds (connect and discovery "
        "are not timed) and compare the application goodput with the profile's "
        "physical ceiling.",
    )
    link.add_argument(
        "--profile", default="android-2m", choices=_BENCH_PROFILES, help="link profile"
    )
    link.add_argument(
        "--direction",
        default="up",
        choices=("up", "down"),
        help="up: glasses to phone (notifications); down: phone to glasses (writes)",
    )
    link.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="timed seconds (default 20; the whole run stays under 60 s)",
    )
    link.add_argument("--json", action="store_true", help="print one JSON object")
    link.set_defaults(handler=_run_link)
    _register_throughput(kinds)
    _register_soak(kinds)
    _register_latency(kinds)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _run_link(args: argparse.Namespace) -> int:
    from tools.bench.link import run_link_bench

    if not 1.0 <= args.duration <= 50.0:
        raise ConfigError(f"--duration {args.duration:g}: use 1 to 50 seconds")
    profile = get_profile(args.profile)
    say(f"bench link: {profile.name}, {args.direction}, {args.duration:g} s")
    result = asyncio.run(
        run_link_bench(
            profile,
            direction=args.direction,
            duration=args.duration,
            progress=sys.stderr.isatty(),
        )
    )
    if sys.stderr.isatty():
        say("")
    rows = [
        ("profile", result.profile),
        ("direction", result.direction),
        ("fragment size", f"{result.fragment_size} B"),
        ("goodput", f"{result.goodput_bytes_per_s:,.0f} B/s"),
        ("ceiling", f"{result.ceiling_bytes_per_s:,.0f} B/s"),
        ("link efficiency", f"{result.link_efficiency:.3f}"),
        ("goodput ratio", f"{result.goodput_ratio:.4f}"),
        ("frames", f"{result.frames:,}"),
        ("lost / reordered", f"{result.lost} / {result.reordered}"),
    ]
    for name, value in rows:
        say(f"  {name:<18} {value}")
    if args.json:
        emit_json(result.to_json())
    return 0


# -- throughput and soak ---------------------------------------------------------

_E2E_PROFILES = sorted(PROFILES)


def _profile_list(text: str) -> list[str]:
    """``--profile`` of bench throughput: names separated by commas, or all."""
    if text == "all":
        return list(_E2E_PROFILES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or repr(text)} is not a profile; use "
            f"{', '.join(_E2E_PROFILES)}, several separated by commas, or all"
        )
    return list(dict.fromkeys(names))


def _add_cloud_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--uplink", default="mqtt", choices=("mqtt", "ws"), help="uplink (default mqtt)"
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="with --uplink mqtt: this broker (default: a private mosquitto on a "
        "free loopback port); the bench still runs its own gateway on it",
    )
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="with --uplink ws: a running gateway (ws://HOST:PORT) instead of the "
        "bench's own; needs --gateway-state and --gateway-ledger",
    )
    parser.add_argument(
        "--gateway-state",
        type=Path,
        metavar="DIR",
        help="the --state-dir of that gateway (its key is read, the bench's "
        "device record written there)",
    )
    parser.add_argument(
        "--gateway-ledger",
        type=Path,
        metavar="FILE",
        help="the --ledger file of that gateway",
    )
    parser.add_argument(
        "--message-bytes",
        type=int,
        default=4096,
        metavar="N",
        help="application payload per message (default 4096, a photo chunk; "
        "186 makes each message one 244-byte notification)",
    )
    parser.add_argument(
        "--cprofile",
        type=Path,
        metavar="DIR",
        help="write cProfile statistics of each daemon to DIR (.prof and .txt); "
        "slows the daemon down, so such a run's figures are not comparable",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _register_throughput(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = kinds.add_parser(
        "throughput",
        help="the whole relay at full load: goodput, CPU, latency, loss; vs naive",
        description="Saturate the relay and measure it over a steady-state window "
        "(connect, discovery, handshake and a warm-up are not timed), once as "
        "shipped and once as a naive relay (one envelope per publish, one outbox "
        "commit per message) on the same input. e2e: emulated glasses, daemon and "
        "gateway each in their own process, through a link profile. pipeline: "
        "records sealed beforehand are handed to the daemon's BLE seam as fast as "
        "it takes them, to find its own ceiling per uplink.",
    )
    parser.add_argument(
        "--mode", default="e2e", choices=("e2e", "pipeline"), help="default e2e"
    )
    parser.add_argument(
        "--profile",
        type=_profile_list,
        metavar="NAME[,NAME...]|all",
        help="link profile, several separated by commas, or all (one run each); "
        f"one of {', '.join(_E2E_PROFILES)} (e2e: default android-2m; pipeline: "
        "only sets the notification size, default 244 bytes)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw goodput and CPU per profile, batched against naive, as PNG",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="timed seconds per relay (default 30)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of full load before timing (default 2)",
    )
    _add_cloud_arguments(parser)
    parser.set_defaults(handler=_run_throughput)


def _register_soak(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = kinds.add_parser(
        "soak",
        help="e2e at a profile's full rate for a long time: memory, fds, tasks, loss",
        description="The e2e throughput run, shipped relay only, held for "
        "--duration seconds: memory (RSS and its growth), open file descriptors, "
        "threads and asyncio tasks at the start and end of the window, and loss.",
    )
    parser.add_argument(
        "--profile", default="android-2m", choices=_E2E_PROFILES, help="link profile"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=1800.0,
        help="timed seconds (default 1800)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of full load before the start figures (default 10)",
    )
    _add_cloud_arguments(parser)
    parser.set_defaults(handler=_run_soak)


def _run_throughput(args: argparse.Namespace) -> int:
    from tools.bench.throughput import run_cli

    if not 1.0 <= args.duration <= 3600.0:
        raise ConfigError(f"--duration {args.duration:g}: use 1 to 3600 seconds")
    if args.plot is not None and not args.plot.parent.is_dir():
        raise ConfigError(f"--plot {args.plot}: no directory {args.plot.parent}")
    return run_cli(args, args.mode)


def _run_soak(args: argparse.Namespace) -> int:
    from tools.bench.throughput import run_cli

    if not 10.0 <= args.duration <= 86400.0:
        raise ConfigError(f"--duration {args.duration:g}: use 10 to 86400 seconds")
    return run_cli(args, "soak")


def _register_latency(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = kinds.add_parser(
        "latency",
        help="the 3-second promise: router vs always-cloud vs always-local on traces",
        description="Play one seeded request mix (voice, photos; 20%% phone-only, "
        "50%% either, 30%% cloud-only) through the real daemon, a trace-shaped "
        "cellular link and the gateway, once per strategy (router, always_cloud, "
        "always_local, each in its own process, side by side), and report the "
        "share answered within the deadline, utility and latency quantiles; "
        "oracle is the better baseline per request. Idle gaps between requests "
        "are skipped, never scaled.",
    )
    parser.add_argument(
        "--uplink-trace", type=Path, required=True, help="mahimahi trace, uplink"
    )
    parser.add_argument(
        "--downlink-trace", type=Path, required=True, help="mahimahi trace, downlink"
    )
    parser.add_argument(
        "--requests", type=int, default=120, help="requests per strategy (default 120)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    parser.add_argument(
        "--deadline", type=float, default=3.0, help="seconds (default 3)"
    )
    parser.add_argument(
        "--profile",
        default="android-2m",
        choices=_BENCH_PROFILES,
        help="BLE link profile (default android-2m)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the strategies one after another (slower; no CPU sharing)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="write each strategy's per-request outcomes to DIR/STRATEGY.json",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_latency)


def _run_latency(args: argparse.Namespace) -> int:
    from tools.bench.latency import run_bench

    if not 1 <= args.requests <= 10_000:
        raise ConfigError(f"--requests {args.requests}: use 1 to 10000")
    if not 0.5 <= args.deadline <= 10.0:
        raise ConfigError(f"--deadline {args.deadline:g}: use 0.5 to 10 seconds")
    say(
        f"bench latency: {args.uplink_trace.name} / {args.downlink_trace.name}, "
        f"{args.requests} requests, seed {args.seed}"
    )
    result = run_bench(
        uplink_trace=args.uplink_trace,
        downlink_trace=args.downlink_trace,
        requests=args.requests,
        seed=args.seed,
        deadline_s=args.deadline,
        profile=args.profile,
        parallel=not args.sequential,
        progress=sys.stderr.isatty(),
        keep=args.keep,
    )
    strategies = result["strategies"]
    assert isinstance(strategies, dict)  # noqa: S101
    say(
        f"{'strategy':<13} {'within':>7} {'utility':>8} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'hedges':>6} {'extra':>6}"
    )
    for name, row in strategies.items():
        say(
            f"{name:<13} {row['within_budget_ratio']:>7.3f} {row['utility']:>8.3f} "
            f"{row['p50_ms']:>7} {row['p95_ms']:>7} {row['p99_ms']:>7} "
            f"{row['hedges']:>6} {row['extra_cloud_requests_ratio']:>6.3f}"
        )
    if args.json:
        emit_json(result)
    return 0
