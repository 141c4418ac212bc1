"""Cloud envelopes between the phone and the gateway (docs/envelope.md).

What the outbox stores and the broker carries (SECURITY.md §1 "Cloud
envelope", §1.3; ARCHITECTURE.md "The bytes, outermost first"). Every payload
on every cloud topic is one of the binary objects below, all big-endian, none
carrying a cleartext label beyond a version, a kind byte and a key id:

Uplink and downlink envelope, suite HPKE (encrypt, then sign)::

    offset  size  field
    0       1     version    ENVELOPE_VERSION (1)
    1       1     kind       EnvelopeKind: 0x11 uplink, 0x21 downlink
    2       4     kid        u32, the gateway key epoch (see below)
    6       32    enc        HPKE encapsulated key (X25519 ephemeral)
    38      n+16  ct         HPKE ciphertext of the n-byte message, with tag
    54+n    64    signature  Ed25519 over context || every byte before it

    HPKE: base mode, KEM X25519, KDF HKDF-SHA256, AEAD ChaCha20-Poly1305,
    info = context. Fixed overhead HPKE_OVERHEAD = 118 bytes (134 with the
    16-byte message id that starts every protocol message).

Uplink envelope under an epoch key, suite HPKE (:class:`UplinkSealer`)::

    0       1     version    ENVELOPE_VERSION (1)
    1       1     kind       0x13 (EnvelopeKind.UPLINK_HPKE_EPOCH)
    2       4     kid        u32, the gateway key epoch
    6       80    epoch key  HPKE(enc || sealed 32-byte key), info = context
    86      64    signature  Ed25519 over context || bytes 0 .. 85
    150     8     counter    u64, per epoch, from 0
    158     n+16  ct         ChaCha20-Poly1305(epoch key, nonce = 0^4 || counter,
                             aad = context || bytes 0 .. 157)

    Bytes 6 .. 149 repeat for every envelope of an epoch; HPKE and Ed25519
    run once per epoch. EPOCH_OVERHEAD = 174 bytes.

Uplink and downlink envelope, suite NOISE_K (fallback without HPKE)::

    0       1     version    ENVELOPE_VERSION (1)
    1       1     kind       0x12 uplink, 0x22 downlink
    2       4     kid        u32, the gateway key epoch
    6       32    e          the sender's Noise ephemeral public key
    38      ..    ct         Noise_K_25519_ChaChaPoly_SHA256 message 1 payload
                             (first <= 65,487 message bytes) with its tag, then
                             transport messages of <= 65,519 bytes + tag each

    prologue = context || u64 message length. No signature: Noise_K's ``ss``
    authenticates the sender (SECURITY.md "Fallback without HPKE"). Overhead
    NOISE_K_OVERHEAD = 54 bytes up to 65,487 message bytes, +16 per further
    65,519.

Acknowledgement (gateway -> phone), signed, not encrypted::

    0       1     version    ENVELOPE_VERSION (1)
    1       1     kind       0x30 (EnvelopeKind.ACK)
    2       4     kid        u32, the gateway key epoch that signed
    6       8     sequence   u64, the gateway's ack sequence or timestamp
    14      2     count      u16, number of entries (<= MAX_ACK_IDS)
    16      20*c  entries    per acknowledged message: its 16-byte id, then
                             u32 held, the microseconds from the gateway's
                             processing of it to the signing of this ack
                             (the gateway saturates a longer one)
    16+20c  64    signature  Ed25519 over context || every byte before it

    The ids are visible to the broker (random, no content); a gateway that
    wants them hidden sends the ack bytes as the message of a downlink.
    ``held`` is QUIC's ACK Delay per id: a gateway that gathers acks (one
    per ``ack_interval_s`` while a device streams) says how long each waited,
    so the phone's round-trip samples leave the wait out.

The binding *context* is never sent; both sides rebuild it, the receiver from
the topic and device id it *expects*::

    u8 len || b"glasses-relay/envelope"   domain label
    u8 version || u8 kind || u32 kid       the header fields
    u8 len || device_id                    1 .. 255 bytes
    u16 len || topic (UTF-8)               0 .. 512 bytes (info < 1 KiB)

Every field is length-prefixed or fixed-size, so no two (kind, kid, device
id, topic) tuples give the same context. A topic, device id, kid or kind swap
therefore fails the signature and the AEAD.

``kid`` always names a *gateway key epoch*: uplinks are sealed to that epoch's
X25519 key; downlinks and acks are signed by that epoch's Ed25519 key (HPKE)
or sent from its X25519 static (Noise_K). Gateways rotate epochs (30 days,
old private keys kept >= outbox retention + skew); phones pin
``{kid: GatewayPublicKeys}``. Envelopes are replayable by design: receivers
drop duplicate message ids (SECURITY.md "Replay").

The module is sans-I/O: no clock (the ack sequence is the caller's), no
logging, no threads. Errors, for any input bytes:

* :class:`~protocol.errors.MalformedError`: too short, wrong length, unknown
  or unexpected kind, a suite the receiver does not accept;
* :class:`~protocol.errors.UnsupportedVersionError`: another version byte;
* :class:`~protocol.errors.LimitExceededError`: a message over ``max_payload``;
* :class:`UnknownKeyIdError`: a kid the receiver has no key for;
* :class:`~protocol.errors.AuthenticationError`: a signature or AEAD tag that
  does not verify (tampering, wrong key, wrong topic, device id or kid).

All of them are :class:`~protocol.errors.RemoteProtocolError`. Caller
mistakes raise :class:`~protocol.errors.LocalProtocolError` (a missing HPKE
build: :class:`SuiteUnavailableError`). No error text carries key bytes or
message bytes.
"""

from __future__ import annotations

import collections
import enum
import os
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol.constants import (
    DEFAULT_LIMITS,
    MESSAGE_HEADER_SIZE,
    MESSAGE_ID_SIZE,
    TAG_SIZE,
)
from protocol.errors import (
    AuthenticationError,
    HandshakeError,
    LimitExceededError,
    LocalProtocolError,
    MalformedError,
    MessageTooLargeError,
    RemoteProtocolError,
    UnsupportedVersionError,
)
from protocol.noise import MAX_MESSAGE_LEN, HandshakeState

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.hpke import Suite

__all__ = [
    "ACK_ENTRY_SIZE",
    "ACK_HEADER_SIZE",
    "ACK_OVERHEAD",
    "ENC_SIZE",
    "ENVELOPE_VERSION",
    "HEADER_SIZE",
    "EPOCH_CACHE_ENTRIES",
    "EPOCH_MAX_AGE_S",
    "EPOCH_MAX_MESSAGES",
    "EPOCH_OVERHEAD",
    "HPKE_OVERHEAD",
    "KEY_SIZE",
    "MAX_ACK_HELD_US",
    "MAX_ACK_IDS",
    "MAX_DEVICE_ID_SIZE",
    "MAX_KID",
    "MAX_PAYLOAD_SIZE",
    "MAX_TOPIC_SIZE",
    "NOISE_K_OVERHEAD",
    "NOISE_K_PROTOCOL",
    "SIGNATURE_SIZE",
    "AckInfo",
    "DeviceKeys",
    "DevicePublicKeys",
    "EnvelopeHeader",
    "EnvelopeKind",
    "EnvelopeSuite",
    "EpochKeyCache",
    "GatewayKeys",
    "GatewayPublicKeys",
    "SuitePolicy",
    "SuiteUnavailableError",
    "UnknownKeyIdError",
    "UplinkSealer",
    "choose_suite",
    "open_downlink",
    "open_uplink",
    "probe_hpke",
    "seal_downlink",
    "seal_uplink",
    "sign_ack",
    "verify_ack",
]

ENVELOPE_VERSION: Final = 1
"""The cloud envelope format this module speaks (byte 0 of every object)."""
HEADER_SIZE: Final = 6
"""version u8 || kind u8 || kid u32."""
KEY_SIZE: Final = 32
"""Raw X25519 and Ed25519 key size, private or public."""
ENC_SIZE: Final = 32
"""HPKE encapsulated key (DHKEM X25519) and Noise ephemeral size."""
SIGNATURE_SIZE: Final = 64
"""Ed25519 signature size."""
HPKE_OVERHEAD: Final = HEADER_SIZE + ENC_SIZE + TAG_SIZE + SIGNATURE_SIZE
"""Bytes an HPKE envelope adds to its message: 118."""
EPOCH_BLOB_SIZE: Final = ENC_SIZE + KEY_SIZE + TAG_SIZE
"""HPKE encapsulation of an epoch key: enc || sealed 32-byte key: 80."""
_EPOCH_SIGNED_END: Final = HEADER_SIZE + EPOCH_BLOB_SIZE  # 86
_EPOCH_COUNTER_AT: Final = _EPOCH_SIGNED_END + SIGNATURE_SIZE  # 150
_EPOCH_BODY_AT: Final = _EPOCH_COUNTER_AT + 8  # 158
EPOCH_OVERHEAD: Final = _EPOCH_BODY_AT + TAG_SIZE
"""Bytes an epoch envelope (kind 0x13) adds to its message: 174."""
EPOCH_MAX_MESSAGES: Final = 1 << 20
"""Default most messages sealed under one epoch key before a new one."""
EPOCH_MAX_AGE_S: Final = 600.0
"""Default longest an epoch key seals new messages, in seconds."""
EPOCH_CACHE_ENTRIES: Final = 4096
"""Default most epoch keys an :class:`EpochKeyCache` holds (least recently used out)."""
NOISE_K_OVERHEAD: Final = HEADER_SIZE + ENC_SIZE + TAG_SIZE
"""Bytes a Noise_K envelope adds to a message of <= 65,487 bytes: 54."""
ACK_HEADER_SIZE: Final = 16
"""version, kind, kid, sequence u64, count u16."""
ACK_ENTRY_SIZE: Final = MESSAGE_ID_SIZE + 4
"""One acknowledged id and its u32 microseconds held: 20 bytes."""
ACK_OVERHEAD: Final = ACK_HEADER_SIZE + SIGNATURE_SIZE
"""An ack is ``ACK_OVERHEAD + ACK_ENTRY_SIZE * count`` bytes: 80 + 20 per id."""
MAX_ACK_HELD_US: Final = 2**32 - 1
"""Largest ``held`` of an ack entry, microseconds (longer saturates to it)."""
MAX_ACK_IDS: Final = 1024
"""Most message ids in one ack. Policy: sign_ack refuses more (send several)."""
MAX_KID: Final = 2**32 - 1
"""Largest key id (u32)."""
MAX_DEVICE_ID_SIZE: Final = 255
"""Largest device id in bytes (u8 length prefix)."""
MAX_TOPIC_SIZE: Final = 512
"""Largest topic in UTF-8 bytes; keeps the HPKE info under OpenSSL's 1,024."""
MAX_PAYLOAD_SIZE: Final = DEFAULT_LIMITS.max_message_size + MESSAGE_HEADER_SIZE
"""Default largest message an envelope carries: one protocol message.

Policy: sealing refuses a larger one (MessageTooLargeError); opening drops it
before any cryptography (LimitExceededError). Override with ``max_payload``.
"""
NOISE_K_PROTOCOL: Final = "Noise_K_25519_ChaChaPoly_SHA256"
"""The Noise protocol of the fallback suite."""

_LABEL: Final = b"glasses-relay/envelope"
_LABEL_PREFIX: Final = bytes([len(_LABEL)]) + _LABEL
_HEADER: Final = struct.Struct(">BBI")
_ACK_HEADER: Final = struct.Struct(">BBIQH")
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")
_U64_LIMIT: Final = 1 << 64
_NOISE_FIRST: Final = MAX_MESSAGE_LEN - ENC_SIZE - TAG_SIZE  # 65,487 message bytes
_NOISE_NEXT: Final = MAX_MESSAGE_LEN - TAG_SIZE  # 65,519 message bytes
_HPKE_PROBE_INFO: Final = _LABEL + b"/probe"
# A fixed public scalar; clamping makes it a multiple of the cofactor, so DH
# with it fails (ValueError) exactly for the low-order points.
_LOW_ORDER_PROBE: Final = bytes(range(1, KEY_SIZE + 1))


# --- errors ------------------------------------------------------------------


class UnknownKeyIdError(RemoteProtocolError):
    """An envelope or ack names a key id the receiver holds no key for."""

    def __init__(self, msg: str, *, kid: int) -> None:
        """Record the unknown ``kid`` (a public label, not key material)."""
        super().__init__(msg)
        self.kid = kid


class SuiteUnavailableError(LocalProtocolError):
    """The requested envelope suite does not work on this build."""

    def __init__(self, msg: str, *, suite: EnvelopeSuite) -> None:
        """Record the ``suite`` that is unavailable."""
        super().__init__(msg)
        self.suite = suite


# --- codes and policy --------------------------------------------------------


class EnvelopeSuite(enum.StrEnum):
    """How an envelope is sealed (a configuration value)."""

    HPKE = "hpke"
    """HPKE base mode to the recipient, Ed25519 signature by the sender."""
    NOISE_K = "noise_k"
    """One-way Noise_K from the sender's static to the recipient's static."""


class SuitePolicy(enum.StrEnum):
    """What to do when this build has no working HPKE (SECURITY.md probe)."""

    REQUIRE_HPKE = "require_hpke"
    """Fail closed: :func:`choose_suite` raises :class:`SuiteUnavailableError`."""
    FALLBACK = "fallback"
    """Use :attr:`EnvelopeSuite.NOISE_K`."""


class EnvelopeKind(enum.IntEnum):
    """Byte 1 of every cloud object: direction (high nibble) and suite."""

    UPLINK_HPKE = 0x11
    UPLINK_NOISE_K = 0x12
    UPLINK_HPKE_EPOCH = 0x13
    DOWNLINK_HPKE = 0x21
    DOWNLINK_NOISE_K = 0x22
    ACK = 0x30


_UPLINK: Final = {
    EnvelopeSuite.HPKE: EnvelopeKind.UPLINK_HPKE,
    EnvelopeSuite.NOISE_K: EnvelopeKind.UPLINK_NOISE_K,
}
_DOWNLINK: Final = {
    EnvelopeSuite.HPKE: EnvelopeKind.DOWNLINK_HPKE,
    EnvelopeSuite.NOISE_K: EnvelopeKind.DOWNLINK_NOISE_K,
}
_SUITE_OF: Final = {
    EnvelopeKind.UPLINK_HPKE: EnvelopeSuite.HPKE,
    EnvelopeKind.UPLINK_HPKE_EPOCH: EnvelopeSuite.HPKE,
    EnvelopeKind.UPLINK_NOISE_K: EnvelopeSuite.NOISE_K,
    EnvelopeKind.DOWNLINK_HPKE: EnvelopeSuite.HPKE,
    EnvelopeKind.DOWNLINK_NOISE_K: EnvelopeSuite.NOISE_K,
}
_HPKE_ONLY: Final = (EnvelopeSuite.HPKE,)


def _hpke_suite() -> Suite:
    """The envelope's HPKE suite; ImportError or UnsupportedAlgorithm if absent."""
    from cryptography.hazmat.primitives import hpke

    return hpke.Suite(
        hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305
    )


def probe_hpke() -> bool:
    """Run one HPKE round trip; call once at start (SECURITY.md "Startup probe").

    Mobile ``cryptography`` builds on OpenSSL 3.0 import the HPKE module and
    then raise ``UnsupportedAlgorithm``; older ones lack the module.

    Returns:
        True if HPKE (X25519, HKDF-SHA256, ChaCha20-Poly1305) sealed and
        opened a test message; False on ImportError or UnsupportedAlgorithm.
    """
    try:
        suite = _hpke_suite()
        key = X25519PrivateKey.generate()
        sealed = suite.encrypt(b"probe", key.public_key(), info=_HPKE_PROBE_INFO)
        opened = suite.decrypt(sealed, key, info=_HPKE_PROBE_INFO)
    except (ImportError, UnsupportedAlgorithm):
        return False
    return opened == b"probe"


def choose_suite(
    policy: SuitePolicy | str, *, hpke_available: bool | None = None
) -> EnvelopeSuite:
    """Pick the envelope suite at start; never plaintext.

    Args:
        policy: ``"require_hpke"`` or ``"fallback"`` (:class:`SuitePolicy`).
        hpke_available: The result of :func:`probe_hpke`, if already run;
            None runs the probe.

    Returns:
        :attr:`EnvelopeSuite.HPKE` when HPKE works, else
        :attr:`EnvelopeSuite.NOISE_K` under the fallback policy.

    Raises:
        SuiteUnavailableError: No HPKE and the policy requires it.
        LocalProtocolError: An unknown policy name.
    """
    try:
        chosen = SuitePolicy(policy)
    except ValueError:
        raise LocalProtocolError("unknown envelope suite policy") from None
    available = probe_hpke() if hpke_available is None else hpke_available
    if available:
        return EnvelopeSuite.HPKE
    if chosen is SuitePolicy.REQUIRE_HPKE:
        raise SuiteUnavailableError(
            "HPKE is unavailable on this build and the policy requires it",
            suite=EnvelopeSuite.HPKE,
        )
    return EnvelopeSuite.NOISE_K


# --- keys --------------------------------------------------------------------


def _check_size(what: str, key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise LocalProtocolError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")


def _x25519_public(what: str, key: bytes) -> X25519PublicKey:
    _check_size(what, key)
    public = X25519PublicKey.from_public_bytes(key)
    try:
        X25519PrivateKey.from_private_bytes(_LOW_ORDER_PROBE).exchange(public)
    except ValueError:
        raise LocalProtocolError(f"{what} is a low-order point") from None
    return public


def _ed25519_public(what: str, key: bytes) -> Ed25519PublicKey:
    # OpenSSL loads any 32 bytes; a key that is not a curve point simply
    # verifies nothing (every envelope fails with AuthenticationError).
    _check_size(what, key)
    return Ed25519PublicKey.from_public_bytes(key)


@dataclass(frozen=True, slots=True)
class DevicePublicKeys:
    """A phone's public cloud keys, as the gateway registers them.

    Attributes:
        encryption: X25519 public key: downlinks are sealed to it; it is the
            sender static of NOISE_K uplinks.
        verify: Ed25519 public key that checks the phone's HPKE uplinks.

    Raises:
        LocalProtocolError: A key of the wrong size or a low-order X25519 key.
    """

    encryption: bytes
    verify: bytes
    _encryption: X25519PublicKey = field(init=False, repr=False, compare=False)
    _verify: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate and parse the keys once."""
        object.__setattr__(
            self, "_encryption", _x25519_public("device encryption", self.encryption)
        )
        object.__setattr__(
            self, "_verify", _ed25519_public("device verify", self.verify)
        )


@dataclass(frozen=True, slots=True, eq=False)
class DeviceKeys:
    """A phone's private cloud keys (raw 32-byte keys, never in repr).

    Attributes:
        encryption: X25519 private key (downlink recipient, NOISE_K sender).
        signing: Ed25519 private key ``P_sig`` that signs HPKE uplinks.

    Raises:
        LocalProtocolError: A key of the wrong size.
    """

    encryption: bytes = field(repr=False)
    signing: bytes = field(repr=False)
    _encryption: X25519PrivateKey = field(init=False, repr=False)
    _signing: Ed25519PrivateKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Validate and parse the keys once."""
        _check_size("device encryption key", self.encryption)
        _check_size("device signing key", self.signing)
        object.__setattr__(
            self, "_encryption", X25519PrivateKey.from_private_bytes(self.encryption)
        )
        object.__setattr__(
            self, "_signing", Ed25519PrivateKey.from_private_bytes(self.signing)
        )

    @classmethod
    def generate(cls) -> DeviceKeys:
        """Return fresh random keys (tests, first start; relay/keys stores them)."""
        return cls(
            X25519PrivateKey.generate().private_bytes_raw(),
            Ed25519PrivateKey.generate().private_bytes_raw(),
        )

    def public(self) -> DevicePublicKeys:
        """Return the matching public keys, to register with the gateway."""
        return DevicePublicKeys(
            self._encryption.public_key().public_bytes_raw(),
            self._signing.public_key().public_bytes_raw(),
        )


@dataclass(frozen=True, slots=True)
class GatewayPublicKeys:
    """One gateway key epoch's public keys, as the phone pins them per kid.

    Attributes:
        encryption: X25519 public key: uplinks are sealed to it; it is the
            sender static of NOISE_K downlinks.
        verify: Ed25519 public key that checks acks and HPKE downlinks.

    Raises:
        LocalProtocolError: A key of the wrong size or a low-order X25519 key.
    """

    encryption: bytes
    verify: bytes
    _encryption: X25519PublicKey = field(init=False, repr=False, compare=False)
    _verify: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate and parse the keys once."""
        object.__setattr__(
            self, "_encryption", _x25519_public("gateway encryption", self.encryption)
        )
        object.__setattr__(
            self, "_verify", _ed25519_public("gateway verify", self.verify)
        )


@dataclass(frozen=True, slots=True, eq=False)
class GatewayKeys:
    """One gateway key epoch's private keys (raw 32-byte keys, never in repr).

    Attributes:
        encryption: X25519 private key (uplink recipient, NOISE_K sender).
        signing: Ed25519 private key that signs acks and HPKE downlinks.

    Raises:
        LocalProtocolError: A key of the wrong size.
    """

    encryption: bytes = field(repr=False)
    signing: bytes = field(repr=False)
    _encryption: X25519PrivateKey = field(init=False, repr=False)
    _signing: Ed25519PrivateKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Validate and parse the keys once."""
        _check_size("gateway encryption key", self.encryption)
        _check_size("gateway signing key", self.signing)
        object.__setattr__(
            self, "_encryption", X25519PrivateKey.from_private_bytes(self.encryption)
        )
        object.__setattr__(
            self, "_signing", Ed25519PrivateKey.from_private_bytes(self.signing)
        )

    @classmethod
    def generate(cls) -> GatewayKeys:
        """Return fresh random keys for a new key epoch."""
        return cls(
            X25519PrivateKey.generate().private_bytes_raw(),
            Ed25519PrivateKey.generate().private_bytes_raw(),
        )

    def public(self) -> GatewayPublicKeys:
        """Return the matching public keys, for the phones' pinned key list."""
        return GatewayPublicKeys(
            self._encryption.public_key().public_bytes_raw(),
            self._signing.public_key().public_bytes_raw(),
        )


# --- framing -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The 6 cleartext bytes in front of every envelope and ack."""

    kind: EnvelopeKind
    kid: int

    def encode(self) -> bytes:
        """Return version || kind || kid.

        Raises:
            LocalProtocolError: ``kid`` outside 0 .. MAX_KID.
        """
        _check_kid(self.kid)
        return _HEADER.pack(ENVELOPE_VERSION, self.kind, self.kid)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> EnvelopeHeader:
        """Parse the header of an envelope or ack (e.g. to dispatch by kind).

        Only the header is checked; open or verify the whole object before
        trusting anything.

        Raises:
            MalformedError: Shorter than 6 bytes or an unknown kind.
            UnsupportedVersionError: Another version byte.
        """
        if len(data) < HEADER_SIZE:
            raise MalformedError(f"cloud object of {len(data)} bytes has no header")
        version, kind, kid = _HEADER.unpack_from(data)
        if version != ENVELOPE_VERSION:
            raise UnsupportedVersionError(
                "cloud object of another envelope version",
                got=version,
                supported=ENVELOPE_VERSION,
            )
        try:
            return cls(EnvelopeKind(kind), kid)
        except ValueError:
            raise MalformedError(f"unknown envelope kind 0x{kind:02x}") from None


@dataclass(frozen=True, slots=True)
class AckInfo:
    """A verified acknowledgement: delete these ids from the outbox.

    Attributes:
        kid: The gateway key epoch that signed it.
        sequence: The gateway's sequence number or timestamp (its choice).
        message_ids: The acknowledged 16-byte message ids, in ack order.
        held_s: Per id, the seconds the gateway held its ack after
            processing it (subtract from a round-trip sample).
    """

    kid: int
    sequence: int
    message_ids: tuple[bytes, ...]
    held_s: tuple[float, ...]


def _check_kid(kid: int) -> None:
    if not 0 <= kid <= MAX_KID:
        raise LocalProtocolError(f"kid must be in 0 .. {MAX_KID}")


def _binding(device_id: bytes, topic: str) -> bytes:
    """The device id and topic part of the context, validated (caller input)."""
    if not 1 <= len(device_id) <= MAX_DEVICE_ID_SIZE:
        raise LocalProtocolError(f"device id must be 1 .. {MAX_DEVICE_ID_SIZE} bytes")
    try:
        topic_bytes = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("topic is not encodable as UTF-8") from None
    if len(topic_bytes) > MAX_TOPIC_SIZE:
        raise LocalProtocolError(f"topic longer than {MAX_TOPIC_SIZE} UTF-8 bytes")
    return b"".join(
        (bytes([len(device_id)]), device_id, _U16.pack(len(topic_bytes)), topic_bytes)
    )


def _context(header: bytes, binding: bytes) -> bytes:
    """Return the binding context: label, header, device id, topic (never sent)."""
    return _LABEL_PREFIX + header + binding


def _check_payload(message: bytes, max_payload: int) -> None:
    if len(message) > max_payload:
        raise MessageTooLargeError(
            f"message of {len(message)} bytes exceeds the envelope limit {max_payload}",
            size=len(message),
            limit=max_payload,
        )


def _suite(suite: EnvelopeSuite | str) -> EnvelopeSuite:
    try:
        return EnvelopeSuite(suite)
    except ValueError:
        raise LocalProtocolError("unknown envelope suite") from None


def _suites(suites: Collection[EnvelopeSuite]) -> frozenset[EnvelopeSuite]:
    accepted = frozenset(_suite(suite) for suite in suites)
    if not accepted:
        raise LocalProtocolError("accept at least one envelope suite")
    return accepted


# --- sealing -----------------------------------------------------------------


def _seal_hpke(
    message: bytes,
    header: bytes,
    context: bytes,
    recipient: X25519PublicKey,
    signer: Ed25519PrivateKey,
) -> bytes:
    try:
        body = _hpke_suite().encrypt(message, recipient, info=context)
    except (ImportError, UnsupportedAlgorithm) as exc:
        raise SuiteUnavailableError(
            "HPKE is unavailable on this build; seal with NOISE_K or fail closed",
            suite=EnvelopeSuite.HPKE,
        ) from exc
    signed = header + body
    return signed + signer.sign(context + signed)


def _seal_noise_k(
    message: bytes, header: bytes, context: bytes, sender: bytes, recipient: bytes
) -> bytes:
    handshake = HandshakeState(
        NOISE_K_PROTOCOL,
        initiator=True,
        static_key=sender,
        remote_static=recipient,
        prologue=context + _U64.pack(len(message)),
    )
    parts = [header, handshake.write_message(message[:_NOISE_FIRST])]
    if len(message) > _NOISE_FIRST:
        sending, _ = handshake.split()
        parts.extend(
            sending.encrypt_with_ad(b"", message[offset : offset + _NOISE_NEXT])
            for offset in range(_NOISE_FIRST, len(message), _NOISE_NEXT)
        )
    return b"".join(parts)


def seal_uplink(
    message: bytes,
    *,
    topic: str,
    device_id: bytes,
    kid: int,
    gateway: GatewayPublicKeys,
    device: DeviceKeys,
    suite: EnvelopeSuite = EnvelopeSuite.HPKE,
    max_payload: int = MAX_PAYLOAD_SIZE,
) -> bytes:
    """Seal one message for the gateway; store the result in the outbox.

    Call once per message and resend the identical bytes: each call uses a
    fresh ephemeral key, so there is no nonce state.

    Args:
        message: The opaque message bytes (an encoded protocol message).
        topic: The topic it is published to; bound in, never sent.
        device_id: This phone's device id; bound in, never sent.
        kid: The gateway key epoch whose keys ``gateway`` holds.
        gateway: The pinned public keys of that epoch.
        device: This phone's private cloud keys.
        suite: From :func:`choose_suite`.
        max_payload: Largest message accepted.

    Returns:
        The envelope bytes (module docstring for the layout).

    Raises:
        MessageTooLargeError: ``message`` is longer than ``max_payload``.
        SuiteUnavailableError: HPKE requested on a build without it.
        LocalProtocolError: Bad kid, device id or topic.
    """
    suite = _suite(suite)
    _check_payload(message, max_payload)
    header = EnvelopeHeader(_UPLINK[suite], kid).encode()
    context = _context(header, _binding(device_id, topic))
    if suite is EnvelopeSuite.HPKE:
        return _seal_hpke(
            message, header, context, gateway._encryption, device._signing
        )
    return _seal_noise_k(
        message, header, context, device.encryption, gateway.encryption
    )


def seal_downlink(
    message: bytes,
    *,
    topic: str,
    device_id: bytes,
    kid: int,
    gateway: GatewayKeys,
    device: DevicePublicKeys,
    suite: EnvelopeSuite = EnvelopeSuite.HPKE,
    max_payload: int = MAX_PAYLOAD_SIZE,
) -> bytes:
    """Seal one message from the gateway to a phone (answers, commands).

    Args:
        message: The opaque message bytes.
        topic: The topic it is published to; bound in, never sent.
        device_id: The recipient phone's device id; bound in, never sent.
        kid: The gateway key epoch of ``gateway`` (which signs or sends).
        gateway: That epoch's private keys.
        device: The recipient phone's registered public keys.
        suite: The suite that phone uses (it may lack HPKE).
        max_payload: Largest message accepted.

    Returns:
        The envelope bytes.

    Raises:
        MessageTooLargeError: ``message`` is longer than ``max_payload``.
        SuiteUnavailableError: HPKE requested on a build without it.
        LocalProtocolError: Bad kid, device id or topic.
    """
    suite = _suite(suite)
    _check_payload(message, max_payload)
    header = EnvelopeHeader(_DOWNLINK[suite], kid).encode()
    context = _context(header, _binding(device_id, topic))
    if suite is EnvelopeSuite.HPKE:
        return _seal_hpke(
            message, header, context, device._encryption, gateway._signing
        )
    return _seal_noise_k(
        message, header, context, gateway.encryption, device.encryption
    )


# --- opening -----------------------------------------------------------------


def _parse(
    envelope: bytes,
    kinds: Mapping[EnvelopeSuite, EnvelopeKind],
    accepted: frozenset[EnvelopeSuite],
    max_payload: int,
) -> tuple[EnvelopeSuite, int]:
    """Check everything but the cryptography; return (suite, kid)."""
    header = EnvelopeHeader.decode(envelope)
    suite = _SUITE_OF.get(header.kind)
    epoch = header.kind is EnvelopeKind.UPLINK_HPKE_EPOCH and kinds is _UPLINK
    if suite is None or (kinds[suite] is not header.kind and not epoch):
        raise MalformedError(f"envelope kind 0x{header.kind:02x} not expected here")
    if suite not in accepted:
        raise MalformedError(f"envelope suite {suite.value} not accepted")
    if epoch:
        size = len(envelope) - EPOCH_OVERHEAD
    elif suite is EnvelopeSuite.HPKE:
        size = len(envelope) - HPKE_OVERHEAD
    else:
        size = _noise_k_message_size(len(envelope))
    if size < 0:
        raise MalformedError(f"envelope of {len(envelope)} bytes is truncated")
    if size > max_payload:
        raise LimitExceededError(
            f"envelope message of {size} bytes over the limit {max_payload}",
            limit_name="max_payload",
            limit=max_payload,
        )
    return suite, header.kid


def _noise_k_segments(size: int) -> int:
    """Noise messages in a NOISE_K body of ``size`` bytes (after the header)."""
    return max(1, -(-size // MAX_MESSAGE_LEN))


def _noise_k_message_size(length: int) -> int:
    """Message bytes in a NOISE_K envelope of ``length`` bytes; < 0 if invalid."""
    body = length - HEADER_SIZE
    segments = _noise_k_segments(body)
    last = body - (segments - 1) * MAX_MESSAGE_LEN
    if body < ENC_SIZE + TAG_SIZE or (segments > 1 and last <= TAG_SIZE):
        return -1  # a sender never makes an empty trailing chunk
    return body - ENC_SIZE - segments * TAG_SIZE


def _open_hpke(
    envelope: bytes,
    context: bytes,
    recipient: X25519PrivateKey,
    verifier: Ed25519PublicKey,
) -> bytes:
    signed = envelope[:-SIGNATURE_SIZE]
    try:
        verifier.verify(envelope[-SIGNATURE_SIZE:], context + signed)
    except InvalidSignature:
        raise AuthenticationError("envelope signature did not verify") from None
    try:
        suite = _hpke_suite()
    except (ImportError, UnsupportedAlgorithm) as exc:
        raise SuiteUnavailableError(
            "HPKE envelope accepted but HPKE is unavailable on this build",
            suite=EnvelopeSuite.HPKE,
        ) from exc
    try:
        return suite.decrypt(signed[HEADER_SIZE:], recipient, info=context)
    except (InvalidTag, ValueError):
        raise AuthenticationError("envelope ciphertext did not verify") from None
    except UnsupportedAlgorithm as exc:
        raise SuiteUnavailableError(
            "HPKE envelope accepted but HPKE is unavailable on this build",
            suite=EnvelopeSuite.HPKE,
        ) from exc


def _open_noise_k(
    envelope: bytes, context: bytes, recipient: bytes, sender: bytes
) -> bytes:
    body = envelope[HEADER_SIZE:]
    size = _noise_k_message_size(len(envelope))
    handshake = HandshakeState(
        NOISE_K_PROTOCOL,
        initiator=False,
        static_key=recipient,
        remote_static=sender,
        prologue=context + _U64.pack(size),
    )
    try:
        parts = [handshake.read_message(body[:MAX_MESSAGE_LEN])]
        if len(body) > MAX_MESSAGE_LEN:
            receiving, _ = handshake.split()
            parts.extend(
                receiving.decrypt_with_ad(b"", body[offset : offset + MAX_MESSAGE_LEN])
                for offset in range(MAX_MESSAGE_LEN, len(body), MAX_MESSAGE_LEN)
            )
    except (HandshakeError, AuthenticationError):
        raise AuthenticationError("envelope did not authenticate") from None
    return b"".join(parts)


def open_uplink(
    envelope: bytes | bytearray | memoryview,
    *,
    topic: str,
    device_id: bytes,
    gateway_keys: Mapping[int, GatewayKeys],
    device: DevicePublicKeys,
    suites: Collection[EnvelopeSuite] = _HPKE_ONLY,
    max_payload: int = MAX_PAYLOAD_SIZE,
    epochs: EpochKeyCache | None = None,
) -> bytes:
    """Open a phone's envelope on the gateway; call per received payload.

    Checks, cheapest first: header and length, kid, then the signature (HPKE)
    before decrypting with the context rebuilt from the *expected* topic and
    device id. Drop duplicates by the message id inside afterwards.

    Args:
        envelope: The payload as received.
        topic: The topic it arrived on.
        device_id: The device that topic belongs to.
        gateway_keys: This gateway's private keys by kid (current and
            retained epochs).
        device: That device's registered public keys.
        suites: Suites accepted from that device. Accepting NOISE_K lets a
            leaked gateway key impersonate the device (KCI): only for devices
            registered without HPKE.
        max_payload: Largest message accepted.
        epochs: Epoch keys opened so far (epoch envelopes, kind 0x13): keep
            one per gateway so each epoch's key is opened once. None opens
            it for this call only.

    Returns:
        The message bytes.

    Raises:
        MalformedError: Truncated, wrong kind or a suite not in ``suites``.
        UnsupportedVersionError: Another envelope version.
        LimitExceededError: A message over ``max_payload``.
        UnknownKeyIdError: No key for the envelope's kid.
        AuthenticationError: Bad signature or tag, wrong topic, device or kid.
        LocalProtocolError: Bad arguments (device id, topic, empty ``suites``).
    """
    binding = _binding(device_id, topic)
    data = bytes(envelope)
    suite, kid = _parse(data, _UPLINK, _suites(suites), max_payload)
    keys = gateway_keys.get(kid)
    if keys is None:
        raise UnknownKeyIdError("envelope for an unknown gateway key id", kid=kid)
    context = _context(data[:HEADER_SIZE], binding)
    if data[1] == EnvelopeKind.UPLINK_HPKE_EPOCH:
        cache = EpochKeyCache(1) if epochs is None else epochs
        return cache.open(data, context, keys._encryption, device)
    if suite is EnvelopeSuite.HPKE:
        return _open_hpke(data, context, keys._encryption, device._verify)
    return _open_noise_k(data, context, keys.encryption, device.encryption)


# --- epoch envelopes (uplink, suite HPKE, kind 0x13) -----------------------------


def _epoch_nonce(counter: bytes) -> bytes:
    return b"\x00\x00\x00\x00" + counter


@dataclass(slots=True)
class _Epoch:
    prefix: bytes  # header || blob || signature: the same for the whole epoch
    context: bytes
    aead: ChaCha20Poly1305
    started: float
    sealed: int = 0


class UplinkSealer:
    """Seals uplinks under short-lived epoch keys (kind 0x13, docs/envelope.md §4).

    Per topic, an *epoch* is a random 32-byte ChaCha20-Poly1305 key that is
    HPKE-sealed to the gateway and signed by the device once; every envelope
    of the epoch repeats that 144-byte preamble and carries its message
    under the epoch key with a counter nonce. HPKE and Ed25519 are paid once
    per epoch instead of once per message; a new epoch starts after
    ``max_messages`` messages or ``max_age_s`` seconds. Epoch keys live only
    in this object (never stored), and a new object starts new epochs, so a
    counter is never reused under a key. Envelopes are stored and resent as
    identical bytes like any other.

    Not thread-safe; one sealer per cloud link and gateway key epoch.
    """

    def __init__(
        self,
        *,
        device_id: bytes,
        kid: int,
        gateway: GatewayPublicKeys,
        device: DeviceKeys,
        max_messages: int = EPOCH_MAX_MESSAGES,
        max_age_s: float = EPOCH_MAX_AGE_S,
        max_payload: int = MAX_PAYLOAD_SIZE,
    ) -> None:
        """Prepare a sealer; the first :meth:`seal` on a topic starts its epoch.

        Raises:
            LocalProtocolError: Bad kid or device id, ``max_messages`` not in
                1 .. 2**64, or ``max_age_s`` not positive.
        """
        _check_kid(kid)
        _binding(device_id, "")
        if not 1 <= max_messages <= _U64_LIMIT:
            raise LocalProtocolError("max_messages must be in 1 .. 2**64")
        if not max_age_s > 0:
            raise LocalProtocolError("max_age_s must be positive")
        self.kid = kid
        self._device_id = device_id
        self._gateway = gateway
        self._device = device
        self._max_messages = max_messages
        self._max_age_s = max_age_s
        self._max_payload = max_payload
        self._header = EnvelopeHeader(EnvelopeKind.UPLINK_HPKE_EPOCH, kid).encode()
        self._epochs: dict[str, _Epoch] = {}
        self.epochs_started = 0
        """Epochs begun so far (each cost one HPKE seal and one signature)."""

    def seal(self, message: bytes, *, topic: str, now: float) -> bytes:
        """Seal one message for ``topic``; store and resend the result as is.

        Args:
            message: The opaque message bytes (an encoded protocol message).
            topic: The topic it is published to; bound in, never sent.
            now: The caller's monotonic clock, for the epoch's age.

        Returns:
            The envelope bytes (``EPOCH_OVERHEAD`` + ``len(message)``).

        Raises:
            MessageTooLargeError: ``message`` is longer than ``max_payload``.
            SuiteUnavailableError: This build has no HPKE.
            LocalProtocolError: Bad topic.
        """
        _check_payload(message, self._max_payload)
        epoch = self._epochs.get(topic)
        if (
            epoch is None
            or epoch.sealed >= self._max_messages
            or now - epoch.started >= self._max_age_s
        ):
            epoch = self._epochs[topic] = self._start(topic, now)
        counter = _U64.pack(epoch.sealed)
        epoch.sealed += 1
        head = epoch.prefix + counter
        body = epoch.aead.encrypt(_epoch_nonce(counter), message, epoch.context + head)
        return head + body

    def _start(self, topic: str, now: float) -> _Epoch:
        context = _context(self._header, _binding(self._device_id, topic))
        key = os.urandom(KEY_SIZE)
        # The preamble is an HPKE envelope (§3 layout) of the key, kind 0x13.
        prefix = _seal_hpke(
            key,
            self._header,
            context,
            self._gateway._encryption,
            self._device._signing,
        )
        self.epochs_started += 1
        return _Epoch(prefix, context, ChaCha20Poly1305(key), now)


class EpochKeyCache:
    """Epoch keys a gateway has opened: each epoch costs one HPKE and one verify.

    Keyed by everything the epoch's preamble was checked against (the
    device's verifying key, the context, the preamble bytes, and the very
    private key object that opened it: a gateway that replaces its key under
    the same kid opens its epochs again), so a hit needs no check but the
    AEAD. Holds at most ``max_entries``; policy when full:
    the least recently used key is dropped (its next envelope opens it again).

    Not thread-safe; one opener at a time.
    """

    def __init__(self, max_entries: int = EPOCH_CACHE_ENTRIES) -> None:
        """Make an empty cache.

        Raises:
            LocalProtocolError: ``max_entries`` < 1.
        """
        if max_entries < 1:
            raise LocalProtocolError("max_entries must be >= 1")
        self._max = max_entries
        self._keys: collections.OrderedDict[
            bytes, tuple[X25519PrivateKey, ChaCha20Poly1305]
        ] = collections.OrderedDict()
        self.opened = 0
        """Epoch keys opened (cache misses that verified)."""

    def __len__(self) -> int:
        """The number of epoch keys held."""
        return len(self._keys)

    def open(
        self,
        data: bytes,
        context: bytes,
        recipient: X25519PrivateKey,
        device: DevicePublicKeys,
    ) -> bytes:
        """Open an epoch envelope whose length and kid the caller checked.

        Raises:
            AuthenticationError: The epoch's signature or key, or the
                message's tag, does not verify.
            SuiteUnavailableError: This build has no HPKE.
        """
        preamble = data[HEADER_SIZE:_EPOCH_COUNTER_AT]
        slot = b"".join((device.verify, _U16.pack(len(context)), context, preamble))
        held = self._keys.get(slot)
        if held is None or held[0] is not recipient:
            aead = self._open_epoch(data, context, recipient, device)
            self._keys[slot] = (recipient, aead)
            self._keys.move_to_end(slot)
            self.opened += 1
            if len(self._keys) > self._max:
                self._keys.popitem(last=False)
        else:
            aead = held[1]
            self._keys.move_to_end(slot)
        counter = data[_EPOCH_COUNTER_AT:_EPOCH_BODY_AT]
        try:
            return aead.decrypt(
                _epoch_nonce(counter),
                data[_EPOCH_BODY_AT:],
                context + data[:_EPOCH_BODY_AT],
            )
        except InvalidTag:
            raise AuthenticationError("envelope ciphertext did not verify") from None

    @staticmethod
    def _open_epoch(
        data: bytes,
        context: bytes,
        recipient: X25519PrivateKey,
        device: DevicePublicKeys,
    ) -> ChaCha20Poly1305:
        # The preamble opens like an HPKE envelope: signature, then the key.
        key = _open_hpke(data[:_EPOCH_COUNTER_AT], context, recipient, device._verify)
        if len(key) != KEY_SIZE:
            raise AuthenticationError("epoch key has the wrong size")
        return ChaCha20Poly1305(key)


def open_downlink(
    envelope: bytes | bytearray | memoryview,
    *,
    topic: str,
    device_id: bytes,
    gateway_keys: Mapping[int, GatewayPublicKeys],
    device: DeviceKeys,
    suites: Collection[EnvelopeSuite] = _HPKE_ONLY,
    max_payload: int = MAX_PAYLOAD_SIZE,
) -> bytes:
    """Open a gateway's envelope on the phone; unsigned or forged ones raise.

    Args:
        envelope: The payload as received.
        topic: The topic it arrived on.
        device_id: This phone's device id.
        gateway_keys: The pinned gateway public keys by kid.
        device: This phone's private cloud keys.
        suites: Suites accepted (the one :func:`choose_suite` picked).
        max_payload: Largest message accepted.

    Returns:
        The message bytes.

    Raises:
        MalformedError: Truncated, wrong kind or a suite not in ``suites``.
        UnsupportedVersionError: Another envelope version.
        LimitExceededError: A message over ``max_payload``.
        UnknownKeyIdError: The kid is not pinned (unknown or retired).
        AuthenticationError: Bad signature or tag, wrong topic, device or kid.
        LocalProtocolError: Bad arguments (device id, topic, empty ``suites``).
    """
    binding = _binding(device_id, topic)
    data = bytes(envelope)
    suite, kid = _parse(data, _DOWNLINK, _suites(suites), max_payload)
    keys = gateway_keys.get(kid)
    if keys is None:
        raise UnknownKeyIdError("envelope from an unknown gateway key id", kid=kid)
    context = _context(data[:HEADER_SIZE], binding)
    if suite is EnvelopeSuite.HPKE:
        return _open_hpke(data, context, device._encryption, keys._verify)
    return _open_noise_k(data, context, device.encryption, keys.encryption)


# --- acknowledgements --------------------------------------------------------


def sign_ack(
    message_ids: Sequence[bytes],
    *,
    topic: str,
    device_id: bytes,
    kid: int,
    sequence: int,
    gateway: GatewayKeys,
    held_us: Sequence[int] | None = None,
) -> bytes:
    """Sign an end-to-end acknowledgement, after the messages are processed.

    Args:
        message_ids: 16-byte ids of the envelopes' messages, at most
            :data:`MAX_ACK_IDS` (send several acks for more).
        held_us: Per id, the microseconds its ack waited after the message
            was processed, integers from 0 to :data:`MAX_ACK_HELD_US` (the
            caller saturates a longer wait); ``None``: all 0.
        topic: The topic the ack is published to; bound in, never sent.
        device_id: The phone the ack is for; bound in, never sent.
        kid: The gateway key epoch of ``gateway``.
        sequence: The gateway's ack sequence number or timestamp, u64.
        gateway: That epoch's private keys (its Ed25519 key signs).

    Returns:
        The ack bytes (80 + 20 per id).

    Raises:
        MessageTooLargeError: More than :data:`MAX_ACK_IDS` ids.
        LocalProtocolError: An id not 16 bytes, bad kid, sequence, device id,
            topic, or ``held_us`` (not one per id, or out of range).
    """
    if len(message_ids) > MAX_ACK_IDS:
        raise MessageTooLargeError(
            f"ack of {len(message_ids)} ids exceeds {MAX_ACK_IDS}",
            size=len(message_ids),
            limit=MAX_ACK_IDS,
        )
    if any(len(mid) != MESSAGE_ID_SIZE for mid in message_ids):
        raise LocalProtocolError(f"message ids must be {MESSAGE_ID_SIZE} bytes")
    if not 0 <= sequence < _U64_LIMIT:
        raise LocalProtocolError("ack sequence must fit 64 bits")
    if held_us is None:
        held_us = [0] * len(message_ids)
    elif len(held_us) != len(message_ids):
        raise LocalProtocolError("ack needs one held time per message id")
    elif not all(
        type(held) is int and 0 <= held <= MAX_ACK_HELD_US for held in held_us
    ):
        raise LocalProtocolError(
            f"ack held times must be integers from 0 to {MAX_ACK_HELD_US} us"
        )
    _check_kid(kid)
    binding = _binding(device_id, topic)
    signed = _ACK_HEADER.pack(
        ENVELOPE_VERSION, EnvelopeKind.ACK, kid, sequence, len(message_ids)
    ) + b"".join(
        mid + _U32.pack(held) for mid, held in zip(message_ids, held_us, strict=True)
    )
    return signed + gateway._signing.sign(
        _context(signed[:HEADER_SIZE], binding) + signed
    )


def verify_ack(
    ack: bytes | bytearray | memoryview,
    *,
    topic: str,
    device_id: bytes,
    gateway_keys: Mapping[int, GatewayPublicKeys],
) -> AckInfo:
    """Verify a gateway's ack; only then delete the acked outbox rows.

    A replayed ack acknowledges only what it did before (ids are never
    reused); compare ``sequence`` if freshness matters.

    Args:
        ack: The payload as received.
        topic: The topic it arrived on.
        device_id: This phone's device id.
        gateway_keys: The pinned gateway public keys by kid.

    Returns:
        The verified contents.

    Raises:
        MalformedError: Wrong kind, length or id count (e.g. unsigned).
        UnsupportedVersionError: Another envelope version.
        UnknownKeyIdError: The kid is not pinned.
        AuthenticationError: The signature does not verify (forged, wrong
            key, topic or device).
        LocalProtocolError: Bad device id or topic.
    """
    binding = _binding(device_id, topic)
    data = bytes(ack)
    header = EnvelopeHeader.decode(data)
    if header.kind is not EnvelopeKind.ACK:
        raise MalformedError(f"kind 0x{header.kind:02x} is not an ack")
    if len(data) < ACK_OVERHEAD:
        raise MalformedError(f"ack of {len(data)} bytes is truncated")
    _, _, kid, sequence, count = _ACK_HEADER.unpack_from(data)
    if count > MAX_ACK_IDS:
        raise MalformedError(f"ack with {count} ids, over {MAX_ACK_IDS}")
    if len(data) == ACK_OVERHEAD + count * ACK_ENTRY_SIZE:
        entry = ACK_ENTRY_SIZE
    elif len(data) == ACK_OVERHEAD + count * MESSAGE_ID_SIZE:
        entry = MESSAGE_ID_SIZE  # a gateway from before held times: held 0
    else:
        raise MalformedError(f"ack of {len(data)} bytes does not hold {count} ids")
    keys = gateway_keys.get(kid)
    if keys is None:
        raise UnknownKeyIdError("ack from an unknown gateway key id", kid=kid)
    signed = data[:-SIGNATURE_SIZE]
    try:
        keys._verify.verify(
            data[-SIGNATURE_SIZE:], _context(data[:HEADER_SIZE], binding) + signed
        )
    except InvalidSignature:
        raise AuthenticationError("ack signature did not verify") from None
    offsets = range(ACK_HEADER_SIZE, len(signed), entry)
    ids = tuple(signed[offset : offset + MESSAGE_ID_SIZE] for offset in offsets)
    if entry == MESSAGE_ID_SIZE:
        return AckInfo(kid, sequence, ids, (0.0,) * count)
    held = tuple(
        _U32.unpack_from(signed, offset + MESSAGE_ID_SIZE)[0] / 1e6
        for offset in offsets
    )
    return AckInfo(kid, sequence, ids, held)
