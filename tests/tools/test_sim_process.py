"""``glasses-relay sim`` as its own process, with daemons that come and go."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "glasses-relay"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(path: Path, needle: str, timeout: float, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(needle) >= count:
            return
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
    raise AssertionError(f"{needle!r} x{count} not seen in {path.name}:\n{tail}")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def sim(
    state: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    log = tmp_path / "sim.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(state), "-v", "sim",
             "--hci", f"tcp-server:127.0.0.1:{port}", "--scenario", "day",
             "--profile", "unshaped"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_line(log, "glasses listening", 30)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def start_daemon(state: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(state), "-v", "run",
             "--sim", f"tcp-client:127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_daemon_sigkilled_three_times_reconnects_to_the_same_glasses(
    state: Path, tmp_path: Path, sim: tuple[subprocess.Popen[bytes], int, Path]
) -> None:
    proc, port, sim_log = sim
    daemon_log = tmp_path / "daemon.log"
    codes = []
    for round_ in range(1, 5):
        daemon = start_daemon(state, port, daemon_log)
        try:
            wait_for_line(daemon_log, "glasses session up", 40, count=round_)
        finally:
            if round_ < 4:
                daemon.send_signal(signal.SIGKILL)
            else:
                daemon.send_signal(signal.SIGTERM)
            codes.append(daemon.wait(timeout=10))
        assert proc.poll() is None, "the glasses' process must outlive every daemon"
    # One pairing, then three reconnects with the pinned keys.
    text = sim_log.read_text()
    assert text.count("paired with the phone") == 1
    assert text.count("phone connected") >= 4
    assert codes == [-signal.SIGKILL] * 3 + [0]  # the last: SIGTERM, a clean exit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sim_ends_cleanly_within_5_s(
    signum: signal.Signals, sim: tuple[subprocess.Popen[bytes], int, Path]
) -> None:
    proc, _port, _log = sim
    started = time.monotonic()
    proc.send_signal(signum)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5


def test_sim_started_with_sigint_ignored_still_ends_on_sigint(
    state: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "sim.log"

    def ignore_sigint() -> None:  # a background job of a non-interactive shell
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(state), "sim",
             "--hci", f"tcp-server:127.0.0.1:{port}", "--scenario", "none"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=ignore_sigint,
        )  # fmt: skip
    try:
        wait_for_line(log, "glasses listening", 30)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_hci_spec_is_one_line() -> None:
    out = subprocess.run(
        [str(SCRIPT), "sim", "--hci", "tcp:nowhere"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "expected tcp-server:HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr
