"""The link model, without I/O: a trace-driven bottleneck, a base delay, a radio.

One :class:`Shaper` is one direction of an emulated cellular link, with
``mm-link`` + ``mm-delay`` semantics (../shared/design/PERFORMANCE.md §4):

1. Bytes offered at time ``now`` join a FIFO bottleneck queue bounded by
   ``queue_limit_bytes``; an offer that does not fit is dropped whole (drop-tail)
   and counted.
2. The queue drains only at the trace's delivery opportunities (looped); each
   takes up to 1500 bytes at once. An opportunity finding the queue empty is
   lost, and so is the unused rest of one finding fewer than 1500 bytes: capacity
   never accumulates while idle. An opportunity at time ``t`` serves bytes
   offered at or before ``t`` that are still queued when it is processed (an
   offer at exactly ``t`` after a query at ``t`` waits for the next one).
3. A departed byte reaches the far end ``delay_s`` later (fixed per shaper, so
   order is kept).
4. A :class:`Radio`, shared by both directions, models RRC promotion: when bytes
   are offered after ``idle_s`` without traffic (no offer and no departure in
   either direction, both queues empty), the radio needs a wake-up delay drawn
   from its model; opportunities before it is ready are lost.

Time is passed in (``now``, seconds of trace time, never decreasing); nothing
here reads a clock, sleeps or imports asyncio. State advances lazily on each
call, so a caller asks :meth:`Shaper.next_event_time` when to call again.
"""

from __future__ import annotations

import collections
import enum
import math
import random
from dataclasses import dataclass
from typing import Final

from tools.netem.models import DEFAULT_IDLE_S, Distribution
from tools.netem.trace import MTU_BYTES, Trace

__all__ = [
    "DEFAULT_QUEUE_LIMIT_BYTES",
    "Direction",
    "Radio",
    "RadioCounters",
    "Shaper",
    "ShaperCounters",
]

DEFAULT_QUEUE_LIMIT_BYTES: Final = 64 * 1024
"""Default bottleneck queue limit, policy drop-tail (the proxy applies backpressure
instead of dropping). About one TCP window: a saturating sender sees
``limit / rate`` of queueing delay (0.27 s at ATT-LTE-driving's 1.9 Mbit/s)."""


class Direction(enum.StrEnum):
    """A direction of the emulated link."""

    UPLINK = "uplink"
    """Client (phone) to server (cloud)."""
    DOWNLINK = "downlink"
    """Server to client."""


def _ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded to 1 ns so that ``k / 1000 * 1000 == k``."""
    return round(seconds * 1000.0, 6)


@dataclass(frozen=True, slots=True)
class ShaperCounters:
    """A snapshot of one direction.

    Attributes:
        trace: the current trace's name.
        delay_s: the base one-way delay.
        bytes_offered: bytes accepted into the queue.
        bytes_dropped: bytes of offers dropped by the queue limit.
        drops: offers dropped by the queue limit.
        bytes_departed: bytes that left the queue at an opportunity.
        bytes_delivered: bytes handed out by :meth:`Shaper.pop_delivered`.
        queue_bytes: bytes waiting in the queue.
        in_flight_bytes: bytes departed but not yet handed out.
        opportunities_used: opportunities that carried bytes.
        opportunities_wasted: opportunities lost (queue empty, radio waking).
        trace_switches: calls of :meth:`Shaper.switch_trace`.
    """

    trace: str
    delay_s: float
    bytes_offered: int
    bytes_dropped: int
    drops: int
    bytes_departed: int
    bytes_delivered: int
    queue_bytes: int
    in_flight_bytes: int
    opportunities_used: int
    opportunities_wasted: int
    trace_switches: int


@dataclass(frozen=True, slots=True)
class RadioCounters:
    """A snapshot of the radio model.

    Attributes:
        wakeups: promotions from idle.
        wakeup_s_total: their delays added up.
        last_wakeup_s: the latest delay (0 before the first).
    """

    wakeups: int
    wakeup_s_total: float
    last_wakeup_s: float


class Radio:
    """The cellular radio's RRC state, shared by both directions of a link.

    Create it first and pass it to both :class:`Shaper` objects.
    """

    __slots__ = (
        "_idle_ms",
        "_last_ms",
        "_last_wakeup_s",
        "_ready_ms",
        "_rng",
        "_shapers",
        "_wakeup",
        "_wakeup_s_total",
        "_wakeups",
    )

    def __init__(
        self,
        wakeup: Distribution | None,
        *,
        idle_s: float = DEFAULT_IDLE_S,
        rng: random.Random | None = None,
        now: float = 0.0,
        idle_at_start: bool = False,
    ) -> None:
        """Model a radio that was last active at ``now``.

        Args:
            wakeup: the wake-up delay after ``idle_s`` idle; None never sleeps.
            idle_s: idle time (no offer, no departure) before the radio sleeps;
                a gap of exactly ``idle_s`` counts as idle.
            rng: draws the wake-up delays; ``random.Random(0)`` if None.
            now: trace time of the last activity.
            idle_at_start: the radio is asleep at the start (the first offer pays).

        Raises:
            ValueError: ``idle_s`` is negative.
        """
        if idle_s < 0:
            raise ValueError("idle_s must be >= 0")
        self._wakeup = wakeup
        self._idle_ms = _ms(idle_s)
        self._rng = rng if rng is not None else random.Random(0)
        self._last_ms = -math.inf if idle_at_start else _ms(now)
        self._ready_ms = -math.inf
        self._shapers: list[Shaper] = []
        self._wakeups = 0
        self._wakeup_s_total = 0.0
        self._last_wakeup_s = 0.0

    @property
    def wakeup(self) -> Distribution | None:
        """The wake-up delay model."""
        return self._wakeup

    @property
    def idle_s(self) -> float:
        """Idle time before the radio sleeps."""
        return self._idle_ms / 1000.0

    @property
    def ready_at(self) -> float:
        """Trace time at which the latest wake-up completes (``-inf`` before one)."""
        return self._ready_ms / 1000.0

    @property
    def last_activity(self) -> float:
        """Trace time of the latest offer or departure seen so far."""
        return self._last_ms / 1000.0

    def counters(self) -> RadioCounters:
        """A snapshot of the wake-up counters."""
        return RadioCounters(self._wakeups, self._wakeup_s_total, self._last_wakeup_s)

    def _attach(self, shaper: Shaper) -> None:
        self._shapers.append(shaper)

    def _note_activity(self, t_ms: float) -> None:
        self._last_ms = max(self._last_ms, t_ms)

    def _wake(self, now_ms: float) -> None:
        """Bytes are offered at ``now_ms``: start a wake-up if the radio slept."""
        for shaper in self._shapers:
            shaper._advance(now_ms, inclusive=False)
        if (
            self._wakeup is not None
            and now_ms >= self._ready_ms
            and now_ms - self._last_ms >= self._idle_ms
            and not any(shaper._queue for shaper in self._shapers)
        ):
            delay_s = self._wakeup.sample(self._rng)
            self._ready_ms = now_ms + _ms(delay_s)
            self._wakeups += 1
            self._wakeup_s_total += delay_s
            self._last_wakeup_s = delay_s
        self._last_ms = max(self._last_ms, now_ms)


class Shaper:
    """One direction of the emulated link (see the module docstring).

    Call :meth:`offer` when bytes enter, :meth:`pop_delivered` to take the bytes
    that have reached the far end, and :meth:`next_event_time` to learn when the
    next byte departs or arrives. Every method taking ``now`` raises
    :class:`ValueError` if ``now`` is earlier than a previous call's.
    """

    __slots__ = (
        "_bytes_delivered",
        "_bytes_departed",
        "_bytes_dropped",
        "_bytes_offered",
        "_delay_ms",
        "_drops",
        "_flight",
        "_flight_bytes",
        "_limit",
        "_next",
        "_now_ms",
        "_origin_ms",
        "_queue",
        "_radio",
        "_switches",
        "_trace",
        "_used",
        "_wasted",
    )

    def __init__(
        self,
        trace: Trace,
        *,
        queue_limit_bytes: int = DEFAULT_QUEUE_LIMIT_BYTES,
        delay_s: float = 0.0,
        radio: Radio | None = None,
        now: float = 0.0,
    ) -> None:
        """Start at trace time ``now`` (opportunities before it are not used).

        Args:
            trace: the capacity trace; trace time ``t`` is offset ``t`` of it.
            queue_limit_bytes: the bottleneck queue limit (drop-tail).
            delay_s: base one-way delay added after the bottleneck.
            radio: the shared radio model, or None for an always-on radio.
            now: the starting trace time, seconds.

        Raises:
            ValueError: a non-positive limit or a negative delay.
        """
        if queue_limit_bytes <= 0:
            raise ValueError("queue_limit_bytes must be > 0")
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self._trace = trace
        self._origin_ms = 0.0
        self._now_ms = _ms(now)
        self._next = trace.first_at_or_after(self._now_ms)
        self._limit = queue_limit_bytes
        self._delay_ms = _ms(delay_s)
        self._radio = radio
        self._queue = 0
        self._flight: collections.deque[tuple[float, int]] = collections.deque()
        self._flight_bytes = 0
        self._bytes_offered = 0
        self._bytes_dropped = 0
        self._drops = 0
        self._bytes_departed = 0
        self._bytes_delivered = 0
        self._used = 0
        self._wasted = 0
        self._switches = 0
        if radio is not None:
            radio._attach(self)

    @property
    def trace(self) -> Trace:
        """The current trace."""
        return self._trace

    @property
    def queue_limit_bytes(self) -> int:
        """The bottleneck queue limit."""
        return self._limit

    @property
    def delay_s(self) -> float:
        """The base one-way delay."""
        return self._delay_ms / 1000.0

    @property
    def radio(self) -> Radio | None:
        """The radio model, if any."""
        return self._radio

    def offer(self, size: int, now: float) -> bool:
        """Bytes enter the bottleneck queue at ``now``.

        Args:
            size: bytes offered (one packet or one chunk of a stream).
            now: trace time, seconds.

        Returns:
            True if queued; False if dropped whole because it would exceed the
            queue limit (counted in ``drops`` and ``bytes_dropped``).

        Raises:
            ValueError: a negative size, or time going backwards.
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        now_ms = self._tick(now)
        self._advance(now_ms, inclusive=False)
        if self._queue + size > self._limit:
            self._drops += 1
            self._bytes_dropped += size
            return False
        if size == 0:
            return True
        if self._radio is not None:
            self._radio._wake(now_ms)
        self._queue += size
        self._bytes_offered += size
        return True

    def free_bytes(self, now: float) -> int:
        """Room left in the queue at ``now`` (an offer up to this size is kept)."""
        self._advance(self._tick(now), inclusive=False)
        return max(0, self._limit - self._queue)

    def queue_bytes(self, now: float) -> int:
        """Bytes waiting in the queue at ``now``."""
        self._advance(self._tick(now), inclusive=False)
        return self._queue

    def in_flight_bytes(self, now: float) -> int:
        """Bytes that left the queue by ``now`` and were not yet popped."""
        self._advance(self._tick(now), inclusive=False)
        return self._flight_bytes

    def pop_delivered(self, now: float) -> int:
        """Take the bytes that have reached the far end by ``now``, in order.

        Returns:
            How many bytes (the next bytes of the offered stream) to hand out.
        """
        now_ms = self._tick(now)
        self._advance(now_ms, inclusive=True)
        flight = self._flight
        count = 0
        while flight and flight[0][0] <= now_ms:
            count += flight.popleft()[1]
        self._flight_bytes -= count
        self._bytes_delivered += count
        return count

    def next_event_time(self) -> float | None:
        """When the next byte departs or arrives (trace seconds), or None if idle.

        It may lie in the past if the caller has not called since; call
        :meth:`pop_delivered` at (or after) that time.
        """
        best = self._flight[0][0] if self._flight else math.inf
        if self._queue:
            trace, origin = self._trace, self._origin_ms
            t = origin + trace.time_ms(self._next)
            radio = self._radio
            if radio is not None and t < radio._ready_ms:
                t = origin + trace.time_ms(
                    trace.first_at_or_after(radio._ready_ms - origin)
                )
            best = min(best, t)
        return None if best == math.inf else best / 1000.0

    def switch_trace(self, trace: Trace, now: float, *, restart: bool = False) -> None:
        """Use ``trace`` for the opportunities after ``now``.

        Queued bytes stay queued and leave at the new trace's opportunities (an
        opportunity of the new trace at exactly ``now`` is not used, so an instant
        is never served by both traces).

        Args:
            trace: the new trace.
            now: trace time of the switch.
            restart: start the new trace at its offset 0 at ``now``; by default it
                continues at the same trace time (offset ``now`` mod its period).

        Raises:
            ValueError: time going backwards.
        """
        now_ms = self._tick(now)
        self._advance(now_ms, inclusive=False)
        if restart:
            self._origin_ms = now_ms
        self._trace = trace
        self._next = trace.first_after(now_ms - self._origin_ms)
        self._switches += 1

    def counters(self, now: float | None = None) -> ShaperCounters:
        """A snapshot of the counters, advanced to ``now`` if given."""
        if now is not None:
            self._advance(self._tick(now), inclusive=False)
        return ShaperCounters(
            trace=self._trace.name,
            delay_s=self.delay_s,
            bytes_offered=self._bytes_offered,
            bytes_dropped=self._bytes_dropped,
            drops=self._drops,
            bytes_departed=self._bytes_departed,
            bytes_delivered=self._bytes_delivered,
            queue_bytes=self._queue,
            in_flight_bytes=self._flight_bytes,
            opportunities_used=self._used,
            opportunities_wasted=self._wasted,
            trace_switches=self._switches,
        )

    def _tick(self, now: float) -> float:
        now_ms = _ms(now)
        if now_ms < self._now_ms:
            raise ValueError(
                f"time went backwards: {now_ms:.3f} ms < {self._now_ms:.3f} ms"
            )
        self._now_ms = now_ms
        return now_ms

    def _advance(self, now_ms: float, *, inclusive: bool) -> None:
        """Process the opportunities up to ``now_ms`` (at it too if ``inclusive``)."""
        trace = self._trace
        queue = self._queue
        if queue:
            offsets = trace.offsets_ms
            n = len(offsets)
            period = offsets[-1]
            nxt = self._next
            loop, i = divmod(nxt, n)
            base = self._origin_ms + loop * period
            radio = self._radio
            ready_ms = radio._ready_ms if radio is not None else -math.inf
            delay_ms = self._delay_ms
            flight = self._flight
            used = wasted = 0
            last_ms = -math.inf
            while queue:
                t = base + offsets[i]
                if t > now_ms or (t == now_ms and not inclusive):
                    break
                if t < ready_ms:
                    wasted += 1
                else:
                    take = MTU_BYTES if queue > MTU_BYTES else queue
                    queue -= take
                    used += 1
                    at = t + delay_ms
                    if flight and flight[-1][0] == at:
                        flight[-1] = (at, flight[-1][1] + take)
                    else:
                        flight.append((at, take))
                    last_ms = t
                nxt += 1
                i += 1
                if i == n:
                    i = 0
                    base += period
            departed = self._queue - queue
            self._queue = queue
            self._next = nxt
            self._flight_bytes += departed
            self._bytes_departed += departed
            self._used += used
            self._wasted += wasted
            if radio is not None and used:
                radio._note_activity(last_ms)
        if not self._queue:
            # Nothing queued: every opportunity up to now is lost, skip them at once.
            position = now_ms - self._origin_ms
            target = (
                trace.first_after(position)
                if inclusive
                else trace.first_at_or_after(position)
            )
            if target > self._next:
                self._wasted += target - self._next
                self._next = target
