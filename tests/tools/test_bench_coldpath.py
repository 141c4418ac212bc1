"""``python -m tools.bench.coldpath``: runs, and reports every figure it names.

The figures themselves (CPU per wake-up by idle gap, per lone outbox put) are
read in docs/benchmarks.md; here only that each is measured and positive.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.bench.coldpath import GAPS_MS, main


def test_reports_wakeups_by_gap_and_puts_both_ways(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--wakeups", "5", "--puts", "12"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["wakeup_us"]) == {f"{gap:g}ms" for gap in GAPS_MS}
    assert set(result["outbox_put_us"]) == {
        "worker_0ms",
        "worker_25ms",
        "inline_0ms",
        "inline_25ms",
    }
    for figures in result.values():
        assert all(value > 0 for value in figures.values()), figures


def test_too_few_puts_is_refused_naming_the_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench.coldpath", "--puts", "3"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--puts" in out.stderr.strip().splitlines()[-1]
