"""One BLE link to one pair of glasses, through bleak's public API only.

The backend is chosen by configuration and handed to bleak with its
``backend=`` argument (never by patching bleak): the platform's own stack
with a real radio, or :mod:`relay.sim`'s bumble backend for emulated glasses.

- Find glasses by address, name prefix or service UUID (bounded scan).
- Connect with bleak-retry-connector's ``establish_connection``, under an
  overall timeout so absent glasses fail in bounded time.
- Fragment size from the RX characteristic's
  ``max_write_without_response_size`` after connect, read again on every
  write batch (it may rise after connect).
- The notification callback is synchronous and only enqueues into a bounded
  queue; an overflow is counted (the fragment sequence numbers then report a
  gap and the delivery rules resend).
- Writes are paced: one writer task drains a bounded queue of fragments, so
  producers wait (backpressure) instead of bursting into the OS.
- An optional :class:`LinkTap` (``BackendSpec.tap``) sees every value as it
  crosses the air (``glasses-relay sniff``); without one, nothing is called.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from bleak_retry_connector import establish_connection

from protocol.gatt import NAME_PREFIX, RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID
from relay.errors import LinkError, LinkTimeoutError

__all__ = [
    "BackendSpec",
    "BleLink",
    "LinkConfig",
    "LinkStats",
    "LinkTap",
    "find_glasses",
]

ATT_MAX_VALUE: Final = 512
"""Largest attribute value (Core spec Vol 3, Part F, 3.2.9)."""

_LOGGER: Final = logging.getLogger(__name__)


class LinkTap(Protocol):
    """Sees the GATT traffic of every link made with it (``glasses-relay sniff``).

    Each method is called synchronously on the event loop and must only
    record (no awaiting, no raising, no blocking I/O): ``value_received`` runs
    in bleak's notification callback. Values are the bytes as they crossed
    the air, in full; they are ciphertext after the handshake.
    """

    def link_up(self, link: BleLink, client: BleakClient) -> None:
        """Connected, services discovered, about to subscribe: before any value."""

    def value_received(self, link: BleLink, value: bytes) -> None:
        """A notification from the glasses arrived (also one the queue dropped)."""

    def value_written(self, link: BleLink, value: bytes) -> None:
        """A write without response of ``value`` was handed to bleak."""

    def link_down(self, link: BleLink) -> None:
        """The link is closed (called once)."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Which bleak backend to use and what extra arguments it takes.

    ``client`` and ``scanner`` are bleak backend classes (``None``: the
    platform's default); ``extra`` is passed as keyword arguments to both
    ``BleakClient`` and ``BleakScanner`` (e.g. ``bumble_adapter=``);
    ``tap``, if set, is given every link's traffic (see :class:`LinkTap`).
    """

    client: type | None = None
    scanner: type | None = None
    extra: Mapping[str, object] = field(default_factory=dict)
    tap: LinkTap | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``BleakClient``."""
        out: dict[str, Any] = dict(self.extra)
        if self.client is not None:
            out["backend"] = self.client
        return out

    def scanner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``BleakScanner``."""
        out: dict[str, Any] = dict(self.extra)
        if self.scanner is not None:
            out["backend"] = self.scanner
        return out


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """How to find, connect and pace one link (named limits with defaults).

    Attributes:
        address: Connect to this address only (else the first match).
        name_prefix: Match advertisements whose name starts with this.
        service_uuid: Match advertisements carrying this service UUID.
        tx_uuid: The glasses' notifying characteristic (glasses to phone).
        rx_uuid: The glasses' write-without-response characteristic.
        scan_timeout: Seconds to look for the glasses before giving up.
        connect_timeout: Seconds for the whole connect, discovery included.
        connect_attempts: Attempts handed to bleak-retry-connector.
        notify_queue: Notifications buffered before the consumer; policy on
            overflow: drop and count (the sequence numbers report the gap).
        write_window: Fragments queued for writing; policy when full: the
            producer waits (backpressure).
    """

    address: str | None = None
    name_prefix: str | None = NAME_PREFIX
    service_uuid: str | None = SERVICE_UUID
    tx_uuid: str = TX_CHAR_UUID
    rx_uuid: str = RX_CHAR_UUID
    scan_timeout: float = 10.0
    connect_timeout: float = 20.0
    connect_attempts: int = 3
    notify_queue: int = 4096
    write_window: int = 32

    def __post_init__(self) -> None:
        """Reject values that cannot work."""
        if self.scan_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("scan_timeout and connect_timeout must be positive")
        if self.connect_attempts < 1 or self.notify_queue < 1 or self.write_window < 1:
            raise ValueError(
                "connect_attempts, notify_queue, write_window must be >= 1"
            )

    def matches(self, device: BLEDevice, adv: AdvertisementData) -> bool:
        """Whether an advertisement is from the glasses this config names."""
        if self.address is not None:
            return device.address.upper() == self.address.upper()
        if self.service_uuid is not None and self.service_uuid.lower() in (
            u.lower() for u in adv.service_uuids
        ):
            return True
        name = adv.local_name or device.name or ""
        return self.name_prefix is not None and name.startswith(self.name_prefix)


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Counters of one link."""

    fragments_in: int
    bytes_in: int
    fragments_out: int
    bytes_out: int
    notify_overflow: int


async def find_glasses(config: LinkConfig, backend: BackendSpec) -> BLEDevice:
    """Scan until glasses matching ``config`` advertise.

    Raises:
        LinkTimeoutError: none seen within ``config.scan_timeout`` seconds.
        LinkError: the Bluetooth stack failed.
    """
    try:
        device = await BleakScanner.find_device_by_filter(
            config.matches,
            timeout=config.scan_timeout,
            **backend.scanner_kwargs(),
        )
    except BleakError as exc:
        raise LinkError(f"scanning failed: {exc}") from exc
    if device is None:
        what = config.address or config.name_prefix or config.service_uuid
        raise LinkTimeoutError(
            f"no glasses matching {what!r} advertised within "
            f"{config.scan_timeout:g} s; are they on, in range and not "
            "connected to another phone?"
        )
    return device


class BleLink:
    """A connected link: fragments in through :meth:`recv`, out through :meth:`write`.

    Use :meth:`connect` to make one; always :meth:`aclose` it (or use
    ``async with``). A link is single-use: after it is lost, connect anew.
    """

    def __init__(
        self,
        client: BleakClient,
        config: LinkConfig,
        name: str,
        *,
        tap: LinkTap | None = None,
    ) -> None:
        """Wrap a connected client; use :meth:`connect` instead."""
        self._client = client
        self._config = config
        self.name = name
        self._tap = tap
        # A deque and one waiter future rather than an asyncio.Queue: the
        # reader wakes once per burst of notifications and drains them all.
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_max = config.notify_queue
        self._waiter: asyncio.Future[None] | None = None
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(config.write_window)
        self._lost = asyncio.Event()
        self._rx: BleakGATTCharacteristic | None = None
        self._writer: asyncio.Task[None] | None = None
        self._write_error: BaseException | None = None
        self._fragments_in = 0
        self._bytes_in = 0
        self._fragments_out = 0
        self._bytes_out = 0
        self._overflow = 0

    @classmethod
    async def connect(
        cls,
        config: LinkConfig,
        backend: BackendSpec,
        *,
        device: BLEDevice | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> BleLink:
        """Find (unless ``device`` is given), connect, discover and subscribe.

        Raises:
            LinkTimeoutError: the glasses are absent or did not answer in time.
            LinkError: the connection or discovery failed.
        """
        if device is None:
            device = await find_glasses(config, backend)
        name = device.name or device.address
        holder: list[BleLink] = []

        def _on_disconnect(_client: BleakClient) -> None:
            if holder:
                holder[0]._set_lost()
            if on_lost is not None:
                on_lost()

        try:
            async with asyncio.timeout(config.connect_timeout):
                client = await establish_connection(
                    BleakClient,
                    device,
                    name,
                    disconnected_callback=_on_disconnect,
                    max_attempts=config.connect_attempts,
                    use_services_cache=False,
                    **backend.client_kwargs(),
                )
        except TimeoutError as exc:
            raise LinkTimeoutError(
                f"{name}: no connection within {config.connect_timeout:g} s"
            ) from exc
        except BleakError as exc:
            raise LinkError(f"{name}: connection failed: {exc}") from exc
        link = cls(client, config, name, tap=backend.tap)
        holder.append(link)
        try:
            await link._start()
        except BaseException:
            await link.aclose()
            raise
        return link

    async def _start(self) -> None:
        services = self._client.services
        tx = services.get_characteristic(self._config.tx_uuid)
        rx = services.get_characteristic(self._config.rx_uuid)
        if tx is None or rx is None:
            raise LinkError(
                f"{self.name}: not glasses-relay glasses (characteristics missing)"
            )
        self._rx = rx
        if self._tap is not None:
            self._tap.link_up(self, self._client)  # before any value can arrive
        try:
            await self._client.start_notify(tx, self._on_notify)
        except BleakError as exc:
            raise LinkError(f"{self.name}: subscribe failed: {exc}") from exc
        self._writer = asyncio.create_task(
            self._write_loop(), name=f"ble-write {self.name}"
        )
        _LOGGER.info(
            "%s: connected, fragment size %d", self.name, self.max_fragment_size
        )

    def _on_notify(self, _char: BleakGATTCharacteristic, data: bytearray) -> None:
        # Synchronous on purpose: an async callback lets bleak reorder notifications.
        if self._tap is not None:
            self._tap.value_received(self, bytes(data))
        if len(self._inbox) >= self._inbox_max:
            self._overflow += 1
            return
        self._inbox.append(bytes(data))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _set_lost(self) -> None:
        self._lost.set()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def max_fragment_size(self) -> int:
        """Largest GATT value this link takes: the RX characteristic's limit."""
        if self._rx is None:
            raise LinkError("link not started")
        # ATT values are capped at 512 octets even when the MTU allows 514.
        return min(ATT_MAX_VALUE, self._rx.max_write_without_response_size)

    @property
    def is_connected(self) -> bool:
        """Whether the link is up."""
        return not self._lost.is_set() and self._client.is_connected

    @property
    def stats(self) -> LinkStats:
        """Counters so far."""
        return LinkStats(
            self._fragments_in,
            self._bytes_in,
            self._fragments_out,
            self._bytes_out,
            self._overflow,
        )

    async def recv(self) -> bytes:
        """Return the next notification (one fragment).

        Raises:
            LinkError: the link was lost and nothing more is buffered.
        """
        inbox = self._inbox
        while not inbox:
            if self._lost.is_set():
                raise LinkError(f"{self.name}: link lost")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        data = inbox.popleft()
        self._fragments_in += 1
        self._bytes_in += len(data)
        return data

    def recv_nowait(self) -> bytes | None:
        """Return a buffered notification, or ``None`` if none is waiting."""
        if not self._inbox:
            return None
        data = self._inbox.popleft()
        self._fragments_in += 1
        self._bytes_in += len(data)
        return data

    async def write(self, fragment: bytes) -> None:
        """Queue one fragment for writing; waits while the window is full.

        Raises:
            LinkError: the link is lost or a write failed.
        """
        if self._write_error is not None or self._lost.is_set():
            raise LinkError(f"{self.name}: link lost")
        if len(fragment) > self.max_fragment_size:
            raise LinkError(
                f"{self.name}: fragment of {len(fragment)} bytes exceeds "
                f"{self.max_fragment_size}"
            )
        await self._outbox.put(fragment)

    async def drain(self) -> None:
        """Wait until every queued fragment has been handed to the stack."""
        await self._outbox.join()

    async def _write_loop(self) -> None:
        rx = self._rx
        assert rx is not None  # noqa: S101  (set by _start before the task)
        try:
            while True:
                fragment = await self._outbox.get()
                try:
                    await self._client.write_gatt_char(rx, fragment, response=False)
                finally:
                    self._outbox.task_done()
                if self._tap is not None:
                    self._tap.value_written(self, fragment)
                self._fragments_out += 1
                self._bytes_out += len(fragment)
        except BleakError as exc:
            self._write_error = exc
            self._set_lost()
            _LOGGER.warning("%s: write failed: %s", self.name, exc)
        finally:
            # Free anyone waiting in drain() or write().
            while not self._outbox.empty():
                self._outbox.get_nowait()
                self._outbox.task_done()

    async def wait_lost(self) -> None:
        """Return when the link is lost."""
        await self._lost.wait()

    async def aclose(self) -> None:
        """Stop writing and disconnect; safe to call twice.

        A failure to disconnect is not raised (the link is given up either
        way). Called while the task is being cancelled, it raises
        ``CancelledError`` once done, whatever the backend raised meanwhile:
        a cancellation must not turn into a link failure that is retried.
        """
        self._set_lost()
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.link_down(self)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer  # ours, or this task's: re-raised below
            self._writer = None
        with contextlib.suppress(BleakError, TimeoutError, OSError):
            async with asyncio.timeout(5.0):
                await self._client.disconnect()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    async def __aenter__(self) -> BleLink:
        """Use as ``async with await BleLink.connect(...) as link``."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the link."""
        await self.aclose()
