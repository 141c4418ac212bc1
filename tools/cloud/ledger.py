"""The gateway's ledger: one JSON line per event, for tests and audits.

::

    {"id": "<32 hex digits>", "event": "processed", "t": 1718000000.123}
    {"id": "<32 hex digits>", "event": "response", "t": 1718000000.456}

``processed`` is written once per message id, after de-duplication (only the
gateway whose set-if-absent won writes it); ``response`` once per request,
keyed by the REQUEST's message id, when the answer's last piece first went
down (the gateway that sent it, or that took the answer over, claims the
line in the store with a set-if-absent, so restarts and take-overs write it
once). ``t`` is wall-clock seconds, comparable across processes. Lines are
appended and flushed as written (in a worker thread, in order); a process
killed between recording a message and writing its line loses the line, never
duplicates it. Ids are random; nothing else from a message is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

__all__ = ["Ledger"]

logger = logging.getLogger(__name__)

Event = Literal["processed", "response"]


class Ledger:
    """An append-only JSON-lines file (module docstring).

    Args:
        path: The file; created if missing, appended to otherwise.
    """

    def __init__(self, path: Path) -> None:
        """Prepare the ledger; :meth:`open` opens the file."""
        self._path = path
        self._file: IO[str] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-ledger"
        )

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    async def open(self) -> None:
        """Open the file for appending.

        Raises:
            OSError: it cannot be opened.
        """
        loop = asyncio.get_running_loop()
        self._file = await loop.run_in_executor(self._executor, self._open_sync)

    def _open_sync(self) -> IO[str]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        return self._path.open("a", encoding="utf-8")

    async def record(self, event: Event, ids: Sequence[bytes]) -> None:
        """Append one line per id and flush; a no-op for no ids."""
        if not ids or self._file is None:
            return
        now = time.time()
        text = "".join(
            json.dumps({"id": mid.hex(), "event": event, "t": now}) + "\n"
            for mid in ids
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._write_sync, text)
        except OSError as exc:
            logger.warning("ledger %s: write failed: %s", self._path, exc.strerror)

    def _write_sync(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()

    async def aclose(self) -> None:
        """Close the file and the worker thread; idempotent."""
        if self._file is not None:
            file, self._file = self._file, None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, file.close)
        self._executor.shutdown(wait=True)
