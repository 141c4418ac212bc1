"""``python -m tools.cloud``: the gateway without the ``glasses-relay`` dispatcher.

Takes the same flags as ``glasses-relay [--state-dir DIR] [-v] cloud ...``;
errors are one line on standard error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

from relay import log
from relay.errors import ConfigError
from relay.state import ENV_STATE_DIR
from tools.cloud import DESCRIPTION, handle
from tools.cloud.config import add_arguments

PROG: Final = "glasses-relay cloud"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m tools.cloud``."""
    parser = _Parser(prog=PROG, description=DESCRIPTION)
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"where keys and records live (default: ${ENV_STATE_DIR}, else the "
        "platform's user state directory)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to standard error (-v info, -vv debug)",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway; return the exit status."""
    args = build_parser().parse_args(argv)
    log.configure(args.verbose)
    try:
        return handle(args)
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
