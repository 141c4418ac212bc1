"""The asyncio TCP proxy that carries a real connection through the emulated link.

``client -> NetemProxy (127.0.0.1) -> target``: each accepted connection gets a
connection to the target; bytes from the client go through the uplink
:class:`~tools.netem.shaper.Shaper`, bytes from the target through the downlink
one. Both directions share one :class:`~tools.netem.shaper.Radio` and one
bottleneck queue each (all connections share the link, FIFO).

- **Pacing**: one pump task per direction sleeps until the shaper's next event
  (a delivery opportunity of the trace or an arrival after the base delay),
  never at a mean rate, and writes the bytes that have arrived, in order.
- **Backpressure**: a connection is read only while its direction's queue has
  room, and at most that much; the proxy never drops stream bytes (``drops``
  stays 0). Memory is bounded by the queue limit, one read of
  ``read_size`` per connection and the bytes in flight.
- **Close**: an end of stream travels behind the connection's bytes and is
  forwarded as a half-close (``write_eof``); the connection closes when both
  directions have ended. A reset or read error aborts both sides at once.
- **Trace clock**: trace time runs with the event loop's clock from
  ``start_offset_s``; :meth:`NetemProxy.skip` moves it forward across idle gaps
  (time compression by skipping idle time only, never by scaling).

The base RTT is drawn once per proxy (``mm-delay`` semantics: a fixed delay per
run, so order is kept) and split evenly between the directions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import math
import random
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from relay.errors import ConfigError
from tools.netem.errors import LinkBusyError
from tools.netem.models import DEFAULT_IDLE_S, Distribution
from tools.netem.shaper import (
    DEFAULT_QUEUE_LIMIT_BYTES,
    Direction,
    Radio,
    RadioCounters,
    Shaper,
    ShaperCounters,
)
from tools.netem.trace import Trace

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_READ_SIZE",
    "NetemConfig",
    "NetemProxy",
    "NetemStats",
]

logger = logging.getLogger(__name__)

DEFAULT_READ_SIZE: Final = 16 * 1024
"""Most bytes read from one socket at a time (never more than the queue's room)."""

DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
"""Time allowed to connect to the target; the client is closed if it runs out."""

DEFAULT_CLOSE_TIMEOUT_S: Final = 5.0
"""Time allowed for a socket to close cleanly before it is dropped."""


@dataclass(frozen=True, slots=True)
class NetemConfig:
    """Knobs of the emulated link; the traces are passed separately.

    Attributes:
        queue_limit_bytes: bottleneck queue limit per direction.
        rtt: base round trip, drawn once and split evenly; None for no delay.
        wakeup: RRC wake-up delay after ``idle_s`` idle; None for no radio model.
        idle_s: idle time before the radio sleeps.
        idle_at_start: the radio is asleep at the start (the first bytes pay).
        seed: seeds the RTT and wake-up draws.
        start_offset_s: trace time when the proxy starts (offset into the traces).
        read_size: most bytes read from a socket at once.
        connect_timeout_s: see :data:`DEFAULT_CONNECT_TIMEOUT_S`.
        close_timeout_s: see :data:`DEFAULT_CLOSE_TIMEOUT_S`.
    """

    queue_limit_bytes: int = DEFAULT_QUEUE_LIMIT_BYTES
    rtt: Distribution | None = None
    wakeup: Distribution | None = None
    idle_s: float = DEFAULT_IDLE_S
    idle_at_start: bool = False
    seed: int = 0
    start_offset_s: float = 0.0
    read_size: int = DEFAULT_READ_SIZE
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            ConfigError: a limit or time out of range.
        """
        if self.queue_limit_bytes <= 0 or self.read_size <= 0:
            raise ConfigError("queue_limit_bytes and read_size must be > 0")
        if not (self.idle_s >= 0 and self.start_offset_s >= 0):
            raise ConfigError("idle_s and start_offset_s must be >= 0")
        if not (self.connect_timeout_s > 0 and self.close_timeout_s > 0):
            raise ConfigError("timeouts must be > 0")


@dataclass(frozen=True, slots=True)
class NetemStats:
    """A snapshot of the proxy.

    Attributes:
        trace_time_s: the trace clock.
        skipped_s: trace time skipped so far.
        rtt_s: the base round trip drawn at construction.
        connections_open: connections being proxied.
        connections_total: connections accepted so far.
        bytes_discarded: delivered bytes whose connection had already closed.
        radio: wake-up counters.
        uplink: client-to-server counters (``bytes_delivered`` = bytes written).
        downlink: server-to-client counters.
    """

    trace_time_s: float
    skipped_s: float
    rtt_s: float
    connections_open: int
    connections_total: int
    bytes_discarded: int
    radio: RadioCounters
    uplink: ShaperCounters
    downlink: ShaperCounters


class _Conn:
    """One proxied connection: where each direction's bytes go."""

    __slots__ = ("cid", "closed", "delivered", "done", "eof", "writers")

    def __init__(
        self, cid: int, client: asyncio.StreamWriter, server: asyncio.StreamWriter
    ) -> None:
        self.cid = cid
        self.writers = {Direction.UPLINK: server, Direction.DOWNLINK: client}
        self.delivered = dict.fromkeys(Direction, 0)
        self.eof: set[Direction] = set()
        self.closed = False
        self.done = asyncio.Event()


class _Lane:
    """One direction: its shaper and the bytes it holds, in offer order.

    ``fifo`` holds ``(connection, bytes)`` pieces, each offered to the shaper
    whole, and ``(connection, None)`` end-of-stream markers; ``pos`` is how much
    of the head piece was written.
    """

    __slots__ = ("direction", "discarded", "fifo", "pos", "shaper", "space", "wake")

    def __init__(self, direction: Direction, shaper: Shaper) -> None:
        self.direction = direction
        self.shaper = shaper
        self.fifo: collections.deque[tuple[_Conn, memoryview | None]] = (
            collections.deque()
        )
        self.pos = 0
        self.discarded = 0
        self.wake = asyncio.Event()  # the pump: something changed
        self.space = asyncio.Event()  # the readers: the queue has room


def _check_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != 4 or not address.is_loopback:
        raise ConfigError(f"the proxy listens on 127.0.0.1 only, not {host!r}")


class NetemProxy:
    """A TCP proxy on 127.0.0.1 that shapes both directions with traces.

    Use as ``async with NetemProxy(...) as proxy:``; it listens from entry to
    exit (:attr:`port` is the bound port, useful with port 0). Reusable
    neither concurrently nor after exit.

    Example::

        async with NetemProxy("127.0.0.1", 0, "127.0.0.1", 1883,
                              load_trace(up), load_trace(down)) as proxy:
            ... connect the daemon to 127.0.0.1:proxy.port ...
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        uplink_trace: Trace,
        downlink_trace: Trace,
        *,
        config: NetemConfig | None = None,
    ) -> None:
        """Set up the link model; nothing listens before ``async with``.

        Raises:
            ConfigError: ``listen_host`` is not an IPv4 loopback address.
        """
        _check_loopback(listen_host)
        self._config = config = config if config is not None else NetemConfig()
        self._listen = (listen_host, listen_port)
        self._target = (target_host, target_port)
        rng = random.Random(config.seed)
        self._rtt_s = config.rtt.sample(rng) if config.rtt is not None else 0.0
        start = config.start_offset_s
        self._radio = Radio(
            config.wakeup,
            idle_s=config.idle_s,
            rng=rng,
            now=start,
            idle_at_start=config.idle_at_start,
        )
        self._lanes = {
            direction: _Lane(
                direction,
                Shaper(
                    trace,
                    queue_limit_bytes=config.queue_limit_bytes,
                    delay_s=self._rtt_s / 2,
                    radio=self._radio,
                    now=start,
                ),
            )
            for direction, trace in (
                (Direction.UPLINK, uplink_trace),
                (Direction.DOWNLINK, downlink_trace),
            )
        }
        self._offset = start
        self._skipped = 0.0
        self._t0: float | None = None
        self._server: asyncio.Server | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._accepted = 0
        self._entered = False
        self._closing = False

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start listening and pacing.

        Raises:
            RuntimeError: entered twice.
            OSError: the listening address cannot be bound.
        """
        if self._entered:
            raise RuntimeError("a NetemProxy is not reusable")
        self._entered = True
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self._group = group
        try:
            self._server = await asyncio.start_server(self._on_client, *self._listen)
        except BaseException:
            await group.__aexit__(*sys.exc_info())
            raise
        self._t0 = asyncio.get_running_loop().time()
        for lane in self._lanes.values():
            self._spawn(self._pump(lane), f"netem-{lane.direction}")
        logger.info(
            "listening on %s:%d -> %s:%d (uplink %s, downlink %s, base RTT %.0f ms)",
            self._listen[0],
            self.port,
            *self._target,
            self._lanes[Direction.UPLINK].shaper.trace.name,
            self._lanes[Direction.DOWNLINK].shaper.trace.name,
            self._rtt_s * 1000,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, abort open connections, end the tasks."""
        self._closing = True
        server, group = self._server, self._group
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            if group is not None:
                await group.__aexit__(exc_type, exc, tb)
        finally:
            if server is not None:
                await server.wait_closed()
            logger.info("stopped after %d connections", self._accepted)

    @property
    def port(self) -> int:
        """The bound port (after entry)."""
        if self._server is None:
            raise RuntimeError("the proxy is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def config(self) -> NetemConfig:
        """The link configuration."""
        return self._config

    @property
    def rtt_s(self) -> float:
        """The base round trip drawn at construction (half in each direction)."""
        return self._rtt_s

    @property
    def radio(self) -> Radio:
        """The shared radio model."""
        return self._radio

    # -- control --------------------------------------------------------------

    def trace_time(self) -> float:
        """The trace clock: seconds into the (looped) traces."""
        if self._t0 is None:
            return self._offset
        return asyncio.get_running_loop().time() - self._t0 + self._offset

    def skip(self, seconds: float) -> None:
        """Advance the trace clock by ``seconds`` of idle time.

        For time-compressed benchmarks: call it between requests instead of
        waiting. The radio sees the skipped time as idle (a skip of ``idle_s`` or
        more makes the next bytes pay a wake-up); the traces continue at the new
        time. Bytes still in the client's or server's own socket buffers are
        not visible here: skip only when the application is idle.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
            LinkBusyError: bytes are queued or in flight in either direction.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError("seconds must be finite and >= 0")
        now = self.trace_time()
        pending = sum(
            lane.shaper.queue_bytes(now) + lane.shaper.in_flight_bytes(now)
            for lane in self._lanes.values()
        )
        if pending:
            raise LinkBusyError(pending)
        self._offset += seconds
        self._skipped += seconds
        for lane in self._lanes.values():
            lane.wake.set()

    def switch_trace(
        self, direction: Direction | str, trace: Trace, *, restart: bool = False
    ) -> None:
        """Shape ``direction`` with ``trace`` from now on (queued bytes included).

        Args:
            direction: ``"uplink"`` (client to server) or ``"downlink"``.
            trace: the new trace.
            restart: start it at its offset 0 now; by default it continues at the
                current trace time.

        Raises:
            ValueError: an unknown direction.
        """
        lane = self._lanes[Direction(direction)]
        lane.shaper.switch_trace(trace, self.trace_time(), restart=restart)
        lane.wake.set()
        logger.info("%s trace switched to %s", lane.direction, trace.name)

    def stats(self) -> NetemStats:
        """A snapshot of the counters."""
        now = self.trace_time()
        up = self._lanes[Direction.UPLINK]
        down = self._lanes[Direction.DOWNLINK]
        return NetemStats(
            trace_time_s=now,
            skipped_s=self._skipped,
            rtt_s=self._rtt_s,
            connections_open=len(self._conns),
            connections_total=self._accepted,
            bytes_discarded=up.discarded + down.discarded,
            radio=self._radio.counters(),
            uplink=up.shaper.counters(now),
            downlink=down.shaper.counters(now),
        )

    # -- connections ----------------------------------------------------------

    def _spawn(self, coro: Coroutine[None, None, None], name: str) -> None:
        if self._group is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        task = self._group.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:
            writer.transport.abort()
            return
        self._accepted += 1
        self._spawn(
            self._serve(self._accepted, reader, writer), f"netem-conn-{self._accepted}"
        )

    async def _serve(
        self,
        cid: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        config = self._config
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                server_reader, server_writer = await asyncio.open_connection(
                    *self._target
                )
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "connection %d: cannot reach %s:%d: %s", cid, *self._target, exc
            )
            client_writer.transport.abort()
            return
        conn = _Conn(cid, client_writer, server_writer)
        self._conns.add(conn)
        logger.info("connection %d: open -> %s:%d", cid, *self._target)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    self._read_loop(conn, self._lanes[Direction.UPLINK], client_reader)
                )
                group.create_task(
                    self._read_loop(
                        conn, self._lanes[Direction.DOWNLINK], server_reader
                    )
                )
            await conn.done.wait()
        finally:
            clean = conn.done.is_set() and not conn.closed
            conn.closed = True
            self._conns.discard(conn)
            for writer in conn.writers.values():
                if clean:
                    writer.close()
                else:
                    writer.transport.abort()
            for writer in conn.writers.values():
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(config.close_timeout_s):
                        await writer.wait_closed()
            logger.info(
                "connection %d: %s, %d bytes up, %d down",
                cid,
                "closed" if clean else "aborted",
                conn.delivered[Direction.UPLINK],
                conn.delivered[Direction.DOWNLINK],
            )

    def _abort(self, conn: _Conn) -> None:
        """Drop both sides of ``conn`` at once (reset, read or write error)."""
        if conn.closed:
            return
        conn.closed = True
        for writer in conn.writers.values():
            writer.transport.abort()
        conn.done.set()
        for lane in self._lanes.values():
            lane.space.set()  # its readers may be waiting for room

    async def _wait_space(self, lane: _Lane) -> None:
        lane.space.clear()
        await lane.space.wait()

    async def _read_loop(
        self, conn: _Conn, lane: _Lane, reader: asyncio.StreamReader
    ) -> None:
        """Read while the queue has room; offer the bytes; mark the end."""
        shaper = lane.shaper
        read_size = self._config.read_size
        try:
            while not conn.closed:
                free = shaper.free_bytes(self.trace_time())
                if not free:
                    await self._wait_space(lane)
                    continue
                data = await reader.read(min(free, read_size))
                if not data:
                    break
                view = memoryview(data)
                while view and not conn.closed:
                    now = self.trace_time()
                    free = shaper.free_bytes(now)
                    if not free:
                        await self._wait_space(lane)
                        continue
                    piece = view[:free]
                    view = view[len(piece) :]
                    if not shaper.offer(len(piece), now):
                        raise RuntimeError("bug: the shaper dropped bytes that fit")
                    lane.fifo.append((conn, piece))
                    lane.wake.set()
        except OSError as exc:
            logger.info(
                "connection %d: %s read failed: %s", conn.cid, lane.direction, exc
            )
            self._abort(conn)
            return
        if not conn.closed:
            lane.fifo.append((conn, None))
            lane.wake.set()

    # -- pacing ---------------------------------------------------------------

    def _loop_time(self, trace_time: float, t0: float) -> float:
        return trace_time - self._offset + t0

    async def _pump(self, lane: _Lane) -> None:
        """Write each direction's arrived bytes at the shaper's event times."""
        loop = asyncio.get_running_loop()
        t0 = self._t0 if self._t0 is not None else loop.time()
        shaper = lane.shaper
        debug = logger.isEnabledFor(logging.DEBUG)
        while True:
            now = self.trace_time()
            count = shaper.pop_delivered(now)
            written = self._deliver(lane, count)
            if debug and count:
                logger.debug("%s > %d bytes at %.3f s", lane.direction, count, now)
            if shaper.free_bytes(now):
                lane.space.set()
            for conn in written:
                if not conn.closed:
                    try:
                        await conn.writers[lane.direction].drain()
                    except OSError as exc:
                        logger.info("connection %d: write failed: %s", conn.cid, exc)
                        self._abort(conn)
            lane.wake.clear()
            if lane.fifo and lane.fifo[0][1] is None:
                continue  # an end of stream was queued while draining
            when = shaper.next_event_time()
            if when is None:
                await lane.wake.wait()
                continue
            deadline = self._loop_time(when, t0)
            if deadline <= loop.time():
                await asyncio.sleep(0)
                continue
            handle = loop.call_at(deadline, lane.wake.set)
            try:
                await lane.wake.wait()
            finally:
                handle.cancel()

    def _deliver(self, lane: _Lane, count: int) -> list[_Conn]:
        """Write the next ``count`` bytes of the lane; forward due ends of stream."""
        direction = lane.direction
        fifo = lane.fifo
        written: list[_Conn] = []
        while fifo:
            conn, piece = fifo[0]
            if piece is None:
                fifo.popleft()
                self._end_of_stream(conn, direction)
                continue
            if not count:
                break
            pos = lane.pos
            take = min(count, len(piece) - pos)
            if conn.closed:
                lane.discarded += take
            else:
                conn.writers[direction].write(piece[pos : pos + take])
                conn.delivered[direction] += take
                if conn not in written:
                    written.append(conn)
            count -= take
            pos += take
            if pos == len(piece):
                fifo.popleft()
                pos = 0
            lane.pos = pos
        if count:
            raise RuntimeError("bug: the shaper delivered bytes the lane does not hold")
        return written

    def _end_of_stream(self, conn: _Conn, direction: Direction) -> None:
        conn.eof.add(direction)
        if not conn.closed:
            writer = conn.writers[direction]
            try:
                if writer.can_write_eof():
                    writer.write_eof()
            except OSError as exc:
                logger.info("connection %d: half-close failed: %s", conn.cid, exc)
                self._abort(conn)
                return
        if len(conn.eof) == len(Direction):
            conn.done.set()
