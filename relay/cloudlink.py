"""The phone's side of the cloud path: outbox in, uplink out, signed acks back.

- :meth:`CloudLink.put` seals a message into an uplink envelope (or, while no
  gateway key is known yet, keeps it in the outbox under :data:`UNSEALED`
  until the key arrives and it is sealed once) and stores it durably; only
  then may the caller acknowledge the message to the glasses.
  :meth:`CloudLink.submit` does the same without waiting, and while the
  uplink is connected lets the outbox hold the envelope unwritten for
  ``outbox.write_delay``: sent at once, and never written if the gateway's
  signed ack comes first (durable there: docs/cloud.md).
- The pump sends outbox rows in priority order, several envelopes per
  payload, within a send window; a row leaves the outbox only when a signed
  acknowledgement from the gateway names it. Rows not acknowledged are resent
  on a backed-off timer, and all of them, in order, after every reconnect.
- Downlink payloads are verified: signed acks delete outbox rows; downlink
  envelopes (answers) go to ``on_downlink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from protocol.bodies import Presence
from protocol.cloud import Channels, decode_batch, encode_batch
from protocol.constants import MessageKind
from protocol.envelope import (
    EPOCH_MAX_AGE_S,
    EPOCH_MAX_MESSAGES,
    EnvelopeHeader,
    EnvelopeKind,
    EnvelopeSuite,
    GatewayPublicKeys,
    UplinkSealer,
    open_downlink,
    seal_uplink,
    verify_ack,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.message import Message, decode_messages
from relay.errors import UplinkError
from relay.identity import GatewayKey, PhoneIdentity
from relay.outbox import Outbox, OutboxItem, OutboxRow, PutOutcome
from relay.uplink.base import Uplink, UplinkState

__all__ = ["UNSEALED", "CloudConfig", "CloudLink", "CloudStats", "LinkObserver"]

_LOGGER: Final = logging.getLogger(__name__)

UNSEALED: Final = "unsealed"
"""Outbox topic of rows waiting for the gateway's key to be sealed."""


@dataclass(frozen=True, slots=True)
class CloudConfig:
    """Send window and timers of the cloud path (named limits, with defaults).

    Attributes:
        max_in_flight: Envelopes sent and not yet acknowledged. Policy when
            reached: the pump waits for acknowledgements.
        batch_items: Envelopes packed into one payload (1 = no batching).
        batch_bytes: Bytes packed into one payload.
        batches_per_send: Payloads handed to the uplink per pump round (they
            are published concurrently; 1 = each publish awaited in turn).
        epoch_messages: Uplinks sealed under one epoch key (docs/envelope.md
            §4: one HPKE seal and one signature per epoch, then an AEAD per
            message); 0 seals every message on its own (HPKE and a signature
            each, about 0.4 ms).
        epoch_seconds: Longest an epoch key seals new messages.
        max_pending_puts: Messages handed to the outbox and not yet committed.
            Policy when reached: the intake waits for commits (backpressure
            to the glasses); 1 = every message waits for its own commit.
        resend_after: Seconds before an unacknowledged envelope is resent;
            doubles with each attempt up to ``resend_cap``.
        resend_cap: Longest resend delay.
        key_poll: Seconds between looks for the gateway's key while unknown.
        expire_every: Seconds between applications of the outbox's expiry
            policy (expired real-time rows and over-age rows are dropped and
            counted), whether or not the uplink is up.
        announce_presence: Send a sealed "online" PRESENCE on every new
            connection (MQTT; on WebSocket the connection itself says it).
        forget_on_puback: TEST ONLY: delete rows once the transport accepted
            them (a broker PUBACK) instead of on the gateway's signed ack. It
            exists to prove that the chaos test can see the loss this causes.
    """

    max_in_flight: int = 512
    batch_items: int = 64
    batch_bytes: int = 64 * 1024
    batches_per_send: int = 4
    epoch_messages: int = EPOCH_MAX_MESSAGES
    epoch_seconds: float = EPOCH_MAX_AGE_S
    max_pending_puts: int = 64
    resend_after: float = 3.0
    resend_cap: float = 60.0
    key_poll: float = 0.5
    expire_every: float = 2.0
    forget_on_puback: bool = False
    announce_presence: bool = True


@dataclass(slots=True)
class CloudStats:
    """Counters of the cloud path."""

    sealed: int = 0
    stored_unsealed: int = 0
    payloads: int = 0
    envelopes_sent: int = 0
    resent: int = 0
    acked: int = 0  # rows deleted after the gateway's signed ack
    acks_received: int = 0  # ids in verified acks, counted on arrival
    downlink: int = 0
    bad_downlink: dict[str, int] = field(default_factory=dict)


class LinkObserver(Protocol):
    """Who learns from the cloud link's traffic (the router's estimators).

    Times are ``time.monotonic()``; ``key`` names one payload (its first
    envelope's message id) so its ack can be matched.
    """

    def uplink_sent(self, key: bytes, nbytes: int, at: float) -> None:
        """A payload of ``nbytes`` left."""

    def uplink_acked(self, key: bytes, at: float) -> None:
        """The gateway's signed ack of the payload named ``key`` arrived.

        ``at`` is its arrival less the time the gateway says it held the ack
        after processing the payload (gathering acks while the phone streams).
        """

    def downlink_bytes(self, n: int, at: float) -> None:
        """``n`` bytes arrived from the gateway."""

    def uplink_down(self, at: float) -> None:
        """The connection dropped."""


class CloudLink:
    """Outbox, uplink and the signed-ack loop; run :meth:`run` in a task."""

    def __init__(
        self,
        identity: PhoneIdentity,
        outbox: Outbox,
        make_uplink: Callable[[GatewayKey, Channels], Uplink] | None,
        on_downlink: Callable[[Message], None],
        *,
        config: CloudConfig | None = None,
        gateway_key_file: Path | None = None,
        on_acked: Callable[[list[bytes], list[float]], None] | None = None,
        suite: EnvelopeSuite = EnvelopeSuite.HPKE,
        observer: LinkObserver | None = None,
    ) -> None:
        """Prepare; ``make_uplink`` is None when no uplink is configured.

        ``suite`` is what :func:`protocol.envelope.choose_suite` picked at start.
        """
        self.identity = identity
        self.outbox = outbox
        self.channels = Channels.for_device(identity.device_id)
        self.config = config or CloudConfig()
        self.stats = CloudStats()
        self.uplink: Uplink | None = None
        self.gateway: GatewayKey | None = None
        self._make_uplink = make_uplink
        self._on_downlink = on_downlink
        self._on_acked = on_acked
        self._key_file = gateway_key_file
        self.suite = suite
        self.observer = observer
        self._in_flight: dict[bytes, float] = {}
        self._attempts: dict[bytes, int] = {}  # sends so far, by message id
        self._sealer: UplinkSealer | None = None
        self._deleting: set[bytes] = set()  # acked; the outbox delete is queued
        self._room_blocked = False  # the pump waits for acks (max_in_flight)
        self._rescan = False  # rows may be sendable again (a failed delete)
        self._wake = asyncio.Event()
        self._pending_puts = 0
        self._put_room = asyncio.Event()
        self._rng = random.Random()
        self.gateway = identity.gateway_key(gateway_key_file)

    @property
    def configured(self) -> bool:
        """Whether an uplink is configured at all."""
        return self._make_uplink is not None

    @property
    def connected(self) -> bool:
        """Whether the uplink is connected now."""
        return self.uplink is not None and self.uplink.state is UplinkState.CONNECTED

    @property
    def in_flight(self) -> int:
        """Envelopes sent and awaiting the gateway's signed ack."""
        return len(self._in_flight)

    def _gateway_keys(self) -> dict[int, GatewayPublicKeys]:
        assert self.gateway is not None  # noqa: S101
        return {self.gateway.kid: self.gateway.keys}

    def _seal(self, message: bytes, topic: str) -> bytes:
        assert self.gateway is not None  # noqa: S101
        self.stats.sealed += 1
        gateway = self.gateway
        if self.suite is EnvelopeSuite.HPKE and self.config.epoch_messages:
            sealer = self._sealer
            if sealer is None or sealer.kid != gateway.kid:
                sealer = self._sealer = UplinkSealer(
                    device_id=self.identity.device_id,
                    kid=gateway.kid,
                    gateway=gateway.keys,
                    device=self.identity.device_keys,
                    max_messages=self.config.epoch_messages,
                    max_age_s=self.config.epoch_seconds,
                )
            return sealer.seal(message, topic=topic, now=time.monotonic())
        return seal_uplink(
            message,
            topic=topic,
            device_id=self.identity.device_id,
            kid=self.gateway.kid,
            gateway=self.gateway.keys,
            device=self.identity.device_keys,
            suite=self.suite,
        )

    async def put(
        self,
        message: Message,
        priority: int,
        *,
        realtime: bool = False,
        expires_at: float | None = None,
    ) -> PutOutcome:
        """Seal and store ``message`` durably; acknowledge it to the glasses after.

        Written at once (never held for the gateway's acknowledgement: a
        caller awaiting each put in turn would wait ``write_delay`` each).

        Returns:
            The outcome: STORED or DUPLICATE mean durable (acknowledge it);
            REFUSED_FULL means not stored (do not acknowledge: backpressure).
        """
        future = await self.submit(
            message, priority, realtime=realtime, expires_at=expires_at, hold=False
        )
        return await future

    async def submit(
        self,
        message: Message,
        priority: int,
        *,
        realtime: bool = False,
        expires_at: float | None = None,
        hold: bool = True,
    ) -> asyncio.Future[PutOutcome]:
        """Seal ``message`` and queue it for the outbox, without waiting for the commit.

        Waits only while ``max_pending_puts`` messages are uncommitted. The
        future gives the outcome as :meth:`put` does, once committed (act on
        it then: acknowledge STORED, DUPLICATE and ACKNOWLEDGED), or the
        storage error.
        Messages submitted back to back share one transaction.

        With ``hold``, while the uplink is connected and the message can be
        sealed, the outbox holds it unwritten for ``outbox.write_delay``
        (sent at once; never written if the gateway acknowledges it first:
        the future then gives ACKNOWLEDGED, durable at the gateway). Held
        messages do not count against ``max_pending_puts``; the outbox
        bounds them itself.
        """
        while self._pending_puts >= self.config.max_pending_puts:
            self._put_room.clear()
            await self._put_room.wait()
        item = self._item(message, priority, realtime, expires_at)
        hold = hold and item.topic != UNSEALED and self.connected
        future = self.outbox.put_soon(item, hold=hold)
        if hold and self.outbox.holds(item.msg_id):
            return future
        self._pending_puts += 1
        future.add_done_callback(self._put_done)
        return future

    def _put_done(self, future: asyncio.Future[PutOutcome]) -> None:
        self._pending_puts -= 1
        self._put_room.set()
        if (
            not future.cancelled()
            and future.exception() is None
            and future.result() is PutOutcome.STORED
        ):
            self._wake.set()

    def _item(
        self,
        message: Message,
        priority: int,
        realtime: bool,
        expires_at: float | None,
    ) -> OutboxItem:
        encoded = message.encode()
        if self.gateway is None:
            item = OutboxItem(
                message.message_id, encoded, UNSEALED, priority, realtime, expires_at
            )
            self.stats.stored_unsealed += 1
        else:
            envelope = self._seal(encoded, self.channels.up)
            item = OutboxItem(
                message.message_id,
                envelope,
                self.channels.up,
                priority,
                realtime,
                expires_at,
            )
        return item

    def seal_presence(self, message: Message) -> bytes:
        """A PRESENCE message sealed for the presence channel (the MQTT will).

        Raises:
            LocalProtocolError: no gateway key is known yet.
        """
        if self.gateway is None:
            raise LocalProtocolError("no gateway key to seal to")
        return encode_batch([self._seal(message.encode(), self.channels.presence)])

    async def send_direct(self, message: Message) -> bool:
        """Send a message sealed but not stored (the phone's ACKs of answers).

        Returns:
            Whether the transport accepted it; if not, the gateway resends and
            the phone acknowledges again, so nothing is lost.
        """
        uplink = self.uplink
        if uplink is None or self.gateway is None or not self.connected:
            return False
        envelope = self._seal(message.encode(), self.channels.up)
        try:
            await uplink.send([("up", encode_batch([envelope]))])
        except UplinkError:
            return False
        return True

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Wait for the gateway key, then run the uplink, pump and downlink.

        The outbox's expiry policy runs beside them the whole time.
        """
        # Not a TaskGroup: the uplink's errors (a permanent one stops the
        # daemon) must reach the caller as they are, not in an ExceptionGroup.
        expiring = asyncio.create_task(self._expire_loop(), name="outbox expiry")
        unlisten = self.outbox.on_stored(self._wake.set)
        try:
            await self._run_uplink()
        finally:
            unlisten()
            expiring.cancel()
            # gather, not suppress(CancelledError): a cancellation of this
            # task arriving now must not be swallowed.
            await asyncio.gather(expiring, return_exceptions=True)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.expire_every)
            dropped = await self.outbox.expire()
            if dropped.expired or dropped.aged:
                self._wake.set()

    async def _run_uplink(self) -> None:
        while self.gateway is None:
            self.gateway = self.identity.gateway_key(self._key_file)
            if self.gateway is None:
                await asyncio.sleep(self.config.key_poll)
        _LOGGER.info("gateway key %d known; sealing queued messages", self.gateway.kid)
        await self._seal_waiting()
        if self._make_uplink is None:
            return
        self.uplink = self._make_uplink(self.gateway, self.channels)
        async with self.uplink, asyncio.TaskGroup() as group:
            group.create_task(self._pump(), name="uplink pump")
            group.create_task(self._downlink(), name="uplink downlink")

    async def _seal_waiting(self) -> None:
        while rows := await self.outbox.rows_with_topic(UNSEALED):
            sealed = [
                (mid, self._seal(raw, self.channels.up), self.channels.up)
                for mid, raw in rows
            ]
            await self.outbox.replace_envelopes(UNSEALED, sealed)

    def _resend_delay(self, attempts: int) -> float:
        factor = 2.0 ** min(16, max(0, attempts - 1))
        return min(self.config.resend_cap, self.config.resend_after * factor)

    async def _pump(self) -> None:
        assert self.uplink is not None  # noqa: S101
        uplink = self.uplink
        config = self.config
        reconnects = -1
        # The generation at which the outbox had nothing more to send: until
        # it changes (or rows come back for resending) reading is wasted.
        drained_at: int | None = None
        while True:
            await uplink.wait_connected()
            if uplink.reconnects != reconnects:
                # A new connection: everything unacknowledged goes again, in order.
                if reconnects >= 0 and self.observer is not None:
                    self.observer.uplink_down(time.monotonic())
                reconnects = uplink.reconnects
                self._in_flight.clear()
                drained_at = None
                await self._announce_online()
            now = time.monotonic()
            room = config.max_in_flight - len(self._in_flight)
            generation = self.outbox.generation
            rows: list[OutboxRow] = []
            self._room_blocked = room <= 0
            if room > 0 and drained_at != generation:
                want = min(room, config.batch_items * config.batches_per_send)
                budget = config.batch_bytes * config.batches_per_send
                exclude = self._deleting.union(self._in_flight)
                # Drained before: only rows stored since are new, and the
                # outbox usually still has them in memory.
                fresh = (
                    None
                    if drained_at is None
                    else self.outbox.rows_stored_since(
                        drained_at, want, budget, exclude=exclude
                    )
                )
                if fresh is not None:
                    rows, complete = fresh, True
                else:
                    rows, complete = await self.outbox.next_rows(
                        want, budget, exclude=exclude
                    )
                drained_at = generation if complete else None
            rows = [r for r in rows if r.topic != UNSEALED]
            if not rows:
                if await self._idle(generation) or self._rescan:
                    self._rescan = False
                    drained_at = None
                continue
            batches: list[list[bytes]] = [[]]
            keys: list[bytes] = [rows[0].msg_id]
            size = 0
            for row in rows:
                if batches[-1] and (
                    len(batches[-1]) >= config.batch_items
                    or size + row.size > config.batch_bytes
                ):
                    batches.append([])
                    keys.append(row.msg_id)
                    size = 0
                batches[-1].append(row.envelope)
                size += row.size
            payloads = [encode_batch(b) for b in batches]
            # In flight before the send: the gateway's ack for the first
            # payload may come back while the later ones are still going out.
            attempts = self._attempts
            tries = [max(r.attempts, attempts.get(r.msg_id, 0)) for r in rows]
            for row, done in zip(rows, tries, strict=True):
                self._in_flight[row.msg_id] = now + self._resend_delay(done + 1)
            # Before the send: over MQTT it returns only with the broker's
            # PUBACKs, and a round trip measured from then would leave the
            # way to the broker out.
            sent_at = time.monotonic()
            try:
                await uplink.send([("up", p) for p in payloads])
            except UplinkError as exc:
                _LOGGER.info("uplink send failed (%s); will resend", exc)
                for row in rows:
                    self._in_flight.pop(row.msg_id, None)
                drained_at = None
                continue
            if self.observer is not None:
                for key, payload in zip(keys, payloads, strict=True):
                    self.observer.uplink_sent(key, len(payload), sent_at)
            for row, done in zip(rows, tries, strict=True):
                if done:
                    self.stats.resent += 1
                attempts[row.msg_id] = done + 1
            if len(attempts) > 8 * config.max_in_flight:
                # Rows that left without an ack (expired, purged): forget them.
                self._attempts = {
                    k: v for k, v in attempts.items() if k in self._in_flight
                }
            self.stats.payloads += len(batches)
            self.stats.envelopes_sent += len(rows)
            if config.forget_on_puback:
                # The unsafe control: loses what the broker accepted but never
                # delivered (e.g. when the broker dies before persisting it).
                await self.outbox.ack([r.msg_id for r in rows])
                for row in rows:
                    self._in_flight.pop(row.msg_id, None)
                continue
            # Only resends are recorded in the outbox: a first send is what an
            # ack nearly always follows, and marking it cost a row update per
            # message. So after a restart a row sent once before it counts as
            # not yet sent (one backoff step less). Not awaited, and lazy: it
            # shares a transaction with the next puts or acks; the counts
            # that matter now are kept here.
            again = [row.msg_id for row, done in zip(rows, tries, strict=True) if done]
            if again:
                self.outbox.mark_attempt_soon(again, lazy=True).add_done_callback(
                    _log_failure
                )

    async def _announce_online(self) -> None:
        """Tell the gateway we are back (it resends unacknowledged answers)."""
        uplink = self.uplink
        if uplink is None or self.gateway is None or not self.config.announce_presence:
            return
        message = Message(
            MessageKind.PRESENCE,
            os.urandom(16),
            Presence("online", int(time.time() * 1e6)).encode(),
        )
        envelope = self._seal(message.encode(), self.channels.presence)
        try:
            await uplink.send([("presence", encode_batch([envelope]))])
        except UplinkError as exc:
            _LOGGER.info("presence not sent (%s)", exc)

    async def _idle(self, generation: int) -> bool:
        """Wait for new rows, room in the window, or the next resend time.

        Returns:
            True if rows came due for resending (they are sendable again).
        """
        now = time.monotonic()
        due = [mid for mid, when in self._in_flight.items() if when <= now]
        for mid in due:
            del self._in_flight[mid]  # resend it
        if due:
            return True
        next_due = min(self._in_flight.values(), default=now + 1.0)
        self._wake.clear()
        if self.outbox.generation > generation:
            return False  # stored since the caller read it
        # Rows newly stored set _wake too (Outbox.on_stored, from run()).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.01, min(1.0, next_due - now))):
                await self._wake.wait()
        return False

    async def _downlink(self) -> None:
        assert self.uplink is not None  # noqa: S101
        async for payload in self.uplink.incoming():
            if self.observer is not None:
                self.observer.downlink_bytes(len(payload), time.monotonic())
            try:
                items = decode_batch(payload)
            except RemoteProtocolError:
                self._bad("malformed_batch")
                continue
            acked: list[bytes] = []
            held: list[float] = []
            for item in items:
                try:
                    header = EnvelopeHeader.decode(item)
                    if header.kind is EnvelopeKind.ACK:
                        info = verify_ack(
                            item,
                            topic=self.channels.down,
                            device_id=self.identity.device_id,
                            gateway_keys=self._gateway_keys(),
                        )
                        acked.extend(info.message_ids)
                        held.extend(info.held_s)
                        continue
                    plaintext = open_downlink(
                        item,
                        topic=self.channels.down,
                        device_id=self.identity.device_id,
                        gateway_keys=self._gateway_keys(),
                        device=self.identity.device_keys,
                        suites=(self.suite,),
                    )
                    messages = decode_messages(plaintext)
                except RemoteProtocolError as exc:
                    self._bad(type(exc).__name__)
                    continue
                for message in messages:
                    self.stats.downlink += 1
                    self._on_downlink(message)
            if acked:
                # As the gateway would have acked each without gathering
                # them (its held time per id, docs/envelope.md §6); a claimed
                # hold past resend_after is not believed (pacing is far below).
                arrived = time.monotonic()
                most = self.config.resend_after
                acked_at = [arrived - min(wait, most) for wait in held]
                if self.observer is not None:
                    for mid, at in zip(acked, acked_at, strict=True):
                        self.observer.uplink_acked(mid, at)
                for mid in acked:
                    self._in_flight.pop(mid, None)
                    self._attempts.pop(mid, None)
                # Lazy: the delete rides on the next put's transaction (or
                # gets its own after outbox.lazy_flush_interval); until then
                # the pump skips these rows.
                ids = tuple(acked)
                self.stats.acks_received += len(ids)
                self._deleting.update(ids)
                self.outbox.ack_soon(ids, lazy=True).add_done_callback(
                    functools.partial(self._acked_rows, ids)
                )
                if self._room_blocked:
                    self._wake.set()
                if self._on_acked is not None:
                    self._on_acked(acked, acked_at)

    def _acked_rows(self, ids: tuple[bytes, ...], future: asyncio.Future[int]) -> None:
        self._deleting.difference_update(ids)
        if not future.cancelled() and future.exception() is None:
            self.stats.acked += future.result()
        else:
            # Still stored: the pump reads them again, sends them, and the
            # gateway drops them as duplicates and acknowledges again.
            _log_failure(future)
            self._rescan = True
            self._wake.set()

    def _bad(self, reason: str) -> None:
        count = self.stats.bad_downlink.get(reason, 0) + 1
        self.stats.bad_downlink[reason] = count
        if count == 1 or count % 100 == 0:
            _LOGGER.warning("dropped downlink payloads (%s): %d so far", reason, count)

    async def aclose(self) -> None:
        """Close the uplink if one is open."""
        if self.uplink is not None:
            with contextlib.suppress(UplinkError):
                await self.uplink.aclose()


def _log_failure(future: asyncio.Future[int]) -> None:
    """Retrieve and log the error of an outbox write nobody awaits.

    The row stays as it was: an unmarked attempt only shortens a resend
    delay; an undeleted acked row is sent again and de-duplicated.
    """
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        _LOGGER.warning("outbox write failed: %s", exc)
