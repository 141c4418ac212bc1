"""mahimahi packet-delivery traces: parsing and the looped opportunity schedule.

A trace file holds one integer per line, non-decreasing: the millisecond offset
from the trace start at which one 1500-byte packet may leave the bottleneck
queue; a repeated value means several packets in that millisecond (see
``README.upstream`` beside the traces and ../shared/data/README.md). Like
mahimahi's ``mm-link``, the trace loops with a period equal to its last offset:
opportunity ``k`` of an ``n``-line trace lies at
``(k // n) * period + offsets[k % n]`` milliseconds. A file containing just
``1`` is a fixed 12 Mbit/s link.

Opportunities are numbered globally (``0, 1, 2, ...`` across loops), so a
position in a looped trace is one integer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tools.netem.errors import TraceFormatError

__all__ = ["MTU_BYTES", "Trace", "load_trace"]

MTU_BYTES: Final = 1500
"""Bytes one delivery opportunity carries (mahimahi's ``PACKET_SIZE``)."""


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """A looped schedule of 1500-byte delivery opportunities.

    Build one with :func:`load_trace` or :meth:`from_offsets`.

    Attributes:
        offsets_ms: the opportunity offsets of one loop, non-decreasing, the last
            one positive; it is also the loop period.
        name: where the trace came from (a file name), for logs and reports.
    """

    offsets_ms: tuple[int, ...] = field(repr=False)
    name: str = "trace"

    def __post_init__(self) -> None:
        """Check the invariants :func:`load_trace` guarantees.

        Raises:
            TraceFormatError: empty, negative, decreasing, or a zero period.
        """
        _validate(self.offsets_ms, self.name)

    @classmethod
    def from_offsets(cls, offsets_ms: tuple[int, ...] | list[int], name: str) -> Trace:
        """A trace from offsets in memory (synthetic links in tests and benches).

        Raises:
            TraceFormatError: as :func:`load_trace`.
        """
        return cls(tuple(offsets_ms), name)

    @property
    def period_ms(self) -> int:
        """The loop period: the last offset."""
        return self.offsets_ms[-1]

    @property
    def opportunities_per_loop(self) -> int:
        """Lines in the file: delivery opportunities per loop."""
        return len(self.offsets_ms)

    @property
    def mean_bytes_per_s(self) -> float:
        """Long-run capacity: ``lines * 1500`` bytes per period."""
        return len(self.offsets_ms) * MTU_BYTES * 1000.0 / self.period_ms

    def time_ms(self, index: int) -> int:
        """Trace time, in ms, of global opportunity ``index`` (0-based, looped)."""
        loop, i = divmod(index, len(self.offsets_ms))
        return loop * self.offsets_ms[-1] + self.offsets_ms[i]

    def first_at_or_after(self, t_ms: float) -> int:
        """Global index of the first opportunity at trace time ``>= t_ms``."""
        offsets = self.offsets_ms
        if t_ms <= offsets[0]:
            return 0
        period = offsets[-1]
        n = len(offsets)
        loop = int(t_ms // period)
        if loop >= 1 and loop * period >= t_ms:
            # t is exactly a loop boundary: the previous loop's last lines are at t.
            return (loop - 1) * n + bisect.bisect_left(offsets, period)
        return loop * n + bisect.bisect_left(offsets, t_ms - loop * period)

    def first_after(self, t_ms: float) -> int:
        """Global index of the first opportunity at trace time ``> t_ms``."""
        offsets = self.offsets_ms
        if t_ms < offsets[0]:
            return 0
        period = offsets[-1]
        loop = int(t_ms // period)
        return loop * len(offsets) + bisect.bisect_right(offsets, t_ms - loop * period)

    def count_between(self, start_s: float, end_s: float) -> int:
        """Opportunities at trace times in ``(start_s, end_s]`` (seconds)."""
        if end_s <= start_s:
            return 0
        return self.first_after(_ms(end_s)) - self.first_after(_ms(start_s))

    def capacity_bytes(self, start_s: float, end_s: float) -> int:
        """Bytes the link can deliver in ``(start_s, end_s]``: opportunities * 1500."""
        return self.count_between(start_s, end_s) * MTU_BYTES


def _ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded to 1 ns so that ``k / 1000 * 1000 == k``."""
    return round(seconds * 1000.0, 6)


def _validate(offsets: tuple[int, ...], name: str) -> None:
    if not offsets:
        raise TraceFormatError(name, 0, "no delivery opportunities")
    previous = 0
    for number, value in enumerate(offsets, 1):
        if value < previous:
            reason = "negative offset" if value < 0 else "offsets decrease"
            raise TraceFormatError(name, number, reason)
        previous = value
    if offsets[-1] <= 0:
        raise TraceFormatError(name, len(offsets), "the trace lasts 0 ms")


def load_trace(path: Path | str) -> Trace:
    """Read a mahimahi trace file.

    Blank lines are ignored; every other line must be a non-negative integer.

    Args:
        path: the trace file (e.g. ``ATT-LTE-driving-2016.up``).

    Returns:
        The trace, named after the file.

    Raises:
        TraceFormatError: a line is not an integer, offsets decrease, the file is
            empty or lasts 0 ms.
        OSError: the file cannot be read.
    """
    path = Path(path)
    offsets: list[int] = []
    with path.open(encoding="ascii", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            if not text.isdecimal():
                raise TraceFormatError(path, number, "not a non-negative integer")
            value = int(text)
            if offsets and value < offsets[-1]:
                raise TraceFormatError(path, number, "offsets decrease")
            offsets.append(value)
    if not offsets:
        raise TraceFormatError(path, 0, "no delivery opportunities")
    if offsets[-1] <= 0:
        raise TraceFormatError(path, 0, "the trace lasts 0 ms")
    return Trace(tuple(offsets), path.name)
