"""The protocol error tree (docs/protocol.md §7).

Every decoder in :mod:`protocol`, given any bytes, returns a value or raises
:class:`RemoteProtocolError` (or a subclass). Caller mistakes raise
:class:`LocalProtocolError`. Nothing else escapes; a fuzz test guards it.

::

    ProtocolError                 abstract base, never raised itself
    ├── LocalProtocolError        the caller misused the API
    │   └── MessageTooLargeError  an outgoing message exceeds a named limit
    └── RemoteProtocolError       the peer sent something we cannot accept
        ├── MalformedError        bytes that do not parse (also a ValueError)
        ├── UnsupportedVersionError  a peer speaking another protocol version
        ├── ReassemblyError       fragments that cannot form a record
        ├── LimitExceededError    a named receive limit was reached
        ├── HandshakeError        a key exchange failed
        │   └── PeerNotPinnedError   the peer's static key is not the pinned one
        ├── AuthenticationError   an AEAD tag or signature did not verify
        └── ReplayError           a counter or message id seen before

Error text never carries key material or payload bytes: only sizes, codes
and names.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "HandshakeError",
    "LimitExceededError",
    "LocalProtocolError",
    "MalformedError",
    "MessageTooLargeError",
    "PeerNotPinnedError",
    "ProtocolError",
    "ReassemblyError",
    "RemoteProtocolError",
    "ReplayError",
    "UnsupportedVersionError",
]


class ProtocolError(Exception):
    """Base of every protocol error; catch a subclass instead."""

    def __init__(self, msg: str) -> None:
        """Create the error with a human-readable message (no secrets in it)."""
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol cannot do."""


class MessageTooLargeError(LocalProtocolError):
    """An outgoing record or message is larger than its named limit."""

    def __init__(self, msg: str, *, size: int, limit: int) -> None:
        """Record the offending ``size`` and the ``limit`` it exceeded."""
        super().__init__(msg)
        self.size = size
        self.limit = limit


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes we cannot accept; the one error decoders raise."""


class MalformedError(RemoteProtocolError, ValueError):
    """Bytes that do not parse as what they claim to be."""


class UnsupportedVersionError(RemoteProtocolError):
    """A peer speaks a protocol version we do not."""

    def __init__(self, msg: str, *, got: int, supported: int) -> None:
        """Record the version ``got`` and the one ``supported``."""
        super().__init__(msg)
        self.got = got
        self.supported = supported


class ReassemblyError(RemoteProtocolError):
    """Fragments that cannot be reassembled into a record."""


class LimitExceededError(RemoteProtocolError):
    """A named receive limit was reached; the data was dropped."""

    def __init__(self, msg: str, *, limit_name: str, limit: int) -> None:
        """Record which limit (by its name in ``Limits``) and its value."""
        super().__init__(msg)
        self.limit_name = limit_name
        self.limit = limit


class HandshakeError(RemoteProtocolError):
    """A key exchange failed (bad message, low-order key, pin mismatch)."""


class PeerNotPinnedError(HandshakeError):
    """The peer proved a static key that is not pinned (or not the expected one)."""


class AuthenticationError(RemoteProtocolError):
    """An AEAD tag or a signature did not verify."""


class ReplayError(RemoteProtocolError):
    """A counter or message id that was accepted before."""
