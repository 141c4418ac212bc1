"""The gateway's core, independent of the transports (docs/cloud.md).

Transports hand in what arrives on a device's ``up`` or ``presence`` channel
(:meth:`Gateway.submit`, which waits while the queue is full: backpressure)
and take out what goes down (:class:`DownlinkSink`). A two-stage worker
takes the queued payloads in batches of up to ``max_batch``, opens one batch
in a worker thread (the cryptography releases the GIL) while the event loop
admits the previous one, and for each uplink envelope:

1. opens it with the device's registered keys (failures are dropped and
   counted by reason: ``unknown_device``, ``bad_batch``, ``bad_envelope``,
   ``unknown_kid``, ``bad_message``);
2. an ACK message from the phone stops the resending of the answer pieces it
   names; nothing else happens to it;
3. any other message is admitted to the idempotency store (set-if-absent,
   atomic with storing its part of a request), which says new or duplicate;
4. new ones are processed: PRESENCE updates the device's state, a request
   completed by this part is answered; each new id gets a ``processed``
   ledger line;
5. new and duplicate ids alike are acknowledged: gathered per device for
   ``ack_delay_s``, signed (:func:`protocol.envelope.sign_ack`, sequence
   increasing) and sent down.

Answers stream down piece by piece as RESPONSE_TEXT downlink envelopes, kept
by a :class:`~tools.cloud.downlink.DownlinkTracker` until the phone's ACK and
resent on its timer, or at once when the device comes back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from protocol.bodies import (
    Ack,
    AudioChunk,
    PhotoChunk,
    Presence,
    Request,
    ResponseText,
)
from protocol.cloud import MAX_BATCH_ITEMS, decode_batch, encode_batch
from protocol.constants import MessageFlags, MessageKind
from protocol.envelope import (
    MAX_ACK_IDS,
    GatewayKeys,
    UnknownKeyIdError,
    open_uplink,
    seal_downlink,
    sign_ack,
)
from protocol.errors import RemoteProtocolError
from protocol.message import Message, decode_messages
from tools.cloud.assistant import AssembledRequest, Assistant
from tools.cloud.config import GatewayConfig
from tools.cloud.downlink import DownlinkTracker
from tools.cloud.keys import KID
from tools.cloud.ledger import Ledger
from tools.cloud.registry import DeviceRegistry, KnownDevice
from tools.cloud.stats import GatewayStats
from tools.cloud.store import (
    Admission,
    Assembled,
    Entry,
    IdempotencyStore,
    Outcome,
    Part,
    PartKind,
    StoreUnavailableError,
)

__all__ = ["Channel", "DownlinkSink", "Gateway", "GatewayStats"]

logger = logging.getLogger(__name__)

Channel = Literal["up", "presence"]
DROP_LOG_EVERY_S: Final = 10.0
APOLOGY: Final = "Sorry, I cannot answer that right now."
_BACKLOG_PER_SLOT: Final = 4
"""Answers waiting for a slot, per slot, before the worker waits too."""
_OPENED_BATCHES: Final = 2
"""Opened batches waiting for admission (the pipeline's depth)."""
_CHUNK_KINDS: Final = {
    MessageKind.AUDIO_CHUNK: PartKind.AUDIO,
    MessageKind.PHOTO_CHUNK: PartKind.PHOTO,
}


class DownlinkSink(Protocol):
    """A transport that carries payloads down to devices."""

    @property
    def name(self) -> str:
        """The transport's name (``mqtt``, ``ws``)."""
        ...

    def reachable(self, pseudonym: str) -> bool:
        """Whether a send to ``pseudonym`` can go out now."""
        ...

    async def send(self, pseudonym: str, payload: bytes) -> bool:
        """Send one payload to the device's ``down`` channel, bounded in time.

        Returns:
            Whether the transport accepted it (never raises for transport
            failures: what is not acknowledged is resent later).
        """
        ...


@dataclass(slots=True)
class _DeviceState:
    online: bool | None = None
    presence_t_us: int = -1
    last_uplink: float = -float("inf")
    route: str | None = None


@dataclass(frozen=True, slots=True)
class _Incoming:
    pseudonym: str
    channel: Channel
    payload: bytes
    via: str


@dataclass(slots=True)
class _Pending:
    """An opened non-ACK message waiting for the store's verdict."""

    device: KnownDevice
    message: Message
    refused: bool = False
    direct: AssembledRequest | None = None


@dataclass(slots=True)
class _OpenResult:
    """What opening one batch of payloads gave."""

    messages: list[tuple[KnownDevice, Message]] = field(default_factory=list)
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    heard: list[tuple[KnownDevice, str]] = field(default_factory=list)
    opened: int = 0


class _End:
    """The assistant's stream ended."""


_END: Final = _End()


async def _next(stream: AsyncIterator[str]) -> str | _End:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


class Gateway:
    """The transport-independent gateway (module docstring).

    Args:
        config: The configuration.
        keys: The gateway's keys of epoch :data:`~tools.cloud.keys.KID`.
        registry: Registered devices.
        store: The idempotency store.
        assistant: The assistant backend.
        ledger: Where events are recorded, or None.
        clock: Monotonic clock, seconds.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        keys: GatewayKeys,
        registry: DeviceRegistry,
        store: IdempotencyStore,
        assistant: Assistant,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the core; :meth:`run` starts its tasks."""
        self._config = config
        self._keys = keys
        self._key_map = {KID: keys}
        self._registry = registry
        self._store = store
        self._assistant = assistant
        self._ledger = ledger
        self._clock = clock
        self.stats = GatewayStats()
        self._sinks: list[DownlinkSink] = []
        self._queue: asyncio.Queue[_Incoming] = asyncio.Queue(config.max_queue)
        self._states: dict[str, _DeviceState] = {}
        self._acks: dict[str, tuple[KnownDevice, list[bytes]]] = {}
        self._ack_ready = asyncio.Event()
        self._ack_sequence = 0
        self._tracker = DownlinkTracker(
            initial_s=config.resend_initial_s,
            cap_s=config.resend_cap_s,
            ttl_s=config.downlink_ttl_s,
            max_per_device=config.max_pending_downlink,
        )
        self._resend_wake = asyncio.Event()
        self._answer_slots = asyncio.Semaphore(config.max_answers)
        self._answer_backlog = asyncio.Semaphore(_BACKLOG_PER_SLOT * config.max_answers)
        self._answering: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._drop_logged: dict[str, float] = {}

    @property
    def tracker(self) -> DownlinkTracker:
        """Answer pieces awaiting the phone's ACK."""
        return self._tracker

    def attach(self, sink: DownlinkSink) -> None:
        """Add a transport for downlinks (before :meth:`run`)."""
        self._sinks.append(sink)

    async def submit(
        self, pseudonym: str, channel: Channel, payload: bytes, via: str
    ) -> None:
        """Queue a payload that arrived on ``pseudonym``'s channel.

        Call from the transport's receive loop; waits while the queue is full.
        """
        await self._queue.put(_Incoming(pseudonym, channel, payload, via))

    def connection_changed(self, pseudonym: str, *, online: bool, via: str) -> None:
        """A transport saw the device connect (WebSocket open) or go away."""
        state = self._state(pseudonym)
        if online:
            state.online = True
            state.route = via
            self._kick(pseudonym)
        elif state.route == via:
            state.online = False

    async def run(self) -> None:
        """Run the worker, the acknowledger and the resend timer until cancelled."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._work_loop(), name="gateway-worker")
            group.create_task(self._ack_loop(), name="gateway-acks")
            group.create_task(self._resend_loop(), name="gateway-resends")

    # -- uplink -------------------------------------------------------------------

    def _state(self, pseudonym: str) -> _DeviceState:
        state = self._states.get(pseudonym)
        if state is None:
            state = self._states[pseudonym] = _DeviceState()
        return state

    def _drop(self, reason: str, count: int = 1) -> None:
        self.stats.drops[reason] += count
        now = self._clock()
        if now - self._drop_logged.get(reason, -DROP_LOG_EVERY_S) >= DROP_LOG_EVERY_S:
            self._drop_logged[reason] = now
            logger.warning(
                "dropped uplink items (%s): %d so far", reason, self.stats.drops[reason]
            )

    async def _work_loop(self) -> None:
        """Two stages: open batches (in a thread), then admit them, in order.

        The cryptography of one batch runs in a worker thread (it releases
        the GIL) while the event loop admits and acknowledges the previous.
        """
        opened: asyncio.Queue[list[tuple[KnownDevice, Message]]] = asyncio.Queue(
            _OPENED_BATCHES
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(self._open_loop(opened), name="gateway-open")
            group.create_task(self._admit_loop(opened), name="gateway-admit")

    async def _open_loop(
        self, out: asyncio.Queue[list[tuple[KnownDevice, Message]]]
    ) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._config.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            known: list[tuple[KnownDevice, _Incoming]] = []
            for item in batch:
                device = await self._registry.lookup(item.pseudonym)
                if device is None:
                    self._drop("unknown_device")
                else:
                    known.append((device, item))
            if not known:
                continue
            result = await asyncio.to_thread(self._open_batch, known)
            for reason, count in result.drops.items():
                self._drop(reason, count)
            self.stats.opened += result.opened
            for device, via in result.heard:
                self._heard(device, via)
            if result.messages:
                await out.put(result.messages)

    def _open_batch(self, batch: list[tuple[KnownDevice, _Incoming]]) -> _OpenResult:
        """Open every envelope of ``batch``; pure CPU, run in a worker thread."""
        result = _OpenResult()
        for device, item in batch:
            try:
                envelopes = decode_batch(item.payload)
            except RemoteProtocolError:
                result.drops["bad_batch"] += 1
                continue
            channels = device.channels
            topic = channels.up if item.channel == "up" else channels.presence
            before = len(result.messages)
            for envelope in envelopes:
                reason = self._open(device, topic, envelope, result.messages)
                if reason is None:
                    result.opened += 1
                else:
                    result.drops[reason] += 1
            if len(result.messages) > before:  # only an authentic envelope counts
                result.heard.append((device, item.via))
        return result

    def _open(
        self,
        device: KnownDevice,
        topic: str,
        envelope: bytes,
        out: list[tuple[KnownDevice, Message]],
    ) -> str | None:
        """Open one envelope into ``out``; return why it was dropped, if it was."""
        try:
            plaintext = open_uplink(
                envelope,
                topic=topic,
                device_id=device.device_id,
                gateway_keys=self._key_map,
                device=device.public,
            )
        except UnknownKeyIdError:
            return "unknown_kid"
        except RemoteProtocolError:
            return "bad_envelope"
        try:
            messages = decode_messages(plaintext)
        except RemoteProtocolError:
            return "bad_message"
        out.extend((device, message) for message in messages)
        return None

    async def _admit_loop(
        self, opened: asyncio.Queue[list[tuple[KnownDevice, Message]]]
    ) -> None:
        while True:
            batch = await opened.get()
            pending: list[_Pending] = []
            phone_acks: dict[str, tuple[KnownDevice, list[bytes]]] = {}
            for device, message in batch:
                if message.kind is MessageKind.ACK:
                    self._on_phone_ack(device, message, phone_acks)
                else:
                    pending.append(_Pending(device, message))
            await self._share_phone_acks(phone_acks)
            if pending:
                await self._admit(pending)

    def _heard(self, device: KnownDevice, via: str) -> None:
        """Note an uplink: it proves the device online; after silence, resend."""
        state = self._state(device.pseudonym)
        now = self._clock()
        silent = now - state.last_uplink >= self._config.silence_s
        state.last_uplink = now
        state.route = via
        if silent or state.online is False:
            state.online = True
            self._kick(device.pseudonym)

    def _on_phone_ack(
        self,
        device: KnownDevice,
        message: Message,
        shared: dict[str, tuple[KnownDevice, list[bytes]]],
    ) -> None:
        try:
            ids = Ack.decode(message.body).ids
        except RemoteProtocolError:
            self._drop("bad_message")
            return
        self.stats.downlink_acked += self._tracker.acked(device.pseudonym, ids)
        shared.setdefault(device.pseudonym, (device, []))[1].extend(ids)

    async def _share_phone_acks(
        self, acks: dict[str, tuple[KnownDevice, list[bytes]]]
    ) -> None:
        """Tell the other gateways (through the store) what the phone ACKed."""
        for device, ids in acks.values():
            try:
                await self._store.mark_downlink_acked(device.device_id, ids)
            except StoreUnavailableError as exc:
                logger.debug("could not share downlink ACKs: %s", exc)

    def _entry(self, item: _Pending) -> Entry:
        """The store entry of a message, with its request part if it has one."""
        message = item.message
        part: Part | None = None
        rid = message.request_id
        try:
            if message.kind is MessageKind.REQUEST:
                request = Request.decode(message.body)
                alone = request.size == 0
                if rid == 0 and alone:
                    item.direct = AssembledRequest(message.message_id, 0, request)
                elif rid == 0:
                    item.refused = True
                else:
                    data = message.message_id + message.body
                    part = Part(rid, PartKind.REQUEST, -1, data, alone)
            elif (kind := _CHUNK_KINDS.get(message.kind)) is not None:
                decode = (
                    AudioChunk.decode if kind is PartKind.AUDIO else PhotoChunk.decode
                )
                chunk = decode(message.body)
                if rid == 0 or chunk.seq > self._config.max_chunk_index:
                    item.refused = True
                else:
                    final = bool(message.flags & MessageFlags.FINAL)
                    part = Part(rid, kind, chunk.seq, chunk.data, final)
            elif message.kind is MessageKind.PRESENCE:
                Presence.decode(message.body)
        except RemoteProtocolError:
            item.refused = True
        return Entry(item.device.device_id, message.message_id, part)

    async def _admit(self, pending: list[_Pending]) -> None:
        entries = [self._entry(item) for item in pending]
        try:
            verdicts = await self._store.admit(entries)
        except StoreUnavailableError as exc:
            self._drop("store_unavailable", len(entries))
            logger.debug("store unavailable: %s", exc)
            return
        new_ids: list[bytes] = []
        answers: list[tuple[KnownDevice, AssembledRequest]] = []
        for item, verdict in zip(pending, verdicts, strict=True):
            if verdict.outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.processed += 1
                new_ids.append(item.message.message_id)
                if (complete := self._process_new(item, verdict)) is not None:
                    answers.append((item.device, complete))
        if self._ledger is not None:
            await self._ledger.record("processed", new_ids)
        # Only now, after the ledger line: acknowledge new ids and duplicates.
        for item in pending:
            self._queue_ack(item.device, item.message.message_id)
        self._ack_ready.set()
        for device, request in answers:
            await self._start_answer(device, request)

    def _process_new(
        self, item: _Pending, verdict: Admission
    ) -> AssembledRequest | None:
        """Process a new message; return the request it completed, if any."""
        if item.refused or verdict.outcome is Outcome.REFUSED:
            self.stats.refused += 1
            return None
        message = item.message
        if message.kind is MessageKind.PRESENCE:
            self._on_presence(item.device, Presence.decode(message.body))
        elif message.kind is MessageKind.CANCEL:
            task = self._answering.get((item.device.pseudonym, message.request_id))
            if task is not None:
                task.cancel()
        if verdict.assembled is None:
            return item.direct
        try:
            return self._request(verdict.assembled)
        except RemoteProtocolError:
            self.stats.refused += 1
            return None

    def _on_presence(self, device: KnownDevice, presence: Presence) -> None:
        if presence.state not in ("online", "offline"):
            return
        state = self._state(device.pseudonym)
        if presence.t_us < state.presence_t_us:
            return  # an older presence delivered late (a last will)
        state.presence_t_us = presence.t_us
        state.online = presence.state == "online"
        self.stats.presence_updates += 1
        logger.info("device %s is %s", device.pseudonym, presence.state)
        if state.online:
            self._kick(device.pseudonym)

    # -- acknowledgements ---------------------------------------------------------

    def _queue_ack(self, device: KnownDevice, message_id: bytes) -> None:
        self._acks.setdefault(device.pseudonym, (device, []))[1].append(message_id)

    def _next_sequence(self) -> int:
        self._ack_sequence = max(self._ack_sequence + 1, time.time_ns() // 1000)
        return self._ack_sequence

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_ready.wait()
            if self._config.ack_delay_s:
                await asyncio.sleep(self._config.ack_delay_s)
            self._ack_ready.clear()
            pending, self._acks = self._acks, {}
            async with asyncio.TaskGroup() as group:
                for device, ids in pending.values():
                    group.create_task(self._send_acks(device, ids))

    async def _send_acks(self, device: KnownDevice, ids: list[bytes]) -> None:
        unique = list(dict.fromkeys(ids))
        acks = [
            sign_ack(
                unique[start : start + MAX_ACK_IDS],
                topic=device.channels.down,
                device_id=device.device_id,
                kid=KID,
                sequence=self._next_sequence(),
                gateway=self._keys,
            )
            for start in range(0, len(unique), MAX_ACK_IDS)
        ]
        if await self._send_down(device, encode_batch(acks)):
            self.stats.acks_sent += len(acks)
            self.stats.acked_ids += len(unique)
        else:
            self.stats.acks_unsent += len(acks)

    async def _send_down(self, device: KnownDevice, payload: bytes) -> bool:
        route = self._state(device.pseudonym).route
        sinks = sorted(self._sinks, key=lambda sink: sink.name != route)
        for sink in sinks:
            if sink.reachable(device.pseudonym) and await sink.send(
                device.pseudonym, payload
            ):
                return True
        return False

    # -- answers ----------------------------------------------------------------

    def _request(self, assembled: Assembled) -> AssembledRequest:
        return AssembledRequest(
            assembled.message_id,
            assembled.request_id,
            Request.decode(assembled.body),
            audio=assembled.media if assembled.media_kind is PartKind.AUDIO else b"",
            photo=assembled.media if assembled.media_kind is PartKind.PHOTO else b"",
        )

    async def _start_answer(
        self, device: KnownDevice, request: AssembledRequest
    ) -> None:
        """Start answering; waits while ``4 * max_answers`` answers are pending."""
        if self._group is None:
            raise RuntimeError("gateway not running")
        await self._answer_backlog.acquire()
        key = (device.pseudonym, request.request_id)
        task = self._group.create_task(
            self._answer(device, request), name=f"answer-{device.pseudonym}"
        )
        task.add_done_callback(lambda _: self._answer_backlog.release())
        if request.request_id:
            self._answering[key] = task
            task.add_done_callback(lambda done: self._forget_answer(key, done))

    def _forget_answer(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._answering.get(key) is task:
            del self._answering[key]

    async def _answer(self, device: KnownDevice, request: AssembledRequest) -> None:
        """Stream the assistant's answer down; the last piece carries FINAL.

        Each piece is held up to ``answer_hold_s`` for the next one, so that
        the piece the stream ends after can be marked FINAL; if the stream
        ends later than that, an empty FINAL piece closes the answer.
        """
        async with self._answer_slots:
            stream = self._assistant.answer(request)
            held: str | None = None
            seq = 0
            failed = False
            try:
                while True:
                    step = asyncio.create_task(_next(stream))
                    try:
                        if held is not None and not await self._within_hold(step):
                            await self._send_piece(device, request, seq, held)
                            seq, held = seq + 1, None
                        try:
                            piece = await step
                        except Exception:  # noqa: BLE001 - the backend failed: apologise
                            failed, piece = True, _END
                    finally:
                        if not step.done():
                            step.cancel()
                            await asyncio.wait((step,))
                    if isinstance(piece, _End):
                        break
                    if held is not None:
                        await self._send_piece(device, request, seq, held)
                        seq += 1
                    held = piece
            finally:
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    await closer()
            if failed:
                self.stats.assistant_errors += 1
                logger.warning(
                    "assistant %s failed on a request from %s",
                    self._assistant.name,
                    device.pseudonym,
                )
                if held is not None:
                    await self._send_piece(device, request, seq, held)
                    seq += 1
                held = APOLOGY
            elif held is None and seq == 0:
                held = APOLOGY
            await self._send_piece(device, request, seq, held or "", final=True)
        self.stats.responses += 1
        if self._ledger is not None:
            await self._ledger.record("response", [request.message_id])

    async def _within_hold(self, step: asyncio.Task[str | _End]) -> bool:
        """Whether the next piece arrives within the hold time."""
        done, _ = await asyncio.wait((step,), timeout=self._config.answer_hold_s)
        return bool(done)

    async def _send_piece(
        self,
        device: KnownDevice,
        request: AssembledRequest,
        seq: int,
        text: str,
        *,
        final: bool = False,
    ) -> None:
        flags = MessageFlags.RELIABLE
        if final:
            flags |= MessageFlags.FINAL
        message = Message(
            MessageKind.RESPONSE_TEXT,
            os.urandom(16),
            ResponseText(seq, text, route="cloud").encode(),
            flags,
            request.request_id,
        )
        envelope = seal_downlink(
            message.encode(),
            topic=device.channels.down,
            device_id=device.device_id,
            kid=KID,
            gateway=self._keys,
            device=device.public,
        )
        tracker = self._tracker
        tracker.track(device.pseudonym, message.message_id, envelope, self._clock())
        self.stats.downlink_dropped = tracker.dropped_overflow + tracker.dropped_expired
        self._resend_wake.set()
        self.stats.pieces_sent += 1
        await self._send_down(device, encode_batch([envelope]))

    # -- resends ------------------------------------------------------------------

    def _kick(self, pseudonym: str) -> None:
        if self._tracker.kick(pseudonym, self._clock()):
            self._resend_wake.set()

    def _paused(self, pseudonym: str) -> bool:
        return self._state(pseudonym).online is False

    async def _resend_loop(self) -> None:
        while True:
            self._resend_wake.clear()
            due = self._tracker.next_due()
            delay = None if due is None else max(0.0, due - self._clock())
            try:
                async with asyncio.timeout(delay):
                    await self._resend_wake.wait()
                continue
            except TimeoutError:
                pass
            tracker = self._tracker
            batches = tracker.take_due(self._clock(), paused=self._paused)
            self.stats.downlink_dropped = (
                tracker.dropped_overflow + tracker.dropped_expired
            )
            async with asyncio.TaskGroup() as group:
                for pseudonym, pieces in batches.items():
                    group.create_task(self._resend(pseudonym, pieces))

    async def _resend(self, pseudonym: str, pieces: list[tuple[bytes, bytes]]) -> None:
        device = self._registry.get(pseudonym)
        if device is None:
            return
        try:
            acked = await self._store.downlink_acked(
                device.device_id, [mid for mid, _ in pieces]
            )
        except StoreUnavailableError:
            acked = set()
        if acked:
            self.stats.downlink_acked += self._tracker.acked(pseudonym, acked)
        envelopes = [envelope for mid, envelope in pieces if mid not in acked]
        for start in range(0, len(envelopes), MAX_BATCH_ITEMS):
            part = envelopes[start : start + MAX_BATCH_ITEMS]
            if await self._send_down(device, encode_batch(part)):
                self.stats.resends += len(part)
