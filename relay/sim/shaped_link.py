"""A timed virtual radio: LL data moves only at connection events, at air-time cost.

bumble's :class:`~bumble.link.LocalLink` delivers ACL data on the next loop
iteration and its controller returns HCI credits at once, so an emulated link
runs ~100x faster than a real one and the host never sees back-pressure.
:class:`ShapedLink` keeps LocalLink's routing and adds the timing model of
../shared/design/BLE-TESTBED.md §4:

* every connection has connection events on a fixed grid (``interval_ms``);
* an event carries PDU exchanges (central -> peripheral, then peripheral ->
  central; a side with nothing to send sends an empty PDU) until the event's
  time or the profile's per-event cap runs out. An exchange costs
  ``air(c) + T_IFS + air(p) + T_IFS`` with ``air(n) = (preamble + 4 + 2 + n + 3)
  * 8 / rate``;
* an HCI ACL packet is split into LL PDUs of at most ``ll_payload`` octets; it
  reaches the peer, and its HCI credit (Number Of Completed Packets) returns to
  its host, when its last LL PDU has been on air.

The link works with :class:`relay.sim.controller_fixes.FixedController`, which
hands it the ACL data (see :class:`~relay.sim.controller_fixes.AclScheduler`).
Control PDUs (connect, terminate, encryption) stay instantaneous.

:class:`AclCreditGate` is the host-side companion: it makes a sender wait
while too many of its ACL packets are pending, so bursts are paced by the
credits instead of growing bumble's unbounded host queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from typing import TYPE_CHECKING, Final

from bumble import hci
from bumble.link import LocalLink

from relay.sim.profiles import T_IFS_US

if TYPE_CHECKING:
    from bumble import controller as bumble_controller
    from bumble import device as bumble_device

    from relay.sim.controller_fixes import FixedController
    from relay.sim.profiles import LinkProfile

__all__ = [
    "DEFAULT_MAX_PENDING_ACL_PACKETS",
    "MAX_CATCHUP_EVENTS",
    "AclCreditGate",
    "ShapedLink",
    "make_link",
]

logger = logging.getLogger(__name__)

MAX_CATCHUP_EVENTS: Final = 3
"""Connection events run back to back when the loop woke up late.

A real radio keeps its schedule while the host CPU is busy; catching up a few
missed events keeps the average rate right on a loaded machine without letting
a long stall turn into an unrealistic burst.
"""

DEFAULT_MAX_PENDING_ACL_PACKETS: Final = 32
"""Default :class:`AclCreditGate` limit: HCI ACL packets queued or in flight."""

_UNCAPPED: Final = 1 << 30
_CENTRAL: Final = 0
_PERIPHERAL: Final = 1


class _TxItem:
    """One HCI ACL packet waiting for air time."""

    __slots__ = ("connection", "packet", "remaining")

    def __init__(
        self, connection: bumble_controller.Connection, packet: hci.HCI_AclDataPacket
    ) -> None:
        self.connection = connection
        self.packet = packet
        self.remaining = len(packet.data)


class _LinkConnection:
    """Air-side state of one LE connection (both ends)."""

    __slots__ = (
        "controllers",
        "key",
        "next_anchor",
        "origin",
        "queues",
        "sides",
        "timer",
    )

    def __init__(self, key: tuple[bytes, bytes], now: float) -> None:
        self.key = key
        self.sides: list[bumble_controller.Connection | None] = [None, None]
        self.controllers: list[FixedController | None] = [None, None]
        self.queues: tuple[collections.deque[_TxItem], collections.deque[_TxItem]] = (
            collections.deque(),
            collections.deque(),
        )
        self.origin = now
        self.next_anchor = now
        self.timer: asyncio.TimerHandle | None = None


def _side_of(connection: bumble_controller.Connection) -> int:
    return _CENTRAL if connection.role == hci.Role.CENTRAL else _PERIPHERAL


def _key_of(connection: bumble_controller.Connection) -> tuple[bytes, bytes]:
    """(central address, peripheral address) of a controller-side connection."""
    if connection.role == hci.Role.CENTRAL:
        return bytes(connection.self_address), bytes(connection.peer_address)
    return bytes(connection.peer_address), bytes(connection.self_address)


class ShapedLink(LocalLink):
    """LocalLink with connection events, air time and delayed HCI credits.

    Construct it inside a running event loop and pass it as ``link=`` to every
    :class:`~relay.sim.controller_fixes.FixedController` that shares the radio.

    Attributes:
        profile: The timing profile.
        events: Connection events run so far (all connections).
        ll_pdus: LL data PDUs carried so far (both directions).
        acl_packets: HCI ACL packets delivered so far (both directions).
    """

    def __init__(
        self, profile: LinkProfile, *, max_catchup_events: int = MAX_CATCHUP_EVENTS
    ) -> None:
        """Create the link.

        Args:
            profile: Timing profile; must be shaped.
            max_catchup_events: See :data:`MAX_CATCHUP_EVENTS`.

        Raises:
            ValueError: the profile is not shaped, or ``max_catchup_events`` < 1.
        """
        if not profile.shaped:
            raise ValueError(f"profile {profile.name!r} is not shaped: use LocalLink")
        if max_catchup_events < 1:
            raise ValueError("max_catchup_events must be >= 1")
        super().__init__()  # type: ignore[no-untyped-call]  # untyped in bumble
        self.profile = profile
        self._loop = asyncio.get_running_loop()
        self._interval_s = profile.interval_ms / 1000.0
        self._budget_us = profile.interval_us
        self._cap = profile.max_packets_per_event or _UNCAPPED
        self._ll_payload = profile.ll_payload
        self._air_us = [profile.air_time_us(n) for n in range(profile.ll_payload + 1)]
        self._max_catchup = max_catchup_events
        self._links: dict[tuple[bytes, bytes], _LinkConnection] = {}
        self.events = 0
        self.ll_pdus = 0
        self.acl_packets = 0

    # -- AclScheduler ----------------------------------------------------------

    def submit_acl(
        self,
        controller: FixedController,
        connection: bumble_controller.Connection,
        packet: hci.HCI_AclDataPacket,
    ) -> None:
        """Queue one host ACL packet for air time (called by the controller)."""
        key = _key_of(connection)
        side = _side_of(connection)
        link = self._links.get(key)
        if link is None or (
            link.sides[side] is not None and link.sides[side] is not connection
        ):
            if link is not None and link.timer is not None:
                link.timer.cancel()
            link = _LinkConnection(key, self._loop.time())
            self._links[key] = link
        link.sides[side] = connection
        link.controllers[side] = controller
        link.queues[side].append(_TxItem(connection, packet))
        if link.timer is None:
            self._arm(link, self._loop.time())

    def connection_closed(
        self, controller: FixedController, connection: bumble_controller.Connection
    ) -> None:
        """Drop the queued data of a closed connection (no credits returned)."""
        del controller  # the connection identifies the link
        key = _key_of(connection)
        link = self._links.get(key)
        if link is None:
            return
        current = link.sides[_side_of(connection)]
        if current is not None and current is not connection:
            return  # a newer connection between the same two devices
        del self._links[key]
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None

    def close(self) -> None:
        """Cancel all connection-event timers (call at teardown)."""
        for link in self._links.values():
            if link.timer is not None:
                link.timer.cancel()
        self._links.clear()

    # -- connection events -------------------------------------------------------

    def _arm(self, link: _LinkConnection, now: float) -> None:
        if link.next_anchor < now:
            elapsed = math.ceil((now - link.origin) / self._interval_s)
            link.next_anchor = link.origin + elapsed * self._interval_s
        link.timer = self._loop.call_at(link.next_anchor, self._on_anchor, link)

    def _on_anchor(self, link: _LinkConnection) -> None:
        link.timer = None
        if self._links.get(link.key) is not link:
            return
        now = self._loop.time()
        due = 1 + max(0, int((now - link.next_anchor) / self._interval_s))
        link.next_anchor += due * self._interval_s
        completed = [0, 0]
        for _ in range(min(due, self._max_catchup)):
            if not self._run_event(link, completed):
                break
        self._return_credits(link, completed)
        if link.queues[_CENTRAL] or link.queues[_PERIPHERAL]:
            self._arm(link, now)

    def _run_event(self, link: _LinkConnection, completed: list[int]) -> bool:
        """Run one connection event; return whether data is still queued."""
        self.events += 1
        to_peripheral, to_central = link.queues
        air = self._air_us
        ll_payload = self._ll_payload
        budget = self._budget_us
        used = 0.0
        exchanges = 0
        while exchanges < self._cap:
            c_item = to_peripheral[0] if to_peripheral else None
            p_item = to_central[0] if to_central else None
            if c_item is None and p_item is None:
                return False
            c_len = min(c_item.remaining, ll_payload) if c_item is not None else 0
            p_len = min(p_item.remaining, ll_payload) if p_item is not None else 0
            cost = air[c_len] + air[p_len] + 2 * T_IFS_US
            if used + cost > budget and exchanges:
                break
            used += cost
            exchanges += 1
            if c_item is not None:
                self.ll_pdus += 1
                c_item.remaining -= c_len
                if c_item.remaining <= 0:
                    to_peripheral.popleft()
                    self._deliver(c_item)
                    completed[_CENTRAL] += 1
            if p_item is not None:
                self.ll_pdus += 1
                p_item.remaining -= p_len
                if p_item.remaining <= 0:
                    to_central.popleft()
                    self._deliver(p_item)
                    completed[_PERIPHERAL] += 1
        return bool(to_peripheral or to_central)

    def _deliver(self, item: _TxItem) -> None:
        self.acl_packets += 1
        # Reassembles the L2CAP PDU and, when complete, routes it to the peer
        # through LocalLink.send_acl_data (next loop iteration).
        item.connection.assembler.feed_packet(item.packet)

    def _return_credits(self, link: _LinkConnection, completed: list[int]) -> None:
        for side in (_CENTRAL, _PERIPHERAL):
            count = completed[side]
            connection = link.sides[side]
            controller = link.controllers[side]
            if count and connection is not None and controller is not None:
                controller.send_hci_packet(
                    hci.HCI_Number_Of_Completed_Packets_Event(
                        connection_handles=[connection.handle],
                        num_completed_packets=[count],
                    )
                )


def make_link(profile: LinkProfile) -> LocalLink:
    """Create the virtual radio for a profile (inside a running loop).

    Args:
        profile: A shaped profile, or :data:`~relay.sim.profiles.UNSHAPED`.

    Returns:
        A :class:`ShapedLink` for shaped profiles, else a plain ``LocalLink``.
    """
    if profile.shaped:
        return ShapedLink(profile)
    return LocalLink()  # type: ignore[no-untyped-call]  # untyped in bumble


class AclCreditGate:
    """Back-pressure for one connection's sender, driven by HCI credits.

    :meth:`wait` returns once fewer than ``max_pending`` HCI ACL packets of the
    host are queued or in flight (bumble's ``DataPacketQueue.pending``), waking
    on the queue's ``flow`` event. This is how a phone paces write-without-
    response on ``onCharacteristicWrite`` and how glasses firmware paces
    notifications on TX-complete events: bursts are never dropped and the
    host queue stays bounded.
    """

    def __init__(
        self,
        connection: bumble_device.Connection,
        max_pending: int = DEFAULT_MAX_PENDING_ACL_PACKETS,
    ) -> None:
        """Attach to a live connection.

        Args:
            connection: The bumble device-side connection.
            max_pending: Wait while this many HCI ACL packets are pending.

        Raises:
            ValueError: ``max_pending`` < 1, or the connection has no ACL queue
                (it is already closed).
        """
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        queue = connection.data_packet_queue
        if queue is None:
            raise ValueError("connection has no ACL packet queue (closed?)")
        self._queue = queue
        self._connection = connection
        self._max_pending = max_pending
        self._event = asyncio.Event()
        self._closed = False
        queue.on("flow", self._on_flow)
        connection.on("disconnection", self._on_disconnection)

    @property
    def pending(self) -> int:
        """HCI ACL packets queued in the host or in flight in the controller."""
        pending: int = self._queue.pending
        return pending

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (or :meth:`close` was called)."""
        return self._closed

    async def wait(self) -> bool:
        """Wait for room in the ACL pipeline.

        Returns:
            ``True`` when the caller may send, ``False`` when the connection
            closed meanwhile.
        """
        while not self._closed and self._queue.pending >= self._max_pending:
            self._event.clear()
            await self._event.wait()
        return not self._closed

    def close(self) -> None:
        """Detach from the queue and the connection, waking any waiter."""
        if self._closed:
            return
        self._closed = True
        self._queue.remove_listener("flow", self._on_flow)
        self._connection.remove_listener("disconnection", self._on_disconnection)
        self._event.set()

    def _on_flow(self) -> None:
        self._event.set()

    def _on_disconnection(self, reason: int) -> None:
        del reason
        self.close()
