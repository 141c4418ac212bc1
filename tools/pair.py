"""``glasses-relay pair``: pair glasses (Flow A), list them, or forget them.

The phone shows a QR code carrying its static key and a single-use 128-bit
secret with an expiry (docs/security.md §3); the glasses, in their pairing
mode, read it and run ``Noise_XXpsk3`` with the phone; both pin the other's
static key. The emulated glasses read the same code from the state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import ConfigError
from relay.state import ensure_state_dir, resolve_state_dir
from tools.output import emit_json, say

if TYPE_CHECKING:
    from relay.ble.link import BackendSpec
    from relay.identity import PhoneIdentity

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pair`` subcommand."""
    parser = sub.add_parser(
        "pair",
        help="pair glasses with a QR code; list or forget paired glasses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="show the paired glasses")
    what.add_argument(
        "--forget",
        metavar="ID",
        help="unpair glasses ID: wipe its pin and the queued data",
    )
    parser.add_argument(
        "--qr-png", type=Path, metavar="FILE", help="also write the QR as PNG"
    )
    parser.add_argument(
        "--sim",
        nargs="?",
        const="",
        metavar="tcp-client:HOST:PORT",
        help="pair emulated glasses (in this process, or a 'glasses-relay sim')",
    )
    parser.add_argument("--address", help="pair the glasses with this address")
    parser.add_argument("--name", help="pair glasses whose name starts with this")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait (default 120)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from relay.identity import PhoneIdentity

    state_dir = ensure_state_dir(resolve_state_dir(args.state_dir))
    identity = PhoneIdentity(state_dir)
    if args.list:
        paired = identity.glasses_ids()
        for glasses_id, key in sorted(paired.items()):
            say(f"  {glasses_id}  key {key.hex()[:16]}...")
        if not paired:
            say("no glasses paired")
        if args.json:
            emit_json({"paired": sorted(paired)})
        return 0
    if args.forget:
        return asyncio.run(_forget(identity, state_dir, args))
    if not 1 <= args.timeout <= 600:
        raise ConfigError(f"--timeout {args.timeout:g}: use 1 to 600 seconds")
    return asyncio.run(_pair(identity, state_dir, args))


async def _forget(
    identity: PhoneIdentity, state_dir: Path, args: argparse.Namespace
) -> int:
    from relay.outbox import Outbox

    if not identity.forget_glasses(args.forget):
        known = ", ".join(sorted(identity.glasses_ids())) or "none"
        raise ConfigError(f"--forget {args.forget}: no such glasses (paired: {known})")
    path = state_dir / "phone" / "outbox.sqlite3"
    wiped = 0
    if path.exists():
        async with await Outbox.open(path) as outbox:
            wiped = await outbox.purge()
    say(f"forgot glasses {args.forget}; wiped {wiped} queued message(s)")
    if args.json:
        emit_json({"forgotten": args.forget, "wiped": wiped})
    return 0


def _show_qr(text: str, png: Path | None) -> None:
    import segno

    code = segno.make(text, error="m")
    buffer = io.StringIO()
    code.terminal(out=buffer, compact=True)
    sys.stderr.write(buffer.getvalue())
    if png is not None:
        code.save(str(png), scale=8)
        say(f"QR code written to {png}")


async def _pair(
    identity: PhoneIdentity, state_dir: Path, args: argparse.Namespace
) -> int:
    from relay.ble.link import BackendSpec, LinkConfig
    from relay.ble.manager import LinkManager

    payload = identity.pairing_payload(renew=True)
    left = int(payload.expires_at - time.time())
    say(
        f"Scan this code with the glasses in pairing mode (single use, valid {left} s):"
    )
    _show_qr(payload.encode(), args.qr_png)
    async with contextlib.AsyncExitStack() as stack:
        backend = BackendSpec()
        if args.sim is not None:
            backend = await _sim_backend(args, state_dir, stack)
        manager = LinkManager(
            identity,
            LinkConfig(
                address=args.address, name_prefix=args.name or LinkConfig().name_prefix
            ),
            backend,
            lambda event: None,
            pairing=True,
        )
        task = asyncio.create_task(manager.run())
        try:
            async with asyncio.timeout(min(args.timeout, left)):
                await manager.paired.wait()
        except TimeoutError:
            identity.end_pairing()
            raise ConfigError(
                "no glasses paired in time: put them in pairing mode and run "
                "'glasses-relay pair' again"
            ) from None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    say(f"paired with glasses {manager.last_paired}")
    if args.json:
        emit_json({"paired": manager.last_paired})
    return 0


async def _sim_backend(
    args: argparse.Namespace, state_dir: Path, stack: contextlib.AsyncExitStack
) -> BackendSpec:
    from relay.sim.bed import connect_backend, in_process
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import UNSHAPED

    if args.sim:
        adapter, backend = await connect_backend(args.sim)
        stack.push_async_callback(adapter.close)
        return backend
    bed = await stack.enter_async_context(
        in_process(state_dir, UNSHAPED, GlassesAppConfig(scenario=None))
    )
    return bed.backend
