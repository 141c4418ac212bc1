"""The session: the one object the relay drives per link (docs/protocol.md §8).

It stacks the link layer (fragments), records, the Noise handshake, the AEAD
transport, messages and the delivery rules, sans-I/O::

    session = Session(Role.PHONE, identity, policy, delivery=delivery)
    session.initiate(now)                    # phone only
    # for every GATT value the link delivers:
    session.receive_fragment(value, now)
    # whenever the link can take a write:
    fragment = session.pull_fragment(link.max_fragment_size)
    # after every input: events_received(), get_timer(); handle_timer(now)

Every connection runs ``Noise_XX_25519_ChaChaPoly_SHA256`` with pinned static
keys before any application data; pairing runs ``Noise_XXpsk3`` with the
secret from the QR code (docs/security.md). Records of the data phase that do
not open are dropped and counted by reason; only a failure of the session
itself (handshake, version, pin, teardown, silence) raises, and then the
session is FAILED and the link should be closed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from protocol.bodies import Ack, Heartbeat
from protocol.constants import (
    DEFAULT_LIMITS,
    MESSAGE_ID_SIZE,
    RECORD_HEADER_SIZE,
    TAG_SIZE,
    AlertCode,
    Channel,
    Limits,
    MessageFlags,
    MessageKind,
    RecordType,
)
from protocol.delivery import AckCollector, DuplicateFilter, ReliableSender
from protocol.errors import (
    HandshakeError,
    LimitExceededError,
    LocalProtocolError,
    PeerNotPinnedError,
    RemoteProtocolError,
    UnsupportedVersionError,
)
from protocol.events import RecordDropped, RecordReassembled
from protocol.link import LinkSender, Reassembler
from protocol.message import Message, decode_messages, encode_messages
from protocol.noise import HandshakeState
from protocol.record import Alert, Record, RecordHeader
from protocol.transport import TransportLimits, TransportSession

__all__ = [
    "PAIRING_PROTOCOL",
    "PROLOGUE",
    "SESSION_PROTOCOL",
    "Delivery",
    "HandshakeCompleted",
    "Identity",
    "MessageReceived",
    "MessagesAcknowledged",
    "PeerPolicy",
    "RekeyDue",
    "Role",
    "Session",
    "SessionConfig",
    "SessionEvent",
    "SessionState",
]

SESSION_PROTOCOL: Final = "Noise_XX_25519_ChaChaPoly_SHA256"
PAIRING_PROTOCOL: Final = "Noise_XXpsk3_25519_ChaChaPoly_SHA256"
PROLOGUE: Final = b"glasses-relay/v1"
_RECORD_OVERHEAD: Final = RECORD_HEADER_SIZE + TAG_SIZE


class Role(enum.Enum):
    """Which end of the link: the phone initiates, the glasses respond."""

    PHONE = "phone"
    GLASSES = "glasses"


class SessionState(enum.Enum):
    """Life of a session; FAILED and CLOSED are final."""

    IDLE = "idle"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Identity:
    """This side's static X25519 key pair (raw 32-byte keys)."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        """Never show the private key."""
        return f"Identity(public={self.public.hex()[:16]}...)"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key pair (tests, tools; the daemon keeps its keys on disk)."""
        key = X25519PrivateKey.generate()
        return cls(
            key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Which peers this side accepts.

    Attributes:
        pinned: Static public keys of paired peers; a normal session accepts
            only these.
        pairing_psk: When set, run the pairing handshake (XXpsk3) with this
            32-byte PSK derived from the QR secret; the peer need not be
            pinned, and :class:`HandshakeCompleted` tells whom to pin.
        expected_peer: During pairing, the static key the peer must have
            (the glasses know the phone's from the QR code).
    """

    pinned: frozenset[bytes] = frozenset()
    pairing_psk: bytes | None = field(default=None, repr=False)
    expected_peer: bytes | None = None

    @property
    def pairing(self) -> bool:
        """Whether this policy runs the pairing handshake."""
        return self.pairing_psk is not None


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timers and limits of a session (named, with defaults).

    Attributes:
        limits: Link and message limits (:class:`~protocol.constants.Limits`).
        transport: AEAD, replay and rekey limits.
        handshake_timeout: Seconds for the whole handshake. Policy: the
            session fails; the relay backs off and reconnects.
        heartbeat_interval: Seconds of send silence after which a HEARTBEAT
            is sent.
        supervision_timeout: Seconds of receive silence after which the
            link is declared dead (the session fails).
        max_record_plaintext: Bytes of messages packed into one record.
        resend_after: Seconds a reliable message may stay unacknowledged on a
            live link before it is sent again (a record lost to tampering or a
            full receive queue); a new link resends everything at once.
        ack_delay: Seconds an acknowledgement may wait for others to share
            its record (delayed ACK, as in TCP): each ACK is a record of its
            own, sealed and written, so at a steady rate one per message
            would cost both ends a write and a radio packet each. Policy:
            pending acknowledgements go out when this much time has passed
            since the first of them, when ``ack_batch`` are pending, or at
            once with any other outgoing record. 0 sends each at once. Keep
            it well under ``resend_after`` and the peer's unacked window.
        ack_batch: Pending acknowledgements that go out without waiting.
    """

    limits: Limits = DEFAULT_LIMITS
    transport: TransportLimits = field(
        default_factory=lambda: TransportLimits(
            max_record_plaintext=DEFAULT_LIMITS.max_record_size - _RECORD_OVERHEAD
        )
    )
    handshake_timeout: float = 5.0
    heartbeat_interval: float = 2.0
    supervision_timeout: float = 8.0
    max_record_plaintext: int = 4096
    resend_after: float = 5.0
    ack_delay: float = 0.05
    ack_batch: int = 8

    def __post_init__(self) -> None:
        """Reject values that cannot work together."""
        if not 0 <= self.ack_delay < self.resend_after:
            raise ValueError("ack_delay must be >= 0 and below resend_after")
        if self.ack_batch < 1:
            raise ValueError("ack_batch must be >= 1")
        if self.heartbeat_interval <= 0 or self.handshake_timeout <= 0:
            raise ValueError("heartbeat_interval and handshake_timeout must be > 0")
        if self.supervision_timeout <= self.heartbeat_interval:
            raise ValueError("supervision_timeout must exceed heartbeat_interval")
        if self.transport.max_record_plaintext + _RECORD_OVERHEAD > (
            self.limits.max_record_size
        ):
            raise ValueError("transport.max_record_plaintext exceeds max_record_size")


class Delivery:
    """Delivery state that outlives one connection: unacked sends and seen ids.

    Keep one per peer and hand it to every :class:`Session` with that peer,
    so unacknowledged messages are resent after a reconnect and duplicates
    are recognised across connections.
    """

    __slots__ = ("in_progress", "seen", "sender")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        """Create empty state."""
        self.sender = ReliableSender(limits)
        self.seen = DuplicateFilter(limits)
        self.in_progress: set[bytes] = set()


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """The peer proved ``peer_static``; data may flow (pin it when pairing)."""

    peer_static: bytes
    session_id: int
    pairing: bool


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A new message from the peer (duplicates never appear here)."""

    message: Message
    channel: Channel


@dataclass(frozen=True, slots=True)
class MessagesAcknowledged:
    """The peer acknowledged these reliable messages; they are forgotten."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class RekeyDue:
    """The session's keys reached a rekey limit: connect again for a new handshake.

    Reported once, by the phone (the initiator). The keys keep working until
    their hard limits, so nothing is lost while the link is renewed.
    """

    session_id: int


SessionEvent = HandshakeCompleted | MessageReceived | MessagesAcknowledged | RekeyDue

_CHANNEL_OF: Final[Mapping[MessageKind, Channel]] = {
    MessageKind.ACK: Channel.CONTROL,
    MessageKind.CREDIT: Channel.CONTROL,
    MessageKind.HEARTBEAT: Channel.CONTROL,
    MessageKind.CANCEL: Channel.CONTROL,
    MessageKind.CLOCK_SYNC: Channel.CONTROL,
    MessageKind.AUDIO_CHUNK: Channel.STREAM,
    MessageKind.RESPONSE_AUDIO: Channel.STREAM,
    MessageKind.PHOTO_CHUNK: Channel.BULK,
}


def _is_complete(handshake: HandshakeState) -> bool:
    return handshake.is_complete


def _expects_message(handshake: HandshakeState) -> bool:
    return not handshake.is_our_turn and not handshake.is_complete


def channel_for(kind: MessageKind) -> Channel:
    """The channel a message of ``kind`` travels on by default."""
    return _CHANNEL_OF.get(kind, Channel.INTERACTIVE)


class Session:
    """One connection's protocol state; see the module docstring for the loop."""

    def __init__(
        self,
        role: Role,
        identity: Identity,
        policy: PeerPolicy,
        *,
        delivery: Delivery | None = None,
        config: SessionConfig | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """Create a session for a new connection.

        Raises:
            LocalProtocolError: the keys do not fit the chosen handshake.
        """
        self.role = role
        self._config = config or SessionConfig()
        self._limits = self._config.limits
        self._policy = policy
        self._delivery = delivery or Delivery(self._limits)
        self._randbytes = randbytes
        self._link_out = LinkSender(self._limits)
        self._link_in = Reassembler(self._limits)
        self._acks = AckCollector()
        self._acks_since: float | None = None
        """When the oldest pending acknowledgement was added (``_now`` then)."""
        self._acks_due = False
        protocol = PAIRING_PROTOCOL if policy.pairing else SESSION_PROTOCOL
        psks = (policy.pairing_psk,) if policy.pairing_psk is not None else ()
        self._handshake: HandshakeState | None = HandshakeState(
            protocol,
            initiator=role is Role.PHONE,
            prologue=PROLOGUE,
            static_key=identity.private,
            psks=psks,
        )
        self._transport: TransportSession | None = None
        self._state = SessionState.IDLE
        self._events: list[SessionEvent] = []
        self._deadline: float | None = None
        self._last_sent = 0.0
        self._last_received = 0.0
        self._peer_static: bytes | None = None
        self._confirmed = False
        self._rekey_reported = False
        self._now = 0.0
        self._sent_at: dict[bytes, float] = {}
        self._pending: list[tuple[Channel, Message]] = []
        self.link_drops: dict[str, int] = {}
        self.duplicates = 0

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is in its life."""
        return self._state

    @property
    def peer_static(self) -> bytes | None:
        """The peer's static public key once the handshake proved it."""
        return self._peer_static

    @property
    def transport(self) -> TransportSession | None:
        """The AEAD transport once established (drop counters live there)."""
        return self._transport

    @property
    def delivery(self) -> Delivery:
        """The delivery state handed in (or created) for this peer."""
        return self._delivery

    @property
    def expected_fragment_seq(self) -> int:
        """The sequence number the next incoming fragment should carry."""
        return self._link_in.expected_seq

    @property
    def has_output(self) -> bool:
        """Whether :meth:`pull_fragment` has something to return now."""
        return self._link_out.pending_bytes > 0 or self._acks_ready()

    def _acks_ready(self) -> bool:
        """Whether pending acknowledgements go out now (see ``ack_delay``)."""
        pending = len(self._acks)
        return pending > 0 and (
            self._acks_due
            or pending >= self._config.ack_batch
            or self._config.ack_delay <= 0
        )

    def _add_ack(self, message_id: bytes) -> None:
        if not self._acks:
            self._acks_since = self._now
        self._acks.add(message_id)

    @property
    def queued_bytes(self) -> int:
        """Record bytes waiting for :meth:`pull_fragment`."""
        return self._link_out.pending_bytes

    # -- inputs ------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Start the handshake (the phone calls this right after connecting).

        Raises:
            LocalProtocolError: not the phone, or already started.
        """
        if self.role is not Role.PHONE or self._state is not SessionState.IDLE:
            raise LocalProtocolError("only an idle phone session initiates")
        self._start(now)
        self._write_handshake()

    def _start(self, now: float) -> None:
        self._state = SessionState.HANDSHAKING
        self._deadline = now + self._config.handshake_timeout
        self._last_received = now
        self._last_sent = now

    def receive_fragment(
        self, data: bytes | bytearray | memoryview, now: float
    ) -> None:
        """Take one GATT value from the link.

        Raises:
            RemoteProtocolError: the session failed (handshake, version, pin,
                teardown); close the link. Bad fragments and records in the
                data phase are dropped and counted instead.
        """
        if self._state in (SessionState.FAILED, SessionState.CLOSED):
            return
        if self._state is SessionState.IDLE:
            if self.role is Role.PHONE:
                return
            self._start(now)
        self._last_received = now
        self._now = now
        try:
            events = self._link_in.feed(data, now)
        except RemoteProtocolError:
            self._count("malformed_fragment")
            return
        for event in events:
            if isinstance(event, RecordReassembled):
                self._on_record(event, now)
                if self._has_failed():
                    return
            elif isinstance(event, RecordDropped):
                self._count(f"record_{event.reason}")
            else:
                self._count(type(event).__name__)

    def _has_failed(self) -> bool:
        return self._state is SessionState.FAILED

    def _count(self, reason: str) -> None:
        self.link_drops[reason] = self.link_drops.get(reason, 0) + 1

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        if self._state is SessionState.HANDSHAKING or not self._confirmed:
            # One generic refusal, whatever the reason (no oracle).
            self._link_out.queue(
                Alert(AlertCode.HANDSHAKE_FAILED).to_record().encode(), Channel.CONTROL
            )
        self._state = SessionState.FAILED
        self._handshake = None
        if self._transport is not None:
            self._transport.close()
        return error

    def _on_record(self, event: RecordReassembled, now: float) -> None:
        raw = event.record
        if len(raw) >= 2 and raw[1] == RecordType.DATA:
            self._on_data(raw, event.channel, now)
            return
        try:
            record = Record.decode(raw)
        except UnsupportedVersionError as exc:
            self._link_out.queue(
                Alert(AlertCode.UNSUPPORTED_VERSION).to_record().encode(),
                Channel.CONTROL,
            )
            self._confirmed = True  # the alert above says it all
            raise self._fail(exc) from None
        except RemoteProtocolError:
            self._count("malformed_record")
            return
        if record.header.type is RecordType.ALERT:
            try:
                alert = Alert.decode(record.body)
            except RemoteProtocolError:
                self._count("malformed_record")
                return
            if self._state is SessionState.HANDSHAKING or not self._confirmed:
                self._confirmed = True  # do not answer an alert with an alert
                raise self._fail(HandshakeError(f"peer refused: {alert.code.name}"))
            self._count("late_alert")
            return
        self._on_handshake(record, now)

    def _on_handshake(self, record: Record, now: float) -> None:
        if self._handshake is None or not _expects_message(self._handshake):
            self._count("unexpected_handshake")
            return
        handshake = self._handshake
        try:
            handshake.read_message(record.body)
        except RemoteProtocolError as exc:
            raise self._fail(HandshakeError("handshake message rejected")) from exc
        remote = handshake.remote_static
        if remote is not None and self._peer_static is None:
            self._check_peer(remote)
        if not handshake.is_complete and handshake.is_our_turn:
            self._write_handshake()
        if _is_complete(handshake):
            self._establish(now)

    def _check_peer(self, remote: bytes) -> None:
        policy = self._policy
        if policy.pairing:
            if policy.expected_peer is not None and remote != policy.expected_peer:
                raise self._fail(
                    PeerNotPinnedError("pairing peer is not the expected one")
                )
        elif remote not in policy.pinned:
            raise self._fail(PeerNotPinnedError("peer static key is not pinned"))
        self._peer_static = remote

    def _write_handshake(self) -> None:
        handshake = self._handshake
        assert handshake is not None  # noqa: S101
        message = handshake.write_message(b"")
        record = Record(RecordHeader(RecordType.HANDSHAKE, 0, 0), message)
        self._link_out.queue(record.encode(), Channel.CONTROL)

    def _establish(self, now: float) -> None:
        handshake = self._handshake
        assert handshake is not None  # noqa: S101
        if self._peer_static is None:  # pragma: no cover - XX always sends s
            raise self._fail(HandshakeError("peer sent no static key"))
        session_id = int.from_bytes(handshake.handshake_hash[:4], "big")
        initiator_key, responder_key = handshake.split_keys()
        if self.role is Role.PHONE:
            send, recv = initiator_key, responder_key
        else:
            send, recv = responder_key, initiator_key
        self._transport = TransportSession(
            send, recv, session_id, self._config.transport, started_at=now
        )
        self._handshake = None
        self._state = SessionState.ESTABLISHED
        # Messages handed to the application on an earlier link and never
        # acknowledged come again now; the application sees them again.
        self._delivery.in_progress.clear()
        if self.role is Role.GLASSES:
            # Key confirmation: the phone learns the PSK matched (pairing)
            # from the first record that opens.
            self._confirmed = True
            self._deadline = None
            self._emit_completed(session_id)
            self._send_now(self._heartbeat(now), Channel.CONTROL)
        self._resend_unacknowledged()
        for channel, message in self._pending:
            self._send_now(message, channel)
        self._pending.clear()

    def _emit_completed(self, session_id: int) -> None:
        assert self._peer_static is not None  # noqa: S101
        self._events.append(
            HandshakeCompleted(self._peer_static, session_id, self._policy.pairing)
        )

    def _resend_unacknowledged(self) -> None:
        for message in self._delivery.sender.unacknowledged():
            self._send_now(message, channel_for(message.kind))

    def _on_data(self, raw: bytes, channel: Channel, now: float) -> None:
        transport = self._transport
        if transport is None:
            self._count("data_before_handshake")
            return
        plaintext = transport.open(raw, now=now)
        if plaintext is None:
            if transport.is_torn_down:
                raise self._fail(
                    LimitExceededError(
                        "too many records failed authentication",
                        limit_name="max_consecutive_auth_failures",
                        limit=transport.limits.max_consecutive_auth_failures,
                    )
                )
            return
        if not self._confirmed:
            self._confirmed = True
            self._deadline = None
            self._emit_completed(transport.session_id)
        try:
            messages = decode_messages(plaintext, self._limits)
        except RemoteProtocolError:
            self._count("malformed_messages")
            return
        for message in messages:
            self._on_message(message, channel)

    def _on_message(self, message: Message, channel: Channel) -> None:
        delivery = self._delivery
        if message.kind is MessageKind.ACK:
            try:
                ids = Ack.decode(message.body).ids
            except RemoteProtocolError:
                self._count("malformed_ack")
                return
            done = delivery.sender.acknowledge(ids)
            if done:
                self._events.append(MessagesAcknowledged(tuple(done)))
            return
        if message.kind is MessageKind.HEARTBEAT:
            return
        if message.flags & MessageFlags.RELIABLE:
            mid = message.message_id
            if delivery.seen.seen(mid):
                # Processed before: acknowledge again so the peer forgets it.
                self.duplicates += 1
                self._add_ack(mid)
                return
            if mid in delivery.in_progress:
                self.duplicates += 1
                return
            delivery.in_progress.add(mid)
        self._events.append(MessageReceived(message, channel))

    def acknowledge(self, message_id: bytes, now: float | None = None) -> None:
        """Acknowledge a reliable message once it is durable or answered.

        The id is remembered as processed (later copies are dropped and
        re-acknowledged) and goes out in the next ACK (``ack_delay`` counts
        from ``now``; without it, from the last time the session was given).

        Raises:
            LocalProtocolError: the id is not 16 bytes.
        """
        if len(message_id) != MESSAGE_ID_SIZE:
            raise LocalProtocolError("message id must be 16 bytes")
        if now is not None:
            self._now = now
        self._delivery.in_progress.discard(message_id)
        self._delivery.seen.remember(message_id)
        self._add_ack(message_id)

    def abandon(self, message_id: bytes) -> None:
        """Forget a received message without acknowledging it (so it is resent)."""
        self._delivery.in_progress.discard(message_id)

    def can_send_reliable(self, size: int) -> bool:
        """Whether a reliable message of ``size`` bytes fits the unacked limits."""
        return self._delivery.sender.has_room(size + 26)

    def send(
        self, message: Message, now: float, channel: Channel | None = None
    ) -> None:
        """Send ``message``; reliable ones are kept until acknowledged.

        Before the handshake completes, messages wait and go out right after
        it (never before: there is no 0-RTT data).

        Raises:
            LocalProtocolError: the session is failed or closed, or the
                unacknowledged-message limit is reached (backpressure: check
                :meth:`can_send_reliable`).
            MessageTooLargeError: the message exceeds a size limit.
        """
        if self._state in (SessionState.FAILED, SessionState.CLOSED):
            raise LocalProtocolError(f"session is {self._state.value}")
        channel = channel_for(message.kind) if channel is None else channel
        message.encode(self._limits)  # size check before any state changes
        if message.flags & MessageFlags.RELIABLE:
            self._delivery.sender.track(message)
            if self._state is not SessionState.ESTABLISHED:
                return  # resent from the sender on establishment
        if self._state is not SessionState.ESTABLISHED:
            self._pending.append((channel, message))
            return
        self._now = now
        self._send_now(message, channel)
        self._last_sent = now

    def _send_now(self, message: Message, channel: Channel) -> None:
        if message.flags & MessageFlags.RELIABLE:
            self._sent_at[message.message_id] = self._now
        self._send_batch([message], channel)

    def _send_batch(self, messages: list[Message], channel: Channel) -> None:
        transport = self._transport
        assert transport is not None  # noqa: S101
        plaintext = encode_messages(messages, self._limits)
        self._link_out.queue(transport.seal(plaintext), channel)

    def _heartbeat(self, now: float) -> Message:
        return Message(
            MessageKind.HEARTBEAT,
            self._randbytes(MESSAGE_ID_SIZE),
            Heartbeat(int(now * 1e6) & ((1 << 64) - 1)).encode(),
        )

    def _flush_acks(self) -> None:
        if self._transport is None or self._state is not SessionState.ESTABLISHED:
            return
        while (ack := self._acks.take(self._randbytes(MESSAGE_ID_SIZE))) is not None:
            self._send_now(ack, Channel.CONTROL)
        self._acks_since = None
        self._acks_due = False

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now``: timeouts, heartbeats, reassembly expiry.

        Raises:
            HandshakeError: the handshake took longer than handshake_timeout.
            LimitExceededError: the peer was silent past supervision_timeout.
        """
        if self._state in (SessionState.FAILED, SessionState.CLOSED, SessionState.IDLE):
            return
        self._now = now
        for event in self._link_in.expire(now):
            if isinstance(event, RecordDropped):
                self._count(f"record_{event.reason}")
        if self._deadline is not None and now >= self._deadline:
            raise self._fail(HandshakeError("handshake timed out"))
        if self._state is SessionState.HANDSHAKING:
            return
        if now - self._last_received >= self._config.supervision_timeout:
            raise self._fail(
                LimitExceededError(
                    "peer silent past supervision_timeout",
                    limit_name="supervision_timeout",
                    limit=int(self._config.supervision_timeout),
                )
            )
        if (
            self._acks_since is not None
            and now >= self._acks_since + self._config.ack_delay
        ):
            self._acks_due = True
        if now - self._last_sent >= self._config.heartbeat_interval:
            self._send_now(self._heartbeat(now), Channel.CONTROL)
            self._last_sent = now
        self._resend_overdue(now)
        transport = self._transport
        if (
            self.role is Role.PHONE
            and not self._rekey_reported
            and transport is not None
            and transport.needs_rekey(now)
        ):
            self._rekey_reported = True
            self._events.append(RekeyDue(transport.session_id))

    def _resend_overdue(self, now: float) -> None:
        sender = self._delivery.sender
        after = self._config.resend_after
        for mid, sent in list(self._sent_at.items()):
            if not sender.is_pending(mid):
                del self._sent_at[mid]
            elif now - sent >= after:
                message = sender.message(mid)
                if message is not None:
                    self._send_now(
                        message.with_flags(MessageFlags.RETRANSMIT),
                        channel_for(message.kind),
                    )

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run, or ``None``."""
        if self._state is SessionState.HANDSHAKING:
            return self._deadline
        if self._state is not SessionState.ESTABLISHED:
            return None
        times = [
            self._last_received + self._config.supervision_timeout,
            self._last_sent + self._config.heartbeat_interval,
        ]
        if self._deadline is not None:
            times.append(self._deadline)
        transport = self._transport
        if (
            self.role is Role.PHONE
            and transport is not None
            and not self._rekey_reported
        ):
            times.append(transport.started_at + transport.limits.rekey_after_time)
        expiry = self._link_in.get_timer()
        if expiry is not None:
            times.append(expiry)
        if self._acks_since is not None and not self._acks_due:
            times.append(self._acks_since + self._config.ack_delay)
        return min(times)

    # -- outputs -----------------------------------------------------------

    def pull_fragment(self, max_fragment_size: int) -> bytes | None:
        """Return the next GATT value to write, or ``None`` when idle.

        Pending acknowledgements are packed first when any other record is
        queued (they ride along) or when they are due (``ack_delay``,
        ``ack_batch``; :attr:`has_output` says so).
        """
        if self._acks and self.has_output:
            self._flush_acks()
        return self._link_out.pull(max_fragment_size)

    def events_received(self) -> list[SessionEvent]:
        """Return and clear the events since the last call."""
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """End the session (the link is gone); keys are dropped."""
        self._state = SessionState.CLOSED
        self._handshake = None
        if self._transport is not None:
            self._transport.close()
        self._link_out.clear()
        self._pending.clear()
