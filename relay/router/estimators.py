"""What the router needs to know, learnt from what the daemon observes; pure.

The daemon reports observations as they happen, with the monotonic time it read
(this module never reads a clock, does no I/O and no asyncio), and asks for a
:class:`~relay.router.decide.Snapshot` when a request is routed::

    estimators = Estimators()
    estimators.uplink_sent(key, len(payload), at=loop.time())   # a batch leaves
    estimators.uplink_acked(key, at=loop.time() - held)         # its signed ack
    estimators.ble_bytes(len(photo), t0, t1)                    # a media transfer
    ...
    snapshot = estimators.snapshot(loop.time(), kind=request.kind, ...)
    decision = decide(request, snapshot, policy)

Every window, quantile and prior is a named constructor parameter of one of
the small estimators below, which :class:`Estimators` composes:

- :class:`BleEstimator`: BLE goodput from media transfers;
- :class:`UplinkEstimator`: round trip and throughput from sends and acks, and
  a link that just went dead (a send unacknowledged for too long);
- :class:`DownlinkEstimator`: downlink throughput (coarse, with a prior);
- :class:`RadioEstimator`: cellular radio idle time and wake-up delay;
- :class:`FirstTokenEstimator`: the cloud's first-token time per request kind.

Recent values are the median of the last few samples (three by default): one
outlier among three never moves it, and a real change shows after two samples.

Sources of the constants (../shared/design/PERFORMANCE.md):

- radio wake-up (RRC promotion): RTT of one probe after an idle period, from
  the RRC-Probe data of Narayanan et al., "A Variegated Look at 5G in the
  Wild", SIGCOMM 2021 (SIGCOMM21-5G/artifact @ 35aaf285, PERFORMANCE.md §4.2):
  median ≈0.8 s (791 to 811 ms on four of six phone/carrier files at 10 to
  15 s idle), tail ≈1.6 s (1,545 to 1,645 ms on the other two); the step
  appears at ≈12 s idle, so 10 s is a conservative idle threshold;
- round trip prior 80 ms: Ookla Speedtest 4G-LTE latency p50 74 ms (same
  artifact, §4.2);
- uplink prior 250 kB/s (2 Mbit/s): about the mean of the ATT-LTE driving
  uplink trace (1.91 Mbit/s, §4.1), the slower end of the recorded traces;
- downlink prior 500 kB/s (4 Mbit/s): about the median 1-s throughput of the
  LTE downlink traces (§4.1);
- BLE prior 50 kB/s: the iOS-like profile (≈44 kB/s, §2.2), rounded: until a
  transfer is measured, the slower phones are assumed;
- first-token prior: lognormal, median 0.8 s, p95 2.0 s (the benchmark's
  reference model, PERFORMANCE.md §6, from the §5 anchors); the estimate is
  its p75 by default, 1.16 s (its p90 is 1.63 s).
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocol.bodies import RequestKind
from protocol.cloud import ACK_DELAY_S, ACK_INTERVAL_S
from relay.errors import ConfigError
from relay.router.decide import LocalOption, Snapshot

__all__ = [
    "FIRST_TOKEN_PRIOR_MEDIAN_S",
    "FIRST_TOKEN_PRIOR_P95_S",
    "RADIO_IDLE_THRESHOLD_S",
    "RRC_PROMOTION_MEDIAN_S",
    "RRC_PROMOTION_TAIL_S",
    "BleEstimator",
    "DownlinkEstimator",
    "Estimators",
    "FirstTokenEstimator",
    "RadioEstimator",
    "UplinkEstimator",
    "lognormal_quantile",
    "quantile",
]

RRC_PROMOTION_MEDIAN_S: Final = 0.8
"""Median radio wake-up delay after idle (RRC-Probe, PERFORMANCE.md §4.2)."""
RRC_PROMOTION_TAIL_S: Final = 1.6
"""Tail radio wake-up delay after idle (RRC-Probe, PERFORMANCE.md §4.2)."""
RADIO_IDLE_THRESHOLD_S: Final = 10.0
"""Idle time after which the radio is assumed cold (the step is at ≈12 s)."""
FIRST_TOKEN_PRIOR_MEDIAN_S: Final = 0.8
"""Median of the first-token prior (PERFORMANCE.md §6 reference model)."""
FIRST_TOKEN_PRIOR_P95_S: Final = 2.0
"""p95 of the first-token prior (PERFORMANCE.md §6 reference model)."""

_MIN_BPS: Final = 1.0
"""Floor of every throughput estimate, bytes/s (keeps divisions finite)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: float) -> None:
    _require(math.isfinite(value) and value > 0, f"{name} must be > 0, got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    _require(
        math.isfinite(value) and value >= low, f"{name} must be >= {low}, got {value!r}"
    )


def quantile(samples: Iterable[float], q: float) -> float:
    """The ``q`` quantile of ``samples``, linear between closest ranks.

    Args:
        samples: At least one value.
        q: From 0 (the minimum) to 1 (the maximum).

    Raises:
        ValueError: No samples, or ``q`` outside [0, 1].
    """
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be from 0 to 1, got {q!r}")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def lognormal_quantile(median: float, p95: float, q: float) -> float:
    """The ``q`` quantile of the lognormal with this median and p95.

    Raises:
        ValueError: ``median`` or ``p95`` not > 0, ``p95 < median``, or ``q``
            not strictly between 0 and 1.
    """
    if not (median > 0 and p95 >= median):
        raise ValueError(f"need 0 < median <= p95, got {median!r}, {p95!r}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be strictly between 0 and 1, got {q!r}")
    normal = statistics.NormalDist()
    sigma = math.log(p95 / median) / normal.inv_cdf(0.95)
    return median * math.exp(normal.inv_cdf(q) * sigma)


class _Recent:
    """The median of the last ``size`` samples."""

    __slots__ = ("_max_age_s", "_samples")

    def __init__(self, size: int, max_age_s: float = math.inf) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=size
        )
        self._max_age_s = max_age_s

    def add(self, value: float, at: float = 0.0) -> None:
        self._samples.append((at, value))

    def shift(self, seconds: float) -> None:
        """``seconds`` passed unseen by the clock: every sample is that much older."""
        self._samples = collections.deque(
            ((at - seconds, v) for at, v in self._samples), maxlen=self._samples.maxlen
        )

    def _fresh(self, now: float | None) -> list[float]:
        if now is None or self._max_age_s == math.inf:
            return [v for _, v in self._samples]
        return [v for at, v in self._samples if now - at <= self._max_age_s]

    def median(self, now: float | None = None) -> float | None:
        fresh = self._fresh(now)
        return statistics.median(fresh) if fresh else None

    def minimum(self, now: float | None = None) -> float | None:
        fresh = self._fresh(now)
        return min(fresh) if fresh else None


class BleEstimator:
    """BLE goodput, bytes/s, from media transfers.

    Args:
        prior_bps: Estimate before any transfer is measured (50 kB/s, the
            iOS-like profile).
        recent: The estimate is the median of this many last samples (3: one
            outlier never dominates, a change shows after 2 samples).
        min_bytes: Smaller transfers are not measured (their time is mostly
            connection-event latency, not goodput).
        min_duration_s: Transfers shorter than this are not measured.

    Raises:
        ConfigError: A parameter is out of range.
    """

    __slots__ = ("_min_bytes", "_min_duration_s", "_prior_bps", "_recent")

    def __init__(
        self,
        *,
        prior_bps: float = 50_000.0,
        recent: int = 3,
        min_bytes: int = 1024,
        min_duration_s: float = 0.005,
    ) -> None:
        _positive("ble prior_bps", prior_bps)
        _at_least("ble recent", recent, 1)
        _at_least("ble min_bytes", min_bytes, 1)
        _positive("ble min_duration_s", min_duration_s)
        self._prior_bps = prior_bps
        self._recent = _Recent(recent)
        self._min_bytes = min_bytes
        self._min_duration_s = min_duration_s

    def add(self, nbytes: int, t0: float, t1: float) -> None:
        """Record ``nbytes`` of media received from the glasses between t0 and t1.

        Report only transfers the link paced (a photo, a voice backlog), not
        live audio, which arrives at the codec's bit rate.
        """
        if nbytes >= self._min_bytes and t1 - t0 >= self._min_duration_s:
            self._recent.add(nbytes / (t1 - t0))

    def bps(self) -> float:
        """The goodput estimate, bytes/s."""
        value = self._recent.median()
        return self._prior_bps if value is None else max(value, _MIN_BPS)


@dataclass(slots=True)
class _Send:
    seq: int  # order of sending
    at: float
    nbytes: int
    ahead: int  # bytes of older sends still unacknowledged when this one left
    resent: bool = False
    waking: float = 0.0  # wake-up allowance: it left while the radio woke


class UplinkEstimator:
    """Round trip and throughput of the uplink, from sends and their acks.

    A send is one envelope batch, identified by a key the daemon chooses; its
    ack is the gateway's signed acknowledgement. A send whose bytes, with those
    of older sends still unacknowledged, fit in ``rtt_sample_max_bytes`` gives
    a round-trip sample (ack - sent). A send of ``throughput_sample_min_bytes``
    or more gives a throughput sample: bytes / transfer time, the transfer
    starting at ``sent + rtt floor`` (the floor is the least recent round
    trip), or at the previous ack if that came later (it was queued behind
    it), and lasting at least ``min_transfer_s``. An ack of a send that was
    sent again (same key) gives no sample (Karn's rule).

    ``at`` of an ack is its arrival less the time the gateway says it held it
    (docs/envelope.md §6), so samples taken while the phone streams leave out
    the gateway's ack pacing.

    A link that just went dead shows before any ack returns: a send still
    unacknowledged past its expected ack (sent + round trip + its bytes and
    those queued before it at the estimated throughput + ``ack_hold_s``, the
    longest the gateway may hold an ack) raises the round-trip
    estimate to that age (less the transfer time) and, when the overdue
    backlog is at least ``throughput_sample_min_bytes``, caps the throughput at
    what the age implies (bytes / (age - round trip)); a small late send says
    the path is slow, which the round trip already carries. A send made while
    the radio wakes up (``waking``) gives no round-trip sample and is overdue
    only past its wake-up allowance. An ack forgets older sends still
    unacknowledged (the link works; they were lost or reordered).

    Args:
        rtt_prior_s: Round trip before any sample (80 ms, Speedtest 4G p50).
        bps_prior: Throughput before any sample (250 kB/s).
        recent: Estimates are the median of this many last samples.
        floor_window: The round-trip floor is the least of this many last
            round-trip samples.
        rtt_sample_max_bytes: Largest send, with the unacknowledged bytes ahead
            of it, that gives a round-trip sample (2 KiB: ≤ 16 ms at 1 Mbit/s,
            small beside cellular round trips).
        throughput_sample_min_bytes: Smallest send giving a throughput sample.
        min_transfer_s: Least transfer time of a throughput sample (an ack
            within the round-trip floor still gives a bounded sample).
        max_pending: Most sends tracked; when full, newer sends are not
            tracked (the oldest carry the dead-link signal).
        max_age_s: Samples older than this are forgotten (20 s): a link that
            was bad a while ago is not assumed bad now, since the router
            routes away from a bad link and so stops learning about it;
            back to the prior until new samples come.
        ack_hold_s: How long the gateway may hold an ack while the phone
            streams (its ``ack_interval_s`` plus ``ack_delay_s``: 255 ms by
            default, docs/cloud.md). Samples leave the hold out (each ack
            says how long it held each id), so a send is overdue only past
            its expected ack plus this allowance, and the round trip an
            overdue send implies leaves it out too.

    Raises:
        ConfigError: A parameter is out of range.
    """

    __slots__ = (
        "_ack_hold_s",
        "_bps",
        "_bps_prior",
        "_floor",
        "_last_ack_at",
        "_max_pending",
        "_min_transfer_s",
        "_pending",
        "_rtt",
        "_rtt_max_bytes",
        "_rtt_prior_s",
        "_seq",
        "_throughput_min_bytes",
    )

    def __init__(
        self,
        *,
        rtt_prior_s: float = 0.08,
        bps_prior: float = 250_000.0,
        recent: int = 3,
        floor_window: int = 16,
        rtt_sample_max_bytes: int = 2048,
        throughput_sample_min_bytes: int = 16_384,
        min_transfer_s: float = 0.02,
        max_pending: int = 256,
        max_age_s: float = 20.0,
        ack_hold_s: float = ACK_INTERVAL_S + ACK_DELAY_S,
    ) -> None:
        _positive("uplink rtt_prior_s", rtt_prior_s)
        _at_least("uplink ack_hold_s", ack_hold_s, 0)
        _positive("uplink bps_prior", bps_prior)
        _at_least("uplink recent", recent, 1)
        _at_least("uplink floor_window", floor_window, 1)
        _at_least("uplink rtt_sample_max_bytes", rtt_sample_max_bytes, 0)
        _at_least("uplink throughput_sample_min_bytes", throughput_sample_min_bytes, 1)
        _positive("uplink min_transfer_s", min_transfer_s)
        _at_least("uplink max_pending", max_pending, 1)
        _positive("uplink max_age_s", max_age_s)
        self._rtt_prior_s = rtt_prior_s
        self._bps_prior = bps_prior
        self._rtt = _Recent(recent, max_age_s)
        self._floor = _Recent(floor_window)
        self._bps = _Recent(recent, max_age_s)
        self._rtt_max_bytes = rtt_sample_max_bytes
        self._throughput_min_bytes = throughput_sample_min_bytes
        self._min_transfer_s = min_transfer_s
        self._max_pending = max_pending
        self._ack_hold_s = ack_hold_s
        self._pending: dict[bytes, _Send] = {}
        self._last_ack_at: float | None = None
        self._seq = 0

    @property
    def pending(self) -> int:
        """Sends tracked and not yet acknowledged."""
        return len(self._pending)

    def sent(self, key: bytes, nbytes: int, at: float, *, waking: float = 0.0) -> None:
        """Record that a batch of ``nbytes`` identified by ``key`` left at ``at``.

        Sending the same key again (a resend) keeps the first time. ``waking``
        is the wake-up allowance of a send made while the radio was waking up:
        it gives no round-trip sample (it measures the promotion, not the
        path) and is overdue only past that allowance.
        """
        nbytes = max(nbytes, 0)
        known = self._pending.get(key)
        if known is not None:
            known.resent = True
            known.nbytes = max(known.nbytes, nbytes)
            return
        if len(self._pending) >= self._max_pending:
            return
        ahead = sum(send.nbytes for send in self._pending.values())
        self._seq += 1
        self._pending[key] = _Send(self._seq, at, nbytes, ahead, waking=waking)

    def acked(self, key: bytes, at: float) -> None:
        """Record the gateway's ack of ``key`` at ``at``; unknown keys are ignored."""
        send = self._pending.pop(key, None)
        if send is None:
            return
        for older in [k for k, s in self._pending.items() if s.seq < send.seq]:
            del self._pending[older]
        previous_ack = self._last_ack_at
        # Acks are dated back by their held time, so a later one may be earlier.
        self._last_ack_at = at if previous_ack is None else max(previous_ack, at)
        elapsed = at - send.at
        if send.resent or elapsed < 0 or send.waking:
            return
        if send.nbytes + send.ahead <= self._rtt_max_bytes:
            self._rtt.add(elapsed, at)
            self._floor.add(elapsed, at)
        if send.nbytes >= self._throughput_min_bytes:
            if previous_ack is not None and previous_ack > send.at:
                start = previous_ack
            else:
                start = send.at + self._rtt_floor()
            transfer = max(at - start, self._min_transfer_s)
            self._bps.add(send.nbytes / transfer, at)

    def shift(self, seconds: float) -> None:
        """``seconds`` of idle time passed unseen (benchmarks skip idle gaps)."""
        self._rtt.shift(seconds)
        self._bps.shift(seconds)

    def down(self, at: float) -> None:
        """Record that the uplink connection dropped: pending sends are forgotten.

        Their acks, if any, will not come on this connection; the outbox sends
        them again after the reconnect (as new sends).
        """
        del at
        self._pending.clear()
        self._last_ack_at = None

    def _rtt_floor(self) -> float:
        value = self._floor.minimum()
        return self._rtt_prior_s if value is None else value

    def _base_rtt(self, now: float | None = None) -> float:
        value = self._rtt.median(now)
        return self._rtt_prior_s if value is None else value

    def _base_bps(self, now: float | None = None) -> float:
        value = self._bps.median(now)
        return self._bps_prior if value is None else max(value, _MIN_BPS)

    def _overdue(self, now: float) -> tuple[float, float]:
        """The round trip and the throughput cap implied by overdue sends."""
        rtt = self._base_rtt(now)
        bps = self._base_bps(now)
        worst_rtt = rtt
        cap = math.inf
        queued = 0
        hold = self._ack_hold_s
        for send in self._pending.values():
            queued += max(send.nbytes, 1)
            age = now - send.at
            transfer = queued / bps
            if age > rtt + transfer + send.waking + hold:
                worst_rtt = max(worst_rtt, age - transfer - hold)
                if queued >= self._throughput_min_bytes:
                    # Only a large backlog says anything about throughput; a
                    # small late send says the path is slow (round trip).
                    cap = min(cap, queued / (age - rtt - hold))
        return worst_rtt, cap

    def rtt_s(self, now: float) -> float:
        """The round-trip estimate at ``now``, at least the age of an overdue send."""
        return self._overdue(now)[0]

    def bps(self, now: float) -> float:
        """The throughput estimate at ``now``, capped by overdue sends."""
        return max(min(self._base_bps(now), self._overdue(now)[1]), _MIN_BPS)


class DownlinkEstimator:
    """Downlink throughput, bytes/s: coarse, with a prior.

    Answers are small and paced by the model's token rate, so only bursts the
    link paced are measured: arrivals no more than ``burst_gap_s`` apart, at
    least ``min_burst_bytes`` and ``min_burst_s`` long; a burst counts once
    the next arrival starts a new one. Until then (usually:
    first answer pieces are ≈2 KB, so the downlink rarely matters), the prior
    stands.

    Args:
        prior_bps: Estimate before any burst is measured (500 kB/s).
        recent: The estimate is the median of this many last bursts.
        burst_gap_s: Largest gap between arrivals of one burst.
        min_burst_bytes: Smallest burst measured.
        min_burst_s: Shortest burst measured.

    Raises:
        ConfigError: A parameter is out of range.
    """

    __slots__ = (
        "_burst_bytes",
        "_burst_gap_s",
        "_burst_last",
        "_burst_start",
        "_min_burst_bytes",
        "_min_burst_s",
        "_prior_bps",
        "_recent",
    )

    def __init__(
        self,
        *,
        prior_bps: float = 500_000.0,
        recent: int = 3,
        burst_gap_s: float = 0.01,
        min_burst_bytes: int = 32_768,
        min_burst_s: float = 0.05,
    ) -> None:
        _positive("downlink prior_bps", prior_bps)
        _at_least("downlink recent", recent, 1)
        _positive("downlink burst_gap_s", burst_gap_s)
        _at_least("downlink min_burst_bytes", min_burst_bytes, 1)
        _positive("downlink min_burst_s", min_burst_s)
        self._prior_bps = prior_bps
        self._recent = _Recent(recent)
        self._burst_gap_s = burst_gap_s
        self._min_burst_bytes = min_burst_bytes
        self._min_burst_s = min_burst_s
        self._burst_start: float | None = None
        self._burst_last = 0.0
        self._burst_bytes = 0  # after the first arrival of the burst

    def add(self, nbytes: int, at: float) -> None:
        """Record ``nbytes`` received from the cloud at ``at``."""
        gap = at - self._burst_last
        if self._burst_start is not None and 0 <= gap <= self._burst_gap_s:
            self._burst_bytes += max(nbytes, 0)
            self._burst_last = at
            return
        self._close()
        self._burst_start = self._burst_last = at
        self._burst_bytes = 0

    def _close(self) -> None:
        if self._burst_start is None:
            return
        duration = self._burst_last - self._burst_start
        if self._burst_bytes >= self._min_burst_bytes and (
            duration >= self._min_burst_s
        ):
            self._recent.add(self._burst_bytes / duration)
        self._burst_start = None

    def bps(self) -> float:
        """The throughput estimate, bytes/s."""
        value = self._recent.median()
        return self._prior_bps if value is None else max(value, _MIN_BPS)


class RadioEstimator:
    """Time since the cellular radio last carried traffic, and its wake-up.

    Args:
        idle_threshold_s: Idle time after which the radio is cold (10 s; the
            RRC-Probe step is at ≈12 s idle).
        wakeup_s: Wake-up (RRC promotion) delay of a cold radio: the median,
            0.8 s (:data:`RRC_PROMOTION_MEDIAN_S`); pass
            :data:`RRC_PROMOTION_TAIL_S` (1.6 s) to plan for the tail.

    Raises:
        ConfigError: A parameter is out of range.
    """

    __slots__ = ("_idle_threshold_s", "_last", "_woken", "wakeup_s")

    def __init__(
        self,
        *,
        idle_threshold_s: float = RADIO_IDLE_THRESHOLD_S,
        wakeup_s: float = RRC_PROMOTION_MEDIAN_S,
    ) -> None:
        _positive("radio idle_threshold_s", idle_threshold_s)
        _at_least("radio wakeup_s", wakeup_s, 0)
        self._idle_threshold_s = idle_threshold_s
        self.wakeup_s: Final = wakeup_s
        self._last: float | None = None
        self._woken: float | None = None

    @property
    def last_woken(self) -> float | None:
        """When the radio was last pre-warmed, if ever."""
        return self._woken

    def activity(self, at: float) -> None:
        """Record that the radio carried traffic (any send or receive) at ``at``."""
        if self._last is None or at > self._last:
            self._last = at

    def woken(self, at: float) -> None:
        """Record a pre-warm at ``at`` (a tiny packet sent at the wake word).

        The wake-up is paid by it: the utterance that follows lasts longer than
        the promotion.
        """
        self._woken = at
        self.activity(at)

    def skip(self, seconds: float) -> None:
        """``seconds`` of idle time passed that the clock did not see (benchmarks)."""
        if self._last is not None:
            self._last -= seconds
        if self._woken is not None:
            self._woken -= seconds

    def idle_s(self, now: float) -> float:
        """Seconds since the radio last carried traffic (infinite: never)."""
        return math.inf if self._last is None else max(now - self._last, 0.0)

    def cold(self, now: float) -> bool:
        """The radio is idle past the threshold: a send waits ``wakeup_s``."""
        return self.idle_s(now) > self._idle_threshold_s


class FirstTokenEstimator:
    """The cloud's first-token time per request kind, seconds: a high quantile.

    A sample is the time from the gateway having the whole request to its first
    answer byte, e.g. the first answer's arrival minus the arrival of the ack
    of the request's last envelope (both cross the same path back).

    The estimate for a kind is the ``quantile`` of its last ``window`` samples
    if there are ``min_samples``, else of the last ``window`` samples of any
    kind if there are ``min_samples``, else the prior's ``quantile``: a
    lognormal with the given median and p95.

    Args:
        quantile: Which quantile (0.75, not a mean: a mean hides the tail;
            not higher, because the rest of the tail is what the local hedge
            is for: routing on p90 sent to the phone requests the cloud would
            have answered in time, at a lower quality).
        window: Samples kept per kind, and across kinds.
        min_samples: Fewest samples to trust over the fallback.
        prior_median_s: Median of the prior (0.8 s).
        prior_p95_s: p95 of the prior (2.0 s).

    Raises:
        ConfigError: A parameter is out of range.
    """

    __slots__ = ("_all", "_by_kind", "_min_samples", "_prior", "_quantile", "_window")

    def __init__(
        self,
        *,
        quantile: float = 0.75,
        window: int = 20,
        min_samples: int = 5,
        prior_median_s: float = FIRST_TOKEN_PRIOR_MEDIAN_S,
        prior_p95_s: float = FIRST_TOKEN_PRIOR_P95_S,
    ) -> None:
        _require(
            0.0 < quantile < 1.0,
            f"first-token quantile must be between 0 and 1, got {quantile!r}",
        )
        _at_least("first-token window", window, 1)
        _require(
            1 <= min_samples <= window,
            f"first-token min_samples must be from 1 to window ({window}), "
            f"got {min_samples!r}",
        )
        _positive("first-token prior_median_s", prior_median_s)
        _require(
            math.isfinite(prior_p95_s) and prior_p95_s >= prior_median_s,
            f"first-token prior_p95_s must be >= prior_median_s, got {prior_p95_s!r}",
        )
        self._quantile = quantile
        self._window = window
        self._min_samples = min_samples
        self._prior = lognormal_quantile(prior_median_s, prior_p95_s, quantile)
        self._by_kind: dict[RequestKind, collections.deque[float]] = {}
        self._all: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, kind: RequestKind, seconds: float) -> None:
        """Record a first-token time of a request of ``kind``."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        samples = self._by_kind.get(kind)
        if samples is None:
            samples = self._by_kind[kind] = collections.deque(maxlen=self._window)
        samples.append(seconds)
        self._all.append(seconds)

    def samples(self, kind: RequestKind) -> tuple[float, ...]:
        """The first-token times kept for ``kind``, oldest first, seconds."""
        return tuple(self._by_kind.get(kind, ()))

    def estimate(self, kind: RequestKind) -> float:
        """The first-token quantile for ``kind``, seconds."""
        for samples in (self._by_kind.get(kind, ()), self._all):
            if len(samples) >= self._min_samples:
                return quantile(samples, self._quantile)
        return self._prior


class Estimators:
    """All the router's estimates, fed by the daemon; builds snapshots.

    Uplink sends and acks and downlink arrivals also count as radio activity.
    The sub-estimators are public attributes, for tuning and for traces.

    Args:
        ble: BLE goodput (default parameters if None).
        uplink: Uplink round trip and throughput.
        downlink: Downlink throughput.
        radio: Radio idle time and wake-up.
        first_token: Cloud first-token time per kind.
    """

    __slots__ = (
        "_waking_until",
        "ble",
        "downlink",
        "first_token_times",
        "radio",
        "uplink",
    )

    def __init__(
        self,
        *,
        ble: BleEstimator | None = None,
        uplink: UplinkEstimator | None = None,
        downlink: DownlinkEstimator | None = None,
        radio: RadioEstimator | None = None,
        first_token: FirstTokenEstimator | None = None,
    ) -> None:
        self.ble: Final = BleEstimator() if ble is None else ble
        self.uplink: Final = UplinkEstimator() if uplink is None else uplink
        self.downlink: Final = DownlinkEstimator() if downlink is None else downlink
        self.radio: Final = RadioEstimator() if radio is None else radio
        self.first_token_times: Final = (
            FirstTokenEstimator() if first_token is None else first_token
        )
        self._waking_until = -math.inf

    def ble_bytes(self, n: int, t0: float, t1: float) -> None:
        """A media transfer of ``n`` bytes from the glasses took t0 to t1."""
        self.ble.add(n, t0, t1)

    def uplink_sent(self, key: bytes, nbytes: int, at: float) -> None:
        """An envelope batch ``key`` of ``nbytes`` left for the gateway at ``at``.

        A send on a cold radio, or while a pre-warm is still promoting it,
        carries the wake-up (allowance: :data:`RRC_PROMOTION_TAIL_S`).
        """
        cold = self.radio.cold(at) or at < self._waking_until
        if self.radio.cold(at):
            self._waking_until = at + RRC_PROMOTION_TAIL_S
        self.uplink.sent(key, nbytes, at, waking=RRC_PROMOTION_TAIL_S if cold else 0.0)
        self.radio.activity(at)

    def uplink_acked(self, key: bytes, at: float) -> None:
        """The gateway's signed ack of batch ``key``: its arrival less its held time."""
        self.uplink.acked(key, at)
        self.radio.activity(at)

    def uplink_down(self, at: float) -> None:
        """The uplink connection dropped at ``at``."""
        self.uplink.down(at)

    def downlink_bytes(self, n: int, at: float) -> None:
        """``n`` bytes arrived from the cloud at ``at``."""
        self.downlink.add(n, at)
        self.radio.activity(at)

    def radio_activity(self, at: float) -> None:
        """The cellular radio carried other traffic at ``at``."""
        self.radio.activity(at)

    def idle_skipped(self, seconds: float) -> None:
        """Time-compressed benchmarks: ``seconds`` of idle time were skipped.

        The radio's idle time grows by them, as it would have in real time.
        """
        self.radio.skip(seconds)
        self.uplink.shift(seconds)
        self._waking_until -= seconds

    def radio_woken(self, at: float) -> None:
        """The radio was pre-warmed at ``at`` (wake word)."""
        if self.radio.cold(at):
            self._waking_until = at + RRC_PROMOTION_TAIL_S
        self.radio.woken(at)

    def radio_idle_s(self, now: float) -> float:
        """Seconds since the radio last carried traffic (infinite: never)."""
        return self.radio.idle_s(now)

    def first_token(self, kind: RequestKind, seconds: float) -> None:
        """The cloud took ``seconds`` to its first token for a ``kind`` request."""
        self.first_token_times.add(kind, seconds)

    def rtt_s(self, now: float) -> float:
        """The uplink round-trip estimate at ``now``."""
        return self.uplink.rtt_s(now)

    def uplink_bps(self, now: float) -> float:
        """The uplink throughput estimate at ``now``."""
        return self.uplink.bps(now)

    def snapshot(
        self,
        now: float,
        *,
        kind: RequestKind,
        uplink_configured: bool,
        uplink_connected: bool,
        local: LocalOption | None = None,
        capture_end_s: float | None = None,
        media_bytes_remaining: int = 0,
        request_bytes: int = 0,
        outbox_bytes_ahead: int = 0,
        answer_bytes: int = 2048,
        battery_pct: int | None = None,
        requests_seen: int = 0,
        hedges_used: int = 0,
        upload_tail_bytes: int = 4096,
    ) -> Snapshot:
        """The snapshot for routing one request of ``kind`` at ``now``.

        Args:
            now: Monotonic seconds.
            kind: The request's kind (for the first-token estimate).
            uplink_configured: An uplink is configured.
            uplink_connected: The uplink is connected.
            local: What the phone can do for the request, if anything.
            capture_end_s: End of capture on the phone's clock (None: now).
            media_bytes_remaining: Media still to cross BLE.
            request_bytes: Bytes the cloud route uploads in total.
            outbox_bytes_ahead: Outbox bytes queued ahead of this request.
            answer_bytes: Size of the answer's first piece.
            battery_pct: Phone battery, percent, if known.
            requests_seen: Requests routed so far, this one included.
            hedges_used: Hedges started so far.
            upload_tail_bytes: Upload left once the media is on the phone.
        """
        return Snapshot(
            uplink_configured=uplink_configured,
            uplink_connected=uplink_connected,
            local=local,
            now_s=now,
            capture_end_s=now if capture_end_s is None else capture_end_s,
            media_bytes_remaining=media_bytes_remaining,
            request_bytes=request_bytes,
            ble_goodput_bps=self.ble.bps(),
            uplink_bps=self.uplink.bps(now),
            downlink_bps=self.downlink.bps(),
            rtt_s=self.uplink.rtt_s(now),
            radio_cold=self.radio.cold(now),
            wakeup_s=self.radio.wakeup_s,
            first_token_s=self.first_token_times.estimate(kind),
            outbox_bytes_ahead=outbox_bytes_ahead,
            answer_bytes=answer_bytes,
            battery_pct=battery_pct,
            requests_seen=requests_seen,
            hedges_used=hedges_used,
            upload_tail_bytes=upload_tail_bytes,
        )
