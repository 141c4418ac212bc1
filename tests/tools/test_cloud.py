"""The reference cloud gateway (tools/cloud) against real mosquitto and redis.

The "phone" here is built from protocol.envelope and protocol.cloud with plain
aiomqtt and aiohttp clients: it seals uplinks, verifies acks, opens answers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp
import aiomqtt
import pytest

from protocol.bodies import (
    Ack,
    Presence,
    Request,
    RequestKind,
    ResponseText,
    Telemetry,
)
from protocol.cloud import (
    Channels,
    DeviceRecord,
    GatewayRecord,
    decode_batch,
    encode_batch,
)
from protocol.constants import MessageFlags, MessageKind
from protocol.envelope import (
    DeviceKeys,
    EnvelopeKind,
    GatewayPublicKeys,
    open_downlink,
    seal_uplink,
    verify_ack,
)
from protocol.message import Message, decode_messages
from relay.errors import ConfigError
from relay.uplink import Backoff
from tools.cloud import register
from tools.cloud.app import CloudGateway

if TYPE_CHECKING:
    from relay.cloudlink import CloudConfig, CloudLink
    from relay.outbox import Outbox, OutboxConfig
from tools.cloud.assistant import (
    AssembledRequest,
    BuiltinAssistant,
    LatencyModel,
    compose_answer,
)
from tools.cloud.config import GatewayConfig
from tools.cloud.redis_store import RedisStore
from tools.cloud.store import (
    Entry,
    IdempotencyStore,
    Outcome,
    Part,
    PartKind,
    SqliteStore,
    StoreLimits,
)

WAIT_S = 10.0
LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
FAST = Backoff(initial_s=0.05, cap_s=0.5)
LIMITS = StoreLimits(8 * 86_400.0, 3600.0, 3600.0, 1 << 20)


class Server(Protocol):
    """The parts of the ``mosquitto`` / ``redis_server`` fixtures used here."""

    url: str
    port: int

    async def restart(self) -> None: ...


# --- the test-side phone --------------------------------------------------------------


def message(
    kind: MessageKind, body: bytes = b"", rid: int = 0, *, final: bool = False
) -> Message:
    flags = MessageFlags.RELIABLE | (MessageFlags.FINAL if final else 0)
    return Message(kind, os.urandom(16), body, MessageFlags(flags), rid)


def request(
    text: str | None,
    rid: int,
    kind: RequestKind = RequestKind.TEXT_QUERY,
    *,
    size: int = 0,
    intent: str | None = None,
    codec: str | None = None,
) -> Message:
    body = Request(kind, 3000, 0, size, intent, text, codec).encode()
    return message(MessageKind.REQUEST, body, rid)


def chunks(kind: MessageKind, data: bytes, size: int, rid: int) -> list[Message]:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [
        message(kind, i.to_bytes(4, "big") + piece, rid, final=i == len(pieces) - 1)
        for i, piece in enumerate(pieces)
    ]


def telemetry(n: int) -> Message:
    return message(MessageKind.TELEMETRY, Telemetry(n % 101, False, n).encode())


@dataclass
class Phone:
    """Keys, sealing and a record of everything that came down."""

    state: Path
    prefix: str = "gr/v1"
    device_id: bytes = field(default_factory=lambda: os.urandom(16))
    keys: DeviceKeys = field(default_factory=DeviceKeys.generate)
    acked: collections.Counter[bytes] = field(default_factory=collections.Counter)
    down: dict[bytes, Message] = field(default_factory=dict)
    down_raw: dict[bytes, bytes] = field(default_factory=dict)
    down_count: collections.Counter[bytes] = field(default_factory=collections.Counter)
    acks: list[tuple[float, tuple[bytes, ...]]] = field(default_factory=list)
    """Each ACK as it came: (loop time, ids)."""
    held: list[tuple[float, ...]] = field(default_factory=list)
    """Each ACK's held times, seconds per id (as ``acks``)."""
    qos: list[tuple[int, bool]] = field(default_factory=list)
    """MQTT only: (QoS, whether the payload held ACKs) of each payload."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def channels(self) -> Channels:
        return Channels.for_device(self.device_id, self.prefix)

    @property
    def pseudonym(self) -> str:
        return self.channels.up.split("/")[-2]

    def register(self) -> None:
        """Write phone/device.json as the phone does."""
        public = self.keys.public()
        record = DeviceRecord(self.device_id, public.encryption, public.verify)
        directory = self.state / "phone"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / "device.json").write_text(record.encode())

    def gateway(self) -> tuple[int, GatewayPublicKeys]:
        record = GatewayRecord.decode((self.state / "gateway/public.json").read_text())
        return record.kid, GatewayPublicKeys(record.encryption, record.verify)

    def seal(self, msg: Message, channel: str = "up") -> bytes:
        kid, gateway = self.gateway()
        topic = self.channels.up if channel == "up" else self.channels.presence
        return seal_uplink(
            msg.encode(),
            topic=topic,
            device_id=self.device_id,
            kid=kid,
            gateway=gateway,
            device=self.keys,
        )

    def feed(self, payload: bytes) -> None:
        """Verify and record one downlink payload (acks and answers)."""
        kid, gateway = self.gateway()
        for item in decode_batch(payload):
            if item[1] == EnvelopeKind.ACK:
                info = verify_ack(
                    item,
                    topic=self.channels.down,
                    device_id=self.device_id,
                    gateway_keys={kid: gateway},
                )
                self.acked.update(info.message_ids)
                self.acks.append((asyncio.get_running_loop().time(), info.message_ids))
                self.held.append(info.held_s)
                continue
            plain = open_downlink(
                item,
                topic=self.channels.down,
                device_id=self.device_id,
                gateway_keys={kid: gateway},
                device=self.keys,
            )
            for msg in decode_messages(plain):
                self.down[msg.message_id] = msg
                self.down_raw.setdefault(msg.message_id, item)
                self.down_count[msg.message_id] += 1
        self.changed.set()

    def answer(self, rid: int) -> list[Message]:
        """The answer pieces of request ``rid`` received so far, by seq."""
        pieces = [m for m in self.down.values() if m.request_id == rid]
        return sorted(pieces, key=lambda m: ResponseText.decode(m.body).seq)

    def answered(self, rid: int) -> bool:
        return any(m.flags & MessageFlags.FINAL for m in self.answer(rid))

    def ack_message(self, ids: list[bytes]) -> Message:
        return message(MessageKind.ACK, Ack(tuple(ids)).encode())

    async def until(
        self, predicate: Callable[[], bool], within: float = WAIT_S
    ) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def check_answer(phone: Phone, rid: int) -> str:
    """Assert the answer of ``rid`` is well formed; return its text."""
    pieces = phone.answer(rid)
    bodies = [ResponseText.decode(m.body) for m in pieces]
    assert len(pieces) >= 2
    assert [b.seq for b in bodies] == list(range(len(pieces)))
    assert all(b.route == "cloud" for b in bodies)
    assert all(m.flags & MessageFlags.RELIABLE for m in pieces)
    assert [bool(m.flags & MessageFlags.FINAL) for m in pieces] == [False] * (
        len(pieces) - 1
    ) + [True]
    assert all(m.kind is MessageKind.RESPONSE_TEXT for m in pieces)
    return "".join(b.text for b in bodies)


Send = Callable[[bytes], Awaitable[None]]


@asynccontextmanager
async def mqtt_phone(
    broker: Server, phone: Phone, channel: str = "up"
) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """A plain aiomqtt client as the phone: publish sealed batches, feed downs."""
    client = aiomqtt.Client(
        LOOPBACK,
        broker.port,
        identifier=f"phone-{os.urandom(4).hex()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=WAIT_S,
    )
    async with client:
        await client.subscribe(phone.channels.down, qos=1)

        async def pump() -> None:
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                acks = len(phone.acks)
                phone.feed(msg.payload)
                phone.qos.append((msg.qos, len(phone.acks) > acks))

        async def send(payload: bytes, channel: str = "up") -> None:
            topic = phone.channels.up if channel == "up" else phone.channels.presence
            await client.publish(topic, payload, qos=1)

        task = asyncio.create_task(pump())
        try:
            yield send
        finally:
            task.cancel()
            await asyncio.wait((task,))


def config(state: Path, **overrides: object) -> GatewayConfig:
    fields: dict[str, object] = {
        "state_dir": state,
        "latency": LatencyModel("none"),
        "ledger": state / "ledger.jsonl",
        "registry_rescan_s": 0.05,
        "ack_delay_s": 0.002,
        "backoff": FAST,
        "connect_timeout_s": 3.0,
    }
    fields.update(overrides)
    return GatewayConfig(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def running(cfg: GatewayConfig) -> AsyncIterator[CloudGateway]:
    gateway = CloudGateway(cfg)
    task = asyncio.create_task(gateway.run())
    try:
        ready = asyncio.create_task(gateway.wait_ready())
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await task  # raises what stopped it
        yield gateway
    finally:
        gateway.stop()
        async with asyncio.timeout(5.0):
            await asyncio.wait((task,))
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def poll(predicate: Callable[[], bool], within: float = WAIT_S) -> None:
    """Wait for gateway-side state that has no event to wait on."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the gateway's counters
            await asyncio.sleep(0.02)


def ledger(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [(doc["id"], doc["event"]) for doc in map(json.loads, lines)]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


# --- over MQTT ------------------------------------------------------------------------


async def test_text_request_over_mqtt(mosquitto: Server, state: Path) -> None:
    cfg = config(state, broker_url=mosquitto.url)
    async with running(cfg) as gateway:
        phone = Phone(state)
        phone.register()  # after the gateway started: found by a re-scan
        # Re-scans for unknown devices are rate-limited; a message that comes
        # sooner is dropped unacknowledged (a phone resends it), so wait one
        # window to see the first message found.
        await asyncio.sleep(cfg.registry_rescan_s)
        async with mqtt_phone(mosquitto, phone) as send:
            ask = request("what's the weather like this afternoon", 7)
            await send(encode_batch([phone.seal(ask)]))
            await phone.until(
                lambda: phone.answered(7) and ask.message_id in phone.acked
            )
            text = check_answer(phone, 7)
            assert "sunny" in text
            pieces = [m.message_id for m in phone.answer(7)]
            await send(encode_batch([phone.seal(phone.ack_message(pieces))]))
            await poll(lambda: not gateway.gateway.tracker.pending(phone.pseudonym))
    events = ledger(state / "ledger.jsonl")
    assert events.count((ask.message_id.hex(), "processed")) == 1
    assert events.count((ask.message_id.hex(), "response")) == 1
    assert gateway.stats.responses == 1
    assert gateway.stats.downlink_acked == len(pieces)


async def test_duplicates_are_acked_again_not_processed_and_bad_ones_dropped(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    async with (
        running(config(state, broker_url=mosquitto.url)) as gateway,
        mqtt_phone(mosquitto, phone) as send,
    ):
        tick = telemetry(1)
        sealed = phone.seal(tick)
        await send(encode_batch([sealed]))
        await phone.until(lambda: phone.acked[tick.message_id] == 1)
        await send(encode_batch([sealed]))
        await phone.until(lambda: phone.acked[tick.message_id] == 2)
        # Tampered, garbage and a stranger's: dropped and counted, never acked.
        tampered = bytearray(phone.seal(telemetry(2)))
        tampered[60] ^= 1
        await send(encode_batch([bytes(tampered)]))
        await send(b"\x00\x00")
        stranger = Phone(state)
        async with mqtt_phone(mosquitto, stranger) as stranger_send:
            await stranger_send(encode_batch([phone.seal(telemetry(3))]))
        drops = gateway.stats.drops
        await poll(lambda: len(drops) >= 3)
    assert drops == {"bad_envelope": 1, "bad_batch": 1, "unknown_device": 1}
    assert (gateway.stats.processed, gateway.stats.duplicates) == (1, 1)
    assert ledger(state / "ledger.jsonl") == [(tick.message_id.hex(), "processed")]
    assert len(phone.acked) == 1


async def test_acks_are_paced_per_device_and_sent_at_qos_0(
    mosquitto: Server, state: Path
) -> None:
    """The first message after a quiet spell is acknowledged at once; those
    that follow within ack_interval_s share one ACK, sent when it is over,
    which says how long each id was held (for the phone's round-trip
    samples). ACKs go at QoS 0 (a lost one costs a resend), answers at QoS 1."""
    phone = Phone(state)
    phone.register()
    interval = 0.3
    cfg = config(state, broker_url=mosquitto.url, ack_interval_s=interval)
    async with running(cfg), mqtt_phone(mosquitto, phone) as send:
        first = telemetry(1)
        await send(encode_batch([phone.seal(first)]))
        await phone.until(lambda: first.message_id in phone.acked)
        rest = [telemetry(n) for n in (2, 3, 4)]
        for tick in rest:
            await send(encode_batch([phone.seal(tick)]))
        await phone.until(lambda: all(t.message_id in phone.acked for t in rest))
        ask = request("what's the weather like this afternoon", 9)
        await send(encode_batch([phone.seal(ask)]))
        await phone.until(lambda: phone.answered(9))
    (t0, ids0), (t1, ids1), *_ = phone.acks
    assert ids0 == (first.message_id,)
    assert set(ids1) == {t.message_id for t in rest}  # one ACK for the three
    assert t1 - t0 >= interval / 2  # (not within milliseconds, as unpaced)
    held0, held1 = phone.held[:2]
    assert held0[0] < interval / 3  # ack_delay_s (5 ms) and the signing
    # Sent a few milliseconds apart just after the first ACK: held for most
    # of the interval, never longer than the ACK took to come.
    assert all(interval / 3 <= h <= t1 - t0 for h in held1)
    assert {qos for qos, has_acks in phone.qos if has_acks} == {0}
    assert {qos for qos, has_acks in phone.qos if not has_acks} == {1}


@asynccontextmanager
async def phone_link(
    state: Path,
    broker: Server,
    *,
    observer: AckTimes,
    config: CloudConfig | None = None,
    outbox_config: OutboxConfig | None = None,
) -> AsyncIterator[tuple[CloudLink, Outbox]]:
    """The real cloud link of a phone over MQTT, running, with its outbox."""
    from relay.cloudlink import CloudLink
    from relay.identity import PhoneIdentity
    from relay.outbox import Outbox
    from relay.uplink.factory import uplink_factory

    identity = PhoneIdentity(state)
    (state / "phone").mkdir(mode=0o700, exist_ok=True)
    outbox = await Outbox.open(state / "phone" / "outbox.sqlite3", outbox_config)
    make_uplink = uplink_factory(
        "mqtt", device_id=identity.device_id, broker=broker.url
    )
    link = CloudLink(
        identity, outbox, make_uplink, lambda m: None, observer=observer, config=config
    )
    task = asyncio.create_task(link.run())
    try:
        yield link, outbox
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()


@asynccontextmanager
async def held_acks(
    state: Path,
    broker: Server,
    *,
    observer: AckTimes,
    cloud: CloudConfig | None = None,
    outbox_config: OutboxConfig | None = None,
) -> AsyncIterator[tuple[CloudLink, Outbox]]:
    """:func:`phone_link` with the real gateway holding every ack 1 s."""
    gateway = config(state, broker_url=broker.url, ack_delay_s=1.0, ack_interval_s=1.0)
    async with (
        running(gateway),
        phone_link(
            state, broker, observer=observer, config=cloud, outbox_config=outbox_config
        ) as pair,
    ):
        yield pair


@dataclass
class AckTimes:
    """A cloud link observer: when each payload left, when its ack counted."""

    sent: dict[bytes, float] = field(default_factory=dict)
    acked: list[tuple[bytes, float, float]] = field(default_factory=list)
    """(key, the time the link reported, the time it reported it)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def uplink_sent(self, key: bytes, nbytes: int, at: float) -> None:
        del nbytes
        self.sent[key] = at

    def uplink_acked(self, key: bytes, at: float) -> None:
        self.acked.append((key, at, time.monotonic()))
        self.changed.set()

    def downlink_bytes(self, n: int, at: float) -> None:
        del n, at

    def uplink_down(self, at: float) -> None:
        del at


async def test_the_phone_leaves_the_gateways_hold_out_of_its_ack_times(
    mosquitto: Server, state: Path
) -> None:
    """The real cloud link over MQTT to the gateway: acks the gateway held
    for its ack_interval_s reach the router's observer dated as if unheld
    (arrival less the held time the ack carries), so round-trip samples
    taken while the phone streams do not grow with the interval."""
    from relay.outbox import Priority

    interval = 0.4
    times = AckTimes()
    cfg = config(state, broker_url=mosquitto.url, ack_interval_s=interval)
    async with running(cfg), phone_link(state, mosquitto, observer=times) as (link, _):
        sent = [telemetry(n) for n in range(4)]
        async with asyncio.timeout(WAIT_S):
            for tick in sent:  # the first after a quiet spell, then held
                await link.put(tick, Priority.NORMAL)
                while tick.message_id not in {k for k, _, _ in times.acked}:
                    times.changed.clear()
                    await times.changed.wait()
                await asyncio.sleep(0.05)
    samples = [
        (at - times.sent[key], called - times.sent[key])
        for key, at, called in times.acked
        if key in {tick.message_id for tick in sent}
    ]
    assert len(samples) == 4
    held = [s for s in samples if s[1] >= interval / 3]
    assert held  # the gateway did gather some
    assert all(rtt < interval / 4 for rtt, _ in samples), samples


async def test_a_full_set_of_ids_is_acked_without_waiting_for_the_interval(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    cfg = config(state, broker_url=mosquitto.url, ack_interval_s=1.0, ack_max_ids=4)
    async with running(cfg), mqtt_phone(mosquitto, phone) as send:
        first = telemetry(1)
        await send(encode_batch([phone.seal(first)]))
        await phone.until(lambda: first.message_id in phone.acked)
        burst = [telemetry(n) for n in range(2, 6)]
        await send(encode_batch([phone.seal(t) for t in burst]))
        # Well before the interval is over: four ids waiting go at once.
        await phone.until(
            lambda: all(t.message_id in phone.acked for t in burst), within=0.8
        )


async def test_voice_and_photo_requests_are_assembled(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    audio = os.urandom(3 * 600)
    voice = request(
        "translate thank you very much into italian",
        21,
        RequestKind.VOICE_QUERY,
        size=len(audio),
        intent="translate",
        codec="lc3",
    )
    voice_chunks = chunks(MessageKind.AUDIO_CHUNK, audio, 600, 21)
    photo = os.urandom(10_000)
    ask = request(
        "how much is this cheaper online",
        22,
        RequestKind.PHOTO_QUERY,
        size=len(photo),
        intent="price",
        codec="jpeg",
    )
    photo_chunks = chunks(MessageKind.PHOTO_CHUNK, photo, 4096, 22)
    async with (
        running(config(state, broker_url=mosquitto.url)),
        mqtt_phone(mosquitto, phone) as send,
    ):
        # Out of order, in separate payloads: FINAL chunk first, REQUEST last.
        for msg in [voice_chunks[2], voice_chunks[0], voice, voice_chunks[1]]:
            await send(encode_batch([phone.seal(msg)]))
        await send(encode_batch([phone.seal(m) for m in [*photo_chunks, ask]]))
        every = [voice, *voice_chunks, ask, *photo_chunks]
        await phone.until(lambda: all(phone.acked[m.message_id] for m in every))
        await phone.until(lambda: phone.answered(21) and phone.answered(22))
    assert "grazie mille" in check_answer(phone, 21)
    priced = AssembledRequest(ask.message_id, 22, _req(ask), photo=photo)
    expected = compose_answer(priced)
    assert "EUR" in expected[0]
    assert check_answer(phone, 22) == " ".join(expected)
    assert all(phone.acked[m.message_id] == 1 for m in every)


def _req(msg: Message) -> Request:
    return Request.decode(msg.body)


async def test_answers_are_resent_until_the_phone_acks(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    cfg = config(
        state, broker_url=mosquitto.url, resend_initial_s=0.3, resend_cap_s=0.6
    )
    async with running(cfg) as gateway, mqtt_phone(mosquitto, phone) as send:
        await send(encode_batch([phone.seal(request("what's on my calendar", 5))]))
        await phone.until(lambda: phone.answered(5))
        pieces = [m.message_id for m in phone.answer(5)]
        first = {mid: phone.down_raw[mid] for mid in pieces}
        # No ACK: the timer resends the identical bytes.
        await phone.until(lambda: all(phone.down_count[m] >= 2 for m in pieces))
        assert all(phone.down_raw[mid] == first[mid] for mid in pieces)
        # Offline: resends pause; online again: resent at once.
        offline = message(MessageKind.PRESENCE, Presence("offline", 1).encode())
        await send(encode_batch([phone.seal(offline, "presence")]), "presence")
        await phone.until(lambda: phone.acked[offline.message_id] == 1)
        paused = phone.down_count.copy()
        await asyncio.sleep(1.0)
        assert phone.down_count == paused
        online = message(MessageKind.PRESENCE, Presence("online", 2).encode())
        await send(encode_batch([phone.seal(online, "presence")]), "presence")
        await phone.until(
            lambda: all(phone.down_count[m] > paused[m] for m in pieces), 0.5
        )
        # The phone's ACK ends it.
        await send(encode_batch([phone.seal(phone.ack_message(pieces))]))
        await poll(lambda: not gateway.gateway.tracker.pending(phone.pseudonym))
        await asyncio.sleep(0.1)  # a resend already on its way may still land
        acked = phone.down_count.copy()
        await asyncio.sleep(1.0)
        assert phone.down_count == acked
    assert gateway.stats.resends >= 2 * len(pieces)
    assert gateway.stats.presence_updates == 2


async def test_gateway_reconnects_after_a_broker_restart(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    async with running(config(state, broker_url=mosquitto.url)) as gateway:
        await mosquitto.restart()
        async with mqtt_phone(mosquitto, phone) as send:
            tick = telemetry(1)
            async with asyncio.timeout(WAIT_S):
                while not phone.acked[tick.message_id]:  # until resubscribed
                    await send(encode_batch([phone.seal(tick)]))
                    with contextlib.suppress(TimeoutError):
                        await phone.until(lambda: phone.acked[tick.message_id] > 0, 0.2)
    assert gateway.stats.processed == 1


# --- over WebSocket -------------------------------------------------------------------


async def test_websocket_path(state: Path, tmp_path: Path) -> None:
    devices = tmp_path / "devices"  # --devices DIR
    cfg = config(state, listen=(LOOPBACK, 0), device_dirs=(devices,))
    async with running(cfg) as gateway, aiohttp.ClientSession() as http:
        phone = Phone(state)
        url = f"ws://{LOOPBACK}:{gateway.ws_port}/v1/{phone.pseudonym}"
        # Not registered yet: 503, which a phone retries.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url)
        assert refused.value.status == 503
        public = phone.keys.public()
        devices.mkdir()
        (devices / "glasses-phone.json").write_text(
            DeviceRecord(phone.device_id, public.encryption, public.verify).encode()
        )
        await asyncio.sleep(cfg.registry_rescan_s)  # re-scans are rate-limited

        async def pump(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    phone.feed(frame.data)

        async with http.ws_connect(url) as first:
            reader = asyncio.create_task(pump(first))
            ask = request("read my last message", 3)
            await first.send_bytes(encode_batch([phone.seal(ask)]))
            await phone.until(
                lambda: phone.answered(3) and ask.message_id in phone.acked
            )
            assert "Alex" in check_answer(phone, 3)
            assert phone.acked[ask.message_id] == 1
            # A second connection replaces the first.
            async with http.ws_connect(url) as second:
                async with asyncio.timeout(WAIT_S):
                    await reader
                assert first.close_code == 4000
                reader = asyncio.create_task(pump(second))
                ask = request("walk me to the nearest pharmacy", 4, intent="navigate")
                await second.send_bytes(encode_batch([phone.seal(ask)]))
                await phone.until(lambda: phone.answered(4))
                assert check_answer(phone, 4).startswith("Head north on")
                pieces = list(phone.down)  # both answers' pieces
                await second.send_bytes(
                    encode_batch([phone.seal(phone.ack_message(pieces))])
                )
                await poll(lambda: not gateway.gateway.tracker.pending(phone.pseudonym))
            async with asyncio.timeout(WAIT_S):
                await reader
    assert gateway.stats.responses == 2


# --- several gateways -----------------------------------------------------------------


@contextmanager
def gateway_process(
    state: Path, log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.cloud",
                "-v",
                "--state-dir",
                str(state),
                *args,
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5.0)


async def wait_for_text(path: Path, text: str) -> None:
    await poll(lambda: text in path.read_text(errors="replace"))


async def test_three_gateways_share_the_load_and_survive_a_kill(
    mosquitto: Server, redis_server: Server, state: Path, tmp_path: Path
) -> None:
    phone = Phone(state)
    phone.register()
    ledgers = [tmp_path / f"ledger-{i}.jsonl" for i in range(3)]
    logs = [tmp_path / f"gateway-{i}.log" for i in range(3)]
    common = ["--broker", mosquitto.url, "--idempotency", redis_server.url]
    common += ["--latency-model", "none"]
    with (
        gateway_process(state, logs[0], *common, "--ledger", str(ledgers[0])) as p0,
        gateway_process(state, logs[1], *common, "--ledger", str(ledgers[1])) as p1,
        gateway_process(state, logs[2], *common, "--ledger", str(ledgers[2])) as p2,
    ):
        for log in logs:
            await wait_for_text(log, "mqtt: connected")
        async with mqtt_phone(mosquitto, phone) as send:
            # A voice request whose parts land on different gateways.
            audio = os.urandom(1500)
            parts = [
                request("how far is home", 9, RequestKind.VOICE_QUERY, size=1500),
                *chunks(MessageKind.AUDIO_CHUNK, audio, 500, 9),
            ]
            for part in parts:
                await send(encode_batch([phone.seal(part)]))
            await phone.until(lambda: phone.answered(9))
            assert "2.4 km" in check_answer(phone, 9)
            answer = [m.message_id for m in phone.answer(9)]
            await send(encode_batch([phone.seal(phone.ack_message(answer))]))
            # 300 messages; one gateway SIGKILLed a third of the way through;
            # the phone resends what is unacknowledged, as its outbox does.
            sealed = {m.message_id: phone.seal(m) for m in map(telemetry, range(300))}
            order = list(sealed)
            for start in range(0, 300, 5):
                await send(encode_batch([sealed[m] for m in order[start : start + 5]]))
                if start == 100:
                    p0.send_signal(signal.SIGKILL)
                await asyncio.sleep(0.005)
            resent = 0
            async with asyncio.timeout(30.0):
                while missing := [m for m in order if not phone.acked[m]]:
                    try:
                        await phone.until(
                            lambda: all(phone.acked[m] for m in order), 1.0
                        )
                    except TimeoutError:
                        resent += len(missing)
                        for start in range(0, len(missing), 20):
                            batch = missing[start : start + 20]
                            await send(encode_batch([sealed[m] for m in batch]))
        p0.wait(5.0)
        p1.send_signal(signal.SIGTERM)
        p2.send_signal(signal.SIGINT)
        started = time.monotonic()
        codes = [proc.wait(5.0) for proc in (p1, p2)]
        assert codes == [0, 0]
        assert time.monotonic() - started < 5.0
    processed = [
        mid for path in ledgers for mid, event in ledger(path) if event == "processed"
    ]
    assert len(processed) == len(set(processed)), "an id was processed twice"
    expected = {m.hex() for m in order} | {m.message_id.hex() for m in parts}
    assert set(processed) <= expected
    # Only ids in flight inside the killed process may lack their line.
    assert len(expected - set(processed)) <= 20
    shares = [sum(e == "processed" for _, e in ledger(path)) for path in ledgers]
    unlogged = len(expected - set(processed))
    print(f"resent {resent}; processed per gateway {shares}; unlogged {unlogged}")
    assert sum(share > 0 for share in shares) == 3, shares
    responses = [mid for path in ledgers for mid, e in ledger(path) if e == "response"]
    assert responses == [parts[0].message_id.hex()]
    for log in logs[1:]:
        text = log.read_text()
        assert "cloud gateway stopped" in text
        assert "Traceback" not in text


# --- start-up and configuration -------------------------------------------------------


def test_bad_broker_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tools.cloud", "--state-dir", str(tmp_path / "s")]
    out = subprocess.run(
        [*argv, "--broker", "http://broker.example"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "broker URL" in out.stderr
    assert "Traceback" not in out.stderr
    # The subcommand's handler raises ConfigError, which tools.cli prints.
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["cloud", "--broker", "mqtt://"])
    args.state_dir, args.verbose = str(tmp_path / "s"), 0
    with pytest.raises(ConfigError, match="no host"):
        args.handler(args)


def test_latency_model() -> None:
    assert LatencyModel.parse("none").sample(__import__("random").Random(1)) == 0.0
    assert LatencyModel.parse("fixed:0.25").describe() == "fixed:0.25"
    for bad in ("lognormal:2:1", "fixed", "gamma:1", "lognormal:nan:2"):
        with pytest.raises(ConfigError):
            LatencyModel.parse(bad)
    assistant = BuiltinAssistant(LatencyModel.parse("lognormal:0.8:2.0"))
    delays = sorted(
        assistant.first_token_delay(
            AssembledRequest(os.urandom(16), 1, _req(request("hi", 1)))
        )
        for _ in range(4000)
    )
    assert statistics.median(delays) == pytest.approx(0.8, rel=0.08)
    assert delays[int(0.95 * len(delays))] == pytest.approx(2.0, rel=0.1)
    same = AssembledRequest(b"\x01" * 16, 1, _req(request("hi", 1)))
    assert assistant.first_token_delay(same) == assistant.first_token_delay(same)


@pytest.mark.parametrize(
    ("text", "intent", "photo", "expected"),
    [
        ("what's the weather like this afternoon", None, b"", "19 °C"),
        ("translate thank you very much into Italian", "translate", b"", "grazie"),
        ("how much is this cheaper online", "price", b"\x01" * 5000, "EUR"),
        ("walk me to the nearest pharmacy", "navigate", b"", "Head north on"),
        ("pay for the coffee", "pay", b"", "Paid 3.20 EUR to Cafe Central"),
        ("who wrote the book I was reading yesterday", None, b"", "Umberto Eco"),
        ("what kind of plant is this", "identify", b"\x02" * 6000, "Water it"),
        ("what's on my calendar", None, b"", "14:00"),
        ("read my last message", None, b"", "Alex"),
        ("why is the sky blue", None, b"", "why is the sky blue"),
    ],
)
def test_builtin_answers(
    text: str, intent: str | None, photo: bytes, expected: str
) -> None:
    msg = request(text, 1, intent=intent)
    answer = compose_answer(AssembledRequest(msg.message_id, 1, _req(msg), photo=photo))
    assert len(answer) >= 2
    assert expected in " ".join(answer)
    assert answer == compose_answer(
        AssembledRequest(os.urandom(16), 2, _req(msg), photo=photo)
    )


# --- the stores -----------------------------------------------------------------------


async def check_store(store: IdempotencyStore, other: IdempotencyStore) -> None:
    device = os.urandom(16)
    ids = [os.urandom(16) for _ in range(6)]
    body = Request(RequestKind.VOICE_QUERY, 1, 0, 9).encode()
    entries = [
        Entry(device, ids[0]),
        Entry(device, ids[1], Part(5, PartKind.AUDIO, 2, b"ghi", final=True)),
        Entry(device, ids[2], Part(5, PartKind.AUDIO, 0, b"abc")),
        Entry(device, ids[3], Part(5, PartKind.REQUEST, -1, ids[3] + body)),
        Entry(device, ids[0]),
    ]
    verdicts = await store.admit(entries)
    assert [v.outcome for v in verdicts] == [Outcome.NEW] * 4 + [Outcome.DUPLICATE]
    assert all(v.assembled is None for v in verdicts)
    # The last part may come through another gateway.
    last = await other.admit(
        [Entry(device, ids[4], Part(5, PartKind.AUDIO, 1, b"def"))]
    )
    assembled = last[0].assembled
    assert assembled is not None
    assert (assembled.message_id, assembled.body) == (ids[3], body)
    assert (assembled.media_kind, assembled.media) == (PartKind.AUDIO, b"abcdefghi")
    again = await store.admit([Entry(device, m) for m in ids[:5]])
    assert {v.outcome for v in again} == {Outcome.DUPLICATE}
    mixed = await store.admit(
        [
            Entry(device, ids[5], Part(6, PartKind.PHOTO, 0, b"x")),
            Entry(device, os.urandom(16), Part(6, PartKind.AUDIO, 1, b"y")),
            Entry(device, os.urandom(16), Part(6, PartKind.PHOTO, 1, b"z" * (1 << 20))),
        ]
    )
    assert [v.outcome for v in mixed] == [Outcome.NEW, Outcome.REFUSED, Outcome.REFUSED]
    # Concurrent admissions of the same ids: each is new exactly once.
    fresh = [Entry(device, os.urandom(16)) for _ in range(200)]
    results = await asyncio.gather(*(s.admit(fresh) for s in (store, other) * 3))
    for index in range(len(fresh)):
        outcomes = [r[index].outcome for r in results]
        assert outcomes.count(Outcome.NEW) == 1


async def test_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "gw" / "idempotency.sqlite3"
    store = SqliteStore(path, LIMITS)
    await store.open()
    try:
        await check_store(store, store)
        device, mid = os.urandom(16), os.urandom(16)
        assert (await store.admit([Entry(device, mid)]))[0].outcome is Outcome.NEW
    finally:
        await store.aclose()
    reopened = SqliteStore(path, LIMITS)  # duplicates survive a restart
    await reopened.open()
    try:
        verdict = await reopened.admit([Entry(device, mid)])
        assert verdict[0].outcome is Outcome.DUPLICATE
    finally:
        await reopened.aclose()
    expired = SqliteStore(path, LIMITS, clock=lambda: time.time() + 9 * 86_400.0)
    await expired.open()
    try:
        assert (await expired.admit([Entry(device, mid)]))[0].outcome is Outcome.NEW
    finally:
        await expired.aclose()


async def test_redis_store(redis_server: Server) -> None:
    one = RedisStore(redis_server.url, LIMITS, timeout_s=5.0)
    two = RedisStore(redis_server.url, LIMITS, timeout_s=5.0)
    try:
        await one.open()
        await check_store(one, two)
        device, mid = os.urandom(16), os.urandom(16)
        await one.mark_downlink_acked(device, [mid])
        assert await two.downlink_acked(device, [mid, os.urandom(16)]) == {mid}
    finally:
        await one.aclose()
        await two.aclose()


# --- rate -----------------------------------------------------------------------------


async def test_processing_rate_over_mqtt(mosquitto: Server, state: Path) -> None:
    phone = Phone(state)
    phone.register()
    count, per_payload = 2000, 20
    cfg = config(state, broker_url=mosquitto.url, ledger=None)
    async with running(cfg) as gateway, mqtt_phone(mosquitto, phone) as send:
        sealed = [phone.seal(telemetry(n)) for n in range(count)]
        started = time.perf_counter()
        for start in range(0, count, per_payload):
            await send(encode_batch(sealed[start : start + per_payload]))
        await phone.until(lambda: gateway.stats.processed >= count, 30.0)
        await phone.until(lambda: len(phone.acked) >= count, 30.0)
        elapsed = time.perf_counter() - started
    rate = count / elapsed
    print(f"gateway processing rate over MQTT: {rate:.0f} envelopes/s")
    assert rate > 200


@dataclass
class SendCount(AckTimes):
    """AckTimes that also counts payloads sent (first sends and resends)."""

    count: int = 0

    def uplink_sent(self, key: bytes, nbytes: int, at: float) -> None:
        super().uplink_sent(key, nbytes, at)
        self.count += 1
        self.changed.set()

    async def reach(self, count: int) -> None:
        while self.count < count:
            self.changed.clear()
            await self.changed.wait()


async def test_the_outbox_records_resends_not_first_sends(
    mosquitto: Server, state: Path
) -> None:
    """The real cloud link over MQTT with a gateway holding its acks: the
    first send of a row writes nothing to the outbox (a row update per
    message saved), the resend after ``resend_after`` is recorded."""
    from relay.cloudlink import CloudConfig
    from relay.outbox import OutboxRow, Priority

    sends = SendCount()
    async with held_acks(
        state, mosquitto, observer=sends, cloud=CloudConfig(resend_after=0.2)
    ) as (link, outbox):

        async def written() -> list[OutboxRow]:
            await outbox.ack([bytes(16)])  # not lazy: the lazy writes go first
            return await outbox.next_batch(10, 10**6)

        tick = telemetry(1)
        async with asyncio.timeout(WAIT_S):
            await link.put(tick, Priority.NORMAL)
            await sends.reach(1)
            (row,) = await written()
            assert (row.msg_id, row.attempts) == (tick.message_id, 0)
            await sends.reach(2)  # resent
            (row,) = await written()
            assert row.attempts == 1


async def _acked(acks: AckTimes, count: int) -> None:
    while len(acks.acked) < count:
        acks.changed.clear()
        await acks.changed.wait()


async def test_messages_the_gateway_acks_in_time_are_never_written(
    mosquitto: Server, state: Path
) -> None:
    """The real cloud link over MQTT and the real gateway with its default ack
    pacing (250 ms): messages put while connected are sent from memory and
    their puts complete on the gateway's signed ack, with nothing written."""
    from relay.outbox import OutboxConfig, Priority, PutOutcome

    acks = AckTimes()
    async with (
        running(config(state, broker_url=mosquitto.url)),
        phone_link(
            state, mosquitto, observer=acks, outbox_config=OutboxConfig(write_delay=3)
        ) as (link, outbox),
    ):
        async with asyncio.timeout(WAIT_S):
            # An awaited put is written at once; its ack says the link is up.
            assert await link.put(telemetry(0), Priority.NORMAL) is PutOutcome.STORED
            await _acked(acks, 1)
            before = await outbox.stats()
            ticks = [telemetry(n) for n in (1, 2, 3)]
            futures = [await link.submit(t, Priority.NORMAL) for t in ticks]
            assert all(outbox.holds(t.message_id) for t in ticks)
            outcomes = await asyncio.gather(*futures)
        assert outcomes == [PutOutcome.ACKNOWLEDGED] * 3
        after = await outbox.stats()
        assert after.stored == before.stored == 1
        assert (after.acked_unwritten, after.unwritten) == (3, 0)


async def test_messages_acked_after_the_write_delay_are_written_first(
    mosquitto: Server, state: Path
) -> None:
    """A gateway holding its acks 1 s, past a 0.2 s write delay: the message is
    written (its put says STORED before the ack), then deleted by the ack."""
    from relay.outbox import OutboxConfig, Priority, PutOutcome

    acks = AckTimes()
    async with held_acks(
        state, mosquitto, observer=acks, outbox_config=OutboxConfig(write_delay=0.2)
    ) as (link, outbox):
        async with asyncio.timeout(WAIT_S):
            await link.put(telemetry(0), Priority.NORMAL)
            await _acked(acks, 1)
            tick = telemetry(1)
            future = await link.submit(tick, Priority.NORMAL)
            assert outbox.holds(tick.message_id)
            assert await future is PutOutcome.STORED
            acked = [key for key, _, _ in acks.acked]
            assert tick.message_id not in acked  # written before the gateway's ack
            assert (await outbox.stats()).stored == 2
            await _acked(acks, len(acked) + 1)
            assert acks.acked[-1][0] == tick.message_id
        stats = await outbox.stats()
        assert (stats.acked_unwritten, stats.unwritten) == (0, 0)
