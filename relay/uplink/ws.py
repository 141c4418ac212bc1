"""WebSocket uplink (aiohttp): binary frames to and from the gateway.

One ``aiohttp.ClientSession`` per uplink, one WebSocket at a time. Every payload
is one binary frame each way. The channel key of :meth:`WsUplink.send` is not
transmitted: the connection is the device's single channel, and the sealed
envelope binds its own topic. ``send`` returns once the frames are written (the
WebSocket layer has no per-message acknowledgement; the gateway's signed
acknowledgements arrive on ``incoming()``). aiohttp's ``heartbeat`` pings the
gateway and drops a connection whose pong is late, which triggers a reconnect.

Permanent errors: an HTTP 4xx answer to the handshake other than 408 and 429
(refused credentials, wrong path) and unusable TLS files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiohttp

from relay.errors import UplinkConfigError
from relay.uplink.base import Backoff, UplinkUnavailableError
from relay.uplink.reconnect import ReconnectingUplink
from relay.uplink.tls import client_tls_context
from relay.uplink.url import parse_gateway_url

__all__ = ["WsConfig", "WsUplink"]

logger = logging.getLogger(__name__)

_Ws = aiohttp.ClientWebSocketResponse[Literal[False]]
_RETRYABLE_4XX: Final = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class WsConfig:
    """Configuration of a :class:`WsUplink`.

    Attributes:
        url: ``ws://HOST[:PORT][/PATH]`` or ``wss://...``.
        headers: Extra handshake headers, e.g. ``(("Authorization", "Bearer ..."),)``
            (never shown in ``repr``).
        ca_file: CA to trust for ``wss://`` (None: the system store).
        client_cert: PEM client certificate for mutual TLS.
        client_key: PEM key of ``client_cert`` (None: inside the certificate file).
        heartbeat_s: Ping interval; a pong later than half of it drops the link.
        max_incoming: Incoming queue limit (payloads); drop-newest when full.
        max_payload: Largest outgoing payload (frame), bytes.
        max_frame: Largest incoming frame, bytes; a larger one drops the link.
        connect_timeout_s: Bound on the TCP, TLS and WebSocket handshakes.
        send_timeout_s: Bound on one ``send`` call.
        close_timeout_s: Bound on the closing handshake.
        backoff: Reconnect delays.
    """

    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    heartbeat_s: float = 15.0
    max_incoming: int = 1024
    max_payload: int = 1024 * 1024
    max_frame: int = 4 * 1024 * 1024
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    close_timeout_s: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        """Validate offline.

        Raises:
            UplinkConfigError: a field is invalid (one line, naming the field).
        """
        endpoint = parse_gateway_url(self.url)
        if not endpoint.tls and (
            self.ca_file is not None or self.client_cert is not None
        ):
            raise UplinkConfigError(
                f"ca_file/client_cert need a wss:// gateway URL, got {endpoint.url()}"
            )
        if self.client_key is not None and self.client_cert is None:
            raise UplinkConfigError("WebSocket client_key given without client_cert")
        for name in ("max_incoming", "max_payload", "max_frame"):
            if getattr(self, name) < 1:
                raise UplinkConfigError(f"WebSocket {name} must be at least 1")
        for name in (
            "heartbeat_s",
            "connect_timeout_s",
            "send_timeout_s",
            "close_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise UplinkConfigError(f"WebSocket {name} must be positive")


class WsUplink(ReconnectingUplink[_Ws]):
    """A reconnecting WebSocket uplink (see the module docstring).

    Args:
        config: The configuration (already validated by ``WsConfig``).
    """

    def __init__(self, config: WsConfig) -> None:
        super().__init__(
            kind="ws",
            endpoint=parse_gateway_url(config.url),
            backoff=config.backoff,
            max_incoming=config.max_incoming,
            max_payload=config.max_payload,
            send_timeout_s=config.send_timeout_s,
        )
        self._config = config
        self._tls: ssl.SSLContext | None = None
        self._http: aiohttp.ClientSession | None = None
        self.unexpected_incoming = 0

    @property
    def config(self) -> WsConfig:
        """The configuration."""
        return self._config

    async def _prepare(self) -> None:
        cfg = self._config
        if self._endpoint.tls:
            self._tls = await asyncio.to_thread(
                client_tls_context,
                ca_file=cfg.ca_file,
                cert_file=cfg.client_cert,
                key_file=cfg.client_key,
            )
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout_s
            ),
        )

    async def _release(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def _connect_and_serve(self, connected: Callable[[_Ws], None]) -> None:
        cfg = self._config
        http = self._http
        if http is None:
            raise UplinkUnavailableError("uplink is closed")
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                ws = await http.ws_connect(
                    self._endpoint.url(),
                    headers=list(cfg.headers),
                    heartbeat=cfg.heartbeat_s,
                    ssl=self._tls if self._tls is not None else True,
                    max_msg_size=cfg.max_frame,
                    timeout=aiohttp.ClientWSTimeout(
                        ws_receive=None, ws_close=cfg.close_timeout_s
                    ),
                    compress=0,
                    decode_text=False,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if 400 <= exc.status < 500 and exc.status not in _RETRYABLE_4XX:
                raise UplinkConfigError(
                    f"gateway {self._label} refused the WebSocket handshake: "
                    f"HTTP {exc.status}"
                ) from exc
            raise UplinkUnavailableError(
                f"handshake failed: HTTP {exc.status}"
            ) from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError("no WebSocket handshake in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UplinkUnavailableError(str(exc) or exc.__class__.__name__) from exc
        try:
            connected(ws)
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    self._deliver(message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    raise UplinkUnavailableError(f"connection error: {ws.exception()}")
                else:
                    self.unexpected_incoming += 1
                    logger.debug("< dropped an unexpected %s frame", message.type.name)
        except (aiohttp.ClientError, OSError) as exc:
            raise UplinkUnavailableError(str(exc) or exc.__class__.__name__) from exc
        finally:
            # Bounded by ClientWSTimeout.ws_close; a broken link needs no goodbye.
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await ws.close()
        raise UplinkUnavailableError(
            f"gateway closed the connection (code {ws.close_code})"
        )

    async def _transmit(self, conn: _Ws, payloads: Sequence[tuple[str, bytes]]) -> None:
        try:
            for _channel, payload in payloads:
                await conn.send_bytes(payload)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UplinkUnavailableError(f"write failed: {exc}") from exc
