"""The ``glasses-relay`` console script: one CLI, one subcommand per job.

The dispatcher sits in ``tools/`` (the top layer) so that it may call both the
daemon in ``relay/`` and the tools' own subcommands without any upward import.
A subcommand is listed here only once it works.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from relay import log
from relay.errors import ConfigError
from relay.state import ENV_STATE_DIR

__all__ = ["main"]

PROG: Final = "glasses-relay"


class Subcommand(Protocol):
    """What a subcommand module provides."""

    def register(
        self, sub: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> None:
        """Add the subcommand's parser; set ``handler`` with ``set_defaults``."""


Handler = Callable[[argparse.Namespace], int]

_SUBCOMMANDS: Final[tuple[str, ...]] = (
    "demo",
    "run",
    "status",
    "sim",
    "cloud",
    "pair",
    "sniff",
    "replay",
    "bench",
)
"""Modules under ``tools`` that provide ``register(sub)``, in --help order."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _version() -> str:
    try:
        return importlib.metadata.version(PROG)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser (used by ``main`` and the tests)."""
    parser = _Parser(
        prog=PROG,
        description="Phone companion for AI glasses: BLE link, security, "
        "local-or-cloud routing, durable relay.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"where keys, pins, outbox and sockets live (default: ${ENV_STATE_DIR}, "
        "else the platform's user state directory)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more to standard error (-v info, -vv debug)",
    )
    sub = parser.add_subparsers(
        title="subcommands", dest="command", metavar="SUBCOMMAND", parser_class=_Parser
    )
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"tools.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    log.configure(args.verbose)
    from relay.keys import KeyStoreError
    from relay.outbox import OutboxError

    try:
        return handler(args)
    except (ConfigError, KeyStoreError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except OutboxError as exc:
        sys.stderr.write(f"{PROG}: error: the outbox cannot be used: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
