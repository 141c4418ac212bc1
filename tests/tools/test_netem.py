"""tools.netem: the trace-driven link, pure (simulated time) and through the proxy.

The pure tests drive :class:`Shaper` with event times it reports itself, so
they are exact and deterministic. The proxy tests run on 127.0.0.1 only, with
bounded durations. The RRC-Probe and Speedtest files have no licence grant and
are not in tests/data: tests use explicit model parameters or small synthetic
CSVs, and read ../shared/data only when it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest

from relay.errors import ConfigError
from tools.netem import (
    FALLBACK_RTT_4G,
    FALLBACK_WAKEUP,
    MTU_BYTES,
    DataFormatError,
    Distribution,
    LinkBusyError,
    Radio,
    Shaper,
    Trace,
    TraceFormatError,
    default_rtt_model,
    default_wakeup_model,
    load_rrc_probe,
    load_speedtest_rtt,
    load_trace,
)
from tools.netem.models import RRC_PROBE_DIR
from tools.netem.proxy import NetemConfig, NetemProxy

ROOT = Path(__file__).resolve().parents[2]
ATT_UP = ROOT / "tests" / "data" / "traces" / "mahimahi" / "ATT-LTE-driving-2016.up"
FAST = Trace.from_offsets([1], "12mbit")  # one opportunity per ms: 1.5 MB/s
LOCAL = "127.0.0.1"


@pytest.fixture(scope="module")
def att() -> Trace:
    return load_trace(ATT_UP)


def saturate(shaper: Shaper, start: float, end: float) -> list[tuple[float, int]]:
    """Keep the queue full from ``start``; return ``(time, bytes)`` arrivals."""
    arrivals: list[tuple[float, int]] = []
    shaper.offer(shaper.free_bytes(start), start)
    while (t := shaper.next_event_time()) is not None and t <= end:
        count = shaper.pop_delivered(t)
        if count:
            arrivals.append((t, count))
        if free := shaper.free_bytes(t):
            shaper.offer(free, t)
    return arrivals


# -- traces -------------------------------------------------------------------


def test_load_trace_reads_a_mahimahi_file(att: Trace) -> None:
    assert att.name == "ATT-LTE-driving-2016.up"
    assert att.opportunities_per_loop == 19_101
    assert att.period_ms == 120_002
    assert att.mean_bytes_per_s * 8e-6 == pytest.approx(1.91, abs=0.005)
    # Looped: the second loop starts at the period; any window of one period
    # holds exactly one loop's opportunities.
    assert att.time_ms(19_101) == 120_002 + att.offsets_ms[0]
    for start in (0.0, 7.3, 119.9, 250.0):
        assert att.count_between(start, start + 120.002) == 19_101


def test_opportunity_indexing_at_loop_boundaries() -> None:
    trace = Trace.from_offsets([0, 0, 5, 10], "tiny")  # period 10 ms
    assert [trace.time_ms(k) for k in range(8)] == [0, 0, 5, 10, 10, 10, 15, 20]
    assert trace.first_at_or_after(10) == 3  # the first loop's last line, at 10
    assert trace.first_after(10) == 6
    assert trace.first_at_or_after(10.5) == 6
    assert trace.count_between(0.0, 0.010) == 4


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no delivery opportunities"),
        ("0\n0\n", "lasts 0 ms"),
        ("5\n3\n", "decrease"),
        ("1\nx\n", "not a non-negative integer"),
        ("-1\n5\n", "not a non-negative integer"),
    ],
)
def test_load_trace_rejects_malformed_files(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "bad.trace"
    path.write_text(text)
    with pytest.raises(TraceFormatError) as caught:
        load_trace(path)
    assert reason in caught.value.reason
    assert isinstance(caught.value, ConfigError)  # the CLI reports it in one line


# -- the shaper, simulated time ------------------------------------------------


@pytest.mark.parametrize("start", [5.0, 115.0])  # 115 s wraps around the loop
def test_saturated_shaper_delivers_the_trace_every_second(
    att: Trace, start: float
) -> None:
    arrivals = saturate(Shaper(att, now=start), start, start + 10)
    got = [0] * 10
    for t, count in arrivals:
        got[max(0, math.ceil(round(t - start, 6)) - 1)] += count
    # Bin i holds (start + i, start + i + 1]; bin 0 also the opportunities at start.
    expected = [att.capacity_bytes(start + i, start + i + 1) for i in range(10)]
    expected[0] += att.capacity_bytes(start - 1e-4, start)
    for got_bytes, want in zip(got, expected, strict=True):
        assert abs(got_bytes - want) <= 0.02 * want
    assert got == expected  # in fact exact: every opportunity carries 1500 bytes
    assert sum(got) / (10 * att.mean_bytes_per_s) > 0.5  # a real, busy window


def test_opportunities_are_lost_while_the_queue_is_empty() -> None:
    shaper = Shaper(FAST)
    # 100 ms idle: no credit accumulates; 10 packets take 10 opportunities.
    assert shaper.offer(10 * MTU_BYTES, 0.100)
    assert shaper.pop_delivered(0.1085) == 9 * MTU_BYTES  # opportunities 100..108 ms
    assert shaper.next_event_time() == pytest.approx(0.109)
    assert shaper.pop_delivered(0.109) == MTU_BYTES
    # A short offer takes a whole opportunity; the rest of it is lost.
    assert shaper.offer(100, 0.2995)
    assert shaper.pop_delivered(0.300) == 100
    assert shaper.offer(MTU_BYTES, 0.300)
    assert shaper.pop_delivered(0.300) == 0
    assert shaper.next_event_time() == pytest.approx(0.301)
    assert shaper.pop_delivered(0.301) == MTU_BYTES
    counters = shaper.counters()
    assert counters.opportunities_used == 12
    assert counters.opportunities_wasted == 301 - 12  # of the 301 in 1..301 ms


def test_queue_limit_drops_the_tail_and_counts() -> None:
    shaper = Shaper(Trace.from_offsets([1000], "1pps"), queue_limit_bytes=4000)
    assert shaper.offer(1500, 0.1)
    assert shaper.offer(1500, 0.2)
    assert not shaper.offer(1500, 0.3)  # 4500 > 4000: dropped whole
    assert shaper.offer(1000, 0.4)  # fits exactly
    assert shaper.free_bytes(0.5) == 0
    counters = shaper.counters()
    assert (counters.drops, counters.bytes_dropped) == (1, 1500)
    assert (counters.queue_bytes, counters.bytes_offered) == (4000, 4000)
    assert shaper.pop_delivered(1.0) == 1500  # one opportunity per second
    assert shaper.free_bytes(1.0) == 1500


def test_base_delay_is_added_after_the_bottleneck() -> None:
    shaper = Shaper(FAST, delay_s=0.050)
    assert shaper.offer(3000, 0.0105)
    assert shaper.next_event_time() == pytest.approx(0.011)  # departure
    assert shaper.pop_delivered(0.060) == 0
    assert shaper.in_flight_bytes(0.060) == 3000
    assert shaper.pop_delivered(0.061) == 1500
    assert shaper.pop_delivered(0.062) == 1500
    with pytest.raises(ValueError, match="backwards"):
        shaper.pop_delivered(0.061)


def test_switch_trace_takes_effect_at_once() -> None:
    shaper = Shaper(Trace.from_offsets([10], "150kBps"))
    slow = saturate(shaper, 0.0, 1.0)
    shaper.switch_trace(FAST, 1.0)
    fast = saturate(shaper, 1.0, 2.0)
    assert sum(n for _, n in slow) == 100 * MTU_BYTES
    assert sum(n for _, n in fast) == 1000 * MTU_BYTES
    assert shaper.counters().trace_switches == 1
    # restart=True starts the new trace at its offset 0 at the switch time.
    sparse = Trace.from_offsets([1000], "1pps")
    assert shaper.pop_delivered(2.5) == 65536  # the queue's rest, by 2.044 s
    shaper.switch_trace(sparse, 2.5, restart=True)
    assert shaper.offer(1500, 2.5)
    assert shaper.next_event_time() == pytest.approx(3.5)


def test_radio_wakes_up_after_idle_s_without_traffic() -> None:
    radio = Radio(Distribution.constant(1.2), idle_s=10.0)
    up = Shaper(FAST, radio=radio)
    down = Shaper(FAST, radio=radio)
    assert up.offer(1500, 1.0)
    assert up.pop_delivered(1.0) == 1500  # active at start: no wake-up
    # Exactly idle_s after the last departure: the radio slept.
    assert up.offer(1500, 11.0)
    assert radio.ready_at == pytest.approx(12.2)
    assert up.pop_delivered(12.1995) == 0
    assert up.next_event_time() == pytest.approx(12.2)
    assert up.pop_delivered(12.2) == 1500
    # Traffic in the other direction keeps the radio awake.
    assert down.offer(1500, 20.0)
    assert down.pop_delivered(20.0) == 1500
    assert up.offer(1500, 29.999)  # 9.999 s after the downlink departure
    assert up.pop_delivered(29.999) == 1500
    assert radio.counters().wakeups == 1
    assert up.offer(1500, 45.0)  # idle 15 s: second wake-up
    assert up.pop_delivered(46.2) == 1500
    assert radio.counters().wakeups == 2
    assert radio.counters().wakeup_s_total == pytest.approx(2.4)


def test_radio_stays_awake_while_bytes_wait_for_capacity() -> None:
    radio = Radio(Distribution.constant(1.0), idle_s=10.0)
    outage = Shaper(Trace.from_offsets([20_000], "one-per-20-s"), radio=radio)
    assert outage.offer(1500, 0.5)  # waits until the opportunity at 20 s
    assert outage.offer(1500, 15.0)  # 14.5 s after the last offer, queue not empty
    assert radio.counters().wakeups == 0
    assert outage.pop_delivered(20.0) == 1500


def test_radio_asleep_at_start_and_radio_without_model() -> None:
    cold = Radio(Distribution.constant(0.5), idle_at_start=True)
    shaper = Shaper(FAST, radio=cold)
    assert shaper.offer(10, 0.0)
    assert shaper.next_event_time() == pytest.approx(0.5)
    never = Radio(None, idle_s=1.0)
    shaper = Shaper(FAST, radio=never)
    assert shaper.offer(10, 100.0)
    assert shaper.pop_delivered(100.0) == 10
    assert never.counters().wakeups == 0


# -- delay models --------------------------------------------------------------


def test_distribution_quantiles_and_sampling() -> None:
    uniform = Distribution.uniform(0.8, 1.6, "test")
    assert uniform.quantile(0.25) == pytest.approx(1.0)
    assert uniform.median == pytest.approx(1.2)
    draws = [uniform.sample(random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]  # seeded
    empirical = Distribution.from_samples([0.3, 0.1, 0.2], "test")
    assert empirical.quantile(0.0) == 0.1
    assert empirical.median == 0.2
    assert empirical.quantile(0.75) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="decrease"):
        Distribution(((0.0, 2.0), (1.0, 1.0)), "bad")


def test_fallback_models_without_shared_data(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    assert default_wakeup_model(data=missing) is FALLBACK_WAKEUP
    assert default_rtt_model(data=missing / "x.csv") is FALLBACK_RTT_4G
    assert (FALLBACK_WAKEUP.quantile(0), FALLBACK_WAKEUP.quantile(1)) == (0.8, 1.6)
    assert FALLBACK_RTT_4G.median == pytest.approx(0.074)
    assert FALLBACK_RTT_4G.quantile(0.9) == pytest.approx(0.096)


def test_rrc_probe_loader_subtracts_the_connected_baseline(tmp_path: Path) -> None:
    # Synthetic rows in the RRC-Probe column layout (the real files are not copied).
    rows = [
        "enabled_radio_type,carrier,interval,RTT1,RTT2,active_radio_type,KeepOrDrop",
        "4G-LTE,X,0,60,60,4,YEP",
        "4G-LTE,X,0.1,80,80,4,YEP",
        "4G-LTE,X,0.2,70,70,4,YEP",  # baseline: median 70 ms
        "4G-LTE,X,5,400,400,4,YEP",  # below idle_s: ignored
        "4G-LTE,X,12,1070,1070,4,YEP",
        "4G-LTE,X,13,870,870,4,YEP",
        "4G-LTE,X,14,5000,5000,4,BAD",  # other traffic: dropped
        "4G-LTE,X,15,0,0,4,YEP",  # no measurement: dropped
    ]
    path = tmp_path / "probe.csv"
    path.write_text("\n".join(rows) + "\n")
    model = load_rrc_probe([path], idle_s=10.0)
    assert (model.quantile(0), model.quantile(1)) == pytest.approx((0.8, 1.0))
    assert default_wakeup_model(data=tmp_path).knots == model.knots
    with pytest.raises(DataFormatError):
        load_rrc_probe([path], idle_s=30.0)  # no probe after 30 s idle


def test_speedtest_loader_picks_the_radio_type(tmp_path: Path) -> None:
    path = tmp_path / "speedtest.csv"
    path.write_text(
        "latency_ms,radio_type,type\n50,4G-LTE,latency\n90,4G-LTE,uplink\n"
        "20,5G-NSA-mmWave,latency\n"
    )
    assert load_speedtest_rtt(path).median == pytest.approx(0.070)
    assert load_speedtest_rtt(path, radio_type="5G-NSA-mmWave").median == 0.020
    with pytest.raises(DataFormatError):
        load_speedtest_rtt(path, radio_type="6G")


def test_shared_rrc_probe_data_when_present() -> None:
    if not RRC_PROBE_DIR.is_dir():
        pytest.skip(
            "the RRC-Probe data (../shared/data) is absent: it has no licence grant, "
            "so it is never copied into the repository; the loader itself is "
            "tested on synthetic CSVs above"
        )
    model = default_wakeup_model()
    assert model.source.startswith("RRC-Probe")
    # PERFORMANCE.md: ≈0.8-1.6 s promotion RTT after >= 10-12 s idle.
    assert 0.5 <= model.median <= 1.2
    assert model.quantile(0.9) <= 1.7


def test_pure_part_does_not_import_asyncio() -> None:
    code = (
        "import sys, tools.netem, tools.netem.shaper, tools.netem.trace, "
        "tools.netem.models\n"
        "print(','.join(m for m in ('asyncio', 'socket') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert out.stdout.strip() == ""


# -- the proxy, on loopback ----------------------------------------------------


async def until(predicate: Callable[[], bool]) -> None:
    """Poll the proxy's counters (it has no hook for them), for at most 5 s."""
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


Handler = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Coroutine[None, None, None]
]


class Target:
    """A loopback server whose connection handlers are cancelled at exit."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.server: asyncio.Server | None = None

    def _on_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.tasks.add(asyncio.create_task(self.handler(reader, writer)))

    async def __aenter__(self) -> Target:
        self.server = await asyncio.start_server(self._on_client, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
        for result in results:  # handler bugs (assertions) fail the test
            if isinstance(result, AssertionError):
                raise result


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_proxy_listens_on_loopback_only() -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 only"):
        NetemProxy("0.0.0.0", 0, LOCAL, 1, FAST, FAST)  # noqa: S104


async def test_proxy_rate_follows_the_trace_within_2_percent(att: Trace) -> None:
    """Both directions saturated for 3 s through real sockets."""
    records: dict[str, list[tuple[float, int]]] = {"up": [], "down": []}
    proxy: NetemProxy | None = None

    async def pour(writer: asyncio.StreamWriter) -> None:
        chunk = bytes(64 * 1024)
        with contextlib.suppress(OSError):
            while True:
                writer.write(chunk)
                await writer.drain()

    async def count(reader: asyncio.StreamReader, key: str) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                assert proxy is not None
                records[key].append((proxy.trace_time(), len(data)))

    async def target(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        counter = asyncio.create_task(count(reader, "up"))
        try:
            await pour(writer)
        finally:
            counter.cancel()
            writer.close()

    # 9-12 s of ATT-LTE-driving-2016.up: ≈300 opportunities per second.
    config = NetemConfig(start_offset_s=9.0)
    async with (
        Target(target) as server,
        NetemProxy(LOCAL, 0, LOCAL, server.port, att, att, config=config) as p,
    ):
        proxy = p
        reader, writer = await asyncio.open_connection(LOCAL, p.port)
        tasks = [
            asyncio.create_task(pour(writer)),
            asyncio.create_task(count(reader, "down")),
        ]
        await asyncio.sleep(3.0)
        stats = p.stats()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
    for key in ("up", "down"):
        (t_first, _), *rest = records[key]
        t_last = rest[-1][0]
        delivered = sum(n for _, n in rest)
        expected = att.capacity_bytes(t_first, t_last)
        print(f"{key}: {delivered} B vs {expected} B over {t_last - t_first:.3f} s")
        assert abs(delivered - expected) <= 0.02 * expected
        assert expected > 600 * MTU_BYTES
    assert stats.uplink.drops == stats.downlink.drops == 0


async def test_proxy_keeps_order_and_closes_both_ways() -> None:
    """Three connections share a small queue with a base delay; echo round trip."""
    payloads = [random.Random(i).randbytes(150_000) for i in range(3)]
    config = NetemConfig(queue_limit_bytes=8192, rtt=Distribution.constant(0.02))

    async def exchange(payload: bytes, proxy_port: int) -> bytes:
        reader, writer = await asyncio.open_connection(LOCAL, proxy_port)
        writer.write(payload)
        writer.write_eof()  # client half-close first: forwarded after the bytes
        received = await reader.read()  # until the server's end of stream
        writer.close()
        await writer.wait_closed()
        return received

    async with (
        Target(echo) as server,
        NetemProxy(LOCAL, 0, LOCAL, server.port, FAST, FAST, config=config) as p,
    ):
        assert p.rtt_s == pytest.approx(0.02)
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(exchange(x, p.port) for x in payloads))
        assert results == payloads
        await until(lambda: p.stats().connections_open == 0)
        stats = p.stats()
    assert stats.connections_total == 3
    assert stats.uplink.bytes_delivered == stats.downlink.bytes_delivered == 450_000
    assert stats.uplink.drops == stats.downlink.drops == 0
    assert stats.uplink.delay_s == pytest.approx(0.01)


async def test_proxy_forwards_the_servers_close_first() -> None:
    seen_client_eof = asyncio.Event()

    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()
        assert await reader.read() == b"late"
        seen_client_eof.set()
        writer.close()

    async with (
        Target(bye) as server,
        NetemProxy(LOCAL, 0, LOCAL, server.port, FAST, FAST) as proxy,
    ):
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        async with asyncio.timeout(5):
            assert await reader.read() == b"bye"  # then end of stream
            writer.write(b"late")  # the other direction is still open
            writer.write_eof()
            await seen_client_eof.wait()
            await until(lambda: proxy.stats().connections_open == 0)
        writer.close()


async def test_proxy_drops_the_client_when_the_target_is_down() -> None:
    async with Target(echo) as gone:
        port = gone.port  # closed when the block ends
    async with NetemProxy(LOCAL, 0, LOCAL, port, FAST, FAST) as proxy:
        reader, writer = await asyncio.open_connection(LOCAL, proxy.port)
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.close()
        stats = proxy.stats()
    assert (stats.connections_total, stats.connections_open) == (1, 0)


async def test_proxy_backpressure_switch_trace_and_busy_skip() -> None:
    """No capacity: the queue fills, nothing is dropped; a new trace drains it."""
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        done.set()
        writer.close()

    payload = random.Random(3).randbytes(1_000_000)
    outage = Trace.from_offsets([600_000], "one-per-10-min")
    config = NetemConfig(queue_limit_bytes=10_000)
    async with (
        Target(sink) as server,
        NetemProxy(LOCAL, 0, LOCAL, server.port, outage, outage, config=config) as p,
    ):
        _, writer = await asyncio.open_connection(LOCAL, p.port)
        writer.write(payload)
        writer.write_eof()
        await until(lambda: p.stats().uplink.queue_bytes == 10_000)
        stats = p.stats()
        assert stats.uplink.bytes_offered == 10_000  # read no more than the room
        assert stats.uplink.drops == 0
        assert not received
        with pytest.raises(LinkBusyError):
            p.skip(1.0)
        p.switch_trace("uplink", FAST)
        async with asyncio.timeout(5):
            await done.wait()
        assert bytes(received) == payload
        stats = p.stats()
        assert stats.uplink.trace == "12mbit"
        assert stats.uplink.trace_switches == 1
        assert stats.uplink.bytes_delivered == len(payload)
        assert stats.uplink.drops == 0
        writer.close()


async def test_proxy_skip_moves_the_trace_clock_and_wakes_the_radio() -> None:
    # Capacity only in the second half of each 20 s loop: at 0 s, a byte would
    # wait 10 s; after skip(10.5) it goes at once, after a wake-up.
    late = Trace.from_offsets(list(range(10_000, 20_001)), "late-half")
    config = NetemConfig(wakeup=Distribution.constant(0.3), idle_s=10.0)
    async with (
        Target(echo) as server,
        NetemProxy(LOCAL, 0, LOCAL, server.port, late, late, config=config) as p,
    ):
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(LOCAL, p.port)
        before = p.trace_time()
        p.skip(10.5)
        assert p.trace_time() - before == pytest.approx(10.5, abs=0.05)
        assert p.stats().skipped_s == 10.5

        async def round_trip() -> float:
            start = loop.time()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            return loop.time() - start

        async with asyncio.timeout(5):
            first = await round_trip()  # idle >= 10 s (skipped): wake-up
            second = await round_trip()  # radio active: no wake-up
        assert first >= 0.3
        assert second < 0.2
        assert p.radio.counters().wakeups == 1
        with pytest.raises(ValueError, match="finite"):
            p.skip(-1.0)
        writer.close()


async def test_cli_proxies_until_sigterm() -> None:
    out = err = b""
    async with Target(echo) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.netem",
            "--listen", f"{LOCAL}:0", "--target", f"{LOCAL}:{server.port}",
            "--uplink-trace", str(ATT_UP), "--downlink-trace", str(ATT_UP),
            "--rtt-ms", "10", "--no-wakeup", "--json",
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONWARNINGS="error"),
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(10):
                line = (await proc.stderr.readline()).decode()
                match = re.search(r"listening on 127\.0\.0\.1:(\d+) ", line)
                assert match, line
                reader, writer = await asyncio.open_connection(LOCAL, int(match[1]))
                writer.write(b"ping" * 1000)
                assert await reader.readexactly(4000) == b"ping" * 1000
                writer.close()
                await writer.wait_closed()
                proc.send_signal(signal.SIGTERM)
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    stats = json.loads(out)
    assert stats["uplink"]["bytes_delivered"] == 4000
    assert stats["downlink"]["bytes_delivered"] == 4000
    assert stats["rtt_s"] == pytest.approx(0.010)
    assert "stopped; 1 connections" in err.decode()


def test_cli_rejects_a_non_loopback_listen_address() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.netem", "--listen", "0.0.0.0:0",
         "--target", f"{LOCAL}:1", "--uplink-trace", str(ATT_UP),
         "--downlink-trace", str(ATT_UP), "--no-wakeup", "--rtt-ms", "0"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "127.0.0.1 only" in out.stderr
    assert out.stderr.count("\n") == 1
