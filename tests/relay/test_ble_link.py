"""The daemon's BLE link over the real bumble stack: volume, drops, absence, silence."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import pytest

from protocol.bodies import Request, RequestKind
from protocol.constants import Channel, MessageFlags, MessageKind
from protocol.events import RecordReassembled
from protocol.link import LinkSender, Reassembler
from protocol.session import (
    HandshakeCompleted,
    MessageReceived,
    SessionConfig,
    SessionEvent,
)
from relay.ble.link import BackendSpec, BleLink, LinkConfig
from relay.ble.manager import LinkManager
from relay.errors import LinkTimeoutError
from relay.identity import PhoneIdentity
from relay.sim.bed import backend_for, in_process
from relay.sim.bleak_bumble import BumbleAdapter
from relay.sim.glasses import PHOTO_CHUNK_BYTES, GlassesAppConfig
from relay.sim.peripheral import GlassesConfig, GlassesPeripheral
from relay.sim.profiles import UNSHAPED
from relay.sim.scenarios import Ask
from relay.sim.shaped_link import make_link

FRAMES = 20_000
WINDOW = 256
_SEQ = struct.Struct(">I")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


async def test_20000_frames_each_way_in_order_none_lost() -> None:
    link = make_link(UNSHAPED)
    peripheral = GlassesPeripheral(link, GlassesConfig(max_mtu=247))
    adapter = BumbleAdapter.on_link(link)
    await peripheral.start()
    ble = await BleLink.connect(LinkConfig(scan_timeout=5), backend_for(adapter))
    try:
        await peripheral.subscribed.wait()

        async def pump(send, recv, size: int) -> list[int]:  # type: ignore[no-untyped-def]
            sender, reassembler = LinkSender(), Reassembler()
            got: list[int] = []
            progressed = asyncio.Event()

            async def produce() -> None:
                for i in range(FRAMES):
                    sender.queue(_SEQ.pack(i) + bytes(i % 200), Channel.BULK)
                    while (piece := sender.pull(size)) is not None:
                        await send(piece)
                    # The unshaped link has no air time and notifications have
                    # no flow control: pace like a radio, a window ahead.
                    while i - len(got) > WINDOW:
                        progressed.clear()
                        await progressed.wait()

            task = asyncio.create_task(produce())
            while len(got) < FRAMES:
                for event in reassembler.feed(await recv(), 0.0):
                    assert isinstance(event, RecordReassembled), event
                    got.append(_SEQ.unpack_from(event.record)[0])
                    progressed.set()
            await task
            return got

        async with asyncio.timeout(120):
            up = await pump(peripheral.notify, ble.recv, peripheral.max_notify_size)
            down = await pump(ble.write, peripheral.receive, ble.max_fragment_size)
        assert up == list(range(FRAMES))
        assert down == list(range(FRAMES))
        assert ble.stats.notify_overflow == 0
    finally:
        await ble.aclose()
        await adapter.close()
        await peripheral.stop()


async def test_absent_glasses_give_a_clear_error_in_bounded_time() -> None:
    link = make_link(UNSHAPED)
    adapter = BumbleAdapter.on_link(link)
    try:
        started = time.monotonic()
        with pytest.raises(LinkTimeoutError, match="no glasses matching"):
            await BleLink.connect(LinkConfig(scan_timeout=1.5), backend_for(adapter))
        assert time.monotonic() - started < 5
    finally:
        await adapter.close()


async def _manager(
    state: Path,
    backend: BackendSpec,
    events: asyncio.Queue[SessionEvent],
    session: SessionConfig | None = None,
) -> tuple[LinkManager, asyncio.Task[None]]:
    manager = LinkManager(
        PhoneIdentity(state),
        LinkConfig(scan_timeout=5),
        backend,
        events.put_nowait,
        session_config=session,
    )
    return manager, asyncio.create_task(manager.run())


async def test_photo_completes_after_a_drop_with_no_gap_and_no_duplicate(
    state: Path,
) -> None:
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    async with in_process(state, UNSHAPED, GlassesAppConfig(scenario=None)) as bed:
        manager, task = await _manager(state, bed.backend, events)
        try:
            async with asyncio.timeout(60):
                assert isinstance(await events.get(), HandshakeCompleted)
                ask = asyncio.create_task(
                    bed.app._ask(
                        Ask(RequestKind.PHOTO_QUERY, "how much", photo_bytes=150_000)
                    )
                )
                chunks: list[int] = []
                photo_size = 0
                final = False
                dropped = False
                while not final:
                    event = await events.get()
                    if not isinstance(event, MessageReceived):
                        continue
                    message = event.message
                    manager.acknowledge(message.message_id)
                    if message.kind is MessageKind.REQUEST:
                        photo_size = Request.decode(message.body).size
                    if message.kind is not MessageKind.PHOTO_CHUNK:
                        continue
                    chunks.append(int.from_bytes(message.body[:4], "big"))
                    final = bool(message.flags & MessageFlags.FINAL)
                    if len(chunks) == 8 and not dropped:
                        dropped = True
                        await bed.peripheral.disconnect(0x08)  # mid-photo
                await ask
            assert dropped
            assert manager.connects >= 2
            assert chunks == list(range(len(chunks)))  # no gap, no duplicate
            assert len(chunks) == -(-photo_size // PHOTO_CHUNK_BYTES)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_silent_peer_is_detected_by_supervision(state: Path) -> None:
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    config = SessionConfig(heartbeat_interval=0.2, supervision_timeout=1.0)
    async with in_process(state, UNSHAPED, GlassesAppConfig(scenario=None)) as bed:
        manager, task = await _manager(state, bed.backend, events, config)
        try:
            async with asyncio.timeout(30):
                assert isinstance(await events.get(), HandshakeCompleted)
                # The glasses' firmware hangs: nothing more goes out, the radio
                # link stays up.
                assert bed.app.current_link is not None
                bed.app.current_link.stalled.clear()
                started = time.monotonic()
                for _ in range(200):
                    if manager.connects >= 2:
                        break
                    await asyncio.sleep(0.05)
                assert "supervision" in (manager.last_error or "")
                assert time.monotonic() - started < 5
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_tampered_link_loses_nothing_and_counts_drops(state: Path) -> None:
    from protocol.bodies import Telemetry
    from protocol.message import Message
    from relay.sim.glasses import Fault

    faults = tuple(
        Fault.parse(f)
        for f in ("corrupt:0.05", "replay:0.05", "truncate:0.05", "reorder:0.05")
    )
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    config = SessionConfig(resend_after=0.3)
    app_config = GlassesAppConfig(scenario=None, faults=faults)
    async with in_process(state, UNSHAPED, app_config) as bed:
        manager, task = await _manager(state, bed.backend, events, config)
        try:
            async with asyncio.timeout(60):
                while not isinstance(await events.get(), HandshakeCompleted):
                    pass
                sent = set()
                for i in range(60):
                    message = Message(
                        MessageKind.TELEMETRY,
                        os.urandom(16),
                        Telemetry(50, False, i).encode(),
                        MessageFlags.RELIABLE,
                    )
                    sent.add(message.message_id)
                    await bed.app._send(message)
                seen: list[bytes] = []
                while set(seen) != sent:
                    event = await events.get()
                    if (
                        isinstance(event, MessageReceived)
                        and event.message.kind is MessageKind.TELEMETRY
                    ):
                        seen.append(event.message.message_id)
                        manager.acknowledge(event.message.message_id)
            assert len(seen) == len(sent)  # each exactly once
            session = manager.session
            link = bed.app.current_link
            assert link is not None
            assert link.tampered > 0
            drops = sum(session.link_drops.values()) if session else 0
            if session is not None and session.transport is not None:
                drops += sum(session.transport.drops.values())
            assert drops > 0 or manager.connects > 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
