"""Ten minutes of telemetry and live audio with the uplink down (time compressed).

The daemon keeps serving the glasses; its memory stays flat while the outbox
fills on disk; the outbox stays within its caps by its policy (live audio is
real-time: expired or dropped and counted, never acknowledged as durable;
telemetry that does not fit is refused, so backpressure reaches the glasses);
when the broker and gateway come back, every message acknowledged as durable
is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path

import pytest
from servers import Mosquitto

from protocol.bodies import AudioChunk, Telemetry
from protocol.constants import MessageFlags, MessageKind
from protocol.message import Message
from relay.ble.link import LinkConfig
from relay.daemon import Daemon, DaemonConfig
from relay.identity import PhoneIdentity
from relay.outbox import Outbox, OutboxConfig
from relay.sim.bed import in_process
from relay.sim.glasses import GlassesAppConfig
from relay.sim.profiles import UNSHAPED
from relay.uplink.factory import uplink_factory
from tools.cloud.app import CloudGateway
from tools.cloud.assistant import LatencyModel
from tools.cloud.config import GatewayConfig
from tools.cloud.keys import load_gateway_keys, write_public_record

MINUTES = 10
TELEMETRY_PER_S = 1
AUDIO_PER_S = 10  # 100 ms chunks of live audio
AUDIO = bytes(400)  # 10 LC3 frames of 40 bytes


async def poll(check, step: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    """Wait for ``check()`` (sync or async) to hold; bounded by the test's timeout."""
    for _ in range(100_000):
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(step)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:  # noqa: PTH123
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 1e6


@pytest.mark.timeout(300)
async def test_uplink_down_for_ten_minutes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    broker = Mosquitto(tmp_path / "broker")  # configured, not started: down
    caps = OutboxConfig(max_rows=2000, max_bytes=4 << 20)
    (state / "phone").mkdir(mode=0o700)
    outbox = await Outbox.open(state / "phone" / "outbox.sqlite3", caps)
    gateway: CloudGateway | None = None
    gateway_task: asyncio.Task[object] | None = None
    app_config = GlassesAppConfig(scenario=None)
    async with in_process(state, UNSHAPED, app_config) as bed:
        # The gateway's keys exist (it ran before), but it is down now.
        gateway = CloudGateway(
            GatewayConfig(
                state_dir=state, broker_url=broker.url, latency=LatencyModel("none")
            )
        )
        keys = load_gateway_keys(state / "gateway")
        write_public_record(state / "gateway", keys)
        holder: list[Daemon] = []
        daemon = Daemon(
            DaemonConfig(state_dir=state, link=LinkConfig(scan_timeout=5), outbox=caps),
            bed.backend,
            uplink_factory(
                "mqtt",
                device_id=PhoneIdentity(state).device_id,
                broker=broker.url,
                will=lambda: holder[0].offline_will(),
            ),
            outbox=outbox,
        )
        holder.append(daemon)
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(240):
                await bed.app._established.wait()
                samples = []
                reliable: list[bytes] = []
                seconds = MINUTES * 60
                for second in range(seconds):
                    message = Message(
                        MessageKind.TELEMETRY, os.urandom(16),
                        Telemetry(80, False, second * 1_000_000).encode(),
                        MessageFlags.RELIABLE,
                    )  # fmt: skip
                    reliable.append(message.message_id)
                    await bed.app._send(message)
                    for chunk in range(AUDIO_PER_S):
                        audio = Message(
                            MessageKind.AUDIO_CHUNK, os.urandom(16),
                            AudioChunk(second * AUDIO_PER_S + chunk, AUDIO).encode(),
                            MessageFlags.REALTIME,
                        )  # fmt: skip
                        driver = bed.app._driver
                        if driver is not None:
                            driver.send(audio)
                    if second % 60 == 0:
                        await asyncio.sleep(0.2)
                        samples.append(rss_mb())
                # Everything the phone acknowledged is durable; the rest waits.
                await poll(
                    lambda: (
                        bed.app.delivery.sender.stats.messages == 0
                        or daemon.stats.refused_full > 0
                    )
                )
                stats = await outbox.stats()
                assert stats.rows <= caps.max_rows
                assert stats.total_bytes <= caps.max_bytes
                assert (
                    daemon.stats.realtime_dropped + stats.dropped_realtime_full > 0
                    or (stats.rows < caps.max_rows)
                )
                # Memory is flat: the queue is on disk, not in the process.
                growth = max(samples[2:]) - samples[2]
                assert growth < 25, samples
                # The uplink comes back.
                await broker.start()
                gateway_task = asyncio.create_task(gateway.run())
                await poll(lambda: bed.app.delivery.sender.stats.messages == 0, 0.2)

                async def drained() -> bool:
                    return (await outbox.stats()).rows == 0

                await poll(drained, 0.2)
                processed = gateway.stats.processed
                assert processed >= len(reliable)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await daemon.close()
            if gateway_task is not None:
                gateway.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(gateway_task, 10)
            await outbox.close()
            await broker.stop()
