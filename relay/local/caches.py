"""The bounded caches behind the phone-side skills.

- :class:`TtlLruCache`: a mapping with a size bound (the least recently used
  entry is evicted) and an age bound (an entry older than ``ttl_s`` is gone),
  on a monotonic clock passed in by the caller.
- :class:`RouteCache`: the steps of the current route and how far the user
  has been read through them; the whole route expires ``ttl_s`` after it
  was stored.
- :class:`PriceBook`: what a product costs by its barcode: a fixed
  catalogue plus prices learned from cloud answers (LRU-bounded).

Pure and synchronous; not thread-safe (one owner, the daemon's loop).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Final, Generic, TypeVar

__all__ = [
    "MAX_PRICE_TEXT_CHARS",
    "MAX_ROUTE_STEPS",
    "MAX_STEP_CHARS",
    "PriceBook",
    "RouteCache",
    "TtlLruCache",
    "is_product_code",
    "normalise_code",
]

MAX_ROUTE_STEPS: Final = 64
"""Steps kept per route; later steps are dropped (a route is re-asked long before)."""
MAX_STEP_CHARS: Final = 200
"""Characters kept per step; a longer step is cut (the display shows two lines)."""
MAX_PRICE_TEXT_CHARS: Final = 200
"""Characters kept per price text; a longer text is cut."""

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class TtlLruCache(Generic[_K, _V]):
    """A bounded mapping with expiry, on a caller-supplied monotonic clock.

    Policies: at most ``max_entries`` entries, storing one more evicts the
    least recently used (read or stored); an entry is valid while its age
    (``mono`` minus the time it was stored) is below ``ttl_s``, and expired
    entries are dropped when met. A read does not extend an entry's life.
    """

    __slots__ = ("_entries", "max_entries", "ttl_s")

    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        """Create an empty cache.

        Args:
            max_entries: Size bound, at least 1.
            ttl_s: Lifetime of an entry in seconds, above 0.

        Raises:
            ValueError: A bound out of range.
        """
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be above 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: collections.OrderedDict[_K, tuple[float, _V]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        """Entries held, expired ones included until they are met."""
        return len(self._entries)

    def get(self, key: _K, mono: float | None = None) -> _V | None:
        """The value under ``key`` if present and not expired.

        Args:
            key: The key.
            mono: The monotonic time now; ``None`` skips the expiry check
                (a pure look-up, for matching without a clock).

        Returns:
            The value, or ``None``. With ``mono``, a hit becomes the most
            recently used; a pure look-up leaves the order alone.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored, value = entry
        if mono is not None and mono - stored >= self.ttl_s:
            del self._entries[key]
            return None
        if mono is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: _K, value: _V, mono: float) -> None:
        """Store ``value`` under ``key`` at time ``mono``, evicting as needed.

        Args:
            key: The key.
            value: The value.
            mono: The monotonic time now.
        """
        self._entries[key] = (mono, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def pop(self, key: _K, mono: float | None = None) -> _V | None:
        """Remove and return the value under ``key`` (``None`` if absent or expired).

        Args:
            key: The key.
            mono: The monotonic time now; ``None`` skips the expiry check.

        Returns:
            The value, or ``None``.
        """
        value = self.get(key, mono)
        self._entries.pop(key, None)
        return value

    def expire(self, mono: float) -> int:
        """Drop every expired entry.

        Args:
            mono: The monotonic time now.

        Returns:
            How many entries were dropped.
        """
        old = [
            k for k, (stored, _) in self._entries.items() if mono - stored >= self.ttl_s
        ]
        for key in old:
            del self._entries[key]
        return len(old)


class RouteCache:
    """The current route's steps and a cursor on the next one to read out.

    Policies: one route at a time (a new one replaces it); at most
    :data:`MAX_ROUTE_STEPS` steps of at most :data:`MAX_STEP_CHARS` each;
    the route expires ``ttl_s`` after it was stored (routes go stale as the
    user moves off them), reading steps does not extend it.
    """

    __slots__ = ("_cursor", "_steps", "_stored", "ttl_s")

    def __init__(self, *, ttl_s: float) -> None:
        """Create an empty route cache.

        Args:
            ttl_s: Lifetime of a route in seconds, above 0.

        Raises:
            ValueError: ``ttl_s`` not above 0.
        """
        if not ttl_s > 0:
            raise ValueError("ttl_s must be above 0")
        self.ttl_s = ttl_s
        self._steps: tuple[str, ...] = ()
        self._cursor = 0
        self._stored = 0.0

    def store(self, steps: Iterable[str], mono: float, *, cursor: int = 0) -> int:
        """Replace the route (blank steps skipped, limits applied).

        Args:
            steps: The steps in order.
            mono: The monotonic time now.
            cursor: Index of the next step to read out (steps before it
                were already given).

        Returns:
            The number of steps kept (0 clears the route).
        """
        kept: list[str] = []
        for step in steps:
            clean = " ".join(step.split())[:MAX_STEP_CHARS]
            if clean:
                kept.append(clean)
            if len(kept) == MAX_ROUTE_STEPS:
                break
        self._steps = tuple(kept)
        self._cursor = max(0, cursor)
        self._stored = mono
        return len(kept)

    def clear(self) -> None:
        """Forget the route."""
        self._steps = ()
        self._cursor = 0

    def has_next(self, mono: float | None = None) -> bool:
        """Whether a step remains to be read out.

        Args:
            mono: The monotonic time now; ``None`` skips the expiry check.

        Returns:
            True if a route is stored, not expired and not read to its end.
        """
        if mono is not None and mono - self._stored >= self.ttl_s:
            self.clear()
        return self._cursor < len(self._steps)

    def next_step(self, mono: float) -> str | None:
        """The next step, moving the cursor past it.

        Args:
            mono: The monotonic time now.

        Returns:
            The step, or ``None`` when there is no route, it expired or it
            was read to its end (the caller then asks the cloud).
        """
        if not self.has_next(mono):
            return None
        step = self._steps[self._cursor]
        self._cursor += 1
        return step


def normalise_code(code: str) -> str:
    """A retail code as looked up: a 12-digit UPC-A gets its EAN-13 leading 0.

    Args:
        code: The digits as decoded.

    Returns:
        The lookup key.
    """
    return "0" + code if len(code) == 12 else code


def is_product_code(code: str) -> bool:
    """Whether ``code`` is an EAN-8, UPC-A or EAN-13 with a valid check digit.

    Args:
        code: Candidate digits.

    Returns:
        True for a well-formed code.
    """
    if len(code) not in (8, 12, 13) or not code.isascii() or not code.isdigit():
        return False
    digits = [int(c) for c in reversed(code[:-1])]
    weighted = sum(d * (3 if i % 2 == 0 else 1) for i, d in enumerate(digits))
    return (10 - weighted % 10) % 10 == int(code[-1])


class PriceBook:
    """Product texts ("Oat milk 1 L: 2.29 €") by barcode.

    Policies: the catalogue given at creation is fixed and never expires;
    prices learned later (:meth:`learn`) never expire either (a price is
    shown as it was last heard) but at most ``max_learned`` are kept, the
    least recently used evicted; texts are cut at
    :data:`MAX_PRICE_TEXT_CHARS`. A learned price overrides the catalogue.
    """

    __slots__ = ("_catalogue", "_learned", "_max_learned")

    def __init__(self, catalogue: Mapping[str, str], *, max_learned: int) -> None:
        """Create the book.

        Args:
            catalogue: Fixed entries, code to text.
            max_learned: Bound on learned entries, at least 1.

        Raises:
            ValueError: A catalogue code is not a valid product code, or
                ``max_learned`` below 1.
        """
        bad = [code for code in catalogue if not is_product_code(code)]
        if bad:
            raise ValueError(f"not EAN-8/UPC-A/EAN-13 codes: {bad[:3]}")
        if max_learned < 1:
            raise ValueError("max_learned must be at least 1")
        self._catalogue = {
            normalise_code(code): text[:MAX_PRICE_TEXT_CHARS]
            for code, text in catalogue.items()
        }
        self._learned: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._max_learned = max_learned

    def learn(self, code: str, text: str) -> None:
        """Remember the product text of ``code``.

        Args:
            code: An EAN-8, UPC-A or EAN-13 code.
            text: What to say about it, with its price.

        Raises:
            ValueError: ``code`` is not a valid product code or ``text`` is blank.
        """
        if not is_product_code(code):
            raise ValueError("not an EAN-8/UPC-A/EAN-13 code")
        clean = " ".join(text.split())[:MAX_PRICE_TEXT_CHARS]
        if not clean:
            raise ValueError("a price text must not be blank")
        key = normalise_code(code)
        self._learned[key] = clean
        self._learned.move_to_end(key)
        while len(self._learned) > self._max_learned:
            self._learned.popitem(last=False)

    def look_up(self, codes: Sequence[str]) -> str | None:
        """The text of the first of ``codes`` that is known.

        Args:
            codes: Decoded codes, in the order found.

        Returns:
            The product text, or ``None`` if none is known.
        """
        for code in codes:
            key = normalise_code(code)
            learned = self._learned.get(key)
            if learned is not None:
                self._learned.move_to_end(key)
                return learned
            if key in self._catalogue:
                return self._catalogue[key]
        return None
