"""Answers going down: produced, saved, sent, resent until ACKed, taken over.

docs/cloud.md §Delivery 5: the gateway keeps every downlink envelope until an
ACK message from the phone names its message id, and resends the identical
bytes on a backed-off timer: ``initial_s``, then doubling up to ``cap_s``,
each delay jittered by ±10 %. :meth:`DownlinkTracker.kick` makes a device's
pieces due at once (its presence says online, or it spoke after a silence).
:class:`DownlinkTracker` is sans-I/O: the caller passes ``now`` (monotonic
seconds) and sends what :meth:`DownlinkTracker.take_due` returns. Limits:
``max_per_device`` pieces per device in memory (beyond, the oldest leaves the
tracker, counted, and the device is marked in :attr:`DownlinkTracker.evicted`:
its pieces are still saved, and :class:`Answers` loads them again from the
store once the device has acknowledged its way back to half the limit); a
piece older than ``ttl_s`` is dropped and counted.

:class:`Answers` drives it, and makes answers durable (:mod:`tools.cloud.store`,
"answers owed"). The store keeps each completed request as an answer owed in
the same atomic step that admits its last part, so before its signed ack;
each piece is saved (message id, FINAL flag, sealed envelope: one write,
set-if-absent per index) before it is sent, so the first piece goes down as
soon as it exists. A gateway that restarts, that a device connects to
(WebSocket: it takes the device's answers over), that hears a device after a
silence or a presence online (it takes over what dead gateways owed it), or
that sees another gateway's heartbeat expire (renewed every
:data:`LEASE_RENEW_S`, dead after :data:`LEASE_S`), claims those answers: it
resends the saved pieces not acknowledged, with their message ids, on the
resend timer, and for an answer whose FINAL piece is not saved it asks the
assistant again. The built-in assistant is deterministic per request, so
piece ``i`` of the new stream is piece ``i`` of the old one: saved indexes go
down as saved (or not at all once acknowledged), only later ones are new. A
non-deterministic backend may word the rest differently, but every index
still goes down under one message id, and exactly one piece is FINAL. A
gateway that lost an answer stops at its next save. The ``response`` ledger
line is claimed in the store, so it is written once.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import os
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from protocol.bodies import Request, ResponseText
from protocol.cloud import MAX_BATCH_ITEMS, encode_batch, pseudonym_for
from protocol.constants import MessageFlags, MessageKind
from protocol.envelope import GatewayKeys, seal_downlink
from protocol.errors import RemoteProtocolError
from protocol.message import Message
from tools.cloud.assistant import AssembledRequest, Assistant
from tools.cloud.config import GatewayConfig
from tools.cloud.keys import KID
from tools.cloud.ledger import Ledger
from tools.cloud.registry import DeviceRegistry, KnownDevice
from tools.cloud.stats import GatewayStats
from tools.cloud.store import (
    Assembled,
    IdempotencyStore,
    OwedAnswer,
    PartKind,
    StoredPiece,
    StoreUnavailableError,
)

__all__ = [
    "APOLOGY",
    "CLAIM_BATCH",
    "LEASE_RENEW_S",
    "LEASE_S",
    "Answers",
    "DownlinkTracker",
    "assembled_request",
]

logger = logging.getLogger(__name__)

_JITTER: Final = 0.1
_MAX_EXPONENT: Final = 32
APOLOGY: Final = "Sorry, I cannot answer that right now."
LEASE_S: Final = 5.0
"""A gateway that has not renewed its heartbeat for this long is dead, and
the answers it owed are taken over (a stall this long hands them over too:
harmless, the stalled one stops at its next save)."""
LEASE_RENEW_S: Final = 1.0
"""How often the heartbeat is renewed and dead gateways' answers looked for."""
CLAIM_BATCH: Final = 64
"""Answers taken over from dead gateways at once."""
STORE_LOG_EVERY_S: Final = 10.0
_BACKLOG_PER_SLOT: Final = 4
"""Answers waiting for a slot, per slot, before the caller waits too."""


@dataclass(slots=True)
class _Pending:
    envelope: bytes
    created: float
    due: float
    attempt: int


class DownlinkTracker:
    """Unacknowledged downlink envelopes per device (module docstring).

    Args:
        initial_s: First resend delay.
        cap_s: Largest resend delay.
        ttl_s: A piece is dropped once this old.
        max_per_device: Pieces kept per device.
        rng: Jitter source.
    """

    def __init__(
        self,
        *,
        initial_s: float,
        cap_s: float,
        ttl_s: float,
        max_per_device: int,
        rng: random.Random | None = None,
    ) -> None:
        """Create an empty tracker."""
        self._initial_s = initial_s
        self._cap_s = cap_s
        self._ttl_s = ttl_s
        self._max = max_per_device
        self._rng = rng or random.Random()
        self._pending: dict[str, OrderedDict[bytes, _Pending]] = {}
        self._heap: list[tuple[float, int, str, bytes]] = []
        self._order = itertools.count()
        self.dropped_overflow = 0
        self.dropped_expired = 0
        self.evicted: set[str] = set()
        """Devices whose pieces went over ``max_per_device`` since last reloaded."""

    def __len__(self) -> int:
        """Pieces pending, all devices together."""
        return sum(len(pieces) for pieces in self._pending.values())

    def count(self, pseudonym: str) -> int:
        """How many pieces are pending for ``pseudonym``."""
        return len(self._pending.get(pseudonym, ()))

    def pending(self, pseudonym: str) -> list[bytes]:
        """The message ids pending for ``pseudonym``, oldest first."""
        return list(self._pending.get(pseudonym, ()))

    def is_pending(self, pseudonym: str, message_id: bytes) -> bool:
        """Whether ``message_id`` is kept for ``pseudonym``."""
        return message_id in self._pending.get(pseudonym, ())

    def track(
        self, pseudonym: str, message_id: bytes, envelope: bytes, now: float
    ) -> None:
        """Keep ``envelope`` (just sent) until :meth:`acked`; schedule its resend."""
        pieces = self._pending.setdefault(pseudonym, OrderedDict())
        while len(pieces) >= self._max:
            pieces.popitem(last=False)
            self.dropped_overflow += 1
            self.evicted.add(pseudonym)
        entry = _Pending(envelope, now, now + self._delay(0), 0)
        pieces[message_id] = entry
        self._push(entry.due, pseudonym, message_id)

    def acked(self, pseudonym: str, ids: Iterable[bytes]) -> int:
        """Forget the pieces the phone acknowledged; return how many were pending."""
        pieces = self._pending.get(pseudonym)
        if not pieces:
            return 0
        removed = sum(pieces.pop(mid, None) is not None for mid in ids)
        if not pieces:
            del self._pending[pseudonym]
        return removed

    def kick(self, pseudonym: str, now: float) -> int:
        """Make every piece of ``pseudonym`` due now; return how many."""
        pieces = self._pending.get(pseudonym)
        if not pieces:
            return 0
        for mid, entry in pieces.items():
            entry.due = now
            self._push(now, pseudonym, mid)
        return len(pieces)

    def next_due(self) -> float | None:
        """When the earliest piece is due, or None if nothing is pending."""
        while self._heap:
            due, _, pseudonym, mid = self._heap[0]
            pieces = self._pending.get(pseudonym)
            entry = pieces.get(mid) if pieces else None
            if entry is not None and entry.due == due:
                return due
            heapq.heappop(self._heap)  # acknowledged or rescheduled since
        return None

    def take_due(
        self, now: float, *, paused: Callable[[str], bool] = lambda _: False
    ) -> dict[str, list[tuple[bytes, bytes]]]:
        """Return ``{pseudonym: [(message id, envelope), ...]}`` due by ``now``.

        Each returned piece is rescheduled with the next, longer delay. A
        device for which ``paused`` is true (known offline) is skipped until
        the cap delay or a :meth:`kick`.
        """
        out: dict[str, list[tuple[bytes, bytes]]] = {}
        while (due := self.next_due()) is not None and due <= now:
            _, _, pseudonym, mid = heapq.heappop(self._heap)
            pieces = self._pending[pseudonym]
            entry = pieces[mid]
            if now - entry.created >= self._ttl_s:
                del pieces[mid]
                if not pieces:
                    del self._pending[pseudonym]
                self.dropped_expired += 1
                continue
            if paused(pseudonym):
                entry.due = now + self._cap_s
            else:
                entry.attempt += 1
                entry.due = now + self._delay(entry.attempt)
                out.setdefault(pseudonym, []).append((mid, entry.envelope))
            self._push(entry.due, pseudonym, mid)
        return out

    def _delay(self, attempt: int) -> float:
        base = min(self._cap_s, self._initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))
        return base * self._rng.uniform(1 - _JITTER, 1 + _JITTER)

    def _push(self, due: float, pseudonym: str, message_id: bytes) -> None:
        heapq.heappush(self._heap, (due, next(self._order), pseudonym, message_id))


def assembled_request(assembled: Assembled) -> AssembledRequest:
    """The assistant's view of a request the store assembled.

    Raises:
        RemoteProtocolError: its REQUEST body does not decode.
    """
    return AssembledRequest(
        assembled.message_id,
        assembled.request_id,
        Request.decode(assembled.body),
        audio=assembled.media if assembled.media_kind is PartKind.AUDIO else b"",
        photo=assembled.media if assembled.media_kind is PartKind.PHOTO else b"",
    )


class _Step(enum.Enum):
    """What putting a piece of an answer led to."""

    MORE = "more"
    """Sent (or skipped: acknowledged already): go on."""
    DONE = "done"
    """The FINAL piece is down: the answer is complete."""
    STOP = "stop"
    """Another gateway took the answer over, or it was cancelled."""


@dataclass(slots=True)
class _Run:
    """One answer being produced: the next index and the pieces saved before."""

    device: KnownDevice
    request: AssembledRequest
    saved: dict[int, StoredPiece]
    seq: int = 0


class _End:
    """The assistant's stream ended."""


_END: Final = _End()


async def _next(stream: AsyncIterator[str]) -> str | _End:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


Send = Callable[[KnownDevice, bytes], Awaitable[bool]]
"""Send a payload down to a device; whether a transport took it."""


class Answers:
    """The gateway's downlink side (module docstring).

    Args:
        config: The configuration.
        keys: The gateway's keys of epoch :data:`~tools.cloud.keys.KID`.
        registry: Registered devices.
        store: The idempotency store (answers owed live there).
        assistant: The assistant backend.
        ledger: Where ``response`` lines go, or None.
        stats: The gateway's counters, updated here.
        send: Sends a payload down (never raises for transport failures).
        paused: Whether a device is known offline (resends wait).
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
        ledger: Ledger | None,
        stats: GatewayStats,
        send: Send,
        paused: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the downlink side; :meth:`run` starts its tasks."""
        self._config = config
        self._keys = keys
        self._registry = registry
        self._store = store
        self._assistant = assistant
        self._ledger = ledger
        self._stats = stats
        self._send = send
        self._paused = paused
        self._clock = clock
        self.tracker = DownlinkTracker(
            initial_s=config.resend_initial_s,
            cap_s=config.resend_cap_s,
            ttl_s=config.downlink_ttl_s,
            max_per_device=config.max_pending_downlink,
        )
        self._resend_wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_answers)
        self._backlog = asyncio.Semaphore(_BACKLOG_PER_SLOT * config.max_answers)
        self._answering: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._answer_keys: set[tuple[str, bytes]] = set()
        self._resuming: set[str] = set()
        self._resume_again: dict[str, bool] = {}
        self._gid = secrets.token_hex(8)
        self._store_logged = -STORE_LOG_EVERY_S
        self._group: asyncio.TaskGroup | None = None

    @property
    def owner(self) -> str:
        """This gateway's id as an owner of answers owed (random per process)."""
        return self._gid

    async def run(self) -> None:
        """Run the resend timer, the heartbeat and take-overs until cancelled."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._resend_loop(), name="gateway-resends")
            group.create_task(self._lease_loop(), name="gateway-lease")
            group.create_task(self._takeover_loop(), name="gateway-takeover")

    def acked(self, pseudonym: str, ids: Iterable[bytes]) -> None:
        """The phone acknowledged these pieces (to this gateway): stop resending."""
        tracker = self.tracker
        self._stats.downlink_acked += tracker.acked(pseudonym, ids)
        self._reload_evicted(pseudonym)

    def _reload_evicted(self, pseudonym: str) -> None:
        """Load pieces the tracker let go (over its limit) again, once it has room."""
        tracker = self.tracker
        if (
            pseudonym in tracker.evicted
            and tracker.count(pseudonym) <= self._config.max_pending_downlink // 2
        ):
            tracker.evicted.discard(pseudonym)
            self._resume_owed(pseudonym, steal=False)

    def device_back(self, pseudonym: str, *, steal: bool) -> None:
        """The device is reachable again: resend now, and resume answers owed.

        Args:
            pseudonym: The device.
            steal: Take over its answers from live gateways too (it connected
                to this one: only this one reaches it).
        """
        if self.tracker.kick(pseudonym, self._clock()):
            self._resend_wake.set()
        self.tracker.evicted.discard(pseudonym)  # the resume loads them all
        self._resume_owed(pseudonym, steal=steal)

    def _resume_owed(self, pseudonym: str, *, steal: bool) -> None:
        """Load the device's answers owed from the store and go on with them."""
        if pseudonym in self._resuming:  # one task per device: run it again
            again = self._resume_again.get(pseudonym, False)
            self._resume_again[pseudonym] = steal or again
            return
        if self._group is None:
            return  # not running yet: take-overs cover it at start
        self._resuming.add(pseudonym)
        self._group.create_task(
            self._resume_device(pseudonym, steal), name=f"resume-{pseudonym}"
        )

    async def cancel(self, device: KnownDevice, request_id: int) -> None:
        """A CANCEL came: stop answering ``request_id`` here and everywhere."""
        task = self._answering.get((device.pseudonym, request_id))
        if task is not None:
            task.cancel()
        try:
            await self._store.cancel_answer(device.device_id, request_id)
        except StoreUnavailableError as exc:
            self._store_trouble("cancel an answer", exc)

    async def start(
        self,
        device: KnownDevice,
        request: AssembledRequest,
        saved: tuple[StoredPiece, ...] = (),
    ) -> None:
        """Start answering; waits while ``4 * max_answers`` answers are pending.

        Does nothing if this gateway is answering the request already.
        """
        if self._group is None:
            raise RuntimeError("gateway not running")
        owed = (device.pseudonym, request.message_id)
        if owed in self._answer_keys:
            return
        self._answer_keys.add(owed)
        try:
            await self._backlog.acquire()
        except BaseException:
            self._answer_keys.discard(owed)
            raise
        run = _Run(device, request, {piece.seq: piece for piece in saved})
        task = self._group.create_task(
            self._answer(run), name=f"answer-{device.pseudonym}"
        )
        task.add_done_callback(lambda _: self._answer_done(owed))
        if request.request_id:
            key = (device.pseudonym, request.request_id)
            self._answering[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))

    def _answer_done(self, owed: tuple[str, bytes]) -> None:
        self._backlog.release()
        self._answer_keys.discard(owed)

    def _forget(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._answering.get(key) is task:
            del self._answering[key]

    # -- producing an answer -------------------------------------------------------

    async def _answer(self, run: _Run) -> None:
        """Produce the answer of ``run``; record its response once."""
        async with self._slots:
            step = await self._stream(run)
        if step is _Step.STOP:
            logger.debug("answer for %s taken over or cancelled", run.device.pseudonym)
            return
        self._stats.responses += 1
        await self._responded(run.device, run.request.message_id)

    async def _stream(self, run: _Run) -> _Step:
        """Stream the assistant's answer down; the last piece carries FINAL.

        Each piece is held up to ``answer_hold_s`` for the next one, so that
        the piece the stream ends after can be marked FINAL; if the stream
        ends later than that, an empty FINAL piece closes the answer.
        """
        stream = self._assistant.answer(run.request)
        held: str | None = None
        failed = False
        try:
            while True:
                step = asyncio.create_task(_next(stream))
                try:
                    if held is not None and not await self._within_hold(step):
                        result = await self._put(run, held)
                        held = None
                        if result is not _Step.MORE:
                            return result
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
                    result = await self._put(run, held)
                    if result is not _Step.MORE:
                        return result
                held = piece
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()
        if failed:
            self._stats.assistant_errors += 1
            logger.warning(
                "assistant %s failed on a request from %s",
                self._assistant.name,
                run.device.pseudonym,
            )
            if held is not None:
                result = await self._put(run, held)
                if result is not _Step.MORE:
                    return result
            held = APOLOGY
        elif held is None and run.seq == 0:
            held = APOLOGY
        return await self._put(run, held or "", final=True)

    async def _within_hold(self, step: asyncio.Task[str | _End]) -> bool:
        """Whether the next piece arrives within the hold time."""
        done, _ = await asyncio.wait((step,), timeout=self._config.answer_hold_s)
        return bool(done)

    async def _put(self, run: _Run, text: str, *, final: bool = False) -> _Step:
        """Send piece ``run.seq``: as saved before, else saved now, then sent.

        A piece saved earlier for the index (before a restart, or by another
        gateway) goes down instead of ``text``, with its own message id, or
        not at all once acknowledged. A FINAL piece whose index holds a saved
        non-FINAL one goes down after it, empty.
        """
        while True:
            seq = run.seq
            piece = run.saved.get(seq)
            if piece is None:
                piece = await self._save(run, seq, text, final=final)
                if piece is None:
                    return _Step.STOP
            run.seq = seq + 1
            pseudonym = run.device.pseudonym
            if not piece.acked and not self.tracker.is_pending(
                pseudonym, piece.message_id
            ):
                await self._deliver(run.device, piece)
            if piece.final:
                return _Step.DONE
            if not final:
                return _Step.MORE
            text = ""

    async def _save(
        self, run: _Run, seq: int, text: str, *, final: bool
    ) -> StoredPiece | None:
        """Seal a new piece and save it; None if the answer is no longer ours."""
        device, request = run.device, run.request
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
        piece = StoredPiece(seq, message.message_id, final, envelope)
        try:
            return await self._store.save_piece(
                device.device_id, request.message_id, piece, owner=self._gid
            )
        except StoreUnavailableError as exc:
            self._store_trouble("save an answer piece (sent unsaved)", exc)
            return piece

    async def _deliver(self, device: KnownDevice, piece: StoredPiece) -> None:
        """Track a piece for resends and send it."""
        tracker = self.tracker
        tracker.track(device.pseudonym, piece.message_id, piece.envelope, self._clock())
        self._stats.downlink_dropped = (
            tracker.dropped_overflow + tracker.dropped_expired
        )
        self._resend_wake.set()
        self._stats.pieces_sent += 1
        await self._send(device, encode_batch([piece.envelope]))

    async def _responded(self, device: KnownDevice, request: bytes) -> None:
        """Write the ``response`` ledger line if no gateway wrote it yet."""
        if self._ledger is None:
            return
        try:
            first = await self._store.claim_response(device.device_id, request)
        except StoreUnavailableError as exc:
            self._store_trouble("claim a response line", exc)
            return
        if first:
            await self._ledger.record("response", [request])

    def _store_trouble(self, what: str, exc: StoreUnavailableError) -> None:
        now = self._clock()
        if now - self._store_logged >= STORE_LOG_EVERY_S:
            self._store_logged = now
            logger.warning("could not %s: %s", what, exc)
        else:
            logger.debug("could not %s: %s", what, exc)

    # -- take-overs -------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew this gateway's heartbeat, so no other takes its answers over."""
        while True:
            try:
                await self._store.heartbeat(owner=self._gid, lease_s=LEASE_S)
            except StoreUnavailableError as exc:
                self._store_trouble("renew the heartbeat", exc)
            await asyncio.sleep(LEASE_RENEW_S)

    async def _takeover_loop(self) -> None:
        """Take over the answers of dead gateways (at start: a predecessor's)."""
        while True:
            try:
                owed = await self._store.claim_orphans(
                    owner=self._gid, limit=CLAIM_BATCH
                )
            except StoreUnavailableError as exc:
                self._store_trouble("look for answers owed", exc)
                owed = []
            for answer in owed:
                device = await self._registry.lookup(pseudonym_for(answer.device_id))
                if device is not None:
                    await self._resume(device, answer)
            if len(owed) < CLAIM_BATCH:
                await asyncio.sleep(LEASE_RENEW_S)

    async def _resume_device(self, pseudonym: str, steal: bool) -> None:
        try:
            device = await self._registry.lookup(pseudonym)
            while device is not None:
                try:
                    owed = await self._store.claim_owed(
                        device.device_id, owner=self._gid, steal=steal
                    )
                except StoreUnavailableError as exc:
                    self._store_trouble("load answers owed", exc)
                    return
                for answer in owed:
                    await self._resume(device, answer)
                if pseudonym not in self._resume_again:
                    return
                steal = self._resume_again.pop(pseudonym)
        finally:
            self._resuming.discard(pseudonym)
            self._resume_again.pop(pseudonym, None)

    async def _resume(self, device: KnownDevice, answer: OwedAnswer) -> None:
        """Go on with an answer owed that is now this gateway's.

        The saved pieces not acknowledged go down at once (and on the resend
        timer); an unfinished answer is then asked for again.
        """
        if (device.pseudonym, answer.message_id) in self._answer_keys:
            return  # being answered here
        now = self._clock()
        envelopes: list[bytes] = []
        for piece in answer.pieces:
            if not piece.acked and not self.tracker.is_pending(
                device.pseudonym, piece.message_id
            ):
                self.tracker.track(
                    device.pseudonym, piece.message_id, piece.envelope, now
                )
                envelopes.append(piece.envelope)
        self._resend_wake.set()
        for start in range(0, len(envelopes), MAX_BATCH_ITEMS):
            part = envelopes[start : start + MAX_BATCH_ITEMS]
            if await self._send(device, encode_batch(part)):
                self._stats.resends += len(part)
        if answer.finished or answer.request is None:
            await self._responded(device, answer.message_id)
            return
        try:
            request = assembled_request(answer.request)
        except RemoteProtocolError:
            return
        await self.start(device, request, answer.pieces)

    # -- resends ----------------------------------------------------------------------

    async def _resend_loop(self) -> None:
        while True:
            self._resend_wake.clear()
            due = self.tracker.next_due()
            delay = None if due is None else max(0.0, due - self._clock())
            try:
                async with asyncio.timeout(delay):
                    await self._resend_wake.wait()
                continue
            except TimeoutError:
                pass
            tracker = self.tracker
            batches = tracker.take_due(self._clock(), paused=self._paused)
            self._stats.downlink_dropped = (
                tracker.dropped_overflow + tracker.dropped_expired
            )
            async with asyncio.TaskGroup() as group:
                for pseudonym, pieces in batches.items():
                    group.create_task(self._resend(pseudonym, pieces))
            for pseudonym in list(tracker.evicted):  # e.g. pieces expired meanwhile
                self._reload_evicted(pseudonym)

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
            self.acked(pseudonym, acked)
        envelopes = [envelope for mid, envelope in pieces if mid not in acked]
        for start in range(0, len(envelopes), MAX_BATCH_ITEMS):
            part = envelopes[start : start + MAX_BATCH_ITEMS]
            if await self._send(device, encode_batch(part)):
                self._stats.resends += len(part)
