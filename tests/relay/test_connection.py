"""The session driver over an in-memory link: handshake, traffic, loss, silence."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import cast

import pytest

from protocol.bodies import Telemetry
from protocol.constants import MessageFlags, MessageKind
from protocol.errors import HandshakeError, LimitExceededError, MalformedError
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
    SessionEvent,
)
from relay.ble.loopback import LoopbackLink, loopback_pair
from relay.connection import SessionDriver
from relay.errors import LinkError


def identity() -> Identity:
    return Identity.generate()


PHONE, GLASSES = identity(), identity()


def sessions(
    config: SessionConfig | None = None,
    phone_delivery: Delivery | None = None,
    glasses_delivery: Delivery | None = None,
) -> tuple[Session, Session]:
    phone = Session(
        Role.PHONE,
        PHONE,
        PeerPolicy(pinned=frozenset({GLASSES.public})),
        delivery=phone_delivery,
        config=config,
    )
    glasses = Session(
        Role.GLASSES,
        GLASSES,
        PeerPolicy(pinned=frozenset({PHONE.public})),
        delivery=glasses_delivery,
        config=config,
    )
    return phone, glasses


def telemetry(i: int) -> Message:
    return Message(
        MessageKind.TELEMETRY,
        os.urandom(16),
        Telemetry(i % 100, False, i).encode(),
        MessageFlags.RELIABLE,
    )


@dataclass
class Drivers:
    """Both ends driven over a loopback link of 20-byte fragments, running."""

    phone: SessionDriver
    glasses: SessionDriver
    phone_events: asyncio.Queue[SessionEvent]
    glasses_events: asyncio.Queue[SessionEvent]
    phone_link: LoopbackLink
    tasks: list[asyncio.Task[None]]


def start_drivers(config: SessionConfig | None = None) -> Drivers:
    phone_link, glasses_link = loopback_pair(20)
    phone_s, glasses_s = sessions(config)
    phone_events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    glasses_events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    phone = SessionDriver(phone_s, phone_link, phone_events.put_nowait, name="phone")
    glasses = SessionDriver(
        glasses_s, glasses_link, glasses_events.put_nowait, name="glasses"
    )
    phone_s.initiate(phone.now())
    tasks = [asyncio.create_task(phone.run()), asyncio.create_task(glasses.run())]
    return Drivers(phone, glasses, phone_events, glasses_events, phone_link, tasks)


async def test_traffic_both_ways_over_drivers() -> None:
    d = start_drivers()
    phone, glasses = d.phone, d.glasses
    phone_events, glasses_events = d.phone_events, d.glasses_events
    glasses_s = glasses.session
    async with asyncio.timeout(10):
        assert isinstance(await phone_events.get(), HandshakeCompleted)
        assert isinstance(await glasses_events.get(), HandshakeCompleted)
        sent = [telemetry(i) for i in range(500)]
        for m in sent:
            glasses.send(m)
        got: list[Message] = []
        while len(got) < len(sent):
            event = await phone_events.get()
            assert isinstance(event, MessageReceived)
            got.append(event.message)
            phone.acknowledge(event.message.message_id)
        assert [m.message_id for m in got] == [m.message_id for m in sent]
        acked = 0
        while acked < len(sent):
            event = await glasses_events.get()
            if isinstance(event, MessagesAcknowledged):
                acked += len(event.messages)
        assert glasses_s.delivery.sender.stats.messages == 0
    d.phone_link.cut()
    results = await asyncio.gather(*d.tasks, return_exceptions=True)
    assert all(isinstance(r, LinkError) for r in results)


async def test_a_lone_acknowledgement_leaves_on_the_driver_timer() -> None:
    """Nothing else to send: the driver's timer sends the ACK ack_delay later
    (not at once, and not only with the next heartbeat)."""
    config = SessionConfig(
        ack_delay=0.2, heartbeat_interval=5.0, supervision_timeout=10
    )
    d = start_drivers(config)
    phone, glasses = d.phone, d.glasses
    phone_events, glasses_events = d.phone_events, d.glasses_events
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        assert isinstance(await phone_events.get(), HandshakeCompleted)
        assert isinstance(await glasses_events.get(), HandshakeCompleted)
        glasses.send(telemetry(1))
        event = await phone_events.get()
        assert isinstance(event, MessageReceived)
        acked_at = loop.time()
        phone.acknowledge(event.message.message_id)
        while not isinstance(event := await glasses_events.get(), MessagesAcknowledged):
            pass
        waited = loop.time() - acked_at
    assert 0.2 <= waited < 2.0  # the delay, then the timer (heartbeats: 5 s)
    d.phone_link.cut()
    await asyncio.gather(*d.tasks, return_exceptions=True)


async def test_silent_peer_is_detected_by_supervision() -> None:
    config = SessionConfig(heartbeat_interval=0.05, supervision_timeout=0.3)
    phone_link, glasses_link = loopback_pair(244)
    phone_s, glasses_s = sessions(config)
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    phone = SessionDriver(phone_s, phone_link, events.put_nowait)
    glasses = SessionDriver(glasses_s, glasses_link, lambda e: None)
    phone_s.initiate(phone.now())
    glasses_task = asyncio.create_task(glasses.run())
    async with asyncio.timeout(5):
        phone_task = asyncio.create_task(phone.run())
        assert isinstance(await events.get(), HandshakeCompleted)
        # The glasses' stack hangs: it stops reading and writing, link still up.
        glasses_task.cancel()
        with pytest.raises(LimitExceededError):
            await phone_task


async def test_handshake_with_unpinned_glasses_fails_both_ends() -> None:
    phone_link, glasses_link = loopback_pair(244)
    phone_s = Session(Role.PHONE, PHONE, PeerPolicy(pinned=frozenset({os.urandom(32)})))
    glasses_s = Session(
        Role.GLASSES, GLASSES, PeerPolicy(pinned=frozenset({PHONE.public}))
    )
    phone = SessionDriver(phone_s, phone_link, lambda e: None)
    glasses = SessionDriver(glasses_s, glasses_link, lambda e: None)
    phone_s.initiate(phone.now())
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            phone.run(), glasses.run(), return_exceptions=True
        )
    assert isinstance(results[0], HandshakeError)
    assert isinstance(results[1], HandshakeError)


class _BurstSession:
    """Just enough of a session: records fragments, fails on b"bad"."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.link_drops: dict[str, int] = {}
        self.transport = None

    def receive_fragment(self, data: bytes, now: float) -> None:
        if data == b"bad":
            raise MalformedError("a fragment that fails the session")
        self.pending.append(data)

    def events_received(self) -> list[bytes]:
        out, self.pending = self.pending, []
        return out

    def get_timer(self) -> float | None:
        return None

    def pull_fragment(self, size: int) -> bytes | None:
        return None

    def close(self) -> None:
        self.pending.clear()


class _BurstLink:
    """Delivers one burst: b"one" through recv, the rest already buffered."""

    max_fragment_size = 244

    def __init__(self) -> None:
        self.buffered = [b"two", b"bad", b"never"]

    async def recv(self) -> bytes:
        return b"one"

    def recv_nowait(self) -> bytes | None:
        return self.buffered.pop(0) if self.buffered else None

    async def write(self, fragment: bytes) -> None:
        raise AssertionError("nothing to write")


async def test_a_burst_that_fails_still_hands_out_what_came_before() -> None:
    """Events of the fragments before the failing one reach the daemon (an ACK
    among them must not be lost with the session)."""
    seen: list[object] = []
    link = _BurstLink()
    driver = SessionDriver(
        cast(Session, _BurstSession()), link, seen.append, name="burst"
    )
    async with asyncio.timeout(5):
        with pytest.raises(MalformedError):
            await driver.run()
    assert seen == [b"one", b"two"]
    assert link.buffered == [b"never"]  # nothing after the failure was read
