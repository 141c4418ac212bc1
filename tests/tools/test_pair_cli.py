"""glasses-relay pair: QR, Flow A with emulated glasses, list, forget; bad key files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "glasses-relay"


def gr(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--state-dir", str(state), *args],
        capture_output=True, text=True, check=False, timeout=90,
    )  # fmt: skip


def test_pair_list_forget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    png = tmp_path / "qr.png"
    out = gr(state, "pair", "--sim", "--qr-png", str(png), "--json")
    assert out.returncode == 0, out.stderr
    glasses_id = json.loads(out.stdout)["paired"]
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "▀" in out.stderr or "█" in out.stderr  # the QR, in the terminal
    # Single use: the code is gone; the secret never reached stdout.
    assert not (state / "phone" / "pairing.txt").exists()
    assert "GR1:" not in out.stdout + out.stderr
    listed = gr(state, "pair", "--list", "--json")
    assert json.loads(listed.stdout) == {"paired": [glasses_id]}
    # The emulated glasses pinned the phone too.
    assert (state / "glasses" / "phone.pub").exists()
    forgot = gr(state, "pair", "--forget", glasses_id, "--json")
    assert forgot.returncode == 0, forgot.stderr
    assert json.loads(gr(state, "pair", "--list", "--json").stdout) == {"paired": []}
    again = gr(state, "pair", "--forget", glasses_id)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "no such glasses" in again.stderr


def test_world_readable_key_file_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert gr(state, "pair", "--list").returncode == 0
    key = state / "phone" / "phone-static.x25519"
    secret = key.read_bytes()
    os.chmod(key, 0o644)  # noqa: PTH101
    out = gr(state, "pair", "--list")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "chmod 600" in out.stderr
    assert "Traceback" not in out.stderr
    assert secret.hex() not in out.stderr


def test_open_state_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # noqa: PTH101, S103  (the mistake under test)
    out = gr(state, "pair", "--list")
    assert out.returncode == 2
    assert "chmod 700" in out.stderr
    assert out.stderr.count("\n") == 1
