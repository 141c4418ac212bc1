"""The gateway's WebSocket transport (aiohttp server).

``ws://HOST:PORT/v1/{pseudonym}``: one connection per device at a time (a
new one replaces the old, which is closed with code 4000); binary frames from
the phone are ``up`` payloads, binary frames to it are ``down`` payloads. An
open socket is the device online, a closed one offline. aiohttp's heartbeat
pings every ``ws_heartbeat_s`` and drops a peer whose pong is late.

An unknown pseudonym (after a re-scan of the device records) is refused with
503 and ``Retry-After``, which a phone retries: it may register a moment
later. A malformed one gets 404.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Final

import aiohttp
from aiohttp import web

from protocol.cloud import MAX_BATCH_BYTES
from relay.errors import ConfigError
from tools.cloud.config import GatewayConfig
from tools.cloud.gateway import Gateway
from tools.cloud.registry import DeviceRegistry

__all__ = ["CLOSE_REPLACED", "WsTransport"]

logger = logging.getLogger(__name__)

CLOSE_REPLACED: Final = 4000
"""Close code for a connection replaced by a newer one of the same device."""
SHUTDOWN_TIMEOUT_S: Final = 1.0
_PSEUDONYM: Final = re.compile(r"[0-9a-f]{24}")
_RETRY_AFTER_S: Final = "2"


class WsTransport:
    """The WebSocket side of the gateway (module docstring).

    Args:
        config: The gateway configuration (``listen`` must be set).
        gateway: Where received payloads go.
        registry: Known devices, to refuse strangers.
    """

    def __init__(
        self, config: GatewayConfig, gateway: Gateway, registry: DeviceRegistry
    ) -> None:
        """Prepare; :meth:`run` listens."""
        if config.listen is None:
            raise ValueError("WsTransport needs config.listen")
        self._config = config
        self._gateway = gateway
        self._registry = registry
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._started = asyncio.Event()
        self._port = 0
        self.connections = 0

    @property
    def name(self) -> str:
        """``ws``."""
        return "ws"

    @property
    def port(self) -> int:
        """The bound port (after :meth:`wait_started`)."""
        return self._port

    @property
    def url(self) -> str:
        """The URL template phones connect to."""
        host = self._config.listen[0] if self._config.listen else ""
        shown = f"[{host}]" if ":" in host else host
        return f"ws://{shown}:{self._port}/v1/{{pseudonym}}"

    async def wait_started(self) -> None:
        """Wait until listening; bound it with ``asyncio.timeout``."""
        await self._started.wait()

    def reachable(self, pseudonym: str) -> bool:
        """Whether the device has an open WebSocket."""
        ws = self._sockets.get(pseudonym)
        return ws is not None and not ws.closed

    async def send(
        self, pseudonym: str, payload: bytes, *, reliable: bool = True
    ) -> bool:
        """Send ``payload`` as one binary frame on the device's socket.

        ``reliable`` changes nothing here: the socket delivers in order or closes.
        """
        del reliable
        ws = self._sockets.get(pseudonym)
        if ws is None or ws.closed:
            return False
        try:
            async with asyncio.timeout(self._config.send_timeout_s):
                await ws.send_bytes(payload)
        except (
            ConnectionError,
            aiohttp.ClientError,
            RuntimeError,
            TimeoutError,
        ) as exc:
            logger.debug("> frame to %s failed: %s", pseudonym, exc)
            return False
        return True

    async def run(self) -> None:
        """Listen until cancelled, then close every socket."""
        listen = self._config.listen
        if listen is None:
            raise ValueError("WsTransport needs config.listen")
        app = web.Application()
        app.router.add_get("/v1/{pseudonym}", self._handle)
        app.on_shutdown.append(self._close_all)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, listen[0], listen[1])
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}; "
                    "choose another address with --listen"
                ) from exc
            addresses = runner.addresses
            self._port = int(addresses[0][1]) if addresses else listen[1]
            self._started.set()
            logger.info("ws: listening on %s", self.url)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def _close_all(self, app: web.Application) -> None:
        for ws in list(self._sockets.values()):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutdown")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        pseudonym = request.match_info["pseudonym"]
        if not _PSEUDONYM.fullmatch(pseudonym):
            raise web.HTTPNotFound
        if len(self._sockets) >= self._config.ws_max_connections or (
            await self._registry.lookup(pseudonym) is None
        ):
            raise web.HTTPServiceUnavailable(headers={"Retry-After": _RETRY_AFTER_S})
        ws = web.WebSocketResponse(
            heartbeat=self._config.ws_heartbeat_s,
            max_msg_size=MAX_BATCH_BYTES,
            compress=False,
        )
        await ws.prepare(request)
        old = self._sockets.get(pseudonym)
        self._sockets[pseudonym] = ws
        self.connections += 1
        if old is not None:
            await old.close(code=CLOSE_REPLACED, message=b"replaced")
        logger.info("ws: device %s connected", pseudonym)
        self._gateway.connection_changed(pseudonym, online=True, via=self.name)
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    await self._gateway.submit(pseudonym, "up", message.data, self.name)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    break
        finally:
            if self._sockets.get(pseudonym) is ws:
                del self._sockets[pseudonym]
                self._gateway.connection_changed(pseudonym, online=False, via=self.name)
                logger.info("ws: device %s disconnected", pseudonym)
        return ws
