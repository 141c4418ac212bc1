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
import time
from collections.abc import Callable
from pathlib import Path

from daemon_bed import daemon_on_bed
from servers import Mosquitto

from protocol.bodies import Request, RequestKind, ResponseText
from protocol.constants import MessageFlags, MessageKind
from protocol.message import Message
from relay.identity import PhoneIdentity
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


async def test_first_token_is_learnt_when_the_answer_beats_the_held_ack(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    broker = Mosquitto(tmp_path / "broker")
    await broker.start()
    gateway = CloudGateway(
        GatewayConfig(
            state_dir=state,
            broker_url=broker.url,
            latency=LatencyModel("none"),
            ack_delay_s=HOLD_S,  # every ack waits, after a quiet spell too
            registry_rescan_s=0.05,
        )
    )
    gateway_task = asyncio.create_task(gateway.run())
    answers: asyncio.Queue[str] = asyncio.Queue()
    try:
        await asyncio.wait_for(gateway.wait_ready(), 30)
        make_uplink = uplink_factory(
            "mqtt", device_id=PhoneIdentity(state).device_id, broker=broker.url
        )
        async with daemon_on_bed(state, make_uplink) as (daemon, bed):
            times = daemon.estimators.first_token_times

            def on_response(message: Message, at: float) -> None:
                del at
                if message.kind is MessageKind.RESPONSE_TEXT:
                    answers.put_nowait(ResponseText.decode(message.body).route or "")

            bed.app.on_response = on_response
            task = asyncio.create_task(daemon.run())
            try:
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
    # The ack came after the answer (it was held), and the sample is the
    # answer's first piece less the request's dated-back arrival: short.
    assert learnt_at - answered_at >= HOLD_S / 4
    (seconds,) = times.samples(RequestKind.TEXT_QUERY)
    assert 0 <= seconds < HOLD_S / 2
    # The request's trace keeps its hops in order: at the gateway, then answered.
    assert trace.cloud_acked is not None
    assert trace.first_answer is not None
    assert trace.received <= trace.cloud_acked <= trace.first_answer
