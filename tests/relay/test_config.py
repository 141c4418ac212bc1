"""relay.config: one TOML file, GLASSES_RELAY_* variables and flags, validated.

Precedence flag > environment > file > default; every bad value is one line
naming the key, the value (secrets masked) and what is allowed; unknown keys
are refused with a suggestion; ``glasses-relay run --print-config`` never
shows a secret; a refused login stops the daemon with one line.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from protocol.session import SessionConfig
from relay.ble.link import LinkConfig
from relay.cloudlink import CloudConfig
from relay.config import (
    ENV_CONFIG,
    KEYS,
    RelayConfig,
    UplinkKind,
    default_config_path,
    flags_from_args,
    load_config,
    render_toml,
)
from relay.errors import ConfigError, UplinkConfigError
from relay.outbox import OutboxConfig, Synchronous
from relay.router.decide import Policy

SCRIPT = Path(sys.executable).parent / "glasses-relay"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECRET = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default location at an empty directory; drop GLASSES_RELAY_*."""
    for name in list(os.environ):
        if name.startswith("GLASSES_RELAY_"):
            monkeypatch.delenv(name)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    return xdg


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def load(
    tmp_path: Path,
    toml: str | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, object] | None = None,
) -> RelayConfig:
    path = None if toml is None else write(tmp_path / "relay.toml", toml)
    return load_config(flags or {}, env or {}, path)


def one_line_error(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return one_line(exc.value)


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    assert text
    return text


# -- defaults and precedence -----------------------------------------------------


def test_defaults_without_any_source(tmp_path: Path) -> None:
    config = load_config({}, {}, None)
    assert config.file is None
    assert config.link == LinkConfig()
    assert config.session == SessionConfig()
    assert config.outbox == OutboxConfig()
    assert config.cloud == CloudConfig(announce_presence=False)
    assert config.policy == Policy()
    assert config.uplink.kind is UplinkKind.NONE
    assert config.uplink.password is None
    assert config.status.port is None
    assert config.logging.verbosity == 0
    assert not config.sim.enabled
    sources = {k: s.source for k, s in config.effective.items()}
    assert sources.pop("uplink.kind") == "auto: no broker or gateway"
    assert set(sources.values()) == {"default"}


def test_default_location_is_read(no_user_config: Path) -> None:
    path = write(default_config_path(), '[glasses]\nname = "Mine"\n')
    assert path.is_relative_to(no_user_config)
    config = load_config({}, {}, None)
    assert config.file == path
    assert config.link.name_prefix == "Mine"


def test_env_names_the_file_and_the_flag_beats_it(tmp_path: Path) -> None:
    by_env = write(tmp_path / "env.toml", "[router]\ndeadline_ms = 1000\n")
    by_flag = write(tmp_path / "flag.toml", "[router]\ndeadline_ms = 2000\n")
    env = {ENV_CONFIG: str(by_env)}
    assert load_config({}, env, None).policy.deadline_ms == 1000
    assert load_config({}, env, by_flag).policy.deadline_ms == 2000


# key, file value (TOML), env value, flag value, how to read it, expected 4 values
PRECEDENCE = [
    ("glasses.name", '"FromFile"', "FromEnv", "FromFlag",
     lambda c: c.link.name_prefix, ["GR-Glasses", "FromFile", "FromEnv", "FromFlag"]),
    ("status.port", "8001", "8002", 8003,
     lambda c: c.status.port, [None, 8001, 8002, 8003]),
    ("glasses.scenario", '"soak"', "stress", "none",
     lambda c: c.sim.scenario, ["day", "soak", "stress", None]),
    ("uplink.broker", '"mqtt://file:1883"', "mqtt://env:1883", "mqtts://flag",
     lambda c: c.uplink.broker,
     [None, "mqtt://file:1883", "mqtt://env:1883", "mqtts://flag"]),
    ("uplink.envelope_fallback", "false", "yes", True,
     lambda c: c.uplink.envelope_fallback, [False, False, True, True]),
    ("outbox.synchronous", '"full"', "NORMAL", "full",
     lambda c: c.outbox.synchronous,
     [Synchronous.NORMAL, Synchronous.FULL, Synchronous.NORMAL, Synchronous.FULL]),
    ("session.heartbeat_interval", "1", "1.5", "0.5",
     lambda c: c.session.heartbeat_interval, [2.0, 1.0, 1.5, 0.5]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "in_file", "in_env", "in_flag", "read", "expected"),
    PRECEDENCE,
    ids=[p[0] for p in PRECEDENCE],
)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path,
    key: str,
    in_file: str,
    in_env: str,
    in_flag: object,
    read: object,
    expected: list[object],
) -> None:
    section, name = key.split(".")
    toml = f"[{section}]\n{name} = {in_file}\n"
    env = {f"GLASSES_RELAY_{section.upper()}_{name.upper()}": in_env}
    configs = [
        load(tmp_path),
        load(tmp_path, toml),
        load(tmp_path, toml, env),
        load(tmp_path, toml, env, {key: in_flag}),
    ]
    assert callable(read)
    assert [read(c) for c in configs] == expected
    sources = [c.effective[key].source for c in configs]
    assert sources[0] == "default"
    assert sources[1].endswith("relay.toml")
    assert sources[2] == env.popitem()[0]
    assert sources[3].startswith(("--", "a flag"))


def test_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    config = load(
        tmp_path, '[glasses]\nname = "File"\n', {"GLASSES_RELAY_GLASSES_NAME": ""}
    )
    assert config.link.name_prefix == "File"


def test_unrelated_variables_are_ignored(tmp_path: Path) -> None:
    env = {"GLASSES_RELAY_STATE_DIR": "/x", "GLASSES_RELAYX": "1", "HOME": "/"}
    assert load(tmp_path, env=env).uplink.kind is UplinkKind.NONE


def test_kind_auto_follows_broker_or_gateway(tmp_path: Path) -> None:
    mqtt = load(tmp_path, env={"GLASSES_RELAY_UPLINK_BROKER": "mqtt://b"})
    assert mqtt.uplink.kind is UplinkKind.MQTT
    assert mqtt.uplink.url == "mqtt://b"
    assert mqtt.cloud.announce_presence
    ws = load(tmp_path, flags={"uplink.gateway": "wss://g/x"})
    assert ws.uplink.kind is UplinkKind.WS
    assert not ws.cloud.announce_presence
    none = load(tmp_path, flags={"uplink.kind": "none", "uplink.broker": "mqtt://b"})
    assert none.uplink.kind is UplinkKind.NONE


def test_relative_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    write(tmp_path / "keys" / "public.json", "{}")
    config = load(tmp_path, '[uplink]\ngateway_key = "keys/public.json"\n')
    assert config.uplink.gateway_key == tmp_path / "keys" / "public.json"


def test_tls_files_are_loaded(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("phone.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "me.pem"))
    toml = (
        '[uplink]\nbroker = "mqtts://b"\nca_file = "ca.pem"\nclient_cert = "me.pem"\n'
    )
    config = load(tmp_path, toml)
    assert config.uplink.ca_file == tmp_path / "ca.pem"
    assert config.uplink.client_cert == tmp_path / "me.pem"


# -- bad values: one line with key, value, allowed -------------------------------

# key, value in the environment / on a flag (text), the same in the file (TOML)
BAD = [
    ("glasses.address", "not-an-address", '"not-an-address"'),
    ("glasses.name", "", '""'),
    ("glasses.sim", "tcp:nowhere", '"tcp:nowhere"'),
    ("glasses.scenario", "nightly", '"nightly"'),
    ("glasses.profile", "bogus", '"bogus"'),
    ("glasses.scan_timeout", "soon", '"10"'),
    ("glasses.connect_timeout", "-1", "-1"),
    ("glasses.connect_timeout", "nan", "nan"),
    ("glasses.connect_attempts", "2.5", "2.5"),
    ("glasses.connect_attempts", "0", "0"),
    ("glasses.notify_queue", "many", "true"),
    ("outbox.max_bytes", "64MiB", '"64MiB"'),
    ("outbox.commit_interval", "2", "2"),
    ("outbox.synchronous", "off", '"off"'),
    ("cloud.batch_bytes", "10", "10"),
    ("uplink.kind", "mqqt", '"mqqt"'),
    ("uplink.broker", "http://broker:1883", '"http://broker:1883"'),
    ("uplink.broker", "mqtt://broker:1883/path", '"mqtt://broker:1883/path"'),
    ("uplink.gateway", "ws://", '"ws://"'),
    ("uplink.ca_file", "/nonexistent/ca.pem", '"/nonexistent/ca.pem"'),
    ("uplink.envelope_fallback", "maybe", '"yes"'),
    ("router.deadline_ms", "0", "0"),
    ("status.port", "65536", "65536"),
    ("status.port", "http", '"8080"'),
    ("logging.level", "verbose", '"verbose"'),
]


def _check_bad(text: str, key: str, shown: str, source: str) -> None:
    assert f"bad value for {key}: " in text
    assert shown in text
    assert f"(from {source})" in text
    assert "allowed: " in text


@pytest.mark.parametrize(("key", "text", "toml"), [b for b in BAD if b[1]])
def test_bad_value_in_env_is_one_line(
    tmp_path: Path, key: str, text: str, toml: str
) -> None:
    section, name = key.split(".")
    variable = f"GLASSES_RELAY_{section.upper()}_{name.upper()}"
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, env={variable: text})
    _check_bad(one_line_error(exc), key, repr(text), variable)


@pytest.mark.parametrize(("key", "text", "toml"), BAD)
def test_bad_value_in_file_is_one_line(
    tmp_path: Path, key: str, text: str, toml: str
) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f"[{section}]\n{name} = {toml}\n")
    value = tomllib.loads(f"v = {toml}")["v"]
    shown = str(value) if isinstance(value, float) else repr(value)
    _check_bad(one_line_error(exc), key, shown, str(tmp_path / "relay.toml"))


@pytest.mark.parametrize(("key", "text", "toml"), BAD[:5])
def test_bad_value_on_a_flag_is_one_line(
    tmp_path: Path, key: str, text: str, toml: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, flags={key: text})
    flag = next(k.flag for k in KEYS if k.dotted == key)
    _check_bad(one_line_error(exc), key, repr(text), str(flag))


def test_uplink_errors_are_uplink_config_errors(tmp_path: Path) -> None:
    write(tmp_path / "ca.pem", "not a certificate\n")
    with pytest.raises(UplinkConfigError) as exc:
        load(tmp_path, '[uplink]\nbroker = "mqtts://b"\nca_file = "ca.pem"\n')
    text = one_line(exc.value)
    assert "uplink.ca_file" in text
    assert "no usable PEM data" in text


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ("[session]\nheartbeat_interval = 9\n", "session.heartbeat_interval",
         "less than session.supervision_timeout (8)"),
        ("[session]\nsupervision_timeout = 1\n", "session.supervision_timeout",
         "more than session.heartbeat_interval (2)"),
        ("[cloud]\nresend_cap = 1\n", "cloud.resend_cap",
         "at least cloud.resend_after (3)"),
        ('[uplink]\nkind = "mqtt"\n', "uplink.kind", "mqtt only with uplink.broker"),
        ('[uplink]\nkind = "ws"\nbroker = "mqtt://b"\n', "uplink.kind",
         "ws only with uplink.gateway"),
        ('[uplink]\nbroker = "mqtt://b"\nca_file = "relay.toml"\n', "uplink.ca_file",
         "only with an mqtts:// uplink.broker"),
        ('[uplink]\ngateway = "ws://g"\nclient_cert = "relay.toml"\n',
         "uplink.client_cert", "only with a wss:// uplink.gateway"),
        ('[uplink]\nclient_key = "relay.toml"\n', "uplink.client_key",
         "only together with uplink.client_cert"),
        ('[uplink]\nbroker = "mqtt://b"\npassword = "pw"\n', "uplink.password",
         "only together with uplink.username"),
    ],
)  # fmt: skip
def test_combinations_are_checked(
    tmp_path: Path, toml: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, toml)
    text = one_line_error(exc)
    assert f"bad value for {key}: " in text
    assert f"allowed: {allowed}" in text


def test_secrets_are_masked_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, env={"GLASSES_RELAY_UPLINK_PASSWORD": SECRET + "\x01"})
    text = one_line_error(exc)
    assert "uplink.password: *** (from GLASSES_RELAY_UPLINK_PASSWORD)" in text
    assert SECRET not in text
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "[uplink]\npassword = 1234567\n")
    assert "1234567" not in one_line_error(exc)


def test_credentials_in_a_url_are_masked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, flags={"uplink.broker": f"mqtt://user:{SECRET}@b:1883"})
    text = one_line_error(exc)
    assert SECRET not in text
    assert "mqtt://***@b:1883" in text


# -- unknown keys, syntax errors, files ------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[uplink]\nbrokr = "mqtt://b"\n', "unknown key uplink.brokr; "
         "did you mean uplink.broker?"),
        ("[glasses]\nscan_timeuot = 3\n", "did you mean glasses.scan_timeout?"),
        ('[uplnk]\nbroker = "mqtt://b"\n', "unknown section [uplnk]; "
         "did you mean [uplink]?"),
        ('broker = "mqtt://b"\n', "unknown key broker; did you mean uplink.broker?"),
        ("[status]\nzzz = 1\n", "unknown key status.zzz; keys of [status]: port"),
        ("[frobnicate]\nx = 1\n", "unknown section [frobnicate]; sections: glasses"),
        ("glasses = 3\n", "glasses must be a table [glasses]"),
    ],
)  # fmt: skip
def test_unknown_keys_in_the_file(tmp_path: Path, toml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, toml)
    text = one_line_error(exc)
    assert expected in text
    assert str(tmp_path / "relay.toml") in text


def test_unknown_variable_of_a_known_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, env={"GLASSES_RELAY_UPLINK_BROKR": "mqtt://b"})
    assert one_line_error(exc) == (
        "unknown environment variable GLASSES_RELAY_UPLINK_BROKR: no key "
        "uplink.brokr; did you mean GLASSES_RELAY_UPLINK_BROKER?"
    )


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[glasses]\nname = "ok"\nscan_timeout = = 3\n')
    text = one_line_error(exc)
    assert "invalid TOML" in text
    assert "line 3" in text


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[glasses]\nname = '\xff'\n")
    with pytest.raises(ConfigError) as exc:
        load_config({}, {}, path)
    assert "not UTF-8" in one_line_error(exc)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({}, {}, tmp_path / "nope.toml")
    assert one_line_error(exc).endswith("(from --config): no such file")
    with pytest.raises(ConfigError) as exc:
        load_config({}, {ENV_CONFIG: str(tmp_path / "nope.toml")}, None)
    assert f"(from {ENV_CONFIG}): no such file" in one_line_error(exc)


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({}, {}, tmp_path)
    assert "cannot be read" in one_line_error(exc)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_file_with_a_secret_must_be_private(tmp_path: Path, mode: int) -> None:
    path = write(
        tmp_path / "c.toml", f'[uplink]\nusername = "u"\npassword = "{SECRET}"\n', mode
    )
    with pytest.raises(ConfigError) as exc:
        load_config({}, {}, path)
    text = one_line_error(exc)
    assert "holds uplink.password" in text
    assert f"mode {mode:04o}" in text
    assert f"chmod 600 {path}" in text
    assert SECRET not in text


def test_mode_is_checked_only_when_the_file_holds_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[uplink]\nusername = "u"\n', 0o644)
    assert load_config({}, {}, path).uplink.username == "u"
    path.write_text(f'[uplink]\nusername = "u"\npassword = "{SECRET}"\n')
    path.chmod(0o600)
    assert load_config({}, {}, path).uplink.password == SECRET


# -- flags and --print-config ----------------------------------------------------


def test_flags_from_args_keeps_only_given_flags() -> None:
    args: dict[str, object] = {
        "sim": "",
        "address": None,
        "name": "GR-X",
        "scenario": None,
        "uplink": None,
        "broker": "mqtt://b",
        "ca_file": None,
        "envelope_fallback": False,
        "status_port": 0,
        "password_env": "PW",
        "verbose": 2,
        "test_forget_on_puback": True,
    }
    flags = flags_from_args(args, {"PW": SECRET})
    assert flags == {
        "glasses.sim": "in-process",
        "glasses.name": "GR-X",
        "uplink.broker": "mqtt://b",
        "status.port": 0,
        "uplink.password": SECRET,
        "logging.level": "debug",
    }
    with pytest.raises(ConfigError, match="--password-env PW: variable not set"):
        flags_from_args(args, {})


def test_unknown_flag_key_is_a_bug() -> None:
    with pytest.raises(ValueError, match="no configuration key"):
        load_config({"uplink.nope": 1}, {}, None)


def test_printed_config_reads_back_to_the_same(tmp_path: Path) -> None:
    write(tmp_path / "ca.pem", "x")
    toml = (
        '[glasses]\naddress = "AA:BB:CC:DD:EE:FF"\nsim = "tcp-client:127.0.0.1:9"\n'
        '[outbox]\nsynchronous = "full"\nmax_age = 3600\n'
        '[uplink]\ngateway = "ws://gw:8765/x"\n'
        '[status]\nport = 8080\n[logging]\nlevel = "info"\n'
    )
    config = load(tmp_path, toml, {"GLASSES_RELAY_UPLINK_USERNAME": "me"})
    text = render_toml(config, state_dir=tmp_path / "state")
    assert text.startswith("# effective configuration of 'glasses-relay run'")
    assert f"# configuration file: {tmp_path / 'relay.toml'}\n" in text
    assert f"# state directory: {tmp_path / 'state'} " in text
    assert "# password is not set" in text
    again = write(tmp_path / "again.toml", text)
    assert load_config({}, {}, again) == dataclasses.replace(config, file=again)


def test_printed_config_masks_the_password(tmp_path: Path) -> None:
    env = {"GLASSES_RELAY_UPLINK_PASSWORD": SECRET}
    config = load(tmp_path, '[uplink]\nusername = "u"\n', env)
    text = render_toml(config)
    assert 'password = "***"  # GLASSES_RELAY_UPLINK_PASSWORD' in text
    assert SECRET not in text
    assert SECRET not in repr(config)


# -- the console script ----------------------------------------------------------


def run(
    *args: str, env: dict[str, str] | None = None, xdg: Path
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GLASSES_")}
    environ["XDG_CONFIG_HOME"] = str(xdg)
    environ.update(env or {})
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True, text=True, check=False, timeout=60, env=environ,
    )  # fmt: skip


def assert_one_line_exit_2(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert re.match(r"glasses-relay( run)?: error: ", lines[0])
    return lines[0]


def test_print_config_masks_the_password(tmp_path: Path) -> None:
    out = run(
        "run", "--print-config", "--broker", "mqtt://127.0.0.1:1", "--username", "u",
        env={"GLASSES_RELAY_UPLINK_PASSWORD": SECRET}, xdg=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert 'password = "***"' in out.stdout
    document = tomllib.loads(out.stdout)
    assert document["uplink"]["kind"] == "mqtt"
    assert document["uplink"]["password"] == "***"
    out = run(
        "run", "--print-config", "--broker", "mqtt://b", "--username", "u",
        "--password-env", "MY_PW", env={"MY_PW": SECRET}, xdg=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert 'password = "***"  # --password-env' in out.stdout


def test_print_config_names_the_file_and_the_state_dir(tmp_path: Path) -> None:
    path = write(tmp_path / "glasses-relay" / "config.toml", "[router]\n")
    state = tmp_path / "state"
    out = run("--state-dir", str(state), "run", "--print-config", xdg=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"# configuration file: {path}" in out.stdout
    assert f"# state directory: {state}" in out.stdout
    assert not state.exists()  # printing creates nothing


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[glasses\nname = 1\n")
    line = assert_one_line_exit_2(run("run", "--config", str(path), xdg=tmp_path))
    assert "invalid TOML" in line
    assert "line 1" in line


def test_bad_value_in_the_file_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[status]\nport = 0\n")
    line = assert_one_line_exit_2(run("run", "--config", str(path), xdg=tmp_path))
    assert f"bad value for status.port: 0 (from {path})" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--uplink", "carrier-pigeon"], "invalid choice: 'carrier-pigeon'"),
        (["--status-port", "http"], "invalid int value: 'http'"),
        (["--status-port", "0"], "bad value for status.port: 0 (from --status-port)"),
        (["--sim", "tcp:x"], "bad value for glasses.sim: 'tcp:x' (from --sim)"),
        (["--scenario", "x"], "bad value for glasses.scenario: 'x' (from --scenario)"),
        (["--broker", "mqtt://"], "bad value for uplink.broker: 'mqtt://'"),
        (["--uplink", "ws"], "bad value for uplink.kind: 'ws' (from --uplink)"),
        (["--config", "/nonexistent.toml"], "no such file"),
    ],
)
def test_bad_flag_value_is_one_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    line = assert_one_line_exit_2(run("run", "--print-config", *args, xdg=tmp_path))
    assert expected in line


def test_bad_variable_is_one_line(tmp_path: Path) -> None:
    out = run(
        "run", env={"GLASSES_RELAY_GLASSES_CONNECT_ATTEMPTS": "lots"}, xdg=tmp_path
    )
    line = assert_one_line_exit_2(out)
    assert (
        "bad value for glasses.connect_attempts: 'lots' "
        "(from GLASSES_RELAY_GLASSES_CONNECT_ATTEMPTS); allowed: an integer" in line
    )


def test_world_readable_file_with_password_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path / "glasses-relay" / "config.toml",
        f'[uplink]\nusername = "u"\npassword = "{SECRET}"\n',
        0o644,
    )
    out = run("run", "--print-config", xdg=tmp_path)
    line = assert_one_line_exit_2(out)
    assert f"fix: chmod 600 {path}" in line
    assert SECRET not in out.stderr


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[str]:
    servers = importlib.import_module("servers")  # tests/servers.py
    broker = servers.Mosquitto(tmp_path / "broker", allow_anonymous=False)
    broker.start_sync()
    try:
        yield broker.url
    finally:
        broker.stop_sync()


def test_refused_login_stops_the_daemon_with_one_line(
    tmp_path: Path, refusing_broker: str
) -> None:
    from tools.cloud.keys import load_gateway_keys, write_public_record

    state = tmp_path / "state"
    (state / "gateway").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    write_public_record(state / "gateway", load_gateway_keys(state / "gateway"))
    out = run(
        "--state-dir", str(state), "run", "--sim", "--broker", refusing_broker,
        "--username", "u", env={"GLASSES_RELAY_UPLINK_PASSWORD": SECRET},
        xdg=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith("glasses-relay: error: MQTT broker ")
    assert "refused the connection" in last
    assert "check the [uplink] settings" in last
    assert SECRET not in out.stdout + out.stderr


def test_unreachable_broker_is_not_permanent(tmp_path: Path) -> None:
    servers = importlib.import_module("servers")  # tests/servers.py
    state = tmp_path / "state"
    (state / "gateway").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    from tools.cloud.keys import load_gateway_keys, write_public_record

    write_public_record(state / "gateway", load_gateway_keys(state / "gateway"))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GLASSES_")}
    environ["XDG_CONFIG_HOME"] = str(tmp_path)
    proc = subprocess.Popen(
        [str(SCRIPT), "--state-dir", str(state), "run", "--sim",
         "--broker", f"mqtt://127.0.0.1:{servers.free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
    )  # fmt: skip
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=4)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


# -- the documentation -----------------------------------------------------------


def test_docs_list_every_key() -> None:
    text = DOCS.read_text()
    for key in KEYS:
        assert f"`{key.dotted}`" in text, key.dotted
        assert key.env in text, key.env
        if key.flag is not None:
            assert key.flag.split("/")[0] in text, key.flag


def test_docs_example_is_a_valid_file(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert blocks
    write(tmp_path / "ca.pem", "")
    for block in blocks:
        path = write(tmp_path / "example.toml", block)
        config = load_config({}, {}, path)
        assert config.file == path
