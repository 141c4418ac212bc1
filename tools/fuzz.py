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
from protocol.constants import (
    MAX_FRAGMENT_SIZE,
    Channel,
    Limits,
    MessageKind,
    RecordType,
)
from protocol.errors import RemoteProtocolError
from protocol.link import FragmentHeader, Reassembler
from protocol.message import MessageReader, decode_messages
from protocol.record import Alert, Record, RecordHeader
from protocol.session import Identity, PeerPolicy, Role, Session

__all__ = ["TARGETS", "SessionTarget", "mutations", "protocol_one_input"]

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


class SessionTarget:
    """Feeds inputs to the glasses' side of a session: fragments and handshakes.

    The first byte of an input picks how the rest is used: as a raw GATT
    value, or wrapped into a well-formed fragment carrying a HANDSHAKE record
    (so the bytes reach the Noise reader), or as a genuine handshake message
    with bytes flipped. A session that fails is replaced by a new one, so
    every path is exercised again and again.
    """

    def __init__(self) -> None:
        """Create the keys once; sessions are cheap enough to replace."""
        self._glasses = Identity.generate()
        self._phone = Identity.generate()
        self._policy = PeerPolicy(pinned=frozenset({self._phone.public}))
        phone = Session(
            Role.PHONE,
            self._phone,
            PeerPolicy(pinned=frozenset({self._glasses.public})),
        )
        phone.initiate(0.0)
        first = phone.pull_fragment(MAX_FRAGMENT_SIZE)
        assert first is not None  # noqa: S101
        self._msg1 = first
        self._session = self._new()
        self.failures = 0

    def _new(self) -> Session:
        return Session(Role.GLASSES, self._glasses, self._policy)

    def __call__(self, data: bytes) -> None:
        """Feed one input; only RemoteProtocolError is expected, and caught."""
        mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
        session = self._session
        if mode == 0:
            piece = rest[:MAX_FRAGMENT_SIZE]
        elif mode == 1:
            record = Record(RecordHeader(RecordType.HANDSHAKE, 0, 0), rest[:400])
            seq = session.expected_fragment_seq
            piece = FragmentHeader(True, True, Channel.CONTROL, seq).encode()
            piece += record.encode()[: MAX_FRAGMENT_SIZE - 2]
        else:
            flipped = bytearray(self._msg1)
            for i, b in enumerate(rest[:8]):
                flipped[(b * 7 + i) % len(flipped)] ^= 1 << (i % 8)
            piece = bytes(flipped)
        try:
            session.receive_fragment(piece, 0.0)
            while session.pull_fragment(MAX_FRAGMENT_SIZE) is not None:
                pass
            session.events_received()
        except RemoteProtocolError:
            self.failures += 1
            self._session = self._new()


_SESSION_TARGET: SessionTarget | None = None


def session_one_input(data: bytes) -> None:
    """Atheris entry for the session target (one shared :class:`SessionTarget`)."""
    global _SESSION_TARGET
    if _SESSION_TARGET is None:
        _SESSION_TARGET = SessionTarget()
    _SESSION_TARGET(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "protocol": protocol_one_input,
    "session": session_one_input,
}


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
    parser.add_argument(
        "--plain",
        type=int,
        metavar="N",
        help="run N seeded random and mutated inputs without atheris",
    )
    args = parser.parse_args(argv)
    target = TARGETS[args.target]
    if args.plain is not None:
        started = time.monotonic()
        for data in mutations([], args.plain, random.Random(args.plain)):
            target(data)
        elapsed = time.monotonic() - started
        sys.stderr.write(
            f"{args.target}: {args.plain} inputs in {elapsed:.1f} s, "
            "no unexpected exception\n"
        )
        return 0
    try:
        import atheris
    except ImportError:
        sys.stderr.write("atheris is not installed: pip install -e '.[fuzz]'\n")
        return 2
    sys.stderr.write(f"fuzzing {args.target} for {args.seconds} s\n")
    started = time.monotonic()
    atheris.instrument_all()  # coverage guidance for our code and its libraries
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={args.seconds}", "-print_final_stats=1"],
        target,
    )
    atheris.Fuzz()
    sys.stderr.write(f"done in {time.monotonic() - started:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
