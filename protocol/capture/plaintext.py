"""Decrypted messages carried as pcapng packet comments (``sniff --plaintext``).

A capture records ATT values as they crossed the air, so DATA records are
ciphertext. For debugging, ``glasses-relay sniff --plaintext`` adds the
messages a record carried as a comment on the packet whose fragment
completed that record, one line per message::

    glasses-relay message: REQUEST rid=7 flags=RELIABLE 34 B 1002a1b2...

The last word of a line is the whole encoded message in hex
(docs/protocol.md §4.1: header and body), so the comment alone gives every
field back; the words before it are for people. ``replay --decode`` and
``replay --into-daemon`` read these lines, and the Wireshark dissector
(tools/wireshark/glasses_relay.lua) shows them as message fields. Keys are
never part of a comment.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from typing import Final

from protocol.capture.errors import CaptureError
from protocol.constants import MessageFlags
from protocol.errors import RemoteProtocolError
from protocol.message import Message, decode_messages

__all__ = ["PLAINTEXT_PREFIX", "messages_in_comment", "plaintext_comment"]

PLAINTEXT_PREFIX: Final = "glasses-relay message:"
"""Every plaintext line starts with this (the Lua dissector looks for it)."""


def _flag_names(flags: MessageFlags) -> str:
    names = [f.name for f in MessageFlags if f and f in flags and f.name]
    return "|".join(names) if names else "NONE"


def plaintext_comment(messages: Iterable[Message]) -> str:
    """The comment lines for ``messages`` (empty string for none)."""
    lines = [
        f"{PLAINTEXT_PREFIX} {m.kind.name} rid={m.request_id} "
        f"flags={_flag_names(m.flags)} {len(m.body)} B {m.encode().hex()}"
        for m in messages
    ]
    return "\n".join(lines)


def messages_in_comment(comment: str | None) -> list[Message]:
    """The messages in a packet comment's plaintext lines, in order.

    Lines without :data:`PLAINTEXT_PREFIX` are ignored, so other comments
    may share the packet.

    Raises:
        CaptureError: a plaintext line does not end in an encoded message.
    """
    if not comment:
        return []
    out: list[Message] = []
    for line in comment.splitlines():
        if not line.startswith(PLAINTEXT_PREFIX):
            continue
        words = line.split()
        try:
            raw = binascii.unhexlify(words[-1])
            out += decode_messages(raw)
        except (binascii.Error, ValueError, RemoteProtocolError) as exc:
            raise CaptureError("a plaintext comment line is not a message") from exc
    return out
