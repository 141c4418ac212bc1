"""Transport records: seal and open the DATA records of one Noise session.

SECURITY.md §1.2 (docs/protocol.md §3). After the handshake's ``Split()`` each
side holds two 32-byte keys, one per direction. A :class:`TransportSession`
seals outgoing records under the send key and opens incoming ones under the
receive key::

    0      1      2        6                14
    | ver  | type | sid32  | counter u64 BE | ChaCha20-Poly1305(ct) || tag16 |

    header = AEAD associated data; nonce = 0x00000000 || LE64(counter)

Receive checks run cheapest first and change state only after the AEAD
passes:

1. length, version, type, session id -> ``malformed`` / ``unknown_session``;
2. counter at or past ``reject_after_messages`` -> ``exhausted``; a counter
   seen before or older than the replay window -> ``replay``;
3. AEAD -> ``auth_fail``;
4. commit the counter to the :class:`ReplayWindow`.

Every rejected record is dropped and counted under one :class:`DropReason`;
:meth:`TransportSession.open` never raises for any input bytes and returns
``None`` alike for every reason (no oracle). :meth:`TransportSession.open_or_raise`
is the same path for callers that prefer typed errors.

The module is sans-I/O: it reads no clock (``now`` is an argument), does no
I/O and does not log. It keeps no raw key bytes, only the two cipher objects,
and no error text or ``repr`` contains keys or plaintext.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol.constants import (
    PROTOCOL_VERSION,
    RECORD_HEADER_SIZE,
    TAG_SIZE,
    RecordType,
)
from protocol.errors import (
    AuthenticationError,
    LimitExceededError,
    LocalProtocolError,
    MalformedError,
    MessageTooLargeError,
    RemoteProtocolError,
    ReplayError,
    UnsupportedVersionError,
)
from protocol.record import RecordHeader

__all__ = [
    "DEFAULT_TRANSPORT_LIMITS",
    "KEY_SIZE",
    "DropReason",
    "ReplayWindow",
    "TransportLimits",
    "TransportSession",
]

KEY_SIZE: Final = 32
"""Bytes in each transport key (ChaCha20-Poly1305)."""

_HEADER: Final = struct.Struct(">BBIQ")
"""The record header of :mod:`protocol.record`; parsed here without exceptions."""
_NONCE: Final = struct.Struct("<4xQ")
"""Noise ChaChaPoly nonce: four zero bytes, then the counter little-endian."""
_DATA: Final = int(RecordType.DATA)
_OVERHEAD: Final = RECORD_HEADER_SIZE + TAG_SIZE
_U32: Final = 1 << 32
_MAX_COUNTERS: Final = (1 << 64) - 1
"""Noise reserves nonce 2**64 - 1, so at most this many counters per key."""
_MAX_PLAINTEXT_CAP: Final = 1 << 30


class DropReason(enum.StrEnum):
    """Why :meth:`TransportSession.open` dropped a record (SECURITY.md §1.2).

    Not to be confused with :class:`protocol.events.DropReason`, which names
    link-layer (fragment) drops.
    """

    MALFORMED = "malformed"
    """Wrong length, protocol version or record type."""
    UNKNOWN_SESSION = "unknown_session"
    """Another session id, or this session is closed or torn down."""
    REPLAY = "replay"
    """A counter already accepted, or older than the replay window."""
    EXHAUSTED = "exhausted"
    """A counter at or past ``reject_after_messages``, or the keys are too old."""
    AUTH_FAIL = "auth_fail"
    """The AEAD tag did not verify."""


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Limits of one transport session (SECURITY.md §1.2 rekey table).

    Attributes:
        max_record_plaintext: Largest plaintext in one record. Policy: larger
            records are refused on send
            (:class:`~protocol.errors.MessageTooLargeError`) and dropped as
            ``malformed`` on receive.
        rekey_after_messages: Frames sent, or the peer's counter, at which
            :meth:`TransportSession.needs_rekey` turns true. Policy: the
            initiator re-handshakes; these keys keep working meanwhile.
        reject_after_messages: First counter that is never used. Policy: seal
            raises, open drops as ``exhausted``: a new handshake is required.
        rekey_after_time: Session age in seconds at which
            :meth:`TransportSession.needs_rekey` turns true.
        reject_after_time: Session age in seconds after which the keys are
            refused (hard stop), when ``now`` is passed to seal and open.
        rekey_grace: Seconds a :meth:`TransportSession.retire`-d session still
            opens records of the old keys (never past ``reject_after_time``).
        max_consecutive_auth_failures: ``auth_fail`` drops in a row that tear
            the session down. Policy: tear down, re-handshake, alert.
        max_auth_failures: ``auth_fail`` drops in the session's life that tear
            it down. Same policy.
        replay_window: Bits in the :class:`ReplayWindow`.
    """

    max_record_plaintext: int = 4096
    rekey_after_messages: int = 1 << 20
    reject_after_messages: int = 1 << 32
    rekey_after_time: float = 600.0
    reject_after_time: float = 1200.0
    rekey_grace: float = 60.0
    max_consecutive_auth_failures: int = 64
    max_auth_failures: int = 1 << 16
    replay_window: int = 1024

    def __post_init__(self) -> None:
        """Reject limits that cannot work."""
        if not 0 <= self.max_record_plaintext <= _MAX_PLAINTEXT_CAP:
            raise ValueError(f"max_record_plaintext must be 0..{_MAX_PLAINTEXT_CAP}")
        if not 1 <= self.rekey_after_messages <= self.reject_after_messages:
            raise ValueError("need 1 <= rekey_after_messages <= reject_after_messages")
        if self.reject_after_messages > _MAX_COUNTERS:
            raise ValueError("reject_after_messages must be at most 2**64 - 1")
        if not 0 < self.rekey_after_time <= self.reject_after_time:
            raise ValueError("need 0 < rekey_after_time <= reject_after_time")
        if self.rekey_grace < 0:
            raise ValueError("rekey_grace must not be negative")
        for name in (
            "max_consecutive_auth_failures",
            "max_auth_failures",
            "replay_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


DEFAULT_TRANSPORT_LIMITS: Final = TransportLimits()


class ReplayWindow:
    """A sliding window over authenticated counters (RFC 4303 §3.4.3).

    Bit ``i`` of :attr:`bitmap` says whether counter ``highest - i`` was
    accepted. A counter is acceptable if it is above :attr:`highest`, or within
    the window and not yet seen. Call :meth:`check` (or :meth:`accepts`)
    *before* the AEAD and :meth:`commit` only *after* it passes, so forgeries
    never move the window (SECURITY.md §1 "Replay").
    """

    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = 1024) -> None:
        """Create an empty window of ``size`` bits.

        Raises:
            ValueError: ``size`` is less than 1.
        """
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self._size = size
        self._mask = (1 << size) - 1
        self._highest = -1
        self._bits = 0

    @property
    def size(self) -> int:
        """Counters the window spans."""
        return self._size

    @property
    def highest(self) -> int:
        """Highest committed counter, or -1 before the first commit."""
        return self._highest

    @property
    def bitmap(self) -> int:
        """Seen-bits, bit ``i`` for counter ``highest - i`` (read-only copy)."""
        return self._bits

    def accepts(self, counter: int) -> bool:
        """Return whether ``counter`` is new and not too old; no side effects."""
        if counter > self._highest:
            return True
        offset = self._highest - counter
        return counter >= 0 and offset < self._size and not (self._bits >> offset) & 1

    def check(self, counter: int) -> None:
        """Refuse a replayed or too old ``counter``; change nothing.

        Call before the AEAD.

        Raises:
            ReplayError: ``counter`` was committed before or is older than the
                window.
            LocalProtocolError: ``counter`` is negative.
        """
        if counter < 0:
            raise LocalProtocolError("counter must not be negative")
        if not self.accepts(counter):
            raise ReplayError("counter replayed or older than the replay window")

    def commit(self, counter: int) -> None:
        """Record ``counter`` as accepted; call only after the AEAD passed.

        Raises:
            LocalProtocolError: ``counter`` would not pass :meth:`check` (a
                caller bug: commit without a passing check).
        """
        if counter < 0 or not self.accepts(counter):
            raise LocalProtocolError("commit of a counter the window refuses")
        shift = counter - self._highest
        if shift > 0:
            if shift < self._size:
                self._bits = ((self._bits << shift) | 1) & self._mask
            else:
                self._bits = 1
            self._highest = counter
        else:
            self._bits |= 1 << -shift

    def __repr__(self) -> str:
        """Size and highest counter only."""
        return f"ReplayWindow(size={self._size}, highest={self._highest})"


@dataclass(frozen=True, slots=True)
class _Rejection:
    """One way a record is refused: its drop reason and how to raise it."""

    reason: DropReason
    message: str
    got_version: int = PROTOCOL_VERSION
    limit_name: str = ""
    limit: int = 0

    def error(self) -> RemoteProtocolError:
        """Build the typed error :meth:`TransportSession.open_or_raise` raises."""
        if self.reason is DropReason.REPLAY:
            return ReplayError(self.message)
        if self.reason is DropReason.AUTH_FAIL:
            return AuthenticationError(self.message)
        if self.reason is DropReason.EXHAUSTED:
            return LimitExceededError(
                self.message, limit_name=self.limit_name, limit=self.limit
            )
        if self.got_version != PROTOCOL_VERSION:
            return UnsupportedVersionError(
                self.message, got=self.got_version, supported=PROTOCOL_VERSION
            )
        return MalformedError(self.message)


_BAD_LENGTH: Final = _Rejection(
    DropReason.MALFORMED, "record length outside header + tag .. limit"
)
_NOT_DATA: Final = _Rejection(DropReason.MALFORMED, "not a DATA record")
_OTHER_SESSION: Final = _Rejection(
    DropReason.UNKNOWN_SESSION, "record for another session id"
)
_CLOSED: Final = _Rejection(DropReason.UNKNOWN_SESSION, "session closed or torn down")
_REPLAYED: Final = _Rejection(
    DropReason.REPLAY, "counter replayed or older than the replay window"
)
_AUTH_FAILED: Final = _Rejection(DropReason.AUTH_FAIL, "record failed authentication")


class TransportSession:
    """Seal and open DATA records of one session, one key per direction.

    docs/protocol.md §3, SECURITY.md §1.2. Construct it from the two keys the
    handshake's ``Split()`` yields: the initiator sends with the first and
    receives with the second, the responder the other way round. Using
    different keys per direction means a record can never be reflected back
    and accepted by its sender.

    The session never reads a clock: pass ``now`` (the same monotonic clock as
    ``started_at``) to :meth:`needs_rekey`, :meth:`is_expired`, and to
    :meth:`seal` / :meth:`open` to enforce the time-based hard stop.
    """

    __slots__ = (
        "_auth_fail_run",
        "_auth_fail_total",
        "_drops",
        "_exhausted_counter",
        "_exhausted_time",
        "_limits",
        "_max_record",
        "_recv",
        "_retired_at",
        "_send",
        "_send_counter",
        "_session_id",
        "_started_at",
        "_torn_down",
        "_window",
    )

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        session_id: int,
        limits: TransportLimits = DEFAULT_TRANSPORT_LIMITS,
        *,
        started_at: float,
    ) -> None:
        """Create a session; the raw keys are not kept, only cipher objects.

        Args:
            send_key: 32-byte key sealing our records.
            recv_key: 32-byte key opening the peer's records; must differ from
                ``send_key``.
            session_id: The u32 session id both sides put in the header.
            limits: Rekey, reject and teardown thresholds.
            started_at: When the handshake completed, on the caller's
                monotonic clock; session age is ``now - started_at``.

        Raises:
            LocalProtocolError: a key is not 32 bytes, both keys are equal, or
                ``session_id`` does not fit 32 bits.
        """
        if len(send_key) != KEY_SIZE or len(recv_key) != KEY_SIZE:
            raise LocalProtocolError("transport keys must be 32 bytes each")
        if hmac.compare_digest(send_key, recv_key):
            raise LocalProtocolError("send and receive keys must differ")
        if not 0 <= session_id < _U32:
            raise LocalProtocolError("session id must fit 32 bits")
        self._send: ChaCha20Poly1305 | None = ChaCha20Poly1305(send_key)
        self._recv: ChaCha20Poly1305 | None = ChaCha20Poly1305(recv_key)
        self._session_id = session_id
        self._limits = limits
        self._started_at = started_at
        self._max_record = _OVERHEAD + limits.max_record_plaintext
        self._send_counter = 0
        self._window = ReplayWindow(limits.replay_window)
        self._drops = dict.fromkeys(DropReason, 0)
        self._auth_fail_run = 0
        self._auth_fail_total = 0
        self._torn_down = False
        self._retired_at: float | None = None
        self._exhausted_counter = _Rejection(
            DropReason.EXHAUSTED,
            "record counter at or past reject_after_messages",
            limit_name="reject_after_messages",
            limit=limits.reject_after_messages,
        )
        self._exhausted_time = _Rejection(
            DropReason.EXHAUSTED,
            "session keys past reject_after_time or the rekey grace",
            limit_name="reject_after_time",
            limit=int(limits.reject_after_time),
        )

    # -- state ---------------------------------------------------------------

    @property
    def session_id(self) -> int:
        """The u32 session id in every record header."""
        return self._session_id

    @property
    def limits(self) -> TransportLimits:
        """The limits this session enforces."""
        return self._limits

    @property
    def started_at(self) -> float:
        """When the session started, on the caller's clock."""
        return self._started_at

    @property
    def send_counter(self) -> int:
        """The counter the next :meth:`seal` uses (= records sealed so far)."""
        return self._send_counter

    @property
    def replay_window(self) -> ReplayWindow:
        """The receive window; inspect it, never commit to it from outside."""
        return self._window

    @property
    def drops(self) -> Mapping[DropReason, int]:
        """A snapshot of dropped records per reason (every reason present)."""
        return dict(self._drops)

    @property
    def auth_failures(self) -> int:
        """``auth_fail`` drops over the session's life."""
        return self._auth_fail_total

    @property
    def consecutive_auth_failures(self) -> int:
        """``auth_fail`` drops since the last record that opened."""
        return self._auth_fail_run

    @property
    def is_torn_down(self) -> bool:
        """True once an ``auth_fail`` threshold was reached.

        The caller should then drop the session, re-handshake and alert; this
        session refuses to seal and drops every record as ``unknown_session``.
        """
        return self._torn_down

    @property
    def is_closed(self) -> bool:
        """True after :meth:`close`: the keys are gone."""
        return self._send is None

    @property
    def is_retired(self) -> bool:
        """True after :meth:`retire`."""
        return self._retired_at is not None

    def needs_rekey(self, now: float) -> bool:
        """Return whether a new handshake is due (SECURITY.md §1.2 rekey table).

        True from ``rekey_after_time`` of session age, once we have sealed
        ``rekey_after_messages`` records or the peer's counter has reached
        that many, and whenever the session is torn down, closed or expired.
        Call it after each seal/open and on a timer; the initiator then starts
        a handshake while this session keeps working.
        """
        limit = self._limits.rekey_after_messages
        return (
            now - self._started_at >= self._limits.rekey_after_time
            or self._send_counter >= limit
            or self._window.highest + 1 >= limit
            or self._torn_down
            or self._send is None
            or self.is_expired(now)
        )

    def is_expired(self, now: float) -> bool:
        """Return whether the keys are past their hard stop.

        True from ``reject_after_time`` of session age, after the grace of a
        retired session, once the send counter is exhausted, and when closed
        or torn down. Then :meth:`close` the session.
        """
        return (
            self._time_expired(now)
            or self._send_counter >= self._limits.reject_after_messages
            or self._torn_down
            or self._send is None
        )

    def retire(self, now: float) -> None:
        """Stop sealing: a new session took over at ``now``.

        Records of the old keys still open for ``rekey_grace`` seconds (when
        :meth:`open` gets ``now``), then :meth:`is_expired` turns true.
        Retiring again keeps the first time.
        """
        if self._retired_at is None:
            self._retired_at = now

    def close(self) -> None:
        """Forget both cipher objects; the session then refuses everything."""
        self._send = None
        self._recv = None

    # -- send ----------------------------------------------------------------

    def seal(
        self, plaintext: bytes | bytearray | memoryview, *, now: float | None = None
    ) -> bytes:
        """Seal ``plaintext`` into one encoded DATA record.

        The counter advances before encrypting, so it is never reused even if
        encryption fails.

        Args:
            plaintext: The record plaintext (one or more messages).
            now: The caller's clock; when given, the time-based hard stop is
                enforced too.

        Returns:
            Header (the associated data) || ciphertext || 16-byte tag.

        Raises:
            MessageTooLargeError: ``plaintext`` exceeds
                ``max_record_plaintext``.
            LocalProtocolError: the session is closed, torn down, retired or
                past ``reject_after_time``, or the send counter reached
                ``reject_after_messages``: a new handshake is needed.
        """
        cipher = self._send
        if cipher is None or self._torn_down:
            raise LocalProtocolError("session closed or torn down: re-handshake")
        if self._retired_at is not None:
            raise LocalProtocolError("session retired: seal on the new session")
        if now is not None and self._time_expired(now):
            raise LocalProtocolError("session keys too old: re-handshake")
        size = len(plaintext)
        limit = self._limits.max_record_plaintext
        if size > limit:
            raise MessageTooLargeError(
                "record plaintext exceeds max_record_plaintext", size=size, limit=limit
            )
        counter = self._send_counter
        if counter >= self._limits.reject_after_messages:
            raise LocalProtocolError("send counter exhausted: re-handshake")
        self._send_counter = counter + 1
        header = RecordHeader(RecordType.DATA, self._session_id, counter).encode()
        return header + cipher.encrypt(_NONCE.pack(counter), plaintext, header)

    # -- receive -------------------------------------------------------------

    def open(
        self, record: bytes | bytearray | memoryview, *, now: float | None = None
    ) -> bytes | None:
        """Open one DATA record; drop and count anything else.

        Never raises for any input bytes. A rejected record changes nothing
        but its reason's drop counter (and, for ``auth_fail``, the teardown
        counters).

        Args:
            record: One whole record as reassembled by the link layer.
            now: The caller's clock; when given, records are dropped as
                ``exhausted`` past ``reject_after_time`` or the rekey grace.

        Returns:
            The plaintext, or ``None`` if the record was dropped (see
            :attr:`drops` for why).
        """
        result = self._open(record, now)
        return result if isinstance(result, bytes) else None

    def open_or_raise(
        self, record: bytes | bytearray | memoryview, *, now: float | None = None
    ) -> bytes:
        """Like :meth:`open` (same checks, same counters), but raise on a drop.

        Returns:
            The plaintext.

        Raises:
            MalformedError: ``malformed`` (length or type) or
                ``unknown_session``.
            UnsupportedVersionError: ``malformed`` because of the version byte.
            LimitExceededError: ``exhausted``; ``limit_name`` says which limit.
            ReplayError: ``replay``.
            AuthenticationError: ``auth_fail``.
        """
        result = self._open(record, now)
        if isinstance(result, bytes):
            return result
        raise result.error()

    def _open(
        self, record: bytes | bytearray | memoryview, now: float | None
    ) -> bytes | _Rejection:
        """The one receive path: checks cheapest first, state after the AEAD."""
        data = record if type(record) is bytes else bytes(record)
        if not _OVERHEAD <= len(data) <= self._max_record:
            return self._drop(_BAD_LENGTH)
        version, rtype, session_id, counter = _HEADER.unpack_from(data)
        if version != PROTOCOL_VERSION:
            return self._drop(
                _Rejection(
                    DropReason.MALFORMED,
                    "record from another protocol version",
                    got_version=version,
                )
            )
        if rtype != _DATA:
            return self._drop(_NOT_DATA)
        if session_id != self._session_id:
            return self._drop(_OTHER_SESSION)
        cipher = self._recv
        if cipher is None or self._torn_down:
            return self._drop(_CLOSED)
        if counter >= self._limits.reject_after_messages:
            return self._drop(self._exhausted_counter)
        if now is not None and self._time_expired(now):
            return self._drop(self._exhausted_time)
        if not self._window.accepts(counter):
            return self._drop(_REPLAYED)
        try:
            plaintext = cipher.decrypt(
                _NONCE.pack(counter),
                data[RECORD_HEADER_SIZE:],
                data[:RECORD_HEADER_SIZE],
            )
        except InvalidTag:
            self._auth_fail_run += 1
            self._auth_fail_total += 1
            limits = self._limits
            if (
                self._auth_fail_run >= limits.max_consecutive_auth_failures
                or self._auth_fail_total >= limits.max_auth_failures
            ):
                self._torn_down = True
            return self._drop(_AUTH_FAILED)
        self._window.commit(counter)
        self._auth_fail_run = 0
        return plaintext

    def _drop(self, rejection: _Rejection) -> _Rejection:
        self._drops[rejection.reason] += 1
        return rejection

    def _time_expired(self, now: float) -> bool:
        limits = self._limits
        if now - self._started_at >= limits.reject_after_time:
            return True
        retired = self._retired_at
        return retired is not None and now - retired >= limits.rekey_grace

    def __repr__(self) -> str:
        """Session id, counters and state only; never keys or plaintext."""
        return (
            f"TransportSession(session_id=0x{self._session_id:08x}, "
            f"sent={self._send_counter}, highest_received={self._window.highest}, "
            f"drops={sum(self._drops.values())}, torn_down={self._torn_down}, "
            f"closed={self._send is None})"
        )
