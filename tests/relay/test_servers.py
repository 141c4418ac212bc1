"""The real-server fixtures work: MQTT round trips, persistence, TLS, redis."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import LOOPBACK, Mosquitto, RedisServer, ServerProcess, free_port

WAIT_S = 5.0


def _session_properties(expiry_s: int = 300) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    return props


def _client(
    port: int,
    identifier: str,
    *,
    persistent: bool = False,
    tls_context: ssl.SSLContext | None = None,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        LOOPBACK,
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=not persistent,
        properties=_session_properties() if persistent else None,
        tls_context=tls_context,
        timeout=WAIT_S,
    )


async def _next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(WAIT_S):
        return await client.messages.__anext__()


async def test_mosquitto_qos1_round_trip(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    async with (
        _client(mosquitto.port, "sub") as sub,
        _client(mosquitto.port, "pub") as pub,
    ):
        await sub.subscribe("t/round", qos=1)
        await pub.publish("t/round", b"\x00hello", qos=1)
        message = await _next_message(sub)
    assert message.payload == b"\x00hello"
    assert message.qos == 1


async def test_restart_keeps_persistent_session_queue(mosquitto: Mosquitto) -> None:
    async with _client(mosquitto.port, "keeper", persistent=True) as keeper:
        await keeper.subscribe("t/queued", qos=1)
    async with _client(mosquitto.port, "pub") as pub:
        await pub.publish("t/queued", b"while-away", qos=1)

    await mosquitto.restart()

    async with _client(mosquitto.port, "keeper", persistent=True) as keeper:
        message = await _next_message(keeper)
    assert message.payload == b"while-away"
    assert str(message.topic) == "t/queued"


async def test_kill_then_start_on_same_port(mosquitto: Mosquitto) -> None:
    port = mosquitto.port
    await mosquitto.kill()
    assert not mosquitto.running
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(LOOPBACK, port)
    await mosquitto.start()
    assert mosquitto.port == port
    async with _client(port, "after") as client:
        await client.publish("t/after", b"x", qos=1)


async def test_tls_round_trip(mosquitto_tls: Mosquitto) -> None:
    assert mosquitto_tls.tls_port is not None
    assert mosquitto_tls.ca_file is not None
    assert mosquitto_tls.tls_url == f"mqtts://127.0.0.1:{mosquitto_tls.tls_port}"
    context = await asyncio.to_thread(
        ssl.create_default_context, cafile=str(mosquitto_tls.ca_file)
    )
    port = mosquitto_tls.tls_port
    async with (
        _client(port, "tls-sub", tls_context=context) as sub,
        _client(port, "tls-pub", tls_context=context) as pub,
    ):
        await sub.subscribe("t/tls", qos=1)
        await pub.publish("t/tls", b"secret", qos=1)
        message = await _next_message(sub)
    assert message.payload == b"secret"


async def test_redis_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(LOOPBACK, redis_server.port)
        try:
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            await writer.drain()
            assert await reader.readline() == b"+PONG\r\n"
        finally:
            writer.close()
            await writer.wait_closed()


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("line one\nthe reason it died\n")
    server = ServerProcess("false", ["/bin/false"], [free_port()], tmp_path, log)
    with pytest.raises(AssertionError, match="exited with status 1") as info:
        server.start_sync(timeout=5)
    assert "the reason it died" in str(info.value)
    assert not server.running
