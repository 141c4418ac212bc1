"""What a wake-up costs after an idle gap: ``python -m tools.bench.coldpath``.

The e2e throughput bench spends several times the CPU per message that the
pipeline bench does for the same work. The difference is not the work but
the gaps: at the android-2m rate the daemon handles 39 messages a second,
each after an idle spell during which the machine ran other things, so each
wake-up starts with cold caches. This measures that, two ways, and prints
one JSON object:

- ``wakeup_us``: CPU microseconds of one empty ``asyncio.sleep`` wake-up,
  back to back and after idle gaps of 1, 5 and 25 ms.
- ``outbox_put_us``: CPU microseconds of the process per lone put of a
  4,200-byte envelope (an attempt mark riding with it, a delete of four
  acknowledged rows every fourth put) through :class:`relay.outbox.Outbox`,
  committed by its worker thread (``inline_commit=False``) and inline on the
  loop's thread (the default), each one loop iteration apart and paced 25 ms
  apart (the android-2m message interval); the paced figures include one
  wake-up.

Figures and their reading: docs/benchmarks-history.md, "Where the e2e
daemon's CPU still goes".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from relay.outbox import Outbox, OutboxConfig, OutboxItem

__all__ = ["main", "outbox_put_us", "wakeup_us"]

GAPS_MS: Final = (0.0, 1.0, 5.0, 25.0)
_ENVELOPE: Final = 4200
_TOPIC: Final = "bench/up"


async def _sleeps(count: int, gap_s: float) -> float:
    started = time.process_time()
    for _ in range(count):
        await asyncio.sleep(gap_s)
    return (time.process_time() - started) / count * 1e6


def wakeup_us(count: int) -> dict[str, float]:
    """CPU µs per empty wake-up, by idle gap (``count`` wake-ups per gap)."""
    return {
        f"{gap:g}ms": round(asyncio.run(_sleeps(count, gap / 1000)), 1)
        for gap in GAPS_MS
    }


async def _puts(directory: Path, count: int, gap_s: float, *, inline: bool) -> float:
    config = OutboxConfig(inline_commit=inline)
    outbox = await Outbox.open(directory / f"inline-{inline}.sqlite3", config)
    try:
        ids: list[bytes] = []
        lazy: list[asyncio.Future[int]] = []
        started = time.process_time()
        for i in range(count):
            if ids:
                lazy.append(outbox.mark_attempt_soon([ids[-1]], lazy=True))
            if i % 4 == 3 and i > 8:
                lazy.append(outbox.ack_soon(ids[-8:-4], lazy=True))
            msg_id = os.urandom(16)
            await outbox.put_soon(OutboxItem(msg_id, os.urandom(_ENVELOPE), _TOPIC))
            ids.append(msg_id)
            await asyncio.sleep(gap_s)  # 0: the next loop iteration
        spent = time.process_time() - started
        await asyncio.gather(*lazy)
        return spent / count * 1e6
    finally:
        await outbox.close()


def outbox_put_us(count: int, gap_ms: float = 25.0) -> dict[str, float]:
    """CPU µs per lone put: through the worker vs inline, back to back and paced."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, inline in (("worker", False), ("inline", True)):
            for label, gap in (("0ms", 0.0), (f"{gap_ms:g}ms", gap_ms / 1000)):
                for stale in Path(tmp).glob("*.sqlite3*"):
                    stale.unlink()
                spent = asyncio.run(_puts(Path(tmp), count, gap, inline=inline))
                out[f"{name}_{label}"] = round(spent, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run both measurements; print one JSON object on standard output."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench.coldpath",
        description="CPU per wake-up and per lone outbox put, by idle gap.",
    )
    parser.add_argument(
        "--wakeups", type=int, default=300, help="wake-ups per gap (default 300)"
    )
    parser.add_argument(
        "--puts", type=int, default=400, help="puts per variant (default 400)"
    )
    args = parser.parse_args(argv)
    if args.wakeups < 1 or args.puts < 10:
        parser.error("--wakeups must be >= 1 and --puts >= 10")
    result = {
        "wakeup_us": wakeup_us(args.wakeups),
        "outbox_put_us": outbox_put_us(args.puts),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
