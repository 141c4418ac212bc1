"""``glasses-relay run``: the daemon.

Holds the glasses (a real radio by address or name, or emulated glasses with
``--sim``) and relays to the cloud over MQTT or WebSocket. A cloud that is
down or not configured is not an error: messages wait in the outbox; a
permanent uplink error before the first connection (refused credentials or
certificate) stops the daemon with one line.

Settings come from these flags, ``GLASSES_RELAY_<SECTION>_<KEY>`` variables
and a TOML file, in that order of precedence (docs/configuration.md);
``--print-config`` shows the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from relay.errors import ConfigError, UplinkConfigError, UplinkError
from relay.state import ensure_state_dir, resolve_state_dir

if TYPE_CHECKING:
    from protocol.cloud import Channels
    from protocol.envelope import EnvelopeSuite
    from relay.ble.link import BackendSpec
    from relay.config import RelayConfig, SimSettings, UplinkSettings
    from relay.daemon import Daemon
    from relay.uplink.base import Uplink

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
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (default: $GLASSES_RELAY_CONFIG, else "
        "config.toml in the user configuration directory, if it exists)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML (secrets masked) and exit",
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
        "--scenario", help="scenario of in-process emulated glasses (default: day)"
    )
    glasses.add_argument(
        "--profile",
        help="link profile of in-process emulated glasses (default: android-2m)",
    )
    cloud = parser.add_argument_group("cloud")
    cloud.add_argument(
        "--uplink",
        choices=("auto", "none", "mqtt", "ws"),
        default=None,
        help="how to reach the cloud (default auto: mqtt with --broker, ws with "
        "--gateway, else none: keep everything in the outbox)",
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
    parser.add_argument(
        "--capture-ring",
        metavar="MINUTES",
        help="keep the last MINUTES of link traffic in memory, written to "
        "<state>/phone/captures/ on request (POST /capture) or a crash",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from relay import log
    from relay.config import flags_from_args, load_config, render_toml

    flags = flags_from_args(vars(args), os.environ)
    config = load_config(flags, os.environ, args.config)
    state_dir = resolve_state_dir(args.state_dir)
    if args.print_config:
        sys.stdout.write(render_toml(config, state_dir=state_dir))
        return 0
    log.configure(config.logging.verbosity)
    from relay.keys import harden_process

    ensure_state_dir(state_dir)
    harden_process()
    suite = _envelope_suite(config.uplink.envelope_fallback)
    return asyncio.run(_main(config, state_dir, suite, args.test_forget_on_puback))


def _envelope_suite(fallback: bool) -> EnvelopeSuite:
    """Probe HPKE once at start; refuse or fall back as configured (never plaintext)."""
    from cryptography.hazmat.backends.openssl import backend

    from protocol.envelope import SuitePolicy, SuiteUnavailableError, choose_suite

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


class _StartWatch:
    """Catch a permanent uplink error (refused login) before the first connection.

    An unreachable broker is not permanent: the uplink keeps trying, and the
    messages wait. Once an uplink has connected, nothing more is watched.
    """

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self.error: UplinkConfigError | None = None
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False

    def watch(self, uplink: Uplink) -> None:
        if not self._connected and self.error is None:
            task = asyncio.get_running_loop().create_task(self._wait(uplink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _wait(self, uplink: Uplink) -> None:
        try:
            await uplink.wait_connected()
        except UplinkConfigError as exc:
            if self.error is None:
                self.error = exc
                self._on_failure()
        except UplinkError:
            return  # closed before it connected
        else:
            self._connected = True

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _make_uplink(
    settings: UplinkSettings, daemon: Daemon, channels: Channels
) -> Uplink:
    from protocol.bodies import Presence
    from protocol.constants import MessageKind
    from protocol.message import Message
    from relay.config import UplinkKind
    from relay.uplink import MqttConfig, MqttUplink, WsConfig, WsUplink

    pseudonym = channels.up.split("/")[-2]
    cert, key = settings.client_cert, settings.client_key
    if settings.kind is UplinkKind.WS:
        url = settings.url.rstrip("/") + f"/v1/{pseudonym}"
        return WsUplink(
            WsConfig(url, ca_file=settings.ca_file, client_cert=cert, client_key=key)
        )
    will = daemon.cloud.seal_presence(
        Message(
            MessageKind.PRESENCE,
            os.urandom(16),
            Presence("offline", int(time.time() * 1e6)).encode(),
        )
    )
    return MqttUplink(
        MqttConfig(
            url=settings.url,
            client_id=f"gr-phone-{pseudonym}",
            pseudonym=pseudonym,
            will_payload=will,
            username=settings.username,
            password=settings.password,
            ca_file=settings.ca_file,
            client_cert=cert,
            client_key=key,
        )
    )


async def _main(
    config: RelayConfig, state_dir: Path, suite: EnvelopeSuite, forget: bool
) -> int:
    from relay.ble.link import BackendSpec
    from relay.config import UplinkKind
    from relay.daemon import Daemon, DaemonConfig
    from relay.identity import GatewayKey
    from relay.outbox import Outbox
    from relay.status import StatusServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    start_watch = _StartWatch(stop.set)
    async with contextlib.AsyncExitStack() as stack:
        backend = BackendSpec()
        if config.sim.enabled:
            backend = await _sim_backend(config.sim, state_dir, stack)
        daemon_config = DaemonConfig(
            state_dir=state_dir,
            link=config.link,
            session=config.session,
            outbox=config.outbox,
            cloud=dataclasses.replace(config.cloud, forget_on_puback=forget),
            policy=config.policy,
            strategy=config.strategy,
            gateway_key_file=config.uplink.gateway_key,
            capture=config.capture,
            suite=suite,
        )
        ensure_state_dir(state_dir / "phone")
        outbox = await Outbox.open(
            state_dir / "phone" / "outbox.sqlite3", daemon_config.outbox
        )
        stack.push_async_callback(outbox.close)

        def make_uplink(key: GatewayKey, channels: Channels) -> Uplink:
            uplink = _make_uplink(config.uplink, daemon, channels)
            start_watch.watch(uplink)
            return uplink

        kind = config.uplink.kind
        daemon = Daemon(
            daemon_config,
            backend,
            None if kind is UplinkKind.NONE else make_uplink,
            outbox=outbox,
        )
        _LOGGER.info(
            "daemon up: device %s, uplink %s, state %s",
            daemon.cloud.channels.up.split("/")[-2],
            kind,
            state_dir,
        )
        status = StatusServer(
            daemon.status,
            state_dir=state_dir,
            tcp_port=config.status.port,
            capture=daemon.capture,
        )
        await status.start()
        stack.push_async_callback(status.close)
        task = asyncio.create_task(daemon.run(), name="daemon")
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(daemon_config.shutdown_timeout):
                await task
        await daemon.close()
        start_watch.close()
    if start_watch.error is not None:
        raise UplinkConfigError(
            f"{start_watch.error} (permanent: check the [uplink] settings, e.g. "
            "uplink.username, uplink.password, uplink.client_cert)"
        ) from start_watch.error
    _LOGGER.info("daemon stopped")
    return 0


async def _sim_backend(
    sim: SimSettings, state_dir: Path, stack: contextlib.AsyncExitStack
) -> BackendSpec:
    from relay.sim.bed import connect_backend, in_process
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import get_profile

    if sim.connect is not None:
        try:
            adapter, backend = await connect_backend(sim.connect)
        except OSError as exc:
            raise ConfigError(
                f"glasses.sim {sim.connect}: nothing listens there ({exc})"
            ) from None
        stack.push_async_callback(adapter.close)
        return backend
    bed = await stack.enter_async_context(
        in_process(
            state_dir, get_profile(sim.profile), GlassesAppConfig(scenario=sim.scenario)
        )
    )
    return bed.backend
