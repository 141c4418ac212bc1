"""Link timing profiles and the emulated glasses' GATT identifiers.

A :class:`LinkProfile` describes one phone/glasses radio configuration: PHY,
LL data PDU payload size (27 without Data Length Extension, 251 with it), ATT
MTU, connection interval and how many LL data PDUs the phone lets through per
connection event. :class:`relay.sim.shaped_link.ShapedLink` charges air time
from it; :attr:`LinkProfile.ceiling_bytes_per_s` is the matching one-direction
goodput ceiling (../shared/design/BLE-TESTBED.md §4)::

    air(payload)      = (preamble + AA 4 + header 2 + payload + CRC 3) * 8 / rate
    per-packet time   = air(payload) + T_IFS + air(empty PDU) + T_IFS
    packets per event = min(cap, floor(interval / per-packet time))
    ceiling           = packets per event * (ATT MTU - 3) / interval

The GATT UUIDs of the glasses service live here too (``SERVICE_UUID``,
``TX_CHAR_UUID``, ``RX_CHAR_UUID``), so the daemon's tests and the emulator
share one definition.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from protocol.gatt import NAME_PREFIX, RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BATTERY_LEVEL_CHAR_UUID",
    "BATTERY_SERVICE_UUID",
    "DEFAULT_PROFILE",
    "DEVICE_INFORMATION_SERVICE_UUID",
    "GLASSES_NAME_PREFIX",
    "PROFILES",
    "RX_CHAR_UUID",
    "SERVICE_UUID",
    "TX_CHAR_UUID",
    "UNSHAPED",
    "LinkProfile",
    "Phy",
    "get_profile",
]

# -- GATT identifiers of the emulated glasses ---------------------------------

# The glasses-relay service and its characteristics are the protocol's
# (protocol/gatt.py); re-exported here for the emulator's convenience.

BATTERY_SERVICE_UUID: Final = "0000180f-0000-1000-8000-00805f9b34fb"
BATTERY_LEVEL_CHAR_UUID: Final = "00002a19-0000-1000-8000-00805f9b34fb"
DEVICE_INFORMATION_SERVICE_UUID: Final = "0000180a-0000-1000-8000-00805f9b34fb"

GLASSES_NAME_PREFIX: Final = NAME_PREFIX
"""Every emulated glasses' advertised local name starts with this prefix."""

# -- Link-layer timing constants (Core spec Vol 6, Part B) ---------------------

T_IFS_US: Final = 150.0
"""Inter frame space between two consecutive packets on the same channel."""

_ACCESS_ADDRESS_OCTETS: Final = 4
_HEADER_OCTETS: Final = 2
_CRC_OCTETS: Final = 3

LL_PAYLOAD_NO_DLE: Final = 27
LL_PAYLOAD_DLE: Final = 251
ATT_MIN_MTU: Final = 23
ATT_MAX_MTU: Final = 517
MIN_INTERVAL_MS: Final = 7.5
MAX_INTERVAL_MS: Final = 4000.0


class Phy(enum.IntEnum):
    """LE PHY, valued by its symbol rate in bits per second."""

    LE_1M = 1_000_000
    LE_2M = 2_000_000

    @property
    def preamble_octets(self) -> int:
        """Preamble length: 1 octet on LE 1M, 2 octets on LE 2M."""
        return 1 if self is Phy.LE_1M else 2


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """Timing of one emulated BLE connection.

    Attributes:
        name: Profile name (``android-2m``, ``ble40``, ...).
        phy: PHY of the data channel.
        ll_payload: Maximum LL data PDU payload in octets (27, or 251 with DLE).
        att_mtu: ATT MTU the glasses offer (server max MTU) for this profile.
        interval_ms: Connection interval in milliseconds.
        max_packets_per_event: Cap on LL data PDU exchanges per connection
            event; ``None`` lets the connection fill the whole event.
        shaped: ``False`` for the plain, untimed ``LocalLink`` (unit tests).
    """

    name: str
    phy: Phy
    ll_payload: int
    att_mtu: int
    interval_ms: float
    max_packets_per_event: int | None = None
    shaped: bool = True

    def __post_init__(self) -> None:
        """Reject impossible parameters early.

        Raises:
            ValueError: a field is out of its Bluetooth range.
        """
        if not LL_PAYLOAD_NO_DLE <= self.ll_payload <= LL_PAYLOAD_DLE:
            raise ValueError(f"ll_payload {self.ll_payload} not in 27..251")
        if not ATT_MIN_MTU <= self.att_mtu <= ATT_MAX_MTU:
            raise ValueError(f"att_mtu {self.att_mtu} not in 23..517")
        if not MIN_INTERVAL_MS <= self.interval_ms <= MAX_INTERVAL_MS:
            raise ValueError(f"interval_ms {self.interval_ms} not in 7.5..4000")
        if self.max_packets_per_event is not None and self.max_packets_per_event < 1:
            raise ValueError("max_packets_per_event must be >= 1 or None")

    @property
    def interval_us(self) -> float:
        """Connection interval in microseconds."""
        return self.interval_ms * 1000.0

    def air_time_us(self, payload: int) -> float:
        """Air time of one LL data PDU carrying ``payload`` octets.

        Args:
            payload: LL payload octets (0 for an empty PDU).

        Returns:
            Microseconds on air, preamble to CRC.
        """
        octets = (
            self.phy.preamble_octets
            + _ACCESS_ADDRESS_OCTETS
            + _HEADER_OCTETS
            + payload
            + _CRC_OCTETS
        )
        return octets * 8 * 1_000_000 / self.phy.value

    @property
    def packet_time_us(self) -> float:
        """Time of one full-size data PDU exchange (data, T_IFS, empty, T_IFS)."""
        return (
            self.air_time_us(self.ll_payload)
            + T_IFS_US
            + self.air_time_us(0)
            + T_IFS_US
        )

    @property
    def packets_per_event(self) -> int:
        """Full-size LL data PDUs one direction can move per connection event."""
        fill = math.floor(self.interval_us / self.packet_time_us)
        if self.max_packets_per_event is None:
            return fill
        return min(self.max_packets_per_event, fill)

    @property
    def att_payload(self) -> int:
        """Largest notification / write-command value: ATT MTU - 3."""
        return self.att_mtu - 3

    @property
    def ceiling_bytes_per_s(self) -> float:
        """One-direction ATT goodput ceiling in bytes per second.

        ``packets_per_event * (att_mtu - 3) / interval``; infinite when the
        profile is not shaped.
        """
        if not self.shaped:
            return math.inf
        return self.packets_per_event * self.att_payload / (self.interval_ms / 1000.0)


UNSHAPED: Final = LinkProfile(
    name="unshaped",
    phy=Phy.LE_2M,
    ll_payload=LL_PAYLOAD_DLE,
    att_mtu=517,
    interval_ms=15.0,
    shaped=False,
)
"""Plain ``LocalLink``: no air time, no connection events (fast unit tests)."""

PROFILES: Final[Mapping[str, LinkProfile]] = MappingProxyType(
    {
        p.name: p
        for p in (
            LinkProfile("android-2m", Phy.LE_2M, LL_PAYLOAD_DLE, 247, 15.0),
            LinkProfile("android-2m-6pkt", Phy.LE_2M, LL_PAYLOAD_DLE, 247, 15.0, 6),
            LinkProfile("ios", Phy.LE_2M, LL_PAYLOAD_DLE, 247, 15.0, 4),
            LinkProfile("ble42-dle", Phy.LE_1M, LL_PAYLOAD_DLE, 247, 15.0),
            LinkProfile("ble40", Phy.LE_1M, LL_PAYLOAD_NO_DLE, 23, 15.0),
            UNSHAPED,
        )
    }
)
"""Named profiles, by name."""

DEFAULT_PROFILE: Final = "android-2m"


def get_profile(name: str) -> LinkProfile:
    """Look a profile up by name.

    Args:
        name: One of the keys of :data:`PROFILES`.

    Returns:
        The profile.

    Raises:
        ValueError: no profile has that name.
    """
    try:
        return PROFILES[name]
    except KeyError as exc:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown link profile {name!r} (known: {known})") from exc
