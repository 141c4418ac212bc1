"""Replay expectations: a ``--plaintext`` capture as a script, and a masked diff.

``replay --into-daemon`` plays the glasses' side of a capture recorded with
``sniff --plaintext`` into a real daemon and checks what the daemon writes
against what was recorded. This module is the pure part:

- :func:`script_from_capture` turns the capture's plaintext comments into
  :class:`Step` values, in capture order: messages the glasses sent (to send
  again) and messages the phone wrote (to expect).
- :func:`normalize` renders one message with everything that legitimately
  differs between two runs masked, and :func:`diff_messages` compares two
  message sequences that way.

What is compared: kind, the FINAL / RELIABLE / REALTIME flags, the request id
and the body. What is masked: message ids (random), the RETRANSMIT flag
(timing), times in bodies (CLOCK_SYNC ``1``/``2``/``3``, the ``t`` of
requests, events, telemetry, wake words and presence; clock times such as
``10:42`` in texts), HEARTBEAT bodies and the ids an ACK carries. Record
counters, nonces and ciphertext are never compared: only decrypted messages
are. ACK and HEARTBEAT messages are left out of scripts (each session makes
its own), and so are the glasses' CLOCK_SYNC replies (the emulated glasses
answer the daemon's requests themselves).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import cbor2

from protocol.capture.att import AttOpcode
from protocol.capture.model import Capture
from protocol.capture.plaintext import messages_in_comment
from protocol.constants import MessageFlags, MessageKind
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID
from protocol.message import Message

__all__ = ["MASK", "Step", "diff_messages", "normalize", "script_from_capture"]

MASK: Final = "*"
"""What a masked field shows."""
_SKIPPED: Final = frozenset((MessageKind.ACK, MessageKind.HEARTBEAT))
_TIMES: Final[dict[MessageKind, frozenset[str]]] = {
    MessageKind.CLOCK_SYNC: frozenset(("1", "2", "3")),
    MessageKind.REQUEST: frozenset(("t",)),
    MessageKind.EVENT: frozenset(("t",)),
    MessageKind.TELEMETRY: frozenset(("t",)),
    MessageKind.WAKE_WORD: frozenset(("t",)),
    MessageKind.PRESENCE: frozenset(("t",)),
}
"""Body keys that hold a clock reading, per kind."""
_RAW: Final = frozenset(
    (
        MessageKind.ACK,
        MessageKind.CREDIT,
        MessageKind.HEARTBEAT,
        MessageKind.AUDIO_CHUNK,
        MessageKind.PHOTO_CHUNK,
        MessageKind.RESPONSE_AUDIO,
    )
)
_CHUNKS: Final = frozenset(
    (MessageKind.AUDIO_CHUNK, MessageKind.PHOTO_CHUNK, MessageKind.RESPONSE_AUDIO)
)
_CLOCK_TIME: Final = re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s?[AaPp]\.?[Mm]\.?)?")
_COMPARED_FLAGS: Final = (
    MessageFlags.FINAL | MessageFlags.RELIABLE | MessageFlags.REALTIME
)


@dataclass(frozen=True, slots=True)
class Step:
    """One recorded message: to send (glasses to phone) or to expect.

    Attributes:
        t: seconds since the capture's first plaintext packet.
        send: a message the glasses sent (play it again), or None.
        expect: a message the phone wrote (check it), or None.
        packet: the capture packet that carried it (tshark frame - 1).
    """

    t: float
    send: Message | None = None
    expect: Message | None = None
    packet: int = 0


def script_from_capture(capture: Capture, connection: int | None = None) -> list[Step]:
    """The plaintext of one connection as a script, in capture order.

    Args:
        capture: a capture recorded with ``sniff --plaintext``.
        connection: index of the connection to take; None: the first one
            whose packets carry plaintext comments.

    Returns:
        The steps; empty if the connection has no plaintext comments.

    Raises:
        CaptureError: a plaintext comment does not parse.
    """
    if connection is None:
        with_text = [op.connection for op in capture.att if op.comment]
        if not with_text:
            return []
        connection = with_text[0]
    conn = capture.connections[connection]
    tx = {h for h, u in conn.uuids if u == TX_CHAR_UUID}
    rx = {h for h, u in conn.uuids if u == RX_CHAR_UUID}
    steps: list[Step] = []
    first: int | None = None
    for op in capture.att:
        if op.connection != connection or not op.comment:
            continue
        up = op.opcode in (AttOpcode.HANDLE_VALUE_NTF, AttOpcode.HANDLE_VALUE_IND)
        down = op.opcode in (AttOpcode.WRITE_CMD, AttOpcode.WRITE_REQ)
        if not (up and op.handle in tx) and not (down and op.handle in rx):
            continue
        if first is None:
            first = op.timestamp_ns
        t = (op.timestamp_ns - first) / 1e9
        for message in messages_in_comment(op.comment):
            if message.kind in _SKIPPED:
                continue
            if up:
                if message.kind is not MessageKind.CLOCK_SYNC:
                    steps.append(Step(t, send=message, packet=op.packet))
            else:
                steps.append(Step(t, expect=message, packet=op.packet))
    return steps


def _mask_text(value: object) -> object:
    if isinstance(value, str):
        return _CLOCK_TIME.sub(MASK, value)
    return value


def _render(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return repr(value)


def _body(message: Message) -> str:
    kind = message.kind
    body = message.body
    if kind is MessageKind.HEARTBEAT:
        return MASK
    if kind is MessageKind.ACK:
        return f"{len(body) // 16} id(s)"
    if kind in _CHUNKS:
        index = int.from_bytes(body[:4], "big") if len(body) >= 4 else None
        digest = hashlib.sha256(body[4:]).hexdigest()[:16]
        return f"chunk {index} {max(0, len(body) - 4)} B sha256:{digest}"
    if kind in _RAW:
        return body.hex()
    try:
        fields = cbor2.loads(body)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError):
        fields = None
    if not isinstance(fields, dict):
        return f"not CBOR, {len(body)} B sha256:{hashlib.sha256(body).hexdigest()[:16]}"
    times = _TIMES.get(kind, frozenset())
    parts = []
    for key in sorted(fields, key=str):
        value = MASK if key in times else _render(_mask_text(fields[key]))
        parts.append(f"{key}={value}")
    return "{" + ", ".join(parts) + "}"


def normalize(message: Message) -> str:
    """One line for ``message`` with ids, times and retransmission masked."""
    flags = message.flags & _COMPARED_FLAGS
    names = "|".join(f.name for f in MessageFlags if f and f in flags and f.name)
    return (
        f"{message.kind.name} rid={message.request_id} flags={names or 'NONE'} "
        f"id={MASK} {_body(message)}"
    )


def diff_messages(
    expected: Sequence[Message],
    observed: Sequence[Message],
    *,
    expected_name: str = "recorded",
    observed_name: str = "daemon",
) -> list[str]:
    """A unified diff of the normalized messages; empty when they agree."""
    return list(
        difflib.unified_diff(
            [normalize(m) for m in expected],
            [normalize(m) for m in observed],
            fromfile=expected_name,
            tofile=observed_name,
            lineterm="",
            n=2,
        )
    )
