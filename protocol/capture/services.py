"""A GATT service table and the self-consistent handle map we synthesize.

bleak's characteristic handles are backend-specific (a declaration handle on
BlueZ, other numbers elsewhere; ../shared/design/CAPTURE-FORMATS.md §3), so a
recording never reuses them. :meth:`HandleMap.allocate` numbers the table the
way a GATT server lays it out: service declaration, then per characteristic
its declaration, its value (declaration + 1) and, if it can notify or
indicate, its CCCD. The UUIDs stay next to the handles (the capture's
interface comment lists them), so a replay keys on UUIDs, never on handles.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.capture.att import normalize_uuid
from protocol.errors import LocalProtocolError
from protocol.gatt import RX_CHAR_UUID, SERVICE_UUID, TX_CHAR_UUID

__all__ = [
    "CharProps",
    "CharacteristicHandles",
    "CharacteristicSpec",
    "HandleMap",
    "ServiceHandles",
    "ServiceSpec",
    "glasses_services",
]


class CharProps(enum.IntFlag):
    """Characteristic properties (Core Vol 3 Part G §3.3.1.1)."""

    NONE = 0
    BROADCAST = 0x01
    READ = 0x02
    WRITE_WITHOUT_RESPONSE = 0x04
    WRITE = 0x08
    NOTIFY = 0x10
    INDICATE = 0x20
    AUTHENTICATED_SIGNED_WRITES = 0x40
    EXTENDED_PROPERTIES = 0x80


@dataclass(frozen=True, slots=True)
class CharacteristicSpec:
    """A characteristic as a client sees it: UUID and properties."""

    uuid: str
    properties: CharProps


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A primary service and its characteristics, in server order."""

    uuid: str
    characteristics: tuple[CharacteristicSpec, ...]


@dataclass(frozen=True, slots=True)
class CharacteristicHandles:
    """Where one characteristic sits in the synthetic attribute table."""

    uuid: str
    properties: CharProps
    declaration: int
    value: int
    cccd: int | None


@dataclass(frozen=True, slots=True)
class ServiceHandles:
    """A service's handle range and its characteristics."""

    uuid: str
    start: int
    end: int
    characteristics: tuple[CharacteristicHandles, ...]


def glasses_services() -> tuple[ServiceSpec, ...]:
    """Return this project's service (docs/protocol.md §2, protocol.gatt).

    TX notifies (and reads), glasses to phone; RX takes writes with and
    without response, phone to glasses.
    """
    return (
        ServiceSpec(
            SERVICE_UUID,
            (
                CharacteristicSpec(TX_CHAR_UUID, CharProps.NOTIFY | CharProps.READ),
                CharacteristicSpec(
                    RX_CHAR_UUID, CharProps.WRITE_WITHOUT_RESPONSE | CharProps.WRITE
                ),
            ),
        ),
    )


@dataclass(frozen=True, slots=True)
class HandleMap:
    """Handles of every service, characteristic and CCCD, and their UUIDs."""

    services: tuple[ServiceHandles, ...]

    @classmethod
    def allocate(
        cls, services: Iterable[ServiceSpec], *, first_handle: int = 0x0010
    ) -> HandleMap:
        """Number the attributes of ``services`` from ``first_handle``.

        Raises:
            LocalProtocolError: a bad UUID, a duplicate characteristic UUID,
                or handles beyond 0xFFFF.
        """
        if not 1 <= first_handle <= 0xFFFF:
            raise LocalProtocolError("first_handle must be 1..0xFFFF")
        handle = first_handle
        out: list[ServiceHandles] = []
        seen: set[str] = set()
        for service in services:
            start = handle
            handle += 1
            chars: list[CharacteristicHandles] = []
            for char in service.characteristics:
                uuid = normalize_uuid(char.uuid)
                if uuid in seen:
                    raise LocalProtocolError("duplicate characteristic UUID")
                seen.add(uuid)
                declaration = handle
                value = handle + 1
                handle += 2
                cccd = None
                if char.properties & (CharProps.NOTIFY | CharProps.INDICATE):
                    cccd = handle
                    handle += 1
                chars.append(
                    CharacteristicHandles(
                        uuid, char.properties, declaration, value, cccd
                    )
                )
            if handle - 1 > 0xFFFF:
                raise LocalProtocolError("the service table needs handles > 0xFFFF")
            out.append(
                ServiceHandles(
                    normalize_uuid(service.uuid), start, handle - 1, tuple(chars)
                )
            )
        return cls(tuple(out))

    def characteristic(self, target: str | int) -> CharacteristicHandles:
        """Find a characteristic by UUID or by its value handle.

        Raises:
            LocalProtocolError: no such characteristic.
        """
        if isinstance(target, int):
            for char in self._all():
                if char.value == target:
                    return char
            raise LocalProtocolError(f"no characteristic value at 0x{target:04x}")
        uuid = normalize_uuid(target)
        for char in self._all():
            if char.uuid == uuid:
                return char
        raise LocalProtocolError("no characteristic with that UUID")

    def value_handle(self, target: str | int) -> int:
        """Return the value handle of a characteristic UUID (ints pass through).

        An int is used as is, so a recording can show a write to a handle
        that is not in the table.

        Raises:
            LocalProtocolError: unknown UUID, or an int outside 0..0xFFFF.
        """
        if isinstance(target, int):
            if not 0 <= target <= 0xFFFF:
                raise LocalProtocolError("an ATT handle is 0..0xFFFF")
            return target
        return self.characteristic(target).value

    def uuid_of(self, handle: int) -> str | None:
        """Return the UUID of the attribute at ``handle`` (value or service)."""
        return self.uuids().get(handle)

    def uuids(self) -> dict[int, str]:
        """Map handle to UUID: services, characteristic values and CCCDs."""
        out: dict[int, str] = {}
        for service in self.services:
            out[service.start] = service.uuid
            for char in service.characteristics:
                out[char.value] = char.uuid
                if char.cccd is not None:
                    out[char.cccd] = normalize_uuid(0x2902)
        return out

    def describe(self) -> str:
        """One line per attribute, for a capture's interface comment."""
        lines = ["glasses-relay handle map (handle uuid role):"]
        for service in self.services:
            lines.append(f"0x{service.start:04x} {service.uuid} service")
            for char in service.characteristics:
                props = "|".join(
                    p.name.lower()
                    for p in CharProps
                    if p and p in char.properties and p.name is not None
                )
                lines.append(f"0x{char.value:04x} {char.uuid} value {props}")
                if char.cccd is not None:
                    lines.append(f"0x{char.cccd:04x} {char.uuid} cccd")
        return "\n".join(lines)

    def _all(self) -> Sequence[CharacteristicHandles]:
        return [c for s in self.services for c in s.characteristics]
