"""The daemon's configuration: one TOML file, the environment and flags.

The one place configuration is loaded (STYLE.md rule 9): :func:`load_config`
reads every source once, converts and checks every value, and returns a frozen
:class:`RelayConfig` that the CLI passes down. docs/configuration.md lists
every key.

Sources, each beating the ones after it:

1. flags of ``glasses-relay run`` (only those the user gave);
2. environment variables ``GLASSES_RELAY_<SECTION>_<KEY>``, e.g.
   ``GLASSES_RELAY_UPLINK_BROKER`` (an empty one counts as unset);
3. the TOML file: ``--config FILE``, else ``$GLASSES_RELAY_CONFIG``, else
   ``config.toml`` in platformdirs' user configuration directory
   (``~/.config/glasses-relay/`` on Linux); only the last may be missing;
4. the defaults in :data:`KEYS`.

A value that cannot be used is a :class:`~relay.errors.ConfigError` whose
message is one line naming the key (``section.key``), the value (secrets shown
as ``***``), where it came from and what is allowed. Unknown keys in the file
or the environment are errors too, with the nearest valid key suggested. A
file that holds a secret must not be open to group or others (like key files).
Permanent uplink problems that can be seen offline (a malformed URL, a CA file
or client certificate that cannot be used) are
:class:`~relay.errors.UplinkConfigError` errors raised here, before the daemon
starts.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

import platformdirs

from protocol.gatt import NAME_PREFIX
from protocol.session import SessionConfig
from relay.ble.link import LinkConfig
from relay.capture_ring import MIN_RING_BYTES, RingConfig
from relay.cloudlink import CloudConfig
from relay.errors import ConfigError, UplinkConfigError
from relay.outbox import OutboxConfig, Synchronous
from relay.router.decide import Policy
from relay.router.strategies import Strategy
from relay.sim.profiles import PROFILES
from relay.sim.scenarios import SCENARIOS
from relay.uplink.tls import client_tls_context
from relay.uplink.url import parse_broker_url, parse_gateway_url

__all__ = [
    "ENV_CONFIG",
    "ENV_PREFIX",
    "KEYS",
    "Key",
    "LoggingSettings",
    "SECTIONS",
    "RelayConfig",
    "Setting",
    "SimSettings",
    "StatusSettings",
    "UplinkKind",
    "UplinkSettings",
    "default_config_path",
    "flags_from_args",
    "load_config",
    "render_toml",
]

ENV_PREFIX: Final = "GLASSES_RELAY_"
ENV_CONFIG: Final = "GLASSES_RELAY_CONFIG"
APP_NAME: Final = "glasses-relay"
MASK: Final = "***"
LEVELS: Final = ("warning", "info", "debug")


class _InvalidError(Exception):
    """A value a type rejects; the text (maybe empty) says why."""


# -- value types ---------------------------------------------------------------


class _Type(Protocol):
    @property
    def allowed(self) -> str:
        """What is allowed, for people."""
        ...

    @property
    def toml(self) -> str:
        """The TOML type, for docs/configuration.md."""
        ...

    def parse(self, raw: object, *, text: bool, base: Path | None) -> object:
        """Convert ``raw`` (text from the environment or a flag if ``text``)."""
        ...


@dataclass(frozen=True, slots=True)
class _Int:
    lo: int
    hi: int | None = None
    unit: str = ""
    toml: str = "integer"

    @property
    def allowed(self) -> str:
        span = f"from {self.lo} to {self.hi}" if self.hi else f">= {self.lo}"
        return f"an integer {span}" + (f" ({self.unit})" if self.unit else "")

    def parse(self, raw: object, *, text: bool, base: Path | None) -> int:
        if text and isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise _InvalidError from None
        elif isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            raise _InvalidError
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise _InvalidError
        return value


@dataclass(frozen=True, slots=True)
class _Float:
    lo: float = 0.0
    hi: float | None = None
    lo_open: bool = True
    toml: str = "float"

    @property
    def allowed(self) -> str:
        low = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        high = f" and <= {self.hi:g}" if self.hi is not None else ""
        return f"a number of seconds {low}{high}"

    def parse(self, raw: object, *, text: bool, base: Path | None) -> float:
        if text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _InvalidError from None
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        else:
            raise _InvalidError
        too_low = value <= self.lo if self.lo_open else value < self.lo
        too_high = self.hi is not None and value > self.hi
        if not math.isfinite(value) or too_low or too_high:
            raise _InvalidError
        return value


_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True, slots=True)
class _Bool:
    toml: str = "boolean"

    @property
    def allowed(self) -> str:
        return "true or false"

    def parse(self, raw: object, *, text: bool, base: Path | None) -> bool:
        if isinstance(raw, bool):
            return raw
        if text and isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise _InvalidError


@dataclass(frozen=True, slots=True)
class _Str:
    what: str = "a non-empty printable string"
    max_bytes: int = 1024
    pattern: re.Pattern[str] | None = None
    toml: str = "string"

    @property
    def allowed(self) -> str:
        return self.what

    def parse(self, raw: object, *, text: bool, base: Path | None) -> str:
        if not isinstance(raw, str) or not raw or not raw.isprintable():
            raise _InvalidError
        if len(raw.encode()) > self.max_bytes:
            raise _InvalidError(f"longer than {self.max_bytes} bytes")
        if self.pattern is not None and not self.pattern.fullmatch(raw):
            raise _InvalidError
        return raw


@dataclass(frozen=True, slots=True)
class _Choice:
    choices: tuple[str, ...]
    toml: str = "string"

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def parse(self, raw: object, *, text: bool, base: Path | None) -> str:
        if isinstance(raw, str) and raw.strip().lower() in self.choices:
            return raw.strip().lower()
        raise _InvalidError


@dataclass(frozen=True, slots=True)
class _Path:
    what: str
    must_exist: bool = False
    toml: str = "string (path)"

    @property
    def allowed(self) -> str:
        return self.what

    def parse(self, raw: object, *, text: bool, base: Path | None) -> Path:
        if not isinstance(raw, str | Path) or not str(raw) or "\0" in str(raw):
            raise _InvalidError
        path = Path(raw).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path  # relative to the configuration file
        if self.must_exist and not path.is_file():
            problem = "not a file" if path.exists() else "no such file"
            raise _InvalidError(f"{problem}: {path}")
        return path


@dataclass(frozen=True, slots=True)
class _Url:
    scheme: str  # "broker" or "gateway"
    toml: str = "string (URL)"

    @property
    def allowed(self) -> str:
        if self.scheme == "broker":
            return "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        return "ws://HOST[:PORT][/PATH] or wss://HOST[:PORT][/PATH]"

    def parse(self, raw: object, *, text: bool, base: Path | None) -> str:
        if not isinstance(raw, str):
            raise _InvalidError
        parse = parse_broker_url if self.scheme == "broker" else parse_gateway_url
        try:
            parse(raw)
        except UplinkConfigError as exc:
            raise _InvalidError(str(exc)) from None
        return raw


def _File(what: str) -> _Path:  # noqa: N802 - reads like the other types
    return _Path(what, must_exist=True)


_HCI_CLIENT: Final = re.compile(r"tcp-client:([^:\s]+):(\d{1,5})")


@dataclass(frozen=True, slots=True)
class _Sim:
    toml: str = "string"

    @property
    def allowed(self) -> str:
        return "off, in-process or tcp-client:HOST:PORT"

    def parse(self, raw: object, *, text: bool, base: Path | None) -> str:
        if isinstance(raw, str):
            value = raw.strip()
            if value.lower() in ("off", "in-process"):
                return value.lower()
            match = _HCI_CLIENT.fullmatch(value)
            if match and 0 < int(match[2]) < 65536:
                return value
        raise _InvalidError


_ADDRESS: Final = re.compile(
    r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"
    r"|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)


# -- the keys ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: its section, name, type, default and flag.

    Attributes:
        section: The TOML table (``[uplink]``).
        name: The key inside it (``broker``).
        type: Conversion and check (also says what is allowed).
        default: Used when no source sets it; None means unset.
        flag: The flag of ``glasses-relay run`` that sets it, if any.
        secret: Never shown: ``***`` in messages and ``--print-config``.
    """

    section: str
    name: str
    type: _Type
    default: object
    flag: str | None = None
    secret: bool = False

    @property
    def dotted(self) -> str:
        """``section.name``, as messages name the key."""
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return f"{ENV_PREFIX}{self.section.upper()}_{self.name.upper()}"

    @property
    def allowed(self) -> str:
        """What values are allowed, for people."""
        return self.type.allowed


_ADDRESS_TEXT: Final = "a Bluetooth address AA:BB:CC:DD:EE:FF (a UUID on macOS)"
_SECONDS: Final = _Float()
_POSITIVE: Final = _Int(1)
_LINK: Final = LinkConfig()
_SESSION: Final = SessionConfig()
_OUTBOX: Final = OutboxConfig()
_CLOUD: Final = CloudConfig()
_POLICY: Final = Policy()
_RING: Final = RingConfig()

KEYS: Final[tuple[Key, ...]] = (
    Key("glasses", "address", _Str(_ADDRESS_TEXT, pattern=_ADDRESS), None, "--address"),
    Key(
        "glasses",
        "name",
        _Str("a printable name of 1 to 248 bytes", 248),
        NAME_PREFIX,
        "--name",
    ),
    Key("glasses", "sim", _Sim(), "off", "--sim"),
    Key("glasses", "scenario", _Choice((*SCENARIOS, "none")), "day", "--scenario"),
    Key("glasses", "profile", _Choice(tuple(PROFILES)), "android-2m", "--profile"),
    Key("glasses", "scan_timeout", _SECONDS, _LINK.scan_timeout),
    Key("glasses", "connect_timeout", _SECONDS, _LINK.connect_timeout),
    Key("glasses", "connect_attempts", _Int(1, 100), _LINK.connect_attempts),
    Key("glasses", "notify_queue", _POSITIVE, _LINK.notify_queue),
    Key("glasses", "write_window", _POSITIVE, _LINK.write_window),
    Key("session", "handshake_timeout", _SECONDS, _SESSION.handshake_timeout),
    Key("session", "heartbeat_interval", _SECONDS, _SESSION.heartbeat_interval),
    Key("session", "supervision_timeout", _SECONDS, _SESSION.supervision_timeout),
    Key("session", "resend_after", _SECONDS, _SESSION.resend_after),
    Key("session", "ack_delay", _Float(0, 1, lo_open=False), _SESSION.ack_delay),
    Key("session", "ack_batch", _Int(1, 1024), _SESSION.ack_batch),
    Key("outbox", "max_bytes", _Int(1, unit="bytes"), _OUTBOX.max_bytes),
    Key("outbox", "max_rows", _POSITIVE, _OUTBOX.max_rows),
    Key("outbox", "max_age", _SECONDS, _OUTBOX.max_age_s),
    Key(
        "outbox",
        "commit_interval",
        _Float(0, 1, lo_open=False),
        _OUTBOX.commit_interval,
    ),
    Key("outbox", "commit_max_batch", _POSITIVE, _OUTBOX.commit_max_batch),
    Key(
        "outbox",
        "lazy_flush_interval",
        _Float(0, 10, lo_open=False),
        _OUTBOX.lazy_flush_interval,
    ),
    Key(
        "outbox",
        "synchronous",
        _Choice(("normal", "full")),
        _OUTBOX.synchronous.lower(),
    ),
    Key("outbox", "inline_commit", _Bool(), _OUTBOX.inline_commit),
    Key(
        "outbox",
        "write_delay",
        _Float(0, 5, lo_open=False),
        _OUTBOX.write_delay,
    ),
    Key(
        "outbox",
        "max_unwritten_bytes",
        _Int(1, unit="bytes"),
        _OUTBOX.max_unwritten_bytes,
    ),
    Key("cloud", "max_in_flight", _POSITIVE, _CLOUD.max_in_flight),
    Key("cloud", "batch_items", _Int(1, 1024), _CLOUD.batch_items),
    Key("cloud", "batch_bytes", _Int(1024, 512 * 1024, "bytes"), _CLOUD.batch_bytes),
    Key("cloud", "batches_per_send", _Int(1, 64), _CLOUD.batches_per_send),
    Key("cloud", "epoch_messages", _Int(0, 2**32), _CLOUD.epoch_messages),
    Key("cloud", "epoch_seconds", _SECONDS, _CLOUD.epoch_seconds),
    Key("cloud", "max_pending_puts", _Int(1, 4096), _CLOUD.max_pending_puts),
    Key("cloud", "resend_after", _SECONDS, _CLOUD.resend_after),
    Key("cloud", "resend_cap", _SECONDS, _CLOUD.resend_cap),
    Key("cloud", "key_poll", _SECONDS, _CLOUD.key_poll),
    Key("uplink", "kind", _Choice(("auto", "none", "mqtt", "ws")), "auto", "--uplink"),
    Key("uplink", "broker", _Url("broker"), None, "--broker"),
    Key("uplink", "gateway", _Url("gateway"), None, "--gateway"),
    Key("uplink", "ca_file", _File("a PEM file of CA certificates"), None, "--ca-file"),
    Key("uplink", "client_cert", _File("a PEM certificate file"), None),
    Key("uplink", "client_key", _File("an unencrypted PEM key file"), None),
    Key("uplink", "username", _Str(max_bytes=65535), None, "--username"),
    Key("uplink", "password", _Str(max_bytes=65535), None, "--password-env", True),
    Key(
        "uplink", "gateway_key", _Path("a path to a public.json"), None, "--gateway-key"
    ),
    Key("uplink", "envelope_fallback", _Bool(), False, "--envelope-fallback"),
    Key("router", "deadline_ms", _Int(1, 600_000, "ms"), Policy().deadline_ms),
    Key(
        "router",
        "strategy",
        _Choice(tuple(s.value for s in Strategy)),
        Strategy.ROUTER.value,
    ),
    Key("router", "margin_ms", _Int(0, 10_000, "ms"), round(_POLICY.margin_s * 1000)),
    Key("router", "hedge_budget", _Float(0, 1, lo_open=False), _POLICY.hedge_budget),
    Key(
        "router",
        "hedge_slack_ms",
        _Int(0, 10_000, "ms"),
        round(_POLICY.hedge_slack_s * 1000),
    ),
    Key("router", "battery_saver", _Bool(), _POLICY.battery_saver),
    Key("router", "data_saver", _Bool(), _POLICY.data_saver),
    Key("router", "late_cloud_follows", _Bool(), _POLICY.late_cloud_follows),
    Key("status", "port", _Int(1, 65535), None, "--status-port"),
    Key("capture", "ring_minutes", _Int(0, 1440, "minutes"), 0, "--capture-ring"),
    Key(
        "capture",
        "ring_bytes",
        _Int(MIN_RING_BYTES, 1 << 30, "bytes"),
        _RING.max_bytes,
    ),
    Key("logging", "level", _Choice(LEVELS), "warning", "-v/-vv"),
)
"""Every key, in the order of docs/configuration.md and ``--print-config``."""

_BY_NAME: Final = MappingProxyType({key.dotted: key for key in KEYS})
SECTIONS: Final = tuple(dict.fromkeys(key.section for key in KEYS))


# -- the result ----------------------------------------------------------------


class UplinkKind(enum.StrEnum):
    """How the daemon reaches the cloud."""

    NONE = "none"
    MQTT = "mqtt"
    WS = "ws"


@dataclass(frozen=True, slots=True)
class SimSettings:
    """Emulated glasses: ``mode`` is off, in-process or ``tcp-client:HOST:PORT``."""

    mode: str = "off"
    scenario: str | None = "day"
    profile: str = "android-2m"

    @property
    def enabled(self) -> bool:
        """Whether emulated glasses replace the radio."""
        return self.mode != "off"

    @property
    def connect(self) -> str | None:
        """The ``tcp-client:HOST:PORT`` of a ``glasses-relay sim`` process, if any."""
        return self.mode if self.mode.startswith("tcp-client:") else None


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    """The uplink to the cloud and the gateway the envelopes are sealed to."""

    kind: UplinkKind = UplinkKind.NONE
    broker: str | None = None
    gateway: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    gateway_key: Path | None = None
    envelope_fallback: bool = False

    @property
    def url(self) -> str:
        """The broker's URL for mqtt, the gateway's for ws, else ``""``."""
        if self.kind is UplinkKind.MQTT:
            return self.broker or ""
        if self.kind is UplinkKind.WS:
            return self.gateway or ""
        return ""


@dataclass(frozen=True, slots=True)
class StatusSettings:
    """Where the status API listens: ``port`` on loopback, else the Unix socket."""

    port: int | None = None


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """What is logged to standard error."""

    level: str = "warning"

    @property
    def verbosity(self) -> int:
        """The ``-v`` count this level corresponds to (0, 1 or 2)."""
        return LEVELS.index(self.level)


@dataclass(frozen=True, slots=True)
class Setting:
    """One effective value and where it came from (a flag, variable, file, default)."""

    value: object
    source: str


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The daemon's whole configuration, validated; build it with :func:`load_config`.

    Attributes:
        link: ``[glasses]``: finding and pacing the BLE link.
        sim: ``[glasses]``: emulated glasses instead of a radio.
        session: ``[session]``: the secure session's timers.
        outbox: ``[outbox]``: the durable queue's limits.
        cloud: ``[cloud]``: send window, batching and resend timers.
        uplink: ``[uplink]``: how to reach the cloud, credentials, gateway key.
        policy: ``[router]``: the routing policy.
        strategy: ``router.strategy``: the router or a baseline.
        status: ``[status]``: where the status API listens.
        capture: ``[capture]``: the daemon's rolling capture of the link.
        logging: ``[logging]``: the log level.
        file: The configuration file read, or None.
        effective: Every key's value and source, for ``--print-config``.
    """

    link: LinkConfig = field(default_factory=LinkConfig)
    sim: SimSettings = field(default_factory=SimSettings)
    session: SessionConfig = field(default_factory=SessionConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    uplink: UplinkSettings = field(default_factory=UplinkSettings)
    policy: Policy = field(default_factory=Policy)
    strategy: Strategy = Strategy.ROUTER
    status: StatusSettings = field(default_factory=StatusSettings)
    capture: RingConfig = field(default_factory=RingConfig)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    file: Path | None = None
    effective: Mapping[str, Setting] = field(
        default_factory=dict, compare=False, repr=False
    )


# -- loading -------------------------------------------------------------------


def default_config_path() -> Path:
    """``config.toml`` in platformdirs' user configuration directory."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def load_config(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_path: Path | None,
) -> RelayConfig:
    """Read the file, the environment and the flags; convert and check everything.

    Args:
        flags: Values of the flags the user gave, by key (``"uplink.broker"``);
            see :func:`flags_from_args`. Strings are converted like variables.
        environ: The environment (``GLASSES_RELAY_*`` are read).
        config_path: The ``--config`` file; None for ``$GLASSES_RELAY_CONFIG`` or
            the default location, which may be missing.

    Returns:
        The configuration.

    Raises:
        ConfigError: a value, key, file or combination cannot be used (one
            line); :class:`~relay.errors.UplinkConfigError` for a permanent
            uplink problem seen offline (URL, CA file, client certificate).
    """
    for name in flags:
        if name not in _BY_NAME:
            msg = f"no configuration key {name!r}"
            raise ValueError(msg)
    if config_path is not None:
        path, origin = config_path.expanduser(), "--config"
    elif environ.get(ENV_CONFIG):
        path, origin = Path(environ[ENV_CONFIG]).expanduser(), ENV_CONFIG
    else:
        path, origin = default_config_path(), ""
    in_file = _read_file(path, origin)
    in_env = _read_env(environ)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        name = key.dotted
        raw: object
        base: Path | None = None  # set for the file: its values are not text
        if name in flags:
            raw, source = flags[name], key.flag or "a flag"
        elif name in in_env:
            raw, source = in_env[name], key.env
        elif in_file is not None and name in in_file:
            raw, source, base = in_file[name], str(path), path.absolute().parent
        else:
            values[name], sources[name] = key.default, "default"
            continue
        try:
            values[name] = key.type.parse(raw, text=base is None, base=base)
        except _InvalidError as exc:
            raise _bad(key, raw, source, str(exc)) from None
        sources[name] = source
    return _build(values, sources, None if in_file is None else path)


def _read_file(path: Path, origin: str) -> dict[str, object] | None:
    """The file's keys (``section.key`` to TOML value); None if absent and optional."""
    label = f"config file {path}" + (f" (from {origin})" if origin else "")
    try:
        with path.open("rb") as fp:
            info = os.fstat(fp.fileno())
            data = fp.read()
    except FileNotFoundError:
        if origin:
            raise ConfigError(f"{label}: no such file") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read: {exc.strerror}") from None
    try:
        document = tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: invalid TOML: {exc}") from None
    found: dict[str, object] = {}
    for section, table in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"{label}: {_unknown(section, table)}")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{label}: {section} must be a table [{section}], not a value"
            )
        for name, value in table.items():
            if f"{section}.{name}" not in _BY_NAME:
                raise ConfigError(f"{label}: {_unknown(f'{section}.{name}', value)}")
            found[f"{section}.{name}"] = value
    secrets = [k for k in found if _BY_NAME[k].secret]
    mode = stat.S_IMODE(info.st_mode)
    if secrets and mode & 0o077:
        raise ConfigError(
            f"{label} holds {secrets[0]} but has mode {mode:04o}, open to "
            f"group/others; fix: chmod 600 {path} (or set {_BY_NAME[secrets[0]].env} "
            "instead)"
        )
    return found


def _read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``GLASSES_RELAY_<SECTION>_<KEY>`` variables of known sections, by key."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        section, _, rest = name.removeprefix(ENV_PREFIX).partition("_")
        if not name.startswith(ENV_PREFIX) or section.lower() not in SECTIONS:
            continue  # GLASSES_RELAY_STATE_DIR, GLASSES_RELAY_CONFIG, ...
        dotted = f"{section.lower()}.{rest.lower()}"
        if dotted not in _BY_NAME:
            hint = _suggest(dotted)
            suggestion = f"; did you mean {_BY_NAME[hint].env}?" if hint else ""
            raise ConfigError(
                f"unknown environment variable {name}: no key {dotted}{suggestion}"
            )
        if value:  # an empty variable counts as unset
            found[dotted] = value
    return found


def _suggest(dotted: str) -> str | None:
    """The valid key nearest to ``dotted``: in its section first, then anywhere."""
    section, _, name = dotted.rpartition(".")
    local = [key.name for key in KEYS if key.section == section]
    near = difflib.get_close_matches(name, local, n=1, cutoff=0.6)
    if near:
        return f"{section}.{near[0]}"
    names = {key.name: key.dotted for key in KEYS}
    near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.75)
    return names[near[0]] if near else None


def _unknown(dotted: str, value: object) -> str:
    """The message for a key or section of the file that does not exist."""
    if "." not in dotted and isinstance(value, dict):
        near = difflib.get_close_matches(dotted, SECTIONS, n=1, cutoff=0.6)
        hint = (
            f"did you mean [{near[0]}]?" if near else "sections: " + ", ".join(SECTIONS)
        )
        return f"unknown section [{dotted}]; {hint}"
    hint_key = _suggest(dotted)
    if hint_key is not None:
        return f"unknown key {dotted}; did you mean {hint_key}?"
    section = dotted.partition(".")[0]
    valid = [k.name for k in KEYS if k.section == section]
    listed = f"keys of [{section}]: " + ", ".join(valid) if valid else "no such key"
    return f"unknown key {dotted}; {listed}"


def _shown(key: Key, raw: object) -> str:
    """A value for a message: masked if secret, credentials cut from URLs, short."""
    if key.secret:
        return MASK
    text = str(raw) if isinstance(raw, Path) else raw
    if isinstance(text, str):
        scheme, sep, rest = text.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            text = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return repr(text if len(text) <= 80 else text[:77] + "...")
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _bad(
    key: Key, raw: object, source: str, reason: str = "", allowed: str = ""
) -> ConfigError:
    """The one-line error for a value of ``key`` that cannot be used."""
    reason = reason.replace("\n", " ")
    if key.secret:
        reason = ""  # a parser's reason might quote the value
    why = f": {reason}" if reason else ""
    text = (
        f"bad value for {key.dotted}: {_shown(key, raw)} (from {source}){why}; "
        f"allowed: {allowed or key.allowed}"
    )
    if key.section == "uplink":
        return UplinkConfigError(text)
    return ConfigError(text)


# -- building the dataclasses ----------------------------------------------------


class _Values:
    """Typed access to the converted values, with their sources for messages."""

    def __init__(self, values: dict[str, object], sources: dict[str, str]) -> None:
        self.values = values
        self.sources = sources

    def get(self, name: str) -> object:
        return self.values[name]

    def get_int(self, name: str) -> int:
        value = self.values[name]
        if not isinstance(value, int):
            raise TypeError(name)
        return value

    def get_float(self, name: str) -> float:
        value = self.values[name]
        if not isinstance(value, float):
            raise TypeError(name)
        return value

    def get_bool(self, name: str) -> bool:
        value = self.values[name]
        if not isinstance(value, bool):
            raise TypeError(name)
        return value

    def get_str(self, name: str) -> str:
        value = self.values[name]
        if not isinstance(value, str):
            raise TypeError(name)
        return value

    def opt_str(self, name: str) -> str | None:
        value = self.values[name]
        return None if value is None else self.get_str(name)

    def opt_path(self, name: str) -> Path | None:
        value = self.values[name]
        if value is not None and not isinstance(value, Path):
            raise TypeError(name)
        return value

    def bad(self, name: str, allowed: str, reason: str = "") -> ConfigError:
        key = _BY_NAME[name]
        return _bad(key, self.values[name], self.sources[name], reason, allowed)

    def given(self, name: str) -> str:
        """How to set ``name``: its flag, variable or the file."""
        key = _BY_NAME[name]
        ways = [w for w in (key.flag, key.env) if w and not w.startswith("-v")]
        return " or ".join([*ways, f"[{key.section}] {key.name} in the file"])


def _build(
    values: dict[str, object], sources: dict[str, str], path: Path | None
) -> RelayConfig:
    """Check the combinations and build the dataclasses."""
    v = _Values(values, sources)
    uplink = _uplink(v)
    _ordered(
        v, "session.heartbeat_interval", "session.supervision_timeout", strict=True
    )
    _ordered(v, "cloud.resend_after", "cloud.resend_cap", strict=False)
    _ordered(v, "session.ack_delay", "session.resend_after", strict=True)
    scenario = v.get_str("glasses.scenario")
    try:
        config = RelayConfig(
            link=LinkConfig(
                address=v.opt_str("glasses.address"),
                name_prefix=v.get_str("glasses.name"),
                scan_timeout=v.get_float("glasses.scan_timeout"),
                connect_timeout=v.get_float("glasses.connect_timeout"),
                connect_attempts=v.get_int("glasses.connect_attempts"),
                notify_queue=v.get_int("glasses.notify_queue"),
                write_window=v.get_int("glasses.write_window"),
            ),
            sim=SimSettings(
                mode=v.get_str("glasses.sim"),
                scenario=None if scenario == "none" else scenario,
                profile=v.get_str("glasses.profile"),
            ),
            session=SessionConfig(
                handshake_timeout=v.get_float("session.handshake_timeout"),
                heartbeat_interval=v.get_float("session.heartbeat_interval"),
                supervision_timeout=v.get_float("session.supervision_timeout"),
                resend_after=v.get_float("session.resend_after"),
                ack_delay=v.get_float("session.ack_delay"),
                ack_batch=v.get_int("session.ack_batch"),
            ),
            outbox=OutboxConfig(
                max_bytes=v.get_int("outbox.max_bytes"),
                max_rows=v.get_int("outbox.max_rows"),
                max_age_s=v.get_float("outbox.max_age"),
                commit_interval=v.get_float("outbox.commit_interval"),
                commit_max_batch=v.get_int("outbox.commit_max_batch"),
                lazy_flush_interval=v.get_float("outbox.lazy_flush_interval"),
                synchronous=Synchronous(v.get_str("outbox.synchronous").upper()),
                inline_commit=v.get_bool("outbox.inline_commit"),
                write_delay=v.get_float("outbox.write_delay"),
                max_unwritten_bytes=v.get_int("outbox.max_unwritten_bytes"),
            ),
            cloud=CloudConfig(
                max_in_flight=v.get_int("cloud.max_in_flight"),
                batch_items=v.get_int("cloud.batch_items"),
                batch_bytes=v.get_int("cloud.batch_bytes"),
                batches_per_send=v.get_int("cloud.batches_per_send"),
                epoch_messages=v.get_int("cloud.epoch_messages"),
                epoch_seconds=v.get_float("cloud.epoch_seconds"),
                max_pending_puts=v.get_int("cloud.max_pending_puts"),
                resend_after=v.get_float("cloud.resend_after"),
                resend_cap=v.get_float("cloud.resend_cap"),
                key_poll=v.get_float("cloud.key_poll"),
                announce_presence=uplink.kind is UplinkKind.MQTT,
            ),
            uplink=uplink,
            policy=Policy(
                deadline_s=v.get_int("router.deadline_ms") / 1000,
                margin_s=v.get_int("router.margin_ms") / 1000,
                hedge_budget=v.get_float("router.hedge_budget"),
                hedge_slack_s=v.get_int("router.hedge_slack_ms") / 1000,
                battery_saver=v.get_bool("router.battery_saver"),
                data_saver=v.get_bool("router.data_saver"),
                late_cloud_follows=v.get_bool("router.late_cloud_follows"),
            ),
            strategy=Strategy(v.get_str("router.strategy")),
            status=StatusSettings(
                port=None if v.get("status.port") is None else v.get_int("status.port")
            ),
            capture=RingConfig(
                minutes=v.get_int("capture.ring_minutes"),
                max_bytes=v.get_int("capture.ring_bytes"),
            ),
            logging=LoggingSettings(level=v.get_str("logging.level")),
            file=path,
            effective=MappingProxyType(
                {k: Setting(values[k], sources[k]) for k in values}
            ),
        )
    except ValueError as exc:  # a check of the dataclasses this module missed
        raise ConfigError(f"invalid configuration: {exc}") from None
    return config


def _ordered(v: _Values, low: str, high: str, *, strict: bool) -> None:
    """Check ``low < high`` (or ``<=``); blame the one that is not a default."""
    lo, hi = v.get_float(low), v.get_float(high)
    if hi > lo or (hi == lo and not strict):
        return
    if v.sources[high] == "default":
        word = "less than" if strict else "at most"
        raise v.bad(low, f"{word} {high} ({hi:g})")
    word = "more than" if strict else "at least"
    raise v.bad(high, f"{word} {low} ({lo:g})")


def _uplink(v: _Values) -> UplinkSettings:
    """Resolve ``uplink.kind`` and check the uplink's keys together."""
    broker, gateway = v.opt_str("uplink.broker"), v.opt_str("uplink.gateway")
    kind = v.get_str("uplink.kind")
    if kind == "auto":
        kind = "mqtt" if broker else "ws" if gateway else "none"
        why = {"mqtt": "uplink.broker is set", "ws": "uplink.gateway is set"}
        v.values["uplink.kind"] = kind
        v.sources["uplink.kind"] = f"auto: {why.get(kind, 'no broker or gateway')}"
    for wanted, url_name in (("mqtt", "uplink.broker"), ("ws", "uplink.gateway")):
        if kind == wanted and v.get(url_name) is None:
            raise v.bad(
                "uplink.kind", f"{kind} only with {url_name} set ({v.given(url_name)})"
            )
    ca_file, cert = v.opt_path("uplink.ca_file"), v.opt_path("uplink.client_cert")
    key = v.opt_path("uplink.client_key")
    if key is not None and cert is None:
        raise v.bad("uplink.client_key", "only together with uplink.client_cert")
    url_key = {"mqtt": "uplink.broker", "ws": "uplink.gateway"}.get(kind)
    if url_key is not None:
        url = v.get_str(url_key)
        tls = url.lower().startswith(("mqtts:", "wss:"))
        for name, value in (("uplink.ca_file", ca_file), ("uplink.client_cert", cert)):
            if value is not None and not tls:
                secure = "an mqtts://" if kind == "mqtt" else "a wss://"
                raise v.bad(name, f"only with {secure} {url_key}, not {url!r}")
        password, user = v.get("uplink.password"), v.get("uplink.username")
        if kind == "mqtt" and password is not None and user is None:
            raise v.bad("uplink.password", "only together with uplink.username")
        if tls:
            _check_tls(v, ca_file, cert, key)
    return UplinkSettings(
        kind=UplinkKind(kind),
        broker=broker,
        gateway=gateway,
        ca_file=ca_file,
        client_cert=cert,
        client_key=key,
        username=v.opt_str("uplink.username"),
        password=v.opt_str("uplink.password"),
        gateway_key=v.opt_path("uplink.gateway_key"),
        envelope_fallback=bool(v.get("uplink.envelope_fallback")),
    )


def _check_tls(
    v: _Values, ca_file: Path | None, cert: Path | None, key: Path | None
) -> None:
    """Load the CA file and client certificate as the uplink will (permanent errors)."""
    if ca_file is not None:
        try:
            client_tls_context(ca_file=ca_file)
        except UplinkConfigError as exc:
            raise v.bad(
                "uplink.ca_file", _BY_NAME["uplink.ca_file"].allowed, str(exc)
            ) from None
    if cert is not None:
        try:
            client_tls_context(ca_file=None, cert_file=cert, key_file=key)
        except UplinkConfigError as exc:
            name = "uplink.client_cert" if key is None else "uplink.client_key"
            raise v.bad(
                name, "a PEM certificate and its unencrypted key", str(exc)
            ) from None


# -- flags and output ----------------------------------------------------------


def flags_from_args(
    args: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, object]:
    """The flags of ``glasses-relay run`` the user gave, by key (for load_config).

    Args:
        args: ``vars()`` of the parsed arguments; a flag not given is None or
            False (``--sim`` without a value is ``""``).
        environ: The environment, for ``--password-env VAR``.

    Raises:
        ConfigError: ``--password-env`` names a variable that is not set.
    """
    flags: dict[str, object] = {}
    for key in KEYS:
        if key.flag is None or key.dotted in ("uplink.password", "logging.level"):
            continue
        value = args.get(key.flag.removeprefix("--").replace("-", "_"))
        if value is not None and value is not False:
            flags[key.dotted] = value
    if flags.get("glasses.sim") == "":
        flags["glasses.sim"] = "in-process"
    variable = args.get("password_env")
    if isinstance(variable, str) and variable:
        if variable not in environ:
            raise ConfigError(f"--password-env {variable}: variable not set")
        flags["uplink.password"] = environ[variable]
    verbose = args.get("verbose")
    if isinstance(verbose, int) and verbose > 0:
        flags["logging.level"] = LEVELS[min(verbose, len(LEVELS) - 1)]
    return flags


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string
    return text.replace("\x7f", "\\u007f")


def render_toml(config: RelayConfig, *, state_dir: Path | None = None) -> str:
    """The effective configuration as TOML, secrets shown as ``***``.

    A comment header names the file read and ``state_dir``; each value set by
    something other than the default names its source in a comment; unset
    optional keys are commented out.
    """
    file = config.file or f"none ({default_config_path()} does not exist)"
    lines = [
        "# effective configuration of 'glasses-relay run' (secrets shown as ***)",
        f"# configuration file: {file}",
    ]
    if state_dir is not None:
        lines.append(
            f"# state directory: {state_dir} (--state-dir or GLASSES_RELAY_STATE_DIR)"
        )
    section = ""
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines += ["", f"[{section}]"]
        setting = config.effective.get(key.dotted, Setting(key.default, "default"))
        if setting.value is None:
            lines.append(f"# {key.name} is not set")
            continue
        value = _toml_value(MASK if key.secret else setting.value)
        note = "" if setting.source == "default" else f"  # {setting.source}"
        lines.append(f"{key.name} = {value}{note}")
    return "\n".join(lines).lstrip("\n") + "\n"
