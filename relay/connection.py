"""Drives a :class:`protocol.session.Session` over a fragment link.

Glue only, as websockets' connection drives its protocol: every fragment the
link delivers goes to ``session.receive_fragment(data, now)``; whatever the
session has to send is pulled and written as the link takes it; the session's
timer is re-armed from ``get_timer()``; events go to a synchronous callback
(which must only enqueue). The same driver runs the phone's side over a
:class:`relay.ble.link.BleLink` and the emulated glasses' side over their
peripheral.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Protocol

from protocol.errors import RemoteProtocolError
from protocol.message import Message
from protocol.session import Session, SessionEvent
from relay.errors import LinkError

__all__ = ["FragmentLink", "SessionDriver"]

_LOGGER: Final = logging.getLogger(__name__)

DROP_LOG_INTERVAL: Final = 10.0
"""Seconds between log lines about dropped records (rate limit)."""


class FragmentLink(Protocol):
    """What the driver needs from a link: whole GATT values in and out."""

    @property
    def max_fragment_size(self) -> int:
        """Largest GATT value the link takes now."""

    async def recv(self) -> bytes:
        """Next GATT value from the peer; raises LinkError when lost."""

    def recv_nowait(self) -> bytes | None:
        """A GATT value already buffered, or None (never waits)."""

    async def write(self, fragment: bytes) -> None:
        """Send one GATT value (paced: may wait); raises LinkError when lost."""


class SessionDriver:
    """Runs one session over one link until either fails.

    Call :meth:`run` in a task; it returns when the link is lost (raising
    :class:`~relay.errors.LinkError`) or the session fails (raising the
    session's :class:`~protocol.errors.RemoteProtocolError`). Use
    :meth:`send` from anywhere on the loop.
    """

    def __init__(
        self,
        session: Session,
        link: FragmentLink,
        on_event: Callable[[SessionEvent], None],
        *,
        name: str = "link",
    ) -> None:
        """Wire ``session`` to ``link``; events go to ``on_event``."""
        self.session = session
        self._link = link
        self._on_event = on_event
        self._name = name
        self._kick = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._next_drop_log = 0.0
        self._logged_drops: dict[str, int] = {}

    def now(self) -> float:
        """The driver's clock (the loop's monotonic time)."""
        return self._loop.time()

    def send(self, message: Message) -> None:
        """Send a message now (queued in the session, written by the driver)."""
        self.session.send(message, self.now())
        self._after_input()

    def acknowledge(self, message_id: bytes) -> None:
        """Acknowledge a durable or answered message to the peer.

        The acknowledgement goes out with the next record, or on its own
        after ``session.ack_delay`` (the session's timer says when).
        """
        self.session.acknowledge(message_id, self.now())
        self._after_input()

    def kick(self) -> None:
        """Wake the writer after changing the session directly."""
        self._after_input()

    def _after_input(self) -> None:
        session = self.session
        for event in session.events_received():
            self._on_event(event)
        if session.has_output:
            self._kick.set()  # else the writer would wake to find nothing
        self._rearm()
        now = self._loop.time()
        if now >= self._next_drop_log:
            self._log_drops(now)

    def _log_drops(self, now: float) -> None:
        """One line per drop reason per ``DROP_LOG_INTERVAL``, with counts, no bytes."""
        self._next_drop_log = now + DROP_LOG_INTERVAL
        counts = dict(self.session.link_drops)
        transport = self.session.transport
        if transport is not None:
            counts.update({str(k): v for k, v in transport.drops.items() if v})
        for reason, count in counts.items():
            if count != self._logged_drops.get(reason, 0):
                _LOGGER.warning(
                    "%s: dropped %d record(s) so far: %s", self._name, count, reason
                )
        self._logged_drops = counts

    def _rearm(self) -> None:
        # Lazily: a timer due no later than the session's next time stays (it
        # fires early, handle_timer finds nothing due, and it is set again),
        # so the supervision and reassembly times that move with every burst
        # do not cancel and reschedule a handle each time.
        when = self.session.get_timer()
        at = self._timer_at
        if when is not None and at is not None and at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.session.handle_timer(self.now())
        except RemoteProtocolError as exc:
            self._fail(exc)
            return
        self._after_input()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            _LOGGER.warning("%s: session failed: %s", self._name, exc)
        self._failed.set()
        self._kick.set()

    async def _reader(self) -> None:
        link = self._link
        session = self.session
        while True:
            data: bytes | None = await link.recv()
            # Take the whole burst that is already buffered, then hand out its
            # events and re-arm the timer once: one wake-up per burst.
            now = self.now()
            try:
                while data is not None:
                    session.receive_fragment(data, now)
                    data = link.recv_nowait()
            except RemoteProtocolError as exc:
                # What the burst delivered before the failure still counts
                # (an ACK among it must reach the daemon).
                for event in session.events_received():
                    self._on_event(event)
                self._fail(exc)
                return
            self._after_input()

    async def _writer(self) -> None:
        link = self._link
        session = self.session
        while True:
            fragment = session.pull_fragment(link.max_fragment_size)
            if fragment is None:
                if self._failed.is_set():
                    return  # a final alert, if any, has been written
                self._kick.clear()
                await self._kick.wait()
                continue
            await link.write(fragment)

    async def run(self) -> None:
        """Run until the link is lost or the session fails.

        Raises:
            LinkError: the link was lost.
            RemoteProtocolError: the session failed (handshake, pin, silence).
        """
        self._rearm()
        self._kick.set()
        tasks = {
            asyncio.create_task(self._reader(), name=f"{self._name} reader"),
            asyncio.create_task(self._writer(), name=f"{self._name} writer"),
            asyncio.create_task(self._failed.wait(), name=f"{self._name} watch"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self._failure is not None:
                # Let the writer flush a final alert, briefly.
                writer = next(t for t in tasks if t.get_name().endswith("writer"))
                if not writer.done():
                    try:
                        async with asyncio.timeout(0.5):
                            await asyncio.shield(writer)
                    except (TimeoutError, LinkError):
                        pass
                raise self._failure
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
            raise LinkError(f"{self._name}: link ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.session.close()
