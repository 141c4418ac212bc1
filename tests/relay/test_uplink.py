"""relay.uplink against a real mosquitto and a local aiohttp WebSocket gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiomqtt
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from servers import LOOPBACK, Mosquitto, TcpProxy

from relay.errors import ConfigError, UplinkConfigError, UplinkError
from relay.uplink import (
    CHANNEL_UP,
    Backoff,
    MqttConfig,
    MqttUplink,
    PayloadTooLargeError,
    Uplink,
    UplinkState,
    UplinkUnavailableError,
    WsConfig,
    WsUplink,
    parse_broker_url,
    parse_gateway_url,
)
from relay.uplink.mqtt import write_through
from relay.uplink.reconnect import ReconnectingUplink

WAIT_S = 10.0
FAST = Backoff(initial_s=0.05, cap_s=0.5)
PSEUDONYM = "p-4f2a"
UP = f"gr/v1/{PSEUDONYM}/up"
DOWN = f"gr/v1/{PSEUDONYM}/down"
PRESENCE = f"gr/v1/{PSEUDONYM}/presence"


def mqtt_config(url: str, **overrides: object) -> MqttConfig:
    fields: dict[str, object] = {
        "client_id": "phone-1",
        "pseudonym": PSEUDONYM,
        "backoff": FAST,
        "connect_timeout_s": 3.0,
        "send_timeout_s": 5.0,
    }
    fields.update(overrides)
    return MqttConfig(url, **fields)  # type: ignore[arg-type]


def gateway(port: int, identifier: str = "gateway") -> aiomqtt.Client:
    """The cloud side, as a plain aiomqtt client."""
    return aiomqtt.Client(
        LOOPBACK,
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=WAIT_S,
    )


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(WAIT_S):
        return await client.messages.__anext__()


async def take(uplink: Uplink, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(WAIT_S):
        async for payload in uplink.incoming():
            got.append(payload)
            if len(got) == count:
                break
    return got


async def send_when_connected(
    uplink: Uplink, payloads: Sequence[tuple[str, bytes]]
) -> None:
    """What the outbox does: wait for the link, send, retry if it dropped again."""
    async with asyncio.timeout(WAIT_S):
        while True:
            await uplink.wait_connected()
            try:
                await uplink.send(payloads)
            except UplinkUnavailableError:
                continue
            return


@pytest.fixture
async def mqtt_uplink(mosquitto: Mosquitto) -> AsyncIterator[MqttUplink]:
    async with MqttUplink(mqtt_config(mosquitto.url)) as uplink:
        async with asyncio.timeout(WAIT_S):
            await uplink.wait_connected()
        yield uplink


# ------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("mqtt://broker.example", "mqtt", "broker.example", 1883),
        ("mqtts://broker.example", "mqtts", "broker.example", 8883),
        ("mqtt://127.0.0.1:1884/", "mqtt", "127.0.0.1", 1884),
        ("mqtts://[::1]:9", "mqtts", "::1", 9),
    ],
)
def test_parse_broker_url(url: str, scheme: str, host: str, port: int) -> None:
    endpoint = parse_broker_url(url)
    assert (endpoint.scheme, endpoint.host, endpoint.port) == (scheme, host, port)
    assert endpoint.tls == (scheme == "mqtts")


@pytest.mark.parametrize(
    ("url", "port", "path"),
    [
        ("ws://gw.example", 80, "/"),
        ("wss://gw.example/v1/uplink?device=p", 443, "/v1/uplink?device=p"),
        ("ws://127.0.0.1:8080/u", 8080, "/u"),
    ],
)
def test_parse_gateway_url(url: str, port: int, path: str) -> None:
    endpoint = parse_gateway_url(url)
    assert (endpoint.port, endpoint.path) == (port, path)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("broker.example:1883", "no scheme"),
        ("tcp://broker.example", "scheme 'tcp'"),
        ("ws://broker.example", "scheme 'ws'"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://broker.example:99999", "malformed port"),
        ("mqtt://broker.example:abc", "malformed port"),
        ("mqtt://broker.example:0", "port 0"),
        ("mqtt://broker.example:", "empty port"),
        ("mqtt://bro ker.example", "spaces"),
        ("mqtt://broker.example/topic", "path"),
        ("mqtt://user:hunter2@broker.example", "credentials"),
        ("mqtt://[::1", "malformed"),
        ("mqtt://bad_host!:1883", "malformed host"),
    ],
)
def test_malformed_broker_url_is_one_line_config_error(url: str, problem: str) -> None:
    with pytest.raises(UplinkConfigError, match=problem) as info:
        parse_broker_url(url)
    message = str(info.value)
    assert "\n" not in message
    assert "hunter2" not in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mqtt://gw.example", "scheme 'mqtt'"),
        ("http://gw.example", "scheme 'http'"),
        ("wss://gw.example/x#frag", "fragment"),
        ("wss://:443/x", "no host"),
    ],
)
def test_malformed_gateway_url(url: str, problem: str) -> None:
    with pytest.raises(UplinkConfigError, match=problem) as info:
        parse_gateway_url(url)
    assert "\n" not in str(info.value)


def test_configs_validate_offline(tmp_path: Path) -> None:
    with pytest.raises(UplinkConfigError, match="scheme 'http'"):
        mqtt_config("http://x")
    with pytest.raises(UplinkConfigError, match="pseudonym"):
        mqtt_config("mqtt://x", pseudonym="a/b")
    with pytest.raises(UplinkConfigError, match="mqtts://"):
        mqtt_config("mqtt://x", ca_file=tmp_path / "ca.pem")
    with pytest.raises(UplinkConfigError, match="max_pending"):
        mqtt_config("mqtt://x", max_inflight=32, max_pending=8)
    with pytest.raises(UplinkConfigError, match="wss://"):
        WsConfig("ws://x", ca_file=tmp_path / "ca.pem")
    config = mqtt_config("mqtt://x", password="hunter2", username="u")
    assert "hunter2" not in repr(config)
    assert config.down_topic == DOWN
    assert config.presence_topic == PRESENCE


# ------------------------------------------------------------------- MQTT


async def test_mqtt_round_trip(mosquitto: Mosquitto, mqtt_uplink: MqttUplink) -> None:
    async with gateway(mosquitto.port) as cloud:
        await cloud.subscribe(UP, qos=1)
        payloads = [(CHANNEL_UP, bytes([i]) * (i + 1)) for i in range(5)]
        await mqtt_uplink.send(payloads)
        got = [(await next_message(cloud)).payload for _ in payloads]
        assert got == [p for _, p in payloads]

        await cloud.publish(DOWN, b"\x00ack-1", qos=1)
        await cloud.publish(DOWN, b"\x00ack-2", qos=1)
        assert await take(mqtt_uplink, 2) == [b"\x00ack-1", b"\x00ack-2"]

    stats = mqtt_uplink.stats()
    assert stats.state is UplinkState.CONNECTED
    assert (stats.connects, stats.reconnects, stats.in_flight) == (1, 0, 0)
    assert stats.publishes == 5
    assert stats.bytes_sent == sum(len(p) for _, p in payloads)
    assert (stats.received, stats.bytes_received) == (2, 12)


async def test_mqtt_write_through_writes_at_once_and_falls_back_when_full(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packets queued on the loop's thread go out without aiomqtt's writer
    callback; one too big for the socket buffer is finished by it, intact."""
    loop = asyncio.get_running_loop()
    writers: list[int] = []
    add_writer = loop.add_writer

    def counting(fd: int, callback: Callable[..., object], *args: object) -> None:
        writers.append(fd)
        add_writer(fd, callback, *args)

    async with (
        gateway(mosquitto.port, "sub") as sub,
        gateway(mosquitto.port, "pub") as pub,
    ):
        await sub.subscribe("t/#", qos=1)
        write_through(pub)
        sock = pub._client.socket()
        assert isinstance(sock, socket.socket)
        fd = sock.fileno()
        monkeypatch.setattr(loop, "add_writer", counting)
        await pub.publish("t/1", b"one", qos=1)
        await pub.publish("t/0", b"zero", qos=0)
        assert fd not in writers
        # More than a (small) socket buffer takes: the kernel says EAGAIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * (8 << 10)
        await pub.publish("t/big", big, qos=1)
        assert fd in writers
        got = {}
        for _ in range(3):
            message = await next_message(sub)
            got[message.topic.value] = message.payload
    assert got == {"t/1": b"one", "t/0": b"zero", "t/big": big}


async def test_mqtt_write_through_on_a_dead_connection_leaves_no_loop_error(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that meets the broker gone: paho closes the socket; nothing is
    handed to the loop for it (an ``add_writer(-1)`` would log a traceback)."""
    client = aiomqtt.Client(
        LOOPBACK,
        mosquitto.port,
        identifier="pub",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=1.0,  # the disconnect at the end waits for a broker that is gone
    )
    write_through(client)
    with (
        caplog.at_level(logging.ERROR, logger="asyncio"),
        contextlib.suppress(aiomqtt.MqttError),
    ):
        async with client:
            await client.publish("t/1", b"x", qos=1)
            # Killed while the loop does not run, so no read notices first:
            # the writes below meet the closed connection (EPIPE).
            mosquitto.kill_sync()
            time.sleep(0.2)  # noqa: ASYNC251 - keep the loop from reading
            for _ in range(3):
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish("t/0", b"y" * 1000, qos=0)
                time.sleep(0.05)  # noqa: ASYNC251
        await asyncio.sleep(0.1)  # callbacks scheduled meanwhile run now
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_mqtt_pipelined_publishes_log_no_warning(
    mosquitto: Mosquitto, mqtt_uplink: MqttUplink, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = [(CHANNEL_UP, i.to_bytes(4, "big") * 64) for i in range(300)]
    async with gateway(mosquitto.port) as cloud:
        await cloud.subscribe(UP, qos=1)
        with caplog.at_level(logging.WARNING):
            await asyncio.gather(
                mqtt_uplink.send(payloads[:150]), mqtt_uplink.send(payloads[150:])
            )
        assert [r.getMessage() for r in caplog.records] == []
        got = {(await next_message(cloud)).payload for _ in payloads}
    assert got == {p for _, p in payloads}
    assert mqtt_uplink.stats().publishes == 300


async def test_mqtt_send_checks_before_sending(mqtt_uplink: MqttUplink) -> None:
    with pytest.raises(ValueError, match="channel"):
        await mqtt_uplink.send([("up/../x", b"x")])
    with pytest.raises(PayloadTooLargeError) as info:
        await mqtt_uplink.send([(CHANNEL_UP, b"x" * (1024 * 1024 + 1))])
    assert info.value.limit == 1024 * 1024
    assert mqtt_uplink.stats().publishes == 0


async def test_mqtt_broker_down_at_start_then_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(tmp_path / "late")
    caplog.set_level(logging.INFO, logger="relay.uplink")
    # Default backoff: 0.5 s doubling, capped at 30 s, full jitter.
    uplink = MqttUplink(mqtt_config(broker.url, backoff=Backoff()))
    try:
        async with uplink:
            async with asyncio.timeout(1.0):
                with pytest.raises(UplinkUnavailableError):
                    await uplink.send([(CHANNEL_UP, b"early")])
            assert uplink.state is not UplinkState.CONNECTED

            await broker.start()
            async with gateway(broker.port) as cloud:
                await cloud.subscribe(UP, qos=1)
                await send_when_connected(uplink, [(CHANNEL_UP, b"later")])
                assert (await next_message(cloud)).payload == b"later"
    finally:
        await broker.stop()
    reconnect_lines = [
        r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()
    ]
    assert reconnect_lines
    assert all(
        r.levelno == logging.INFO
        for r in caplog.records
        if "reconnecting" in r.getMessage()
    )


async def test_mqtt_broker_restart_mid_stream(
    mosquitto: Mosquitto, mqtt_uplink: MqttUplink
) -> None:
    sent = 0

    async def produce(until: asyncio.Event) -> int:
        nonlocal sent
        failures = 0
        while not until.is_set():
            try:
                await mqtt_uplink.send([(CHANNEL_UP, sent.to_bytes(4, "big"))])
                sent += 1
            except UplinkUnavailableError:
                failures += 1
                await mqtt_uplink.wait_connected()
        return failures

    stop = asyncio.Event()
    async with asyncio.timeout(WAIT_S), asyncio.TaskGroup() as tasks:
        producer = tasks.create_task(produce(stop))
        await mosquitto.restart()
        await mqtt_uplink.wait_connected()
        before = sent
        await send_when_connected(mqtt_uplink, [(CHANNEL_UP, b"after")])
        while sent == before:  # the producer runs again after the reconnect
            await mqtt_uplink.send([(CHANNEL_UP, b"tick")])
        stop.set()
    assert producer.result() >= 1  # the outage was reported, not hidden
    assert mqtt_uplink.stats().reconnects >= 1
    assert mqtt_uplink.stats().in_flight == 0

    async with gateway(mosquitto.port) as cloud:
        await cloud.publish(DOWN, b"hello-again", qos=1)
    assert await take(mqtt_uplink, 1) == [b"hello-again"]


async def test_mqtt_downlink_queued_while_offline_survives_broker_restart(
    mosquitto: Mosquitto,
) -> None:
    async with TcpProxy(mosquitto.port) as proxy:
        config = mqtt_config(f"mqtt://{LOOPBACK}:{proxy.port}", client_id="phone-q")
        async with MqttUplink(config) as uplink:
            async with asyncio.timeout(WAIT_S):
                await uplink.wait_connected()
            await proxy.cut()  # the phone loses its network
            async with gateway(mosquitto.port) as cloud:
                for i in range(5):
                    await cloud.publish(DOWN, b"answer-%d" % i, qos=1)
            await mosquitto.restart()  # the session and its queue come from disk
            await proxy.resume()
            got = await take(uplink, 5)
            assert got == [b"answer-%d" % i for i in range(5)]
            assert uplink.stats().reconnects >= 1


async def test_mqtt_last_will_on_lost_connection(mosquitto: Mosquitto) -> None:
    will = b"\x02sealed-offline-presence"
    async with (
        gateway(mosquitto.port, "presence-watch") as watch,
        TcpProxy(mosquitto.port) as proxy,
    ):
        await watch.subscribe(PRESENCE, qos=1)
        config = mqtt_config(f"mqtt://{LOOPBACK}:{proxy.port}", will_payload=will)
        async with MqttUplink(config) as uplink:
            async with asyncio.timeout(WAIT_S):
                await uplink.wait_connected()
            await proxy.cut()  # no DISCONNECT reaches the broker
            message = await next_message(watch)
            assert message.payload == will
            assert str(message.topic) == PRESENCE


async def test_mqtt_clean_close_sends_no_will(mosquitto: Mosquitto) -> None:
    async with gateway(mosquitto.port, "presence-watch") as watch:
        await watch.subscribe(PRESENCE, qos=1)
        config = mqtt_config(mosquitto.url, will_payload=b"will")
        async with MqttUplink(config) as uplink:
            async with asyncio.timeout(WAIT_S):
                await uplink.wait_connected()
        assert uplink.state is UplinkState.DOWN
        await watch.publish(PRESENCE, b"marker", qos=1)
        assert (await next_message(watch)).payload == b"marker"


async def test_mqtt_tls(mosquitto_tls: Mosquitto) -> None:
    assert mosquitto_tls.tls_url is not None
    assert mosquitto_tls.ca_file is not None
    config = mqtt_config(mosquitto_tls.tls_url, ca_file=mosquitto_tls.ca_file)
    async with gateway(mosquitto_tls.port) as cloud, MqttUplink(config) as uplink:
        await cloud.subscribe(UP, qos=1)
        async with asyncio.timeout(WAIT_S):
            await uplink.wait_connected()
        await uplink.send([(CHANNEL_UP, b"over-tls")])
        assert (await next_message(cloud)).payload == b"over-tls"
        await cloud.publish(DOWN, b"back", qos=1)
        assert await take(uplink, 1) == [b"back"]


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"])
async def test_mqtt_bad_ca_file_is_config_error(
    tmp_path: Path, content: bytes | None
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    uplink = MqttUplink(mqtt_config("mqtts://127.0.0.1:1", ca_file=ca_file))
    with pytest.raises(UplinkConfigError, match="CA file") as info:
        await uplink.start()
    assert "\n" not in str(info.value)
    assert str(ca_file) in str(info.value)
    with pytest.raises(UplinkConfigError):
        await uplink.send([(CHANNEL_UP, b"x")])
    await uplink.aclose()


async def test_mqtt_refused_credentials_are_permanent(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "closed", allow_anonymous=False)
    await broker.start()
    try:
        config = mqtt_config(broker.url, username="phone", password="wrong")
        async with MqttUplink(config) as uplink:
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(UplinkConfigError, match="refused") as info:
                    await uplink.wait_connected()
            assert "\n" not in str(info.value)
            assert "wrong" not in str(info.value)
            with pytest.raises(UplinkConfigError):
                await uplink.send([(CHANNEL_UP, b"x")])
            with pytest.raises(UplinkConfigError):
                await take(uplink, 1)
    finally:
        await broker.stop()


async def test_mqtt_close_ends_incoming_and_is_idempotent(mosquitto: Mosquitto) -> None:
    uplink = MqttUplink(mqtt_config(mosquitto.url))
    await uplink.start()
    async with asyncio.timeout(WAIT_S):
        await uplink.wait_connected()
    await uplink.aclose()
    await uplink.aclose()
    assert await take(uplink, 1) == []
    with pytest.raises(UplinkUnavailableError, match="closed"):
        await uplink.send([(CHANNEL_UP, b"x")])
    with pytest.raises(UplinkUnavailableError):
        await uplink.wait_connected()
    assert issubclass(UplinkUnavailableError, UplinkError)


# -------------------------------------------------------------- WebSocket


class AckGateway:
    """A local aiohttp WebSocket gateway that acknowledges every binary frame."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[bytes] = []
        self.connections = 0
        self.connected = asyncio.Event()
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/uplink"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/uplink", self._uplink)
        app.router.add_get("/forbidden", self._forbidden)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _forbidden(self, request: web.Request) -> web.Response:
        return web.Response(status=403)

    async def _uplink(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self._sockets.add(ws)
        self.connected.set()
        try:
            async for message in ws:
                if message.type is WSMsgType.BINARY:
                    self.received.append(message.data)
                    await ws.send_bytes(b"ack:" + message.data)
        finally:
            self._sockets.discard(ws)
        return ws


@pytest.fixture
async def ack_gateway() -> AsyncIterator[AckGateway]:
    server = AckGateway()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def ws_config(url: str) -> WsConfig:
    return WsConfig(url, backoff=FAST, connect_timeout_s=3.0, heartbeat_s=5.0)


async def test_ws_round_trip(ack_gateway: AckGateway) -> None:
    uplink: Uplink = WsUplink(ws_config(ack_gateway.url))
    async with uplink:
        async with asyncio.timeout(WAIT_S):
            await uplink.wait_connected()
        await uplink.send([(CHANNEL_UP, b"one"), (CHANNEL_UP, b"\x00two")])
        assert await take(uplink, 2) == [b"ack:one", b"ack:\x00two"]
        stats = uplink.stats()
    assert ack_gateway.received == [b"one", b"\x00two"]
    assert (stats.publishes, stats.bytes_sent, stats.received) == (2, 7, 2)
    assert uplink.state is UplinkState.DOWN


async def test_ws_reconnects_after_gateway_restart(ack_gateway: AckGateway) -> None:
    async with WsUplink(ws_config(ack_gateway.url)) as uplink:
        async with asyncio.timeout(WAIT_S):
            await uplink.wait_connected()
        await uplink.send([(CHANNEL_UP, b"before")])
        assert await take(uplink, 1) == [b"ack:before"]

        await ack_gateway.stop()
        ack_gateway.connected.clear()
        await ack_gateway.start()
        async with asyncio.timeout(WAIT_S):
            await ack_gateway.connected.wait()
        await send_when_connected(uplink, [(CHANNEL_UP, b"after")])
        assert await take(uplink, 1) == [b"ack:after"]
        assert uplink.stats().reconnects == 1
        assert ack_gateway.connections == 2


async def test_ws_gateway_refusal_is_permanent(ack_gateway: AckGateway) -> None:
    url = f"ws://{LOOPBACK}:{ack_gateway.port}/forbidden"
    async with WsUplink(ws_config(url)) as uplink:
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(UplinkConfigError, match="HTTP 403"):
                await uplink.wait_connected()
        with pytest.raises(UplinkConfigError):
            await uplink.send([(CHANNEL_UP, b"x")])


async def test_mqtt_silent_broker_attempts_do_not_leak_sockets() -> None:
    """A peer that accepts TCP but never sends CONNACK: each attempt is closed."""
    closed = 0
    two_closed = asyncio.Event()
    peers: set[asyncio.StreamWriter] = set()

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal closed
        peers.add(writer)
        try:
            while await reader.read(4096):
                pass
            closed += 1
            if closed >= 2:
                two_closed.set()
        finally:
            writer.transport.abort()
            peers.discard(writer)

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = mqtt_config(f"mqtt://{LOOPBACK}:{port}", connect_timeout_s=0.3)
        uplink = MqttUplink(config)
        await uplink.start()
        try:
            async with asyncio.timeout(WAIT_S):
                await two_closed.wait()
            assert uplink.state is not UplinkState.CONNECTED
        finally:
            async with asyncio.timeout(2.0):  # cancels a pending attempt promptly
                await uplink.aclose()
    finally:
        server.close()
        for writer in list(peers):
            writer.transport.abort()
        await server.wait_closed()


class _StallingUplink(ReconnectingUplink[asyncio.Event]):
    """The base class over a transport that never accepts (to test send's bounds)."""

    def __init__(self, send_timeout_s: float) -> None:
        super().__init__(
            kind="stall",
            endpoint=parse_gateway_url("ws://127.0.0.1:9"),
            backoff=FAST,
            max_incoming=8,
            max_payload=1024,
            send_timeout_s=send_timeout_s,
        )
        self.drop = asyncio.Event()
        self.transmitting = asyncio.Event()

    async def _connect_and_serve(
        self, connected: Callable[[asyncio.Event], None]
    ) -> None:
        self.drop.clear()
        connected(self.drop)
        await self.drop.wait()
        raise UplinkUnavailableError("dropped")

    async def _transmit(
        self, conn: asyncio.Event, payloads: Sequence[tuple[str, bytes]]
    ) -> None:
        self.transmitting.set()
        await asyncio.Event().wait()  # the transport never accepts


async def test_send_ends_when_the_connection_is_lost_or_too_slow() -> None:
    uplink = _StallingUplink(send_timeout_s=30.0)
    await uplink.start()
    try:
        await asyncio.wait_for(uplink.wait_connected(), WAIT_S)
        send = asyncio.create_task(uplink.send([("up", b"x")]))
        await asyncio.wait_for(uplink.transmitting.wait(), WAIT_S)
        uplink.drop.set()  # the connection goes while the send waits
        with pytest.raises(UplinkUnavailableError, match="connection lost"):
            await asyncio.wait_for(send, WAIT_S)
        assert uplink.stats().in_flight == 0
    finally:
        await uplink.aclose()
    slow = _StallingUplink(send_timeout_s=0.05)
    await slow.start()
    try:
        await asyncio.wait_for(slow.wait_connected(), WAIT_S)
        with pytest.raises(UplinkUnavailableError, match="not accepted within"):
            await slow.send([("up", b"x")])
        assert slow.state is UplinkState.CONNECTED  # slow is not lost
    finally:
        await slow.aclose()
