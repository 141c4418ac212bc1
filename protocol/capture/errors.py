"""The one error the capture codecs raise on bad input.

::

    protocol.errors.RemoteProtocolError
    └── MalformedError (also ValueError)
        └── CaptureError      bytes that are not a capture we can read

Every reader in :mod:`protocol.capture`, given any bytes, returns a value or
raises :class:`CaptureError`; nothing else escapes (a fuzz test guards it).
Damage *after* a readable header (a file cut short, a bad block length) is
not an error by default: the readers keep what they read before it and say
why they stopped in ``warnings``; with ``strict=True`` it raises instead.
Caller mistakes in the writer raise :class:`~protocol.errors.LocalProtocolError`.
"""

from __future__ import annotations

from protocol.errors import MalformedError

__all__ = ["CaptureError"]


class CaptureError(MalformedError):
    """The bytes are not a capture file we can read.

    Attributes:
        offset: byte offset in the file where reading failed, when known.
    """

    def __init__(self, msg: str, *, offset: int | None = None) -> None:
        """Create the error; ``msg`` names the problem, never payload bytes."""
        super().__init__(msg if offset is None else f"{msg} (at byte {offset})")
        self.offset = offset
