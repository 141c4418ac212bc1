"""Routing strategies: the router, and the two baselines it is measured against.

``router`` is :func:`relay.router.decide.decide`. The baselines exist for
``glasses-relay bench latency`` (and for users who want them): they share the
daemon, its transports and its radio pre-warming, and differ only in routing.

- ``always_cloud``: everything the cloud can answer goes to the cloud; only
  phone-only kinds stay on the phone. No hedging.
- ``always_local``: everything the phone can answer is answered on the phone;
  only what it cannot (cloud-only kinds) goes to the cloud.
"""

from __future__ import annotations

import enum

from protocol.bodies import Request
from relay.router.decide import Policy, Route, RouteDecision, Snapshot, decide

__all__ = ["Strategy", "route_request"]


class Strategy(enum.StrEnum):
    """How requests are routed."""

    ROUTER = "router"
    ALWAYS_CLOUD = "always_cloud"
    ALWAYS_LOCAL = "always_local"


def _offline(snapshot: Snapshot) -> str | None:
    if not snapshot.uplink_configured:
        return "no uplink configured, kept in the outbox"
    if not snapshot.uplink_connected:
        return "uplink down, queued until it returns"
    return None


def route_request(
    strategy: Strategy, request: Request, snapshot: Snapshot, policy: Policy
) -> RouteDecision:
    """Route ``request`` by ``strategy`` (pure)."""
    if strategy is Strategy.ROUTER:
        return decide(request, snapshot, policy)
    local = snapshot.local
    name = request.kind.name.lower()
    if local is not None and (local.phone_only or strategy is Strategy.ALWAYS_LOCAL):
        return RouteDecision(
            Route.LOCAL, f"{strategy}: {name} answered on the phone ({local.skill})"
        )
    offline = _offline(snapshot)
    if offline is not None:
        return RouteDecision(
            Route.CLOUD, f"{strategy}: {name}; {offline}", holding=True
        )
    return RouteDecision(Route.CLOUD, f"{strategy}: {name} goes to the cloud")
