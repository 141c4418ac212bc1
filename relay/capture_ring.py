"""The daemon's rolling capture: its last minutes of GATT traffic, in memory.

``glasses-relay run --capture-ring MINUTES`` (``capture.ring_minutes``) keeps
a bounded ring of what crossed the daemon's BLE links, taken through the
link's :class:`~relay.ble.link.LinkTap`: each link coming up (its peer, MTU
and service table), every ATT value written and notified, in full, as it
crossed the air (ciphertext after the handshake; keys are never seen), and
each link going down. On request (the status API's ``POST /capture`` and
``GET /capture.pcapng``) and when something crashes (a component failing
under the daemon's supervisor, an exception leaving ``Daemon.run``) the ring
is written as a pcapng (LINKTYPE 201) that tshark decodes with no plugin:
:func:`protocol.capture.stream.render` synthesizes the connection, MTU
exchange and discovery of every link in the window, as ``sniff`` does.

Bounds and policy: events older than ``ring_minutes`` and, beyond
``capture.ring_bytes`` (ATT values plus :data:`EVENT_OVERHEAD` bytes per
event), the oldest events are dropped first and counted (``dropped_age``,
``dropped_bytes``). Files go to ``<state>/phone/captures/`` as
``ring-YYYYmmdd-HHMMSS.pcapng`` (UTC, mode 0600); the newest
:data:`FILES_KEPT` are kept. After a crash at most one file is written per
:data:`CRASH_INTERVAL_S` (a component crashing in a loop does not fill the
disk), except when the daemon itself stops on an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from protocol.capture import CharacteristicSpec, CharProps, ServiceSpec
from protocol.capture import glasses_services as _glasses_services
from protocol.capture.stream import EventKind, LinkEvent, LinkInfo, peer_address, render
from protocol.gatt import RX_CHAR_UUID, TX_CHAR_UUID

if TYPE_CHECKING:
    from bleak import BleakClient

    from relay.ble.link import BackendSpec, BleLink, LinkTap

__all__ = [
    "NO_RING",
    "CaptureRing",
    "RingConfig",
    "captures_dir",
    "link_info",
    "services_of",
]

_LOGGER: Final = logging.getLogger(__name__)

NO_RING: Final = "the daemon keeps no capture: start it with --capture-ring MINUTES"
"""What the capture endpoints say when the ring is off."""
DEFAULT_RING_BYTES: Final = 16 << 20
"""Default ``capture.ring_bytes``: 16 MiB (minutes of media at full rate)."""
MIN_RING_BYTES: Final = 64 << 10
EVENT_OVERHEAD: Final = 64
"""Bytes counted per event on top of its value (the event object itself)."""
FILES_KEPT: Final = 32
"""Ring files kept in the captures directory; older ones are removed."""
CRASH_INTERVAL_S: Final = 60.0
"""Shortest time between two captures written after crashes."""
BATCH_EVENTS: Final = 2048
"""Most events in one answer to ``/capture/events``."""
BATCH_BYTES: Final = 1 << 20
"""Most value bytes in one answer to ``/capture/events`` (then ``more``)."""
_PROPS: Final = {
    "broadcast": CharProps.BROADCAST,
    "read": CharProps.READ,
    "write-without-response": CharProps.WRITE_WITHOUT_RESPONSE,
    "write": CharProps.WRITE,
    "notify": CharProps.NOTIFY,
    "indicate": CharProps.INDICATE,
    "authenticated-signed-writes": CharProps.AUTHENTICATED_SIGNED_WRITES,
    "extended-properties": CharProps.EXTENDED_PROPERTIES,
}


@dataclass(frozen=True, slots=True)
class RingConfig:
    """``[capture]``: how much of the link the daemon keeps (0 minutes: none)."""

    minutes: int = 0
    max_bytes: int = DEFAULT_RING_BYTES

    def __post_init__(self) -> None:
        """Reject values that cannot work."""
        if self.minutes < 0:
            raise ValueError("capture ring minutes must be >= 0")
        if self.max_bytes < MIN_RING_BYTES:
            raise ValueError(f"capture ring bytes must be >= {MIN_RING_BYTES}")

    @property
    def enabled(self) -> bool:
        """Whether the daemon keeps a ring."""
        return self.minutes > 0


def captures_dir(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` writes its captures."""
    return state_dir / "phone" / "captures"


def services_of(client: BleakClient) -> tuple[ServiceSpec, ...]:
    """The client's service table as a capture takes it (ours if unreadable)."""
    out = []
    try:
        for service in client.services:
            chars = []
            for char in service.characteristics:
                props = CharProps.NONE
                for name in char.properties:
                    props |= _PROPS.get(name, CharProps.NONE)
                chars.append(CharacteristicSpec(char.uuid, props))
            out.append(ServiceSpec(service.uuid, tuple(chars)))
    except Exception:  # noqa: BLE001 - any backend oddity: fall back to ours
        return _glasses_services()
    uuids = {c.uuid.lower() for s in out for c in s.characteristics}
    if TX_CHAR_UUID not in uuids or RX_CHAR_UUID not in uuids:
        return _glasses_services()
    return tuple(out)


def link_info(client: BleakClient) -> LinkInfo:
    """Peer address, ATT MTU and service table of a connected client."""
    mtu = max(23, min(int(getattr(client, "mtu_size", 23) or 23), 0xFFFF))
    return LinkInfo(peer_address(client.address), mtu, services_of(client))


class _Both:
    """Two taps as one (the daemon's ring beside another recorder)."""

    def __init__(self, first: LinkTap, second: LinkTap) -> None:
        self._taps = (first, second)

    def link_up(self, link: BleLink, client: BleakClient) -> None:
        for tap in self._taps:
            tap.link_up(link, client)

    def value_received(self, link: BleLink, value: bytes) -> None:
        for tap in self._taps:
            tap.value_received(link, value)

    def value_written(self, link: BleLink, value: bytes) -> None:
        for tap in self._taps:
            tap.value_written(link, value)

    def link_down(self, link: BleLink) -> None:
        for tap in self._taps:
            tap.link_down(link)


class CaptureRing:
    """A :class:`~relay.ble.link.LinkTap` keeping the last minutes of every link.

    Tap methods only append to the ring (and drop from its old end); writing
    a file renders a snapshot in a worker thread.
    """

    def __init__(
        self,
        config: RingConfig,
        directory: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: float | None = None,
    ) -> None:
        """Keep ``config``'s window; files go to ``directory``.

        ``wall`` is the Unix time that ``clock()`` now stands for.
        """
        self.config = config
        self.directory = directory
        self._clock = clock
        self._offset = (time.time() if wall is None else wall) - clock()
        self._events: deque[LinkEvent] = deque()
        self._size = 0
        self._seq = 0
        self._open: dict[int, int] = {}
        self._links = 0
        self._infos: dict[int, LinkInfo] = {}
        self._refs: dict[int, int] = {}
        self._last_crash: float | None = None
        self.recorded = 0
        """Events recorded since the start."""
        self.dropped_age = 0
        """Events dropped for being older than the window."""
        self.dropped_bytes = 0
        """Events dropped, oldest first, to stay within ``max_bytes``."""
        self.files = 0
        """Files written."""

    def tapping(self, backend: BackendSpec) -> BackendSpec:
        """``backend`` with this ring tapping its links (beside its own tap)."""
        tap: LinkTap = self if backend.tap is None else _Both(backend.tap, self)
        return dataclasses.replace(backend, tap=tap)

    def now(self) -> float:
        """Capture time: Unix seconds, on the monotonic clock."""
        return self._clock() + self._offset

    # -- LinkTap ----------------------------------------------------------

    def link_up(self, link: BleLink, client: BleakClient) -> None:
        """Remember the link's peer, MTU and services."""
        self._links += 1
        number = self._links
        self._open[id(link)] = number
        self._infos[number] = link_info(client)
        self._append(number, EventKind.UP, b"")

    def value_received(self, link: BleLink, value: bytes) -> None:
        """A notification from the glasses."""
        number = self._open.get(id(link))
        if number is not None:
            self._append(number, EventKind.NOTIFY, value)

    def value_written(self, link: BleLink, value: bytes) -> None:
        """A write without response to the glasses."""
        number = self._open.get(id(link))
        if number is not None:
            self._append(number, EventKind.WRITE, value)

    def link_down(self, link: BleLink) -> None:
        """The link closed."""
        number = self._open.pop(id(link), None)
        if number is not None:
            self._append(number, EventKind.DOWN, b"")

    # -- the ring ---------------------------------------------------------

    def _append(self, link: int, kind: EventKind, value: bytes) -> None:
        self._seq += 1
        event = LinkEvent(self._seq, self.now(), link, kind, value)
        self._events.append(event)
        self._size += len(value) + EVENT_OVERHEAD
        self._refs[link] = self._refs.get(link, 0) + 1
        self.recorded += 1
        self._prune(event.t)

    def _prune(self, now: float) -> None:
        events = self._events
        horizon = now - self.config.minutes * 60.0
        while events and events[0].t < horizon:
            self._drop(events.popleft())
            self.dropped_age += 1
        while events and self._size > self.config.max_bytes:
            self._drop(events.popleft())
            self.dropped_bytes += 1

    def _drop(self, event: LinkEvent) -> None:
        self._size -= len(event.value) + EVENT_OVERHEAD
        link = event.link
        left = self._refs[link] - 1
        if left:
            self._refs[link] = left
        else:
            del self._refs[link]
            if link not in self._open.values():
                del self._infos[link]

    def __len__(self) -> int:
        """Events in the ring now."""
        return len(self._events)

    def stats(self) -> dict[str, object]:
        """Counters and bounds, for /status and the capture endpoints."""
        now = self.now()
        self._prune(now)
        oldest = self._events[0].t if self._events else None
        return {
            "ring_minutes": self.config.minutes,
            "ring_bytes": self.config.max_bytes,
            "events": len(self._events),
            "bytes": self._size,
            "oldest_age_s": None if oldest is None else round(now - oldest, 1),
            "recorded": self.recorded,
            "dropped_age": self.dropped_age,
            "dropped_bytes": self.dropped_bytes,
            "files": self.files,
        }

    def batch(
        self,
        since: int | None,
        *,
        limit: int = BATCH_EVENTS,
        max_bytes: int = BATCH_BYTES,
    ) -> dict[str, object]:
        """The events after ``since`` (the ``/capture/events`` document).

        ``since`` None: no event, only where the ring stands (``last``), for
        a client that wants what comes next. ``missed`` counts events after
        ``since`` that the ring has already dropped; ``more`` says another
        call would return more. A ``since`` beyond the ring's last event
        (another daemon since) starts again from the oldest.
        """
        self._prune(self.now())
        events = self._events
        chosen: list[LinkEvent] = []
        missed = 0
        more = False
        if since is not None:
            if since > self._seq:
                since = 0
            first = events[0].seq if events else self._seq + 1
            missed = max(0, first - since - 1)
            start = max(0, since + 1 - first)
            size = 0
            for event in itertools.islice(events, start, None):
                if len(chosen) >= limit or (chosen and size >= max_bytes):
                    break
                chosen.append(event)
                size += len(event.value)
            more = start + len(chosen) < len(events)
        numbers = sorted({e.link for e in chosen})
        return {
            "last": chosen[-1].seq if chosen else self._seq,
            "missed": missed,
            "more": more,
            "events": [e.to_json() for e in chosen],
            "links": {
                str(n): self._infos[n].to_json() for n in numbers if n in self._infos
            },
            "ring": self.stats(),
        }

    # -- files ------------------------------------------------------------

    async def pcapng(self, why: str = "on request") -> bytes:
        """The ring as a pcapng file (rendered in a worker thread)."""
        self._prune(self.now())
        events, infos = list(self._events), dict(self._infos)
        comment = (
            f"Rolling capture of the glasses-relay daemon (last "
            f"{self.config.minutes} min, at most {self.config.max_bytes} bytes), "
            f"written {why}; {self.dropped_age + self.dropped_bytes} older "
            "events dropped."
        )
        return await asyncio.to_thread(
            render, events, infos, comment=comment, services=_glasses_services()
        )

    async def write(self, why: str = "on request") -> Path:
        """Write the ring to ``ring-YYYYmmdd-HHMMSS.pcapng`` (mode 0600).

        Raises:
            OSError: the file cannot be written.
        """
        data = await self.pcapng(why)
        path = await asyncio.to_thread(self._save, data, time.time())
        self.files += 1
        _LOGGER.info("capture ring written %s: %s (%d bytes)", why, path, len(data))
        return path

    async def write_after_crash(self, what: str, *, final: bool = False) -> Path | None:
        """Write the ring because ``what`` failed; never raises.

        Nothing is written when the ring is empty, or (unless ``final``) when
        a crash capture was written less than :data:`CRASH_INTERVAL_S` ago.
        """
        now = self._clock()
        if not self._events:
            return None
        last = self._last_crash
        if not final and last is not None and now - last < CRASH_INTERVAL_S:
            return None
        self._last_crash = now
        try:
            path = await self.write(f"after {what} failed")
        except OSError as exc:
            _LOGGER.error("capture ring: cannot write after %s failed: %s", what, exc)  # noqa: TRY400
            return None
        _LOGGER.warning("%s failed: the last link traffic is in %s", what, path)
        return path

    def _save(self, data: bytes, when: float) -> Path:
        directory = self.directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        attempt = 1
        while True:
            suffix = "" if attempt == 1 else f"-{attempt}"
            path = directory / f"ring-{stamp}{suffix}.pcapng"
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                attempt += 1
                continue
            break
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        for stale in sorted(directory.glob("ring-*.pcapng"))[:-FILES_KEPT]:
            if stale != path:
                with contextlib.suppress(OSError):
                    stale.unlink()
        return path
