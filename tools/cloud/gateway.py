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
   ``ack_delay_s`` and at most one per ``ack_interval_s`` per device unless
   ``ack_max_ids`` are waiting, signed with how long each id was held
   (:func:`protocol.envelope.sign_ack`, sequence increasing) and sent down.

Answers stream down piece by piece as RESPONSE_TEXT downlink envelopes
(:class:`~tools.cloud.downlink.Answers`), kept until the phone's ACK and
resent on a timer, or at once when the device comes back.

Answers are durable and exactly-once in effect across restarts and
take-overs by other gateways: see :mod:`tools.cloud.downlink`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from protocol.bodies import (
    Ack,
    AudioChunk,
    PhotoChunk,
    Presence,
    Request,
)
from protocol.cloud import decode_batch, encode_batch
from protocol.constants import MessageFlags, MessageKind
from protocol.envelope import (
    MAX_ACK_HELD_US,
    MAX_ACK_IDS,
    EpochKeyCache,
    GatewayKeys,
    UnknownKeyIdError,
    open_uplink,
    sign_ack,
)
from protocol.errors import RemoteProtocolError
from protocol.message import Message, decode_messages
from tools.cloud.assistant import AssembledRequest, Assistant
from tools.cloud.config import GatewayConfig
from tools.cloud.downlink import Answers, DownlinkTracker, assembled_request
from tools.cloud.keys import KID
from tools.cloud.ledger import Ledger
from tools.cloud.registry import DeviceRegistry, KnownDevice
from tools.cloud.stats import GatewayStats
from tools.cloud.store import (
    Admission,
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

    async def send(
        self, pseudonym: str, payload: bytes, *, reliable: bool = True
    ) -> bool:
        """Send one payload to the device's ``down`` channel, bounded in time.

        ``reliable=False`` (acknowledgements) lets the transport drop it on
        the way (MQTT QoS 0): a lost acknowledgement costs a resend, which is
        acknowledged again.

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
    last_ack: float = -float("inf")


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


@dataclass(slots=True)
class _OpenResult:
    """What opening one batch of payloads gave."""

    messages: list[tuple[KnownDevice, Message]] = field(default_factory=list)
    drops: collections.Counter[str] = field(default_factory=collections.Counter)
    heard: list[tuple[KnownDevice, str]] = field(default_factory=list)
    opened: int = 0


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
        self._epochs = EpochKeyCache(config.epoch_cache)  # worker thread only
        self._registry = registry
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self.stats = GatewayStats()
        self._sinks: list[DownlinkSink] = []
        self._queue: asyncio.Queue[_Incoming] = asyncio.Queue(config.max_queue)
        self._states: dict[str, _DeviceState] = {}
        self._acks: dict[str, tuple[KnownDevice, list[tuple[bytes, float]]]] = {}
        """Per device: ids to acknowledge, with when each was processed."""
        self._ack_ready = asyncio.Event()
        self._ack_sequence = 0
        self._answers = Answers(
            config,
            keys=keys,
            registry=registry,
            store=store,
            assistant=assistant,
            ledger=ledger,
            stats=self.stats,
            send=self._send_down,
            paused=self._paused,
            clock=clock,
        )
        self._drop_logged: dict[str, float] = {}

    @property
    def tracker(self) -> DownlinkTracker:
        """Answer pieces awaiting the phone's ACK."""
        return self._answers.tracker

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
            self._answers.device_back(pseudonym, steal=True)  # only we reach it
        elif state.route == via:
            state.online = False

    async def run(self) -> None:
        """Run the worker, the acknowledger and the answers until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._work_loop(), name="gateway-worker")
            group.create_task(self._ack_loop(), name="gateway-acks")
            group.create_task(self._answers.run(), name="gateway-answers")

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
                epochs=self._epochs,
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
            self._answers.device_back(device.pseudonym, steal=False)

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
        self._answers.acked(device.pseudonym, ids)
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
                if rid == 0 and not alone:
                    item.refused = True
                else:  # alone: complete at once (and owed, like any other)
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
            verdicts = await self._store.admit(entries, owner=self._answers.owner)
        except StoreUnavailableError as exc:
            self._drop("store_unavailable", len(entries))
            logger.debug("store unavailable: %s", exc)
            return
        new_ids: list[bytes] = []
        answers: list[tuple[KnownDevice, AssembledRequest]] = []
        cancels: list[tuple[KnownDevice, int]] = []
        for item, verdict in zip(pending, verdicts, strict=True):
            if verdict.outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
            else:
                self.stats.processed += 1
                new_ids.append(item.message.message_id)
                complete = self._process_new(item, verdict, cancels)
                if complete is not None:
                    answers.append((item.device, complete))
        for device, request_id in cancels:
            await self._answers.cancel(device, request_id)
        if self._ledger is not None:
            await self._ledger.record("processed", new_ids)
        # Only now, after the ledger line: acknowledge new ids and duplicates.
        for item in pending:
            self._queue_ack(item.device, item.message.message_id)
        self._ack_ready.set()
        for device, request in answers:
            await self._answers.start(device, request)

    def _process_new(
        self,
        item: _Pending,
        verdict: Admission,
        cancels: list[tuple[KnownDevice, int]],
    ) -> AssembledRequest | None:
        """Process a new message; return the request it completed, if any."""
        if item.refused or verdict.outcome is Outcome.REFUSED:
            self.stats.refused += 1
            return None
        message = item.message
        if message.kind is MessageKind.PRESENCE:
            self._on_presence(item.device, Presence.decode(message.body))
        elif message.kind is MessageKind.CANCEL and message.request_id:
            cancels.append((item.device, message.request_id))
        if verdict.assembled is None:
            return None
        try:
            return assembled_request(verdict.assembled)
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
            self._answers.device_back(device.pseudonym, steal=False)

    # -- acknowledgements ---------------------------------------------------------

    def _queue_ack(self, device: KnownDevice, message_id: bytes) -> None:
        entry = (message_id, time.monotonic())
        self._acks.setdefault(device.pseudonym, (device, []))[1].append(entry)

    def _next_sequence(self) -> int:
        self._ack_sequence = max(self._ack_sequence + 1, time.time_ns() // 1000)
        return self._ack_sequence

    async def _ack_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.ack_interval_s
        wake: asyncio.TimerHandle | None = None
        while True:
            await self._ack_ready.wait()
            if self._config.ack_delay_s:
                await asyncio.sleep(self._config.ack_delay_s)
            self._ack_ready.clear()
            now = loop.time()
            due: list[tuple[KnownDevice, list[tuple[bytes, float]]]] = []
            later: float | None = None
            for pseudonym, (_, ids) in list(self._acks.items()):
                state = self._state(pseudonym)
                at = state.last_ack + interval
                if at <= now or len(ids) >= self._config.ack_max_ids:
                    due.append(self._acks.pop(pseudonym))
                    state.last_ack = now
                elif later is None or at < later:
                    later = at
            # One timer, for the earliest device held back.
            if wake is not None:
                wake.cancel()
            wake = None if later is None else loop.call_at(later, self._ack_ready.set)
            if due:
                async with asyncio.TaskGroup() as group:
                    for device, ids in due:
                        group.create_task(self._send_acks(device, ids))

    async def _send_acks(
        self, device: KnownDevice, entries: list[tuple[bytes, float]]
    ) -> None:
        # An id processed twice (a resend) is held from its latest processing.
        processed = dict(entries)
        unique = list(processed)
        now = time.monotonic()
        held = [
            min(MAX_ACK_HELD_US, max(0, round((now - processed[mid]) * 1e6)))
            for mid in unique
        ]
        acks = [
            sign_ack(
                unique[start : start + MAX_ACK_IDS],
                held_us=held[start : start + MAX_ACK_IDS],
                topic=device.channels.down,
                device_id=device.device_id,
                kid=KID,
                sequence=self._next_sequence(),
                gateway=self._keys,
            )
            for start in range(0, len(unique), MAX_ACK_IDS)
        ]
        if await self._send_down(device, encode_batch(acks), reliable=False):
            self.stats.acks_sent += len(acks)
            self.stats.acked_ids += len(unique)
        else:
            self.stats.acks_unsent += len(acks)

    async def _send_down(
        self, device: KnownDevice, payload: bytes, *, reliable: bool = True
    ) -> bool:
        route = self._state(device.pseudonym).route
        sinks = sorted(self._sinks, key=lambda sink: sink.name != route)
        for sink in sinks:
            if sink.reachable(device.pseudonym) and await sink.send(
                device.pseudonym, payload, reliable=reliable
            ):
                return True
        return False

    def _paused(self, pseudonym: str) -> bool:
        return self._state(pseudonym).online is False
