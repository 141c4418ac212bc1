"""``glasses-relay bench``: benchmarks, a table for people, ``--json`` for machines."""

from __future__ import annotations

import argparse
import asyncio
import sys

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
