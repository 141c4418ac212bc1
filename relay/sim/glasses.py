"""The emulated glasses' application: session, pairing, scenario, ledger, faults.

On top of :class:`~relay.sim.peripheral.GlassesPeripheral` (the radio and
GATT table) this runs what glasses firmware would: for every connection a
responder :class:`~protocol.session.Session` (``Noise_XX`` with the pinned
phone, or ``Noise_XXpsk3`` while in pairing mode), a scenario that turns a
user's actions into requests, media chunks, events and telemetry, reliable
delivery across reconnects, and an audit ledger.

Keys live in ``<state>/glasses/``. With no phone pinned, the glasses enter a
pairing mode for ``pairing_window`` seconds at start and keep looking for the
phone's QR payload (``<state>/phone/pairing.txt``), as a camera would keep
looking at the phone's screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from protocol.bodies import (
    ClockSync,
    Event,
    Request,
    RequestKind,
    ResponseText,
    Telemetry,
)
from protocol.constants import MessageFlags, MessageKind
from protocol.errors import MalformedError, RemoteProtocolError
from protocol.message import Message
from protocol.pairing import PairingPayload
from protocol.session import (
    Delivery,
    HandshakeCompleted,
    Identity,
    MessageReceived,
    MessagesAcknowledged,
    PeerPolicy,
    Role,
    Session,
    SessionEvent,
    SessionState,
)
from relay.connection import SessionDriver
from relay.errors import LinkError
from relay.keys import KeyStore
from relay.sim import media
from relay.sim.peripheral import GlassesNotConnectedError, GlassesPeripheral
from relay.sim.scenarios import Ask, Gesture, Step, TelemetryTick, scenario

__all__ = ["Fault", "GlassesApp", "GlassesAppConfig", "GlassesStats", "PeripheralLink"]

_LOGGER: Final = logging.getLogger(__name__)

PHONE_PIN: Final = "phone"
GLASSES_KEY: Final = "glasses-static"
PAIRING_FILE: Final = "pairing.txt"
AUDIO_FRAMES_PER_CHUNK: Final = 10
"""LC3 frames per AUDIO_CHUNK message: 100 ms of speech."""
PHOTO_CHUNK_BYTES: Final = 4096
REQUESTS_KEPT: Final = 4096
"""Default of :attr:`GlassesAppConfig.requests_kept`."""
PAIRING_LOOK_SECONDS: Final = 3.0
"""How long a connected, unpaired pair of glasses looks for a pairing code."""


class FaultKind(enum.StrEnum):
    """Faults the glasses can inject (``--fault KIND:ARG``)."""

    DISCONNECT = "disconnect"
    """Drop the link every ARG seconds (reason 0x08, supervision timeout)."""
    RESET = "reset"
    """Power-cycle the radio every ARG seconds (session state lost)."""
    CORRUPT = "corrupt"
    """Flip one bit in a fraction ARG of outgoing fragments."""
    STALL = "stall"
    """Stop writing for ARG seconds every 10 s (the link stays up)."""
    SLOW_READER = "slow-reader"
    """Take ARG milliseconds to process each incoming fragment."""
    REPLAY = "replay"
    """Send an earlier fragment again, for a fraction ARG of fragments."""
    TRUNCATE = "truncate"
    """Cut a fraction ARG of outgoing fragments short."""
    REORDER = "reorder"
    """Swap a fraction ARG of outgoing fragments with the one after."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault."""

    kind: FaultKind
    arg: float

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``KIND:ARG`` (e.g. ``disconnect:7``).

        Raises:
            ValueError: unknown kind or a bad number, with the allowed kinds.
        """
        name, _, arg = text.partition(":")
        try:
            kind = FaultKind(name)
            value = float(arg)
        except ValueError:
            kinds = ", ".join(k.value for k in FaultKind)
            raise ValueError(
                f"fault {text!r}: use KIND:NUMBER with KIND one of {kinds}"
            ) from None
        if value <= 0:
            raise ValueError(f"fault {text!r}: the number must be positive")
        return cls(kind, value)


@dataclass(frozen=True, slots=True)
class GlassesAppConfig:
    """What the emulated glasses do.

    Attributes:
        scenario: Scenario name (see ``relay.sim.scenarios.SCENARIOS``), or
            ``None`` for glasses that only answer.
        seed: Seed of the scenario and media.
        pairing_window: Seconds of pairing mode at start when no phone is pinned.
        deadline_ms: Deadline put on every request.
        ledger: Append ``sent``/``acked`` events here (JSON lines).
        faults: Faults to inject.
        max_requests: Stop the scenario after this many requests (None: never).
        max_messages: Stop the scenario after this many messages (None: never).
        requests_kept: Requests remembered for answer times and the ledger's
            ``answered`` events; beyond it the oldest are forgotten (an answer
            to a forgotten request is still acknowledged, not logged). Above
            the requests one chaos or soak run asks (the stress scenario's
            1,111), so none is forgotten before its answer can arrive.
    """

    scenario: str | None = "day"
    seed: int = 0
    pairing_window: float = 120.0
    deadline_ms: int = 3000
    ledger: Path | None = None
    faults: tuple[Fault, ...] = ()
    max_requests: int | None = None
    max_messages: int | None = None
    requests_kept: int = REQUESTS_KEPT


@dataclass(slots=True)
class GlassesStats:
    """Counters of the emulated glasses."""

    connections: int = 0
    handshakes: int = 0
    handshake_failures: int = 0
    requests: int = 0
    messages_sent: int = 0
    messages_acked: int = 0
    answers: int = 0
    pairings: int = 0


class PeripheralLink:
    """The glasses' side of the link as a :class:`relay.connection.FragmentLink`."""

    def __init__(
        self, peripheral: GlassesPeripheral, faults: tuple[Fault, ...]
    ) -> None:
        """Wrap the current connection of ``peripheral``."""
        self._p = peripheral
        rates = {f.kind: f.arg for f in faults}
        self._corrupt = rates.get(FaultKind.CORRUPT, 0.0)
        self._replay = rates.get(FaultKind.REPLAY, 0.0)
        self._truncate = rates.get(FaultKind.TRUNCATE, 0.0)
        self._reorder = rates.get(FaultKind.REORDER, 0.0)
        self._slow = rates.get(FaultKind.SLOW_READER, 0.0) / 1000
        self._previous: bytes | None = None
        self._held: bytes | None = None
        self.tampered = 0
        self._rng = random.Random(0)
        self.stalled = asyncio.Event()
        self.stalled.set()

    @property
    def max_fragment_size(self) -> int:
        """MTU - 3 of the current connection, capped at 512."""
        return min(512, self._p.max_notify_size)

    async def recv(self) -> bytes:
        """Next RX write; raises LinkError when the phone disconnects."""
        if not self._p.is_connected:
            raise LinkError("glasses: link lost")
        get = asyncio.ensure_future(self._p.receive())
        lost = asyncio.ensure_future(self._p.disconnected.wait())
        try:
            await asyncio.wait({get, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            raise LinkError("glasses: link lost")
        if self._slow:
            await asyncio.sleep(self._slow)
        return get.result()

    def recv_nowait(self) -> bytes | None:
        """Always None: each RX write is taken through :meth:`recv` (faults apply)."""
        return None

    async def write(self, fragment: bytes) -> None:
        """Notify one fragment (waits for credits, and while stalled)."""
        await self.stalled.wait()
        rng = self._rng
        out = [fragment]
        if self._corrupt and rng.random() < self._corrupt:
            data = bytearray(fragment)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out = [bytes(data)]
        elif self._truncate and rng.random() < self._truncate and len(fragment) > 1:
            out = [fragment[: rng.randrange(1, len(fragment))]]
        elif self._replay and self._previous and rng.random() < self._replay:
            out = [fragment, self._previous]
        elif self._reorder and self._held is None and rng.random() < self._reorder:
            self._held = fragment
            self.tampered += 1
            return
        if self._held is not None:
            out.append(self._held)
            self._held = None
        if out != [fragment]:
            self.tampered += 1
        self._previous = fragment
        try:
            for piece in out:
                await self._p.notify(piece)
        except GlassesNotConnectedError as exc:
            raise LinkError("glasses: link lost") from exc


class GlassesApp:
    """The firmware of the emulated glasses; run :meth:`run` in a task."""

    def __init__(
        self, peripheral: GlassesPeripheral, state_dir: Path, config: GlassesAppConfig
    ) -> None:
        """Load or create the glasses' keys in ``state_dir``."""
        self.peripheral = peripheral
        self.config = config
        self._state_dir = state_dir
        self._keys = KeyStore(state_dir / "glasses")
        private, public = self._keys.load_or_create_x25519(GLASSES_KEY)
        self.identity = Identity(private, public)
        self.delivery = Delivery()
        self.stats = GlassesStats()
        self._driver: SessionDriver | None = None
        self.current_link: PeripheralLink | None = None
        self._started = time.monotonic()
        self._used_pairings: set[bytes] = set()
        self._request_id = random.Random(config.seed).randrange(1, 1 << 20)
        self._asked: dict[int, float] = {}
        self._request_ids: dict[int, bytes] = {}
        self.asked: dict[int, tuple[RequestKind, float]] = {}
        """Every request asked: its kind and when (bounded like the others)."""
        self.answer_times: dict[int, float] = {}
        self.on_response: Callable[[Message, float], None] | None = None
        """Called with every RESPONSE_TEXT and HOLDING message and its arrival
        time (``time.monotonic()``), before it is acknowledged (benchmarks)."""
        self._established = asyncio.Event()
        self._ledger: IO[str] | None = None
        if config.ledger is not None:
            self._ledger = config.ledger.open("a", encoding="utf-8")
        self._room = asyncio.Event()
        self._room.set()
        self.scenario_done = asyncio.Event()
        self._asking: set[asyncio.Task[None]] = set()
        self._play_task: asyncio.Task[None] | None = None

    # -- keys and pairing --------------------------------------------------

    @property
    def paired_phone(self) -> bytes | None:
        """The pinned phone's static key, if any."""
        return self._keys.load_public(PHONE_PIN)

    def _policy(self) -> PeerPolicy | None:
        # In the pairing window a fresh pairing code in sight wins: the user
        # is pairing (again). Otherwise only the pinned phone is accepted.
        if time.monotonic() - self._started <= self.config.pairing_window:
            payload = self._pairing_payload()
            if payload is not None:
                return PeerPolicy(
                    pairing_psk=payload.psk, expected_peer=payload.phone_public
                )
        phone = self.paired_phone
        if phone is not None:
            return PeerPolicy(pinned=frozenset({phone}))
        return None

    def _pairing_payload(self) -> PairingPayload | None:
        path = self._state_dir / "phone" / PAIRING_FILE
        try:
            payload = PairingPayload.decode(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, MalformedError):
            return None
        if payload.is_expired(time.time()) or payload.pairing_id in self._used_pairings:
            return None
        return payload

    # -- the ledger ----------------------------------------------------------

    def _log(self, message_id: bytes, event: str) -> None:
        if self._ledger is not None:
            self._ledger.write(
                json.dumps({"id": message_id.hex(), "event": event, "t": time.time()})
                + "\n"
            )
            self._ledger.flush()

    # -- running -------------------------------------------------------------

    async def run(self) -> None:
        """Serve connections and play the scenario until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._serve(), name="glasses serve")
            if self.config.scenario is not None:
                self._play_task = group.create_task(
                    self._play(), name="glasses scenario"
                )
            for fault in self.config.faults:
                if fault.kind in (FaultKind.DISCONNECT, FaultKind.RESET):
                    group.create_task(
                        self._fault_loop(fault), name=f"fault {fault.kind}"
                    )

    def stop_scenario(self) -> None:
        """The user stops: no new requests; those under way still complete."""
        if self._play_task is not None:
            self._play_task.cancel()

    async def drop_link(self) -> None:
        """Drop the current link as a radio loss would (reason 0x08)."""
        if self.peripheral.is_connected:
            _LOGGER.info("glasses: dropping the link (on request)")
            with contextlib.suppress(TimeoutError):
                await self.peripheral.disconnect(0x08)

    async def close(self) -> None:
        """Flush and close the ledger."""
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    async def _serve(self) -> None:
        peripheral = self.peripheral
        while True:
            await peripheral.subscribed.wait()
            peripheral.discard_received()
            self.stats.connections += 1
            policy = self._policy()
            deadline = time.monotonic() + PAIRING_LOOK_SECONDS
            while (
                policy is None
                and time.monotonic() < deadline
                and peripheral.is_connected
            ):
                # Keep looking at the phone's screen for a moment.
                await asyncio.sleep(0.1)
                policy = self._policy()
            if policy is None:
                _LOGGER.warning(
                    "glasses: not paired and no pairing code in sight; hanging up"
                )
                with contextlib.suppress(TimeoutError):
                    await peripheral.disconnect()
                await peripheral.disconnected.wait()
                continue
            session = Session(
                Role.GLASSES, self.identity, policy, delivery=self.delivery
            )
            link = PeripheralLink(peripheral, self.config.faults)
            self.current_link = link
            driver = SessionDriver(session, link, self._on_event, name="glasses")
            self._driver = driver
            stall = None
            if any(f.kind is FaultKind.STALL for f in self.config.faults):
                stall = asyncio.create_task(self._stall_loop(link))
            try:
                await driver.run()
            except (LinkError, RemoteProtocolError) as exc:
                if (
                    session.state is SessionState.FAILED
                    and not self._established.is_set()
                ):
                    self.stats.handshake_failures += 1
                _LOGGER.info("glasses: link ended: %s", exc)
            finally:
                self._driver = None
                self._established.clear()
                if stall is not None:
                    stall.cancel()
                if peripheral.is_connected:
                    with contextlib.suppress(TimeoutError):
                        await peripheral.disconnect()
            await peripheral.disconnected.wait()

    async def _stall_loop(self, link: PeripheralLink) -> None:
        duration = next(f.arg for f in self.config.faults if f.kind is FaultKind.STALL)
        while True:
            await asyncio.sleep(10.0)
            link.stalled.clear()
            await asyncio.sleep(duration)
            link.stalled.set()

    async def _fault_loop(self, fault: Fault) -> None:
        while True:
            await asyncio.sleep(fault.arg)
            if not self.peripheral.is_connected:
                continue
            _LOGGER.info("glasses: injecting %s", fault.kind.value)
            if fault.kind is FaultKind.DISCONNECT:
                with contextlib.suppress(TimeoutError):
                    await self.peripheral.disconnect(0x08)
            else:
                await self.peripheral.stop()
                self.delivery = Delivery()  # a reset loses RAM, not keys
                await self.peripheral.start()

    def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.stats.handshakes += 1
            if event.pairing:
                self._keys.save_public(PHONE_PIN, event.peer_static)
                payload = self._pairing_payload()
                if payload is not None:
                    self._used_pairings.add(payload.pairing_id)
                self.stats.pairings += 1
                _LOGGER.info("glasses: paired with the phone")
            for message in self.delivery.sender.unacknowledged():
                self._log(message.message_id, "sent")  # resent on this session
            self._established.set()
        elif isinstance(event, MessagesAcknowledged):
            for message in event.messages:
                self.stats.messages_acked += 1
                self._log(message.message_id, "acked")
            self._room.set()
        elif isinstance(event, MessageReceived):
            self._on_message(event.message)

    def _on_message(self, message: Message) -> None:
        driver = self._driver
        if message.kind is MessageKind.CLOCK_SYNC and driver is not None:
            try:
                sync = ClockSync.decode(message.body)
            except MalformedError:
                return
            now = int(time.monotonic() * 1e6)
            reply = ClockSync(sync.t1, now, now).encode()
            driver.send(Message(MessageKind.CLOCK_SYNC, os.urandom(16), reply))
            return
        if self.on_response is not None and message.kind in (
            MessageKind.RESPONSE_TEXT,
            MessageKind.HOLDING,
        ):
            self.on_response(message, time.monotonic())
        if message.kind is MessageKind.RESPONSE_TEXT:
            asked = self._asked.get(message.request_id)
            if asked is not None and message.request_id not in self.answer_times:
                with contextlib.suppress(MalformedError):
                    ResponseText.decode(message.body)
                    self.answer_times[message.request_id] = time.monotonic() - asked
                    self.stats.answers += 1
                    request_mid = self._request_ids.get(message.request_id)
                    if request_mid is not None:
                        self._log(request_mid, "answered")
        if driver is not None and message.flags & MessageFlags.RELIABLE:
            driver.acknowledge(message.message_id)

    # -- the scenario ----------------------------------------------------------

    async def wait_established(self) -> None:
        """Wait until a session with the phone is up and can carry messages.

        (The handshake's completion is reported a moment before the driver's
        session takes messages; one sent in between would wait for the next
        session.)
        """
        await self._established.wait()
        for _ in range(1000):
            driver = self._driver
            if driver is not None and driver.session.state is SessionState.ESTABLISHED:
                return
            await asyncio.sleep(0.01)

    async def send(self, message: Message) -> None:
        """Send ``message`` reliably (as the scenario does); for benchmarks."""
        await self._send(message)

    async def _send(self, message: Message) -> None:
        """Send a reliable message, waiting while the unacked window is full."""
        while not self.delivery.sender.has_room(message.size):
            self._room.clear()
            await self._room.wait()
        driver = self._driver
        if driver is not None and driver.session.state is SessionState.ESTABLISHED:
            driver.send(message)
        else:
            self.delivery.sender.track(message)  # resent when a session is up
        self.stats.messages_sent += 1
        self._log(message.message_id, "sent")

    def _next_request_id(self) -> int:
        self._request_id = self._request_id % 0xFFFF_FFFF + 1
        return self._request_id

    async def _play(self) -> None:
        await self._established.wait()
        steps: Iterator[Step] = scenario(
            self.config.scenario or "day", self.config.seed
        )
        for step in steps:
            if step.delay:
                await asyncio.sleep(step.delay)
            if (
                self.config.max_messages is not None
                and self.stats.messages_sent >= self.config.max_messages
            ):
                _LOGGER.info(
                    "glasses: scenario done (%d messages)", self.stats.messages_sent
                )
                self.scenario_done.set()
                return
            action = step.action
            if isinstance(action, Ask):
                if (
                    self.config.max_requests is not None
                    and self.stats.requests >= self.config.max_requests
                ):
                    self.scenario_done.set()
                    return
                self.stats.requests += 1
                if self.config.max_messages is not None:
                    await self._ask(action)  # counted exactly: one at a time
                    continue
                # Requests overlap as a user's do: the next step's delay runs
                # from the start of this one, not from its end.
                task = asyncio.get_running_loop().create_task(self._ask(action))
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
            elif isinstance(action, Gesture):
                body = Event(
                    action.type, _now_us(), action.name, action.x, action.y, action.z
                ).encode()
                await self._send(_reliable(MessageKind.EVENT, body))
            elif isinstance(action, TelemetryTick):
                body = Telemetry(
                    self.peripheral_battery(), False, _now_us(), 31.5
                ).encode()
                await self._send(_reliable(MessageKind.TELEMETRY, body))

    def peripheral_battery(self) -> int:
        """The battery level the glasses report."""
        return self.peripheral.config.battery_level

    async def _ask(self, ask: Ask) -> None:
        rid = self._next_request_id()
        seed = self.config.seed * 1000 + self.stats.requests
        frames = media.voice_frames(ask.voice_s, seed) if ask.voice_s else ()
        photo = media.photo(ask.photo_bytes, seed) if ask.photo_bytes else b""
        if photo:
            # Spoken question first, then the photo: one media stream, the photo.
            await asyncio.sleep(ask.voice_s)
            size, codec = len(photo), "jpeg"
        elif frames:
            size, codec = sum(len(f) for f in frames), "lc3"
        else:
            size, codec = 0, None
        start = time.monotonic()
        capture_end = start if photo or not frames else start + ask.voice_s
        request = Request(
            ask.kind,
            self.config.deadline_ms,
            int(capture_end * 1e6),
            size,
            ask.intent or (ask.media.name.lower() if ask.media else None),
            ask.text,
            codec,
        )
        self._asked[rid] = capture_end
        self.asked[rid] = (ask.kind, time.monotonic())
        request_message = _reliable(MessageKind.REQUEST, request.encode(), rid)
        self._request_ids[rid] = request_message.message_id
        kept = self.config.requests_kept
        for table in (self._asked, self._request_ids, self.asked, self.answer_times):
            while len(table) > kept:
                del table[next(iter(table))]
        await self._send(request_message)
        if photo:
            pieces = [
                photo[i : i + PHOTO_CHUNK_BYTES]
                for i in range(0, len(photo), PHOTO_CHUNK_BYTES)
            ]
            for index, piece in enumerate(pieces):
                final = index == len(pieces) - 1
                body = index.to_bytes(4, "big") + piece
                await self._send(
                    _reliable(MessageKind.PHOTO_CHUNK, body, rid, final=final)
                )
        elif frames:
            chunks = [
                b"".join(frames[i : i + AUDIO_FRAMES_PER_CHUNK])
                for i in range(0, len(frames), AUDIO_FRAMES_PER_CHUNK)
            ]
            for index, chunk in enumerate(chunks):
                # Streamed at the codec rate while the user speaks.
                await asyncio.sleep(
                    max(0.0, start + (index + 1) * 0.1 - time.monotonic())
                )
                final = index == len(chunks) - 1
                body = index.to_bytes(4, "big") + chunk
                await self._send(
                    _reliable(MessageKind.AUDIO_CHUNK, body, rid, final=final)
                )


def _now_us() -> int:
    return int(time.monotonic() * 1e6)


def _reliable(
    kind: MessageKind, body: bytes, request_id: int = 0, *, final: bool = False
) -> Message:
    flags = MessageFlags.RELIABLE | (MessageFlags.FINAL if final else MessageFlags.NONE)
    return Message(kind, os.urandom(16), body, flags, request_id)
