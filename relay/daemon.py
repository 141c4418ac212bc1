"""The daemon: glasses link, routing, outbox, uplink, under one supervisor.

Composition root of ``glasses-relay run``. Every component runs under
:func:`supervise`: a component that fails with a bug is logged, counted and
restarted with backoff, so one failure never takes the link down silently.
Messages from the glasses are handled in arrival order by one intake task:

- a REQUEST is routed (:func:`relay.router.decide.decide`): phone-only kinds
  are answered at once by a phone-side skill; the rest is sealed into the
  outbox for the cloud;
- media chunks follow their request's route;
- telemetry, events and the rest go to the cloud.

A glasses message is acknowledged only once it is durable (stored in the
outbox) or answered; when the outbox is full it is not acknowledged, and
backpressure reaches the glasses. Answers from the cloud are forwarded to the
glasses reliably and acknowledged to the gateway once the glasses have them.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from protocol.bodies import Ack, Holding, Presence, Request, ResponseText, Telemetry
from protocol.cloud import Channels
from protocol.constants import MessageFlags, MessageKind
from protocol.envelope import EnvelopeSuite
from protocol.errors import RemoteProtocolError
from protocol.message import Message
from protocol.session import (
    HandshakeCompleted,
    MessageReceived,
    MessagesAcknowledged,
    SessionConfig,
    SessionEvent,
)
from relay.ble.link import BackendSpec, LinkConfig
from relay.ble.manager import LinkManager, LinkState
from relay.cloudlink import CloudConfig, CloudLink
from relay.errors import ConfigError
from relay.identity import GatewayKey, PhoneIdentity
from relay.local.skills import PhoneState, answer
from relay.outbox import Outbox, OutboxConfig, OutboxStats, Priority, PutOutcome
from relay.router.decide import Policy, Route, Snapshot, decide
from relay.uplink.base import Uplink

__all__ = ["Daemon", "DaemonConfig", "RequestTrace", "supervise"]

_LOGGER: Final = logging.getLogger(__name__)

_PRIORITY: Final = {
    MessageKind.REQUEST: Priority.INTERACTIVE,
    MessageKind.AUDIO_CHUNK: Priority.INTERACTIVE,
    MessageKind.PHOTO_CHUNK: Priority.INTERACTIVE,
    MessageKind.CANCEL: Priority.INTERACTIVE,
    MessageKind.PAYMENT: Priority.INTERACTIVE,
    MessageKind.TELEMETRY: Priority.TELEMETRY,
}
_ROUTES_KEPT: Final = 1024
_TRACES_KEPT: Final = 200


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon needs, validated before it starts."""

    state_dir: Path
    link: LinkConfig = field(default_factory=LinkConfig)
    links: tuple[LinkConfig, ...] = ()
    """Several links of one device (one per arm); empty: just ``link``."""
    session: SessionConfig = field(default_factory=SessionConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    policy: Policy = field(default_factory=Policy)
    gateway_key_file: Path | None = None
    intake_queue: int = 4096
    shutdown_timeout: float = 4.0
    realtime_ttl: float = 30.0
    suite: EnvelopeSuite = EnvelopeSuite.HPKE


@dataclass(slots=True)
class RequestTrace:
    """Hop times of one request (seconds on the phone's monotonic clock)."""

    request_id: int
    kind: str
    route: str
    reason: str
    capture_end: float | None
    received: float
    routed: float
    cloud_acked: float | None = None
    first_answer: float | None = None
    answered_by: str | None = None

    @property
    def response_s(self) -> float | None:
        """From the end of capture (or receipt) to the first answer byte sent."""
        if self.first_answer is None:
            return None
        start = self.capture_end if self.capture_end is not None else self.received
        return self.first_answer - start


@dataclass(slots=True)
class DaemonStats:
    """Counters of the daemon."""

    messages_in: int = 0
    acked_to_glasses: int = 0
    refused_full: int = 0
    local_answers: int = 0
    cloud_answers: int = 0
    intake_overflow: int = 0
    realtime_dropped: int = 0
    restarts: dict[str, int] = field(default_factory=dict)


async def supervise(
    name: str,
    component: Callable[[], Awaitable[None]],
    restarts: dict[str, int],
    *,
    base: float = 0.5,
    cap: float = 30.0,
) -> None:
    """Run ``component`` forever: restart it with backoff when it fails.

    Cancellation ends it. A component that returns normally is done.
    """
    attempt = 0
    rng = random.Random()
    while True:
        started = time.monotonic()
        try:
            await component()
        except asyncio.CancelledError:
            raise
        except ConfigError as exc:
            # Permanent (refused credentials, a bad certificate): no restart
            # can fix it; one line, and the caller stops the daemon.
            _LOGGER.error("%s: %s", name, exc)  # noqa: TRY400
            raise
        except Exception:
            restarts[name] = restarts.get(name, 0) + 1
            if time.monotonic() - started > 60:
                attempt = 0
            attempt += 1
            delay = rng.uniform(0, min(cap, base * 2**attempt))
            _LOGGER.exception("%s failed; restarting in %.1f s", name, delay)
            await asyncio.sleep(delay)
        else:
            return


class Daemon:
    """The running daemon; build it, then ``await daemon.run()``."""

    def __init__(
        self,
        config: DaemonConfig,
        backend: BackendSpec,
        make_uplink: Callable[[GatewayKey, Channels], Uplink] | None,
        *,
        outbox: Outbox,
    ) -> None:
        """Load the identity and wire the components (nothing runs yet)."""
        self.config = config
        self.identity = PhoneIdentity(config.state_dir)
        self.stats = DaemonStats()
        self.phone = PhoneState()
        self.started = time.monotonic()
        self.outbox = outbox
        self._events: asyncio.Queue[SessionEvent] = asyncio.Queue(config.intake_queue)
        # A device profile may hold several links (one per arm): one manager
        # each, one intake; answers go out on the first link that is up.
        self.links = [
            LinkManager(
                self.identity,
                link_config,
                backend,
                functools.partial(self._on_link_event, index),
                session_config=config.session,
            )
            for index, link_config in enumerate(config.links or (config.link,))
        ]
        self._arrived_on: collections.OrderedDict[bytes, int] = (
            collections.OrderedDict()
        )
        self.cloud = CloudLink(
            self.identity,
            outbox,
            make_uplink,
            self._on_downlink,
            config=config.cloud,
            gateway_key_file=config.gateway_key_file,
            on_acked=self._on_cloud_acked,
            suite=config.suite,
        )
        self._routes: collections.OrderedDict[int, Route] = collections.OrderedDict()
        self.traces: collections.OrderedDict[int, RequestTrace] = (
            collections.OrderedDict()
        )
        self._by_message: dict[bytes, int] = {}
        self._from_cloud: dict[bytes, int] = {}
        self._delivered: collections.OrderedDict[bytes, None] = (
            collections.OrderedDict()
        )
        self._background: set[asyncio.Task[bool]] = set()
        self._outbox_stats: OutboxStats | None = None
        self._local_pending: dict[int, tuple[Message, Request]] = {}

    # -- events from the glasses -----------------------------------------

    @property
    def link(self) -> LinkManager:
        """The primary link: the first one that is connected (else the first)."""
        for manager in self.links:
            if manager.state is LinkState.CONNECTED:
                return manager
        return self.links[0]

    def _on_link_event(self, index: int, event: SessionEvent) -> None:
        if isinstance(event, MessageReceived):
            self._arrived_on[event.message.message_id] = index
            while len(self._arrived_on) > self.config.intake_queue:
                self._arrived_on.popitem(last=False)
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.intake_overflow += 1
            if isinstance(event, MessageReceived):
                session = self.links[index].session
                if session is not None:
                    session.abandon(event.message.message_id)

    def _source(self, message: Message) -> LinkManager:
        """The link a glasses message arrived on (its ACK goes back there)."""
        index = self._arrived_on.get(message.message_id)
        return self.link if index is None else self.links[index]

    async def _intake(self) -> None:
        while True:
            event = await self._events.get()
            if isinstance(event, MessageReceived):
                await self._handle(event.message)
            elif isinstance(event, MessagesAcknowledged):
                await self._glasses_acked(event.messages)
            elif isinstance(event, HandshakeCompleted):
                _LOGGER.info("glasses session up (session %08x)", event.session_id)

    def _ack(self, message: Message) -> None:
        self._source(message).acknowledge(message.message_id)
        self._arrived_on.pop(message.message_id, None)
        self.stats.acked_to_glasses += 1

    async def _to_cloud(self, message: Message) -> None:
        priority = _PRIORITY.get(message.kind, Priority.NORMAL)
        if message.flags & MessageFlags.REALTIME:
            # Live streams may go stale: stored with an expiry, dropped and
            # counted when old or when the outbox is full, never acknowledged
            # to the glasses as durable.
            outcome = await self.cloud.put(
                message,
                priority,
                realtime=True,
                expires_at=time.time() + self.config.realtime_ttl,
            )
            if outcome is PutOutcome.DROPPED_REALTIME:
                self.stats.realtime_dropped += 1
            return
        outcome = await self.cloud.put(message, priority)
        if outcome in (PutOutcome.STORED, PutOutcome.DUPLICATE):
            self._ack(message)
        else:
            # Not durable: do not acknowledge. The glasses keep it and resend.
            self.stats.refused_full += 1
            session = self._source(message).session
            if session is not None:
                session.abandon(message.message_id)

    async def _handle(self, message: Message) -> None:
        self.stats.messages_in += 1
        kind = message.kind
        if kind is MessageKind.REQUEST:
            await self._request(message)
        elif kind in (MessageKind.AUDIO_CHUNK, MessageKind.PHOTO_CHUNK):
            if self._routes.get(message.request_id) is Route.LOCAL:
                self._ack(message)  # the phone answers this request itself
                pending = self._local_pending.pop(message.request_id, None)
                if pending is not None and message.flags & MessageFlags.FINAL:
                    self._answer_locally(*pending)
                elif pending is not None:
                    self._local_pending[message.request_id] = pending
            else:
                await self._to_cloud(message)
        elif kind is MessageKind.TELEMETRY:
            try:
                self.phone.battery_pct = Telemetry.decode(message.body).battery_pct
            except RemoteProtocolError:
                self._ack(message)
                return
            await self._to_cloud(message)
        elif kind in (MessageKind.ACK, MessageKind.HEARTBEAT, MessageKind.CREDIT):
            return
        else:
            await self._to_cloud(message)

    async def _request(self, message: Message) -> None:
        now = time.monotonic()
        try:
            request = Request.decode(message.body)
        except RemoteProtocolError:
            _LOGGER.warning("glasses sent a malformed request; dropped")
            self._ack(message)
            return
        snapshot = Snapshot(
            uplink_connected=self.cloud.connected,
            uplink_configured=self.cloud.configured,
        )
        decision = decide(request, snapshot, self.config.policy)
        capture_end = self._source(message).clock.to_local(request.capture_end_us)
        trace = RequestTrace(
            message.request_id,
            request.kind.name.lower(),
            decision.route.value,
            decision.reason,
            None if capture_end is None else capture_end / 1e6,
            now,
            time.monotonic(),
        )
        self._remember(message.request_id, decision.route, trace)
        self._by_message[message.message_id] = message.request_id
        if decision.route is Route.LOCAL:
            if request.size > 0:
                # Spoken: the answer waits for the end of the utterance (the
                # last chunk), as the phone cannot know what was said before.
                self._local_pending[message.request_id] = (message, request)
                while len(self._local_pending) > _ROUTES_KEPT:
                    self._local_pending.pop(next(iter(self._local_pending)))
                return
            self._answer_locally(message, request)
            return
        await self._to_cloud(message)
        if decision.holding:
            self.link.send(
                Message(
                    MessageKind.HOLDING,
                    os.urandom(16),
                    Holding(
                        "Waiting for a connection; I'll answer as soon as I can."
                    ).encode(),
                    MessageFlags.NONE,
                    message.request_id,
                )
            )

    def _answer_locally(self, message: Message, request: Request) -> None:
        text = answer(request, self.phone, datetime.datetime.now().astimezone())
        self._send_answer(message.request_id, text, "local")
        self.stats.local_answers += 1
        self._ack(message)

    def _remember(self, request_id: int, route: Route, trace: RequestTrace) -> None:
        self._routes[request_id] = route
        self.traces[request_id] = trace
        while len(self._routes) > _ROUTES_KEPT:
            self._routes.popitem(last=False)
        while len(self.traces) > _TRACES_KEPT:
            self.traces.popitem(last=False)

    def _send_answer(self, request_id: int, text: str, route: str) -> None:
        body = ResponseText(0, text, route).encode()
        message = Message(
            MessageKind.RESPONSE_TEXT,
            os.urandom(16),
            body,
            MessageFlags.RELIABLE | MessageFlags.FINAL,
            request_id,
        )
        if self.link.send(message):
            self._answered(request_id, route)

    def _answered(self, request_id: int, route: str) -> None:
        trace = self.traces.get(request_id)
        if trace is not None and trace.first_answer is None:
            trace.first_answer = time.monotonic()
            trace.answered_by = route

    # -- the cloud ---------------------------------------------------------

    def _on_cloud_acked(self, ids: list[bytes]) -> None:
        now = time.monotonic()
        for mid in ids:
            request_id = self._by_message.pop(mid, None)
            trace = None if request_id is None else self.traces.get(request_id)
            if trace is not None and trace.cloud_acked is None:
                trace.cloud_acked = now

    def _on_downlink(self, message: Message) -> None:
        mid = message.message_id
        if mid in self._delivered:
            # The glasses have it; the gateway missed our ACK: send it again.
            self._ack_up([mid])
            return
        if mid in self._from_cloud:
            return  # on its way to the glasses
        flags = message.flags | MessageFlags.RELIABLE
        forwarded = Message(message.kind, mid, message.body, flags, message.request_id)
        if self.link.send(forwarded):
            self._from_cloud[mid] = message.request_id
            if message.kind is MessageKind.RESPONSE_TEXT:
                self.stats.cloud_answers += 1
                self._answered(message.request_id, "cloud")

    async def _glasses_acked(self, messages: tuple[Message, ...]) -> None:
        ids = [m.message_id for m in messages if m.message_id in self._from_cloud]
        for mid in ids:
            del self._from_cloud[mid]
            self._delivered[mid] = None
        while len(self._delivered) > 4096:
            self._delivered.popitem(last=False)
        if ids:
            self._ack_up(ids)

    def _ack_up(self, ids: list[bytes]) -> None:
        message = Message(
            MessageKind.ACK, os.urandom(16), Ack(tuple(ids[:1024])).encode()
        )
        task = asyncio.get_running_loop().create_task(self.cloud.send_direct(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Run every component until cancelled."""
        restarts = self.stats.restarts
        async with asyncio.TaskGroup() as group:
            for index, manager in enumerate(self.links):
                name = "glasses link" if index == 0 else f"glasses link {index + 1}"
                group.create_task(supervise(name, manager.run, restarts))
            group.create_task(supervise("intake", self._intake, restarts))
            group.create_task(supervise("cloud", self.cloud.run, restarts))
            group.create_task(
                supervise("outbox stats", self._refresh_outbox_stats, restarts)
            )

    def offline_will(self) -> bytes:
        """The sealed "offline" PRESENCE payload for the MQTT last will."""
        message = Message(
            MessageKind.PRESENCE,
            os.urandom(16),
            Presence("offline", int(time.time() * 1e6)).encode(),
        )
        return self.cloud.seal_presence(message)

    # -- status ------------------------------------------------------------

    async def _refresh_outbox_stats(self) -> None:
        while True:
            self._outbox_stats = await self.outbox.stats()
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, object]:
        """The /status document: pid, uptime, link, uplink, outbox, recent requests."""
        manager = self.link
        session = manager.session
        link_stats = manager.link.stats if manager.link is not None else None
        crypto: dict[str, int] = {}
        if session is not None and session.transport is not None:
            crypto = {str(k): v for k, v in session.transport.drops.items()}
        uplink = self.cloud.uplink
        up_stats = uplink.stats() if uplink is not None else None
        box = self._outbox_stats
        offset = manager.clock.offset_us
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "device": self.cloud.channels.up.split("/")[-2],
            "link": {
                "state": manager.state.value,
                "connects": manager.connects,
                "handshake_failures": manager.handshake_failures,
                "pin_mismatches": manager.pin_mismatches,
                "last_error": manager.last_error,
                "frames_in": link_stats.fragments_in if link_stats else 0,
                "frames_out": link_stats.fragments_out if link_stats else 0,
                "bytes_in": link_stats.bytes_in if link_stats else 0,
                "bytes_out": link_stats.bytes_out if link_stats else 0,
                "reassembly_drops": dict(session.link_drops) if session else {},
                "crypto_drops": crypto,
                "clock_offset_ms": None if offset is None else round(offset / 1000, 2),
                "paired_glasses": len(self.identity.pinned_glasses()),
            },
            "links": [
                {"state": m.state.value, "connects": m.connects} for m in self.links
            ],
            "uplink": {
                "configured": self.cloud.configured,
                "state": "none" if uplink is None else uplink.state.value,
                "gateway_kid": None
                if self.cloud.gateway is None
                else self.cloud.gateway.kid,
                "in_flight": self.cloud.in_flight,
                "publishes": up_stats.publishes if up_stats else 0,
                "reconnects": up_stats.reconnects if up_stats else 0,
                "sent": self.cloud.stats.envelopes_sent,
                "acked": self.cloud.stats.acked,
            },
            "outbox": {
                "rows": box.rows if box else 0,
                "bytes": box.total_bytes if box else 0,
                "oldest_age_s": box.oldest_age_s if box else None,
                "refused_full": self.stats.refused_full,
            },
            "requests": [self._trace_json(t) for t in list(self.traces.values())[-50:]],
            "counters": {
                "messages_in": self.stats.messages_in,
                "acked_to_glasses": self.stats.acked_to_glasses,
                "local_answers": self.stats.local_answers,
                "cloud_answers": self.stats.cloud_answers,
                "restarts": dict(self.stats.restarts),
            },
        }

    @staticmethod
    def _trace_json(trace: RequestTrace) -> dict[str, object]:
        start = trace.capture_end if trace.capture_end is not None else trace.received

        def hop(value: float | None) -> float | None:
            return None if value is None else round((value - start) * 1000, 1)

        response = trace.response_s
        return {
            "request_id": trace.request_id,
            "kind": trace.kind,
            "route": trace.route,
            "reason": trace.reason,
            "response_ms": None if response is None else round(response * 1000, 1),
            "hops_ms": {
                "phone_received": hop(trace.received),
                "routed": hop(trace.routed),
                "cloud_acked": hop(trace.cloud_acked),
                "first_answer_sent": hop(trace.first_answer),
            },
        }

    async def close(self) -> None:
        """Close the uplink; call after :meth:`run` has ended."""
        for task in list(self._background):
            task.cancel()
        await self.cloud.aclose()
