"""Child processes of the benches run the code the bench itself was started from.

A bench starts its parts (gateway, emulated glasses, the probed daemon, the
reference workload, latency lanes) as ``python -m MODULE``. Plain ``-m`` puts
the working directory first on ``sys.path``, so a bench started from one
checkout while standing in another (an A/B run of two commits, say) measured
the other checkout's daemon. ``-P`` keeps the working directory off
``sys.path``, and ``PYTHONPATH`` names the directory this package was
imported from, ahead of anything else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

CODE_ROOT: Final = str(Path(__file__).resolve().parents[2])
"""The directory holding the ``tools``, ``relay`` and ``protocol`` packages in use."""


def module_command(module: str, *args: str) -> list[str]:
    """The argv that runs ``module`` of this code with ``args``."""
    return [sys.executable, "-P", "-m", module, *args]


def code_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with :data:`CODE_ROOT` first on the path."""
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = CODE_ROOT if not rest else CODE_ROOT + os.pathsep + rest
    return env
