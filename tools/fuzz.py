"""Fuzz harnesses: ``make fuzz`` runs them under atheris for as long as asked.

The invariant (h11's): whatever bytes a peer sends, a decoder returns a value
or raises :class:`~protocol.errors.RemoteProtocolError`; anything else is a
bug. The normal test suite runs the same harness functions over a few hundred
thousand seeded random and mutated inputs; this module runs them
coverage-guided, without a time limit of its own.

Usage: ``python -m tools.fuzz [--target NAME] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator

from protocol.bodies import decode_body
from protocol.constants import Limits, MessageKind
from protocol.errors import RemoteProtocolError
from protocol.link import FragmentHeader, Reassembler
from protocol.message import MessageReader, decode_messages
from protocol.record import Alert, Record

__all__ = ["TARGETS", "mutations", "protocol_one_input"]

_KINDS = tuple(MessageKind)
_SMALL = Limits(max_record_size=4096, max_message_size=2048)


def protocol_one_input(data: bytes) -> None:
    """Feed ``data`` to every wire decoder; only RemoteProtocolError may escape.

    The first byte selects a body kind; the rest is the input proper.
    """
    selector, rest = (data[0], data[1:]) if data else (0, b"")
    for decoder in (
        FragmentHeader.decode,
        Record.decode,
        Alert.decode,
        lambda b: decode_messages(b, _SMALL),
        lambda b: decode_body(_KINDS[selector % len(_KINDS)], b),
    ):
        with contextlib.suppress(RemoteProtocolError):
            decoder(rest)
    reassembler = Reassembler(_SMALL)
    reader = MessageReader(_SMALL)
    try:
        # Chunks of the input as GATT values, then as a message stream.
        step = 20 + selector % 60
        for i in range(0, len(rest), step):
            for event in reassembler.feed(rest[i : i + step], float(i)):
                del event
        reassembler.expire(1e9)
        reader.feed(rest)
        while reader.next_message() is not None:
            pass
    except RemoteProtocolError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {"protocol": protocol_one_input}


def mutations(seeds: list[bytes], count: int, rng: random.Random) -> Iterator[bytes]:
    """Yield ``count`` inputs: random bytes and mutated seeds, half and half."""
    for i in range(count):
        if i % 2 or not seeds:
            yield rng.randbytes(rng.randrange(0, 300))
            continue
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(5)
            if op == 0 and data:
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                del data[rng.randrange(len(data)) :]
            elif op == 2:
                data += rng.randbytes(rng.randrange(1, 20))
            elif op == 3 and data:
                pos = rng.randrange(len(data))
                data[pos] = rng.choice((0, 0xFF, 0x7F, 0x80))
            else:
                other = rng.choice(seeds)
                cut = rng.randrange(len(other) + 1)
                data = data[:cut] + bytearray(other[cut:])
        yield bytes(data)


def main(argv: list[str] | None = None) -> int:
    """Run one harness under atheris (``pip install -e .[fuzz]``)."""
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz")
    parser.add_argument("--target", choices=sorted(TARGETS), default="protocol")
    parser.add_argument("--seconds", type=int, default=600)
    args = parser.parse_args(argv)
    try:
        import atheris
    except ImportError:
        sys.stderr.write("atheris is not installed: pip install -e '.[fuzz]'\n")
        return 2
    target = TARGETS[args.target]
    sys.stderr.write(f"fuzzing {args.target} for {args.seconds} s\n")
    started = time.monotonic()
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={args.seconds}", "-print_final_stats=1"],
        target,
    )
    atheris.Fuzz()
    sys.stderr.write(f"done in {time.monotonic() - started:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
