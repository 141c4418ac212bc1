"""The console script as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import build_parser, main

SCRIPT = Path(sys.executable).parent / "glasses-relay"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_help_lists_only_working_subcommands() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "glasses-relay" in out.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices or {}:
        help_out = run(name, "--help")
        assert help_out.returncode == 0, name


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("glasses-relay ")


def test_unknown_subcommand_is_one_line_and_exit_2() -> None:
    out = run("frobnicate")
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "invalid choice" in lines[0]
    assert "Traceback" not in out.stderr


def test_no_subcommand_prints_help_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage:" in captured.err
