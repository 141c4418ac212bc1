"""The gateway's MQTT 5 transport (aiomqtt): a shared subscription, QoS 1.

Subscribes to ``$share/{group}/{prefix}/+/up`` and
``$share/{group}/{prefix}/+/presence``, so any number of gateways behind one
broker share the devices' traffic (each message goes to one member of the
group), and publishes each device's acks and answers to
``{prefix}/{pseudonym}/down``. Every process has its own random client id and
a clean session: a gateway's in-flight messages die with it, and the phones
resend whatever no gateway acknowledged.

The connection comes back by itself after a broker restart, on the jittered,
capped backoff of :class:`relay.uplink.Backoff` (one INFO line per reconnect).
A receive loop that waits on a full gateway queue holds back aiomqtt's reader:
backpressure, bounded by ``max_queued_incoming`` (beyond, aiomqtt drops
messages, which the phones resend).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import socket
import ssl
from typing import Final

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from relay.uplink import Endpoint, parse_broker_url
from relay.uplink.base import STABLE_AFTER_S
from relay.uplink.mqtt import write_through
from relay.uplink.tls import client_tls_context
from tools.cloud.config import GatewayConfig
from tools.cloud.gateway import Channel, Gateway

__all__ = ["MqttTransport"]

_NODELAY: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
"""Socket options of the MQTT client: no Nagle delay on small publishes."""

logger = logging.getLogger(__name__)

MAX_INFLIGHT: Final = 64
MAX_QUEUED_OUTGOING: Final = 4096
MAX_QUEUED_INCOMING: Final = 16_384
_CHANNELS: Final[dict[str, Channel]] = {"up": "up", "presence": "presence"}


class MqttTransport:
    """The MQTT side of the gateway (module docstring).

    Args:
        config: The gateway configuration (``broker_url`` must be set).
        gateway: Where received payloads go.
    """

    def __init__(self, config: GatewayConfig, gateway: Gateway) -> None:
        """Prepare; :meth:`run` connects."""
        if config.broker_url is None:
            raise ValueError("MqttTransport needs config.broker_url")
        self._config = config
        self._gateway = gateway
        self._endpoint: Endpoint = parse_broker_url(config.broker_url)
        self._client: aiomqtt.Client | None = None
        self._client_id = f"glasses-relay-gw-{secrets.token_hex(6)}"
        self._prefix = config.prefix + "/"
        self._filters = [
            f"$share/{config.group}/{config.prefix}/+/{channel}"
            for channel in _CHANNELS
        ]
        self._rng = random.Random()  # jitter only
        self._connected = asyncio.Event()
        self.connects = 0
        self.unexpected = 0

    @property
    def name(self) -> str:
        """``mqtt``."""
        return "mqtt"

    @property
    def url(self) -> str:
        """The broker URL (safe to log)."""
        return self._endpoint.url()

    def reachable(self, pseudonym: str) -> bool:
        """Whether the broker connection is up."""
        return self._client is not None

    async def wait_connected(self) -> None:
        """Wait until subscribed; bound it with ``asyncio.timeout``."""
        await self._connected.wait()

    async def send(
        self, pseudonym: str, payload: bytes, *, reliable: bool = True
    ) -> bool:
        """Publish ``payload`` to the device's ``down`` topic.

        At QoS 1, or QoS 0 when not ``reliable`` (acknowledgements: a lost
        one costs the phone a resend, acknowledged again; QoS 0 spares the
        phone, the broker and the gateway a PUBACK each).
        """
        client = self._client
        if client is None:
            return False
        topic = f"{self._config.prefix}/{pseudonym}/down"
        try:
            async with asyncio.timeout(self._config.send_timeout_s):
                await client.publish(
                    topic, payload, qos=1 if reliable else 0, timeout=math.inf
                )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            logger.debug("> publish to %s failed: %s", pseudonym, exc)
            return False
        return True

    async def run(self) -> None:
        """Connect, consume and reconnect until cancelled."""
        loop = asyncio.get_running_loop()
        attempt = 0
        tls = await self._tls()
        while True:
            started = loop.time()
            try:
                await self._session(tls)
                reason = "connection ended"
            except aiomqtt.MqttError as exc:
                reason = str(exc) or exc.__class__.__name__
            except TimeoutError:
                reason = "no answer in time"
            finally:
                self._client = None
                self._connected.clear()
            if loop.time() - started >= STABLE_AFTER_S:
                attempt = 0
            delay = self._config.backoff.delay(attempt, self._rng.random())
            attempt += 1
            logger.info(
                "mqtt: broker %s unavailable (%s); reconnecting in %.2f s",
                self.url,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _tls(self) -> ssl.SSLContext | None:
        if not self._endpoint.tls:
            return None
        return await asyncio.to_thread(
            client_tls_context, ca_file=None, cert_file=None, key_file=None
        )

    def _new_client(self, tls: ssl.SSLContext | None) -> aiomqtt.Client:
        cfg = self._config
        client = aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            keepalive=cfg.mqtt_keepalive_s,
            timeout=cfg.connect_timeout_s,
            max_inflight_messages=MAX_INFLIGHT,
            max_queued_outgoing_messages=MAX_QUEUED_OUTGOING,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
            tls_context=tls,
            # QoS 1 exchanges must not wait for delayed ACKs (40 ms each).
            socket_options=_NODELAY,
        )
        client.pending_calls_threshold = MAX_QUEUED_OUTGOING
        write_through(client)
        return client

    async def _session(self, tls: ssl.SSLContext | None) -> None:
        client = self._new_client(tls)
        async with client:
            async with asyncio.timeout(self._config.connect_timeout_s):
                granted = await client.subscribe(
                    [(topic, 1) for topic in self._filters], timeout=math.inf
                )
            for code in granted:
                value = code.value if isinstance(code, ReasonCode) else code
                if value >= 0x80:
                    raise aiomqtt.MqttError(f"subscription refused: {code}")
            self._client = client
            self._connected.set()
            self.connects += 1
            logger.info(
                "mqtt: %s to %s, shared group %r, prefix %r",
                "connected" if self.connects == 1 else "reconnected",
                self.url,
                self._config.group,
                self._config.prefix,
            )
            async for message in client.messages:
                await self._on_message(message)

    async def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        pseudonym, _, channel = topic.removeprefix(self._prefix).partition("/")
        kind = _CHANNELS.get(channel)
        if (
            kind is None
            or not topic.startswith(self._prefix)
            or not pseudonym
            or not isinstance(payload, (bytes, bytearray))
        ):
            self.unexpected += 1
            return
        await self._gateway.submit(pseudonym, kind, bytes(payload), self.name)
