"""Tests of relay.router.estimators, and of the router learning a link change."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from protocol.bodies import Request, RequestKind
from relay.errors import ConfigError
from relay.router.decide import LocalOption, Policy, Route, decide
from relay.router.estimators import (
    BleEstimator,
    DownlinkEstimator,
    Estimators,
    FirstTokenEstimator,
    RadioEstimator,
    UplinkEstimator,
    lognormal_quantile,
    quantile,
)

EITHER = LocalOption("assistant-lite", 0.6, 0.3, phone_only=False)


def _rtt_sample(uplink: UplinkEstimator, key: int, rtt: float, at: float) -> None:
    uplink.sent(b"%d" % key, 300, at)
    uplink.acked(b"%d" % key, at + rtt)


# Helpers ---------------------------------------------------------------------


def test_quantile_interpolates_between_ranks() -> None:
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile(range(11), 0.9) == pytest.approx(9.0)
    assert quantile([1.0, 2.0], 0.0) == 1.0
    assert quantile([1.0, 2.0], 1.0) == 2.0
    with pytest.raises(ValueError, match="no samples"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match="from 0 to 1"):
        quantile([1.0], 1.5)


def test_lognormal_prior_quantiles() -> None:
    assert lognormal_quantile(0.8, 2.0, 0.5) == pytest.approx(0.8)
    assert lognormal_quantile(0.8, 2.0, 0.95) == pytest.approx(2.0)
    assert lognormal_quantile(0.8, 2.0, 0.9) == pytest.approx(1.6336, abs=1e-4)
    with pytest.raises(ValueError, match="median <= p95"):
        lognormal_quantile(2.0, 1.0, 0.9)


# BLE -------------------------------------------------------------------------


def test_ble_prior_then_robust_to_one_outlier_and_quick_to_change() -> None:
    ble = BleEstimator()
    assert ble.bps() == 50_000.0
    for i in range(3):
        ble.add(100_000, float(i), i + 1.0)  # 100 kB/s
    assert ble.bps() == pytest.approx(100_000)
    ble.add(100_000, 10.0, 10.1)  # 1 MB/s: one outlier
    assert ble.bps() == pytest.approx(100_000)
    ble.add(40_000, 20.0, 21.0)
    ble.add(40_000, 30.0, 31.0)  # two samples of a slower phone
    assert ble.bps() == pytest.approx(40_000)


def test_ble_ignores_transfers_too_small_to_measure() -> None:
    ble = BleEstimator(min_bytes=1024, min_duration_s=0.005)
    ble.add(100, 0.0, 1.0)
    ble.add(10_000, 0.0, 0.001)
    ble.add(10_000, 1.0, 0.5)
    assert ble.bps() == 50_000.0


# Uplink ----------------------------------------------------------------------


def test_uplink_rtt_robust_to_one_outlier_and_reacts_within_two_samples() -> None:
    uplink = UplinkEstimator(max_age_s=1e9)  # samples far apart in time
    assert uplink.rtt_s(0.0) == 0.08  # the prior
    for i in range(3):
        _rtt_sample(uplink, i, 0.08, at=10.0 * i)
    assert uplink.rtt_s(100.0) == pytest.approx(0.08)
    _rtt_sample(uplink, 3, 2.0, at=200.0)  # one outlier
    assert uplink.rtt_s(300.0) == pytest.approx(0.08)
    _rtt_sample(uplink, 4, 0.08, at=300.0)
    _rtt_sample(uplink, 5, 0.08, at=350.0)  # the outlier has left the window
    _rtt_sample(uplink, 6, 3.0, at=400.0)
    assert uplink.rtt_s(500.0) == pytest.approx(0.08)
    _rtt_sample(uplink, 7, 3.0, at=500.0)  # the second: a real change
    assert uplink.rtt_s(600.0) == pytest.approx(3.0)


def test_unacked_send_raises_rtt_to_its_age() -> None:
    uplink = UplinkEstimator(max_age_s=1e9, ack_hold_s=0)
    for i in range(3):
        _rtt_sample(uplink, i, 0.08, at=float(i))
    uplink.sent(b"lost", 300, at=100.0)
    assert uplink.rtt_s(100.05) == pytest.approx(0.08)  # not overdue yet
    assert uplink.rtt_s(105.0) == pytest.approx(5.0, abs=0.01)
    assert uplink.rtt_s(105.0) >= 5.0 - 300 / 250_000
    # A small late send says the path is slow, not that throughput is low.
    assert uplink.bps(105.0) == 250_000.0
    assert uplink.pending == 1
    uplink.acked(b"lost", 105.5)  # it was only slow: a 5.5 s sample
    assert uplink.pending == 0
    assert uplink.rtt_s(106.0) == pytest.approx(0.08)


def test_unacked_backlog_caps_throughput() -> None:
    uplink = UplinkEstimator(ack_hold_s=0)
    for i in range(3):
        _rtt_sample(uplink, i, 0.08, at=float(i))
    uplink.sent(b"media", 20_000, at=100.0)  # 0.08 s expected at 250 kB/s
    assert uplink.bps(100.1) == 250_000.0
    assert uplink.bps(105.0) == pytest.approx(20_000 / (5.0 - 0.08))
    assert uplink.rtt_s(105.0) == pytest.approx(5.0 - 20_000 / 250_000)


def test_sends_on_a_waking_radio_give_no_rtt_sample_and_get_an_allowance() -> None:
    estimators = Estimators()
    estimators.uplink_sent(b"first", 300, at=0.0)  # the radio was cold
    assert estimators.rtt_s(1.0) == 0.08  # within the 1.6 s wake-up allowance
    # Past it and the gateway's ack hold (255 ms): the age, less that hold.
    assert estimators.rtt_s(2.0) == pytest.approx(2.0 - 0.255, abs=0.01)
    estimators.uplink_acked(b"first", at=0.9)
    assert estimators.rtt_s(3.0) == 0.08  # the promotion is not the path


def test_a_big_send_is_not_overdue_while_its_bytes_are_in_transit() -> None:
    uplink = UplinkEstimator(bps_prior=100_000.0, ack_hold_s=0)
    uplink.sent(b"photo", 100_000, at=0.0)  # ≈1 s at 100 kB/s, + 80 ms
    assert uplink.rtt_s(1.0) == pytest.approx(0.08)
    assert uplink.rtt_s(3.0) == pytest.approx(2.0)
    assert uplink.bps(3.0) == pytest.approx(100_000 / (3.0 - 0.08))


def test_uplink_throughput_from_big_sends() -> None:
    uplink = UplinkEstimator()
    for i in range(3):
        _rtt_sample(uplink, i, 0.1, at=float(i))
    for i, at in enumerate((10.0, 20.0, 30.0)):
        uplink.sent(b"big%d" % i, 100_000, at)
        uplink.acked(b"big%d" % i, at + 0.1 + 0.5)  # 200 kB/s after the floor
    assert uplink.bps(40.0) == pytest.approx(200_000)


def test_uplink_throughput_queued_behind_a_send_counts_from_its_ack() -> None:
    uplink = UplinkEstimator()
    uplink.sent(b"meta", 400, 0.0)
    uplink.sent(b"media", 50_000, 0.0)
    uplink.acked(b"meta", 1.0)
    uplink.acked(b"media", 1.25)  # 50 kB in 0.25 s after the previous ack
    assert uplink.bps(2.0) == pytest.approx(200_000)
    assert uplink.rtt_s(2.0) == pytest.approx(1.0)


def test_resent_send_gives_no_sample_and_ack_forgets_older_sends() -> None:
    uplink = UplinkEstimator()
    uplink.sent(b"a", 300, 0.0)
    uplink.sent(b"a", 300, 2.0)  # resent: Karn's rule
    uplink.acked(b"a", 2.1)
    assert uplink.rtt_s(3.0) == 0.08
    uplink.sent(b"lost", 300, 10.0)
    uplink.sent(b"b", 300, 10.5)
    uplink.acked(b"b", 10.6)
    assert uplink.pending == 0  # "lost" is forgotten: the link works
    assert uplink.rtt_s(20.0) == pytest.approx(0.1)
    uplink.acked(b"lost", 21.0)  # unknown by now: ignored
    assert uplink.rtt_s(22.0) == pytest.approx(0.1)


def test_uplink_down_forgets_pending_sends() -> None:
    uplink = UplinkEstimator()
    uplink.sent(b"a", 300, 0.0)
    assert uplink.rtt_s(5.0) > 4.0
    uplink.down(5.0)
    assert uplink.pending == 0
    assert uplink.rtt_s(6.0) == 0.08


def test_a_send_the_gateway_may_still_hold_is_not_overdue() -> None:
    """Acks dated back by their held time give the bare round trip; a send
    is overdue only past it plus the gateway's longest hold (ack_hold_s),
    and the round trip it implies leaves the hold out."""
    uplink = UplinkEstimator(max_age_s=1e9, ack_hold_s=0.25)
    for i in range(3):
        _rtt_sample(uplink, i, 0.02, at=float(i))
    uplink.sent(b"held", 300, at=100.0)
    assert uplink.rtt_s(100.2) == pytest.approx(0.02)  # maybe held: not overdue
    assert uplink.rtt_s(102.0) == pytest.approx(2.0 - 0.25, abs=0.01)
    uplink.acked(b"held", 100.03)  # arrived at 100.28, held 250 ms
    assert uplink.rtt_s(103.0) == pytest.approx(0.02)  # median of 0.02, 0.02, 0.03


def test_uplink_tracks_a_bounded_number_of_sends() -> None:
    uplink = UplinkEstimator(max_pending=2, ack_hold_s=0)
    for i in range(5):
        uplink.sent(b"%d" % i, 100, float(i))
    assert uplink.pending == 2
    assert uplink.rtt_s(10.0) == pytest.approx(10.0, abs=0.01)  # the oldest kept


def test_rtt_samples_only_from_small_sends() -> None:
    uplink = UplinkEstimator(rtt_sample_max_bytes=2048)
    uplink.sent(b"big", 10_000, 0.0)
    uplink.acked(b"big", 1.0)
    assert uplink.rtt_s(2.0) == 0.08
    uplink.sent(b"x", 1_000, 3.0)
    uplink.sent(b"y", 1_500, 3.0)  # with 1,000 B ahead: over 2,048 B
    uplink.acked(b"x", 3.2)
    uplink.acked(b"y", 3.3)
    uplink.sent(b"z", 300, 4.0)
    uplink.acked(b"z", 4.2)
    assert uplink.rtt_s(5.0) == pytest.approx(0.2)  # median of 0.2, 0.2


# Downlink --------------------------------------------------------------------


def test_downlink_prior_survives_paced_answers() -> None:
    downlink = DownlinkEstimator()
    for i in range(50):
        downlink.add(40, i * 0.03)  # tokens every 30 ms
    assert downlink.bps() == 500_000.0


def test_downlink_measures_link_paced_bursts() -> None:
    downlink = DownlinkEstimator(min_burst_bytes=32_768, min_burst_s=0.05)
    t = 0.0
    for _ in range(101):
        downlink.add(1_000, t)
        t += 0.001  # 1 MB/s, back to back
    downlink.add(10, 5.0)  # a new burst closes the first
    assert downlink.bps() == pytest.approx(1_000_000)


# Radio -----------------------------------------------------------------------


def test_radio_cold_after_the_idle_threshold_warm_after_a_prewarm() -> None:
    radio = RadioEstimator()
    assert radio.idle_s(0.0) == math.inf
    assert radio.cold(0.0)
    radio.activity(100.0)
    assert radio.idle_s(105.0) == 5.0
    assert not radio.cold(110.0)
    assert radio.cold(110.01)
    radio.woken(130.0)
    assert radio.last_woken == 130.0
    assert not radio.cold(130.0)
    assert not radio.cold(139.0)
    radio.activity(120.0)  # late report of older traffic: no effect
    assert radio.idle_s(131.0) == 1.0


def test_radio_wakeup_constants() -> None:
    assert RadioEstimator().wakeup_s == 0.8
    assert RadioEstimator(wakeup_s=1.6).wakeup_s == 1.6


# First token -----------------------------------------------------------------


def test_first_token_quantile_per_kind_with_fallback_and_prior() -> None:
    tokens = FirstTokenEstimator(quantile=0.9, window=20, min_samples=5)
    prior = lognormal_quantile(0.8, 2.0, 0.9)
    assert tokens.estimate(RequestKind.VOICE_QUERY) == pytest.approx(prior)
    for i in range(4):
        tokens.add(RequestKind.PHOTO_QUERY, 2.0 + i)
    assert tokens.estimate(RequestKind.PHOTO_QUERY) == pytest.approx(prior)
    tokens.add(RequestKind.VOICE_QUERY, 0.5)
    # five samples across kinds: 0.5, 2, 3, 4, 5; no kind has five yet
    assert tokens.estimate(RequestKind.VOICE_QUERY) == pytest.approx(4.6)
    for _ in range(5):
        tokens.add(RequestKind.VOICE_QUERY, 0.5)
    assert tokens.estimate(RequestKind.VOICE_QUERY) == pytest.approx(0.5)
    assert tokens.estimate(RequestKind.TEXT_QUERY) == pytest.approx(
        quantile([2, 3, 4, 5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 0.9)
    )
    tokens.add(RequestKind.VOICE_QUERY, math.nan)  # ignored


def test_first_token_is_a_quantile_not_a_mean() -> None:
    tokens = FirstTokenEstimator(quantile=0.9, window=10, min_samples=5)
    for seconds in (0.5,) * 8 + (3.0, 3.0):
        tokens.add(RequestKind.TEXT_QUERY, seconds)
    assert tokens.estimate(RequestKind.TEXT_QUERY) == pytest.approx(3.0)


# Validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BleEstimator(prior_bps=0), "ble prior_bps must be > 0"),
        (lambda: BleEstimator(recent=0), "ble recent must be >= 1"),
        (lambda: UplinkEstimator(rtt_prior_s=math.nan), "uplink rtt_prior_s"),
        (lambda: UplinkEstimator(max_pending=0), "uplink max_pending"),
        (lambda: DownlinkEstimator(burst_gap_s=-1), "downlink burst_gap_s"),
        (lambda: RadioEstimator(idle_threshold_s=0), "radio idle_threshold_s"),
        (lambda: RadioEstimator(wakeup_s=-0.1), "radio wakeup_s"),
        (lambda: FirstTokenEstimator(quantile=1.0), "first-token quantile"),
        (lambda: FirstTokenEstimator(min_samples=30), "first-token min_samples"),
        (lambda: FirstTokenEstimator(prior_p95_s=0.5), "first-token prior_p95_s"),
    ],
)
def test_bad_parameters_raise_config_error(
    make: Callable[[], object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


# Snapshot --------------------------------------------------------------------


def test_snapshot_carries_the_estimates() -> None:
    estimators = Estimators()
    estimators.ble_bytes(80_000, 0.0, 1.0)
    for i in range(3):
        estimators.uplink_sent(b"%d" % i, 300, at=1.0 + i)
        estimators.uplink_acked(b"%d" % i, at=1.1 + i)
    for _ in range(5):
        estimators.first_token(RequestKind.VOICE_QUERY, 1.2)
    snapshot = estimators.snapshot(
        5.0,
        kind=RequestKind.VOICE_QUERY,
        uplink_configured=True,
        uplink_connected=False,
        local=EITHER,
        capture_end_s=6.0,
        media_bytes_remaining=1_000,
        request_bytes=16_000,
        outbox_bytes_ahead=500,
        battery_pct=50,
        requests_seen=7,
        hedges_used=1,
    )
    assert snapshot.ble_goodput_bps == pytest.approx(80_000)
    assert snapshot.rtt_s == pytest.approx(0.1)
    assert snapshot.uplink_bps == 250_000.0
    assert snapshot.downlink_bps == 500_000.0
    assert snapshot.first_token_s == pytest.approx(1.2)
    assert not snapshot.radio_cold  # the acks were radio traffic
    assert snapshot.wakeup_s == 0.8
    assert (snapshot.now_s, snapshot.capture_end_s) == (5.0, 6.0)
    assert (snapshot.uplink_configured, snapshot.uplink_connected) == (True, False)
    assert (snapshot.local, snapshot.battery_pct) == (EITHER, 50)
    assert (snapshot.requests_seen, snapshot.hedges_used) == (7, 1)
    assert estimators.radio_idle_s(5.0) == pytest.approx(1.9)
    assert estimators.rtt_s(5.0) == pytest.approx(0.1)
    assert estimators.uplink_bps(5.0) == 250_000.0
    cold = estimators.snapshot(
        20.0,
        kind=RequestKind.TEXT_QUERY,
        uplink_configured=True,
        uplink_connected=True,
    )
    assert cold.radio_cold
    assert cold.capture_end_s == 20.0
    estimators.radio_woken(20.0)
    estimators.downlink_bytes(10, 20.5)
    estimators.radio_activity(21.0)
    estimators.uplink_down(21.0)
    assert not estimators.snapshot(
        22.0, kind=RequestKind.TEXT_QUERY, uplink_configured=True, uplink_connected=True
    ).radio_cold


# The router learns a link change ----------------------------------------------


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)


@dataclass
class _Link:
    """A simple uplink: FIFO at ``bps``, acks one ``rtt`` later, or never."""

    estimators: Estimators
    rtt: float = 0.08
    bps: float = 1_000_000.0
    dead: bool = False
    free_at: float = 0.0
    events: list[_Event] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, key: bytes, nbytes: int, at: float) -> None:
        self.estimators.uplink_sent(key, nbytes, at)
        self.free_at = max(self.free_at, at) + nbytes / self.bps
        if not self.dead:
            ack_at = self.free_at + self.rtt
            heapq.heappush(
                self.events,
                _Event(
                    ack_at,
                    next(self.seq),
                    lambda: self.estimators.uplink_acked(key, ack_at),
                ),
            )

    def run_until(self, now: float) -> None:
        while self.events and self.events[0].at <= now:
            heapq.heappop(self.events).action()


def _routes_across_a_link_change(change: Callable[[_Link], None]) -> list[Route]:
    """Voice requests every 4 s; the link changes after the fifth."""
    estimators = Estimators()
    link = _Link(estimators)
    request = Request(RequestKind.VOICE_QUERY, 3000, 0, 16_000)
    routes = []
    for i in range(10):
        now = 4.0 * i
        if i == 5:
            change(link)
        link.run_until(now)
        snapshot = estimators.snapshot(
            now,
            kind=request.kind,
            uplink_configured=True,
            uplink_connected=True,
            local=EITHER,
            request_bytes=16_400,
            requests_seen=i + 1,
        )
        decision = decide(request, snapshot, Policy())
        routes.append(decision.route)
        link.send(b"telemetry%d" % i, 200, now)  # every request's telemetry
        if decision.route is not Route.LOCAL:
            link.send(b"request%d" % i, 400, now)
            link.send(b"media%d" % i, 16_000, now)
    return routes


def _dead(link: _Link) -> None:
    link.dead = True


def _slow(link: _Link) -> None:
    link.rtt = 3.0


@pytest.mark.parametrize("change", [_slow, _dead], ids=["rtt-3s", "acks-stop"])
def test_decide_flips_to_local_within_three_requests(
    change: Callable[[_Link], None],
) -> None:
    routes = _routes_across_a_link_change(change)
    assert all(route in (Route.CLOUD, Route.HEDGED) for route in routes[:5])
    flipped = routes.index(Route.LOCAL, 5)
    assert flipped - 5 < 3, routes
    assert all(route is Route.LOCAL for route in routes[flipped:]), routes


def test_decide_returns_to_the_cloud_when_the_link_recovers() -> None:
    estimators = Estimators()
    link = _Link(estimators, rtt=3.0)
    request = Request(RequestKind.VOICE_QUERY, 3000, 0, 16_000)
    routes = []
    for i in range(10):
        now = 4.0 * i
        if i == 5:
            link.rtt = 0.08
        link.run_until(now)
        snapshot = estimators.snapshot(
            now,
            kind=request.kind,
            uplink_configured=True,
            uplink_connected=True,
            local=EITHER,
            request_bytes=16_400,
            requests_seen=i + 1,
        )
        routes.append(decide(request, snapshot, Policy()).route)
        link.send(b"telemetry%d" % i, 200, now)  # keeps measuring the link
    # The first send woke the radio (no sample); the second measured 3 s.
    assert routes[2:5] == [Route.LOCAL] * 3
    assert routes[-1] in (Route.CLOUD, Route.HEDGED)


def test_old_samples_are_forgotten_so_a_recovered_link_gets_its_chance() -> None:
    """The router routes away from a bad link and stops learning about it: a
    bad estimate must not outlive ``max_age_s``, nor skipped idle time."""
    uplink = UplinkEstimator(max_age_s=20.0)
    for i in range(3):
        _rtt_sample(uplink, i, 3.0, at=float(i))
    assert uplink.rtt_s(10.0) == pytest.approx(3.0)
    assert uplink.rtt_s(30.0) == pytest.approx(0.08)  # back to the prior
    for i in range(3, 6):
        _rtt_sample(uplink, i, 3.0, at=100.0 + i)
    uplink.shift(25.0)  # idle time skipped by a time-compressed benchmark
    assert uplink.rtt_s(106.0) == pytest.approx(0.08)
