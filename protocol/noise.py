"""The Noise Protocol Framework, revision 34, on ``cryptography`` primitives.

This is the in-house Noise core of SECURITY.md §1 ("Noise core") and §1.1:
:class:`CipherState`, :class:`SymmetricState` and a :class:`HandshakeState`
driven by the pattern table :data:`PATTERNS`. Section numbers (``§5.1``) refer
to the Noise specification, revision 34 (noiseprotocol/noise_spec ``noise.md``).

Supported: every fundamental pattern (§7.5), the one-way patterns ``N``, ``K``
and ``X`` (§7.4), the deferred patterns (§7.6), and ``psk`` modifiers,
several joined with ``+`` (§9.4); DH ``25519`` and ``448``, ciphers
``ChaChaPoly`` and ``AESGCM``, hashes ``SHA256``, ``SHA512``, ``BLAKE2s`` and
``BLAKE2b`` (§12). Not supported: the ``fallback`` modifier and pre-message
ephemerals (§10.2), and compound algorithm names (``25519+Kyber``).

The module is sans-I/O: bytes in, bytes out, no clock, no logging. Errors:

* :class:`~protocol.errors.HandshakeError`: a peer's handshake message has a
  bad length, arrives out of turn, or carries a low-order public key.
* :class:`~protocol.errors.AuthenticationError`: an AEAD tag did not verify.
* :class:`~protocol.errors.LocalProtocolError`: the caller misused the API
  (wrong turn to write, missing keys, nonce exhausted, unsupported name);
  :class:`~protocol.errors.MessageTooLargeError` for a message over 65535
  bytes.

No error text carries key material or payload bytes.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from types import MappingProxyType
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x448 import (
    X448PrivateKey,
    X448PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import (
    AuthenticationError,
    HandshakeError,
    LocalProtocolError,
    MessageTooLargeError,
)

__all__ = [
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "PATTERNS",
    "PSK_LEN",
    "TAG_LEN",
    "CipherName",
    "CipherState",
    "DHName",
    "HandshakePattern",
    "HandshakeState",
    "HashName",
    "ProtocolName",
    "SymmetricState",
    "Token",
    "parse_protocol_name",
]

MAX_MESSAGE_LEN: Final = 65535
"""Largest Noise message, handshake or transport, in bytes (§3)."""
TAG_LEN: Final = 16
"""AEAD authentication tag length (§5.1)."""
KEY_LEN: Final = 32
"""Cipher key length (§4.2)."""
PSK_LEN: Final = 32
"""Pre-shared key length (§9)."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce: never used to encrypt a message; also used by Rekey (§5.1)."""

_NONCE_CHACHA: Final = struct.Struct("<4xQ")  # 32 zero bits || LE64(n), §12.3
_NONCE_AESGCM: Final = struct.Struct(">4xQ")  # 32 zero bits || BE64(n), §12.4
_REKEY_ZEROS: Final = bytes(KEY_LEN)


class DHName(StrEnum):
    """A Diffie-Hellman function, by its name in a protocol name (§12.1, §12.2)."""

    X25519 = "25519"
    X448 = "448"

    @property
    def dhlen(self) -> int:
        """Length of a public key and of a DH output, in bytes."""
        return 32 if self is DHName.X25519 else 56


class CipherName(StrEnum):
    """An AEAD cipher function, by its name in a protocol name (§12.3, §12.4)."""

    CHACHAPOLY = "ChaChaPoly"
    AESGCM = "AESGCM"


class HashName(StrEnum):
    """A hash function, by its name in a protocol name (§12.5 to §12.8)."""

    SHA256 = "SHA256"
    SHA512 = "SHA512"
    BLAKE2S = "BLAKE2s"
    BLAKE2B = "BLAKE2b"

    @property
    def hashlen(self) -> int:
        """Digest length in bytes (HASHLEN)."""
        return 32 if self in (HashName.SHA256, HashName.BLAKE2S) else 64


class Token(StrEnum):
    """A handshake pattern token (§7.1)."""

    E = "e"
    S = "s"
    EE = "ee"
    ES = "es"
    SE = "se"
    SS = "ss"
    PSK = "psk"


_DH_TOKENS: Final = frozenset({Token.EE, Token.ES, Token.SE, Token.SS})


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern: pre-messages and message token lists (§7).

    Messages alternate, the initiator sending the first one.

    Attributes:
        name: Pattern name with its modifiers, e.g. ``"XXpsk3"``.
        initiator_pre: Tokens of the initiator's pre-message (``-> s``).
        responder_pre: Tokens of the responder's pre-message (``<- s``).
        messages: One tuple of tokens per handshake message.
    """

    name: str
    initiator_pre: tuple[Token, ...]
    responder_pre: tuple[Token, ...]
    messages: tuple[tuple[Token, ...], ...]

    @property
    def is_one_way(self) -> bool:
        """Whether this is a one-way pattern (``N``, ``K``, ``X``; §7.4)."""
        return len(self.messages) == 1

    @property
    def psk_count(self) -> int:
        """Number of ``psk`` tokens, i.e. of PSKs a handshake needs (§9)."""
        return sum(message.count(Token.PSK) for message in self.messages)

    def _sent_by(self, *, initiator: bool) -> tuple[Token, ...]:
        first = 0 if initiator else 1
        return tuple(t for message in self.messages[first::2] for t in message)

    def needs_local_static(self, *, initiator: bool) -> bool:
        """Whether that side needs its own static key pair.

        Args:
            initiator: Ask for the initiator (True) or the responder (False).

        Returns:
            True if the side's pre-message or messages hold an ``s`` token.
        """
        pre = self.initiator_pre if initiator else self.responder_pre
        return Token.S in pre or Token.S in self._sent_by(initiator=initiator)

    def needs_remote_static(self, *, initiator: bool) -> bool:
        """Whether that side must know the peer's static public key in advance.

        Args:
            initiator: Ask for the initiator (True) or the responder (False).

        Returns:
            True if the peer's pre-message holds an ``s`` token.
        """
        return Token.S in (self.responder_pre if initiator else self.initiator_pre)

    def sends_ephemeral(self, *, initiator: bool) -> bool:
        """Whether that side generates and sends an ephemeral key (``e``).

        Args:
            initiator: Ask for the initiator (True) or the responder (False).

        Returns:
            True if the side's messages hold an ``e`` token.
        """
        return Token.E in self._sent_by(initiator=initiator)

    def with_psks(self, positions: Sequence[int]) -> HandshakePattern:
        """Apply ``psk`` modifiers (§9.4): ``psk0`` opens message 1, ``pskN`` ends N.

        Args:
            positions: The modifier numbers, e.g. ``(0, 2)`` for ``psk0+psk2``.

        Returns:
            The modified pattern, named e.g. ``"XXpsk0+psk2"``.

        Raises:
            LocalProtocolError: A position is repeated or past the last message.
        """
        messages = list(self.messages)
        for pos in positions:
            if pos > len(messages):
                raise LocalProtocolError(
                    f"psk{pos} is past the last message of pattern {self.name}"
                )
            if pos == 0:
                messages[0] = (Token.PSK, *messages[0])
            else:
                messages[pos - 1] = (*messages[pos - 1], Token.PSK)
        if len(set(positions)) != len(positions):
            raise LocalProtocolError("a psk modifier is repeated")
        suffix = "+".join(f"psk{pos}" for pos in positions)
        return HandshakePattern(
            self.name + suffix, self.initiator_pre, self.responder_pre, tuple(messages)
        )


def _pattern(name: str, pre: tuple[str, str], *messages: str) -> HandshakePattern:
    def tokens(text: str) -> tuple[Token, ...]:
        return tuple(Token(t.strip()) for t in text.split(",") if t.strip())

    return HandshakePattern(
        name, tokens(pre[0]), tokens(pre[1]), tuple(tokens(m) for m in messages)
    )


_NO_PRE: Final = ("", "")
_PRE_RS: Final = ("", "s")  # "<- s ..." : the responder's static is known
_PRE_IS: Final = ("s", "")  # "-> s ..." : the initiator's static is known
_PRE_BOTH: Final = ("s", "s")

# The pattern table (§7.4, §7.5, §7.6). Messages alternate, initiator first.
PATTERNS: Final[Mapping[str, HandshakePattern]] = MappingProxyType(
    {
        p.name: p
        for p in (
            # One-way (§7.4).
            _pattern("N", _PRE_RS, "e, es"),
            _pattern("K", _PRE_BOTH, "e, es, ss"),
            _pattern("X", _PRE_RS, "e, es, s, ss"),
            # Fundamental interactive (§7.5).
            _pattern("NN", _NO_PRE, "e", "e, ee"),
            _pattern("NK", _PRE_RS, "e, es", "e, ee"),
            _pattern("NX", _NO_PRE, "e", "e, ee, s, es"),
            _pattern("XN", _NO_PRE, "e", "e, ee", "s, se"),
            _pattern("XK", _PRE_RS, "e, es", "e, ee", "s, se"),
            _pattern("XX", _NO_PRE, "e", "e, ee, s, es", "s, se"),
            _pattern("KN", _PRE_IS, "e", "e, ee, se"),
            _pattern("KK", _PRE_BOTH, "e, es, ss", "e, ee, se"),
            _pattern("KX", _PRE_IS, "e", "e, ee, se, s, es"),
            _pattern("IN", _NO_PRE, "e, s", "e, ee, se"),
            _pattern("IK", _PRE_RS, "e, es, s, ss", "e, ee, se"),
            _pattern("IX", _NO_PRE, "e, s", "e, ee, se, s, es"),
            # Deferred (§7.6).
            _pattern("NK1", _PRE_RS, "e", "e, ee, es"),
            _pattern("NX1", _NO_PRE, "e", "e, ee, s", "es"),
            _pattern("X1N", _NO_PRE, "e", "e, ee", "s", "se"),
            _pattern("X1K", _PRE_RS, "e, es", "e, ee", "s", "se"),
            _pattern("XK1", _PRE_RS, "e", "e, ee, es", "s, se"),
            _pattern("X1K1", _PRE_RS, "e", "e, ee, es", "s", "se"),
            _pattern("X1X", _NO_PRE, "e", "e, ee, s, es", "s", "se"),
            _pattern("XX1", _NO_PRE, "e", "e, ee, s", "es, s, se"),
            _pattern("X1X1", _NO_PRE, "e", "e, ee, s", "es, s", "se"),
            _pattern("K1N", _PRE_IS, "e", "e, ee", "se"),
            _pattern("K1K", _PRE_BOTH, "e, es", "e, ee", "se"),
            _pattern("KK1", _PRE_BOTH, "e", "e, ee, se, es"),
            _pattern("K1K1", _PRE_BOTH, "e", "e, ee, es", "se"),
            _pattern("K1X", _PRE_IS, "e", "e, ee, s, es", "se"),
            _pattern("KX1", _PRE_IS, "e", "e, ee, se, s", "es"),
            _pattern("K1X1", _PRE_IS, "e", "e, ee, s", "se, es"),
            _pattern("I1N", _NO_PRE, "e, s", "e, ee", "se"),
            _pattern("I1K", _PRE_RS, "e, es, s", "e, ee", "se"),
            _pattern("IK1", _PRE_RS, "e, s", "e, ee, se, es"),
            _pattern("I1K1", _PRE_RS, "e, s", "e, ee, es", "se"),
            _pattern("I1X", _NO_PRE, "e, s", "e, ee, s, es", "se"),
            _pattern("IX1", _NO_PRE, "e, s", "e, ee, se, s", "es"),
            _pattern("I1X1", _NO_PRE, "e, s", "e, ee, s", "se, es"),
        )
    }
)


@dataclass(frozen=True, slots=True)
class ProtocolName:
    """A parsed Noise protocol name (§8), e.g. ``Noise_XXpsk3_25519_ChaChaPoly_SHA256``.

    Attributes:
        name: The full protocol name, hashed into ``h`` at the start.
        pattern: The handshake pattern with its modifiers applied.
        dh: The DH function.
        cipher: The cipher function.
        hash: The hash function.
    """

    name: str
    pattern: HandshakePattern
    dh: DHName
    cipher: CipherName
    hash: HashName


_PATTERN_RE: Final = re.compile(r"(?P<base>[A-Z][A-Z0-9]*)(?P<modifiers>[a-z].*)?")
_PSK_RE: Final = re.compile(r"psk(?P<pos>0|[1-9][0-9]{0,2})")


def parse_protocol_name(name: str) -> ProtocolName:
    """Parse and check a protocol name such as ``Noise_XX_25519_ChaChaPoly_SHA256``.

    Call it to validate configuration early; :class:`HandshakeState` also
    accepts the string and calls it.

    Args:
        name: ``Noise_<pattern><modifiers>_<dh>_<cipher>_<hash>`` (§8).

    Returns:
        The parsed name.

    Raises:
        LocalProtocolError: The name is malformed or names an unsupported
            pattern, modifier or algorithm; the message says which piece.
    """
    parts = name.split("_")
    if not name.isascii() or len(parts) != 5 or parts[0] != "Noise":
        raise LocalProtocolError(
            "protocol name must look like Noise_<pattern>_<dh>_<cipher>_<hash>"
        )
    _, pattern_text, dh_text, cipher_text, hash_text = parts
    match = _PATTERN_RE.fullmatch(pattern_text)
    if match is None or match["base"] not in PATTERNS:
        raise LocalProtocolError(f"unsupported handshake pattern {pattern_text!r}")
    pattern = PATTERNS[match["base"]]
    if match["modifiers"] is not None:
        positions: list[int] = []
        for modifier in match["modifiers"].split("+"):
            psk = _PSK_RE.fullmatch(modifier)
            if psk is None:
                raise LocalProtocolError(f"unsupported pattern modifier {modifier!r}")
            positions.append(int(psk["pos"]))
        pattern = pattern.with_psks(positions)
    try:
        dh = DHName(dh_text)
    except ValueError:
        raise LocalProtocolError(f"unsupported DH function {dh_text!r}") from None
    try:
        cipher = CipherName(cipher_text)
    except ValueError:
        raise LocalProtocolError(f"unsupported cipher {cipher_text!r}") from None
    try:
        hash_name = HashName(hash_text)
    except ValueError:
        raise LocalProtocolError(f"unsupported hash {hash_text!r}") from None
    return ProtocolName(name, pattern, dh, cipher, hash_name)


# --- primitives ------------------------------------------------------------

_PrivateKey = X25519PrivateKey | X448PrivateKey
_Aead = ChaCha20Poly1305 | AESGCM


def _private_from_bytes(dh: DHName, data: bytes) -> _PrivateKey:
    if dh is DHName.X25519:
        return X25519PrivateKey.from_private_bytes(data)
    return X448PrivateKey.from_private_bytes(data)


def _generate(dh: DHName, randbytes: Callable[[int], bytes] | None) -> _PrivateKey:
    if randbytes is not None:
        return _private_from_bytes(dh, randbytes(dh.dhlen))
    if dh is DHName.X25519:
        return X25519PrivateKey.generate()
    return X448PrivateKey.generate()


def _public_bytes(key: _PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _exchange(private: _PrivateKey, public: bytes) -> bytes:
    """DH(private, public); raises ValueError for a low-order ``public``."""
    if isinstance(private, X25519PrivateKey):
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    return private.exchange(X448PublicKey.from_public_bytes(public))


@cache
def _probe_key(dh: DHName) -> _PrivateKey:
    # A fixed, public scalar. Clamping makes it a multiple of the cofactor, so
    # DH with it gives the all-zero output (ValueError) exactly when the peer's
    # point has small order, as any later DH with a real key would.
    return _private_from_bytes(dh, bytes(range(1, dh.dhlen + 1)))


def _is_low_order(dh: DHName, public: bytes) -> bool:
    try:
        _exchange(_probe_key(dh), public)
    except ValueError:
        return True
    return False


def _hash_algorithm(name: HashName) -> hashes.HashAlgorithm:
    if name is HashName.SHA256:
        return hashes.SHA256()
    if name is HashName.SHA512:
        return hashes.SHA512()
    if name is HashName.BLAKE2S:
        return hashes.BLAKE2s(32)
    return hashes.BLAKE2b(64)


def _new_aead(cipher: CipherName, key: bytes) -> _Aead:
    if cipher is CipherName.CHACHAPOLY:
        return ChaCha20Poly1305(key)
    return AESGCM(key)


# --- CipherState (§5.1) ----------------------------------------------------


class CipherState:
    """A key ``k`` and an explicit 64-bit nonce ``n`` (§5.1).

    The two objects :meth:`HandshakeState.split` returns are the transport
    ciphers. :attr:`n` counts messages; :meth:`set_nonce` lets a receiver take
    ``n`` from a frame header (§11.4; the caller keeps the replay window,
    SECURITY.md "Replay"). ``n = 2**64 - 1`` is reserved and never used.
    """

    __slots__ = ("_aead", "_cipher", "_n")

    def __init__(
        self, cipher: CipherName = CipherName.CHACHAPOLY, key: bytes | None = None
    ) -> None:
        """Create a cipher state, keyed if ``key`` is given (InitializeKey).

        Args:
            cipher: The AEAD to use.
            key: A 32-byte key, or None for an empty key (no encryption).

        Raises:
            LocalProtocolError: ``key`` is not 32 bytes.
        """
        self._cipher = cipher
        self._aead: _Aead | None = None
        self._n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """Set ``k = key`` and ``n = 0`` (InitializeKey, §5.1).

        Args:
            key: A 32-byte key, or None to empty the key.

        Raises:
            LocalProtocolError: ``key`` is not 32 bytes.
        """
        if key is not None and len(key) != KEY_LEN:
            raise LocalProtocolError(
                f"cipher key must be {KEY_LEN} bytes, got {len(key)}"
            )
        self._aead = None if key is None else _new_aead(self._cipher, key)
        self._n = 0

    @property
    def has_key(self) -> bool:
        """Whether ``k`` is non-empty (HasKey)."""
        return self._aead is not None

    @property
    def n(self) -> int:
        """The nonce the next encrypt or decrypt will use."""
        return self._n

    def set_nonce(self, nonce: int) -> None:
        """Set ``n`` (SetNonce, §5.1); e.g. from a received frame's counter.

        Args:
            nonce: 0 to 2**64 - 1 (the latter makes the next operation fail).

        Raises:
            LocalProtocolError: ``nonce`` is outside 0 .. 2**64 - 1.
        """
        if not 0 <= nonce <= MAX_NONCE:
            raise LocalProtocolError("nonce must be in 0 .. 2**64 - 1")
        self._n = nonce

    def _nonce(self, n: int) -> bytes:
        if self._cipher is CipherName.CHACHAPOLY:
            return _NONCE_CHACHA.pack(n)
        return _NONCE_AESGCM.pack(n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt with nonce ``n`` and associated data ``ad``, then ``n += 1``.

        Without a key the plaintext is returned unchanged (EncryptWithAd, §5.1).

        Args:
            ad: Associated data, authenticated but not encrypted.
            plaintext: The message; at most 65535 bytes with the tag.

        Returns:
            Ciphertext with a 16-byte tag appended.

        Raises:
            MessageTooLargeError: The result would exceed 65535 bytes.
            LocalProtocolError: The nonce is exhausted; rekey or re-handshake.
        """
        aead = self._aead
        size = len(plaintext) + (0 if aead is None else TAG_LEN)
        if size > MAX_MESSAGE_LEN:
            raise MessageTooLargeError(
                f"Noise message of {size} bytes exceeds {MAX_MESSAGE_LEN}",
                size=size,
                limit=MAX_MESSAGE_LEN,
            )
        if aead is None:
            return plaintext
        if self._n == MAX_NONCE:
            raise LocalProtocolError("nonce exhausted; start a new handshake")
        ciphertext = aead.encrypt(self._nonce(self._n), plaintext, ad)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt with nonce ``n`` and associated data ``ad``, then ``n += 1``.

        On failure ``n`` is unchanged. Without a key the ciphertext is returned
        unchanged (DecryptWithAd, §5.1).

        Args:
            ad: Associated data the sender used.
            ciphertext: Ciphertext and tag as received.

        Returns:
            The plaintext.

        Raises:
            AuthenticationError: The tag did not verify, or the input cannot be
                an authentic message (shorter than a tag, longer than 65535
                bytes, or at the reserved nonce 2**64 - 1).
        """
        aead = self._aead
        if aead is None:
            return ciphertext
        if self._n == MAX_NONCE:
            raise AuthenticationError("message at the reserved nonce 2**64 - 1")
        if not TAG_LEN <= len(ciphertext) <= MAX_MESSAGE_LEN:
            raise AuthenticationError(
                f"ciphertext of {len(ciphertext)} bytes cannot be authentic"
            )
        try:
            plaintext = aead.decrypt(self._nonce(self._n), ciphertext, ad)
        except InvalidTag as exc:
            raise AuthenticationError("AEAD tag did not verify") from exc
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Replace ``k`` by ``ENCRYPT(k, 2**64 - 1, b"", 32 zero bytes)[:32]`` (§11.3).

        ``n`` is unchanged. Both peers must rekey at the same point.

        Raises:
            LocalProtocolError: The cipher state has no key.
        """
        aead = self._aead
        if aead is None:
            raise LocalProtocolError("cannot rekey a cipher state without a key")
        key = aead.encrypt(self._nonce(MAX_NONCE), _REKEY_ZEROS, b"")[:KEY_LEN]
        self._aead = _new_aead(self._cipher, key)


# --- SymmetricState (§5.2) -------------------------------------------------


class SymmetricState:
    """The chaining key ``ck``, handshake hash ``h`` and a :class:`CipherState` (§5.2).

    Used by :class:`HandshakeState`; exposed for tests and other framings.
    """

    __slots__ = ("_algorithm", "_cipher", "_cipher_state", "_ck", "_h", "_hashlen")

    def __init__(
        self,
        protocol_name: bytes,
        *,
        cipher: CipherName = CipherName.CHACHAPOLY,
        hash_name: HashName = HashName.SHA256,
    ) -> None:
        """Start from ``protocol_name`` (InitializeSymmetric).

        Args:
            protocol_name: The full protocol name as ASCII bytes.
            cipher: The cipher function.
            hash_name: The hash function.
        """
        self._algorithm = _hash_algorithm(hash_name)
        self._hashlen = hash_name.hashlen
        self._cipher = cipher
        if len(protocol_name) <= self._hashlen:
            self._h = protocol_name.ljust(self._hashlen, b"\x00")
        else:
            self._h = self._hash(protocol_name)
        self._ck = self._h
        self._cipher_state = CipherState(cipher)

    def _hash(self, data: bytes) -> bytes:
        digest = hashes.Hash(self._algorithm)
        digest.update(data)
        return digest.finalize()

    def _hkdf(self, ikm: bytes, outputs: int) -> list[bytes]:
        # Noise's HKDF (§4.3) is RFC 5869 with salt = ck and empty info.
        okm = HKDF(
            self._algorithm, outputs * self._hashlen, salt=self._ck, info=b""
        ).derive(ikm)
        n = self._hashlen
        return [okm[i * n : (i + 1) * n] for i in range(outputs)]

    @property
    def has_key(self) -> bool:
        """Whether the inner cipher state has a key."""
        return self._cipher_state.has_key

    @property
    def handshake_hash(self) -> bytes:
        """The current ``h`` (GetHandshakeHash)."""
        return self._h

    def mix_key(self, ikm: bytes) -> None:
        """``ck, k = HKDF(ck, ikm, 2)``; key the cipher with ``k`` (MixKey).

        Args:
            ikm: Input key material, e.g. a DH output.
        """
        self._ck, temp_k = self._hkdf(ikm, 2)
        self._cipher_state.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        """``h = HASH(h || data)`` (MixHash).

        Args:
            data: Bytes to bind into the transcript.
        """
        self._h = self._hash(self._h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        """``ck, temp_h, k = HKDF(ck, ikm, 3)``; MixHash(temp_h); key with ``k``.

        Args:
            ikm: Input key material (a PSK, §9).
        """
        self._ck, temp_h, temp_k = self._hkdf(ikm, 3)
        self.mix_hash(temp_h)
        self._cipher_state.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then MixHash the ciphertext.

        Args:
            plaintext: Bytes to send.

        Returns:
            The ciphertext (the plaintext if there is no key yet).

        Raises:
            MessageTooLargeError: More than 65535 bytes.
            LocalProtocolError: The nonce is exhausted.
        """
        ciphertext = self._cipher_state.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then MixHash the ciphertext.

        Args:
            ciphertext: Bytes received.

        Returns:
            The plaintext.

        Raises:
            AuthenticationError: The tag did not verify.
        """
        plaintext = self._cipher_state.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Derive the two transport cipher states (Split).

        Returns:
            ``(c1, c2)``: the initiator's sending cipher, the responder's.
        """
        k1, k2 = self.split_keys()
        return CipherState(self._cipher, k1), CipherState(self._cipher, k2)

    def split_keys(self) -> tuple[bytes, bytes]:
        """Split, returning the two raw 32-byte keys instead of cipher states.

        For transports that frame their own records with explicit counters
        (docs/protocol.md §3.2) rather than Noise's implicit nonces.
        """
        temp_k1, temp_k2 = self._hkdf(b"", 2)
        return temp_k1[:KEY_LEN], temp_k2[:KEY_LEN]


# --- HandshakeState (§5.3) -------------------------------------------------


def _dh_roles(token: Token, *, initiator: bool) -> tuple[Token, Token]:
    """The (local key, remote key) a DH token combines, each ``E`` or ``S``."""
    if token is Token.EE:
        return Token.E, Token.E
    if token is Token.SS:
        return Token.S, Token.S
    # "es": initiator's e with responder's s; "se": initiator's s, responder's e.
    if token is Token.ES:
        initiator_key, responder_key = Token.E, Token.S
    else:
        initiator_key, responder_key = Token.S, Token.E
    if initiator:
        return initiator_key, responder_key
    return responder_key, initiator_key


def _overheads(pattern: HandshakePattern, dhlen: int) -> tuple[int, ...]:
    """Bytes each handshake message adds to its payload (keys and tags)."""
    psk_mode = pattern.psk_count > 0
    has_key = False
    result: list[int] = []
    for message in pattern.messages:
        size = 0
        for token in message:
            if token is Token.E:
                size += dhlen
                has_key = has_key or psk_mode
            elif token is Token.S:
                size += dhlen + (TAG_LEN if has_key else 0)
            else:
                has_key = True
        result.append(size + (TAG_LEN if has_key else 0))
    return tuple(result)


class HandshakeState:
    """One side of a Noise handshake (§5.3), driven by :data:`PATTERNS`.

    Call :meth:`write_message` and :meth:`read_message` in turn (see
    :attr:`is_our_turn`) until :attr:`is_complete`, then :meth:`split` once
    for the transport cipher states. Any error ends the handshake: later
    calls fail too; start a new :class:`HandshakeState`.

    Early payloads are sent before the peer is fully authenticated and may be
    replayable (§7.7); SECURITY.md sends application data only after split().
    """

    __slots__ = (
        "_e",
        "_e_pub",
        "_ephemeral_key",
        "_failed",
        "_index",
        "_initiator",
        "_overheads",
        "_protocol",
        "_psks",
        "_randbytes",
        "_re",
        "_rs",
        "_s",
        "_s_pub",
        "_split_done",
        "_symmetric",
    )

    def __init__(
        self,
        protocol: ProtocolName | str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        static_key: bytes | None = None,
        remote_static: bytes | None = None,
        psks: Sequence[bytes] = (),
        ephemeral_key: bytes | None = None,
        randbytes: Callable[[int], bytes] | None = None,
    ) -> None:
        """Start a handshake (Initialize, §5.3).

        Args:
            protocol: A protocol name or its parsed form.
            initiator: True for the side that sends the first message.
            prologue: Data both sides must agree on (§6), e.g. versions.
            static_key: This side's static private key (DHLEN bytes), exactly
                when the pattern gives this side one.
            remote_static: The peer's static public key, exactly when the
                pattern says it is known in advance (``<- s`` / ``-> s``).
                Patterns that transmit it expose it as :attr:`remote_static`
                after it arrives; compare it with the pinned key there.
            psks: One 32-byte PSK per ``psk`` token, in order of use.
            ephemeral_key: A fixed ephemeral private key, for test vectors
                only; never reuse one in production.
            randbytes: Source of ephemeral private keys, called with DHLEN;
                defaults to the ``cryptography`` (OS) generator.

        Raises:
            LocalProtocolError: Unsupported protocol name, a key missing, not
                needed by the pattern or of the wrong length, a low-order
                ``remote_static``, or the wrong number or size of PSKs.
        """
        proto = parse_protocol_name(protocol) if isinstance(protocol, str) else protocol
        pattern = proto.pattern
        dh = proto.dh
        role = "initiator" if initiator else "responder"
        self._check_key(
            "static_key",
            static_key,
            dh.dhlen,
            needed=pattern.needs_local_static(initiator=initiator),
            role=role,
        )
        self._check_key(
            "remote_static",
            remote_static,
            dh.dhlen,
            needed=pattern.needs_remote_static(initiator=initiator),
            role=role,
        )
        if ephemeral_key is not None:
            self._check_key(
                "ephemeral_key",
                ephemeral_key,
                dh.dhlen,
                needed=pattern.sends_ephemeral(initiator=initiator),
                role=role,
            )
        if remote_static is not None and _is_low_order(dh, remote_static):
            raise LocalProtocolError("remote_static is a low-order point")
        if len(psks) != pattern.psk_count:
            raise LocalProtocolError(
                f"pattern {pattern.name} needs {pattern.psk_count} PSKs, "
                f"got {len(psks)}"
            )
        if any(len(psk) != PSK_LEN for psk in psks):
            raise LocalProtocolError(f"each PSK must be {PSK_LEN} bytes")

        self._protocol = proto
        self._initiator = initiator
        self._psks = [bytes(psk) for psk in psks]
        self._ephemeral_key = ephemeral_key
        self._randbytes = randbytes
        self._overheads = _overheads(pattern, dh.dhlen)
        self._index = 0
        self._failed = False
        self._split_done = False
        self._s = None if static_key is None else _private_from_bytes(dh, static_key)
        self._s_pub = None if self._s is None else _public_bytes(self._s)
        self._e: _PrivateKey | None = None
        self._e_pub: bytes | None = None
        self._rs = None if remote_static is None else bytes(remote_static)
        self._re: bytes | None = None

        self._symmetric = SymmetricState(
            proto.name.encode("ascii"), cipher=proto.cipher, hash_name=proto.hash
        )
        self._symmetric.mix_hash(prologue)
        for pre, is_local in (
            (pattern.initiator_pre, initiator),
            (pattern.responder_pre, not initiator),
        ):
            for token in pre:
                if token is not Token.S:
                    raise LocalProtocolError("pre-message ephemerals are unsupported")
                key = self._s_pub if is_local else self._rs
                if key is None:  # pragma: no cover - checked above
                    raise LocalProtocolError("pre-message key missing")
                self._symmetric.mix_hash(key)

    @staticmethod
    def _check_key(
        what: str, key: bytes | None, length: int, *, needed: bool, role: str
    ) -> None:
        if key is None:
            if needed:
                raise LocalProtocolError(f"this pattern needs {what} for the {role}")
            return
        if not needed:
            raise LocalProtocolError(f"this pattern takes no {what} for the {role}")
        if len(key) != length:
            raise LocalProtocolError(f"{what} must be {length} bytes, got {len(key)}")

    # -- state ---------------------------------------------------------------

    @property
    def protocol(self) -> ProtocolName:
        """The parsed protocol name."""
        return self._protocol

    @property
    def is_initiator(self) -> bool:
        """Whether this side sends the first handshake message."""
        return self._initiator

    @property
    def is_complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index == len(self._protocol.pattern.messages)

    @property
    def is_our_turn(self) -> bool:
        """Whether the next handshake message is ours to write."""
        return not self.is_complete and (self._index % 2 == 0) == self._initiator

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known; None otherwise."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """The final handshake hash ``h``, for channel binding (§11.2).

        Raises:
            LocalProtocolError: The handshake is not complete.
        """
        if not self.is_complete or self._failed:
            raise LocalProtocolError("no final hash: handshake incomplete or failed")
        return self._symmetric.handshake_hash

    def split(self) -> tuple[CipherState, CipherState]:
        """Return the transport cipher states; call once, after completion.

        Returns:
            ``(initiator_to_responder, responder_to_initiator)`` (§5.2). Each
            side encrypts with its own direction and decrypts with the other.
            One-way patterns use only the first.

        Raises:
            LocalProtocolError: The handshake is not complete or split() was
                already called.
        """
        if not self.is_complete or self._failed:
            raise LocalProtocolError("split(): handshake incomplete or failed")
        if self._split_done:
            raise LocalProtocolError("split() may be called only once")
        self._split_done = True
        self._e = self._s = None
        return self._symmetric.split()

    def split_keys(self) -> tuple[bytes, bytes]:
        """Like :meth:`split`, but return the raw keys ``(k1, k2)``.

        ``k1`` encrypts initiator to responder, ``k2`` the other way. Call
        once, after completion; the caller owns the keys from then on.

        Raises:
            LocalProtocolError: The handshake is not complete or was split.
        """
        if not self.is_complete or self._failed:
            raise LocalProtocolError("split(): handshake incomplete or failed")
        if self._split_done:
            raise LocalProtocolError("split() may be called only once")
        self._split_done = True
        self._e = self._s = None
        return self._symmetric.split_keys()

    # -- messages ------------------------------------------------------------

    def _dh(self, token: Token) -> bytes:
        local_role, remote_role = _dh_roles(token, initiator=self._initiator)
        local = self._e if local_role is Token.E else self._s
        remote = self._re if remote_role is Token.E else self._rs
        if local is None or remote is None:  # pragma: no cover - table invariant
            raise HandshakeError(f"pattern uses a key not yet known ({token})")
        try:
            return _exchange(local, remote)
        except ValueError as exc:
            raise HandshakeError("DH failed: low-order public key") from exc

    def _static_public(self) -> bytes:
        if self._s_pub is None:  # pragma: no cover - checked in __init__
            raise LocalProtocolError("static key missing")
        return self._s_pub

    def _next_psk(self) -> bytes:
        return self._psks.pop(0)

    def write_message(self, payload: bytes) -> bytes:
        """Build the next handshake message carrying ``payload`` (WriteMessage).

        Call when :attr:`is_our_turn`; send the result to the peer.

        Args:
            payload: Application bytes; encrypted once the handshake has a key.

        Returns:
            The message bytes.

        Raises:
            MessageTooLargeError: The message would exceed 65535 bytes.
            LocalProtocolError: Not this side's turn, the handshake is complete,
                or it failed before.
        """
        if self._failed:
            raise LocalProtocolError("handshake failed; start a new one")
        if self.is_complete:
            raise LocalProtocolError("handshake is complete; call split()")
        if not self.is_our_turn:
            raise LocalProtocolError("it is the peer's turn; call read_message()")
        size = self._overheads[self._index] + len(payload)
        if size > MAX_MESSAGE_LEN:
            raise MessageTooLargeError(
                f"handshake message of {size} bytes exceeds {MAX_MESSAGE_LEN}",
                size=size,
                limit=MAX_MESSAGE_LEN,
            )
        sym = self._symmetric
        psk_mode = self._protocol.pattern.psk_count > 0
        parts: list[bytes] = []
        try:
            for token in self._protocol.pattern.messages[self._index]:
                if token is Token.E:
                    self._e = self._new_ephemeral()
                    self._e_pub = _public_bytes(self._e)
                    parts.append(self._e_pub)
                    sym.mix_hash(self._e_pub)
                    if psk_mode:
                        sym.mix_key(self._e_pub)
                elif token is Token.S:
                    parts.append(sym.encrypt_and_hash(self._static_public()))
                elif token is Token.PSK:
                    sym.mix_key_and_hash(self._next_psk())
                else:
                    sym.mix_key(self._dh(token))
            parts.append(sym.encrypt_and_hash(payload))
        except (HandshakeError, LocalProtocolError):
            self._failed = True
            raise
        self._index += 1
        return b"".join(parts)

    def _new_ephemeral(self) -> _PrivateKey:
        dh = self._protocol.dh
        if self._ephemeral_key is not None:
            key = _private_from_bytes(dh, self._ephemeral_key)
            self._ephemeral_key = None
            return key
        return _generate(dh, self._randbytes)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message (ReadMessage).

        Call when a handshake message arrives and not :attr:`is_our_turn`.
        Any error fails the handshake for good.

        Args:
            message: The bytes received.

        Returns:
            The payload carried by the message.

        Raises:
            HandshakeError: The message arrived out of turn or after the
                handshake, has a bad length, or carries a low-order key.
            AuthenticationError: An encrypted part did not verify (wrong keys,
                PSK or prologue, or tampering).
        """
        try:
            return self._read(message)
        except (HandshakeError, AuthenticationError):
            self._failed = True
            raise

    def _read(self, message: bytes) -> bytes:
        if self._failed:
            raise HandshakeError("handshake already failed")
        if self.is_complete:
            raise HandshakeError("unexpected message after the handshake completed")
        if self.is_our_turn:
            raise HandshakeError("unexpected message: this side must write next")
        message = bytes(message)  # a copy: slices below must not alias a buffer
        number = self._index + 1
        minimum = self._overheads[self._index]
        if not minimum <= len(message) <= MAX_MESSAGE_LEN:
            raise HandshakeError(
                f"handshake message {number} has {len(message)} bytes; "
                f"expected {minimum} .. {MAX_MESSAGE_LEN}"
            )
        sym = self._symmetric
        dh = self._protocol.dh
        psk_mode = self._protocol.pattern.psk_count > 0
        received: set[Token] = set()
        verified: set[Token] = set()
        offset = 0
        for token in self._protocol.pattern.messages[self._index]:
            if token is Token.E:
                self._re = message[offset : offset + dh.dhlen]
                offset += dh.dhlen
                received.add(Token.E)
                sym.mix_hash(self._re)
                if psk_mode:
                    sym.mix_key(self._re)
            elif token is Token.S:
                size = dh.dhlen + (TAG_LEN if sym.has_key else 0)
                self._rs = sym.decrypt_and_hash(message[offset : offset + size])
                offset += size
                received.add(Token.S)
            elif token is Token.PSK:
                sym.mix_key_and_hash(self._next_psk())
            else:
                sym.mix_key(self._dh(token))
                verified.add(_dh_roles(token, initiator=self._initiator)[1])
        # A key not yet used in a DH is checked now, not at our next write.
        for token in received - verified:
            key = self._re if token is Token.E else self._rs
            if key is not None and _is_low_order(dh, key):
                raise HandshakeError("peer sent a low-order public key")
        payload = sym.decrypt_and_hash(message[offset:])
        self._index += 1
        return payload
