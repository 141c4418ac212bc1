"""The gateway process: keys, registry, store, ledger, core and transports.

:class:`CloudGateway` composes the parts under one TaskGroup and tears them
down in reverse order. ``glasses-relay cloud`` runs it with SIGTERM and SIGINT
handlers installed on the loop, so either signal ends it cleanly (exit 0)
within a few seconds; the counters are logged at INFO on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Final, Protocol, Self, runtime_checkable

from protocol.envelope import probe_hpke
from relay.errors import ConfigError
from relay.state import ensure_state_dir
from tools.cloud.assistant import Assistant, BuiltinAssistant
from tools.cloud.config import GatewayConfig
from tools.cloud.gateway import Gateway, GatewayStats
from tools.cloud.keys import KID, load_gateway_keys, write_public_record
from tools.cloud.ledger import Ledger
from tools.cloud.mqtt import MqttTransport
from tools.cloud.openai_backend import OpenAIAssistant
from tools.cloud.redis_store import RedisStore
from tools.cloud.registry import DeviceRegistry
from tools.cloud.store import (
    IdempotencyStore,
    SqliteStore,
    StoreLimits,
    StoreUnavailableError,
)
from tools.cloud.ws import WsTransport

__all__ = ["CloudGateway", "run_gateway"]

logger = logging.getLogger(__name__)

_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class _StopRequestedError(Exception):
    """Raised inside the TaskGroup to end it on request."""


async def _until(event: asyncio.Event) -> None:
    """Wait for ``event``, then raise :class:`_StopRequestedError`."""
    await event.wait()
    raise _StopRequestedError


@runtime_checkable
class _Closable(Protocol):
    """An assistant that holds connections until :meth:`aclose`."""

    async def aclose(self) -> None: ...


def _assistant(config: GatewayConfig) -> Assistant:
    """Build the configured assistant backend.

    Raises:
        ConfigError: the backend is unknown, or the openai API key is unset.
    """
    if config.assistant == "builtin":
        return BuiltinAssistant(config.latency)
    if config.assistant == "openai" and config.openai is not None:
        settings = config.openai
        key = settings.api_key()
        if key is None:
            raise ConfigError(
                f"--assistant openai needs the API key in ${settings.api_key_env}"
            )
        if settings.cleartext_remote:
            logger.warning(
                "openai assistant: %s is plain http to a remote host: the API key "
                "and the questions travel in cleartext; use https",
                settings.base_url,
            )
        return OpenAIAssistant(settings, key)
    raise ConfigError(f"assistant {config.assistant!r} is not available")


def _describe(config: GatewayConfig) -> str:
    """The assistant for the start-up line: its model or latency model."""
    if config.assistant == "openai" and config.openai is not None:
        return f"openai ({config.openai.describe()})"
    return f"{config.assistant} ({config.latency.describe()})"


def _store(config: GatewayConfig) -> SqliteStore | RedisStore:
    limits = StoreLimits(
        idempotency_ttl_s=config.idempotency_ttl_s,
        assembly_ttl_s=config.assembly_ttl_s,
        downlink_ttl_s=config.downlink_ttl_s,
        max_request_bytes=config.max_request_bytes,
    )
    if config.store.kind == "redis" and config.store.url is not None:
        return RedisStore(config.store.url, limits, timeout_s=config.connect_timeout_s)
    return SqliteStore(config.sqlite_path, limits)


class CloudGateway:
    """One gateway process's worth of parts (module docstring).

    Use :meth:`run` as a task; :meth:`wait_ready` returns once it listens and
    (with a broker) is subscribed; :meth:`stop` ends :meth:`run`.

    Args:
        config: The configuration.
    """

    def __init__(self, config: GatewayConfig) -> None:
        """Prepare; nothing touches the disk or the network before :meth:`run`."""
        self.config = config
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._gateway: Gateway | None = None
        self._ws: WsTransport | None = None
        self._mqtt: MqttTransport | None = None
        self.stats = GatewayStats()

    @property
    def gateway(self) -> Gateway:
        """The core (once :meth:`run` started it)."""
        if self._gateway is None:
            raise RuntimeError("gateway not started")
        return self._gateway

    @property
    def ws_port(self) -> int:
        """The WebSocket port (after :meth:`wait_ready`; 0 without WebSocket)."""
        return self._ws.port if self._ws is not None else 0

    def stop(self) -> None:
        """Ask :meth:`run` to end; safe to call from a signal handler."""
        self._stop.set()

    async def wait_ready(self) -> None:
        """Wait until listening and (with a broker) subscribed.

        Bound it with ``asyncio.timeout``: a broker that is down delays it.
        """
        await self._ready.wait()

    @contextlib.asynccontextmanager
    async def serving(self, *, ready_timeout_s: float = 30.0) -> AsyncIterator[Self]:
        """Run in a task for the ``async with`` block; ready on entry, stopped on exit.

        Raises:
            ConfigError: the gateway stopped at start (its own error is raised
                as it is), or was not ready within ``ready_timeout_s``.
        """
        task = asyncio.create_task(self.run(), name="gateway")
        ready = asyncio.ensure_future(self.wait_ready())
        await asyncio.wait(
            {ready, task}, timeout=ready_timeout_s, return_when="FIRST_COMPLETED"
        )
        ready.cancel()
        try:
            if task.done():
                task.result()  # the gateway could not start: say why
                raise ConfigError("the gateway stopped at start")
            if not ready.done() or ready.cancelled():
                raise ConfigError(
                    f"the gateway did not start within {ready_timeout_s:g} s"
                )
            yield self
        finally:
            self.stop()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await task

    async def run(self, *, handle_signals: bool = False) -> GatewayStats:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT if ``handle_signals``).

        Returns:
            The final counters.

        Raises:
            ConfigError: keys, records or the ledger cannot be set up, or the
                WebSocket address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in _SIGNALS:
                loop.add_signal_handler(signum, self.stop)
        try:
            return await self._run()
        finally:
            if handle_signals:
                for signum in _SIGNALS:
                    loop.remove_signal_handler(signum)

    async def _run(self) -> GatewayStats:
        config = self.config
        started = time.monotonic()
        if not await asyncio.to_thread(probe_hpke):
            raise ConfigError(
                "this cryptography build has no working HPKE; the gateway needs it"
            )
        await asyncio.to_thread(ensure_state_dir, config.state_dir)
        keys = await asyncio.to_thread(load_gateway_keys, config.gateway_dir)
        await asyncio.to_thread(write_public_record, config.gateway_dir, keys)
        directories, files = config.record_sources
        registry = DeviceRegistry(
            directories,
            files,
            prefix=config.prefix,
            min_rescan_s=config.registry_rescan_s,
        )
        await registry.scan()
        async with contextlib.AsyncExitStack() as stack:
            store = _store(config)
            stack.push_async_callback(store.aclose)
            try:
                await store.open()
            except StoreUnavailableError as exc:
                raise ConfigError(f"{exc}; choose another with --idempotency") from exc
            ledger = await self._open_ledger(stack)
            assistant = _assistant(config)
            if isinstance(assistant, _Closable):  # closed after the answers end
                stack.push_async_callback(assistant.aclose)
            gateway = Gateway(
                config,
                keys=keys,
                registry=registry,
                store=store,
                assistant=assistant,
                ledger=ledger,
            )
            self._gateway = gateway
            self.stats = gateway.stats
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(gateway.run(), name="gateway")
                    await self._start_transports(group, gateway, registry)
                    self._log_start(store, len(registry))
                    group.create_task(self._signal_ready(), name="gateway-ready")
                    await _until(self._stop)
            except* _StopRequestedError:
                pass
            except* ConfigError as failed:  # the WebSocket address cannot be bound
                raise failed.exceptions[0]  # noqa: B904 - it carries its own cause
        logger.info(
            "cloud gateway stopped after %.1f s: %s",
            time.monotonic() - started,
            gateway.stats.summary(),
        )
        return gateway.stats

    async def _open_ledger(self, stack: contextlib.AsyncExitStack) -> Ledger | None:
        if self.config.ledger is None:
            return None
        ledger = Ledger(self.config.ledger)
        try:
            await ledger.open()
        except OSError as exc:
            raise ConfigError(
                f"cannot open the ledger {self.config.ledger}: {exc.strerror}"
            ) from exc
        stack.push_async_callback(ledger.aclose)
        return ledger

    async def _start_transports(
        self, group: asyncio.TaskGroup, gateway: Gateway, registry: DeviceRegistry
    ) -> None:
        config = self.config
        if config.listen is not None:
            self._ws = WsTransport(config, gateway, registry)
            gateway.attach(self._ws)
            task = group.create_task(self._ws.run(), name="gateway-ws")
            started = asyncio.create_task(self._ws.wait_started())
            await asyncio.wait((task, started), return_when=asyncio.FIRST_COMPLETED)
            if not started.done():
                started.cancel()
                await asyncio.wait((started,))
                await task  # raises why it could not start
        if config.broker_url is not None:
            self._mqtt = MqttTransport(config, gateway)
            gateway.attach(self._mqtt)
            group.create_task(self._mqtt.run(), name="gateway-mqtt")

    async def _signal_ready(self) -> None:
        """Set the ready event once listening and, with a broker, subscribed."""
        if self._mqtt is not None:
            await self._mqtt.wait_connected()
        self._ready.set()

    def _log_start(self, store: IdempotencyStore, devices: int) -> None:
        config = self.config
        logger.info(
            "cloud gateway started: kid %d, %d device(s), store %s, assistant %s, "
            "mqtt %s, ws %s",
            KID,
            devices,
            store.description,
            _describe(config),
            self._mqtt.url if self._mqtt else "off",
            self._ws.url if self._ws else "off",
        )


async def run_gateway(config: GatewayConfig) -> int:
    """Run a gateway until SIGTERM or SIGINT; return the exit status (0).

    Raises:
        ConfigError: it cannot start (see :meth:`CloudGateway.run`).
    """
    await CloudGateway(config).run(handle_signals=True)
    return 0
