"""``glasses-relay run``: the daemon.

Holds the glasses (a real radio by address or name, or emulated glasses with
``--sim``) and relays to the cloud over MQTT or WebSocket. A cloud that is
down or not configured is not an error: messages wait in the outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from relay.errors import ConfigError
from relay.state import ensure_state_dir, resolve_state_dir

if TYPE_CHECKING:
    from protocol.envelope import EnvelopeSuite
    from relay.ble.link import BackendSpec

__all__ = ["register"]

_LOGGER: Final = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` subcommand."""
    parser = sub.add_parser(
        "run",
        help="the daemon: hold the glasses, relay to the cloud",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    glasses = parser.add_argument_group("glasses")
    glasses.add_argument(
        "--sim",
        nargs="?",
        const="",
        metavar="tcp-client:HOST:PORT",
        help="use emulated glasses: in this process (no value) or a "
        "'glasses-relay sim' process (retried until it listens)",
    )
    glasses.add_argument("--address", help="connect to glasses with this address")
    glasses.add_argument(
        "--name", help="connect to glasses whose name starts with this"
    )
    glasses.add_argument(
        "--scenario", default="day", help="scenario of in-process emulated glasses"
    )
    glasses.add_argument(
        "--profile",
        default="android-2m",
        help="link profile of in-process emulated glasses",
    )
    cloud = parser.add_argument_group("cloud")
    cloud.add_argument(
        "--uplink",
        choices=("none", "mqtt", "ws"),
        default=None,
        help="how to reach the cloud (default: mqtt with --broker, ws with --gateway, "
        "else none: keep everything in the outbox)",
    )
    cloud.add_argument(
        "--broker", metavar="URL", help="mqtt://HOST:PORT or mqtts://HOST:PORT"
    )
    cloud.add_argument(
        "--gateway", metavar="URL", help="ws://HOST:PORT or wss://HOST:PORT"
    )
    cloud.add_argument(
        "--ca-file", type=Path, help="CA certificate for mqtts:// and wss://"
    )
    cloud.add_argument("--username", help="MQTT user name")
    cloud.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the MQTT password from this environment variable",
    )
    cloud.add_argument(
        "--gateway-key",
        type=Path,
        help="the gateway's public.json (default: state dir)",
    )
    cloud.add_argument(
        "--envelope-fallback",
        action="store_true",
        help="if this build of cryptography has no HPKE, seal with Noise_K instead "
        "of refusing to start (the gateway must accept Noise_K)",
    )
    cloud.add_argument(
        "--test-forget-on-puback", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--status-port",
        type=int,
        metavar="PORT",
        help="serve the status API on 127.0.0.1:PORT instead of the 0600 Unix "
        "socket in the state directory",
    )
    parser.set_defaults(handler=_run)


def _uplink_kind(args: argparse.Namespace) -> str:
    if args.uplink is not None:
        kind: str = args.uplink
    elif args.broker:
        kind = "mqtt"
    elif args.gateway:
        kind = "ws"
    else:
        kind = "none"
    if kind == "mqtt" and not args.broker:
        raise ConfigError("--uplink mqtt needs --broker mqtt://HOST:PORT")
    if kind == "ws" and not args.gateway:
        raise ConfigError("--uplink ws needs --gateway ws://HOST:PORT")
    return kind


def _run(args: argparse.Namespace) -> int:
    from relay.uplink import parse_broker_url, parse_gateway_url

    kind = _uplink_kind(args)
    if kind == "mqtt":
        parse_broker_url(args.broker)
    elif kind == "ws":
        parse_gateway_url(args.gateway)
    if args.ca_file is not None and not args.ca_file.is_file():
        raise ConfigError(f"--ca-file {args.ca_file}: no such file")
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            raise ConfigError(f"--password-env {args.password_env}: variable not set")
    if args.sim is not None and args.sim and not args.sim.startswith("tcp-client:"):
        raise ConfigError(
            f"--sim {args.sim!r}: expected tcp-client:HOST:PORT or no value"
        )
    from relay.keys import harden_process

    state_dir = ensure_state_dir(resolve_state_dir(args.state_dir))
    harden_process()
    args.suite = _envelope_suite(args.envelope_fallback)
    return asyncio.run(_main(args, state_dir, kind, password))


def _envelope_suite(fallback: bool) -> EnvelopeSuite:
    """Probe HPKE once at start; refuse or fall back as configured (never plaintext)."""
    from cryptography.hazmat.backends.openssl import backend

    from protocol.envelope import (
        SuitePolicy,
        SuiteUnavailableError,
        choose_suite,
    )

    policy = SuitePolicy.FALLBACK if fallback else SuitePolicy.REQUIRE_HPKE
    try:
        suite = choose_suite(policy)
    except SuiteUnavailableError:
        raise ConfigError(
            f"HPKE does not work with this build of cryptography "
            f"({backend.openssl_version_text()}); upgrade it, or allow the Noise_K "
            "envelope with --envelope-fallback"
        ) from None
    _LOGGER.info("cloud envelopes: %s (%s)", suite, backend.openssl_version_text())
    return suite


async def _main(
    args: argparse.Namespace, state_dir: Path, kind: str, password: str | None
) -> int:
    from protocol.bodies import Presence
    from protocol.cloud import Channels
    from protocol.constants import MessageKind
    from protocol.message import Message
    from relay.ble.link import BackendSpec, LinkConfig
    from relay.cloudlink import CloudConfig
    from relay.daemon import Daemon, DaemonConfig
    from relay.identity import GatewayKey
    from relay.outbox import Outbox
    from relay.status import StatusServer
    from relay.uplink import MqttConfig, MqttUplink, WsConfig, WsUplink
    from relay.uplink.base import Uplink

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        link_config = LinkConfig(
            address=args.address,
            name_prefix=args.name or LinkConfig().name_prefix,
        )
        backend = BackendSpec()
        if args.sim is not None:
            backend = await _sim_backend(args, state_dir, stack)
        config = DaemonConfig(
            state_dir=state_dir,
            link=link_config,
            gateway_key_file=args.gateway_key,
            suite=args.suite,
            cloud=CloudConfig(
                forget_on_puback=args.test_forget_on_puback,
                announce_presence=kind == "mqtt",
            ),
        )
        ensure_state_dir(state_dir / "phone")
        outbox = await Outbox.open(
            state_dir / "phone" / "outbox.sqlite3", config.outbox
        )
        stack.push_async_callback(outbox.close)

        def make_uplink(key: GatewayKey, channels: Channels) -> Uplink:
            pseudonym = channels.up.split("/")[-2]
            if kind == "ws":
                url = args.gateway.rstrip("/") + f"/v1/{pseudonym}"
                return WsUplink(WsConfig(url=url, ca_file=args.ca_file))
            will = daemon.cloud.seal_presence(
                Message(
                    MessageKind.PRESENCE,
                    os.urandom(16),
                    Presence("offline", int(time.time() * 1e6)).encode(),
                )
            )
            return MqttUplink(
                MqttConfig(
                    url=args.broker,
                    client_id=f"gr-phone-{pseudonym}",
                    pseudonym=pseudonym,
                    will_payload=will,
                    username=args.username,
                    password=password,
                    ca_file=args.ca_file,
                )
            )

        daemon = Daemon(
            config, backend, None if kind == "none" else make_uplink, outbox=outbox
        )
        _LOGGER.info(
            "daemon up: device %s, uplink %s, state %s",
            daemon.cloud.channels.up.split("/")[-2],
            kind,
            state_dir,
        )
        status = StatusServer(
            daemon.status, state_dir=state_dir, tcp_port=args.status_port
        )
        await status.start()
        stack.push_async_callback(status.close)
        task = asyncio.create_task(daemon.run(), name="daemon")
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(config.shutdown_timeout):
                await task
        await daemon.close()
    _LOGGER.info("daemon stopped")
    return 0


async def _sim_backend(
    args: argparse.Namespace, state_dir: Path, stack: contextlib.AsyncExitStack
) -> BackendSpec:
    from relay.sim.bed import connect_backend, in_process
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import PROFILES, get_profile
    from relay.sim.scenarios import SCENARIOS

    if args.sim:
        try:
            adapter, backend = await connect_backend(args.sim)
        except OSError as exc:
            raise ConfigError(
                f"--sim {args.sim}: nothing listens there ({exc})"
            ) from None
        stack.push_async_callback(adapter.close)
        return backend
    if args.scenario not in SCENARIOS and args.scenario != "none":
        raise ConfigError(
            f"--scenario {args.scenario!r}: one of {', '.join(SCENARIOS)}, none"
        )
    if args.profile not in PROFILES:
        raise ConfigError(f"--profile {args.profile!r}: one of {', '.join(PROFILES)}")
    scenario = None if args.scenario == "none" else args.scenario
    bed = await stack.enter_async_context(
        in_process(
            state_dir, get_profile(args.profile), GlassesAppConfig(scenario=scenario)
        )
    )
    return bed.backend
