"""The daemon learns a first-token time even when the answer beats the held ack.

Emulated glasses and the daemon in this process, a real mosquitto and the real
gateway, which gathers its acks for half a second: the cloud's answer reaches
the phone before the ack that says the request is at the gateway. The sample
is taken when both are known, from the ack's time dated back by the held time
the ack carries (docs/envelope.md §6, docs/router.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from daemon_bed import daemon_on_bed
from servers import Mosquitto

from protocol.bodies import Request, RequestKind, ResponseText, Telemetry
from protocol.constants import MessageFlags, MessageKind
from protocol.message import Message
from relay.daemon import Daemon
from relay.identity import PhoneIdentity
from relay.sim.bed import Bed
from relay.uplink.factory import uplink_factory
from tools.cloud.app import CloudGateway
from tools.cloud.assistant import LatencyModel
from tools.cloud.config import GatewayConfig

HOLD_S = 0.5


async def poll(check: Callable[[], object], step: float = 0.02) -> None:
    """Wait for ``check()`` to hold; bounded by the caller's timeout."""
    for _ in range(100_000):
        if check():
            return
        await asyncio.sleep(step)


@contextlib.asynccontextmanager
async def phone_and_cloud(
    tmp_path: Path, **gateway_options: float
) -> AsyncIterator[tuple[Daemon, Bed]]:
    """The daemon running on the bed, a real mosquitto and the real gateway."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    broker = Mosquitto(tmp_path / "broker")
    await broker.start()
    gateway = CloudGateway(
        GatewayConfig(
            state_dir=state,
            broker_url=broker.url,
            latency=LatencyModel("none"),
            registry_rescan_s=0.05,
            **gateway_options,  # type: ignore[arg-type]
        )
    )
    gateway_task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.wait_ready(), 30)
        make_uplink = uplink_factory(
            "mqtt", device_id=PhoneIdentity(state).device_id, broker=broker.url
        )
        async with daemon_on_bed(state, make_uplink) as (daemon, bed):
            task = asyncio.create_task(daemon.run())
            try:
                yield daemon, bed
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await daemon.close()
    finally:
        gateway.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(gateway_task, 10)
        await broker.stop()


async def test_first_token_is_learnt_when_the_answer_beats_the_held_ack(
    tmp_path: Path,
) -> None:
    answers: asyncio.Queue[str] = asyncio.Queue()
    # Every ack waits, after a quiet spell too.
    async with phone_and_cloud(tmp_path, ack_delay_s=HOLD_S) as (daemon, bed):
        times = daemon.estimators.first_token_times

        def on_response(message: Message, at: float) -> None:
            del at
            if message.kind is MessageKind.RESPONSE_TEXT:
                answers.put_nowait(ResponseText.decode(message.body).route or "")

        bed.app.on_response = on_response
        async with asyncio.timeout(60):
            await bed.app.wait_established()
            await poll(lambda: daemon.cloud.connected)
            await asyncio.sleep(2 * HOLD_S)  # the presence acked: quiet
            request = Request(
                RequestKind.TEXT_QUERY, 3000, int(time.monotonic() * 1e6),
                0, None, "what's the weather like this afternoon", None,
            )  # fmt: skip
            ask = Message(
                MessageKind.REQUEST, bytes(range(16)), request.encode(),
                MessageFlags.RELIABLE, 7,
            )  # fmt: skip
            await bed.app.send(ask)
            assert await answers.get() == "cloud"
            answered_at = time.monotonic()
            await poll(lambda: times.samples(RequestKind.TEXT_QUERY))
            learnt_at = time.monotonic()
            trace = daemon.traces[7]
    # The ack came after the answer (it was held), and the sample is the
    # answer's first piece less the request's dated-back arrival: short.
    assert learnt_at - answered_at >= HOLD_S / 4
    (seconds,) = times.samples(RequestKind.TEXT_QUERY)
    assert 0 <= seconds < HOLD_S / 2
    # The request's trace keeps its hops in order: at the gateway, then answered.
    assert trace.cloud_acked is not None
    assert trace.first_answer is not None
    assert trace.received <= trace.cloud_acked <= trace.first_answer


async def test_the_glasses_are_acknowledged_on_the_gateways_word(
    tmp_path: Path,
) -> None:
    """With the gateway's default ack pacing (250 ms) inside the outbox's
    write delay (0.5 s), messages reach the gateway and the glasses get their
    ACKs without a row being written (docs/cloud.md)."""
    async with phone_and_cloud(tmp_path) as (daemon, bed):
        async with asyncio.timeout(60):
            await bed.app.wait_established()
            await poll(lambda: daemon.cloud.connected)
            for n in range(5):
                body = Telemetry(80, False, n).encode()
                flags = MessageFlags.RELIABLE
                await bed.app.send(
                    Message(MessageKind.TELEMETRY, os.urandom(16), body, flags)
                )
            await poll(lambda: bed.app.delivery.sender.stats.messages == 0)
            stats = await daemon.outbox.stats()
    assert (stats.acked_unwritten, stats.stored, stats.rows) == (5, 0, 0)
    assert daemon.stats.acked_to_glasses >= 5
