"""The reconnect-forever core shared by the MQTT and WebSocket uplinks.

:class:`ReconnectingUplink` owns one supervisor task (created in ``start``, kept by
a strong reference, cancelled and awaited in ``aclose``), the connection state, the
counters and the bounded incoming queue. A transport subclass supplies three hooks:
``_connect_and_serve`` (connect, report the usable connection, pump incoming
payloads until the connection ends), ``_transmit`` (hand payloads to the current
connection and wait until it accepted them) and, optionally, ``_prepare`` /
``_release`` for resources such as a TLS context or an HTTP session. Hooks translate
their library's exceptions once, into :class:`UplinkUnavailableError` (transient,
reconnect) or :class:`relay.errors.UplinkConfigError` (permanent, stop).

Limits:
    ``max_incoming`` payloads wait in the incoming queue; when it is full newer
    payloads are dropped and counted (``dropped_incoming``, one WARNING per 100):
    they are acknowledgements and answers that the gateway resends until the relay
    acknowledges them end to end. ``max_payload`` bounds each outgoing payload.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Final, Generic, Self, TypeVar

from relay.errors import UplinkConfigError, UplinkError
from relay.uplink.base import (
    STABLE_AFTER_S,
    Backoff,
    PayloadTooLargeError,
    UplinkState,
    UplinkStats,
    UplinkUnavailableError,
)
from relay.uplink.url import Endpoint

__all__ = ["ReconnectingUplink"]

logger = logging.getLogger(__name__)

ConnT = TypeVar("ConnT")

_DROP_LOG_EVERY: Final = 100


class _Inbox:
    """Bounded FIFO of incoming payloads for one consumer; drop-newest when full."""

    __slots__ = ("_items", "_limit", "_ready", "_terminal", "dropped")

    def __init__(
        self, limit: int, terminal: Callable[[], BaseException | None]
    ) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._terminal = terminal
        self.dropped = 0

    def put(self, item: bytes) -> bool:
        """Queue ``item``; return False (and count it) if the queue is full."""
        if len(self._items) >= self._limit:
            self.dropped += 1
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def wake(self) -> None:
        """Wake the consumer so it sees the uplink closed or failed."""
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        while not self._items:
            end = self._terminal()
            if end is not None:
                raise end
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class ReconnectingUplink(abc.ABC, Generic[ConnT]):
    """Base of the uplinks: state, counters, backoff loop and incoming queue.

    Args:
        kind: Transport name for logs and messages ("mqtt", "ws").
        endpoint: Where to connect (for logs; the subclass connects).
        backoff: Reconnect delays.
        max_incoming: Incoming queue limit (payloads).
        max_payload: Largest outgoing payload, bytes.
        send_timeout_s: Bound on one :meth:`send`, seconds.
    """

    def __init__(
        self,
        *,
        kind: str,
        endpoint: Endpoint,
        backoff: Backoff,
        max_incoming: int,
        max_payload: int,
        send_timeout_s: float,
    ) -> None:
        self._kind = kind
        self._endpoint = endpoint
        self._label = endpoint.url()
        self._backoff = backoff
        self._max_payload = max_payload
        self._send_timeout_s = send_timeout_s
        self._rng = random.Random()  # jitter only; not security-relevant
        self._state = UplinkState.DOWN
        self._conn: ConnT | None = None
        self._sends: set[asyncio.Timeout] | None = None
        """Timeouts of the sends on the current connection (None: not connected)."""
        self._settled = asyncio.Event()  # set while connected, closed or failed
        self._inbox = _Inbox(max_incoming, self._terminal_error)
        self._runner: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._failure: UplinkConfigError | None = None
        self._crash: BaseException | None = None
        self._connects = 0
        self._publishes = 0
        self._bytes_sent = 0
        self._in_flight = 0
        self._received = 0
        self._bytes_received = 0

    # ----------------------------------------------------------------- hooks

    async def _prepare(self) -> None:
        """Check configuration and build resources; raise UplinkConfigError."""

    async def _release(self) -> None:
        """Free what :meth:`_prepare` built."""

    @abc.abstractmethod
    async def _connect_and_serve(self, connected: Callable[[ConnT], None]) -> None:
        """Connect, call ``connected(conn)``, then :meth:`_deliver` until it ends.

        Raises:
            UplinkUnavailableError: could not connect, or the connection ended.
            UplinkConfigError: a permanent refusal (credentials, authorisation).
        """

    @abc.abstractmethod
    async def _transmit(
        self, conn: ConnT, payloads: Sequence[tuple[str, bytes]]
    ) -> None:
        """Hand ``payloads`` to ``conn``; return once the transport accepted all.

        Raises:
            UplinkUnavailableError: the transport refused or failed.
        """

    def _check_channel(self, channel: str) -> None:
        """Raise ValueError if ``channel`` is not a valid key for this uplink."""
        if not channel:
            raise ValueError("empty channel key")

    # ---------------------------------------------------------- public API

    @property
    def state(self) -> UplinkState:
        """The connection's current state."""
        return self._state

    @property
    def endpoint(self) -> Endpoint:
        """Where this uplink connects."""
        return self._endpoint

    @property
    def reconnects(self) -> int:
        """Connections after the first (``stats().reconnects``, no snapshot)."""
        return max(0, self._connects - 1)

    def stats(self) -> UplinkStats:
        """Return a snapshot of the counters."""
        return UplinkStats(
            state=self._state,
            connects=self._connects,
            reconnects=self.reconnects,
            publishes=self._publishes,
            bytes_sent=self._bytes_sent,
            in_flight=self._in_flight,
            received=self._received,
            bytes_received=self._bytes_received,
            dropped_incoming=self._inbox.dropped,
        )

    async def start(self) -> None:
        """Check the configuration offline and start connecting in the background.

        Returns at once; use :meth:`wait_connected` to wait for the connection.

        Raises:
            UplinkConfigError: a permanent problem, such as an unreadable CA file.
            RuntimeError: already started.
        """
        if self._started or self._closed:
            raise RuntimeError(f"{self._kind} uplink already started; create a new one")
        self._started = True
        try:
            await self._prepare()
        except UplinkConfigError as exc:
            self._fail(exc)
            raise
        self._set_state(UplinkState.CONNECTING)
        self._runner = asyncio.create_task(
            self._supervise(), name=f"uplink-{self._kind}-{self._label}"
        )

    async def aclose(self) -> None:
        """Disconnect cleanly and stop reconnecting; idempotent.

        Raises:
            Exception: whatever bug stopped the supervisor task, if one did.
        """
        self._closed = True
        self._settled.set()
        self._inbox.wake()
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                runner.cancel()
                try:
                    await runner
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
        finally:
            if self._started:
                self._started = False
                await self._release()

    async def __aenter__(self) -> Self:
        """Call :meth:`start`."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Call :meth:`aclose`."""
        await self.aclose()

    async def wait_connected(self) -> None:
        """Wait until connected; wrap in ``asyncio.timeout()`` to bound the wait.

        Raises:
            UplinkConfigError: the uplink failed permanently.
            UplinkUnavailableError: the uplink was closed.
        """
        while True:
            self._raise_if_terminal()
            if self._state is UplinkState.CONNECTED:
                return
            await self._settled.wait()

    async def send(self, payloads: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(channel, payload)`` pairs; return when the transport accepted all.

        Raises:
            UplinkUnavailableError: not connected, or the connection was lost or
                too slow before every payload was accepted. Some may have been
                delivered: resend all of them later (receivers drop duplicates).
            UplinkConfigError: the uplink failed permanently.
            PayloadTooLargeError: a payload exceeds ``max_payload``; nothing sent.
            ValueError: a channel key is not valid for this uplink.
            RuntimeError: :meth:`start` was never called.
        """
        if not payloads:
            return
        size = 0
        for channel, payload in payloads:
            self._check_channel(channel)
            if len(payload) > self._max_payload:
                raise PayloadTooLargeError(len(payload), self._max_payload)
            size += len(payload)
        self._raise_if_terminal()
        if not self._started:
            raise RuntimeError(f"{self._kind} uplink not started; call start() first")
        conn, sends = self._conn, self._sends
        if conn is None or sends is None:
            raise UplinkUnavailableError(
                f"{self._kind} uplink to {self._label} is {self._state}"
            )
        count = len(payloads)
        self._in_flight += count
        try:
            # The send runs in the caller's task; losing the connection expires
            # its timeout at once (see _disconnected), which cancels it.
            async with asyncio.timeout(self._send_timeout_s) as timeout:
                sends.add(timeout)
                try:
                    await self._transmit(conn, payloads)
                finally:
                    sends.discard(timeout)
        except TimeoutError as exc:
            if self._sends is not sends:
                raise UplinkUnavailableError(
                    f"{self._kind} uplink to {self._label}: connection lost before "
                    "the transport accepted"
                ) from exc
            raise UplinkUnavailableError(
                f"{self._kind} uplink to {self._label}: {count} payload(s) not "
                f"accepted within {self._send_timeout_s} s"
            ) from exc
        finally:
            self._in_flight -= count
        self._publishes += count
        self._bytes_sent += size

    def incoming(self) -> AsyncIterator[bytes]:
        """Payloads from the gateway, in arrival order, across reconnects.

        One consumer at a time. Iteration ends after :meth:`aclose` (once the queue
        is drained) and raises :class:`relay.errors.UplinkConfigError` after a
        permanent failure.
        """
        return self._inbox

    # ------------------------------------------------------------ internals

    def _deliver(self, payload: bytes) -> None:
        """Queue one payload from the gateway (called by the transport hook)."""
        if self._inbox.put(payload):
            self._received += 1
            self._bytes_received += len(payload)
        elif self._inbox.dropped % _DROP_LOG_EVERY == 1:
            logger.warning(
                "%s uplink: incoming queue full; %d payload(s) dropped so far",
                self._kind,
                self._inbox.dropped,
            )

    def _set_state(self, state: UplinkState) -> None:
        self._state = state
        if state is UplinkState.CONNECTED or self._closed or self._failure is not None:
            self._settled.set()
        else:
            self._settled.clear()

    def _connected(self, conn: ConnT) -> None:
        self._conn = conn
        self._sends = set()
        self._connects += 1
        self._set_state(UplinkState.CONNECTED)
        logger.info("%s uplink connected to %s", self._kind, self._label)

    def _disconnected(self) -> None:
        sends = self._sends
        self._conn = None
        self._sends = None
        if sends:
            now = asyncio.get_running_loop().time()
            for timeout in sends:
                timeout.reschedule(now)  # the send ends with UplinkUnavailableError
        self._set_state(UplinkState.DOWN)

    def _fail(self, exc: UplinkConfigError) -> None:
        self._failure = exc
        self._set_state(UplinkState.DOWN)
        self._inbox.wake()

    def _terminal_error(self) -> BaseException | None:
        """The error that ends waiting, or StopAsyncIteration once closed."""
        if self._crash is not None:
            error: BaseException = UplinkError(f"{self._kind} uplink stopped by a bug")
            error.__cause__ = self._crash
            return error
        if self._failure is not None:
            error = UplinkConfigError(str(self._failure))
            error.__cause__ = self._failure
            return error
        if self._closed:
            return StopAsyncIteration()
        return None

    def _raise_if_terminal(self) -> None:
        error = self._terminal_error()
        if isinstance(error, StopAsyncIteration):
            raise UplinkUnavailableError(
                f"{self._kind} uplink to {self._label} is closed"
            )
        if error is not None:
            raise error

    async def _supervise(self) -> None:
        """Connect, serve, and reconnect with backoff until cancelled or failed."""
        loop = asyncio.get_running_loop()
        attempt = 0
        since: list[float] = []

        def connected(conn: ConnT) -> None:
            since.append(loop.time())
            self._connected(conn)

        try:
            while True:
                self._set_state(UplinkState.CONNECTING)
                since.clear()
                try:
                    await self._connect_and_serve(connected)
                    reason = "connection ended"
                except UplinkConfigError as exc:
                    logger.error("%s uplink stopped: %s", self._kind, exc)  # noqa: TRY400 - a one-line message, no traceback
                    self._fail(exc)
                    return
                except UplinkUnavailableError as exc:
                    reason = str(exc)
                finally:
                    self._disconnected()
                if since and loop.time() - since[0] >= STABLE_AFTER_S:
                    attempt = 0
                delay = self._backoff.delay(attempt, self._rng.random())
                attempt += 1
                logger.info(
                    "%s uplink to %s unavailable (%s); reconnecting in %.2f s",
                    self._kind,
                    self._label,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
        except Exception as exc:
            self._crash = exc
            self._set_state(UplinkState.DOWN)
            self._settled.set()
            self._inbox.wake()
            raise
