"""``glasses-relay status``: ask the running daemon how it is.

Finds the daemon where ``run`` puts its status API: ``status.port`` of the
configuration (``--config``, ``$GLASSES_RELAY_CONFIG`` or the default file, and
``GLASSES_RELAY_STATUS_PORT``) or ``--port``, else the 0600 Unix socket in the
state directory; and shows the link, the uplink, the outbox and the recent
requests with their hop times; ``--json`` prints the daemon's /status
document. With no daemon reachable: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp

from relay.state import resolve_state_dir
from relay.status import socket_path
from tools.output import emit_json, say

__all__ = ["configured_port", "daemon_endpoint", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` subcommand."""
    parser = sub.add_parser(
        "status",
        help="show how the running daemon is: link, uplink, outbox, requests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--port", type=int, help="a daemon started with --status-port PORT"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon's TOML configuration, for its status.port (default: as run)",
    )
    parser.set_defaults(handler=_run)


def daemon_endpoint(
    state_flag: str | None, port: int | None, config_path: Path | None = None
) -> tuple[aiohttp.BaseConnector, str] | None:
    """A connector to the daemon's status API and its base URL.

    127.0.0.1:PORT for ``port``, else for the configuration's ``status.port``
    (read as ``run`` reads it), else the daemon's 0600 Unix socket in the
    state directory; None when there is no socket. Call it in a running
    event loop.

    Raises:
        ConfigError: the configuration cannot be read (one line).
    """
    port = configured_port(port, config_path)
    if port is not None:
        return aiohttp.TCPConnector(), f"http://127.0.0.1:{port}"
    path = socket_path(resolve_state_dir(state_flag))
    if not path.exists():
        return None
    return aiohttp.UnixConnector(path=str(path)), "http://daemon"


def configured_port(port: int | None, config_path: Path | None) -> int | None:
    """``port`` if given, else ``status.port`` of the configuration ``run`` would read.

    Raises:
        ConfigError: the configuration cannot be read (one line).
    """
    if port is not None:
        return port
    from relay.config import load_config

    return load_config({}, os.environ, config_path).status.port


async def _fetch(args: argparse.Namespace) -> dict[str, object] | None:
    endpoint = daemon_endpoint(args.state_dir, args.port, args.config)
    if endpoint is None:
        return None
    connector, base = endpoint
    url = f"{base}/status"
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
            client.get(url) as response,
        ):
            response.raise_for_status()
            doc = await response.json()
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _render(doc: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stderr)
    link = doc.get("link", {})
    uplink = doc.get("uplink", {})
    outbox = doc.get("outbox", {})
    assert isinstance(link, dict)  # noqa: S101
    assert isinstance(uplink, dict)  # noqa: S101
    assert isinstance(outbox, dict)  # noqa: S101
    summary = Table(
        title=f"glasses-relay (pid {doc.get('pid')}, up {doc.get('uptime_s')} s)"
    )
    summary.add_column("part")
    summary.add_column("state")
    summary.add_column("details")
    drops = {
        **(link.get("reassembly_drops") or {}),
        **(link.get("crypto_drops") or {}),
    }
    dropped = ", ".join(f"{k} {v}" for k, v in drops.items() if v) or "none"
    summary.add_row(
        "glasses",
        str(link.get("state")),
        f"{link.get('frames_in')} in / {link.get('frames_out')} out, "
        f"{link.get('connects')} connects, dropped: {dropped}",
    )
    summary.add_row(
        "uplink",
        str(uplink.get("state")),
        f"{uplink.get('sent')} sent, {uplink.get('acked')} acked, "
        f"{uplink.get('in_flight')} in flight",
    )
    age = outbox.get("oldest_age_s")
    summary.add_row(
        "outbox",
        f"{outbox.get('rows')} messages",
        f"{outbox.get('bytes')} bytes, oldest {'-' if age is None else f'{age:.1f} s'}"
        f"; {outbox.get('unwritten', 0)} held unwritten, "
        f"{outbox.get('acked_unwritten', 0)} acked before written",
    )
    console.print(summary)
    requests = doc.get("requests", [])
    assert isinstance(requests, list)  # noqa: S101
    if requests:
        table = Table(title="recent requests (ms from end of capture)")
        for column in ("id", "kind", "route", "answer", "received", "cloud ack", "why"):
            table.add_column(column)
        for item in requests[-15:]:
            hops = item.get("hops_ms", {})
            table.add_row(
                str(item.get("request_id")),
                str(item.get("kind")),
                str(item.get("route")),
                str(item.get("response_ms") or "-"),
                str(hops.get("phone_received")),
                str(hops.get("cloud_acked") or "-"),
                str(item.get("reason")),
            )
        console.print(table)


def _run(args: argparse.Namespace) -> int:
    args.port = configured_port(args.port, args.config)
    doc = asyncio.run(_fetch(args))
    if doc is None:
        where = f"127.0.0.1:{args.port}" if args.port else "this state directory"
        say(
            f"glasses-relay: no daemon is running for {where} "
            "(start one with 'glasses-relay run')"
        )
        return 1
    if args.json:
        emit_json(doc)
    else:
        _render(doc)
    return 0
