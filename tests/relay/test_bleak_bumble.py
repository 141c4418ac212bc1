"""The bumble test bed through bleak's own BleakClient / BleakScanner.

Real bumble stacks on both ends (HCI, L2CAP, ATT, SMP); bleak is never mocked:
the backend is injected with ``backend=`` and ``bumble_adapter=``. The fixtures
live here, not in a ``tests/relay/conftest.py`` (a second ``conftest`` module
next to ``tests/conftest.py`` breaks a project-wide mypy run).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import bleak_retry_connector
import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError, BleakGATTProtocolError, BleakGATTProtocolErrorCode
from bleak_retry_connector import BleakNotFoundError, establish_connection
from bumble import hci

from relay.sim.bleak_bumble import BumbleAdapter, BumbleBleakClient, BumbleBleakScanner
from relay.sim.peripheral import (
    GLASSES_DEFAULT_ADDRESS,
    GlassesConfig,
    GlassesHciServer,
    GlassesPeripheral,
)
from relay.sim.profiles import (
    BATTERY_LEVEL_CHAR_UUID,
    BATTERY_SERVICE_UUID,
    GLASSES_NAME_PREFIX,
    RX_CHAR_UUID,
    SERVICE_UUID,
    TX_CHAR_UUID,
    UNSHAPED,
    LinkProfile,
    get_profile,
)
from relay.sim.shaped_link import ShapedLink, make_link

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from bleak.backends.characteristic import BleakGATTCharacteristic
    from bleak.backends.scanner import AdvertisementData
    from bumble.link import LocalLink

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAME_COUNT = 20_000
BURST_S = 0.002  # frames of one connection event arrive within this
_SEQ = struct.Struct("<I")
_FILLER = bytes(range(256)) * 3  # longer than the largest frame (512)
MANUFACTURER_NAME_UUID = "00002a29-0000-1000-8000-00805f9b34fb"


@dataclass
class SimBed:
    """Emulated glasses and the phone radio on one virtual link."""

    link: LocalLink
    glasses: GlassesPeripheral
    adapter: BumbleAdapter
    profile: LinkProfile


class SimBedFactory(Protocol):
    async def __call__(
        self,
        profile: LinkProfile = ...,
        *,
        start_glasses: bool = ...,
        **config: Any,
    ) -> SimBed: ...


@pytest.fixture
async def sim_bed_factory() -> AsyncIterator[SimBedFactory]:
    """Build test beds (any profile, any GlassesConfig field); all torn down."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            profile: LinkProfile = UNSHAPED,
            *,
            start_glasses: bool = True,
            **config: Any,
        ) -> SimBed:
            link = make_link(profile)
            if isinstance(link, ShapedLink):
                stack.callback(link.close)
            glasses = GlassesPeripheral(link, GlassesConfig(**config))
            stack.push_async_callback(glasses.stop)
            adapter = BumbleAdapter.on_link(link)
            stack.push_async_callback(adapter.close)
            if start_glasses:
                await glasses.start()
            return SimBed(link, glasses, adapter, profile)

        yield make


@pytest.fixture
async def sim_bed(sim_bed_factory: SimBedFactory) -> SimBed:
    """Unshaped link, default glasses (server max MTU 517), advertising."""
    return await sim_bed_factory()


def frame(seq: int, size: int) -> bytes:
    """A ``size``-octet frame carrying its sequence number."""
    data = _SEQ.pack(seq) + _FILLER[seq % 8 : seq % 8 + size - _SEQ.size]
    assert len(data) == size
    return data


def frame_sizes(count: int, low: int = 20, high: int = 244) -> list[int]:
    return [low + (i * 37) % (high - low + 1) for i in range(count)]


def is_glasses(_device: BLEDevice, adv: AdvertisementData) -> bool:
    return SERVICE_UUID in adv.service_uuids


async def find_glasses(adapter: BumbleAdapter) -> BLEDevice:
    # BleakScanner(**kwargs) takes the adapter; the classmethods type their
    # kwargs as a closed TypedDict (see test_scan_finds_glasses_...).
    async with BleakScanner(backend=BumbleBleakScanner, bumble_adapter=adapter) as scan:
        async with asyncio.timeout(5):
            async for device, adv in scan.advertisement_data():
                if is_glasses(device, adv):
                    return device
    raise AssertionError("unreachable: advertisement_data() never ends")


async def connect(adapter: BumbleAdapter, **kwargs: object) -> BleakClient:
    client = BleakClient(
        await find_glasses(adapter),
        backend=BumbleBleakClient,
        bumble_adapter=adapter,
        **kwargs,  # type: ignore[arg-type]
    )
    await client.connect()
    return client


def enqueue_into(
    queue: asyncio.Queue[bytes],
) -> Callable[[BleakGATTCharacteristic, bytearray], None]:
    def on_notify(_char: BleakGATTCharacteristic, data: bytearray) -> None:
        queue.put_nowait(bytes(data))

    return on_notify


def characteristic(client: BleakClient, uuid: str) -> BleakGATTCharacteristic:
    char = client.services.get_characteristic(uuid)
    assert char is not None
    return char


# -- link profiles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "packets_per_event", "ceiling"),
    [
        ("android-2m", 10, 162_667),
        ("android-2m-6pkt", 6, 97_600),
        ("ios", 4, 65_067),
        ("ble42-dle", 6, 97_600),
        ("ble40", 22, 29_333),
    ],
)
def test_profile_ceilings(name: str, packets_per_event: int, ceiling: int) -> None:
    profile = get_profile(name)
    assert profile.packets_per_event == packets_per_event
    assert round(profile.ceiling_bytes_per_s) == ceiling


# -- scanning --------------------------------------------------------------------------


async def test_scan_finds_glasses_by_name_prefix_and_service_uuid(
    sim_bed: SimBed,
) -> None:
    adapter = sim_bed.adapter
    by_name = await BleakScanner.find_device_by_filter(
        lambda _d, adv: (adv.local_name or "").startswith(GLASSES_NAME_PREFIX),
        timeout=5.0,
        backend=BumbleBleakScanner,
        bumble_adapter=adapter,  # type: ignore[call-arg]  # kwargs: closed TypedDict
    )
    assert by_name is not None
    assert by_name.address == GLASSES_DEFAULT_ADDRESS
    assert by_name.name == sim_bed.glasses.config.name

    async with BleakScanner(
        service_uuids=[SERVICE_UUID], backend=BumbleBleakScanner, bumble_adapter=adapter
    ) as scanner:
        await asyncio.sleep(0.3)
    found = scanner.discovered_devices_and_advertisement_data
    _device, adv = found[GLASSES_DEFAULT_ADDRESS]
    assert adv.local_name == sim_bed.glasses.config.name
    assert adv.service_uuids.count(SERVICE_UUID) == 1  # ADV + SCAN_RSP merged
    assert BATTERY_SERVICE_UUID in adv.service_uuids  # 16-bit list
    assert adv.manufacturer_data == {0xFFFF: b"GR\x01"}
    assert adv.tx_power == 0

    async with BleakScanner(
        service_uuids=["0000feed-0000-1000-8000-00805f9b34fb"],
        backend=BumbleBleakScanner,
        bumble_adapter=adapter,
    ) as scanner:
        await asyncio.sleep(0.2)
    assert scanner.discovered_devices == []


# -- connection, MTU, discovery, reads and writes --------------------------------------


@pytest.mark.parametrize("server_mtu", [23, 247, 517])
async def test_connect_negotiates_mtu(
    sim_bed_factory: SimBedFactory, server_mtu: int
) -> None:
    bed = await sim_bed_factory(max_mtu=server_mtu)
    client = await connect(bed.adapter)
    rx = characteristic(client, RX_CHAR_UUID)
    tx = characteristic(client, TX_CHAR_UUID)

    assert client.mtu_size == server_mtu
    assert bed.glasses.mtu == server_mtu
    assert rx.max_write_without_response_size == server_mtu - 3
    assert set(rx.properties) == {"write-without-response", "write"}
    assert set(tx.properties) == {"notify", "read"}
    assert tx.handle == tx.obj.handle - 1  # declaration handle, as BlueZ

    assert await client.read_gatt_char(BATTERY_LEVEL_CHAR_UUID) == bytearray([87])
    assert await client.read_gatt_char(MANUFACTURER_NAME_UUID) == b"glasses-relay"

    largest = min(server_mtu - 3, 512)
    await client.write_gatt_char(rx, frame(1, largest), response=False)
    await client.write_gatt_char(rx, frame(2, largest), response=True)
    async with asyncio.timeout(5):
        assert await bed.glasses.receive() == frame(1, largest)
        assert await bed.glasses.receive() == frame(2, largest)
    with pytest.raises(ValueError, match="exceeds"):
        await client.write_gatt_char(rx, bytes(largest + 1), response=False)
    if server_mtu == 517:
        # 513 octets fit MTU - 3 but not an ATT attribute value.
        with pytest.raises(BleakGATTProtocolError) as excinfo:
            await client.write_gatt_char(rx, bytes(513), response=True)
        expected = BleakGATTProtocolErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH
        assert excinfo.value.code == expected
    await client.disconnect()
    assert not client.is_connected


async def test_pairing_and_service_filter(sim_bed: SimBed) -> None:
    client = BleakClient(
        await find_glasses(sim_bed.adapter),
        services=[SERVICE_UUID],
        pair=True,  # LE Secure Connections, Just Works
        backend=BumbleBleakClient,
        bumble_adapter=sim_bed.adapter,
    )
    await client.connect()
    assert client.is_connected
    assert [service.uuid for service in client.services] == [SERVICE_UUID]
    await client.disconnect()


# -- streaming -------------------------------------------------------------------------


async def test_20000_notifications_arrive_in_order(
    sim_bed_factory: SimBedFactory,
) -> None:
    bed = await sim_bed_factory(max_mtu=247)
    client = await connect(bed.adapter)
    sent = [frame(seq, size) for seq, size in enumerate(frame_sizes(FRAME_COUNT))]
    received: list[bytes] = []
    done = asyncio.Event()

    def on_notify(_char: BleakGATTCharacteristic, data: bytearray) -> None:
        received.append(bytes(data))
        if len(received) == FRAME_COUNT:
            done.set()

    await client.start_notify(TX_CHAR_UUID, on_notify)
    async with asyncio.timeout(5):
        await bed.glasses.subscribed.wait()
    with pytest.raises(ValueError, match="MTU"):
        await bed.glasses.notify(bytes(245))
    for data in sent:
        await bed.glasses.notify(data)
    async with asyncio.timeout(30):
        await done.wait()
    assert [_SEQ.unpack_from(d)[0] for d in received] == list(range(FRAME_COUNT))
    assert received == sent
    await client.stop_notify(TX_CHAR_UUID)
    await client.disconnect()


async def test_20000_writes_without_response_arrive_in_order(
    sim_bed_factory: SimBedFactory,
) -> None:
    bed = await sim_bed_factory(max_mtu=247)
    client = await connect(bed.adapter)
    rx = characteristic(client, RX_CHAR_UUID)
    sent = [frame(seq, size) for seq, size in enumerate(frame_sizes(FRAME_COUNT))]

    async def collect() -> list[bytes]:
        return [await bed.glasses.receive() for _ in range(FRAME_COUNT)]

    collector = asyncio.create_task(collect())
    for data in sent:
        await client.write_gatt_char(rx, data, response=False)
    async with asyncio.timeout(30):
        received = await collector
    assert [_SEQ.unpack_from(d)[0] for d in received] == list(range(FRAME_COUNT))
    assert received == sent
    assert bed.glasses.rx_dropped == 0
    await client.disconnect()


# -- link loss and reconnection --------------------------------------------------------


async def test_glasses_drop_link_then_reconnect(sim_bed: SimBed) -> None:
    lost = asyncio.Event()
    client = await connect(
        sim_bed.adapter, disconnected_callback=lambda _client: lost.set()
    )
    await sim_bed.glasses.disconnect(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
    async with asyncio.timeout(2):
        await lost.wait()
    assert not client.is_connected
    backend = client._backend  # the reason is not in bleak's API
    assert isinstance(backend, BumbleBleakClient)
    assert backend.last_disconnect_reason == hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR
    with pytest.raises(BleakError):
        _ = client.services

    again = await connect(sim_bed.adapter)  # glasses advertise again by themselves
    await again.write_gatt_char(RX_CHAR_UUID, b"after", response=True)
    async with asyncio.timeout(2):
        assert await sim_bed.glasses.receive() == b"after"
    await again.disconnect()


async def test_connect_to_absent_glasses_is_bounded(
    sim_bed_factory: SimBedFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bed = await sim_bed_factory(start_glasses=False)
    loop = asyncio.get_running_loop()
    target = BLEDevice(GLASSES_DEFAULT_ADDRESS, None, None)

    client = BleakClient(target, backend=BumbleBleakClient, bumble_adapter=bed.adapter)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.connect(timeout=1.0)
    assert loop.time() - started < 3.0

    monkeypatch.setattr(bleak_retry_connector, "BLEAK_TIMEOUT", 0.5)
    started = loop.time()
    with pytest.raises(BleakNotFoundError):
        await establish_connection(
            BleakClient,
            target,
            "glasses",
            max_attempts=2,
            backend=BumbleBleakClient,
            bumble_adapter=bed.adapter,
        )
    assert loop.time() - started < 5.0

    # The cancelled connects left the controller usable.
    await bed.glasses.start()
    connected = await establish_connection(
        BleakClient,
        target,
        "glasses",
        max_attempts=2,
        backend=BumbleBleakClient,
        bumble_adapter=bed.adapter,
    )
    assert connected.is_connected
    await connected.disconnect()


# -- timing model ----------------------------------------------------------------------


async def test_shaped_android_2m_goodput(sim_bed_factory: SimBedFactory) -> None:
    profile = get_profile("android-2m")
    bed = await sim_bed_factory(profile, max_mtu=profile.att_mtu)
    client = await connect(bed.adapter)
    rx = characteristic(client, RX_CHAR_UUID)
    size = rx.max_write_without_response_size
    assert size == 244
    payload = bytes(size)
    loop = asyncio.get_running_loop()
    ceiling = profile.ceiling_bytes_per_s

    def goodput(arrivals: list[float]) -> float:
        # Frames after the first connection event's burst, over the time from
        # that burst to the last one: whole connection events only.
        later = [t for t in arrivals if t - arrivals[0] > BURST_S]
        return len(later) * size / (arrivals[-1] - arrivals[0])

    notified: list[float] = []
    all_arrived = asyncio.Event()
    expected = [0]  # frames sent, known once the pump stops

    def on_notify(_char: BleakGATTCharacteristic, _data: bytearray) -> None:
        notified.append(loop.time())
        if len(notified) == expected[0]:
            all_arrived.set()

    await client.start_notify(TX_CHAR_UUID, on_notify)
    async with asyncio.timeout(5):
        await bed.glasses.subscribed.wait()
    sent = 0
    end = loop.time() + 2.0
    while loop.time() < end:
        await bed.glasses.notify(payload)
        sent += 1
    expected[0] = sent
    if len(notified) == sent:
        all_arrived.set()
    async with asyncio.timeout(5):  # drain before measuring the other direction
        await all_arrived.wait()
    notify_rate = goodput(notified)

    written: list[float] = []

    async def consume() -> None:
        while True:
            await bed.glasses.receive()
            written.append(loop.time())

    consumer = asyncio.create_task(consume())
    end = loop.time() + 1.5
    while loop.time() < end:
        await client.write_gatt_char(rx, payload, response=False)
    await asyncio.sleep(0.1)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    write_rate = goodput(written)

    print(
        f"\nandroid-2m ceiling {ceiling:,.0f} B/s: notify {notify_rate:,.0f} B/s "
        f"({notify_rate / ceiling:.3f}), write {write_rate:,.0f} B/s "
        f"({write_rate / ceiling:.3f})"
    )
    assert notify_rate >= 0.9 * ceiling
    assert write_rate >= 0.9 * ceiling
    assert notify_rate <= 1.05 * ceiling
    assert write_rate <= 1.05 * ceiling
    await client.disconnect()


# -- capture ---------------------------------------------------------------------------


async def test_glasses_write_btsnoop(
    sim_bed_factory: SimBedFactory, tmp_path: Path
) -> None:
    capture = tmp_path / "glasses.btsnoop"
    bed = await sim_bed_factory(snoop_path=capture)
    client = await connect(bed.adapter)
    await client.disconnect()
    await bed.glasses.stop()  # closes the capture file
    data = await asyncio.to_thread(capture.read_bytes)
    assert data.startswith(b"btsnoop\0")
    assert len(data) > 16 + 24 * 10


# -- cross-process: glasses + phone controller in another process over H4/TCP ----------


async def test_cross_process_two_successive_adapters() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.sim.peripheral",
        "--hci",
        "tcp-server:127.0.0.1:0",
        "--profile",
        "android-2m",
        "--echo",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            ready = await process.stdout.readline()
        word, port = ready.decode().split()
        assert word == "READY"
        for attempt in range(2):
            adapter = await BumbleAdapter.open(f"tcp-client:127.0.0.1:{port}")
            try:
                client = await connect(adapter)
                assert client.mtu_size == 247
                echoes: asyncio.Queue[bytes] = asyncio.Queue()
                await client.start_notify(TX_CHAR_UUID, enqueue_into(echoes))
                message = frame(attempt, 200)
                await client.write_gatt_char(RX_CHAR_UUID, message, response=False)
                async with asyncio.timeout(5):
                    assert await echoes.get() == message
            finally:
                # No HCI Disconnect: the transport just goes away, as when the
                # daemon is SIGKILLed. The next adapter must still connect.
                await adapter.close(disconnect=False)
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(10):
            await process.communicate()
    assert process.returncode == 0


async def test_hci_server_gives_each_client_a_fresh_start() -> None:
    async with GlassesHciServer(profile=UNSHAPED) as server:
        spec = f"tcp-client:127.0.0.1:{server.port}"
        # A host dies in the middle of an H4 packet (HCI Reset, length missing).
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x01\x03\x0c")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

        first = await BumbleAdapter.open(spec)
        try:
            # A second host takes over while the first is still attached.
            second = await BumbleAdapter.open(spec)
            try:
                client = await connect(second)
                await client.write_gatt_char(RX_CHAR_UUID, b"fresh", response=True)
                assert server.glasses is not None
                async with asyncio.timeout(2):
                    assert await server.glasses.receive() == b"fresh"
                await client.disconnect()
            finally:
                await second.close()
        finally:
            await first.close(disconnect=False)
