"""``glasses-relay cloud``: the reference cloud gateway.

The cloud end of docs/cloud.md: it takes the phones' sealed envelopes from an
MQTT 5 broker (a shared subscription, so several gateways share the load) or
over WebSocket, opens them, drops what it has processed before (its
idempotency store: SQLite for one gateway, Redis for several), acknowledges
with signed acks, assembles requests from their parts, and streams the
assistant's answers back, resending them until the phone acknowledges them.

Modules: :mod:`~tools.cloud.config` (flags, :class:`GatewayConfig`),
:mod:`~tools.cloud.keys` and :mod:`~tools.cloud.registry` (keys and device
records), :mod:`~tools.cloud.store` and :mod:`~tools.cloud.redis_store` (the
idempotency store), :mod:`~tools.cloud.assistant`, :mod:`~tools.cloud.ledger`,
:mod:`~tools.cloud.downlink` (answers awaiting the phone's ACK),
:mod:`~tools.cloud.gateway` (the core) with :mod:`~tools.cloud.stats` (its
counters), :mod:`~tools.cloud.mqtt` and :mod:`~tools.cloud.ws` (transports),
:mod:`~tools.cloud.app` (the process).
"""

from __future__ import annotations

import argparse
import asyncio

from relay.keys import harden_process
from relay.state import ensure_state_dir, resolve_state_dir
from tools.cloud.config import GatewayConfig, add_arguments, config_from_args

__all__ = ["GatewayConfig", "handle", "register"]

DESCRIPTION = (
    "Run the reference cloud gateway: MQTT 5 (shared subscription) and/or "
    "WebSocket, signed acks, idempotent processing, streamed answers from the "
    "assistant. SIGTERM or SIGINT stop it."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``cloud`` subcommand to the CLI's subparsers."""
    parser = sub.add_parser(
        "cloud", help="run the reference cloud gateway", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the gateway from parsed flags until SIGTERM or SIGINT.

    Args:
        args: The flags, with ``state_dir`` and ``verbose`` from the CLI.

    Returns:
        The exit status: 0 after a clean stop.

    Raises:
        ConfigError: a flag, key file or address is unusable (the CLI prints
            it as one line and exits 2).
    """
    from tools.cloud.app import run_gateway  # the asyncio parts, only when run

    state_dir = resolve_state_dir(args.state_dir)
    config = config_from_args(args, state_dir)
    ensure_state_dir(state_dir)
    harden_process()
    return asyncio.run(run_gateway(config))
