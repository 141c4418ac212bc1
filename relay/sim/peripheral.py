"""Emulated glasses: a bumble peripheral with the glasses' GATT table.

:class:`GlassesPeripheral` is a bumble ``Device`` on a
:class:`~relay.sim.controller_fixes.FixedController`, attached to a virtual
radio (``LocalLink`` or :class:`~relay.sim.shaped_link.ShapedLink`). It
serves:

* the glasses service (:data:`~relay.sim.profiles.SERVICE_UUID`) with a TX
  characteristic (NOTIFY | READ, glasses -> phone) and an RX characteristic
  (WRITE_WITHOUT_RESPONSE | WRITE, phone -> glasses);
* Battery (0x180F, level 0x2A19 read + notify) and Device Information (0x180A:
  manufacturer, model, firmware).

It advertises as ``GR-Glasses-...`` with the service UUID, accepts LE Secure
Connections pairing (Just Works) and advertises again after every
disconnection. The layer above carries opaque bytes through :meth:`notify`
and :meth:`receive` / :meth:`received`.

Run alone, the module serves the cross-process case: glasses, radio and the
phone-side controller in this process, the phone's host (the daemon) in
another, over H4 on TCP::

    python -m relay.sim.peripheral --hci tcp-server:127.0.0.1:0 --profile android-2m

It prints ``READY <port>`` once listening and stops on SIGTERM/SIGINT;
``--echo`` sends every RX write back as a TX notification.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from bumble import att, core, hci
from bumble.device import Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.link import LocalLink
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.profiles.battery_service import BatteryService
from bumble.profiles.device_information_service import DeviceInformationService
from bumble.snoop import BtSnooper
from bumble.transport.common import AsyncPipeSink

from relay.sim.controller_fixes import FastHost, FixedController, HciTcpServer
from relay.sim.profiles import (
    ATT_MAX_MTU,
    ATT_MIN_MTU,
    DEFAULT_PROFILE,
    GLASSES_NAME_PREFIX,
    PROFILES,
    RX_CHAR_UUID,
    SERVICE_UUID,
    TX_CHAR_UUID,
    LinkProfile,
    get_profile,
)
from relay.sim.shaped_link import (
    DEFAULT_MAX_PENDING_ACL_PACKETS,
    AclCreditGate,
    make_link,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine, Sequence

    from bumble import device as bumble_device

__all__ = [
    "GLASSES_DEFAULT_ADDRESS",
    "PHONE_CONTROLLER_ADDRESS",
    "RX_QUEUE_LIMIT",
    "GlassesConfig",
    "GlassesHciServer",
    "GlassesNotConnectedError",
    "GlassesPeripheral",
    "main",
]

logger = logging.getLogger(__name__)

GLASSES_DEFAULT_ADDRESS: Final = "F0:F0:F0:F0:F0:F0"
"""Random static address of the emulated glasses."""

PHONE_CONTROLLER_ADDRESS: Final = "C0:FF:EE:00:00:01"
"""Public address of the phone-side controller in the cross-process server."""

RX_QUEUE_LIMIT: Final = 8192
"""Received writes buffered for the layer above; overflow drops the newest."""

DISCONNECT_TIMEOUT_S: Final = 5.0
"""Bound on a locally requested disconnection."""

TASK_DRAIN_TIMEOUT_S: Final = 5.0
"""Bound on letting background work (re-advertising) finish at :meth:`stop`."""

_POWER_OFF: Final = (
    hci.HCI_ErrorCode.REMOTE_DEVICE_TERMINATED_CONNECTION_DUE_TO_POWER_OFF_ERROR
)

_MAX_AD_OCTETS: Final = 31
_AD_FLAGS: Final = 0x01
_AD_COMPLETE_16_BIT_UUIDS: Final = 0x03
_AD_COMPLETE_128_BIT_UUIDS: Final = 0x07
_AD_COMPLETE_LOCAL_NAME: Final = 0x09
_AD_TX_POWER_LEVEL: Final = 0x0A
_AD_MANUFACTURER_DATA: Final = 0xFF
_FLAGS_LE_GENERAL_NO_BREDR: Final = 0x06
_BATTERY_SERVICE_16: Final = 0x180F
_DEVICE_INFORMATION_SERVICE_16: Final = 0x180A
_PERCENT: Final = 100
_ATT_WRITE_COMMAND: Final = 0x52
_ATT_HANDLE_VALUE_NOTIFICATION: Final = 0x1B
_ATT_MAX_VALUE_OCTETS: Final = 512
_NOTIFICATION_HEADER: Final = struct.Struct("<BH")


class GlassesNotConnectedError(RuntimeError):
    """No phone is connected and subscribed, so data cannot be sent."""


def _ad_structure(ad_type: int, data: bytes) -> bytes:
    return bytes((len(data) + 1, ad_type)) + data


@dataclass(frozen=True, slots=True)
class GlassesConfig:
    """Settings of one emulated pair of glasses.

    Attributes:
        name: Advertised complete local name (and GAP device name).
        address: Random static BD_ADDR.
        max_mtu: Server max ATT MTU (23..517): the phone gets min(its request,
            this).
        advertising_interval_ms: Legacy advertising interval.
        manufacturer_id: Company identifier in the manufacturer data.
        manufacturer_data: Manufacturer-specific advertising payload.
        manufacturer_name: Device Information: manufacturer name string.
        model_number: Device Information: model number string.
        firmware_revision: Device Information: firmware revision string.
        battery_level: Initial battery level in percent.
        rx_queue_limit: Received writes buffered before dropping the newest.
        max_pending_acl_packets: Notification pacing: wait while this many HCI
            ACL packets are queued or in flight.
        snoop_path: Write a btsnoop capture of the glasses' HCI here.
    """

    name: str = f"{GLASSES_NAME_PREFIX}-0001"
    address: str = GLASSES_DEFAULT_ADDRESS
    max_mtu: int = 517
    advertising_interval_ms: float = 20.0
    manufacturer_id: int = 0xFFFF
    manufacturer_data: bytes = b"GR\x01"
    manufacturer_name: str = "glasses-relay"
    model_number: str = "GR-SIM-1"
    firmware_revision: str = "0.1.0"
    battery_level: int = 87
    rx_queue_limit: int = RX_QUEUE_LIMIT
    max_pending_acl_packets: int = DEFAULT_MAX_PENDING_ACL_PACKETS
    snoop_path: Path | None = None

    def __post_init__(self) -> None:
        """Check ranges and that both advertising payloads fit.

        Raises:
            ValueError: a field is out of range.
        """
        if not ATT_MIN_MTU <= self.max_mtu <= ATT_MAX_MTU:
            raise ValueError(f"max_mtu {self.max_mtu} not in 23..517")
        if not 0 <= self.battery_level <= _PERCENT:
            raise ValueError(f"battery_level {self.battery_level} not in 0..100")
        if self.rx_queue_limit < 1 or self.max_pending_acl_packets < 1:
            raise ValueError("rx_queue_limit and max_pending_acl_packets must be >= 1")
        for payload in (self.advertising_data, self.scan_response_data):
            if len(payload) > _MAX_AD_OCTETS:
                raise ValueError("advertising payload exceeds 31 octets")

    @property
    def advertising_data(self) -> bytes:
        """Flags, the 128-bit service UUID and the manufacturer data."""
        return (
            _ad_structure(_AD_FLAGS, bytes((_FLAGS_LE_GENERAL_NO_BREDR,)))
            + _ad_structure(
                _AD_COMPLETE_128_BIT_UUIDS, uuid.UUID(SERVICE_UUID).bytes[::-1]
            )
            + _ad_structure(
                _AD_MANUFACTURER_DATA,
                self.manufacturer_id.to_bytes(2, "little") + self.manufacturer_data,
            )
        )

    @property
    def scan_response_data(self) -> bytes:
        """Local name, the 16-bit standard service UUIDs and TX power."""
        return (
            _ad_structure(_AD_COMPLETE_LOCAL_NAME, self.name.encode())
            + _ad_structure(
                _AD_COMPLETE_16_BIT_UUIDS,
                _BATTERY_SERVICE_16.to_bytes(2, "little")
                + _DEVICE_INFORMATION_SERVICE_16.to_bytes(2, "little"),
            )
            + _ad_structure(_AD_TX_POWER_LEVEL, b"\x00")
        )


class GlassesPeripheral:
    """Emulated glasses on a virtual radio (see module docstring).

    Construct inside a running event loop, then ``await start()`` (or use
    ``async with``); ``await stop()`` releases everything (tasks, timers, the
    snoop file). Data API for the layer above:

    * ``await notify(data)``: one ATT notification on TX, paced by HCI credits
      (never dropped, never truncated);
    * ``await receive()`` / ``async for data in received()``: RX writes, in
      order, from a bounded queue;
    * :attr:`connected`, :attr:`subscribed`, :attr:`disconnected` events and
      ``await disconnect(reason)``.
    """

    def __init__(self, link: LocalLink, config: GlassesConfig | None = None) -> None:
        """Build the controller, host, device and GATT table.

        Args:
            link: Virtual radio shared with the phone's controller.
            config: Settings; defaults to :class:`GlassesConfig()`.
        """
        self.config = config or GlassesConfig()
        self.link = link
        self.controller = FixedController("glasses", link=link)
        host = FastHost(self.controller, AsyncPipeSink(self.controller))
        self.device = Device(
            name=self.config.name, address=hci.Address(self.config.address), host=host
        )
        self.device.gatt_server.max_mtu = self.config.max_mtu
        self.device.pairing_config_factory = lambda _connection: PairingConfig(
            sc=True,
            mitm=False,
            bonding=True,
            delegate=PairingDelegate(
                io_capability=PairingDelegate.IoCapability.NO_OUTPUT_NO_INPUT
            ),
        )
        self._battery_level = self.config.battery_level
        self._tx: Characteristic[bytes] = Characteristic(
            core.UUID(TX_CHAR_UUID),
            Characteristic.Properties.NOTIFY | Characteristic.Properties.READ,
            Characteristic.READABLE,
            CharacteristicValue(read=self._on_tx_read),
        )
        self._rx: Characteristic[bytes] = Characteristic(
            core.UUID(RX_CHAR_UUID),
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE
            | Characteristic.Properties.WRITE,
            Characteristic.WRITEABLE,
            CharacteristicValue(write=self._on_rx_write),
        )
        self._battery = BatteryService(read_battery_level=self._read_battery_level)
        self.device.add_services(
            [
                Service(core.UUID(SERVICE_UUID), [self._tx, self._rx]),
                self._battery,
                DeviceInformationService(
                    manufacturer_name=self.config.manufacturer_name,
                    model_number=self.config.model_number,
                    firmware_revision=self.config.firmware_revision,
                ),
            ]
        )
        self._tx.on("subscription", self._on_subscription)
        self.device.on("connection", self._on_connection)
        # ATT fast path: RX write commands skip bumble's per-PDU log formatting.
        self.device.l2cap_channel_manager.register_fixed_channel(
            att.ATT_CID, self._on_att_pdu
        )

        self._rx_queue: asyncio.Queue[bytes] = asyncio.Queue(self.config.rx_queue_limit)
        self.rx_dropped = 0
        """Writes dropped because the RX queue was full or exceeded 512 octets."""
        self.connected = asyncio.Event()
        """Set while a phone is connected."""
        self.subscribed = asyncio.Event()
        """Set while the connected phone has notifications on TX enabled."""
        self.disconnected = asyncio.Event()
        """Set while no phone is connected."""
        self.disconnected.set()
        self.last_disconnect_reason: int | None = None
        """HCI reason of the last disconnection."""
        self.connections = 0
        """Connections accepted since start."""

        self._connection: bumble_device.Connection | None = None
        self._gate: AclCreditGate | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._snoop_file: IO[bytes] | None = None
        if self.config.snoop_path is not None:
            self._snoop_file = self.config.snoop_path.open("wb")
            host.snooper = BtSnooper(self._snoop_file)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Power on and start advertising.

        Raises:
            bumble.hci.HCI_Error: the virtual controller refused a command.
        """
        await self.device.power_on()
        self._running = True
        await self._advertise()
        logger.info("glasses %s advertising", self.config.name)

    async def stop(self) -> None:
        """Disconnect, stop advertising, power off and release resources.

        Safe to call more than once.
        """
        self._running = False
        if self._tasks:
            # Let a re-advertise finish: bumble's host cannot take an HCI
            # command cancelled mid-flight (the late response completes the
            # next command's future).
            _, pending = await asyncio.wait(self._tasks, timeout=TASK_DRAIN_TIMEOUT_S)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            if self._connection is not None:
                await self.disconnect(_POWER_OFF)
            if self.device.powered_on:
                await self.device.stop_advertising()
                await self.device.power_off()
        finally:
            self.controller.reset_state(_POWER_OFF)
            if self.controller in self.link.controllers:
                self.link.remove_controller(self.controller)
            if self._snoop_file is not None:
                self._snoop_file.close()
                self._snoop_file = None

    async def __aenter__(self) -> GlassesPeripheral:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- data API ------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether a phone is connected."""
        return self._connection is not None

    @property
    def mtu(self) -> int:
        """Negotiated ATT MTU of the current connection (23 when none)."""
        connection = self._connection
        return 23 if connection is None else int(connection.att_mtu)

    @property
    def max_notify_size(self) -> int:
        """Largest :meth:`notify` payload on the current connection: MTU - 3."""
        return self.mtu - 3

    async def notify(self, data: bytes) -> None:
        """Send one notification on TX; waits for HCI credits, never drops.

        Call after :attr:`subscribed` is set. Returns once the notification is
        queued in the host (it then leaves at the link's pace).

        Args:
            data: Value, at most :attr:`max_notify_size` octets.

        Raises:
            ValueError: ``data`` is longer than MTU - 3.
            GlassesNotConnectedError: no phone is connected and subscribed, or
                the link dropped while waiting for credits.
        """
        connection = self._connection
        gate = self._gate
        if connection is None or gate is None:
            raise GlassesNotConnectedError("no phone connected")
        if not self.subscribed.is_set():
            raise GlassesNotConnectedError("phone has not enabled notifications")
        limit = int(connection.att_mtu) - 3
        if len(data) > limit:
            raise ValueError(
                f"notification of {len(data)} octets exceeds MTU-3={limit}"
            )
        if not await gate.wait() or self._connection is not connection:
            raise GlassesNotConnectedError("link lost while waiting for credits")
        # ATT_HANDLE_VALUE_NOTIFICATION, the same bytes bumble's GATT server
        # sends, without its per-PDU log formatting.
        self.device.send_l2cap_pdu(
            connection.handle,
            att.ATT_CID,
            _NOTIFICATION_HEADER.pack(_ATT_HANDLE_VALUE_NOTIFICATION, self._tx.handle)
            + bytes(data),
        )

    async def receive(self) -> bytes:
        """Return the next value the phone wrote to RX (in arrival order)."""
        return await self._rx_queue.get()

    def discard_received(self) -> int:
        """Drop RX writes still queued (from a link that is gone); return how many."""
        dropped = 0
        while not self._rx_queue.empty():
            self._rx_queue.get_nowait()
            dropped += 1
        return dropped

    async def received(self) -> AsyncIterator[bytes]:
        """Yield the phone's RX writes forever, in arrival order."""
        while True:
            yield await self._rx_queue.get()

    async def set_battery_level(self, level: int) -> None:
        """Change the battery level and notify subscribed phones.

        Args:
            level: Percent, 0..100.

        Raises:
            ValueError: ``level`` out of range.
        """
        if not 0 <= level <= _PERCENT:
            raise ValueError(f"battery level {level} not in 0..100")
        self._battery_level = level
        await self.device.notify_subscribers(self._battery.battery_level_characteristic)

    async def disconnect(
        self, reason: int = hci.HCI_ErrorCode.REMOTE_USER_TERMINATED_CONNECTION_ERROR
    ) -> None:
        """Drop the link; the phone sees ``reason`` (0x08 emulates a timeout).

        Args:
            reason: HCI error code sent to the phone.

        Raises:
            TimeoutError: the controller did not confirm within
                :data:`DISCONNECT_TIMEOUT_S`.
        """
        connection = self._connection
        if connection is None:
            return
        async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
            await connection.disconnect(reason)

    # -- bumble callbacks (only record state, enqueue or spawn) -----------------

    def _on_connection(self, connection: bumble_device.Connection) -> None:
        if connection.role != hci.Role.PERIPHERAL:
            return
        self._connection = connection
        self._gate = AclCreditGate(connection, self.config.max_pending_acl_packets)
        self.connections += 1
        connection.on("disconnection", self._on_disconnection)
        self.disconnected.clear()
        self.connected.set()
        logger.info("glasses: phone connected (handle 0x%04X)", connection.handle)

    def _on_disconnection(self, reason: int) -> None:
        self._connection = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        self.subscribed.clear()
        self.connected.clear()
        self.disconnected.set()
        self.last_disconnect_reason = reason
        logger.info("glasses: phone disconnected (reason 0x%02X)", reason)
        if self._running:
            self._spawn(self._advertise())

    def _on_subscription(
        self, connection: bumble_device.Connection, notify: bool, indicate: bool
    ) -> None:
        del indicate
        if connection is not self._connection:
            return
        if notify:
            self.subscribed.set()
        else:
            self.subscribed.clear()

    def _on_att_pdu(self, connection_handle: int, pdu: bytes) -> None:
        if (
            len(pdu) >= _NOTIFICATION_HEADER.size
            and pdu[0] == _ATT_WRITE_COMMAND
            and int.from_bytes(pdu[1:3], "little") == self._rx.handle
        ):
            self._enqueue_rx(pdu[3:])
        else:
            self.device.on_gatt_pdu(connection_handle, pdu)

    def _on_rx_write(self, connection: bumble_device.Connection, value: bytes) -> None:
        del connection
        self._enqueue_rx(value)

    def _enqueue_rx(self, value: bytes) -> None:
        if len(value) > _ATT_MAX_VALUE_OCTETS:
            self.rx_dropped += 1
            logger.warning(
                "glasses: dropped a %d-octet RX write (ATT values are <= 512)",
                len(value),
            )
            return
        try:
            self._rx_queue.put_nowait(bytes(value))
        except asyncio.QueueFull:
            self.rx_dropped += 1
            logger.warning(
                "glasses: RX queue full (%d), dropped %d write(s) so far",
                self.config.rx_queue_limit,
                self.rx_dropped,
            )

    def _on_tx_read(self, connection: bumble_device.Connection) -> bytes:
        del connection
        return b""

    def _read_battery_level(self, connection: bumble_device.Connection) -> int:
        del connection
        return self._battery_level

    # -- helpers -------------------------------------------------------------------

    async def _advertise(self) -> None:
        if not self._running:
            return
        await self.device.start_advertising(
            advertising_data=self.config.advertising_data,
            scan_response_data=self.config.scan_response_data,
            advertising_interval_min=self.config.advertising_interval_ms,
            advertising_interval_max=self.config.advertising_interval_ms,
        )

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("glasses: background task failed", exc_info=exc)


# -----------------------------------------------------------------------------
# Cross-process: glasses + radio + phone-side controller behind an HCI socket
# -----------------------------------------------------------------------------


class GlassesHciServer:
    """Glasses, their radio and the phone's controller, served over H4/TCP.

    The daemon under test opens ``tcp-client:127.0.0.1:<port>`` as its HCI
    transport (see :meth:`relay.sim.bleak_bumble.BumbleAdapter.open`). Every new
    HCI client gets a fresh parser and a reset controller; a client that
    vanishes (SIGKILL) drops its link, and the glasses advertise again.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: LinkProfile | None = None,
        config: GlassesConfig | None = None,
        echo: bool = False,
    ) -> None:
        """Prepare the server (nothing runs until :meth:`start`).

        Args:
            host: Address to bind.
            port: TCP port, ``0`` for an ephemeral one (read :attr:`port`).
            profile: Link timing; default ``android-2m``.
            config: Glasses settings; default :class:`GlassesConfig` with
                ``max_mtu`` from the profile when it is shaped.
            echo: Send every RX write back as a TX notification (lets a test
                in another process check data both ways).
        """
        self.profile = profile or get_profile(DEFAULT_PROFILE)
        if config is None:
            config = GlassesConfig()
            if self.profile.shaped:
                config = dataclasses.replace(config, max_mtu=self.profile.att_mtu)
        self.config = config
        self._host = host
        self._port = port
        self._echo = echo
        self._echo_task: asyncio.Task[None] | None = None
        self.link: LocalLink | None = None
        self.glasses: GlassesPeripheral | None = None
        self.server: HciTcpServer | None = None

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: the server is not started.
        """
        if self.server is None:
            raise RuntimeError("GlassesHciServer is not started")
        return self.server.port

    async def start(self) -> None:
        """Start the glasses (advertising) and listen for an HCI client.

        Raises:
            OSError: the address cannot be bound.
        """
        self.link = make_link(self.profile)
        self.glasses = GlassesPeripheral(self.link, self.config)
        phone_controller = FixedController(
            "phone", link=self.link, public_address=PHONE_CONTROLLER_ADDRESS
        )
        self.server = HciTcpServer(phone_controller, self._host, self._port)
        await self.glasses.start()
        await self.server.start()
        if self._echo:
            self._echo_task = asyncio.create_task(self._run_echo(self.glasses))

    async def close(self) -> None:
        """Stop serving and stop the glasses."""
        if self._echo_task is not None:
            self._echo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._echo_task
            self._echo_task = None
        if self.server is not None:
            await self.server.close()
        if self.glasses is not None:
            await self.glasses.stop()
        close_link = getattr(self.link, "close", None)
        if close_link is not None:
            close_link()

    @staticmethod
    async def _run_echo(glasses: GlassesPeripheral) -> None:
        async for data in glasses.received():
            try:
                await glasses.notify(data)
            except (GlassesNotConnectedError, ValueError) as exc:
                logger.warning("echo: dropped a %d-octet write: %s", len(data), exc)

    async def __aenter__(self) -> GlassesHciServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _parse_tcp_server_spec(spec: str) -> tuple[str, int]:
    scheme, _, rest = spec.partition(":")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp-server" or not host or not port.isdigit():
        raise ValueError(f"expected tcp-server:HOST:PORT, got {spec!r}")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> int:
    host, port = _parse_tcp_server_spec(args.hci)
    profile = get_profile(args.profile)
    config = GlassesConfig(
        name=args.name,
        max_mtu=args.mtu or (profile.att_mtu if profile.shaped else ATT_MAX_MTU),
        snoop_path=args.snoop,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with GlassesHciServer(
        host=host, port=port, profile=profile, config=config, echo=args.echo
    ) as server:
        sys.stdout.write(f"READY {server.port}\n")
        sys.stdout.flush()
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m relay.sim.peripheral``.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m relay.sim.peripheral",
        description="Emulated glasses serving the phone's controller over H4/TCP.",
    )
    parser.add_argument(
        "--hci", required=True, help="tcp-server:HOST:PORT (PORT 0: pick one)"
    )
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    parser.add_argument("--name", default=GlassesConfig().name)
    parser.add_argument("--mtu", type=int, default=0, help="server max ATT MTU")
    parser.add_argument("--snoop", type=Path, default=None, help="btsnoop output")
    parser.add_argument(
        "--echo", action="store_true", help="notify every RX write back on TX"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_serve(args))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
