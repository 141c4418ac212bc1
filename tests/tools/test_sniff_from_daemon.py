"""``sniff --from-daemon`` and the capture endpoints of a running daemon.

A real ``glasses-relay run --sim --capture-ring 1`` subprocess: ``sniff
--from-daemon`` records its link through the status socket into a file that
tshark decodes with no expert item, and ``POST /capture`` writes the ring to
a 0600 file. Without a ring (an in-process status server), and without a
daemon, ``sniff --from-daemon`` says so in one line with exit status 2.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.capture import read_capture
from relay.capture_ring import NO_RING, captures_dir
from relay.state import ensure_state_dir
from relay.status import StatusServer, socket_path
from tools.cli import main

SCRIPT = Path(sys.executable).parent / "glasses-relay"
TSHARK = shutil.which("tshark")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def http(sock: Path, method: str, path: str) -> tuple[int, bytes]:
    """One request on the daemon's Unix socket (HTTP/1.1, connection closed)."""
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: daemon\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(20)
        conn.connect(str(sock))
        conn.sendall(request.encode())
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    return int(head.split()[1]), body


def wait_for_traffic(sock: Path, timeout: float = 40.0) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    doc: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        try:
            code, body = http(sock, "GET", "/status")
        except OSError:
            code, body = 0, b""
        if code == 200:
            doc = json.loads(body)
            capture = doc.get("capture") or {}
            if doc["link"]["state"] == "connected" and capture.get("events", 0) > 0:
                return doc
        time.sleep(0.3)
    raise AssertionError(f"no traffic in the daemon's ring: {doc}")


def expert(path: Path) -> str:
    assert TSHARK is not None
    return subprocess.run(
        [TSHARK, "-r", str(path), "-q", "-z", "expert"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def opcodes(path: Path) -> list[str]:
    assert TSHARK is not None
    return subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "btatt.opcode"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip


@pytest.mark.skipif(TSHARK is None, reason="tshark is the oracle (make system-tools)")
def test_sniff_from_a_running_daemon_and_post_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    log = tmp_path / "run.log"
    with log.open("wb") as log_file:
        daemon = subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(state), "-v", "run", "--sim",
             "--capture-ring", "1"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    sock = socket_path(state)
    try:
        doc = wait_for_traffic(sock)
        assert doc["capture"]["ring_minutes"] == 1
        path = tmp_path / "F.pcapng"
        code = main(
            ["--state-dir", str(state), "sniff", "--from-daemon", "--duration", "3",
             "--out", str(path), "--json"]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "ATT values" in err  # the progress line
        summary = json.loads(out)
        assert summary["source"] == "daemon"
        assert summary["values"] > 0
        assert summary["missed"] == 0
        capture = read_capture(path.read_bytes())
        assert len(capture.connections) == 1
        assert expert(path) == ""  # no error, warning, note or comment
        assert len(opcodes(path)) == len(capture.att) == summary["att_pdus"]

        code, body = http(sock, "POST", "/capture")
        assert code == 200, body
        written = Path(json.loads(body)["path"])
        assert written.parent == captures_dir(state)
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert expert(written) == ""
        ring = read_capture(written.read_bytes())
        assert any(op.opcode == 0x1B for op in ring.att)

        code, body = http(sock, "GET", "/capture.pcapng")
        assert code == 200
        assert body.startswith(PCAPNG_MAGIC)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=10)
    assert code == 0, log.read_text()


async def test_a_daemon_without_ring_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ensure_state_dir(tmp_path / "state")
    ensure_state_dir(state / "phone")
    server = StatusServer(lambda: {"pid": 1}, state_dir=state)
    await server.start()
    try:
        out_file = tmp_path / "F.pcapng"
        code = await asyncio.to_thread(
            main,
            ["--state-dir", str(state), "sniff", "--from-daemon", "--duration", "1",
             "--out", str(out_file)],
        )  # fmt: skip
    finally:
        await server.close()
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [f"glasses-relay: error: {NO_RING}"]
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("F.pcapng*")))


def test_no_daemon_and_misused_flags_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = str(tmp_path / "F.pcapng")
    cases = [
        ([], "no daemon is running"),
        (["--plaintext"], "daemon keeps ciphertext only"),
    ]
    for args, words in cases:
        code = main(
            ["--state-dir", str(tmp_path / "none"), "sniff", "--from-daemon",
             "--out", out_file, *args]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 2
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert words in err
    assert main(["sniff", "--sim", "--port", "1", "--out", out_file]) == 2
    assert "--port is for --from-daemon" in capsys.readouterr().err
