"""``glasses-relay bench throughput``: runs, reports the fields, loses nothing.

Speed is never gated here (a noisy 2-core CI box); the measured figures live in
docs/benchmarks.md with the commands that produced them. Each test is one
short invocation, which runs the shipped relay and the naive one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from servers import Mosquitto

import tools.bench.throughput as throughput
from protocol.message import Message
from relay.errors import ConfigError
from tools.bench.throughput import (
    _PAYLOAD_HEADER,
    _Injector,
    _pipeline_sleep,
    _Sent,
    _Tally,
    _Window,
    reference_summary,
    reference_workload,
)

SCRIPT = Path(sys.executable).parent / "glasses-relay"
FIELDS = (
    "mode", "profile", "uplink", "goodput_bytes_per_s", "ceiling_bytes_per_s",
    "goodput_ratio", "link_efficiency", "cpu_fraction", "cpu_s_per_mb",
    "added_latency_ms", "peak_rss_mb", "lost", "duplicated", "reordered",
    "encryption", "outbox_sync",
)  # fmt: skip


def run_bench(
    *args: str, timeout: float = 55, command: str = "throughput"
) -> tuple[dict[str, Any], str]:
    out = subprocess.run(
        [str(SCRIPT), "bench", command, "--json", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout), out.stderr


def check_relay(figures: dict[str, Any]) -> None:
    for key in FIELDS[3:14]:
        assert key in figures, key
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["reordered"] == 0
    assert figures["queued_at_end"] == 0
    assert figures["goodput_ratio"] == 1.0
    assert isinstance(figures["goodput_bytes_per_s"], float)
    assert figures["goodput_bytes_per_s"] > 0
    assert isinstance(figures["cpu_fraction"], float)
    assert 0 < figures["cpu_fraction"] < 2.0
    latency = figures["added_latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency) >= {"p50", "p99"}
    assert 0 < latency["p50"] <= latency["p99"]
    reference = figures["reference_ms"]  # the machine's speed over the window
    assert reference["samples"] >= 1
    assert 0 < reference["p10"] <= reference["p50"] <= reference["p90"]


@pytest.mark.timeout(150)
def test_pipeline_reports_both_relays_per_profile_and_draws_them(
    tmp_path: Path,
) -> None:
    chart = tmp_path / "chart.png"
    combined, stderr = run_bench(
        "--mode", "pipeline", "--uplink", "ws", "--profile", "android-2m,ble40",
        "--duration", "1", "--warmup", "0.3", "--plot", str(chart), timeout=140,
    )  # fmt: skip
    assert (combined["mode"], combined["uplink"]) == ("pipeline", "ws")
    assert [run["profile"] for run in combined["runs"]] == ["android-2m", "ble40"]
    assert [run["fragment_size"] for run in combined["runs"]] == [244, 20]
    for result in combined["runs"]:
        for key in FIELDS:
            assert key in result, key
        assert result["mode"] == "pipeline"
        assert result["ceiling_bytes_per_s"] == pytest.approx(162_666.7, abs=1)
        assert isinstance(result["ceiling_multiple"], float)
        check_relay(result)
        naive = result["naive"]
        assert isinstance(naive, dict)
        check_relay(naive)
        assert naive["settings"]["cloud.batch_items"] == 1
        assert naive["settings"]["cloud.max_pending_puts"] == 1
        assert naive["settings"]["outbox.write_delay"] == 0  # every message written
        assert result["settings"]["cloud.batch_items"] == 64
        assert result["settings"]["outbox.write_delay"] == 0.5
        assert result["outbox_sync"] == "NORMAL"
        assert set(result["batched_over_naive"]) == {
            "goodput",
            "bytes_per_cpu_s",
            "cpu_s_per_mb",
        }
    assert "goodput" in stderr  # the table for people goes to stderr
    assert "x 162,667 B/s" in stderr
    assert "link efficiency" not in stderr  # the multiple, not a fraction
    with Image.open(chart) as image:  # the chart of both profiles
        assert (image.format, image.size) == ("PNG", (1200, 800))


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_e2e_through_processes_loses_nothing() -> None:
    result, _ = run_bench(
        "--mode", "e2e", "--profile", "android-2m", "--duration", "3",
        "--warmup", "1",
    )  # fmt: skip
    assert result["mode"] == "e2e"
    assert result["profile"] == "android-2m"
    assert result["uplink"] == "mqtt"
    check_relay(result)
    assert isinstance(result["naive"], dict)
    check_relay(result["naive"])
    link_efficiency = result["link_efficiency"]
    assert isinstance(link_efficiency, float)
    assert 0 < link_efficiency <= 1.0
    assert result["bt_host_share"] is None or 0 <= result["bt_host_share"] <= 1


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_soak_reports_resources_at_start_and_end(mosquitto: Mosquitto) -> None:
    # The shortest soak (10 s), through a broker the bench did not start.
    result, stderr = run_bench(
        "--duration", "10", "--warmup", "0.5", "--broker", mosquitto.url,
        command="soak", timeout=80,
    )  # fmt: skip
    assert (result["mode"], result["profile"], result["uplink"]) == (
        "soak",
        "android-2m",
        "mqtt",
    )
    assert result["naive"] is None  # the shipped relay only
    check_relay(result)
    assert result["broker_cpu_fraction"] is None  # not the bench's broker
    resources = result["resources"]
    for key in ("rss_mb", "fds", "threads", "asyncio_tasks"):
        start, end = resources[key]
        assert start > 0, key
        assert end > 0, key
    start, end = resources["rss_mb"]
    assert resources["rss_growth_mb"] == pytest.approx(end - start, abs=0.11)
    assert "RSS growth" in stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--uplink", "ws", "--broker", "mqtt://127.0.0.1:1"], "--broker"),
        (["--profile", "android-2m,nope"], "nope"),
        (["--plot", "/nonexistent-dir/chart.png"], "--plot"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], named: str) -> None:
    out = subprocess.run(
        [str(SCRIPT), "bench", "throughput", *args],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert named in out.stderr


def test_tally_counts_loss_duplicates_and_reordering() -> None:
    sent = {f"m{i}": _Sent(i, 100, 10.0 + i * 0.01) for i in range(5)}
    ledger = [
        ("m0", 10.02),
        ("m2", 10.05),
        ("m1", 10.06),  # after m2: reordered
        ("m2", 10.07),  # processed twice
        ("m9", 10.08),  # not ours
    ]
    tally = _Tally.count(sent, ledger, _Window(10.0, 10.1))
    assert tally.offered == 5
    assert tally.delivered == 3
    assert tally.lost == 2
    assert tally.duplicated == 1
    assert tally.reordered == 1
    assert tally.bytes_delivered == 300
    assert tally.latency_ms()["p50"] == pytest.approx(30.0, abs=0.01)


def test_reference_workload_times_itself_and_summarises() -> None:
    assert reference_workload(20_000) > 0
    summary = reference_summary([float(ms) for ms in range(20, 0, -1)])
    # Nearest rank, as the bench's latency percentiles.
    assert summary == {"p10": 2.0, "p50": 10.0, "p90": 18.0, "samples": 20}
    assert reference_summary([]) == {
        "p10": None,
        "p50": None,
        "p90": None,
        "samples": 0,
    }


class SlowPeer:
    """The pipeline peer's seam for :class:`_Injector`: two fragments a
    message, each seal step slow (as a gigabyte of real sealing is)."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.sealed: list[Message] = []
        self.notified: list[bytes] = []
        self.notify = lambda data: self.notified.append(bytes(data))
        self.dropped = False
        self.acked_event = asyncio.Event()
        self.on_acked: Any = None

    def seal(self, messages: Sequence[Message]) -> tuple[list[bytes], list[int]]:
        time.sleep(self.step_s)
        fragments: list[bytes] = []
        ends: list[int] = []
        for message in messages:
            n = len(self.sealed)
            fragments += [b"%d.0" % n, b"%d.1" % n]
            ends.append(len(fragments) - 1)
            self.sealed.append(message)
        return fragments, ends


async def test_pipeline_input_is_prepared_in_steps_with_the_link_kept_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: one seal of the whole input stopped the loop for as long as it
    # took (seconds for a gigabyte), past the daemon's supervision timeout.
    monkeypatch.setattr(throughput, "_PREPARE_SLICE", 10)
    peer = SlowPeer(step_s=0.1)
    injector = _Injector(peer, lambda: 0, 100)  # type: ignore[arg-type]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    other = asyncio.create_task(ticker())
    await injector.prepare(150, 7, 100)
    other.cancel()
    assert ticks >= 14  # the loop ran between the 15 steps
    assert injector.fragments == [
        b"%d.%d" % (n, part) for n in range(150) for part in (0, 1)
    ]
    assert injector.ends == [2 * n + 1 for n in range(150)]
    assert injector.ids == [m.message_id.hex() for m in peer.sealed]
    assert [_PAYLOAD_HEADER.unpack_from(m.body)[1] for m in peer.sealed] == list(
        range(7, 157)
    )  # numbered on from ``first``, in order
    # 1.5 s of preparing: the first prepared message went out meanwhile, whole.
    assert peer.notified == [b"0.0", b"0.1"]
    assert len(injector.arrived) == 1
    assert injector._next == 2


async def test_pipeline_run_stops_with_one_line_when_the_link_drops() -> None:
    peer = SimpleNamespace(dropped=True)
    daemon = SimpleNamespace(
        cloud=SimpleNamespace(stats=SimpleNamespace(acks_received=0))
    )
    spec = SimpleNamespace(progress=False)
    with pytest.raises(ConfigError, match="dropped the bench link"):
        await _pipeline_sleep(spec, 5.0, daemon, peer, "window")  # type: ignore[arg-type]
