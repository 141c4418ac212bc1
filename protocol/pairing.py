"""Pairing Flow A: the QR payload and the PSK it keys (docs/security.md §3).

The phone shows a QR code carrying its static X25519 public key, a
single-use 128-bit secret, a pairing id and an expiry. The glasses read it
(with their camera; the emulated glasses read the same payload from the
phone's state directory), and both run ``Noise_XXpsk3`` with
``psk = HKDF-SHA256(secret, info=b"pair/v1" || pairing_id)``; the glasses
also check that the phone's static key is the one in the QR code. A short
numeric code is never used as a PSK.

QR text: ``GR1:`` followed by unpadded base64url of the CBOR map
``{v: 1, k: phone public key (32 B), s: secret (16 B), i: pairing id (8 B),
x: expiry (Unix seconds)}``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Final

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import LocalProtocolError, MalformedError

__all__ = ["QR_PREFIX", "PairingPayload", "derive_psk"]

QR_PREFIX: Final = "GR1:"
_VERSION: Final = 1
SECRET_SIZE: Final = 16
PAIRING_ID_SIZE: Final = 8


def derive_psk(secret: bytes, pairing_id: bytes) -> bytes:
    """The 32-byte Noise PSK of one pairing.

    Raises:
        LocalProtocolError: the secret is not 16 bytes or the id not 8.
    """
    if len(secret) != SECRET_SIZE or len(pairing_id) != PAIRING_ID_SIZE:
        raise LocalProtocolError("pairing secret is 16 bytes, pairing id 8")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"pair/v1" + pairing_id
    ).derive(secret)


@dataclass(frozen=True, slots=True)
class PairingPayload:
    """What the phone's QR code carries."""

    phone_public: bytes
    secret: bytes = field(repr=False)
    pairing_id: bytes
    expires_at: int

    def __post_init__(self) -> None:
        """Check sizes."""
        if (
            len(self.phone_public) != 32
            or len(self.secret) != SECRET_SIZE
            or len(self.pairing_id) != PAIRING_ID_SIZE
        ):
            raise LocalProtocolError("bad pairing payload field sizes")

    @property
    def psk(self) -> bytes:
        """The Noise PSK this payload keys."""
        return derive_psk(self.secret, self.pairing_id)

    def is_expired(self, now_unix: float) -> bool:
        """Whether the pairing window has closed at ``now_unix``."""
        return now_unix >= self.expires_at

    def encode(self) -> str:
        """Return the QR text."""
        body = cbor2.dumps(
            {
                "v": _VERSION,
                "k": self.phone_public,
                "s": self.secret,
                "i": self.pairing_id,
                "x": self.expires_at,
            },
            canonical=True,
        )
        return QR_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> PairingPayload:
        """Parse QR text.

        Raises:
            MalformedError: not a glasses-relay pairing code, or a bad one.
        """
        if not text.startswith(QR_PREFIX):
            raise MalformedError("not a glasses-relay pairing code")
        raw = text[len(QR_PREFIX) :].strip()
        try:
            body = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            doc = cbor2.loads(body, max_depth=2, allow_indefinite=False)
        except (binascii.Error, ValueError, cbor2.CBORError):
            raise MalformedError("pairing code does not decode") from None
        if not isinstance(doc, dict) or doc.get("v") != _VERSION:
            raise MalformedError("pairing code of an unknown version")
        values = (doc.get("k"), doc.get("s"), doc.get("i"), doc.get("x"))
        if (
            not all(isinstance(v, bytes) for v in values[:3])
            or type(values[3]) is not int
        ):
            raise MalformedError("pairing code fields have wrong types")
        try:
            return cls(values[0], values[1], values[2], values[3])  # type: ignore[arg-type]
        except LocalProtocolError:
            raise MalformedError("pairing code fields have wrong sizes") from None
