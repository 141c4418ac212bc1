"""``glasses-relay bench latency``: a short run, and the router following the network.

Both run the real path: bumble glasses, the daemon, the trace shaper and the
gateway (tools/bench/latency.py). The full-size run (120 requests per trace
pair) is in docs/benchmarks.md; here the runs are a few requests long.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.bodies import RequestKind
from tools.bench.latency import (
    STRATEGIES,
    PlannedRequest,
    make_plan,
    run_lane,
    score,
)

REPO = Path(__file__).resolve().parents[2]


def write_trace(path: Path, offsets_ms: list[int]) -> Path:
    path.write_text("".join(f"{ms}\n" for ms in offsets_ms))
    return path


@pytest.fixture
def fast_traces(tmp_path: Path) -> tuple[Path, Path]:
    # Two 1500-byte opportunities every millisecond: 24 Mbit/s each way.
    offsets = [ms for ms in range(1, 1001) for _ in range(2)]
    return (
        write_trace(tmp_path / "fast.up", offsets),
        write_trace(tmp_path / "fast.down", offsets),
    )


def test_plan_is_seeded_and_mixed() -> None:
    plan = make_plan(400, 7)
    assert plan == make_plan(400, 7)
    assert plan != make_plan(400, 8)
    shares = {
        k: sum(p.klass == k for p in plan) / len(plan)
        for k in ("phone_only", "either", "cloud_only")
    }
    assert abs(shares["phone_only"] - 0.2) < 0.06
    assert abs(shares["either"] - 0.5) < 0.07
    assert abs(shares["cloud_only"] - 0.3) < 0.06
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(plan)]
    assert 15 < sum(gaps) / len(gaps) < 25
    assert all(2.0 <= p.voice_s <= 5.0 for p in plan if not p.photo)
    assert all(p.voice_s == 0 for p in plan if p.photo)


def test_scores_follow_the_fixed_rules() -> None:
    assert score("phone_only", "local") == 1.0
    assert score("either", "cloud") == 1.0
    assert score("either", "local") == 0.6
    assert score("cloud_only", "cloud") == 1.0
    assert score("cloud_only", "local") == 0.0
    assert score("either", None) == 0.0


@pytest.mark.timeout(240)
def test_cli_reports_every_strategy_and_the_oracle(
    fast_traces: tuple[Path, Path],
) -> None:
    up, down = fast_traces
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "latency",
         "--uplink-trace", str(up), "--downlink-trace", str(down),
         "--requests", "4", "--seed", "3", "--json"],
        capture_output=True, text=True, timeout=220, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["requests"] == 4
    assert result["trace"] == {"uplink": "fast.up", "downlink": "fast.down"}
    strategies = result["strategies"]
    assert set(strategies) == {*STRATEGIES, "oracle"}
    for name, row in strategies.items():
        for key in ("within_budget_ratio", "utility", "extra_cloud_requests_ratio"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= 10_000, row
        assert isinstance(row["hedges"], int)
    # The oracle takes the better baseline per request: never worse than either.
    for name in ("always_cloud", "always_local"):
        assert strategies["oracle"]["utility"] >= strategies[name]["utility"]
    assert "always_local" in out.stderr  # the table on standard error


def test_missing_trace_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "bench", "latency",
         "--uplink-trace", str(tmp_path / "nope.up"),
         "--downlink-trace", str(tmp_path / "nope.down")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith("nope.up does not exist")
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(240)
async def test_router_follows_a_trace_switch_within_three_requests(
    tmp_path: Path, fast_traces: tuple[Path, Path]
) -> None:
    """Fast link, then a link with one opportunity every 5 s: the router stops
    sending "either" requests to the cloud within 3 requests of the switch."""
    up, down = fast_traces
    slow = [5000 * n for n in range(1, 13)]
    slow_up = write_trace(tmp_path / "slow.up", slow)
    slow_down = write_trace(tmp_path / "slow.down", slow)
    plan = [
        PlannedRequest(
            i,
            2.0 + 6.0 * i,
            "either",
            RequestKind.VOICE_QUERY,
            "what is 12 times 7",
            None,
            1.0,
            False,
        )
        for i in range(7)
    ]
    lane = await run_lane(
        "router",
        plan,
        up,
        down,
        seed=5,
        switch_after=3,
        switch_traces=(slow_up, slow_down),
        drain_wait_s=1.0,
    )
    routes = [o.route for o in lane.outcomes]
    assert all(r in ("cloud", "hedged") for r in routes[:3]), routes
    after = routes[3:]
    assert "local" in after[:3], (routes, [o.reason for o in lane.outcomes])
    # Before the switch, the cloud answered in time (1.0 for "either").
    assert all(o.utility(3.0) == 1.0 for o in lane.outcomes[:3]), lane.outcomes[:3]
