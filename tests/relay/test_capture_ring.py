"""The daemon's rolling capture: bounds, drop policy, batches, crash files, keys."""

from __future__ import annotations

import asyncio
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from protocol.capture import read_capture
from protocol.capture.stream import LinkEvent
from relay.ble.link import BackendSpec
from relay.capture_ring import (
    EVENT_OVERHEAD,
    MIN_RING_BYTES,
    CaptureRing,
    RingConfig,
    captures_dir,
)
from relay.config import flags_from_args, load_config
from relay.daemon import Daemon, DaemonConfig, supervise
from relay.errors import ConfigError
from relay.outbox import Outbox
from relay.state import ensure_state_dir

if TYPE_CHECKING:
    from bleak import BleakClient

    from relay.ble.link import BleLink

TSHARK = shutil.which("tshark")
PEER = "F0:F0:F0:F0:F0:F0"
NAME = re.compile(r"ring-\d{8}-\d{6}(-\d+)?\.pcapng")


class FakeClient:
    """What the ring reads of a bleak client (no services: ours are assumed)."""

    address = PEER
    mtu_size = 247
    services: tuple[object, ...] = ()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LINK = cast("BleLink", object())
CLIENT = cast("BleakClient", FakeClient())


def make_ring(
    tmp_path: Path, minutes: int = 1, max_bytes: int = MIN_RING_BYTES
) -> tuple[CaptureRing, Clock]:
    clock = Clock()
    ring = CaptureRing(
        RingConfig(minutes, max_bytes),
        tmp_path / "captures",
        clock=clock,
        wall=1_700_000_000.0,
    )
    return ring, clock


def values_of(data: bytes) -> list[bytes]:
    return [op.value for op in read_capture(data).att if op.opcode in (0x1B, 0x52)]


async def test_byte_cap_drops_the_oldest_first_and_counts_them(tmp_path: Path) -> None:
    ring, clock = make_ring(tmp_path)
    ring.link_up(LINK, CLIENT)
    values = [i.to_bytes(4, "big") + bytes(252) for i in range(1000)]
    for i, value in enumerate(values):
        clock.now += 0.001
        if i % 2:
            ring.value_received(LINK, value)
        else:
            ring.value_written(LINK, value)
    stats = ring.stats()
    assert isinstance(stats["bytes"], int)
    assert MIN_RING_BYTES - (256 + EVENT_OVERHEAD) < stats["bytes"] <= MIN_RING_BYTES
    assert ring.dropped_age == 0
    assert ring.dropped_bytes > 0
    assert len(ring) + ring.dropped_bytes == ring.recorded == 1001
    doc = ring.batch(0)
    assert doc["missed"] == ring.dropped_bytes  # the "up" went first, then values
    assert doc["more"] is False
    events = doc["events"]
    assert isinstance(events, list)
    kept = [LinkEvent.from_json(e).value for e in events]
    assert kept == values[-len(kept) :]  # the newest, in order
    # The link's "up" is gone from the ring, yet the file synthesizes it.
    data = await ring.pcapng()
    capture = read_capture(data)
    assert len(capture.connections) == 1
    assert capture.connections[0].peer == PEER
    assert values_of(data) == kept
    if TSHARK is not None:
        done = await asyncio.to_thread(
            subprocess.run, [TSHARK, "-r", "-", "-q", "-z", "expert"], input=data,
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        out = done.stdout.decode()
        assert "Errors" not in out
        assert "Warnings" not in out


async def test_old_events_leave_the_window_and_are_counted(tmp_path: Path) -> None:
    ring, clock = make_ring(tmp_path, minutes=1)
    ring.link_up(LINK, CLIENT)
    for _ in range(10):
        clock.now += 1
        ring.value_received(LINK, b"old")
    clock.now += 55
    ring.value_received(LINK, b"new")
    assert ring.dropped_age == 5  # the "up" and four values are over 60 s old
    clock.now += 61
    assert ring.stats()["events"] == 0  # reading prunes too
    assert ring.dropped_age == 12
    assert ring.dropped_bytes == 0
    # The link is still up: a new value brings it back in a file.
    ring.value_written(LINK, b"after")
    assert values_of(await ring.pcapng()) == [b"after"]


def test_batches_follow_since_with_bounds(tmp_path: Path) -> None:
    ring, clock = make_ring(tmp_path)
    start = ring.batch(None)
    assert start["last"] == 0
    assert start["events"] == []
    ring.link_up(LINK, CLIENT)
    for i in range(5):
        clock.now += 0.1
        ring.value_received(LINK, bytes([i]))
    ring.link_down(LINK)
    doc = ring.batch(0, limit=4)
    assert doc["last"] == 4
    assert doc["more"] is True
    assert doc["missed"] == 0
    links = doc["links"]
    assert isinstance(links, dict)
    assert set(links) == {"1"}
    rest = ring.batch(4)
    assert rest["more"] is False
    assert rest["last"] == 7
    events = rest["events"]
    assert isinstance(events, list)
    assert [LinkEvent.from_json(e).kind.value for e in events] == [
        "notify", "notify", "down",
    ]  # fmt: skip
    assert ring.batch(7)["events"] == []
    # A number beyond the ring (another daemon since): from the oldest again.
    again = ring.batch(99)["events"]
    assert isinstance(again, list)
    assert len(again) == 7


async def test_a_component_failure_writes_the_ring_once_per_interval(
    tmp_path: Path,
) -> None:
    ring, _ = make_ring(tmp_path)
    ring.link_up(LINK, CLIENT)
    ring.value_received(LINK, b"\x01" * 20)
    ring.value_written(LINK, b"\x02" * 8)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("a bug")

    restarts: dict[str, int] = {}
    await asyncio.wait_for(
        supervise(
            "flaky", flaky, restarts, base=0.01, cap=0.02,
            on_failure=ring.write_after_crash,
        ),
        5,
    )  # fmt: skip
    assert restarts == {"flaky": 2}
    files = sorted((tmp_path / "captures").iterdir())
    assert len(files) == 1  # the second failure came within CRASH_INTERVAL_S
    assert NAME.fullmatch(files[0].name)
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "captures").stat().st_mode) == 0o700
    assert values_of(files[0].read_bytes()) == [b"\x01" * 20, b"\x02" * 8]
    # An empty ring writes nothing, even at the end.
    empty, _ = make_ring(tmp_path / "empty")
    assert await empty.write_after_crash("x", final=True) is None


async def test_an_exception_leaving_the_daemon_writes_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ensure_state_dir(tmp_path / "state")
    ensure_state_dir(state / "phone")
    outbox = await Outbox.open(state / "phone" / "outbox.sqlite3")
    try:
        config = DaemonConfig(state_dir=state, capture=RingConfig(minutes=1))
        daemon = Daemon(config, BackendSpec(), None, outbox=outbox)
        ring = daemon.capture
        assert ring is not None
        daemon.links = []  # no radio here; the ring is fed by hand
        ring.link_up(LINK, CLIENT)
        ring.value_written(LINK, b"last words")

        async def permanent() -> None:
            raise ConfigError("refused")  # not restarted: leaves Daemon.run

        monkeypatch.setattr(daemon, "_refresh_outbox_stats", permanent)
        with pytest.raises(ExceptionGroup):
            await asyncio.wait_for(daemon.run(), 10)
        await daemon.close()
    finally:
        await outbox.close()
    (path,) = captures_dir(state).iterdir()
    assert NAME.fullmatch(path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert values_of(path.read_bytes()) == [b"last words"]


def test_capture_keys_come_from_flags_environment_and_defaults(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "config.toml"
    empty.write_text("")
    assert load_config({}, {}, empty).capture == RingConfig()
    assert not RingConfig().enabled
    flags = flags_from_args({"capture_ring": "5"}, {})
    assert flags == {"capture.ring_minutes": "5"}
    env = {"GLASSES_RELAY_CAPTURE_RING_BYTES": "1048576"}
    assert load_config(flags, env, empty).capture == RingConfig(5, 1 << 20)
    with pytest.raises(ConfigError, match=r"capture\.ring_bytes.*from 65536"):
        load_config({}, {"GLASSES_RELAY_CAPTURE_RING_BYTES": "10"}, empty)
    with pytest.raises(ConfigError, match=r"capture\.ring_minutes.*--capture-ring"):
        load_config({"capture.ring_minutes": "-1"}, {}, empty)
