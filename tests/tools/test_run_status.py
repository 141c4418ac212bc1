"""``glasses-relay run --sim`` with ``status``: answers, moves, stops cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "glasses-relay"


def status(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--state-dir", str(state), "status", *args],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip


def wait_status(state: Path, check, timeout: float = 40.0) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    doc: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        out = status(state, "--json")
        if out.returncode == 0:
            doc = json.loads(out.stdout)
            if check(doc):
                return doc
        time.sleep(0.3)
    raise AssertionError(f"status never satisfied the check: {doc}")


def test_status_without_daemon_is_one_line_exit_1(tmp_path: Path) -> None:
    out = status(tmp_path / "nothing")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "no daemon" in out.stderr


def test_run_sim_status_metrics_and_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(state), "-v", "run", "--sim"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        first = wait_status(state, lambda d: d["link"]["state"] == "connected")
        assert first["pid"] == daemon.pid
        later = wait_status(
            state,
            lambda d: (
                d["link"]["frames_in"] > first["link"]["frames_in"]
                and d["counters"]["messages_in"] > first["counters"]["messages_in"]
                and d["outbox"]["rows"] > 0
            ),
        )
        assert later["outbox"]["rows"] > 0  # no cloud: kept in the outbox
        assert later["uplink"]["configured"] is False
        sock = state / "phone" / "status.sock"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        metrics = subprocess.run(
            ["curl", "-s", "--unix-socket", str(sock), "http://daemon/metrics"],
            capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
        if metrics.returncode == 0:  # curl is optional on the machine
            assert "glasses_relay_link_up 1.0" in metrics.stdout
            assert "glasses_relay_outbox_depth" in metrics.stdout
        human = status(state)
        assert human.returncode == 0
        assert "glasses" in human.stderr
        assert "outbox" in human.stderr
    finally:
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=10)
    assert code == 0
    assert time.monotonic() - started < 5
    assert not (state / "phone" / "status.sock").exists()


def test_status_finds_a_daemon_on_the_port_its_configuration_names(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "relay.toml"
    config.write_text(f"[status]\nport = {port}\n")
    state = tmp_path / "state"
    daemon = subprocess.Popen(
        [str(SCRIPT), "--state-dir", str(state), "run", "--sim",
         "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while True:
            out = status(state, "--config", str(config), "--json")
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] == daemon.pid
        assert not (state / "phone" / "status.sock").exists()  # a port, not the socket
        without = status(state, "--json")  # no configuration: the socket, absent
        assert without.returncode == 1
        assert "this state directory" in without.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
    broken = tmp_path / "broken.toml"
    broken.write_text("[status]\nport = 70000\n")
    out = status(state, "--config", str(broken))
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1, out.stderr
    assert "status.port" in out.stderr
    assert "Traceback" not in out.stderr
