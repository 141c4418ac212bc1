"""Output conventions of the CLI.

With ``--json``, standard output carries exactly one JSON object and nothing
else; tables, progress and logs go to standard error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

__all__ = ["emit_json", "say"]


def emit_json(obj: Mapping[str, object]) -> None:
    """Write ``obj`` as the one JSON object of this run to standard output."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    """Write a line for people to standard error."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
