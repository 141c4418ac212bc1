"""Configuration of the reference gateway (``glasses-relay cloud``).

Built once from the command line (:func:`add_arguments`,
:func:`config_from_args`) into a frozen :class:`GatewayConfig` and passed
down. Every check happens here, offline, so a mistake is one line on standard
error (:class:`relay.errors.ConfigError`) before anything starts.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from protocol.cloud import DEFAULT_PREFIX
from relay.errors import ConfigError
from relay.uplink import Backoff, parse_broker_url
from tools.cloud.assistant import DEFAULT_LATENCY, LatencyModel

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_IDEMPOTENCY_TTL_S",
    "DEFAULT_LISTEN",
    "GatewayConfig",
    "StoreSpec",
    "add_arguments",
    "config_from_args",
    "parse_listen",
    "parse_store",
]

DEFAULT_GROUP: Final = "gr"
DEFAULT_LISTEN: Final = ("127.0.0.1", 8765)
"""WebSocket listen address: loopback, a port apart from the daemon's."""
OUTBOX_MAX_AGE_S: Final = 7 * 86_400.0
"""The phone outbox's age cap (relay.outbox default)."""
DEFAULT_IDEMPOTENCY_TTL_S: Final = OUTBOX_MAX_AGE_S + 86_400.0
"""Seen message ids are kept this long: the outbox's age cap plus a day of skew."""
ASSISTANTS: Final = ("builtin",)
_TOPIC_LEVEL: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where the idempotency store lives.

    Attributes:
        kind: ``sqlite`` (one gateway) or ``redis`` (several sharing the load).
        path: The SQLite file; None for the default in the state directory.
        url: The Redis URL (``redis://HOST[:PORT][/DB]``).
    """

    kind: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = None
    url: str | None = None

    def describe(self) -> str:
        """The store for logs (no credentials: URLs may not carry any)."""
        if self.kind == "redis":
            return f"redis {self.url}"
        return f"sqlite {self.path}" if self.path else "sqlite (state directory)"


def parse_store(spec: str | None) -> StoreSpec:
    """Parse ``--idempotency``: ``sqlite``, ``sqlite:PATH`` or a Redis URL.

    Raises:
        ConfigError: anything else, or a malformed Redis URL.
    """
    if spec is None or spec == "sqlite":
        return StoreSpec()
    if spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite:")
        if not path:
            raise ConfigError("--idempotency sqlite:PATH needs a PATH")
        return StoreSpec("sqlite", Path(path).expanduser())
    if "://" not in spec:
        raise ConfigError(
            f"--idempotency {spec!r}: use sqlite, sqlite:PATH or redis://HOST:PORT"
        )
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"idempotency store URL {spec!r} is malformed") from exc
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"idempotency store URL {spec!r} has scheme {parts.scheme!r}; "
            "use redis:// or rediss://"
        )
    if "@" in parts.netloc:
        raise ConfigError(f"idempotency store URL {spec!r} must not hold credentials")
    if not parts.hostname:
        raise ConfigError(f"idempotency store URL {spec!r} has no host")
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d{1,2}", parts.path):
        raise ConfigError(
            f"idempotency store URL {spec!r}: the path may only be a database number"
        )
    if parts.query or parts.fragment or port == 0:
        raise ConfigError(f"idempotency store URL {spec!r} is malformed")
    return StoreSpec("redis", None, spec)


def parse_listen(spec: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[V6]:PORT`` for IPv6) for the WebSocket server.

    Port 0 picks a free port.

    Raises:
        ConfigError: no port, a bad port or an empty host.
    """
    host, sep, port_text = spec.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--listen {spec!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    port = int(port_text)
    if port > 65_535:
        raise ConfigError(f"--listen {spec!r}: port must be 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"--listen {spec!r}: malformed IPv6 address") from exc
    elif ":" in host or any(c.isspace() for c in host):
        raise ConfigError(f"--listen {spec!r}: write IPv6 addresses as [ADDR]:PORT")
    return host, port


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs; validated on construction.

    Attributes:
        state_dir: The shared state directory (keys, records, SQLite store).
        broker_url: MQTT broker (``mqtt://`` / ``mqtts://``), or None.
        listen: WebSocket ``(host, port)``, or None for no WebSocket server.
        assistant: The assistant backend (``builtin``).
        latency: The built-in assistant's first-token model.
        store: The idempotency store.
        ledger: File to append one JSON line per event to, or None.
        device_dirs: Extra directories of device records (``*.json``).
        group: MQTT shared-subscription group.
        prefix: Channel prefix (topics ``{prefix}/{pseudonym}/...``).
        idempotency_ttl_s: How long processed message ids are remembered.
        assembly_ttl_s: How long parts of an incomplete request are kept.
        ack_delay_s: Acks for one device are gathered this long, then signed.
        resend_initial_s: First resend delay of an unacknowledged answer.
        resend_cap_s: Largest resend delay (it doubles up to this).
        silence_s: An uplink after this long a silence resends pending answers.
        answer_hold_s: A piece is held this long for the next one, so the
            last piece of an answer can carry FINAL.
        max_queue: Incoming payloads waiting for the worker; transports
            wait (backpressure) when it is full.
        max_batch: Payloads the worker takes at once.
        max_answers: Answers being produced at once; up to four times as
            many more wait, and beyond that the worker waits (backpressure).
        max_pending_downlink: Unacknowledged answer pieces kept per device;
            the oldest is dropped (and counted) beyond.
        downlink_ttl_s: Unacknowledged answer pieces are dropped after this.
        max_request_bytes: Media of one request; further chunks are refused.
        max_chunk_index: Largest chunk index accepted.
        ws_heartbeat_s: WebSocket ping interval.
        ws_max_connections: Open WebSockets at once; more are refused (503).
        mqtt_keepalive_s: MQTT keepalive.
        connect_timeout_s: Bound on connecting to the broker or Redis.
        send_timeout_s: Bound on one downlink publish or frame.
        backoff: Broker reconnect delays.
        registry_rescan_s: Least time between two scans for unknown devices.
    """

    state_dir: Path
    broker_url: str | None = None
    listen: tuple[str, int] | None = None
    assistant: str = "builtin"
    latency: LatencyModel = DEFAULT_LATENCY
    store: StoreSpec = field(default_factory=StoreSpec)
    ledger: Path | None = None
    device_dirs: tuple[Path, ...] = ()
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S
    assembly_ttl_s: float = 86_400.0
    ack_delay_s: float = 0.005
    resend_initial_s: float = 2.0
    resend_cap_s: float = 30.0
    silence_s: float = 10.0
    answer_hold_s: float = 0.02
    max_queue: int = 1024
    max_batch: int = 32
    max_answers: int = 64
    max_pending_downlink: int = 512
    downlink_ttl_s: float = 86_400.0
    max_request_bytes: int = 16 << 20
    max_chunk_index: int = 65_535
    ws_heartbeat_s: float = 15.0
    ws_max_connections: int = 10_000
    mqtt_keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    send_timeout_s: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    registry_rescan_s: float = 0.25

    def __post_init__(self) -> None:
        """Validate offline.

        Raises:
            ConfigError: a field is invalid (one line, naming it).
        """
        if self.broker_url is not None:
            parse_broker_url(self.broker_url)
        if self.broker_url is None and self.listen is None:
            raise ConfigError("the gateway needs --broker, --listen or both")
        if self.assistant not in ASSISTANTS:
            raise ConfigError(
                f"assistant {self.assistant!r} is not one of {', '.join(ASSISTANTS)}"
            )
        if not _TOPIC_LEVEL.fullmatch(self.group):
            raise ConfigError(
                f"--group {self.group!r}: 1-64 letters, digits, '_', '-' or '.'"
            )
        levels = self.prefix.split("/")
        if not all(_TOPIC_LEVEL.fullmatch(level) for level in levels):
            raise ConfigError(
                f"--prefix {self.prefix!r}: levels of letters, digits, '_', '-' "
                "or '.' separated by '/'"
            )
        for name in (
            "idempotency_ttl_s",
            "assembly_ttl_s",
            "resend_initial_s",
            "resend_cap_s",
            "silence_s",
            "downlink_ttl_s",
            "ws_heartbeat_s",
            "connect_timeout_s",
            "send_timeout_s",
            "registry_rescan_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"gateway {name} must be positive")
        if self.idempotency_ttl_s < OUTBOX_MAX_AGE_S:
            raise ConfigError(
                "the idempotency TTL must be at least the outbox's age cap "
                f"({OUTBOX_MAX_AGE_S:.0f} s)"
            )
        if self.resend_cap_s < self.resend_initial_s:
            raise ConfigError("gateway resend_cap_s must be >= resend_initial_s")
        for name in ("ack_delay_s", "answer_hold_s"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"gateway {name} must be 0 to 1 s")
        for name in (
            "max_queue",
            "max_batch",
            "max_answers",
            "max_pending_downlink",
            "max_request_bytes",
            "max_chunk_index",
            "ws_max_connections",
            "mqtt_keepalive_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway {name} must be at least 1")

    @property
    def gateway_dir(self) -> Path:
        """``<state>/gateway``: keys, ``public.json``, ``devices/``, the store."""
        return self.state_dir / "gateway"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite idempotency store."""
        return self.store.path or self.gateway_dir / "idempotency.sqlite3"

    @property
    def record_sources(self) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
        """Device-record directories and single files, in override order."""
        return (
            (self.gateway_dir / "devices", *self.device_dirs),
            (self.state_dir / "phone" / "device.json",),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the gateway's flags to ``parser``."""
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT 5 broker (mqtt://HOST:PORT or mqtts://); gateways share the "
        "devices' traffic through a shared subscription",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="WebSocket server address (default 127.0.0.1:8765 when --broker is "
        "not given; port 0 picks a free one)",
    )
    parser.add_argument(
        "--assistant",
        choices=ASSISTANTS,
        default="builtin",
        help="assistant backend (default: builtin, offline)",
    )
    parser.add_argument(
        "--latency-model",
        metavar="SPEC",
        default=DEFAULT_LATENCY.describe(),
        help="built-in first-token time: lognormal:MEDIAN:P95, fixed:SECONDS or "
        "none (default: %(default)s)",
    )
    parser.add_argument(
        "--idempotency",
        metavar="STORE",
        help="sqlite (default, in the state directory), sqlite:PATH, or "
        "redis://HOST:PORT when several gateways share the load",
    )
    parser.add_argument(
        "--idempotency-ttl",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_IDEMPOTENCY_TTL_S,
        help="how long processed ids are remembered (default: 8 days)",
    )
    parser.add_argument(
        "--ledger",
        metavar="FILE",
        help="append one JSON line per processed message and per answer",
    )
    parser.add_argument(
        "--devices",
        metavar="DIR",
        action="append",
        default=[],
        help="extra directory of device records (*.json); repeatable",
    )
    parser.add_argument(
        "--group",
        default=DEFAULT_GROUP,
        help="MQTT shared-subscription group (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="channel prefix (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace, state_dir: Path) -> GatewayConfig:
    """Build the configuration from parsed flags.

    Raises:
        ConfigError: a flag is invalid.
    """
    listen: tuple[str, int] | None = None
    if args.listen is not None:
        listen = parse_listen(args.listen)
    elif args.broker is None:
        listen = DEFAULT_LISTEN
    ttl = args.idempotency_ttl
    if not isinstance(ttl, float) or not math.isfinite(ttl):
        raise ConfigError("--idempotency-ttl must be a number of seconds")
    return GatewayConfig(
        state_dir=state_dir,
        broker_url=args.broker,
        listen=listen,
        assistant=args.assistant,
        latency=LatencyModel.parse(args.latency_model),
        store=parse_store(args.idempotency),
        ledger=Path(args.ledger).expanduser() if args.ledger else None,
        device_dirs=tuple(Path(d).expanduser() for d in args.devices),
        group=args.group,
        prefix=args.prefix,
        idempotency_ttl_s=ttl,
    )
