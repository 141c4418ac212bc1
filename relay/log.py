"""Logging set-up; only the CLI entry point calls :func:`configure`."""

from __future__ import annotations

import logging
import sys
from typing import Final

__all__ = ["configure"]

_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(verbosity: int) -> None:
    """Send logs to standard error: WARNING by default, INFO with -v, DEBUG -vv."""
    level = logging.WARNING
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries are chatty at INFO; keep them at WARNING unless -vv.
    if level > logging.DEBUG:
        for name in ("bleak", "mqtt", "aiomqtt", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # The emulator's own stack warns about its virtual controller's quirks.
        logging.getLogger("bumble").setLevel(logging.ERROR)
