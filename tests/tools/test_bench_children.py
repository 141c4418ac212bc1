"""The benches' child processes run the bench's own code, whatever the cwd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tools.bench.children import code_env, module_command


def test_children_import_this_code_not_a_package_in_the_working_directory(
    tmp_path: Path,
) -> None:
    decoy = tmp_path / "tools"
    (decoy / "bench").mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit(3)\n")
    (decoy / "bench" / "__init__.py").write_text("")
    (decoy / "bench" / "children.py").write_text("")
    env = code_env()
    # The control: plain -m imports the decoy from the working directory.
    plain = [sys.executable, "-m", "tools.bench.children"]
    control = subprocess.run(plain, cwd=tmp_path, env=env, check=False, timeout=60)
    assert control.returncode == 3
    ours = subprocess.run(
        module_command("tools.bench.children"),
        cwd=tmp_path, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert ours.returncode == 0
