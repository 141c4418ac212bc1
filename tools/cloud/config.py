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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit

from protocol.cloud import ACK_DELAY_S, ACK_INTERVAL_S, DEFAULT_PREFIX
from protocol.envelope import EPOCH_CACHE_ENTRIES
from relay.errors import ConfigError
from relay.uplink import Backoff, parse_broker_url
from tools.cloud.assistant import DEFAULT_LATENCY, LatencyModel

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_IDEMPOTENCY_TTL_S",
    "DEFAULT_LISTEN",
    "GatewayConfig",
    "OpenAIConfig",
    "StoreSpec",
    "add_arguments",
    "config_from_args",
    "parse_base_url",
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
ASSISTANTS: Final = ("builtin", "openai")
DEFAULT_API_KEY_ENV: Final = "OPENAI_API_KEY"
DEFAULT_TRANSCRIBE_MODEL: Final = "whisper-1"
DEFAULT_ASSISTANT_TIMEOUT_S: Final = 30.0
"""Bound on one answer of the openai assistant: transcription, retries, stream."""
DEFAULT_MAX_RETRY_WAIT_S: Final = 5.0
"""Longest wait a ``retry-after`` header may impose before a retry."""
_TOPIC_LEVEL: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_T = TypeVar("_T")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MODEL_NAME: Final = re.compile(r"[^\x00-\x20\x7f]{1,256}")
"""A model name: 1-256 characters, no spaces or control characters."""


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


def parse_base_url(url: str) -> str:
    """Check an OpenAI-compatible API base URL; return it without a final ``/``.

    The URL is ``http(s)://HOST[:PORT][/PATH]``, e.g.
    ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``; requests go
    to ``{base}/chat/completions`` and ``{base}/audio/transcriptions``.

    Raises:
        ConfigError: another scheme, no host, credentials, a query or a
            fragment (one line).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--base-url {url!r} is malformed") from exc
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"--base-url {url!r} must be http:// or https:// "
            "(e.g. https://api.openai.com/v1)"
        )
    if "@" in parts.netloc:
        raise ConfigError(
            f"--base-url {url!r} must not hold credentials; the API key comes "
            "from the environment (--api-key-env)"
        )
    if not parts.hostname:
        raise ConfigError(f"--base-url {url!r} has no host")
    if parts.query or parts.fragment or port == 0 or any(c.isspace() for c in url):
        raise ConfigError(
            f"--base-url {url!r}: only scheme, host, port and path are allowed"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    """The ``openai`` assistant: an OpenAI-compatible endpoint.

    The API key itself is not part of the configuration: it is read from the
    environment variable ``api_key_env`` when the assistant is built, so it
    appears in no argv, repr or log.

    Attributes:
        base_url: The API base, e.g. ``https://api.openai.com/v1``.
        model: The chat model (``gpt-4o-mini``, ``qwen-plus``, ``llama3.2``).
        api_key_env: The environment variable that holds the API key.
        transcribe_model: The model of ``/audio/transcriptions``.
        timeout_s: Bound on one answer (transcription, retries and stream).
        max_retry_wait_s: Longest wait before a retry after HTTP 429.
    """

    base_url: str
    model: str
    api_key_env: str = DEFAULT_API_KEY_ENV
    transcribe_model: str = DEFAULT_TRANSCRIBE_MODEL
    timeout_s: float = DEFAULT_ASSISTANT_TIMEOUT_S
    max_retry_wait_s: float = DEFAULT_MAX_RETRY_WAIT_S

    def __post_init__(self) -> None:
        """Validate offline (the key's presence is checked by the gateway).

        Raises:
            ConfigError: a field is invalid (one line, naming its flag).
        """
        parse_base_url(self.base_url)
        if not _MODEL_NAME.fullmatch(self.model):
            raise ConfigError(f"--model {self.model!r} is not a model name")
        if not _MODEL_NAME.fullmatch(self.transcribe_model):
            raise ConfigError(
                f"--transcribe-model {self.transcribe_model!r} is not a model name"
            )
        if not _ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError(
                f"--api-key-env {self.api_key_env!r} is not an environment variable "
                "name (letters, digits and '_')"
            )
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= 3600):
            raise ConfigError("--timeout must be more than 0 and at most 3600 s")
        if not (math.isfinite(self.max_retry_wait_s) and self.max_retry_wait_s >= 0):
            raise ConfigError("--max-retry-wait must be 0 s or more")

    @property
    def cleartext_remote(self) -> bool:
        """Whether requests go as plain http to a host other than loopback."""
        parts = urlsplit(self.base_url)
        return parts.scheme == "http" and not _is_loopback(parts.hostname or "")

    def api_key(self) -> str | None:
        """The API key from the environment, or None if unset or empty."""
        return os.environ.get(self.api_key_env) or None

    def describe(self) -> str:
        """The backend for logs: model and base URL (it holds no credentials)."""
        return f"model {self.model} at {parse_base_url(self.base_url)}"


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
        assistant: The assistant backend (``builtin`` or ``openai``).
        latency: The built-in assistant's first-token model.
        openai: The ``openai`` assistant's endpoint (None for ``builtin``).
        store: The idempotency store.
        ledger: File to append one JSON line per event to, or None.
        device_dirs: Extra directories of device records (``*.json``).
        group: MQTT shared-subscription group.
        prefix: Channel prefix (topics ``{prefix}/{pseudonym}/...``).
        idempotency_ttl_s: How long processed message ids are remembered.
        assembly_ttl_s: How long parts of an incomplete request are kept.
        ack_delay_s: Acks for one device are gathered this long, then signed.
        ack_interval_s: At most one ack per device this often (delayed ACK
            under load, as QUIC's ack frequency): a device that streams gets
            an ack with every id of the last interval instead of one per
            message, which spares the phone a signature check, a packet
            and an outbox write per message; one after a quiet spell is
            acknowledged after ``ack_delay_s`` only. An ack held so is at
            most this late, and says per id how long it was held, which the
            phone takes out of its round-trip samples (docs/envelope.md §6).
            Each ack costs a streaming phone about 1 ms of CPU (an MQTT
            read, an Ed25519 check, an outbox delete; docs/benchmarks-history.md).
        ack_max_ids: A device with this many ids waiting is acknowledged
            without waiting for ``ack_interval_s`` (a fast sender's window of
            unacknowledged messages must not fill while acks are held).
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
        epoch_cache: Epoch keys of phones' uplinks kept opened (each costs one
            HPKE open and one signature check; the least recently used goes).
    """

    state_dir: Path
    broker_url: str | None = None
    listen: tuple[str, int] | None = None
    assistant: str = "builtin"
    latency: LatencyModel = DEFAULT_LATENCY
    openai: OpenAIConfig | None = None
    store: StoreSpec = field(default_factory=StoreSpec)
    ledger: Path | None = None
    device_dirs: tuple[Path, ...] = ()
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S
    assembly_ttl_s: float = 86_400.0
    ack_delay_s: float = ACK_DELAY_S
    ack_interval_s: float = ACK_INTERVAL_S
    ack_max_ids: int = 64
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
    epoch_cache: int = EPOCH_CACHE_ENTRIES

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
        if self.assistant == "openai":
            if self.openai is None:
                raise ConfigError("--assistant openai needs --base-url and --model")
            if self.openai.api_key() is None:
                raise ConfigError(
                    "--assistant openai needs the API key in "
                    f"${self.openai.api_key_env} (or name another variable with "
                    "--api-key-env)"
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
        for name in ("ack_delay_s", "ack_interval_s", "answer_hold_s"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"gateway {name} must be 0 to 1 s")
        for name in (
            "ack_max_ids",
            "max_queue",
            "max_batch",
            "epoch_cache",
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
    openai = parser.add_argument_group(
        "openai assistant",
        "any OpenAI-compatible endpoint (OpenAI, Qwen via DashScope's compatible "
        "mode, llama.cpp, Ollama); the API key comes from the environment only",
    )
    openai.add_argument(
        "--base-url",
        metavar="URL",
        help="API base, e.g. https://api.openai.com/v1, "
        "https://dashscope.aliyuncs.com/compatible-mode/v1 or "
        "http://127.0.0.1:11434/v1",
    )
    openai.add_argument("--model", metavar="NAME", help="chat model, e.g. qwen-plus")
    openai.add_argument(
        "--api-key-env",
        metavar="VAR",
        help=f"environment variable holding the API key (default: "
        f"{DEFAULT_API_KEY_ENV})",
    )
    openai.add_argument(
        "--transcribe-model",
        metavar="NAME",
        help="speech-to-text model for voice queries (default: "
        f"{DEFAULT_TRANSCRIBE_MODEL})",
    )
    openai.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help="bound on one answer, retries included (default: "
        f"{DEFAULT_ASSISTANT_TIMEOUT_S:g})",
    )
    openai.add_argument(
        "--max-retry-wait",
        metavar="SECONDS",
        type=float,
        help="longest wait a retry-after header may impose (default: "
        f"{DEFAULT_MAX_RETRY_WAIT_S:g})",
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


def _openai_from_args(args: argparse.Namespace) -> OpenAIConfig | None:
    """The ``openai`` assistant's settings, or None for another assistant.

    Raises:
        ConfigError: openai flags without ``--assistant openai``, or what
            ``--assistant openai`` needs is missing (one line naming it all).
    """
    flags = {
        "--base-url": args.base_url,
        "--model": args.model,
        "--api-key-env": args.api_key_env,
        "--transcribe-model": args.transcribe_model,
        "--timeout": args.timeout,
        "--max-retry-wait": args.max_retry_wait,
    }
    if args.assistant != "openai":
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --assistant openai")
        return None
    env = _or(args.api_key_env, DEFAULT_API_KEY_ENV)
    missing = [
        what
        for what, value in (
            ("--base-url URL", args.base_url),
            ("--model NAME", args.model),
        )
        if not value
    ]
    if _ENV_NAME.fullmatch(env) and not os.environ.get(env):
        missing.append(f"the API key in ${env}")
    if missing:
        raise ConfigError(f"--assistant openai needs {' and '.join(missing)}")
    return OpenAIConfig(
        base_url=args.base_url,
        model=args.model,
        api_key_env=env,
        transcribe_model=_or(args.transcribe_model, DEFAULT_TRANSCRIBE_MODEL),
        timeout_s=_or(args.timeout, DEFAULT_ASSISTANT_TIMEOUT_S),
        max_retry_wait_s=_or(args.max_retry_wait, DEFAULT_MAX_RETRY_WAIT_S),
    )


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value


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
        openai=_openai_from_args(args),
        store=parse_store(args.idempotency),
        ledger=Path(args.ledger).expanduser() if args.ledger else None,
        device_dirs=tuple(Path(d).expanduser() for d in args.devices),
        group=args.group,
        prefix=args.prefix,
        idempotency_ttl_s=ttl,
    )
