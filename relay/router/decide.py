"""Where a request is answered: the pure decision, tested like protocol code.

``decide(request, snapshot, policy) -> RouteDecision``: no I/O, no clock, no
asyncio; every decision carries a human-readable reason. This is the first
router (phone-only kinds local, everything else to the cloud, a holding reply
when the cloud cannot be reached); the deadline-aware router with hedging
replaces the policy, not this interface.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from protocol.bodies import Request, RequestKind

__all__ = ["PHONE_ONLY", "Policy", "Route", "RouteDecision", "Snapshot", "decide"]

PHONE_ONLY: Final = frozenset(
    {
        RequestKind.TIME,
        RequestKind.BATTERY,
        RequestKind.MEDIA,
        RequestKind.VOLUME,
        RequestKind.TIMER,
    }
)
"""Kinds only the phone can answer (its clock, battery, media keys, timers)."""


class Route(enum.StrEnum):
    """Who answers."""

    LOCAL = "local"
    CLOUD = "cloud"
    HEDGED = "hedged"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the daemon knows when a request arrives."""

    uplink_connected: bool
    uplink_configured: bool
    outbox_depth: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the routing policy."""

    deadline_ms: int = 3000


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The route and why; ``holding`` asks for a holding reply at once."""

    route: Route
    reason: str
    holding: bool = False


def decide(request: Request, snapshot: Snapshot, policy: Policy) -> RouteDecision:
    """Choose who answers ``request``."""
    del policy
    if request.kind in PHONE_ONLY:
        return RouteDecision(
            Route.LOCAL, f"{request.kind.name.lower()} is answered by the phone"
        )
    if not snapshot.uplink_configured:
        return RouteDecision(
            Route.CLOUD,
            "needs the cloud; no uplink configured, kept in the outbox",
            holding=True,
        )
    if not snapshot.uplink_connected:
        return RouteDecision(
            Route.CLOUD,
            "needs the cloud; uplink down, queued until it returns",
            holding=True,
        )
    return RouteDecision(Route.CLOUD, f"{request.kind.name.lower()} needs the cloud")
