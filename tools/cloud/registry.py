"""Registered devices: their records, keys and channels, by pseudonym.

Device records (:class:`protocol.cloud.DeviceRecord`) come from
``<state>/gateway/devices/*.json``, any ``--devices DIR`` and the local phone's
``<state>/phone/device.json`` (read last, so it wins). A pseudonym that is not
known triggers a re-scan, at most once per ``min_rescan_s``, so a phone that
registers after the gateway started is found on its first message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.cloud import Channels, DeviceRecord
from protocol.envelope import DevicePublicKeys
from protocol.errors import ProtocolError

__all__ = ["DeviceRegistry", "KnownDevice"]

logger = logging.getLogger(__name__)

MAX_RECORD_BYTES: Final = 4096
MAX_RECORDS: Final = 100_000


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """A registered device.

    Attributes:
        record: Its registration record.
        public: Its public keys, parsed.
        channels: Its three channel names under the gateway's prefix.
    """

    record: DeviceRecord
    public: DevicePublicKeys
    channels: Channels

    @property
    def device_id(self) -> bytes:
        """The 16-byte device id (never logged)."""
        return self.record.device_id

    @property
    def pseudonym(self) -> str:
        """The topic pseudonym (safe to log)."""
        return self.record.pseudonym


class DeviceRegistry:
    """Device records from directories and files, re-scanned on demand.

    Args:
        directories: Directories whose ``*.json`` files are device records.
        files: Single record files, read after the directories.
        prefix: Channel prefix.
        min_rescan_s: Least time between two scans caused by unknown devices.
        clock: Monotonic clock (seconds).
    """

    def __init__(
        self,
        directories: Sequence[Path],
        files: Sequence[Path],
        *,
        prefix: str,
        min_rescan_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty registry; call :meth:`scan` to fill it."""
        self._directories = tuple(directories)
        self._files = tuple(files)
        self._prefix = prefix
        self._min_rescan_s = min_rescan_s
        self._clock = clock
        self._devices: dict[str, KnownDevice] = {}
        self._last_scan = -float("inf")
        self._lock = asyncio.Lock()
        self._warned: set[tuple[Path, int]] = set()

    def __len__(self) -> int:
        """The number of known devices."""
        return len(self._devices)

    def get(self, pseudonym: str) -> KnownDevice | None:
        """Return the device with ``pseudonym`` if known, without scanning."""
        return self._devices.get(pseudonym)

    async def lookup(self, pseudonym: str) -> KnownDevice | None:
        """Return the device with ``pseudonym``, re-scanning if it is unknown.

        Scans at most once per ``min_rescan_s``; concurrent callers share one
        scan. Returns None if the device is still unknown.
        """
        device = self._devices.get(pseudonym)
        if device is not None:
            return device
        async with self._lock:
            device = self._devices.get(pseudonym)
            if device is None and (
                self._clock() - self._last_scan >= self._min_rescan_s
            ):
                await self.scan()
                device = self._devices.get(pseudonym)
        return device

    async def scan(self) -> int:
        """Read every record again (in a worker thread); return the count."""
        self._last_scan = self._clock()
        found, problems = await asyncio.to_thread(self._read_all)
        for path, mtime, reason in problems:
            if (path, mtime) not in self._warned and len(self._warned) < MAX_RECORDS:
                self._warned.add((path, mtime))
                logger.warning("ignored device record %s: %s", path, reason)
        added = [p for p in found if p not in self._devices]
        self._devices = found
        for pseudonym in added:
            logger.info("device %s registered", pseudonym)
        return len(found)

    def _read_all(self) -> tuple[dict[str, KnownDevice], list[tuple[Path, int, str]]]:
        paths: list[Path] = []
        for directory in self._directories:
            try:
                paths.extend(sorted(directory.glob("*.json")))
            except OSError:
                continue
        paths.extend(self._files)
        found: dict[str, KnownDevice] = {}
        problems: list[tuple[Path, int, str]] = []
        for path in paths[:MAX_RECORDS]:
            mtime = 0
            try:
                stat = path.stat()
                mtime = stat.st_mtime_ns
                if stat.st_size > MAX_RECORD_BYTES:
                    problems.append((path, mtime, "larger than 4 KiB"))
                    continue
                record = DeviceRecord.decode(path.read_bytes())
                device = KnownDevice(
                    record,
                    DevicePublicKeys(record.encryption, record.verify),
                    Channels.for_device(record.device_id, self._prefix),
                )
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append((path, 0, exc.strerror or "unreadable"))
                continue
            except ProtocolError as exc:
                problems.append((path, mtime, str(exc)))
                continue
            found[device.pseudonym] = device
        return found, problems
