"""Clock synchronisation between glasses and phone (docs/protocol.md §5.4).

NTP's four timestamps, in microseconds: ``t1`` request sent (requester's
clock), ``t2`` request received and ``t3`` reply sent (responder's clock),
``t4`` reply received (requester's clock). The offset estimate from the
sample with the smallest round-trip delay is kept, because queueing only ever
adds delay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["ClockEstimator", "ClockSample", "sample"]


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One exchange: the responder's clock is ``offset_us`` ahead of ours."""

    offset_us: float
    delay_us: int


def sample(t1: int, t2: int, t3: int, t4: int) -> ClockSample:
    """Compute offset and round-trip delay from one exchange."""
    offset = ((t2 - t1) + (t3 - t4)) / 2
    delay = max(0, (t4 - t1) - (t3 - t2))
    return ClockSample(offset, delay)


class ClockEstimator:
    """Keeps the last ``window`` samples and trusts the least delayed one."""

    __slots__ = ("_samples",)

    def __init__(self, window: int = 8) -> None:
        """Create an estimator that remembers ``window`` samples."""
        if window < 1:
            raise ValueError("window must be at least 1")
        self._samples: deque[ClockSample] = deque(maxlen=window)

    def add(self, s: ClockSample) -> None:
        """Record a sample."""
        self._samples.append(s)

    @property
    def offset_us(self) -> float | None:
        """Best offset estimate (peer clock minus ours), or ``None`` yet."""
        if not self._samples:
            return None
        return min(self._samples, key=lambda s: s.delay_us).offset_us

    def to_local(self, peer_us: int) -> float | None:
        """Convert a time on the peer's clock to ours, or ``None`` yet."""
        offset = self.offset_us
        return None if offset is None else peer_us - offset
