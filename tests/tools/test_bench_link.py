"""``glasses-relay bench link``: runs, reports sane fields, loses nothing.

Throughput itself is not gated here (a noisy 2-core CI box); the measured
figures live in docs/benchmarks.md with the command that produced them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.sim.profiles import PROFILES
from tools.bench.link import run_link_bench

TABLE = {
    "android-2m": 162_667,
    "android-2m-6pkt": 97_600,
    "ios": 65_067,
    "ble42-dle": 97_600,
    "ble40": 29_333,
}
SCRIPT = Path(sys.executable).parent / "glasses-relay"


@pytest.mark.parametrize("profile", sorted(TABLE))
async def test_every_profile_delivers_everything_in_order(profile: str) -> None:
    result = await run_link_bench(PROFILES[profile], duration=1.5)
    assert abs(result.ceiling_bytes_per_s - TABLE[profile]) <= 0.01 * TABLE[profile]
    assert result.lost == 0
    assert result.reordered == 0
    assert result.goodput_ratio >= 0.995
    assert result.bytes_offered > 0
    assert 0 < result.link_efficiency <= 1.0
    assert result.fragment_size == (20 if profile == "ble40" else 244)


def test_cli_prints_one_json_object_with_the_documented_fields() -> None:
    out = subprocess.run(
        [str(SCRIPT), "bench", "link", "--profile", "ios", "--direction", "down",
         "--duration", "2", "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    result = json.loads(out.stdout)
    for key in (
        "profile", "direction", "bytes_offered", "bytes_delivered",
        "goodput_bytes_per_s", "ceiling_bytes_per_s", "goodput_ratio",
        "link_efficiency", "frames", "lost", "reordered",
    ):  # fmt: skip
        assert key in result, key
    assert result["profile"] == "ios"
    assert result["direction"] == "down"
    assert "goodput" in out.stderr  # the table for people goes to stderr


def test_bad_duration_is_one_line() -> None:
    out = subprocess.run(
        [str(SCRIPT), "bench", "link", "--duration", "500"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "--duration" in out.stderr
