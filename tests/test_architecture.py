"""The layering contract: tools -> relay -> protocol, and protocol is sans-I/O."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_import_protocol_loads_no_asyncio_and_no_io_libraries() -> None:
    code = (
        "import sys, pkgutil, importlib, protocol\n"
        "for m in pkgutil.walk_packages(protocol.__path__, 'protocol.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in ('asyncio', 'socket', 'bleak', 'aiomqtt', 'aiohttp',"
        " 'bumble', 'threading', 'logging') if n in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == ""


def test_import_linter_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is part of the test extra"
    out = subprocess.run(
        [lint_imports], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout


def _modules() -> list[str]:
    names = []
    for package in ("protocol", "relay", "tools"):
        path = ROOT / package
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages([str(path)], f"{package}.")]
    return sorted(names)


@pytest.mark.parametrize("module", _modules())
def test_each_module_imports_in_isolation(module: str) -> None:
    env = dict(os.environ, PYTHONWARNINGS="error")
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr


def test_every_package_ships_py_typed() -> None:
    for package in ("protocol", "relay", "tools"):
        for init in (ROOT / package).rglob("__init__.py"):
            assert (init.parent / "py.typed").exists() or init.parent.name != package, (
                init
            )
        assert (ROOT / package / "py.typed").exists()
