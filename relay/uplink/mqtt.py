"""MQTT 5 uplink (aiomqtt): QoS 1, a persistent session, a last will, TLS.

Topics, per device (the caller picks the pseudonym, never the device id)::

    {topic_prefix}/{pseudonym}/up        envelopes to the gateway (channel "up")
    {topic_prefix}/{pseudonym}/down      the gateway's payloads (subscribed, QoS 1)
    {topic_prefix}/{pseudonym}/presence  the last will (payload from the caller)

``send([(channel, payload), ...])`` publishes each payload at QoS 1 on
``{topic_prefix}/{pseudonym}/{channel}`` and returns after every PUBACK. Packing
small envelopes into one payload is the caller's job (PERFORMANCE.md §3.1: about
60 µs of client CPU per publish whatever its size).

Session: a fixed client id, ``clean_start=False`` and a session expiry interval,
so the broker keeps the subscription and queues QoS 1 downlink messages while the
phone is offline (and across broker restarts, with broker persistence on).

aiomqtt settings (PERFORMANCE.md §3.1, SECURITY.md):
    ``max_inflight_messages`` = ``max_inflight`` (16): PUBLISHes awaiting PUBACK on
    the wire; 8-16 reaches the broker's pipelined rate without serialising on the
    RTT. ``max_queued_outgoing_messages`` = ``max_pending`` (256): paho's own queue
    (in flight included) discards when full, so :meth:`MqttUplink.send` holds a
    semaphore of the same size and callers wait instead of losing messages.
    ``pending_calls_threshold`` = ``max_pending`` + 16: aiomqtt warns on every call
    while more calls are pending than this (default 10), which would log a line per
    publish at our window. Incoming: aiomqtt's queue is unbounded but drained at
    once into the uplink's bounded queue.

Writes go out at once: aiomqtt hands each queued packet to the event loop
through ``call_soon_threadsafe(add_writer)`` (a wake-up of the loop's self-pipe,
an ``epoll_ctl`` to register the socket, another to unregister it: five system
calls and two loop iterations per PUBLISH or PUBACK). :func:`write_through`
makes a packet queued on the loop's own thread be written there and then, as
paho does itself without an external loop; a partial write (a full socket
buffer) or a packet queued from another thread takes aiomqtt's path.

Limitations: aiomqtt 2.5 ignores the PUBACK reason code, so a broker that refuses
a publish with a PUBACK (e.g. 0x87 not authorised) is indistinguishable from
acceptance here; the end-to-end signed acknowledgement catches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from relay.errors import UplinkConfigError
from relay.uplink.base import Backoff, UplinkUnavailableError
from relay.uplink.reconnect import ReconnectingUplink
from relay.uplink.tls import client_tls_context
from relay.uplink.url import parse_broker_url

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "MqttConfig",
    "MqttUplink",
    "write_through",
]

_NODELAY: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
"""Socket options of the MQTT client: no Nagle delay on small publishes."""

logger = logging.getLogger(__name__)

DEFAULT_TOPIC_PREFIX: Final = "gr/v1"
DOWN_CHANNEL: Final = "down"
PRESENCE_CHANNEL: Final = "presence"
#: Extra aiomqtt pending calls tolerated above max_pending (subscribes, races).
_PENDING_SLACK: Final = 16
_MAX_TOPIC_BYTES: Final = 65_535
_MAX_SESSION_EXPIRY_S: Final = 0xFFFF_FFFF
#: CONNACK reason codes that retrying cannot fix (MQTT 5 §3.2.2.2; 3.1.1 codes 1-5).
_PERMANENT_CONNACK: Final = frozenset(
    {
        1,  # 3.1.1: unacceptable protocol version
        2,  # 3.1.1: identifier rejected
        4,  # 3.1.1: bad user name or password
        5,  # 3.1.1: not authorised
        0x84,  # unsupported protocol version
        0x85,  # client identifier not valid
        0x86,  # bad user name or password
        0x87,  # not authorised
        0x8A,  # banned
        0x8C,  # bad authentication method
        0x90,  # topic name invalid (the will topic)
        0x95,  # packet too large (the will payload)
        0x99,  # payload format invalid
        0x9A,  # retain not supported (the will)
        0x9B,  # QoS not supported (the will)
    }
)


def _check_topic_level(what: str, value: str, *, allow_slash: bool) -> None:
    bad = "+#\0" if allow_slash else "+#\0/"
    if not value or any(c in bad for c in value):
        shown = "+ # NUL" if allow_slash else "+ # / NUL"
        raise UplinkConfigError(
            f"MQTT {what} {value!r} must be non-empty without {shown}"
        )
    if value.startswith(("$", "/")) or value.endswith("/"):
        raise UplinkConfigError(f"MQTT {what} {value!r} must not start with $ or /")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Configuration of an :class:`MqttUplink`.

    Attributes:
        url: ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.
        client_id: Fixed MQTT client identifier (the persistent session's key).
        pseudonym: The device's topic segment, chosen by the caller.
        topic_prefix: Topic levels before the pseudonym.
        will_payload: Opaque last-will payload for the presence topic; None for
            no will.
        will_retain: Publish the will retained.
        username: MQTT user name, or None.
        password: MQTT password, or None (never shown in ``repr``).
        ca_file: CA to trust for ``mqtts://`` (None: the system store).
        client_cert: PEM client certificate for mutual TLS.
        client_key: PEM key of ``client_cert`` (None: inside the certificate file).
        keepalive_s: MQTT keepalive; a dead connection is noticed within 1.5x.
        session_expiry_s: How long the broker keeps the session while offline.
        max_inflight: PUBLISHes awaiting PUBACK at once.
        max_pending: Publishes handed to the client (in flight plus queued);
            :meth:`MqttUplink.send` waits when this many are pending.
        max_incoming: Incoming queue limit (payloads); drop-newest when full.
        max_payload: Largest outgoing payload, bytes.
        connect_timeout_s: Bound on CONNACK and SUBACK.
        send_timeout_s: Bound on one ``send`` call (all PUBACKs).
        backoff: Reconnect delays.
    """

    url: str
    client_id: str
    pseudonym: str
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    will_payload: bytes | None = field(default=None, repr=False)
    will_retain: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 86_400
    max_inflight: int = 16
    max_pending: int = 256
    max_incoming: int = 1024
    max_payload: int = 1024 * 1024
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        """Validate offline.

        Raises:
            UplinkConfigError: a field is invalid (one line, naming the field).
        """
        endpoint = parse_broker_url(self.url)
        if not self.client_id or len(self.client_id.encode()) > _MAX_TOPIC_BYTES:
            raise UplinkConfigError("MQTT client_id must be 1 to 65535 bytes")
        _check_topic_level("pseudonym", self.pseudonym, allow_slash=False)
        _check_topic_level("topic_prefix", self.topic_prefix, allow_slash=True)
        if not endpoint.tls and (
            self.ca_file is not None or self.client_cert is not None
        ):
            raise UplinkConfigError(
                f"ca_file/client_cert need an mqtts:// broker URL, got {endpoint.url()}"
            )
        if self.client_key is not None and self.client_cert is None:
            raise UplinkConfigError("MQTT client_key given without client_cert")
        if self.password is not None and self.username is None:
            raise UplinkConfigError("MQTT password given without username")
        if not 0 <= self.session_expiry_s <= _MAX_SESSION_EXPIRY_S:
            raise UplinkConfigError("MQTT session_expiry_s must be 0 to 4294967295")
        if not 0 < self.keepalive_s <= 65_535:
            raise UplinkConfigError("MQTT keepalive_s must be 1 to 65535")
        for name in ("max_inflight", "max_pending", "max_incoming", "max_payload"):
            if getattr(self, name) < 1:
                raise UplinkConfigError(f"MQTT {name} must be at least 1")
        if self.max_pending < self.max_inflight:
            raise UplinkConfigError("MQTT max_pending must be at least max_inflight")
        if self.connect_timeout_s <= 0 or self.send_timeout_s <= 0:
            raise UplinkConfigError("MQTT timeouts must be positive")

    def topic(self, channel: str) -> str:
        """Return the topic of ``channel`` (``up``, ``down``, ``presence``...)."""
        return f"{self.topic_prefix}/{self.pseudonym}/{channel}"

    @property
    def down_topic(self) -> str:
        """The topic the uplink subscribes to."""
        return self.topic(DOWN_CHANNEL)

    @property
    def presence_topic(self) -> str:
        """The topic of the last will."""
        return self.topic(PRESENCE_CHANNEL)


def write_through(client: aiomqtt.Client) -> None:
    """Make packets queued on the event loop's thread be written at once.

    aiomqtt's ``on_socket_register_write`` defers every write to a writer
    callback registered through ``call_soon_threadsafe``. This wraps it: on
    the thread running the loop, outside paho's callbacks (paho's own test
    before it writes directly), ``loop_write`` runs now; whatever it could
    not write (``EAGAIN``) goes to aiomqtt's writer as before, as do calls
    from other threads (the connect runs in an executor). If the attributes
    this relies on are missing (another aiomqtt or paho), nothing changes.
    """
    paho = getattr(client, "_client", None)
    deferred = getattr(paho, "on_socket_register_write", None)
    in_callback = getattr(paho, "_in_callback_mutex", None)
    if paho is None or deferred is None or in_callback is None:
        return
    loop = asyncio.get_running_loop()

    def register_write(paho_client: Any, userdata: Any, sock: Any) -> None:
        # No re-entry: paho counts the socket registered until it is
        # unregistered, so loop_write below does not call this hook again.
        if asyncio._get_running_loop() is not loop or not in_callback.acquire(
            blocking=False
        ):
            deferred(paho_client, userdata, sock)
            return
        in_callback.release()
        try:
            paho_client.loop_write()
        except Exception:  # noqa: BLE001 - aiomqtt's writer meets it and disconnects
            failed = True
        else:
            failed = False
        # A partial write (paho still counts the socket as registered and does
        # not call this hook again) or an error: aiomqtt's writer takes over,
        # unless the connection is gone (paho closed the socket on the error).
        if (failed or paho_client.want_write()) and paho_client.socket() is not None:
            deferred(paho_client, userdata, sock)

    paho.on_socket_register_write = register_write


async def _connect(client: aiomqtt.Client) -> None:
    """Enter ``client`` without leaking the socket of a failed or cancelled attempt.

    aiomqtt 2.5 connects in an executor thread that cancellation cannot stop, and
    leaves the socket open when the CONNACK wait times out (a broker or load
    balancer that accepts TCP but never answers); reconnecting forever would leak
    a descriptor per attempt. So a cancelled attempt is allowed to finish (it is
    bounded by paho's TCP connect timeout and aiomqtt's CONNACK timeout) and every
    attempt that does not end connected is abandoned explicitly.
    """
    attempt = asyncio.create_task(client.__aenter__())
    try:
        await asyncio.shield(attempt)
    except asyncio.CancelledError:
        await asyncio.wait((attempt,))
        if not attempt.cancelled() and attempt.exception() is None:
            await client.__aexit__(None, None, None)
        else:
            _abandon(client)
        raise
    except aiomqtt.MqttError:
        _abandon(client)
        raise


def _abandon(client: aiomqtt.Client) -> None:
    """Close the socket of an attempt that did not connect, if it has one.

    aiomqtt has no public way to do this; its paho client is the private
    ``_client``. paho queues a DISCONNECT, writes it from aiomqtt's writer callback
    on the loop, then closes the socket and unregisters it.
    """
    paho = client._client
    if paho.socket() is not None:
        paho.disconnect()


def _reason_value(rc: int | ReasonCode | None) -> int | None:
    if isinstance(rc, ReasonCode):
        return rc.value
    return rc


class MqttUplink(ReconnectingUplink[aiomqtt.Client]):
    """A reconnecting MQTT 5 uplink (see the module docstring).

    Args:
        config: The configuration (already validated by ``MqttConfig``).
    """

    def __init__(self, config: MqttConfig) -> None:
        super().__init__(
            kind="mqtt",
            endpoint=parse_broker_url(config.url),
            backoff=config.backoff,
            max_incoming=config.max_incoming,
            max_payload=config.max_payload,
            send_timeout_s=config.send_timeout_s,
        )
        self._config = config
        self._tls: ssl.SSLContext | None = None
        self._window = asyncio.Semaphore(config.max_pending)
        self._topics: dict[str, str] = {}
        self.unexpected_incoming = 0

    @property
    def config(self) -> MqttConfig:
        """The configuration."""
        return self._config

    async def _prepare(self) -> None:
        if self._endpoint.tls:
            cfg = self._config
            self._tls = await asyncio.to_thread(
                client_tls_context,
                ca_file=cfg.ca_file,
                cert_file=cfg.client_cert,
                key_file=cfg.client_key,
            )

    def _check_channel(self, channel: str) -> None:
        if channel not in self._topics:
            if not channel or any(c in "/+#\0" for c in channel):
                raise ValueError(f"invalid MQTT channel key {channel!r}")
            self._topics[channel] = self._config.topic(channel)

    def _new_client(self) -> aiomqtt.Client:
        cfg = self._config
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = cfg.session_expiry_s
        will = None
        if cfg.will_payload is not None:
            will = aiomqtt.Will(
                cfg.presence_topic, cfg.will_payload, qos=1, retain=cfg.will_retain
            )
        client = aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            identifier=cfg.client_id,
            username=cfg.username,
            password=cfg.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            clean_start=False,
            properties=properties,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            max_inflight_messages=cfg.max_inflight,
            max_queued_outgoing_messages=cfg.max_pending,
            tls_context=self._tls,
            # QoS 1 exchanges must not wait for delayed ACKs (40 ms each).
            socket_options=_NODELAY,
        )
        client.pending_calls_threshold = cfg.max_pending + _PENDING_SLACK
        write_through(client)
        return client

    async def _connect_and_serve(
        self, connected: Callable[[aiomqtt.Client], None]
    ) -> None:
        cfg = self._config
        client = self._new_client()
        try:
            async with contextlib.AsyncExitStack() as stack:
                await _connect(client)
                stack.push_async_exit(client)
                async with asyncio.timeout(cfg.connect_timeout_s):
                    granted = await client.subscribe(
                        cfg.down_topic, qos=1, timeout=math.inf
                    )
                self._check_granted(granted)
                connected(client)
                async for message in client.messages:
                    self._on_message(message)
        except MqttConnectError as exc:
            code = _reason_value(exc.rc)
            if code in _PERMANENT_CONNACK:
                raise UplinkConfigError(
                    f"MQTT broker {self._label} refused the connection: {exc}"
                ) from exc
            raise UplinkUnavailableError(f"broker refused: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise UplinkUnavailableError(str(exc) or exc.__class__.__name__) from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError("no CONNACK/SUBACK in time") from exc
        raise UplinkUnavailableError("message stream ended")

    def _check_granted(self, granted: tuple[int, ...] | list[ReasonCode]) -> None:
        for code in granted:
            value = _reason_value(code)
            if value is None or value >= 0x80:
                raise UplinkConfigError(
                    f"MQTT broker {self._label} refused the subscription to "
                    f"{self._config.down_topic!r}: {code}"
                )

    def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if message.topic.value != self._config.down_topic or not isinstance(
            payload, (bytes, bytearray)
        ):
            self.unexpected_incoming += 1
            logger.debug("< dropped a message on unexpected topic %s", message.topic)
            return
        self._deliver(bytes(payload))

    async def _transmit(
        self, conn: aiomqtt.Client, payloads: Sequence[tuple[str, bytes]]
    ) -> None:
        if len(payloads) == 1:  # the common case: no task group for one publish
            channel, payload = payloads[0]
            await self._publish(conn, self._topics[channel], payload)
            return
        try:
            async with asyncio.TaskGroup() as group:
                for channel, payload in payloads:
                    group.create_task(
                        self._publish(conn, self._topics[channel], payload)
                    )
        except* UplinkUnavailableError as failed:
            first = failed.exceptions[0]
            raise UplinkUnavailableError(str(first)) from first

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes
    ) -> None:
        async with self._window:
            try:
                await client.publish(topic, payload, qos=1, timeout=math.inf)
            except aiomqtt.MqttError as exc:
                raise UplinkUnavailableError(f"publish failed: {exc}") from exc
