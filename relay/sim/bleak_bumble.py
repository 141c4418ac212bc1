"""A bleak backend on a bumble host: the phone radio of the test bed.

The daemon keeps bleak's public :class:`bleak.BleakClient` /
:class:`bleak.BleakScanner` and only chooses the backend::

    adapter = BumbleAdapter.on_link(link)            # in-process, same loop
    # or: adapter = await BumbleAdapter.open("tcp-client:127.0.0.1:PORT")
    device = await BleakScanner.find_device_by_filter(
        lambda d, ad: SERVICE_UUID in ad.service_uuids,
        backend=BumbleBleakScanner, bumble_adapter=adapter)
    client = BleakClient(device, backend=BumbleBleakClient, bumble_adapter=adapter)
    await client.connect()

* :class:`BumbleAdapter` is the phone's radio: one bumble ``Device`` shared by
  every scanner and client (powered on once, scanning reference-counted,
  connects serialized, names and address types remembered from advertising).
* :class:`BumbleBleakScanner` implements bleak's ``BaseBleakScanner``
  (names, 16/32/128-bit service UUIDs, manufacturer and service data, TX power).
* :class:`BumbleBleakClient` implements bleak's ``BaseBleakClient``:
  connect -> ATT MTU exchange (up to ``max_mtu``, default 517, as Android 14+
  does) -> optional LE Secure Connections pairing -> full discovery. Handles
  follow BlueZ: a characteristic's handle is its declaration handle (value
  handle - 1). Write-without-response is paced on HCI credits
  (:class:`~relay.sim.shaped_link.AclCreditGate`) and rejects data longer than
  MTU - 3. Errors: ``ATT_Error`` -> :class:`~bleak.exc.BleakGATTProtocolError`,
  connect timeout -> :class:`TimeoutError` (so bleak-retry-connector counts it
  against ``max_attempts``), other bumble/HCI errors -> :class:`~bleak.exc.BleakError`.

Both backends take ``bumble_adapter=`` (required) and ignore the other keyword
arguments bleak and bleak-retry-connector pass along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from typing import IO, TYPE_CHECKING, Any, Final, Literal, cast

from bleak.assigned_numbers import gatt_char_props_to_strs
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError, BleakGATTProtocolError
from bleak.uuids import normalize_uuid_16, normalize_uuid_32
from bumble import att, core, hci
from bumble.device import Device, Peer
from bumble.gatt import GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.snoop import BtSnooper
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink

from relay.sim.controller_fixes import FastHost, FixedController, open_h4_tcp_client
from relay.sim.shaped_link import DEFAULT_MAX_PENDING_ACL_PACKETS, AclCreditGate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from bleak.args import SizedBuffer
    from bleak.backends.scanner import AdvertisementDataCallback
    from bumble import device as bumble_device
    from bumble import gatt_client
    from bumble.link import LocalLink
    from bumble.transport.common import Transport

__all__ = [
    "ATT_MAX_VALUE_OCTETS",
    "DEFAULT_MAX_MTU",
    "PHONE_DEFAULT_ADDRESS",
    "BumbleAdapter",
    "BumbleBleakClient",
    "BumbleBleakScanner",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MTU: Final = 517
"""ATT MTU the phone requests (Android 14+ asks for 517 on first connect)."""

PHONE_DEFAULT_ADDRESS: Final = "C0:FF:EE:00:00:02"
"""Random static address of the emulated phone."""

DISCONNECT_TIMEOUT_S: Final = 5.0
"""Bound on waiting for a requested disconnection to complete."""

ATT_MAX_VALUE_OCTETS: Final = 512
"""ATT attribute value limit (Core Vol 3, Part F, 3.2.9).

At MTU 517, ``max_write_without_response_size`` is 514 (MTU - 3, as bleak
reports on every platform), but a value above 512 octets is dropped by a
spec-conforming server (bumble's included) and rejected by Android 14+; this
backend raises ``ValueError`` for it instead of letting it vanish.
"""

_MIN_CONNECT_TIMEOUT_S: Final = 0.05
_ATT_WRITE_COMMAND: Final = 0x52
_ATT_HANDLE_VALUE_NOTIFICATION: Final = 0x1B
_ATT_PDU_HEADER: Final = struct.Struct("<BH")
_ATT_HEADER_OCTETS: Final = 3
_AD_UUID_LIST_WIDTHS: Final = {0x02: 2, 0x03: 2, 0x04: 4, 0x05: 4, 0x06: 16, 0x07: 16}
_AD_SERVICE_DATA_WIDTHS: Final = {0x16: 2, 0x20: 4, 0x21: 16}
_AD_SHORTENED_NAME: Final = 0x08
_AD_COMPLETE_NAME: Final = 0x09
_AD_TX_POWER: Final = 0x0A
_AD_MANUFACTURER_DATA: Final = 0xFF


def _uuid_str(value: core.UUID) -> str:
    """Bumble UUID -> bleak's normalized 128-bit lower-case string."""
    return str(uuid.UUID(bytes=value.to_bytes(force_128=True)[::-1]))


def _uuid_from_le(data: bytes) -> str:
    match len(data):
        case 2:
            return normalize_uuid_16(int.from_bytes(data, "little"))
        case 4:
            return normalize_uuid_32(int.from_bytes(data, "little"))
        case _:
            return str(uuid.UUID(bytes=data[::-1]))


def _parse_advertisement(
    advertisement: bumble_device.Advertisement,
) -> AdvertisementData:
    """Translate a bumble advertisement (merged ADV + SCAN_RSP) for bleak."""
    local_name: str | None = None
    manufacturer_data: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    service_uuids: dict[str, None] = {}  # ordered, deduplicated
    tx_power: int | None = None
    for ad_type, data in advertisement.data.ad_structures:
        if width := _AD_UUID_LIST_WIDTHS.get(ad_type, 0):
            for offset in range(0, len(data) - width + 1, width):
                service_uuids[_uuid_from_le(data[offset : offset + width])] = None
        elif width := _AD_SERVICE_DATA_WIDTHS.get(ad_type, 0):
            if len(data) >= width:
                service_data[_uuid_from_le(data[:width])] = bytes(data[width:])
        elif ad_type == _AD_COMPLETE_NAME or (
            ad_type == _AD_SHORTENED_NAME and local_name is None
        ):
            local_name = data.decode("utf-8", errors="replace")
        elif ad_type == _AD_MANUFACTURER_DATA and len(data) >= 2:
            manufacturer_data[int.from_bytes(data[:2], "little")] = bytes(data[2:])
        elif ad_type == _AD_TX_POWER and data:
            tx_power = int.from_bytes(data[:1], "little", signed=True)
    return AdvertisementData(
        local_name=local_name,
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        service_uuids=list(service_uuids),
        tx_power=tx_power,
        rssi=int(advertisement.rssi),
        platform_data=(advertisement,),
    )


def _just_works_pairing(_connection: bumble_device.Connection) -> PairingConfig:
    return PairingConfig(
        sc=True,
        mitm=False,
        bonding=True,
        delegate=PairingDelegate(
            io_capability=PairingDelegate.IoCapability.NO_OUTPUT_NO_INPUT
        ),
    )


class BumbleAdapter:
    """The phone's radio: one bumble ``Device`` shared by scanners and clients.

    Build it with :meth:`on_link` (in-process, on the glasses' virtual radio)
    or :meth:`open` (an HCI transport moniker such as
    ``"tcp-client:127.0.0.1:PORT"``), use it as ``async with`` or call
    :meth:`close`. Pass it to bleak as ``bumble_adapter=adapter``.
    """

    def __init__(
        self,
        device: Device,
        *,
        controller: FixedController | None = None,
        transport: Transport | None = None,
        max_mtu: int = DEFAULT_MAX_MTU,
        max_pending_acl_packets: int = DEFAULT_MAX_PENDING_ACL_PACKETS,
        snoop_path: Path | None = None,
    ) -> None:
        """Wrap an existing bumble ``Device`` (prefer :meth:`on_link`/:meth:`open`).

        Args:
            device: The phone-side device (not yet powered on).
            controller: In-process controller to detach from its link at close.
            transport: HCI transport to close at :meth:`close`.
            max_mtu: ATT MTU every client requests unless it overrides it.
            max_pending_acl_packets: Write-without-response pacing limit.
            snoop_path: Write a btsnoop capture of this host's HCI here.
        """
        self.device = device
        self.max_mtu = max_mtu
        self.max_pending_acl_packets = max_pending_acl_packets
        self.connect_lock = asyncio.Lock()
        """Serializes LE connection attempts (one pending connect per controller)."""
        self._controller = controller
        self._transport = transport
        self._power_lock = asyncio.Lock()
        self._scan_users = 0
        self._scan_lock = asyncio.Lock()
        self._listeners: dict[
            object, Callable[[bumble_device.Advertisement], None]
        ] = {}
        self._addresses: dict[str, hci.Address] = {}
        self._names: dict[str, str] = {}
        self._closed = False
        self._snoop_file: IO[bytes] | None = None
        if snoop_path is not None:
            self._snoop_file = snoop_path.open("wb")
            device.host.snooper = BtSnooper(self._snoop_file)
        self._notification_sinks: dict[tuple[int, int], Callable[[bytes], None]] = {}
        device.pairing_config_factory = _just_works_pairing
        device.on("advertisement", self._on_advertisement)
        # ATT fast path: notifications to a subscribed bleak callback skip
        # bumble's per-PDU log formatting; everything else goes to bumble.
        device.l2cap_channel_manager.register_fixed_channel(
            att.ATT_CID, self._on_att_pdu
        )
        if isinstance(device.host, FastHost):  # and skip its ACL decoding too
            device.host.att_sink = self._notify

    @classmethod
    def on_link(
        cls,
        link: LocalLink,
        *,
        address: str = PHONE_DEFAULT_ADDRESS,
        name: str = "relay-phone",
        max_mtu: int = DEFAULT_MAX_MTU,
        max_pending_acl_packets: int = DEFAULT_MAX_PENDING_ACL_PACKETS,
        snoop_path: Path | None = None,
    ) -> BumbleAdapter:
        """Create a phone radio on an in-process virtual link (running loop).

        Args:
            link: ``LocalLink`` or :class:`~relay.sim.shaped_link.ShapedLink`
                shared with the glasses.
            address: Random static BD_ADDR of the phone.
            name: GAP name of the phone.
            max_mtu: ATT MTU clients request by default.
            max_pending_acl_packets: Write-without-response pacing limit.
            snoop_path: Optional btsnoop output.

        Returns:
            An adapter; it powers on at first use.
        """
        controller = FixedController("phone", link=link)
        host = FastHost(controller, AsyncPipeSink(controller))
        device = Device(name=name, address=hci.Address(address), host=host)
        return cls(
            device,
            controller=controller,
            max_mtu=max_mtu,
            max_pending_acl_packets=max_pending_acl_packets,
            snoop_path=snoop_path,
        )

    @classmethod
    async def open(
        cls,
        transport_spec: str,
        *,
        address: str = PHONE_DEFAULT_ADDRESS,
        name: str = "relay-phone",
        max_mtu: int = DEFAULT_MAX_MTU,
        max_pending_acl_packets: int = DEFAULT_MAX_PENDING_ACL_PACKETS,
        snoop_path: Path | None = None,
    ) -> BumbleAdapter:
        """Open a phone radio behind an HCI transport and power it on.

        Args:
            transport_spec: bumble transport moniker, e.g.
                ``"tcp-client:127.0.0.1:9001"``.
            address: Random static BD_ADDR of the phone.
            name: GAP name of the phone.
            max_mtu: ATT MTU clients request by default.
            max_pending_acl_packets: Write-without-response pacing limit.
            snoop_path: Optional btsnoop output.

        Returns:
            A powered-on adapter.

        Raises:
            OSError: the transport cannot be opened.
            BleakError: the controller did not initialize.
        """
        scheme, _, where = transport_spec.partition(":")
        if scheme == "tcp-client":  # bumble's, with a faster H4 framer
            host_name, _, port = where.rpartition(":")
            transport = await open_h4_tcp_client(host_name, int(port))
        else:
            transport = await open_transport(transport_spec)
        host = FastHost(transport.source, transport.sink)
        device = Device(name=name, address=hci.Address(address), host=host)
        adapter = cls(
            device,
            transport=transport,
            max_mtu=max_mtu,
            max_pending_acl_packets=max_pending_acl_packets,
            snoop_path=snoop_path,
        )
        try:
            await adapter.power_on()
        except BaseException:
            await adapter.close(disconnect=False)
            raise
        return adapter

    async def power_on(self) -> None:
        """Reset and initialize the controller once (idempotent).

        Raises:
            BleakError: the adapter is closed or the controller failed.
        """
        if self._closed:
            raise BleakError("bumble adapter is closed")
        async with self._power_lock:
            if self.device.powered_on:
                return
            with _translate_errors("power on"):
                await self.device.power_on()

    async def close(self, *, disconnect: bool = True) -> None:
        """Release the radio.

        Args:
            disconnect: Disconnect live links first. ``False`` closes the HCI
                transport at once, as if the host process died: the glasses
                then see the link drop (supervision timeout).
        """
        if self._closed:
            return
        self._closed = True
        try:
            if disconnect and self.device.powered_on:
                for connection in list(self.device.connections.values()):
                    with contextlib.suppress(
                        core.BaseBumbleError, TimeoutError, asyncio.CancelledError
                    ):
                        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                            await connection.disconnect()
                if self.device.is_scanning:
                    with contextlib.suppress(core.BaseBumbleError):
                        await self.device.stop_scanning()
                await self.device.power_off()
        finally:
            self._listeners.clear()
            self.device.remove_listener("advertisement", self._on_advertisement)
            if self._transport is not None:
                await self._transport.close()
            if self._controller is not None:
                self._controller.reset_state()
                if self._controller in self._controller.link.controllers:
                    self._controller.link.remove_controller(self._controller)
            if self._snoop_file is not None:
                self._snoop_file.close()
                self._snoop_file = None

    async def __aenter__(self) -> BumbleAdapter:
        await self.power_on()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- scanning ------------------------------------------------------------------

    def add_advertisement_listener(
        self, listener: Callable[[bumble_device.Advertisement], None]
    ) -> Callable[[], None]:
        """Register a (sync, enqueue-only) advertisement listener.

        Returns:
            A function that unregisters it.
        """
        token = object()
        self._listeners[token] = listener

        def remove() -> None:
            self._listeners.pop(token, None)

        return remove

    async def start_scan(self, *, active: bool = True) -> None:
        """Start scanning for the first user (reference-counted)."""
        await self.power_on()
        async with self._scan_lock:
            self._scan_users += 1
            if self._scan_users == 1:
                with _translate_errors("start scanning"):
                    await self.device.start_scanning(active=active)

    async def stop_scan(self) -> None:
        """Stop scanning when the last user stops."""
        async with self._scan_lock:
            if self._scan_users == 0:
                return
            self._scan_users -= 1
            if self._scan_users == 0 and self.device.is_scanning and not self._closed:
                with _translate_errors("stop scanning"):
                    await self.device.stop_scanning()

    def address_of(self, address: str) -> hci.Address:
        """Bumble address (with the advertised address type) for a string."""
        known = self._addresses.get(address.upper())
        return known if known is not None else hci.Address(address)

    def name_of(self, address: str) -> str | None:
        """Advertised local name last seen for ``address``, if any."""
        return self._names.get(address.upper())

    def set_notification_sink(
        self,
        connection_handle: int,
        attribute_handle: int,
        sink: Callable[[bytes], None] | None,
    ) -> None:
        """Route notifications of one attribute straight to ``sink`` (or stop)."""
        key = (connection_handle, attribute_handle)
        if sink is None:
            self._notification_sinks.pop(key, None)
        else:
            self._notification_sinks[key] = sink

    def _notify(self, connection_handle: int, pdu: bytes) -> bool:
        """Hand a notification to its subscribed callback; ``False`` if none."""
        if (
            len(pdu) >= _ATT_PDU_HEADER.size
            and pdu[0] == _ATT_HANDLE_VALUE_NOTIFICATION
        ):
            _, attribute_handle = _ATT_PDU_HEADER.unpack_from(pdu)
            sink = self._notification_sinks.get((connection_handle, attribute_handle))
            if sink is not None:
                sink(pdu[_ATT_PDU_HEADER.size :])
                return True
        return False

    def _on_att_pdu(self, connection_handle: int, pdu: bytes) -> None:
        if not self._notify(connection_handle, pdu):
            self.device.on_gatt_pdu(connection_handle, pdu)

    def _on_advertisement(self, advertisement: bumble_device.Advertisement) -> None:
        key = advertisement.address.to_string(with_type_qualifier=False)
        self._addresses[key] = advertisement.address
        for ad_type, data in advertisement.data.ad_structures:
            if ad_type == _AD_COMPLETE_NAME:
                self._names[key] = data.decode("utf-8", errors="replace")
        for listener in list(self._listeners.values()):
            listener(advertisement)


class BumbleBleakScanner(BaseBleakScanner):
    """bleak scanner backend over :class:`BumbleAdapter`."""

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: Literal["active", "passive"] = "active",
        *,
        bumble_adapter: BumbleAdapter | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the backend (bleak's ``BleakScanner`` calls this).

        Args:
            detection_callback: See :class:`bleak.BleakScanner`.
            service_uuids: Only report advertisements with one of these UUIDs.
            scanning_mode: ``"active"`` (with scan responses) or ``"passive"``.
            bumble_adapter: The phone radio (required).
            **kwargs: Other bleak arguments (``bluez``, ``cb``...), ignored.

        Raises:
            BleakError: ``bumble_adapter`` is missing.
        """
        del kwargs
        super().__init__(detection_callback, service_uuids)
        if bumble_adapter is None:
            raise BleakError("BumbleBleakScanner needs bumble_adapter=BumbleAdapter")
        self._adapter = bumble_adapter
        self._active = scanning_mode != "passive"
        self._remove_listener: Callable[[], None] | None = None

    async def start(self) -> None:
        """Start scanning (clears :attr:`seen_devices`)."""
        if self._remove_listener is not None:
            return
        self.seen_devices = {}
        self._remove_listener = self._adapter.add_advertisement_listener(
            self._on_advertisement
        )
        try:
            await self._adapter.start_scan(active=self._active)
        except BaseException:
            self._remove_listener()
            self._remove_listener = None
            raise

    async def stop(self) -> None:
        """Stop scanning."""
        if self._remove_listener is None:
            return
        self._remove_listener()
        self._remove_listener = None
        await self._adapter.stop_scan()

    def _on_advertisement(self, advertisement: bumble_device.Advertisement) -> None:
        data = _parse_advertisement(advertisement)
        if not self.is_allowed_uuid(data.service_uuids):
            return
        address = advertisement.address.to_string(with_type_qualifier=False)
        device = self.create_or_update_device(
            address,
            address,
            data.local_name or self._adapter.name_of(address),
            advertisement.address,
            data,
        )
        self.call_detection_callbacks(device, data)


@contextlib.contextmanager
def _translate_errors(what: str) -> Iterator[None]:
    """Map bumble exceptions to bleak's (see module docstring)."""
    try:
        yield
    except att.ATT_Error as exc:
        raise BleakGATTProtocolError(exc.error_code) from exc
    except core.TimeoutError as exc:
        raise TimeoutError(f"{what} timed out") from exc
    except core.BaseBumbleError as exc:
        raise BleakError(f"{what} failed: {exc}") from exc


class BumbleBleakClient(BaseBleakClient):
    """bleak client backend over :class:`BumbleAdapter` (see module docstring)."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        services: set[str] | None = None,
        *,
        bumble_adapter: BumbleAdapter | None = None,
        max_mtu: int | None = None,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        """Create the backend (bleak's ``BleakClient`` calls this).

        Args:
            address_or_ble_device: Target from a scan, or its address string.
            services: Only discover these services (normalized UUIDs).
            bumble_adapter: The phone radio (required).
            max_mtu: ATT MTU to request; default the adapter's ``max_mtu``.
            disconnected_callback: Called (via ``call_soon``) after any
                disconnection.
            timeout: Default connect timeout in seconds.
            **kwargs: Other bleak / bleak-retry-connector arguments, ignored.

        Raises:
            BleakError: ``bumble_adapter`` is missing.
        """
        super().__init__(
            address_or_ble_device,
            disconnected_callback=disconnected_callback,
            timeout=timeout,
            **kwargs,
        )
        if bumble_adapter is None:
            raise BleakError("BumbleBleakClient needs bumble_adapter=BumbleAdapter")
        self._adapter = bumble_adapter
        details = (
            address_or_ble_device.details
            if isinstance(address_or_ble_device, BLEDevice)
            else None
        )
        self._peer_address = (
            details
            if isinstance(details, hci.Address)
            else bumble_adapter.address_of(self.address)
        )
        self._max_mtu = max_mtu or bumble_adapter.max_mtu
        self._service_filter = [core.UUID(s) for s in services] if services else []
        self._connection: bumble_device.Connection | None = None
        self._gate: AclCreditGate | None = None
        self._mtu = att.ATT_DEFAULT_MTU
        self._subscribers: dict[int, Callable[[bytes], None]] = {}
        self.last_disconnect_reason: int | None = None
        """HCI reason of the last disconnection (bumble extension, not bleak API)."""

    # -- properties ----------------------------------------------------------------

    @property
    def name(self) -> str:
        """Advertised name, else the address with dashes."""
        return self._adapter.name_of(self.address) or self.address.replace(":", "-")

    @property
    def mtu_size(self) -> int:
        """Negotiated ATT MTU (the last one after a disconnection)."""
        connection = self._connection
        return int(connection.att_mtu) if connection is not None else self._mtu

    @property
    def is_connected(self) -> bool:
        """Whether the LE link is up."""
        return self._connection is not None

    # -- connection ------------------------------------------------------------------

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Connect, exchange MTU, optionally pair, and discover services.

        Args:
            pair: Pair (LE Secure Connections, Just Works) before discovery.
            **kwargs: ``timeout`` (seconds) overrides the constructor's; other
                keys (``dangerous_use_bleak_cache``...) are ignored.

        Raises:
            TimeoutError: no connection within the timeout (absent glasses).
            BleakError: already connected, or the link failed.
            BleakGATTProtocolError: the peer rejected a discovery request.
        """
        if self._connection is not None:
            raise BleakError("Client is already connected")
        timeout = float(kwargs.get("timeout", self._timeout))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Not under the deadline: a cancelled HCI command desynchronizes
        # bumble's host (the late response completes the next command).
        await self._adapter.power_on()
        async with asyncio.timeout_at(deadline):
            await self._adapter.connect_lock.acquire()
        try:
            remaining = max(deadline - loop.time(), _MIN_CONNECT_TIMEOUT_S)
            with self._translate("connect"):
                connection = await self._adapter.device.connect(
                    self._peer_address, timeout=remaining
                )
        finally:
            self._adapter.connect_lock.release()
        self._attach(connection)
        try:
            async with asyncio.timeout_at(deadline):
                with self._translate("connection setup"):
                    self._mtu = await Peer(connection).request_mtu(self._max_mtu)
                    if pair:
                        await connection.pair()
                    self.services = await self._discover(connection)
        except BaseException:
            await self._abort(connection)
            raise
        logger.info(
            "connected to %s (MTU %d, %d services)",
            self.address,
            self._mtu,
            len(self.services.services),
        )

    async def disconnect(self) -> None:
        """Disconnect (no-op when not connected).

        Raises:
            TimeoutError: the link did not report the disconnection in time.
            BleakError: the radio failed (e.g. its HCI transport was lost).
        """
        connection = self._connection
        if connection is None:
            return
        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
            with self._translate("disconnect"), contextlib.suppress(hci.HCI_Error):
                await connection.disconnect()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Pair with LE Secure Connections (Just Works).

        Raises:
            BleakError: not connected, or pairing failed.
        """
        del args, kwargs
        connection = self._require_connection()
        with self._translate("pair"):
            await connection.pair()

    async def unpair(self) -> None:
        """Forget the bond with the peer (the link, if any, stays up)."""
        keystore = self._adapter.device.keystore
        if keystore is None:
            return
        with contextlib.suppress(KeyError):
            await keystore.delete(str(self._peer_address))

    # -- GATT I/O ----------------------------------------------------------------------

    async def read_gatt_char(
        self,
        characteristic: BleakGATTCharacteristic,
        *,
        use_cached: bool = False,
        **kwargs: Any,
    ) -> bytearray:
        """Read a characteristic value (ATT Read, Read Blob when long)."""
        del kwargs
        return await self._read(
            cast("gatt_client.AttributeProxy[bytes]", characteristic.obj), use_cached
        )

    async def read_gatt_descriptor(
        self,
        descriptor: BleakGATTDescriptor,
        *,
        use_cached: bool = False,
        **kwargs: Any,
    ) -> bytearray:
        """Read a descriptor value."""
        del kwargs
        return await self._read(
            cast("gatt_client.AttributeProxy[bytes]", descriptor.obj), use_cached
        )

    async def write_gatt_char(
        self,
        characteristic: BleakGATTCharacteristic,
        data: SizedBuffer,
        response: bool,
    ) -> None:
        """Write a characteristic value.

        With ``response=False`` (ATT Write Command) the call waits while too
        many HCI ACL packets are pending, so a burst is paced, never dropped.

        Raises:
            ValueError: ``response=False`` and ``data`` exceeds MTU - 3 or
                :data:`ATT_MAX_VALUE_OCTETS`.
            BleakGATTProtocolError: the peer answered with an ATT error.
            BleakError: not connected, or the link dropped.
        """
        connection = self._require_connection()
        payload = bytes(data)
        proxy = cast("gatt_client.AttributeProxy[bytes]", characteristic.obj)
        if response:
            with self._translate("write"):
                await connection.gatt_client.write_value(
                    proxy, payload, with_response=True
                )
            return
        limit = min(int(connection.att_mtu) - _ATT_HEADER_OCTETS, ATT_MAX_VALUE_OCTETS)
        if len(payload) > limit:
            raise ValueError(
                f"write without response of {len(payload)} octets exceeds {limit} "
                f"(MTU - 3, and at most {ATT_MAX_VALUE_OCTETS}: the ATT attribute "
                "value limit that Android 14+ and the glasses enforce)"
            )
        gate = self._gate
        if gate is None or not await gate.wait() or self._connection is not connection:
            raise BleakError("Not connected")
        # ATT_WRITE_COMMAND, the same bytes bumble's GATT client sends, without
        # its per-PDU log formatting.
        connection.send_l2cap_pdu(
            att.ATT_CID,
            _ATT_PDU_HEADER.pack(_ATT_WRITE_COMMAND, proxy.handle) + payload,
        )

    async def write_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, data: SizedBuffer
    ) -> None:
        """Write a descriptor value (ATT Write Request)."""
        connection = self._require_connection()
        proxy = cast("gatt_client.AttributeProxy[bytes]", descriptor.obj)
        with self._translate("write descriptor"):
            await connection.gatt_client.write_value(
                proxy, bytes(data), with_response=True
            )

    async def start_notify(
        self,
        characteristic: BleakGATTCharacteristic,
        callback: NotifyCallback,
        **kwargs: Any,
    ) -> None:
        """Enable notifications (or indications) with a real CCCD write.

        ``callback`` runs synchronously for each value, in arrival order; an
        exception it raises is logged and does not stop later values.

        Raises:
            BleakError: not connected, or the characteristic has no CCCD.
            BleakGATTProtocolError: the CCCD write was rejected.
        """
        del kwargs
        connection = self._require_connection()
        proxy = cast("gatt_client.CharacteristicProxy[bytes]", characteristic.obj)
        if (
            proxy.get_descriptor(GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR)
            is None
        ):
            raise BleakError(f"characteristic {characteristic.uuid} has no CCCD")

        def on_value(value: bytes) -> None:
            try:
                callback(bytearray(value))
            except Exception:
                logger.exception("notification callback failed")

        self._subscribers[proxy.handle] = on_value
        self._adapter.set_notification_sink(connection.handle, proxy.handle, on_value)
        with self._translate("start notify"):
            await connection.gatt_client.subscribe(proxy, on_value, prefer_notify=True)

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Disable notifications with a real CCCD write."""
        connection = self._require_connection()
        proxy = cast("gatt_client.CharacteristicProxy[bytes]", characteristic.obj)
        subscriber = self._subscribers.pop(proxy.handle, None)
        self._adapter.set_notification_sink(connection.handle, proxy.handle, None)
        with self._translate("stop notify"):
            await connection.gatt_client.unsubscribe(proxy, subscriber)

    # -- internals ---------------------------------------------------------------------

    def _require_connection(self) -> bumble_device.Connection:
        connection = self._connection
        if connection is None:
            raise BleakError("Not connected")
        return connection

    async def _read(
        self, proxy: gatt_client.AttributeProxy[bytes], use_cached: bool
    ) -> bytearray:
        connection = self._require_connection()
        client = connection.gatt_client
        if use_cached and (cached := client.cached_values.get(proxy.handle)):
            return bytearray(cached[1])
        with self._translate("read"):
            value = await client.read_value(proxy)
        return bytearray(value)

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Translate bumble errors to bleak's, inside a client call.

        A cancellation caused by a disconnection (bumble cancels pending ATT
        requests) becomes a BleakError instead of leaking as CancelledError.
        """
        try:
            with _translate_errors(what):
                yield
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._connection is None and task is not None and not task.cancelling():
                raise BleakError(f"{what}: disconnected") from exc
            raise

    def _attach(self, connection: bumble_device.Connection) -> None:
        self._connection = connection
        self._mtu = int(connection.att_mtu)
        self._gate = AclCreditGate(connection, self._adapter.max_pending_acl_packets)
        connection.on("disconnection", self._on_disconnection)

    async def _abort(self, connection: bumble_device.Connection) -> None:
        """Tear a half-set-up link down after a failed connect."""
        if self._connection is not connection:
            return
        with contextlib.suppress(core.BaseBumbleError, TimeoutError):
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await connection.disconnect()

    def _on_disconnection(self, reason: int) -> None:
        connection = self._connection
        if connection is not None:
            connection.remove_listener("disconnection", self._on_disconnection)
            self._mtu = int(connection.att_mtu)
        self._connection = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        if connection is not None:
            for attribute_handle in self._subscribers:
                self._adapter.set_notification_sink(
                    connection.handle, attribute_handle, None
                )
        self._subscribers.clear()
        self.services = None
        self.last_disconnect_reason = reason
        logger.info("disconnected from %s (reason 0x%02X)", self.address, reason)
        if self._disconnected_callback is not None:
            asyncio.get_running_loop().call_soon(self._disconnected_callback)

    def _max_write_without_response_size(self) -> int:
        return self.mtu_size - _ATT_HEADER_OCTETS

    async def _discover(
        self, connection: bumble_device.Connection
    ) -> BleakGATTServiceCollection:
        """Discover services, characteristics and descriptors (BlueZ handles)."""
        client = connection.gatt_client
        collection = BleakGATTServiceCollection()
        for service_proxy in await client.discover_services(self._service_filter):
            service = BleakGATTService(
                service_proxy, service_proxy.handle, _uuid_str(service_proxy.uuid)
            )
            collection.add_service(service)
            for char_proxy in await client.discover_characteristics((), service_proxy):
                properties = sorted(gatt_char_props_to_strs(char_proxy.properties))
                characteristic = BleakGATTCharacteristic(
                    char_proxy,
                    char_proxy.handle - 1,  # declaration handle, as BlueZ
                    _uuid_str(char_proxy.uuid),
                    properties,
                    self._max_write_without_response_size,
                    service,
                )
                collection.add_characteristic(characteristic)
                for descriptor_proxy in await client.discover_descriptors(char_proxy):
                    collection.add_descriptor(
                        BleakGATTDescriptor(
                            descriptor_proxy,
                            descriptor_proxy.handle,
                            _uuid_str(descriptor_proxy.type),
                            characteristic,
                        )
                    )
                char_proxy.descriptors_discovered = True
        return collection
