"""``glasses-relay bench link``: the BLE link layer alone against its ceiling.

The daemon's own link code (:class:`relay.ble.link.BleLink` through bleak,
with the protocol's :class:`~protocol.link.LinkSender` and
:class:`~protocol.link.Reassembler`) over emulated glasses on a shaped link.
One direction is saturated with records (no session crypto) for
``--duration`` seconds after connect and discovery, which are not timed.

The application payload is the record bytes handed to the fragmenter; the
2-byte fragment headers are overhead. Every record carries a sequence number
so loss and reordering are counted, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Final

from protocol.constants import Channel
from protocol.events import RecordReassembled
from protocol.link import LinkSender, Reassembler
from relay.ble.link import BleLink, LinkConfig
from relay.sim.bed import backend_for
from relay.sim.bleak_bumble import BumbleAdapter
from relay.sim.peripheral import GlassesConfig, GlassesPeripheral
from relay.sim.profiles import LinkProfile
from relay.sim.shaped_link import ShapedLink, make_link

__all__ = ["LinkBenchResult", "run_link_bench"]

RECORD_BYTES: Final = 960
"""Payload per record: a few fragments each, like sealed voice and photo records."""
_SEQ: Final = struct.Struct(">Q")
_DRAIN_S: Final = 3.0
_SENDER_QUEUE: Final = 2
"""Records queued in the fragmenter ahead of the link (keeps offered honest)."""


@dataclass(frozen=True, slots=True)
class LinkBenchResult:
    """What one run measured."""

    profile: str
    direction: str
    duration_s: float
    fragment_size: int
    bytes_offered: int
    bytes_delivered: int
    goodput_bytes_per_s: float
    ceiling_bytes_per_s: float
    goodput_ratio: float
    link_efficiency: float
    frames: int
    lost: int
    reordered: int

    def to_json(self) -> dict[str, object]:
        """The fields as a JSON-ready mapping."""
        return asdict(self)


class _Counter:
    """Records delivered, by sequence number, with their time of arrival."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self.reordered = 0
        self.duplicates = 0
        self.arrived = asyncio.Event()
        self._last = -1

    def record(self, data: bytes, now: float) -> None:
        (seq,) = _SEQ.unpack_from(data)
        if seq in self.arrivals:
            self.duplicates += 1
            return
        if seq < self._last:
            self.reordered += 1
        self._last = max(self._last, seq)
        self.arrivals[seq] = now
        self.sizes[seq] = len(data)
        self.arrived.set()


async def run_link_bench(
    profile: LinkProfile,
    *,
    direction: str = "up",
    duration: float = 20.0,
    progress: bool = False,
) -> LinkBenchResult:
    """Run one direction for ``duration`` seconds; see the module docstring.

    Raises:
        relay.errors.LinkError: the emulated link could not be set up.
    """
    link = make_link(profile)
    glasses_config = GlassesConfig(max_mtu=profile.att_mtu)
    peripheral = GlassesPeripheral(link, glasses_config)
    adapter = BumbleAdapter.on_link(link)
    await peripheral.start()
    ble: BleLink | None = None
    try:
        ble = await BleLink.connect(LinkConfig(), backend_for(adapter))
        await peripheral.subscribed.wait()
        fragment_size = (
            min(512, peripheral.max_notify_size)
            if direction == "up"
            else ble.max_fragment_size
        )
        return await _measure(
            profile, direction, duration, ble, peripheral, fragment_size, progress
        )
    finally:
        if ble is not None:
            await ble.aclose()
        await adapter.close()
        await peripheral.stop()
        if isinstance(link, ShapedLink):
            link.close()


async def _measure(
    profile: LinkProfile,
    direction: str,
    duration: float,
    ble: BleLink,
    peripheral: GlassesPeripheral,
    fragment_size: int,
    progress: bool,
) -> LinkBenchResult:
    sender = LinkSender()
    reassembler = Reassembler()
    counter = _Counter()
    offered: dict[int, float] = {}
    frames = 0
    stop_offering = asyncio.Event()
    loop = asyncio.get_running_loop()
    filler = bytes(range(256)) * (RECORD_BYTES // 256 + 1)

    async def send() -> None:
        nonlocal frames
        seq = 0
        while True:
            while sender.pending_bytes < _SENDER_QUEUE * RECORD_BYTES and not (
                stop_offering.is_set()
            ):
                record = _SEQ.pack(seq) + filler[: RECORD_BYTES - _SEQ.size]
                sender.queue(record, Channel.BULK)
                offered[seq] = loop.time()
                seq += 1
            piece = sender.pull(fragment_size)
            if piece is None:
                return
            if direction == "up":
                await peripheral.notify(piece)
            else:
                await ble.write(piece)
            frames += 1

    async def receive() -> None:
        while True:
            piece = await (ble.recv() if direction == "up" else peripheral.receive())
            now = loop.time()
            for event in reassembler.feed(piece, now):
                if isinstance(event, RecordReassembled):
                    counter.record(event.record, now)

    sender_task = asyncio.create_task(send())
    receiver_task = asyncio.create_task(receive())
    try:
        await asyncio.sleep(1.0)  # warm-up: the pipeline fills, then we time
        start = loop.time()
        first_seq = max(offered) + 1 if offered else 0
        deadline = start + duration
        while (now := loop.time()) < deadline:
            await asyncio.sleep(min(1.0, deadline - now))
            if progress:
                done = sum(counter.sizes[s] for s in counter.arrivals if s >= first_seq)
                print_progress(now - start, duration, done / max(1e-9, now - start))
        end = loop.time()
        stop_offering.set()
        last_seq = max(offered)
        # Let what was offered in the window arrive (it is counted as offered).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_S):
                while any(
                    s not in counter.arrivals for s in range(first_seq, last_seq + 1)
                ):
                    counter.arrived.clear()
                    await counter.arrived.wait()
    finally:
        sender_task.cancel()
        receiver_task.cancel()
        await asyncio.gather(sender_task, receiver_task, return_exceptions=True)
    window = [s for s in offered if first_seq <= s and offered[s] <= end]
    bytes_offered = RECORD_BYTES * len(window)
    delivered = [s for s in window if s in counter.arrivals]
    in_window = [s for s in counter.arrivals if start <= counter.arrivals[s] <= end]
    goodput = RECORD_BYTES * len(in_window) / (end - start)
    ceiling = profile.ceiling_bytes_per_s
    return LinkBenchResult(
        profile=profile.name,
        direction=direction,
        duration_s=round(end - start, 3),
        fragment_size=fragment_size,
        bytes_offered=bytes_offered,
        bytes_delivered=RECORD_BYTES * len(delivered),
        goodput_bytes_per_s=round(goodput, 1),
        ceiling_bytes_per_s=round(ceiling, 1),
        goodput_ratio=round(len(delivered) / len(window), 6) if window else 0.0,
        link_efficiency=round(goodput / ceiling, 4),
        frames=frames,
        lost=len(window) - len(delivered),
        reordered=counter.reordered,
    )


def print_progress(elapsed: float, total: float, rate: float) -> None:
    """One progress line on standard error."""
    sys.stderr.write(f"\r  {elapsed:5.1f}/{total:.0f} s  {rate / 1000:8.1f} kB/s")
    sys.stderr.flush()
