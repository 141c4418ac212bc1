"""Fuzz target for :meth:`protocol.transport.TransportSession.open`.

SECURITY.md §1 "Failures" and §4 Tier 1 #2: whatever bytes arrive, ``open``
returns the plaintext of a byte-identical genuine frame (each counter once) or
``None``, and every ``None`` is counted under exactly one drop reason. Nothing
raises.

Two drivers share :class:`Target`:

* :func:`run_random`: a seeded loop of random and mutated inputs (bit flips,
  truncation, extension, splice, session swap, counter rewrite, old-session
  frames, raw junk). The unit suite runs 100,000 of them; run longer with
  ``python tests/fuzz/fuzz_transport.py --random 10000000``.
* :func:`TestOneInput`: the atheris entry point, coverage-guided; run with
  ``python tests/fuzz/fuzz_transport.py [libFuzzer flags]`` (needs the
  ``fuzz`` extra; ``-max_total_time=600`` bounds it).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.transport import DropReason, TransportLimits, TransportSession

SESSION_ID = 0x5EC0_0001
"""Session id of the session under test."""
OLD_SESSION_ID = 0x5EC0_0000
"""Session id of the previous session (other keys)."""
GENUINE_FRAMES = 3072
"""Genuine frames per receiver life: three windows, so old replays occur."""
FUZZ_LIMITS = TransportLimits(
    max_consecutive_auth_failures=1 << 62, max_auth_failures=1 << 62
)
"""No teardown: keep every input reaching the deep checks."""

_HEADER_SIZE = 14


class InvariantError(AssertionError):
    """``open`` broke its contract; the message names the input's shape."""


@dataclass(frozen=True, slots=True)
class FuzzStats:
    """What a fuzz run saw."""

    inputs: int
    accepted: int
    rejected: int
    drops: dict[DropReason, int]
    seconds: float

    @property
    def rate(self) -> float:
        """Inputs per second."""
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


class Target:
    """A receiving session, its genuine frames, and the invariant checks.

    Keys come from ``seed``, so a run is reproducible. After every genuine
    frame was fed in order, the receiver is replaced by a fresh one (same keys
    and frames) and its drop counts are folded into the totals.
    """

    def __init__(self, seed: int = 0) -> None:
        """Seal the genuine frames and those of an old session."""
        rng = random.Random(seed)
        send_key, recv_key = rng.randbytes(32), rng.randbytes(32)
        self._keys = (send_key, recv_key)
        sender = TransportSession(send_key, recv_key, SESSION_ID, started_at=0.0)
        self.plaintexts = [
            rng.randbytes(rng.choice((0, 1, 16, 31, 64, 100, 257)))
            for _ in range(GENUINE_FRAMES)
        ]
        self.frames = [sender.seal(p) for p in self.plaintexts]
        # The previous session (other keys, other id), the same id under other
        # keys, and frames we sent ourselves (reflection).
        old_send, old_recv = rng.randbytes(32), rng.randbytes(32)
        old = TransportSession(old_send, old_recv, OLD_SESSION_ID, started_at=0.0)
        same_id = TransportSession(old_send, old_recv, SESSION_ID, started_at=0.0)
        mirror = TransportSession(recv_key, send_key, SESSION_ID, started_at=0.0)
        self.foreign = [
            s.seal(rng.randbytes(24)) for s in (old, same_id, mirror) for _ in range(64)
        ]
        self.inputs = 0
        self.accepted = 0
        self.rejected = 0
        self._done: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.cursor = 0
        self.receiver = self._new_receiver()
        self._seen: set[int] = set()

    def _new_receiver(self) -> TransportSession:
        send_key, recv_key = self._keys
        return TransportSession(
            recv_key, send_key, SESSION_ID, FUZZ_LIMITS, started_at=0.0
        )

    def reset(self) -> None:
        """Fold the receiver's drops into the totals and start a fresh one."""
        for reason, count in self.receiver.drops.items():
            self._done[reason] += count
        self.receiver = self._new_receiver()
        self._seen.clear()
        self.cursor = 0

    @property
    def drops(self) -> dict[DropReason, int]:
        """Drops per reason over every receiver so far."""
        current = self.receiver.drops
        return {reason: self._done[reason] + current[reason] for reason in DropReason}

    def feed(self, data: bytes) -> bytes | None:
        """Open ``data`` and check the result.

        Raises:
            InvariantError: something other than a fresh genuine frame opened.
        """
        self.inputs += 1
        plaintext = self.receiver.open(data)
        if plaintext is None:
            self.rejected += 1
            return None
        counter = int.from_bytes(data[6:_HEADER_SIZE], "big")
        if (
            len(data) < _HEADER_SIZE
            or counter >= len(self.frames)
            or data != self.frames[counter]
            or plaintext != self.plaintexts[counter]
        ):
            raise InvariantError(f"accepted a non-genuine {len(data)}-byte input")
        if counter in self._seen:
            raise InvariantError(f"accepted counter {counter} twice")
        self._seen.add(counter)
        self.accepted += 1
        return plaintext

    def check(self) -> None:
        """Raise :class:`InvariantError` unless every rejection was counted once."""
        total = sum(self.drops.values())
        if total != self.rejected:
            raise InvariantError(f"{total} drops counted for {self.rejected} rejects")

    def next_in_order(self) -> bytes:
        """The next genuine frame in counter order (resetting at the end)."""
        if self.cursor >= len(self.frames):
            self.reset()
        frame = self.frames[self.cursor]
        self.cursor += 1
        return frame


def _flip(frame: bytes, rng: random.Random) -> bytes:
    out = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        bit = rng.randrange(len(out) * 8)
        out[bit >> 3] ^= 1 << (bit & 7)
    return bytes(out)


def _set_counter(frame: bytes, rng: random.Random, top: int) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        counter = rng.randrange(1 << 64)
    elif choice == 1:
        counter = (1 << 32) + rng.randrange(1 << 10)
    else:
        counter = max(0, top + rng.randrange(-1100, 64))
    return frame[:6] + counter.to_bytes(8, "big") + frame[_HEADER_SIZE:]


def mutate(target: Target, rng: random.Random) -> bytes:
    """Return one random input: genuine, mutated genuine, foreign or junk."""
    frames = target.frames
    frame = frames[rng.randrange(len(frames))]
    op = rng.randrange(14)
    if op == 0:
        return target.next_in_order()
    if op == 1:  # replay or out-of-order genuine frame, accepted at most once
        return frame
    if op in (2, 3):
        return _flip(frame, rng)
    if op == 4:
        return frame[: rng.randrange(len(frame))]
    if op == 5:
        return frame + rng.randbytes(rng.randint(1, 32))
    if op == 6:  # splice two frames
        other = frames[rng.randrange(len(frames))]
        cut, start = rng.randrange(len(frame) + 1), rng.randrange(len(other))
        return frame[:cut] + other[start:]
    if op == 7:  # session swap
        sid = rng.choice((OLD_SESSION_ID, 0, 0xFFFF_FFFF, rng.randrange(1 << 32)))
        return frame[:2] + sid.to_bytes(4, "big") + frame[6:]
    if op == 8:
        return _set_counter(frame, rng, target.receiver.replay_window.highest)
    if op == 9:  # version / type byte
        index = rng.randrange(2)
        out = bytearray(frame)
        out[index] = rng.randrange(256)
        return bytes(out)
    if op == 10:
        return target.foreign[rng.randrange(len(target.foreign))]
    if op == 11:  # junk body behind a genuine header
        return frame[:_HEADER_SIZE] + rng.randbytes(rng.randrange(0, 80))
    if op == 12:  # oversize
        return frame + bytes(4096)
    return rng.randbytes(rng.randrange(0, 120))


def run_random(iterations: int, seed: int = 0) -> FuzzStats:
    """Feed ``iterations`` random inputs through ``open`` and check invariants.

    Raises:
        InvariantError: a non-genuine or repeated frame opened, or a drop went
            uncounted. Any other exception escaping ``open`` propagates too.
    """
    target = Target(seed)
    rng = random.Random(seed ^ 0x5EED)
    start = time.perf_counter()
    feed = target.feed
    for _ in range(iterations):
        feed(mutate(target, rng))
    seconds = time.perf_counter() - start
    target.check()
    return FuzzStats(
        target.inputs, target.accepted, target.rejected, target.drops, seconds
    )


_TARGET: Target | None = None


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' required name
    """Atheris entry point: interpret ``data`` as an input or a mutation."""
    global _TARGET  # libFuzzer passes no state
    target = _TARGET
    if target is None:
        target = _TARGET = Target()
    if target.inputs % 50_000 == 0:
        target.check()
    if len(data) < 2:
        target.feed(data)
        return
    op, index, rest = data[0] & 7, data[1], data[2:]
    frame = target.frames[(index * 7 + target.cursor) % len(target.frames)]
    if op == 0:
        target.feed(rest)
    elif op == 1:  # XOR rest over the frame from its start
        out = bytearray(frame)
        for i, b in enumerate(rest[: len(out)]):
            out[i] ^= b
        target.feed(bytes(out))
    elif op == 2:  # genuine header, fuzzed body
        target.feed(frame[:_HEADER_SIZE] + rest)
    elif op == 3:  # truncate or extend
        target.feed(frame[: index % (len(frame) + 1)] + rest)
    elif op == 4:  # keep the receiver moving
        target.feed(target.next_in_order())
    elif op == 5:  # fuzzed header, genuine body
        target.feed(rest[:_HEADER_SIZE] + frame[_HEADER_SIZE:])
    else:
        target.feed(frame)


def main(argv: Sequence[str] | None = None) -> int:
    """Run atheris when installed, else (or with ``--random N``) the plain loop."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="Fuzz TransportSession.open")
    parser.add_argument("--random", type=int, metavar="N", help="plain loop of N")
    parser.add_argument("--seed", type=int, default=0)
    known, rest = parser.parse_known_args(args)
    if known.random is None:
        try:
            import atheris  # optional: the fuzz extra
        except ImportError:
            print("atheris not installed; running 1,000,000 plain inputs")
            known.random = 1_000_000
        else:
            atheris.instrument_all()
            atheris.Setup([sys.argv[0], *rest], TestOneInput)
            atheris.Fuzz()
            return 0
    stats = run_random(known.random, known.seed)
    drops = ", ".join(f"{r.value}={n}" for r, n in stats.drops.items())
    print(
        f"{stats.inputs} inputs in {stats.seconds:.1f} s ({stats.rate:,.0f}/s): "
        f"accepted {stats.accepted}, rejected {stats.rejected} ({drops})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
