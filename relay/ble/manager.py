"""Holds the link to the glasses: connect, handshake, run, and reconnect forever.

Each connection gets a fresh :class:`~protocol.session.Session` (a new Noise
handshake, new keys) over a new :class:`~relay.ble.link.BleLink`; the
:class:`~protocol.session.Delivery` state outlives connections, so what the
glasses have not acknowledged is resent and duplicates are dropped. After
every handshake the desired state (MODE: microphone, display, subscriptions)
is sent again and the clocks are synchronised.

Backoff is capped, exponential and fully jittered, with the base chosen by
what went wrong: a lost link is retried quickly, absent glasses slowly, a
failed handshake (wrong key, tampering) slower still.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from protocol.bodies import ClockSync, Mode
from protocol.clock import ClockEstimator, sample
from protocol.constants import MessageFlags, MessageKind
from protocol.errors import HandshakeError, PeerNotPinnedError, RemoteProtocolError
from protocol.message import Message
from protocol.session import (
    Delivery,
    HandshakeCompleted,
    MessageReceived,
    PeerPolicy,
    RekeyDue,
    Role,
    Session,
    SessionConfig,
    SessionEvent,
    SessionState,
)
from relay.ble.link import BackendSpec, BleLink, LinkConfig
from relay.connection import SessionDriver
from relay.errors import LinkError, LinkTimeoutError
from relay.identity import PhoneIdentity

__all__ = ["LinkManager", "LinkState", "RetryPolicy"]

_LOGGER: Final = logging.getLogger(__name__)


class LinkState(enum.StrEnum):
    """What the link to the glasses is doing."""

    SEARCHING = "searching"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Reconnect delays (seconds) by error class; full jitter, capped.

    Attributes:
        lost_base: After a link that was up is lost (retry soon).
        absent_base: After the glasses were not found.
        handshake_base: After a failed handshake (a wrong key must not spin).
        cap: Longest delay.
    """

    lost_base: float = 0.1
    absent_base: float = 1.0
    handshake_base: float = 1.0
    cap: float = 30.0

    def delay(self, error: BaseException, attempt: int, rng: random.Random) -> float:
        """Full-jitter delay for the ``attempt``-th failure in a row."""
        if isinstance(error, HandshakeError):
            base = self.handshake_base
        elif isinstance(error, LinkTimeoutError):
            base = self.absent_base
        else:
            base = self.lost_base
        return rng.uniform(0, min(self.cap, base * 2 ** min(attempt, 16)))


class LinkManager:
    """The phone's side of the BLE link, reconnecting forever (run :meth:`run`)."""

    def __init__(
        self,
        identity: PhoneIdentity,
        link_config: LinkConfig,
        backend: BackendSpec,
        on_event: Callable[[SessionEvent], None],
        *,
        session_config: SessionConfig | None = None,
        retry: RetryPolicy | None = None,
        mode: Mode | None = None,
        pairing: bool = False,
    ) -> None:
        """Prepare; nothing connects until :meth:`run`.

        With ``pairing``, every connection runs the pairing handshake (to add
        glasses even when some are already paired).
        """
        self.identity = identity
        self._link_config = link_config
        self._backend = backend
        self._on_event = on_event
        self._session_config = session_config or SessionConfig()
        self._retry = retry or RetryPolicy()
        self.mode = mode or Mode("wake_word", "glance", ("telemetry", "events"))
        self.delivery = Delivery(self._session_config.limits)
        self.clock = ClockEstimator()
        self.state = LinkState.STOPPED
        self.driver: SessionDriver | None = None
        self.link: BleLink | None = None
        self.connected = asyncio.Event()
        self.connects = 0
        self.handshake_failures = 0
        self.pin_mismatches = 0
        self.last_error: str | None = None
        self._rng = random.Random()
        self._pairing = pairing
        self.paired = asyncio.Event()
        self.last_paired: str | None = None
        self._rekeys = 0
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> Session | None:
        """The current session, if a link is up."""
        return None if self.driver is None else self.driver.session

    def _policy(self) -> PeerPolicy:
        pinned = self.identity.pinned_glasses()
        if pinned and not self._pairing:
            return PeerPolicy(pinned=pinned)
        payload = self.identity.pairing_payload()
        _LOGGER.info(
            "no glasses paired yet: pairing mode (code in the state directory)"
        )
        return PeerPolicy(pairing_psk=payload.psk)

    def send(self, message: Message) -> bool:
        """Send to the glasses; reliable messages wait for the next link if down.

        Returns:
            Whether the message was sent or kept; False if it was dropped
            (unreliable and no link, or the unacknowledged window is full).
        """
        driver = self.driver
        if driver is not None and driver.session.state is SessionState.ESTABLISHED:
            if (
                message.flags & MessageFlags.RELIABLE
                and not driver.session.can_send_reliable(len(message.body))
            ):
                return False
            driver.send(message)
            return True
        if message.flags & MessageFlags.RELIABLE and self.delivery.sender.has_room(
            message.size
        ):
            self.delivery.sender.track(message)
            return True
        return False

    def acknowledge(self, message_id: bytes) -> None:
        """Acknowledge a glasses message (durable or answered)."""
        driver = self.driver
        if driver is not None:
            driver.acknowledge(message_id)
        else:
            # Remember it as processed: the glasses will resend, we re-ack.
            self.delivery.in_progress.discard(message_id)
            self.delivery.seen.remember(message_id)

    def _event(self, event: SessionEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.state = LinkState.CONNECTED
            self.connected.set()
            if event.pairing:
                glasses_id = self.identity.pin_glasses(event.peer_static)
                self.identity.end_pairing()
                self.last_paired = glasses_id
                self.paired.set()
                _LOGGER.info("paired with glasses %s", glasses_id)
            self._after_handshake()
        elif isinstance(event, RekeyDue):
            _LOGGER.info(
                "session keys due for renewal: reconnecting for a new handshake"
            )
            self._rekeys += 1
            link = self.link
            if link is not None:
                task = asyncio.get_running_loop().create_task(link.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            return
        elif isinstance(event, MessageReceived) and (
            event.message.kind is MessageKind.CLOCK_SYNC
        ):
            self._on_clock(event.message)
            return
        self._on_event(event)

    def _after_handshake(self) -> None:
        if self.driver is None:
            return
        # Through send(), which respects the unacknowledged window: after a
        # reconnect it may be full of resumed messages, and raising here
        # would end every new session at once (a reconnect loop).
        mode = Message(
            MessageKind.MODE, os.urandom(16), self.mode.encode(), MessageFlags.RELIABLE
        )
        if not self.send(mode):
            _LOGGER.warning(
                "glasses' unacknowledged window is full: mode not re-applied "
                "on this connection"
            )
        self._clock_sync()

    def _clock_sync(self) -> None:
        driver = self.driver
        if driver is not None:
            t1 = int(time.monotonic() * 1e6)
            driver.send(
                Message(MessageKind.CLOCK_SYNC, os.urandom(16), ClockSync(t1).encode())
            )

    def _on_clock(self, message: Message) -> None:
        try:
            sync = ClockSync.decode(message.body)
        except RemoteProtocolError:
            return
        if sync.t2 is None or sync.t3 is None:
            return
        self.clock.add(sample(sync.t1, sync.t2, sync.t3, int(time.monotonic() * 1e6)))

    async def run(self) -> None:
        """Connect, run and reconnect until cancelled."""
        failures = 0
        try:
            while True:
                error = await self._connect_once()
                if error is None:
                    continue
                if self.connected.is_set():
                    failures = 0
                failures += 1
                self.connected.clear()
                delay = self._retry.delay(error, failures, self._rng)
                self.state = LinkState.BACKING_OFF
                _LOGGER.info("glasses link: %s; retrying in %.2f s", error, delay)
                await asyncio.sleep(delay)
        finally:
            self.state = LinkState.STOPPED
            self.connected.clear()

    async def _connect_once(self) -> BaseException | None:
        self.state = LinkState.SEARCHING
        # Decided (and any pairing code shown) before the glasses see us.
        policy = self._policy()
        try:
            link = await BleLink.connect(self._link_config, self._backend)
        except LinkError as exc:
            self.last_error = str(exc)
            return exc
        self.link = link
        self.connects += 1
        self.state = LinkState.HANDSHAKING
        session = Session(
            Role.PHONE,
            self.identity.static,
            policy,
            delivery=self.delivery,
            config=self._session_config,
        )
        driver = SessionDriver(session, link, self._event, name=link.name)
        self.driver = driver
        session.initiate(driver.now())
        try:
            await driver.run()
        except HandshakeError as exc:
            self.handshake_failures += 1
            if isinstance(exc, PeerNotPinnedError):
                self.pin_mismatches += 1
            self.last_error = str(exc)
            return exc
        except (LinkError, RemoteProtocolError) as exc:
            self.last_error = str(exc)
            return exc
        finally:
            self.driver = None
            self.link = None
            self.connected.clear()
            await link.aclose()
        return None
