"""The session: handshake with pins, pairing, messages, delivery, supervision."""

from __future__ import annotations

import os
import random

import pytest

from protocol.bodies import Telemetry
from protocol.constants import MessageFlags, MessageKind
from protocol.errors import HandshakeError, LimitExceededError, RemoteProtocolError
from protocol.message import Message
from protocol.session import (
    Delivery,
    HandshakeCompleted,
    Identity,
    MessageReceived,
    MessagesAcknowledged,
    PeerPolicy,
    Role,
    Session,
    SessionConfig,
    SessionState,
)


def make_identity() -> Identity:
    return Identity.generate()


PHONE = make_identity()
GLASSES = make_identity()


class SessionPair:
    """Two sessions wired back to back (h11's ConnectionPair)."""

    def __init__(
        self,
        phone_policy: PeerPolicy | None = None,
        glasses_policy: PeerPolicy | None = None,
        *,
        phone_delivery: Delivery | None = None,
        glasses_delivery: Delivery | None = None,
        fragment_size: int = 20,
        config: SessionConfig | None = None,
    ) -> None:
        self.phone = Session(
            Role.PHONE,
            PHONE,
            phone_policy or PeerPolicy(pinned=frozenset({GLASSES.public})),
            delivery=phone_delivery,
            config=config,
        )
        self.glasses = Session(
            Role.GLASSES,
            GLASSES,
            glasses_policy or PeerPolicy(pinned=frozenset({PHONE.public})),
            delivery=glasses_delivery,
            config=config,
        )
        self.size = fragment_size
        self.now = 0.0
        self.wire: list[tuple[str, bytes]] = []

    def pump(self, *, tamper=None) -> None:  # type: ignore[no-untyped-def]
        moved = True
        while moved:
            moved = False
            for src, dst, name in (
                (self.phone, self.glasses, "up"),
                (self.glasses, self.phone, "down"),
            ):
                while (piece := src.pull_fragment(self.size)) is not None:
                    moved = True
                    self.wire.append((name, piece))
                    if tamper is not None:
                        piece = tamper(name, piece)
                        if piece is None:
                            continue
                    dst.receive_fragment(piece, self.now)

    def connect(self) -> None:
        self.phone.initiate(self.now)
        self.pump()


def telemetry(i: int, *, reliable: bool = True) -> Message:
    return Message(
        MessageKind.TELEMETRY,
        os.urandom(16),
        Telemetry(i % 100, False, i).encode(),
        MessageFlags.RELIABLE if reliable else MessageFlags.NONE,
    )


def received(session: Session) -> list[Message]:
    return [
        e.message for e in session.events_received() if isinstance(e, MessageReceived)
    ]


def test_handshake_completes_with_pinned_keys_at_mtu_23() -> None:
    pair = SessionPair()
    pair.connect()
    assert pair.phone.state is SessionState.ESTABLISHED
    assert pair.glasses.state is SessionState.ESTABLISHED
    phone_events = pair.phone.events_received()
    glasses_events = pair.glasses.events_received()
    assert phone_events == [
        HandshakeCompleted(GLASSES.public, pair.phone.transport.session_id, False)  # type: ignore[union-attr]
    ]
    assert glasses_events[0].peer_static == PHONE.public  # type: ignore[union-attr]
    assert pair.phone.transport.session_id == pair.glasses.transport.session_id  # type: ignore[union-attr]
    assert all(len(p) <= 20 for _, p in pair.wire)


def test_unpinned_glasses_are_refused_by_the_phone() -> None:
    pair = SessionPair(phone_policy=PeerPolicy(pinned=frozenset({os.urandom(32)})))
    with pytest.raises(HandshakeError):
        pair.connect()
    assert pair.phone.state is SessionState.FAILED


def test_unpinned_phone_is_refused_by_the_glasses() -> None:
    pair = SessionPair(glasses_policy=PeerPolicy(pinned=frozenset({os.urandom(32)})))
    with pytest.raises(HandshakeError):
        pair.connect()
    assert pair.glasses.state is SessionState.FAILED
    # The glasses' refusal reaches the phone, which never saw key confirmation.
    with pytest.raises(HandshakeError, match="HANDSHAKE_FAILED"):
        pair.pump()
    assert pair.phone.state is SessionState.FAILED
    assert pair.phone.events_received() == []


def test_phone_without_key_confirmation_times_out() -> None:
    pair = SessionPair()
    pair.phone.initiate(0.0)
    # Deliver only the phone's messages; the glasses' answers after msg2 vanish.
    pair.pump(
        tamper=lambda d, p: (
            p if d == "up" or pair.glasses.state.value == "handshaking" else None
        )
    )
    assert pair.phone.state is SessionState.ESTABLISHED
    with pytest.raises(HandshakeError):
        pair.phone.handle_timer(5.0)


def test_pairing_pins_on_key_confirmation() -> None:
    psk = os.urandom(32)
    pair = SessionPair(
        phone_policy=PeerPolicy(pairing_psk=psk),
        glasses_policy=PeerPolicy(pairing_psk=psk, expected_peer=PHONE.public),
    )
    pair.connect()
    (done,) = pair.phone.events_received()
    assert done == HandshakeCompleted(GLASSES.public, done.session_id, True)  # type: ignore[union-attr]


def test_pairing_with_a_wrong_secret_fails_on_the_glasses() -> None:
    pair = SessionPair(
        phone_policy=PeerPolicy(pairing_psk=os.urandom(32)),
        glasses_policy=PeerPolicy(
            pairing_psk=os.urandom(32), expected_peer=PHONE.public
        ),
    )
    with pytest.raises(HandshakeError):
        pair.connect()
    assert pair.phone.events_received() == []  # never confirmed, never pinned


def test_pairing_with_another_phone_key_fails() -> None:
    psk = os.urandom(32)
    pair = SessionPair(
        phone_policy=PeerPolicy(pairing_psk=psk),
        glasses_policy=PeerPolicy(pairing_psk=psk, expected_peer=os.urandom(32)),
    )
    with pytest.raises(HandshakeError):
        pair.connect()


def test_messages_both_ways_and_acks_release_the_sender() -> None:
    pair = SessionPair()
    pair.connect()
    pair.phone.events_received()
    pair.glasses.events_received()
    sent = [telemetry(i) for i in range(50)]
    for m in sent:
        pair.glasses.send(m, 0.0)
    pair.pump()
    got = received(pair.phone)
    assert [m.message_id for m in got] == [m.message_id for m in sent]
    assert pair.glasses.delivery.sender.stats.messages == 50
    for m in got:
        pair.phone.acknowledge(m.message_id)
    pair.pump()
    acked = [
        e for e in pair.glasses.events_received() if isinstance(e, MessagesAcknowledged)
    ]
    assert sum(len(e.messages) for e in acked) == 50
    assert pair.glasses.delivery.sender.stats.messages == 0


def test_unacked_messages_resend_after_reconnect_and_duplicates_drop() -> None:
    glasses_delivery = Delivery()
    phone_delivery = Delivery()
    pair = SessionPair(phone_delivery=phone_delivery, glasses_delivery=glasses_delivery)
    pair.connect()
    sent = [telemetry(i) for i in range(10)]
    for m in sent:
        pair.glasses.send(m, 0.0)
    pair.pump()
    first = received(pair.phone)
    # The phone made the first five durable; the link drops before the ACK leaves.
    for m in first[:5]:
        pair.phone.acknowledge(m.message_id)
    pair.phone.close()
    pair.glasses.close()
    for m in first[5:]:
        pair.phone.abandon(m.message_id)
    pair2 = SessionPair(
        phone_delivery=phone_delivery, glasses_delivery=glasses_delivery
    )
    pair2.connect()
    again = received(pair2.phone)
    # All ten come again; the five processed ones are dropped and re-acked.
    assert [m.message_id for m in again] == [m.message_id for m in sent[5:]]
    assert pair2.phone.duplicates == 5
    for m in again:
        pair2.phone.acknowledge(m.message_id)
    pair2.pump()
    assert glasses_delivery.sender.stats.messages == 0


def test_messages_sent_before_the_handshake_wait_for_it() -> None:
    pair = SessionPair()
    early = telemetry(1, reliable=False)
    pair.phone.send(early, 0.0)
    pair.connect()
    assert [m.message_id for m in received(pair.glasses)] == [early.message_id]


def test_large_message_crosses_at_mtu_23() -> None:
    pair = SessionPair()
    pair.connect()
    big = Message(MessageKind.PHOTO_CHUNK, os.urandom(16), os.urandom(200_000))
    pair.phone.send(big, 0.0)
    pair.pump()
    assert received(pair.glasses) == [big]


def test_tampered_data_records_are_dropped_and_counted_not_raised() -> None:
    pair = SessionPair()
    pair.connect()
    pair.glasses.events_received()
    rng = random.Random(1)

    def flip(direction: str, piece: bytes) -> bytes:
        if direction == "up" and len(piece) > 3:
            data = bytearray(piece)
            data[rng.randrange(2, len(data))] ^= 1
            return bytes(data)
        return piece

    for i in range(20):
        pair.phone.send(telemetry(i, reliable=False), 0.0)
    pair.pump(tamper=flip)
    assert received(pair.glasses) == []
    drops = pair.glasses.transport.drops  # type: ignore[union-attr]
    assert sum(drops.values()) + sum(pair.glasses.link_drops.values()) > 0
    assert pair.glasses.state is SessionState.ESTABLISHED


def test_replayed_records_are_dropped() -> None:
    pair = SessionPair()
    pair.connect()
    pair.glasses.events_received()
    pair.wire.clear()
    pair.phone.send(telemetry(1, reliable=False), 0.0)
    pair.pump()
    assert len(received(pair.glasses)) == 1
    up = [p for d, p in pair.wire if d == "up"]
    # Replay the same record under fresh fragment sequence numbers.
    from protocol.events import RecordReassembled
    from protocol.link import Reassembler, fragment_record

    reassembler = Reassembler(first_seq=int.from_bytes(up[0][:2], "big") & 0xFFF)
    records = [
        e.record
        for p in up
        for e in reassembler.feed(p, 0.0)
        if isinstance(e, RecordReassembled)
    ]
    seq = (int.from_bytes(up[-1][:2], "big") + 1) & 0xFFF
    for piece in fragment_record(records[0], 20, first_seq=seq):
        pair.glasses.receive_fragment(piece, 0.0)
    assert received(pair.glasses) == []
    assert pair.glasses.transport.drops["replay"] == 1  # type: ignore[union-attr,index]


def test_handshake_timeout() -> None:
    pair = SessionPair()
    pair.phone.initiate(0.0)
    assert pair.phone.get_timer() == 5.0
    pair.phone.handle_timer(4.9)
    with pytest.raises(HandshakeError):
        pair.phone.handle_timer(5.0)


def test_heartbeats_and_supervision() -> None:
    config = SessionConfig(heartbeat_interval=1.0, supervision_timeout=3.0)
    pair = SessionPair()
    pair.phone = Session(
        Role.PHONE, PHONE, PeerPolicy(pinned=frozenset({GLASSES.public})), config=config
    )
    pair.connect()
    assert pair.phone.get_timer() == 1.0
    pair.phone.handle_timer(1.0)  # sends a heartbeat
    assert pair.phone.pull_fragment(100) is not None
    # The glasses go silent: supervision declares the link dead.
    with pytest.raises(LimitExceededError) as info:
        pair.phone.handle_timer(3.0)
    assert info.value.limit_name == "supervision_timeout"


def test_another_protocol_version_is_refused_with_an_alert() -> None:
    pair = SessionPair()
    pair.phone.initiate(0.0)
    first = pair.phone.pull_fragment(200)
    assert first is not None
    bad = bytearray(first)
    bad[2] = 9  # record version byte, after the 2-byte fragment header
    with pytest.raises(RemoteProtocolError):
        pair.glasses.receive_fragment(bytes(bad), 0.0)
    alert = pair.glasses.pull_fragment(200)
    assert alert is not None
    with pytest.raises(HandshakeError, match="UNSUPPORTED_VERSION"):
        pair.phone.receive_fragment(alert, 0.0)


def test_random_bytes_into_the_handshake_path_raise_only_remote_errors() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        glasses = Session(
            Role.GLASSES, GLASSES, PeerPolicy(pinned=frozenset({PHONE.public}))
        )
        for _ in range(rng.randrange(1, 4)):
            try:
                glasses.receive_fragment(rng.randbytes(rng.randrange(0, 120)), 0.0)
            except RemoteProtocolError:
                break


def has_output(session: Session) -> bool:
    """``session.has_output`` (a call, so mypy does not narrow it between reads)."""
    return session.has_output


def _acked(session: Session) -> int:
    return sum(
        len(e.messages)
        for e in session.events_received()
        if isinstance(e, MessagesAcknowledged)
    )


def test_acknowledgements_wait_for_ack_delay_unless_they_can_ride() -> None:
    pair = SessionPair(config=SessionConfig(ack_delay=0.05, ack_batch=3))
    pair.connect()
    pair.now = 1.0
    pair.phone.events_received()
    pair.glasses.events_received()
    first, second = telemetry(1), telemetry(2)
    for m in (first, second):
        pair.glasses.send(m, pair.now)
    pair.pump()
    assert len(received(pair.phone)) == 2
    pair.phone.acknowledge(first.message_id)
    # Alone, the acknowledgement waits: nothing to write, the timer says when.
    assert not has_output(pair.phone)
    assert pair.phone.pull_fragment(pair.size) is None
    assert pair.phone.get_timer() == pytest.approx(1.05)
    pair.phone.acknowledge(second.message_id)
    pair.now = 1.04
    pair.phone.handle_timer(pair.now)
    assert pair.phone.pull_fragment(pair.size) is None
    pair.now = 1.05
    pair.phone.handle_timer(pair.now)
    assert has_output(pair.phone)
    pair.pump()
    assert _acked(pair.glasses) == 2  # both in one ACK, 50 ms after the first
    # With another record going out, pending acknowledgements ride along.
    third = telemetry(3)
    pair.glasses.send(third, pair.now)
    pair.pump()
    received(pair.phone)
    pair.phone.acknowledge(third.message_id)
    pair.phone.send(telemetry(4), pair.now)
    pair.pump()
    assert _acked(pair.glasses) == 1
    # ack_batch pending go at once.
    batch = [telemetry(10 + i) for i in range(3)]
    for m in batch:
        pair.glasses.send(m, pair.now)
    pair.pump()
    for m in received(pair.phone):
        pair.phone.acknowledge(m.message_id)
    assert has_output(pair.phone)
    pair.pump()
    assert _acked(pair.glasses) == 3


def test_ack_delay_zero_acknowledges_at_once() -> None:
    pair = SessionPair(config=SessionConfig(ack_delay=0))
    pair.connect()
    pair.glasses.events_received()
    message = telemetry(1)
    pair.glasses.send(message, pair.now)
    pair.pump()
    (got,) = received(pair.phone)
    pair.phone.acknowledge(got.message_id)
    assert has_output(pair.phone)
    pair.pump()
    assert _acked(pair.glasses) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"ack_delay": -0.1}, {"ack_delay": 5.0, "resend_after": 5.0}, {"ack_batch": 0}],
)
def test_ack_settings_that_cannot_work_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="ack_"):
        SessionConfig(**kwargs)  # type: ignore[arg-type]
