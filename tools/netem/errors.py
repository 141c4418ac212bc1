"""Errors of the network emulator.

::

    NetemError
    ├── DataFormatError(NetemError, ConfigError)  a data file is malformed
    │   └── TraceFormatError                       a mahimahi trace is malformed
    └── LinkBusyError                              skip() with bytes queued/in flight

:class:`DataFormatError` is a :class:`relay.errors.ConfigError`, so the CLI reports
it as one line.
"""

from __future__ import annotations

from pathlib import Path

from relay.errors import ConfigError

__all__ = ["DataFormatError", "LinkBusyError", "NetemError", "TraceFormatError"]


class NetemError(Exception):
    """Base of the emulator's own errors."""


class DataFormatError(NetemError, ConfigError):
    """A data file (trace, latency or RRC measurements) cannot be used.

    Attributes:
        path: the file.
        line: 1-based line number of the offending line, or 0 for the whole file.
        reason: what is wrong.
    """

    def __init__(self, path: Path | str, line: int, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = Path(path)
        self.line = line
        self.reason = reason


class TraceFormatError(DataFormatError):
    """A mahimahi trace file is empty, not integers, decreasing or zero-length."""


class LinkBusyError(NetemError):
    """:meth:`NetemProxy.skip` was called while bytes were queued or in flight.

    Skipping trace time is only allowed across idle gaps: skipping with bytes
    queued would deliver them in a burst, which compresses time by scaling.

    Attributes:
        pending_bytes: bytes queued or in flight in both directions together.
    """

    def __init__(self, pending_bytes: int) -> None:
        super().__init__(
            f"cannot skip trace time: {pending_bytes} bytes queued or in flight"
        )
        self.pending_bytes = pending_bytes
