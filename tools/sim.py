"""``glasses-relay sim``: the emulated glasses as their own process.

The glasses, their radio and the phone's controller run here; the phone's
controller is served as HCI over TCP on loopback, so a daemon in another
process (``glasses-relay run --sim tcp-client:HOST:PORT``) reaches them through
bleak exactly as it would reach real glasses. The glasses outlive any daemon:
when one dies they advertise again and accept the next. SIGUSR1 drops the
link as a radio loss would (supervision timeout); SIGTERM or SIGINT stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Final

from relay.errors import ConfigError
from relay.state import ensure_state_dir, resolve_state_dir

if TYPE_CHECKING:
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import LinkProfile

__all__ = ["parse_hci_server", "register"]

_LOGGER: Final = logging.getLogger(__name__)
DEFAULT_HCI: Final = "tcp-server:127.0.0.1:7302"


def parse_hci_server(spec: str) -> tuple[str, int]:
    """Parse ``tcp-server:HOST:PORT``.

    Raises:
        ConfigError: another form, with the expected one.
    """
    scheme, _, rest = spec.partition(":")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp-server" or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--hci {spec!r}: expected tcp-server:HOST:PORT")
    return host.strip("[]"), int(port)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sim`` subcommand."""
    from relay.sim.profiles import PROFILES
    from relay.sim.scenarios import SCENARIOS

    scenarios = "\n".join(
        f"  {name:<6} {text}" for name, (text, _) in SCENARIOS.items()
    )
    parser = sub.add_parser(
        "sim",
        help="run emulated glasses (bumble) served over HCI/TCP",
        description=__doc__,
        epilog=f"scenarios:\n{scenarios}\n  none   answer only, send nothing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--hci",
        default=DEFAULT_HCI,
        metavar="tcp-server:HOST:PORT",
        help=f"where the phone's HCI is served (default {DEFAULT_HCI})",
    )
    parser.add_argument(
        "--scenario",
        default="day",
        choices=[*SCENARIOS, "none"],
        help="what the user does",
    )
    parser.add_argument(
        "--profile",
        default="android-2m",
        choices=sorted(PROFILES),
        help="link timing profile (default android-2m)",
    )
    parser.add_argument("--seed", type=int, default=0, help="scenario seed")
    parser.add_argument(
        "--ledger", type=Path, help="append sent/acked events (JSON lines)"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:ARG",
        help="inject a fault: disconnect:SECONDS, reset:SECONDS, stall:SECONDS, "
        "slow-reader:MS, or corrupt|replay|truncate|reorder:FRACTION (repeatable)",
    )
    parser.add_argument(
        "--snoop", type=Path, help="write a btsnoop capture of the glasses"
    )
    parser.add_argument(
        "--max-requests", type=int, help="stop the scenario after this many requests"
    )
    parser.add_argument(
        "--max-messages", type=int, help="stop the scenario after this many messages"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from relay.sim.glasses import Fault, GlassesAppConfig
    from relay.sim.profiles import get_profile

    host, port = parse_hci_server(args.hci)
    try:
        faults = tuple(Fault.parse(f) for f in args.fault)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    state_dir = ensure_state_dir(resolve_state_dir(args.state_dir))
    config = GlassesAppConfig(
        scenario=None if args.scenario == "none" else args.scenario,
        seed=args.seed,
        ledger=args.ledger,
        faults=faults,
        max_requests=args.max_requests,
        max_messages=args.max_messages,
    )
    return asyncio.run(
        _serve(state_dir, get_profile(args.profile), config, host, port, args.snoop)
    )


async def _serve(
    state_dir: Path,
    profile: LinkProfile,
    config: GlassesAppConfig,
    host: str,
    port: int,
    snoop: Path | None,
) -> int:
    from relay.sim.bed import serve
    from relay.sim.peripheral import GlassesConfig

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed explicitly: works even when started with SIGINT ignored (a
    # background job of a non-interactive shell).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    drops: set[asyncio.Task[None]] = set()
    try:
        async with serve(
            state_dir,
            profile,
            config,
            host=host,
            port=port,
            glasses_config=GlassesConfig(snoop_path=snoop),
        ) as bed:
            assert bed.server is not None  # noqa: S101

            def drop_link() -> None:  # SIGUSR1: a radio loss, on demand
                task = loop.create_task(bed.app.drop_link())
                drops.add(task)
                task.add_done_callback(drops.discard)

            loop.add_signal_handler(signal.SIGUSR1, drop_link)
            print(  # noqa: T201  (the one line scripts wait for)
                f"glasses listening on tcp-server:{host}:{bed.server.port} "
                f"(profile {profile.name}, scenario {config.scenario or 'none'})",
                flush=True,
            )
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, bed.task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if bed.task.done() and not bed.task.cancelled():
                bed.task.result()  # a crashed glasses app ends the process loudly
    except OSError as exc:
        raise ConfigError(
            f"--hci tcp-server:{host}:{port}: cannot listen: {exc.strerror}"
        ) from exc
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    _LOGGER.info("glasses stopped")
    return 0
