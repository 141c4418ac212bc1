"""Run Noise test vectors in the cacophony JSON format against :mod:`protocol.noise`.

Usage::

    python -m protocol.noise_vectors PATH [--verbose]

``PATH`` is any file of the cacophony format (SECURITY.md §1.1): a top-level
``{"vectors": [...]}``, each vector naming its protocol in ``protocol_name``
(or ``name``, as snow's file does) with hex fields ``init_prologue``,
``init_psks``, ``init_static``, ``init_ephemeral``, ``init_remote_static``,
the same with ``resp_``, an optional ``handshake_hash`` and any number of
``messages`` (``payload``, ``ciphertext``).

Both sides run each vector. Handshake messages alternate, initiator first;
after the handshake, transport messages keep alternating under the
``split()`` cipher states, except in one-way patterns, where every message
goes from initiator to responder. A vector passes when every sent ciphertext
matches, every payload is recovered and both sides end with
``handshake_hash``. Vectors whose pattern or primitives the engine does not
support are skipped. The last line printed is ``N passed, M failed, K
skipped``; the exit status is 1 on any failure, 2 on an unreadable file.

Only :func:`main` reads files; :func:`run_document` and :func:`run_vector`
work on parsed JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from protocol.errors import LocalProtocolError, MalformedError, ProtocolError
from protocol.noise import HandshakeState, ProtocolName, parse_protocol_name

__all__ = ["Outcome", "Summary", "VectorResult", "main", "run_document", "run_vector"]


class Outcome(IntEnum):
    """How one vector ended."""

    PASSED = 0
    FAILED = 1
    SKIPPED = 2


@dataclass(frozen=True, slots=True)
class VectorResult:
    """The result of one vector.

    Attributes:
        index: Position of the vector in the file, from 0.
        name: Its protocol name ("" if it has none).
        outcome: Passed, failed or skipped.
        reason: Why it failed or was skipped; "" when it passed.
    """

    index: int
    name: str
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    """The results of a whole file.

    Attributes:
        results: One result per vector, in file order.
    """

    results: tuple[VectorResult, ...]

    def count(self, outcome: Outcome) -> int:
        """Return how many vectors ended with ``outcome``."""
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def passed(self) -> int:
        """Number of passed vectors."""
        return self.count(Outcome.PASSED)

    @property
    def failed(self) -> int:
        """Number of failed vectors."""
        return self.count(Outcome.FAILED)

    @property
    def skipped(self) -> int:
        """Number of skipped vectors."""
        return self.count(Outcome.SKIPPED)

    def names(self, outcome: Outcome) -> frozenset[str]:
        """Return the protocol names of the vectors that ended with ``outcome``."""
        return frozenset(r.name for r in self.results if r.outcome is outcome)

    def line(self) -> str:
        """Return the summary line, ``N passed, M failed, K skipped``."""
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def _hex(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedError(f"{field} is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedError(f"{field} is not valid hex") from None


def _optional_hex(vector: Mapping[str, object], field: str) -> bytes | None:
    value = vector.get(field)
    return None if value is None else _hex(value, field)


def _required_hex(vector: Mapping[str, object], field: str) -> bytes:
    value = vector.get(field)
    if value is None:
        raise MalformedError(f"vector lacks {field}")
    return _hex(value, field)


def _psks(vector: Mapping[str, object], field: str) -> list[bytes]:
    value = vector.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedError(f"{field} is not a list")
    return [_hex(item, field) for item in value]


def _messages(vector: Mapping[str, object]) -> list[tuple[bytes, bytes]]:
    value = vector.get("messages")
    if not isinstance(value, list):
        raise MalformedError("vector lacks a messages list")
    messages: list[tuple[bytes, bytes]] = []
    for item in value:
        if not isinstance(item, dict):
            raise MalformedError("a message is not an object")
        payload = _hex(item.get("payload"), "payload")
        messages.append((payload, _hex(item.get("ciphertext"), "ciphertext")))
    return messages


def _side(
    proto: ProtocolName, vector: Mapping[str, object], *, initiator: bool
) -> HandshakeState:
    """Build one side, passing only the keys its pattern takes."""
    prefix = "init_" if initiator else "resp_"
    pattern = proto.pattern
    static = remote = ephemeral = None
    if pattern.needs_local_static(initiator=initiator):
        static = _required_hex(vector, prefix + "static")
    if pattern.needs_remote_static(initiator=initiator):
        remote = _required_hex(vector, prefix + "remote_static")
    if pattern.sends_ephemeral(initiator=initiator):
        ephemeral = _required_hex(vector, prefix + "ephemeral")
    return HandshakeState(
        proto,
        initiator=initiator,
        prologue=_optional_hex(vector, prefix + "prologue") or b"",
        static_key=static,
        remote_static=remote,
        psks=_psks(vector, prefix + "psks") if pattern.psk_count else (),
        ephemeral_key=ephemeral,
    )


def _check(proto: ProtocolName, vector: Mapping[str, object]) -> str:
    """Run one supported vector; return "" if it passed, else the reason."""
    init = _side(proto, vector, initiator=True)
    resp = _side(proto, vector, initiator=False)
    expected_hash = _optional_hex(vector, "handshake_hash")
    transport = None
    for i, (payload, ciphertext) in enumerate(_messages(vector)):
        if transport is None:
            writer, reader = (init, resp) if init.is_our_turn else (resp, init)
            if writer.write_message(payload) != ciphertext:
                return f"message {i}: handshake ciphertext differs"
            if reader.read_message(ciphertext) != payload:
                return f"message {i}: handshake payload differs"
            if not init.is_complete:
                continue
            if init.handshake_hash != resp.handshake_hash:
                return "the two sides' handshake hashes differ"
            if expected_hash is not None and init.handshake_hash != expected_hash:
                return "handshake_hash differs"
            transport = (init.split(), resp.split())
            continue
        (init_c1, init_c2), (resp_c1, resp_c2) = transport
        if proto.pattern.is_one_way or i % 2 == 0:
            sender, receiver = init_c1, resp_c1
        else:
            sender, receiver = resp_c2, init_c2
        if sender.encrypt_with_ad(b"", payload) != ciphertext:
            return f"message {i}: transport ciphertext differs"
        if receiver.decrypt_with_ad(b"", ciphertext) != payload:
            return f"message {i}: transport payload differs"
    if transport is None and expected_hash is not None:
        return "messages end before the handshake completes"
    return ""


def run_vector(vector: object, index: int = 0) -> VectorResult:
    """Run one parsed vector through both sides of the engine.

    Args:
        vector: One element of the file's ``vectors`` list.
        index: Its position, for reporting.

    Returns:
        Passed, failed (with a reason) or skipped (unsupported protocol).
    """
    if not isinstance(vector, dict):
        return VectorResult(index, "", Outcome.FAILED, "vector is not an object")
    name = vector.get("protocol_name", vector.get("name"))
    if not isinstance(name, str):
        return VectorResult(index, "", Outcome.FAILED, "vector lacks protocol_name")
    try:
        proto = parse_protocol_name(name)
    except LocalProtocolError as exc:
        return VectorResult(index, name, Outcome.SKIPPED, str(exc))
    try:
        reason = _check(proto, vector)
    except ProtocolError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        return VectorResult(index, name, Outcome.FAILED, reason)
    return VectorResult(index, name, Outcome.PASSED)


def run_document(document: object) -> Summary:
    """Run every vector of a parsed cacophony-format document.

    Args:
        document: The parsed JSON, ``{"vectors": [...]}``.

    Returns:
        The per-vector results.

    Raises:
        MalformedError: The document has no ``vectors`` list.
    """
    if not isinstance(document, dict) or not isinstance(
        vectors := document.get("vectors"), list
    ):
        raise MalformedError('expected a JSON object with a "vectors" list')
    return Summary(tuple(run_vector(v, i) for i, v in enumerate(vectors)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the vectors in a file and print the results; the file I/O lives here.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        0 if no vector failed, 1 if one did, 2 if the file cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="python -m protocol.noise_vectors",
        description="Run Noise test vectors (cacophony JSON format).",
    )
    parser.add_argument("path", type=Path, help="vector file")
    parser.add_argument("-v", "--verbose", action="store_true", help="list all")
    args = parser.parse_args(argv)
    path: Path = args.path
    verbose: bool = args.verbose
    try:
        document: object = json.loads(path.read_text(encoding="utf-8"))
        summary = run_document(document)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"cannot run {path}: {exc}\n")
        return 2
    for result in summary.results:
        if result.outcome is Outcome.FAILED:
            sys.stderr.write(f"FAIL #{result.index} {result.name}: {result.reason}\n")
        elif verbose:
            reason = f": {result.reason}" if result.reason else ""
            line = f"{result.outcome.name} #{result.index} {result.name}{reason}"
            sys.stdout.write(line + "\n")
    sys.stdout.write(summary.line() + "\n")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
