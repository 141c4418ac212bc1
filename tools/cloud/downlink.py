"""Answer pieces kept until the phone acknowledges them, and their resend timer.

docs/cloud.md §Delivery 5: the gateway keeps every downlink envelope until an
ACK message from the phone names its message id, and resends the identical
bytes on a backed-off timer: ``initial_s``, then doubling up to ``cap_s``,
each delay jittered by ±10 %. :meth:`DownlinkTracker.kick` makes a device's
pieces due at once (its presence says online, or it spoke after a silence).

Sans-I/O: the caller passes ``now`` (monotonic seconds) and sends what
:meth:`DownlinkTracker.take_due` returns.

Limits: ``max_per_device`` pieces per device (beyond, the oldest is dropped
and counted); a piece older than ``ttl_s`` is dropped and counted.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["DownlinkTracker"]

_JITTER: Final = 0.1
_MAX_EXPONENT: Final = 32


@dataclass(slots=True)
class _Pending:
    envelope: bytes
    created: float
    due: float
    attempt: int


class DownlinkTracker:
    """Unacknowledged downlink envelopes per device (module docstring).

    Args:
        initial_s: First resend delay.
        cap_s: Largest resend delay.
        ttl_s: A piece is dropped once this old.
        max_per_device: Pieces kept per device.
        rng: Jitter source.
    """

    def __init__(
        self,
        *,
        initial_s: float,
        cap_s: float,
        ttl_s: float,
        max_per_device: int,
        rng: random.Random | None = None,
    ) -> None:
        """Create an empty tracker."""
        self._initial_s = initial_s
        self._cap_s = cap_s
        self._ttl_s = ttl_s
        self._max = max_per_device
        self._rng = rng or random.Random()
        self._pending: dict[str, OrderedDict[bytes, _Pending]] = {}
        self._heap: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()
        self.dropped_overflow = 0
        self.dropped_expired = 0

    def __len__(self) -> int:
        """Pieces pending, all devices together."""
        return sum(len(pieces) for pieces in self._pending.values())

    def pending(self, pseudonym: str) -> list[bytes]:
        """The message ids pending for ``pseudonym``, oldest first."""
        return list(self._pending.get(pseudonym, ()))

    def track(
        self, pseudonym: str, message_id: bytes, envelope: bytes, now: float
    ) -> None:
        """Keep ``envelope`` (just sent) until :meth:`acked`; schedule its resend."""
        pieces = self._pending.setdefault(pseudonym, OrderedDict())
        while len(pieces) >= self._max:
            pieces.popitem(last=False)
            self.dropped_overflow += 1
        entry = _Pending(envelope, now, now + self._delay(0), 0)
        pieces[message_id] = entry
        self._push(entry.due, pseudonym, message_id)

    def acked(self, pseudonym: str, ids: Iterable[bytes]) -> int:
        """Forget the pieces the phone acknowledged; return how many were pending."""
        pieces = self._pending.get(pseudonym)
        if not pieces:
            return 0
        removed = sum(pieces.pop(mid, None) is not None for mid in ids)
        if not pieces:
            del self._pending[pseudonym]
        return removed

    def kick(self, pseudonym: str, now: float) -> int:
        """Make every piece of ``pseudonym`` due now; return how many."""
        pieces = self._pending.get(pseudonym)
        if not pieces:
            return 0
        for mid, entry in pieces.items():
            entry.due = now
            self._push(now, pseudonym, mid)
        return len(pieces)

    def next_due(self) -> float | None:
        """When the earliest piece is due, or None if nothing is pending."""
        while self._heap:
            due, _, pseudonym, mid = self._heap[0]
            pieces = self._pending.get(pseudonym)
            entry = pieces.get(mid) if pieces else None
            if entry is not None and entry.due == due:
                return due
            heapq.heappop(self._heap)  # acknowledged or rescheduled since
        return None

    def take_due(
        self, now: float, *, paused: Callable[[str], bool] = lambda _: False
    ) -> dict[str, list[tuple[bytes, bytes]]]:
        """Return ``{pseudonym: [(message id, envelope), ...]}`` due by ``now``.

        Each returned piece is rescheduled with the next, longer delay. A
        device for which ``paused`` is true (known offline) is skipped until
        the cap delay or a :meth:`kick`.
        """
        out: dict[str, list[tuple[bytes, bytes]]] = {}
        while (due := self.next_due()) is not None and due <= now:
            _, _, pseudonym, mid = heapq.heappop(self._heap)
            pieces = self._pending[pseudonym]
            entry = pieces[mid]
            if now - entry.created >= self._ttl_s:
                del pieces[mid]
                if not pieces:
                    del self._pending[pseudonym]
                self.dropped_expired += 1
                continue
            if paused(pseudonym):
                entry.due = now + self._cap_s
            else:
                entry.attempt += 1
                entry.due = now + self._delay(entry.attempt)
                out.setdefault(pseudonym, []).append((mid, entry.envelope))
            self._push(entry.due, pseudonym, mid)
        return out

    def _delay(self, attempt: int) -> float:
        base = min(self._cap_s, self._initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))
        return base * self._rng.uniform(1 - _JITTER, 1 + _JITTER)

    def _push(self, due: float, pseudonym: str, message_id: bytes) -> None:
        heapq.heappush(self._heap, (due, next(self._order), pseudonym, message_id))
