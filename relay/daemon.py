"""The daemon: glasses link, routing, outbox, uplink, under one supervisor.

Composition root of ``glasses-relay run``. Every component runs under
:func:`supervise`: a component that fails with a bug is logged, counted and
restarted with backoff, so one failure never takes the link down silently.
Messages from the glasses are handled in arrival order by one intake task:

- a REQUEST is routed (:func:`relay.router.strategies.route_request`: the
  deadline-aware router by default): answered by a phone-side skill
  (:mod:`relay.local.skills`) once its media is on the phone, sealed into the
  outbox for the cloud, or both raced (a local *hedge* starts when the cloud
  has produced no first token in time);
- media chunks follow their request's route (and are kept in memory while the
  phone may still answer);
- a wake word marks the radio as pre-warmed (the event itself is the tiny
  uplink packet that wakes it);
- telemetry, events and the rest go to the cloud.

The router's estimators (:class:`relay.router.estimators.Estimators`) learn
from the cloud link's sends, acks and downlink bytes, BLE media transfers and
the cloud's first-token times.

A glasses message is acknowledged only once it is durable (stored in the
outbox, or acknowledged by the gateway while the outbox held it unwritten:
docs/cloud.md) or answered; when the outbox is full it is not acknowledged, and
backpressure reaches the glasses. Answers from the cloud are forwarded to the
glasses reliably and acknowledged to the gateway once the glasses have them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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

from protocol.bodies import (
    Ack,
    Event,
    EventType,
    Holding,
    Presence,
    Request,
    ResponseText,
    Telemetry,
)
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
from relay.capture_ring import CaptureRing, RingConfig, captures_dir
from relay.cloudlink import CloudConfig, CloudLink
from relay.errors import ConfigError
from relay.identity import GatewayKey, PhoneIdentity
from relay.local.skills import LocalAnswer, LocalSkills, PhoneState, Scope
from relay.outbox import Outbox, OutboxConfig, OutboxStats, Priority, PutOutcome
from relay.router.decide import LocalOption, Policy, Route, RouteDecision
from relay.router.estimators import Estimators
from relay.router.strategies import Strategy, route_request
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
_PENDING_KEPT: Final = 64
"""Requests whose local answer, hedge or media is still tracked; oldest dropped."""
_EARLY_KEPT: Final = 16
"""Requests whose media arrived before the request itself (a resend after a
reconnect can reorder them): held until it comes; beyond, the oldest go to the
cloud as they are."""
_MEDIA_WAIT_S: Final = 30.0
"""Longest wait for a request's media before the phone gives up answering it."""


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
    strategy: Strategy = Strategy.ROUTER
    """``router``, or a baseline (``always_cloud``, ``always_local``)."""
    emulate_local_cost: bool = False
    """Benchmarks: a local answer takes its skill's declared cost (0.3 s, 1.2 s)."""
    max_local_media_bytes: int = 4 << 20
    """Media kept per request for a local answer; beyond it the phone does not
    answer that request itself (the cloud still does)."""
    capture: RingConfig = field(default_factory=RingConfig)
    """The rolling capture of the link (``--capture-ring``; off by default)."""


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
    predicted_local_s: float | None = None
    predicted_cloud_s: float | None = None
    hedged: bool = False
    local_computed: bool = False
    cloud_computed: bool = False

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
    requests: int = 0
    hedges: int = 0
    local_fallbacks: int = 0
    routes: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    """A request the phone may still answer, or whose cloud answer is awaited."""

    message: Message
    request: Request
    decision: RouteDecision
    capture_end: float
    trace: RequestTrace
    keep_media: bool
    media: bytearray = field(default_factory=bytearray)
    held: list[Message] = field(default_factory=list)
    media_done: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk_at: float | None = None
    uploaded_at: float | None = None
    cloud_answered_at: float | None = None
    local_sent: bool = False
    local_started: bool = False
    cloud_text: list[str] = field(default_factory=list)


async def supervise(
    name: str,
    component: Callable[[], Awaitable[None]],
    restarts: dict[str, int],
    *,
    base: float = 0.5,
    cap: float = 30.0,
    on_failure: Callable[[str], Awaitable[object]] | None = None,
) -> None:
    """Run ``component`` forever: restart it with backoff when it fails.

    Cancellation ends it. A component that returns normally is done.
    ``on_failure(name)`` is awaited after each failure, before the backoff
    (the daemon writes its capture ring there).
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
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled, and clean-up code raised something else on the
                # way out: stop as cancelled rather than restart.
                _LOGGER.debug("%s failed while cancelled", name, exc_info=True)
                raise asyncio.CancelledError from None
            restarts[name] = restarts.get(name, 0) + 1
            if time.monotonic() - started > 60:
                attempt = 0
            attempt += 1
            delay = rng.uniform(0, min(cap, base * 2**attempt))
            _LOGGER.exception("%s failed; restarting in %.1f s", name, delay)
            if on_failure is not None:
                await on_failure(name)
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
        self.skills = LocalSkills(self.phone)
        self.estimators = Estimators()
        self.started = time.monotonic()
        self.outbox = outbox
        self._events: asyncio.Queue[SessionEvent] = asyncio.Queue(config.intake_queue)
        self._put_error: BaseException | None = None
        self.capture: CaptureRing | None = None
        if config.capture.enabled:
            self.capture = CaptureRing(config.capture, captures_dir(config.state_dir))
            backend = self.capture.tapping(backend)
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
            observer=self.estimators,
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
        self._background: set[asyncio.Future[object]] = set()
        self._outbox_stats: OutboxStats | None = None
        self._pending: collections.OrderedDict[int, _Pending] = (
            collections.OrderedDict()
        )
        self._final_parts: dict[bytes, int] = {}
        self._early: collections.OrderedDict[int, list[Message]] = (
            collections.OrderedDict()
        )

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
            error, self._put_error = self._put_error, None
            if error is not None:
                # An earlier message's commit failed (it was not acknowledged):
                # stop so the supervisor restarts the intake, as if the put had
                # failed in line.
                raise error
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
        """Seal and queue ``message`` for the outbox; act on the outcome once committed.

        Waits only while ``cloud.max_pending_puts`` messages are uncommitted,
        so the intake goes on with the next message while this one's
        transaction forms (group commit); the glasses get the ACK only once it
        is durable.
        """
        priority = _PRIORITY.get(message.kind, Priority.NORMAL)
        realtime = bool(message.flags & MessageFlags.REALTIME)
        # Live streams may go stale: stored with an expiry, dropped and
        # counted when old or when the outbox is full, never acknowledged to
        # the glasses as durable.
        future = await self.cloud.submit(
            message,
            priority,
            realtime=realtime,
            expires_at=time.time() + self.config.realtime_ttl if realtime else None,
        )
        future.add_done_callback(functools.partial(self._stored, message, realtime))

    def _stored(
        self, message: Message, realtime: bool, future: asyncio.Future[PutOutcome]
    ) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            # Not durable: the glasses keep it and resend; the intake stops
            # and its supervisor restarts it.
            self._not_durable(message)
            if self._put_error is None:
                self._put_error = exc
            return
        outcome = future.result()
        if realtime:
            if outcome is PutOutcome.DROPPED_REALTIME:
                self.stats.realtime_dropped += 1
            return
        if outcome in (
            PutOutcome.STORED,
            PutOutcome.DUPLICATE,
            PutOutcome.ACKNOWLEDGED,  # durable at the gateway before written here
        ):
            self._ack(message)
        else:
            # Not durable: do not acknowledge. The glasses keep it and resend.
            self.stats.refused_full += 1
            self._not_durable(message)

    def _not_durable(self, message: Message) -> None:
        session = self._source(message).session
        if session is not None:
            session.abandon(message.message_id)

    async def _handle(self, message: Message) -> None:
        self.stats.messages_in += 1
        kind = message.kind
        if kind is MessageKind.REQUEST:
            await self._request(message)
        elif kind in (MessageKind.AUDIO_CHUNK, MessageKind.PHOTO_CHUNK):
            await self._chunk(message)
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
            if kind is MessageKind.EVENT and self.cloud.connected:
                try:
                    event = Event.decode(message.body)
                except RemoteProtocolError:
                    event = None
                if event is not None and event.type is EventType.WAKE_WORD:
                    # The event itself is the small uplink packet that wakes
                    # the cellular radio while the user still speaks.
                    self.estimators.radio_woken(time.monotonic())
            await self._to_cloud(message)

    async def _chunk(self, message: Message) -> None:
        now = time.monotonic()
        rid = message.request_id
        final = bool(message.flags & MessageFlags.FINAL)
        pending = self._pending.get(rid)
        if pending is None and rid not in self._routes:
            # Media before its request: hold it until the request is routed.
            self._early.setdefault(rid, []).append(message)
            while len(self._early) > _EARLY_KEPT:
                _, orphans = self._early.popitem(last=False)
                for orphan in orphans:
                    await self._to_cloud(orphan)
            return
        if pending is not None:
            if pending.first_chunk_at is None:
                pending.first_chunk_at = now
            if pending.keep_media:
                piece = message.body[4:]
                if len(pending.media) + len(piece) > self.config.max_local_media_bytes:
                    pending.keep_media = False  # too big to answer on the phone
                    pending.media.clear()
                else:
                    pending.media += piece
            if final:
                pending.media_done.set()
                if message.kind is MessageKind.PHOTO_CHUNK and pending.request.size:
                    self.estimators.ble_bytes(
                        pending.request.size, pending.first_chunk_at, now
                    )
        if self._routes.get(rid) is Route.LOCAL:
            self._ack(message)  # the phone answers this request itself
            if pending is not None:
                pending.held.append(message)  # for the cloud, should it fail
            return
        if final:
            self._final_parts[message.message_id] = rid
        await self._to_cloud(message)

    async def _request(self, message: Message) -> None:
        now = time.monotonic()
        try:
            request = Request.decode(message.body)
        except RemoteProtocolError:
            _LOGGER.warning("glasses sent a malformed request; dropped")
            self._ack(message)
            return
        rid = message.request_id
        self.stats.requests += 1
        info = self.skills.match(request, mono=now)
        local = (
            None
            if info is None
            else LocalOption(
                info.name, info.quality, info.cost_s, info.scope is Scope.PHONE_ONLY
            )
        )
        capture_us = self._source(message).clock.to_local(request.capture_end_us)
        capture_end = now if capture_us is None else capture_us / 1e6
        box = self._outbox_stats
        snapshot = self.estimators.snapshot(
            now,
            kind=request.kind,
            uplink_configured=self.cloud.configured,
            uplink_connected=self.cloud.connected,
            local=local,
            capture_end_s=capture_end,
            media_bytes_remaining=request.size,
            request_bytes=request.size + len(message.body),
            outbox_bytes_ahead=self._bytes_waiting(box),
            battery_pct=self.phone.battery_pct,
            requests_seen=self.stats.requests,
            hedges_used=self.stats.hedges,
        )
        decision = route_request(
            self.config.strategy, request, snapshot, self.config.policy
        )
        route = decision.route
        self.stats.routes[route.value] = self.stats.routes.get(route.value, 0) + 1
        trace = RequestTrace(
            rid,
            request.kind.name.lower(),
            route.value,
            decision.reason,
            None if capture_us is None else capture_end,
            now,
            time.monotonic(),
            predicted_local_s=decision.predicted_local_s,
            predicted_cloud_s=decision.predicted_cloud_s,
            local_computed=route is Route.LOCAL,
            cloud_computed=route is not Route.LOCAL,
        )
        self._remember(rid, route, trace)
        self._by_message[message.message_id] = rid
        pending = _Pending(
            message,
            request,
            decision,
            capture_end,
            trace,
            keep_media=local is not None and route is not Route.CLOUD,
        )
        self._pending[rid] = pending
        while len(self._pending) > _PENDING_KEPT:
            self._pending.popitem(last=False)
        if request.size == 0:
            pending.media_done.set()
        if route is Route.LOCAL:
            self._spawn(self._answer_locally(pending))
        else:
            if request.size == 0:
                self._final_parts[message.message_id] = rid
            await self._to_cloud(message)
        for early in self._early.pop(rid, []):
            await self._chunk(early)
        if route is Route.LOCAL:
            return
        if route is Route.HEDGED and decision.hedge_after_s is not None:
            self._spawn(self._hedge(pending, capture_end + decision.hedge_after_s))
        if decision.holding:
            text = self.skills.holding_reply(request)
            self.link.send(
                Message(
                    MessageKind.HOLDING,
                    os.urandom(16),
                    Holding(text).encode(),
                    MessageFlags.NONE,
                    rid,
                )
            )

    def _bytes_waiting(self, box: OutboxStats | None) -> int:
        """Outbox bytes not yet sent (rows in flight are excluded, pro rata)."""
        if box is None or box.rows == 0:
            return 0
        # In flight counts held unwritten rows too (sent, not in ``rows``).
        stored_in_flight = max(0, self.cloud.in_flight - box.unwritten)
        waiting = max(0, box.rows - stored_in_flight)
        return box.total_bytes * waiting // box.rows

    def _spawn(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hedge(self, pending: _Pending, at: float) -> None:
        """Start the phone's own answer if the cloud is silent at ``at``."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if pending.cloud_answered_at is not None or pending.local_started:
            return
        self.stats.hedges += 1
        pending.trace.hedged = True
        pending.trace.local_computed = True
        _LOGGER.info(
            "request %d: no first token from the cloud in time; hedging on the phone",
            pending.message.request_id,
        )
        await self._answer_locally(pending)

    async def _answer_locally(self, pending: _Pending) -> None:
        """Answer on the phone once the media is in (or fall back to the cloud)."""
        pending.local_started = True
        message = pending.message
        result = None
        try:
            async with asyncio.timeout(_MEDIA_WAIT_S):
                await pending.media_done.wait()
        except TimeoutError:
            _LOGGER.info("request %d: media never completed", message.request_id)
        else:
            result = await self._local_answer(pending)
        pending.media = bytearray()  # answered or not: the media is no longer needed
        if pending.decision.route is Route.LOCAL:
            self._ack(message)
        if result is None:
            await self._local_failed(pending)
            return
        pending.held.clear()
        if pending.cloud_answered_at is not None:
            return  # the cloud won the race: its answer is on the glasses
        pending.local_sent = True
        self._send_answer(message.request_id, result.text, "local")
        self.stats.local_answers += 1

    async def _local_answer(self, pending: _Pending) -> LocalAnswer | None:
        """The skill's answer, taking its declared cost when emulated."""
        started = time.monotonic()
        media = bytes(pending.media) if pending.keep_media else b""
        # Decoding a photo is CPU work (10-60 ms): off the event loop.
        codes = await asyncio.to_thread(self.skills.read_codes, media) if media else ()
        result = self.skills.answer(
            pending.request,
            media,
            datetime.datetime.now().astimezone(),
            started,
            codes=codes,
        )
        if result is not None and self.config.emulate_local_cost:
            await asyncio.sleep(
                max(0.0, started + result.skill.cost_s - time.monotonic())
            )
        return result

    async def _local_failed(self, pending: _Pending) -> None:
        """The skill could not answer after all (e.g. no barcode in the photo)."""
        if pending.decision.route is not Route.LOCAL:
            return  # the cloud has the request already
        self.stats.local_fallbacks += 1
        pending.trace.cloud_computed = True
        self._routes[pending.message.request_id] = Route.CLOUD
        rid = pending.message.request_id
        for part in (pending.message, *pending.held):
            whole = part.kind is MessageKind.REQUEST and pending.request.size == 0
            if whole or part.flags & MessageFlags.FINAL:
                self._final_parts[part.message_id] = rid
            await self.cloud.put(part, Priority.INTERACTIVE)
        pending.held.clear()
        if not self.cloud.connected:
            text = self.skills.holding_reply(pending.request)
            self.link.send(
                Message(
                    MessageKind.HOLDING,
                    os.urandom(16),
                    Holding(text).encode(),
                    MessageFlags.NONE,
                    rid,
                )
            )

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

    def _on_cloud_acked(self, ids: list[bytes], processed_at: list[float]) -> None:
        # processed_at: each ack's arrival less the time the gateway held it.
        for mid, at in zip(ids, processed_at, strict=True):
            request_id = self._by_message.pop(mid, None)
            trace = None if request_id is None else self.traces.get(request_id)
            if trace is not None and trace.cloud_acked is None:
                # When the gateway had it, as the router counts it: a held
                # ack's arrival would put this hop after the answer's.
                trace.cloud_acked = at
            final_of = self._final_parts.pop(mid, None)
            pending = None if final_of is None else self._pending.get(final_of)
            if pending is not None and pending.uploaded_at is None:
                pending.uploaded_at = at  # the whole request is at the gateway
                if pending.cloud_answered_at is not None:  # the answer came first
                    self._first_token(pending)
        while len(self._final_parts) > _ROUTES_KEPT:
            self._final_parts.pop(next(iter(self._final_parts)))

    def _on_downlink(self, message: Message) -> None:
        mid = message.message_id
        if mid in self._delivered:
            # The glasses have it; the gateway missed our ACK: send it again.
            self._ack_up([mid])
            return
        if mid in self._from_cloud:
            return  # on its way to the glasses
        if message.kind is MessageKind.RESPONSE_TEXT and not self._cloud_piece(message):
            # Policy: no late cloud answer after a local one. The gateway
            # still gets its ack, as if the glasses had it.
            self._delivered[mid] = None
            self._ack_up([mid])
            return
        flags = message.flags | MessageFlags.RELIABLE
        forwarded = Message(message.kind, mid, message.body, flags, message.request_id)
        if self.link.send(forwarded):
            self._from_cloud[mid] = message.request_id
            if message.kind is MessageKind.RESPONSE_TEXT:
                self.stats.cloud_answers += 1
                self._answered(message.request_id, "cloud")

    def _first_token(self, pending: _Pending) -> None:
        """Learn one first-token time: request at the gateway to first piece.

        Either may be known first: the gateway may hold its ack.
        """
        assert pending.uploaded_at is not None  # noqa: S101
        assert pending.cloud_answered_at is not None  # noqa: S101
        self.estimators.first_token(
            pending.request.kind,
            max(0.0, pending.cloud_answered_at - pending.uploaded_at),
        )

    def _cloud_piece(self, message: Message) -> bool:
        """Learn from a piece of a cloud answer; whether to show it."""
        pending = self._pending.get(message.request_id)
        if pending is None:
            return True
        now = time.monotonic()
        if pending.cloud_answered_at is None:
            pending.cloud_answered_at = now
            if pending.uploaded_at is not None:
                self._first_token(pending)
        with contextlib.suppress(RemoteProtocolError):
            pending.cloud_text.append(ResponseText.decode(message.body).text)
        if message.flags & MessageFlags.FINAL and pending.cloud_text:
            self.skills.remember(pending.request, "".join(pending.cloud_text), now)
        return not pending.local_sent or self.config.policy.late_cloud_follows

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
        self._spawn(self.cloud.send_direct(message))

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Run every component until cancelled.

        With a capture ring, a component's failure and an exception leaving
        here first write the ring to a file (relay/capture_ring.py).
        """
        ring = self.capture
        sup = functools.partial(
            supervise,
            restarts=self.stats.restarts,
            on_failure=None if ring is None else ring.write_after_crash,
        )
        try:
            async with asyncio.TaskGroup() as group:
                for index, manager in enumerate(self.links):
                    name = "glasses link" if index == 0 else f"glasses link {index + 1}"
                    group.create_task(sup(name, manager.run))
                group.create_task(sup("intake", self._intake))
                group.create_task(sup("cloud", self.cloud.run))
                group.create_task(sup("outbox stats", self._refresh_outbox_stats))
        except Exception:
            if ring is not None:
                await ring.write_after_crash("the daemon", final=True)
            raise

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
                "unwritten": box.unwritten if box else 0,
                "acked_unwritten": box.acked_unwritten if box else 0,
                "refused_full": self.stats.refused_full,
            },
            "router": self._router_status(),
            "requests": [self._trace_json(t) for t in list(self.traces.values())[-50:]],
            "capture": None if self.capture is None else self.capture.stats(),
            "counters": {
                "messages_in": self.stats.messages_in,
                "acked_to_glasses": self.stats.acked_to_glasses,
                "local_answers": self.stats.local_answers,
                "cloud_answers": self.stats.cloud_answers,
                "restarts": dict(self.stats.restarts),
            },
        }

    def _router_status(self) -> dict[str, object]:
        now = time.monotonic()
        est = self.estimators
        idle = est.radio_idle_s(now)
        return {
            "strategy": self.config.strategy.value,
            "deadline_ms": self.config.policy.deadline_ms,
            "requests": self.stats.requests,
            "routes": dict(self.stats.routes),
            "hedges": self.stats.hedges,
            "local_fallbacks": self.stats.local_fallbacks,
            "estimates": {
                "rtt_ms": round(est.rtt_s(now) * 1000, 1),
                "uplink_kBps": round(est.uplink_bps(now) / 1000, 1),
                "ble_kBps": round(est.ble.bps() / 1000, 1),
                "radio_idle_s": None if idle == float("inf") else round(idle, 1),
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
            "answered_by": trace.answered_by,
            "hedged": trace.hedged,
            "predicted_ms": {
                "local": None
                if trace.predicted_local_s is None
                else round(trace.predicted_local_s * 1000),
                "cloud": None
                if trace.predicted_cloud_s is None
                else round(trace.predicted_cloud_s * 1000),
            },
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
