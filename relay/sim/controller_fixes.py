"""bumble virtual controller fixes, a leaner host, and an HCI TCP server.

bumble 0.0.236's :class:`bumble.controller.Controller` has defects that break
a realistic phone/glasses emulation (../shared/design/BLE-TESTBED.md §2.5);
:class:`FixedController` repairs the ones that matter here:

* **LE Create Connection Cancel** only answered SUCCESS: the pending connection
  stayed and no LE Connection Complete followed, so ``Device.connect(timeout=)``
  hung and every later connect failed with COMMAND_DISALLOWED. Here the pending
  connection is cleared and LE Connection Complete (status
  UNKNOWN_CONNECTION_IDENTIFIER) follows the Command Complete.
* **Buffers**: LE ACL data packet length and max TX/RX octets default to 27,
  which makes the host fragment every 244-byte notification into ten HCI
  packets (10x CPU). Here they are 251.
* **HCI Reset** was a no-op ("TODO"). Here it drops every LE link (the peer
  sees a supervision timeout, reason 0x08), stops advertising and scanning and
  forgets a pending connection, so a new host process starts from a clean
  controller.
* **Scan response**: the scanner reported the advertising data twice (once as
  ADV_IND, once as SCAN_RSP) and never the advertiser's scan response data.
  Here an active scan reports the real scan response. The controller offers
  legacy advertising only (no LE Extended/Periodic Advertising feature bits), so
  hosts use the legacy advertising, scanning and connection commands.
* **Host -> controller credits** (Number Of Completed Packets) were returned at
  once. When the controller sits on an :class:`AclScheduler` link
  (:class:`relay.sim.shaped_link.ShapedLink`), ACL data is handed to the link,
  which returns the credits after "air" delivery.

:class:`FastHost` is a bumble ``Host`` that skips formatting every HCI packet
for a DEBUG log nobody reads (bumble builds those f-strings eagerly; they were
most of the emulator's per-frame CPU).

:class:`HciTcpServer` exposes one controller as H4 over TCP. bumble's own
``tcp-server`` transport shares one H4 parser between successive clients (a
client killed mid-packet corrupts the next one's stream) and keeps the dead
client's link state; this server gives every client a fresh parser and resets
the controller when a client comes or goes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Final, Protocol, cast, runtime_checkable

from bumble import core, hci, ll
from bumble.controller import Controller
from bumble.host import Host
from bumble.snoop import Snooper
from bumble.transport.common import (
    BaseSource,
    StreamPacketSink,
    Transport,
    TransportSink,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bumble import controller as bumble_controller
    from bumble.link import LocalLink

__all__ = [
    "LE_ACL_BUFFER_OCTETS",
    "LE_ACL_BUFFER_PACKETS",
    "AclScheduler",
    "FastHost",
    "FixedController",
    "H4Framer",
    "H4StreamSource",
    "HciTcpServer",
    "open_h4_tcp_client",
]

logger = logging.getLogger(__name__)
_bumble_controller_logger = logging.getLogger("bumble.controller")
_bumble_host_logger = logging.getLogger("bumble.host")

LE_ACL_BUFFER_OCTETS: Final = 251
"""LE ACL data packet length and max TX/RX octets of the fixed controller."""

LE_ACL_BUFFER_PACKETS: Final = 64
"""Host -> controller LE ACL buffers (HCI credits) of the fixed controller."""

_SCAN_TYPE_ACTIVE: Final = 1

_H4_ACL_ATT: Final = struct.Struct("<BHHHH")
"""H4 type, handle and flags, ACL length, L2CAP length, L2CAP channel id."""

_ATT_CID: Final = 0x0004
_PB_FIRST: Final = frozenset({0b00, 0b10})
"""Packet boundary flags of a first (or only) ACL fragment of an L2CAP PDU."""


@runtime_checkable
class AclScheduler(Protocol):
    """A link that carries host -> controller ACL data itself (timing model)."""

    def submit_acl(
        self,
        controller: FixedController,
        connection: bumble_controller.Connection,
        packet: hci.HCI_AclDataPacket,
    ) -> None:
        """Take one HCI ACL data packet from a controller's host.

        The link must eventually feed the packet to
        ``connection.assembler`` and return one HCI credit to ``controller``'s
        host, or drop both when the connection closes.
        """

    def connection_closed(
        self, controller: FixedController, connection: bumble_controller.Connection
    ) -> None:
        """Forget queued data of a connection that no longer exists."""


class FixedController(Controller):
    """bumble virtual controller with the test bed's fixes (see module docstring).

    Construct it inside a running event loop, exactly like
    :class:`bumble.controller.Controller`.
    """

    # Legacy advertising only: bumble's extended-advertising emulation reports
    # connectable PDUs as non-scannable and echoes ADV data as scan response.
    le_features = Controller.le_features & ~(
        hci.LeFeatureMask.LE_EXTENDED_ADVERTISING
        | hci.LeFeatureMask.LE_PERIODIC_ADVERTISING
    )
    le_acl_data_packet_length = LE_ACL_BUFFER_OCTETS
    total_num_le_acl_data_packets = LE_ACL_BUFFER_PACKETS
    supported_max_tx_octets = LE_ACL_BUFFER_OCTETS
    supported_max_rx_octets = LE_ACL_BUFFER_OCTETS
    suggested_max_tx_octets = LE_ACL_BUFFER_OCTETS

    def __init__(
        self,
        name: str,
        *,
        link: LocalLink,
        public_address: str | hci.Address | None = None,
    ) -> None:
        """Create the controller and attach it to ``link``.

        Args:
            name: Name used in bumble's logs.
            link: The virtual radio shared with the peer controllers.
            public_address: Public BD_ADDR (``"F0:F0:F0:F0:F0:F0"``), optional.
        """
        super().__init__(name, link=link, public_address=public_address)
        self._loop = asyncio.get_running_loop()
        self._scheduler: AclScheduler | None = (
            link if isinstance(link, AclScheduler) else None
        )

    # -- HCI transport (bumble formats every packet for a DEBUG log eagerly) ----

    def on_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Dispatch a host packet; skip bumble's per-packet log formatting."""
        if isinstance(packet, hci.HCI_AclDataPacket) and not (
            _bumble_controller_logger.isEnabledFor(logging.DEBUG)
        ):
            self.on_hci_acl_data_packet(packet)
        else:
            super().on_hci_packet(packet)

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Queue a packet to the host; skip bumble's per-packet log formatting."""
        if _bumble_controller_logger.isEnabledFor(logging.DEBUG):
            super().send_hci_packet(packet)
        elif (host := self.host) is not None:
            self._loop.call_soon(host.on_packet, bytes(packet))

    # -- HCI command handlers ------------------------------------------------

    def on_hci_le_create_connection_cancel_command(
        self, _command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        """Cancel the pending LE connection for real (Vol 4, Part E, 7.8.13)."""
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(
                hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR
            )
        self.pending_le_connection = None
        event = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        # The Command Complete is queued when this handler returns: queue the
        # Connection Complete behind it, as a real controller orders them.
        asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def on_hci_reset_command(
        self, _command: hci.HCI_Reset_Command
    ) -> hci.HCI_StatusReturnParameters:
        """Reset the controller state (Vol 4, Part E, 7.3.2)."""
        self.reset_state()
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def reset_state(
        self, reason: int = hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR
    ) -> None:
        """Drop links, advertising, scanning and a pending connection.

        Each LE peer is told the link ended with ``reason`` (default 0x08, the
        supervision timeout a real peer would observe); this controller's own
        host gets no Disconnection Complete (it is resetting or gone).

        Args:
            reason: HCI error code the peers see.
        """
        for connection in list(self.le_connections.values()):
            try:
                connection.send_ll_control_pdu(ll.TerminateInd(reason))
            except core.InvalidArgumentError:
                logger.debug("[%s] peer already gone at reset", self.name)
            if self._scheduler is not None:
                self._scheduler.connection_closed(self, connection)
        if self.le_connections:
            logger.info(
                "[%s] reset dropped %d LE link(s)", self.name, len(self.le_connections)
            )
        self.le_connections.clear()
        self.classic_connections.clear()
        self.sco_links.clear()
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        self.le_scan_enable = False
        self.filter_duplicates = False
        self.pending_le_connection = None

    # -- ACL data and link events --------------------------------------------

    def on_hci_acl_data_packet(self, packet: hci.HCI_AclDataPacket) -> None:
        """Route host ACL data to the link's scheduler when it has one."""
        connection = self.find_connection_by_handle(packet.connection_handle)
        if connection is None:
            logger.warning(
                "[%s] ACL data for unknown handle 0x%04X",
                self.name,
                packet.connection_handle,
            )
            return
        if (
            self._scheduler is not None
            and connection.transport == core.PhysicalTransport.LE
        ):
            self._scheduler.submit_acl(self, connection, packet)
        else:
            connection.on_hci_acl_data_packet(packet)

    def on_le_disconnected(
        self, connection: bumble_controller.Connection, reason: int
    ) -> None:
        """Report the disconnection and let the link drop queued data."""
        super().on_le_disconnected(connection, reason)
        if self._scheduler is not None:
            self._scheduler.connection_closed(self, connection)

    def on_advertising_pdu(self, pdu: ll.AdvInd | ll.AdvExtInd) -> None:
        """Report legacy advertising with the advertiser's real scan response."""
        if not isinstance(pdu, ll.AdvInd) or not self.le_scan_enable:
            super().on_advertising_pdu(pdu)
            return
        event_type = hci.HCI_LE_Advertising_Report_Event.EventType
        reports = [
            hci.HCI_LE_Advertising_Report_Event.Report(
                event_type=event_type.ADV_IND,
                address_type=pdu.advertiser_address.address_type,
                address=pdu.advertiser_address,
                data=pdu.data,
                rssi=-50,
            )
        ]
        if self.le_scan_type == _SCAN_TYPE_ACTIVE:
            reports.append(
                hci.HCI_LE_Advertising_Report_Event.Report(
                    event_type=event_type.SCAN_RSP,
                    address_type=pdu.advertiser_address.address_type,
                    address=pdu.advertiser_address,
                    data=self._scan_response_of(pdu.advertiser_address),
                    rssi=-50,
                )
            )
        for report in reports:
            self.send_hci_packet(hci.HCI_LE_Advertising_Report_Event([report]))
        pending = self.pending_le_connection
        if pending is not None and pending.peer_address == pdu.advertiser_address:
            self.create_le_connection(pdu.advertiser_address)

    def _scan_response_of(self, address: hci.Address) -> bytes:
        """Scan response data of the legacy advertiser at ``address`` (SCAN_REQ)."""
        for controller in self.link.controllers:
            advertiser = controller.le_legacy_advertiser
            if (
                controller is not self
                and advertiser.enabled
                and advertiser.address == address
            ):
                return bytes(advertiser.scan_response_data)
        return b""


class FastHost(Host):
    """bumble ``Host`` with a short path for the packets a data link is made of.

    bumble builds an f-string of every HCI packet it sends or receives, even
    when DEBUG is off, and decodes each ACL packet into objects before it
    reaches L2CAP; that was most of the emulated host's per-notification CPU
    cost. This host skips the formatting and, when :attr:`att_sink` is set,
    hands an ATT PDU that arrives whole in one ACL packet (the common case:
    a notification of at most ``LE_ACL_BUFFER_OCTETS``) straight to it,
    decoding only the five header fields. Anything else (fragmented PDUs,
    other channels, events, a connection bumble does not know, a PDU the
    sink declines) takes bumble's own path, and so does everything while the
    ``bumble.host`` logger is at DEBUG. Behaviour is unchanged.
    """

    att_sink: Callable[[int, bytes], bool] | None = None
    """``(connection_handle, att_pdu) -> consumed``; a declined PDU goes to bumble."""

    def on_packet(self, packet: bytes) -> None:
        """Take one H4 packet from the transport (the ATT short path, or bumble's)."""
        sink = self.att_sink
        if (
            sink is not None
            and len(packet) > _H4_ACL_ATT.size
            and packet[0] == hci.HCI_ACL_DATA_PACKET
            and self.ready
        ):
            _, handle_flags, length, l2cap_length, cid = _H4_ACL_ATT.unpack_from(packet)
            connection = self.connections.get(handle_flags & 0x0FFF)
            if (
                cid == _ATT_CID
                and (handle_flags >> 12) & 0b11 in _PB_FIRST
                and length == len(packet) - 5
                and l2cap_length == length - 4
                and connection is not None
                and connection.assembler.current_data is None
                and not _bumble_host_logger.isEnabledFor(logging.DEBUG)
            ):
                if self.snooper is not None:
                    self.snooper.snoop(packet, Snooper.Direction.CONTROLLER_TO_HOST)
                if not sink(connection.handle, packet[9:]):
                    connection.on_acl_pdu(packet[5:])  # what bumble's assembler does
                return
        super().on_packet(packet)

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Send one packet to the controller (snooped)."""
        if _bumble_host_logger.isEnabledFor(logging.DEBUG):
            super().send_hci_packet(packet)
            return
        data = bytes(packet)
        if self.snooper is not None:
            self.snooper.snoop(data, Snooper.Direction.HOST_TO_CONTROLLER)
        if self.hci_sink is not None:
            self.hci_sink.on_packet(data)

    def send_acl_sdu(self, connection_handle: int, sdu: bytes) -> None:
        """Fragment an L2CAP PDU into HCI ACL packets on the connection's queue."""
        connection = self.connections.get(connection_handle)
        queue = None if connection is None else connection.acl_packet_queue
        if queue is None or _bumble_host_logger.isEnabledFor(logging.DEBUG):
            super().send_acl_sdu(connection_handle, sdu)
            return
        size = queue.max_packet_size
        for offset in range(0, len(sdu), size):
            fragment = sdu[offset : offset + size]
            queue.enqueue(
                hci.HCI_AclDataPacket(
                    connection_handle=connection_handle,
                    pb_flag=1 if offset else 0,
                    bc_flag=0,
                    data_total_length=len(fragment),
                    data=fragment,
                ),
                connection_handle,
            )

    def on_hci_packet(self, packet: hci.HCI_Packet) -> None:
        """Dispatch one packet from the controller (snooped)."""
        if _bumble_host_logger.isEnabledFor(logging.DEBUG):
            super().on_hci_packet(packet)
            return
        if isinstance(packet, hci.HCI_Event):
            if self.snooper is not None:
                self.snooper.snoop(bytes(packet), Snooper.Direction.CONTROLLER_TO_HOST)
            self.on_hci_event_packet(packet)
        elif isinstance(packet, hci.HCI_AclDataPacket):
            if self.snooper is not None:
                self.snooper.snoop(bytes(packet), Snooper.Direction.CONTROLLER_TO_HOST)
            self.on_hci_acl_data_packet(packet)
        else:
            super().on_hci_packet(packet)


# -----------------------------------------------------------------------------
# H4 over TCP
# -----------------------------------------------------------------------------


_H4_SHAPES: Final = {
    hci.HCI_COMMAND_PACKET: (3, 2, 0xFF),  # opcode u16, length u8
    hci.HCI_ACL_DATA_PACKET: (4, 2, 0xFFFF),  # handle u16, length u16
    hci.HCI_SYNCHRONOUS_DATA_PACKET: (3, 2, 0xFF),  # handle u16, length u8
    hci.HCI_EVENT_PACKET: (2, 1, 0xFF),  # event code u8, length u8
    hci.HCI_ISO_DATA_PACKET: (4, 2, 0x3FFF),  # handle u16, length 14 bits
}
"""H4 type -> (header octets, offset of the length in it, length mask)."""


class H4Framer:
    """Cuts an H4 byte stream into packets for ``sink``.

    Does what bumble's ``PacketParser`` does with one slice per packet instead
    of a state machine stepping through each header field, which matters at
    hundreds of packets per second on the emulated phone.

    Raises:
        bumble.core.InvalidPacketError: from :meth:`feed`, an unknown H4
            packet type; the buffered bytes are dropped (the stream has lost
            its framing) and the framer starts over with the next feed.
    """

    __slots__ = ("_pending", "sink")

    def __init__(self, sink: TransportSink | None = None) -> None:
        self.sink = sink
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Take bytes as they arrived; pass on every packet they complete."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        offset = 0
        while offset < end:
            shape = _H4_SHAPES.get(data[offset])
            if shape is None:
                raise core.InvalidPacketError(f"unknown H4 packet type {data[offset]}")
            header, at, mask = shape
            if end - offset <= header:
                break
            start = offset + 1 + at
            length = (data[start] | (data[start + 1] << 8 if mask > 0xFF else 0)) & mask
            size = 1 + header + length
            if end - offset < size:
                break
            if self.sink is not None:
                self.sink.on_packet(data[offset : offset + size])
            offset += size
        if offset < end:
            self._pending = data[offset:]


class H4StreamSource(asyncio.Protocol, BaseSource):
    """bumble transport source: H4 packets from a stream (TCP), framed fast."""

    def __init__(self) -> None:
        BaseSource.__init__(self)
        self._framer = H4Framer()

    def set_packet_sink(self, sink: TransportSink) -> None:
        """Where packets go (the host)."""
        super().set_packet_sink(sink)
        self._framer.sink = sink

    def data_received(self, data: bytes) -> None:
        """Frame what arrived (bytes after an unknown type are dropped, logged)."""
        try:
            self._framer.feed(data)
        except core.InvalidPacketError:
            logger.warning("controller sent an unknown H4 packet type; bytes dropped")

    def connection_lost(self, exc: Exception | None) -> None:
        """The controller is gone: tell the host."""
        self.on_transport_lost()


async def open_h4_tcp_client(host: str, port: int) -> Transport:
    """Connect to an H4-over-TCP controller (what bumble's ``tcp-client`` opens).

    Raises:
        OSError: the connection failed.
    """
    loop = asyncio.get_running_loop()
    stream, source = await loop.create_connection(H4StreamSource, host, port)
    return Transport(source, StreamPacketSink(stream))


class _ClientSink:
    """Controller -> host packets for one TCP client (dropped once it is gone).

    Packets produced in one loop iteration (a connection event's worth: the
    timing model delivers them at the event) leave in one write, as a UART or
    USB transport would carry them back to back, instead of one segment each.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport: asyncio.Transport | None = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def on_packet(self, packet: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(packet)

    def _flush(self) -> None:
        packets, self._pending = self._pending, []
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(packets))

    def detach(self) -> None:
        self._transport = None
        self._pending.clear()


class _HciClientProtocol(asyncio.Protocol):
    """One TCP client: a fresh H4 parser feeding the controller."""

    def __init__(self, server: HciTcpServer) -> None:
        self._server = server
        self._framer = H4Framer(server.controller)
        self.transport: asyncio.Transport | None = None
        self.sink: _ClientSink | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast("asyncio.Transport", transport)
        self.transport = stream
        self.sink = _ClientSink(stream)
        self._server.attach(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._framer.feed(data)
        except core.InvalidPacketError:
            logger.warning("HCI client sent an invalid H4 packet type; dropping it")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sink is not None:
            self.sink.detach()
        self._server.detach(self, exc)


class HciTcpServer:
    """Serve one controller as H4 over TCP, one host at a time.

    A new client replaces the current one (the old socket is aborted). Both a
    client arriving and a client leaving reset the controller
    (:meth:`FixedController.reset_state`), so a daemon that was SIGKILLed leaves
    no link behind: the glasses see a supervision timeout and advertise again.

    Use as ``async with HciTcpServer(controller, "127.0.0.1", 0) as server:``
    and read :attr:`port`.
    """

    def __init__(self, controller: FixedController, host: str, port: int) -> None:
        """Prepare the server; nothing listens until :meth:`start`.

        Args:
            controller: The controller to expose.
            host: Local address to bind (``127.0.0.1``).
            port: TCP port, ``0`` for an ephemeral one.
        """
        self.controller = controller
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._client: _HciClientProtocol | None = None
        self.clients_served = 0

    @property
    def port(self) -> int:
        """The bound TCP port (valid after :meth:`start`).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HciTcpServer is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HciClientProtocol(self), self._host, self._port
        )
        logger.info("HCI TCP server listening on %s:%d", self._host, self.port)

    async def close(self) -> None:
        """Stop listening and drop the current client."""
        if self._client is not None and self._client.transport is not None:
            self._client.transport.abort()
        self._detach_current()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HciTcpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def attach(self, client: _HciClientProtocol) -> None:
        """Make ``client`` the controller's host (called by the protocol)."""
        previous = self._client
        if previous is not None and previous.transport is not None:
            logger.info("HCI TCP server: new client replaces the current one")
            previous.transport.abort()
        self._detach_current()
        self.controller.reset_state()
        self._client = client
        self.controller.host = client.sink
        self.clients_served += 1
        logger.info("HCI TCP server: client %d connected", self.clients_served)

    def detach(self, client: _HciClientProtocol, exc: Exception | None) -> None:
        """Forget ``client`` if it is the current one (called by the protocol)."""
        if client is not self._client:
            return
        logger.info("HCI TCP server: client left (%s); resetting controller", exc)
        self._detach_current()
        self.controller.reset_state()

    def _detach_current(self) -> None:
        if self._client is not None and self._client.sink is not None:
            self._client.sink.detach()
        self._client = None
        self.controller.host = None
