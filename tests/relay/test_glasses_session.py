"""Phone and emulated glasses over the real bumble stack, encrypted end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from protocol.constants import MessageKind
from protocol.session import HandshakeCompleted, MessageReceived, SessionEvent
from relay.ble.link import LinkConfig
from relay.ble.manager import LinkManager, LinkState
from relay.identity import PhoneIdentity
from relay.sim.bed import in_process
from relay.sim.glasses import GlassesAppConfig
from relay.sim.profiles import UNSHAPED

FAST = LinkConfig(scan_timeout=5.0, connect_timeout=10.0)


async def test_first_connection_pairs_through_the_state_dir_then_traffic_flows(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    identity = PhoneIdentity(state)
    assert identity.pinned_glasses() == frozenset()
    config = GlassesAppConfig(scenario="day", max_requests=3)
    async with in_process(state, UNSHAPED, config) as bed:
        manager = LinkManager(identity, FAST, bed.backend, events.put_nowait)
        task = asyncio.create_task(manager.run())
        try:
            async with asyncio.timeout(30):
                first = await events.get()
                assert isinstance(first, HandshakeCompleted)
                assert first.pairing
                # Both sides pinned each other; the code is single use.
                assert identity.pinned_glasses() == {bed.app.identity.public}
                assert bed.app.paired_phone == identity.static.public
                assert not (state / "phone" / "pairing.txt").exists()
                kinds: list[MessageKind] = []
                while MessageKind.REQUEST not in kinds or len(kinds) < 5:
                    event = await events.get()
                    if isinstance(event, MessageReceived):
                        kinds.append(event.message.kind)
                        manager.acknowledge(event.message.message_id)
                assert manager.state is LinkState.CONNECTED
                assert manager.clock.offset_us is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_reconnect_uses_the_pins_and_resends_unacknowledged(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    identity = PhoneIdentity(state)
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    config = GlassesAppConfig(scenario="day", max_requests=2)
    async with in_process(state, UNSHAPED, config) as bed:
        manager = LinkManager(identity, FAST, bed.backend, events.put_nowait)
        task = asyncio.create_task(manager.run())
        try:
            async with asyncio.timeout(30):
                assert isinstance(await events.get(), HandshakeCompleted)
                unacked = None
                while unacked is None:
                    event = await events.get()
                    if isinstance(event, MessageReceived):
                        unacked = event.message  # never acknowledged
                await bed.peripheral.disconnect(0x08)
                handshake = await events.get()
                while not isinstance(handshake, HandshakeCompleted):
                    handshake = await events.get()
                assert not handshake.pairing  # pinned keys, plain Noise_XX
                while True:
                    event = await events.get()
                    if (
                        isinstance(event, MessageReceived)
                        and event.message.message_id == unacked.message_id
                    ):
                        break
                assert manager.connects == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
