"""The idempotency store: processed ids, request assembly, acknowledged answers.

docs/cloud.md §Delivery 3-4. One operation does the work of a batch of
uplink messages, :meth:`IdempotencyStore.admit`: for each message it records
``(device id, message id)`` if it is new (atomic set-if-absent, kept
``idempotency_ttl_s``) and, in the same atomic step, stores the message's
part of a request (a REQUEST or a media chunk). When that part completes its
request, the store hands the whole request back exactly once and forgets its
parts, so among gateways sharing one store the one that receives the last
part answers, whichever received the first.

Two implementations behind :class:`IdempotencyStore`:

* :class:`SqliteStore` (this module), for one gateway: a WAL database in the
  state directory; every call runs in one dedicated worker thread, never on
  the event loop. Schema::

      seen(device BLOB, message_id BLOB, expires REAL,
           PRIMARY KEY (device, message_id)) WITHOUT ROWID
      parts(device BLOB, request_id INTEGER, idx INTEGER,  -- -1: the REQUEST
            kind INTEGER, final INTEGER, data BLOB, expires REAL,
            UNIQUE (device, request_id, idx))

  ``expires`` is wall-clock seconds (it must survive restarts); expired rows
  count as absent and are purged in the background of later calls.

* :class:`tools.cloud.redis_store.RedisStore`, for gateways sharing the load.

A store that cannot be reached raises :class:`StoreUnavailableError`: the
batch is neither processed nor acknowledged, and the phone resends it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from relay.errors import RelayError

__all__ = [
    "Admission",
    "Assembled",
    "Entry",
    "IdempotencyStore",
    "Outcome",
    "Part",
    "PartKind",
    "SqliteStore",
    "StoreLimits",
    "StoreUnavailableError",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
PURGE_EVERY_S: Final = 600.0
PURGE_ROWS: Final = 10_000
_MESSAGE_ID_SIZE: Final = 16


class StoreUnavailableError(RelayError):
    """The store cannot be reached or written; nothing of the batch is acked."""


class PartKind(enum.IntEnum):
    """What a request part is."""

    REQUEST = 0
    AUDIO = 1
    PHOTO = 2


@dataclass(frozen=True, slots=True)
class Part:
    """One message's contribution to a request.

    Attributes:
        request_id: The request it belongs to.
        kind: REQUEST, or the kind of media chunk.
        index: The chunk index; -1 for the REQUEST.
        data: REQUEST: its message id followed by its body; chunk: the media.
        final: Chunk: the last of its request. REQUEST: complete by itself
            (no media follows).
    """

    request_id: int
    kind: PartKind
    index: int
    data: bytes
    final: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    """One uplink message to admit.

    Attributes:
        device_id: The sending device.
        message_id: The message's id.
        part: Its part of a request, or None for any other message.
    """

    device_id: bytes
    message_id: bytes
    part: Part | None = None


class Outcome(enum.Enum):
    """What :meth:`IdempotencyStore.admit` made of a message."""

    NEW = "new"
    """First seen: recorded, process it."""
    DUPLICATE = "duplicate"
    """Seen before: acknowledge it again, do nothing else."""
    REFUSED = "refused"
    """First seen and recorded, but its part was refused (over the request's
    byte limit, or media of another kind): acknowledge it, never assemble it."""


@dataclass(frozen=True, slots=True)
class Assembled:
    """A request whose parts are all in.

    Attributes:
        device_id: The device that asked.
        request_id: The request id.
        message_id: The REQUEST message's id.
        body: The REQUEST body (CBOR).
        media_kind: AUDIO or PHOTO, or None without media.
        media: The chunks' bytes in index order.
    """

    device_id: bytes
    request_id: int
    message_id: bytes
    body: bytes
    media_kind: PartKind | None = None
    media: bytes = b""


@dataclass(frozen=True, slots=True)
class Admission:
    """The store's verdict on one entry.

    Attributes:
        outcome: New, duplicate or refused.
        assembled: The request this entry completed, handed out once.
    """

    outcome: Outcome
    assembled: Assembled | None = None


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Retention and size limits of a store.

    Attributes:
        idempotency_ttl_s: How long a processed id is remembered.
        assembly_ttl_s: How long an incomplete request's parts are kept
            (renewed by each new part).
        downlink_ttl_s: How long an acknowledged answer id is remembered.
        max_request_bytes: Media bytes of one request; more is refused.
    """

    idempotency_ttl_s: float
    assembly_ttl_s: float
    downlink_ttl_s: float
    max_request_bytes: int


class IdempotencyStore(Protocol):
    """The gateway's shared state (see the module docstring)."""

    @property
    def description(self) -> str:
        """What and where the store is, for logs."""
        ...

    async def admit(self, entries: Sequence[Entry]) -> list[Admission]:
        """Record a batch of messages, in order; one verdict per entry.

        Call after the envelopes opened and before acknowledging them.

        Raises:
            StoreUnavailableError: the store failed; acknowledge nothing.
        """
        ...

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Remember that the phone acknowledged these answer pieces.

        Raises:
            StoreUnavailableError: the store failed.
        """
        ...

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Return which of ``ids`` the phone acknowledged (to any gateway).

        Raises:
            StoreUnavailableError: the store failed.
        """
        ...

    async def aclose(self) -> None:
        """Close the store; idempotent."""
        ...


_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS seen (
        device BLOB NOT NULL,
        message_id BLOB NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY (device, message_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)",
    """CREATE TABLE IF NOT EXISTS parts (
        device BLOB NOT NULL,
        request_id INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        final INTEGER NOT NULL,
        data BLOB NOT NULL,
        expires REAL NOT NULL,
        UNIQUE (device, request_id, idx)
    )""",
    "CREATE INDEX IF NOT EXISTS parts_expires ON parts (expires)",
)
_SEEN: Final = """
    INSERT INTO seen (device, message_id, expires) VALUES (?, ?, ?)
    ON CONFLICT (device, message_id) DO UPDATE SET expires = excluded.expires
    WHERE seen.expires <= ?"""


class SqliteStore:
    """The SQLite idempotency store for one gateway (module docstring).

    Args:
        path: The database file; its directory is created 0700 if missing.
        limits: Retention and size limits.
        clock: Wall clock in seconds (expiry survives restarts).
    """

    def __init__(
        self,
        path: Path,
        limits: StoreLimits,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare the store; :meth:`open` opens the database."""
        self._path = path
        self._limits = limits
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-sqlite"
        )
        self._conn: sqlite3.Connection | None = None
        self._last_purge = -float("inf")

    @property
    def description(self) -> str:
        """``sqlite PATH``."""
        return f"sqlite {self._path}"

    async def open(self) -> None:
        """Open (creating) the database in WAL mode.

        Raises:
            StoreUnavailableError: it cannot be opened or created.
        """
        await self._run(self._open_sync)

    async def aclose(self) -> None:
        """Close the database and stop the worker thread; idempotent."""
        if self._conn is not None:
            try:
                await self._run(self._close_sync)
            except StoreUnavailableError as exc:
                logger.warning("closing %s failed: %s", self._path, exc)
        self._executor.shutdown(wait=True)

    async def admit(self, entries: Sequence[Entry]) -> list[Admission]:
        """See :meth:`IdempotencyStore.admit`; one transaction per call."""
        if not entries:
            return []
        return await self._run(self._admit_sync, list(entries))

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Nothing to share: one gateway sees every ACK itself."""

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Always empty: one gateway sees every ACK itself."""
        return set()

    # -- worker thread -----------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"sqlite store {self._path}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailableError(
                f"sqlite store {self._path}: {exc.strerror}"
            ) from exc

    def _open_sync(self) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError("store is closed")
        return self._conn

    def _admit_sync(self, entries: list[Entry]) -> list[Admission]:
        conn = self._db()
        now = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = [self._admit_one(conn, entry, now) for entry in entries]
            if now - self._last_purge >= PURGE_EVERY_S:
                self._last_purge = now
                self._purge(conn, now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def _admit_one(
        self, conn: sqlite3.Connection, entry: Entry, now: float
    ) -> Admission:
        expires = now + self._limits.idempotency_ttl_s
        cursor = conn.execute(_SEEN, (entry.device_id, entry.message_id, expires, now))
        if cursor.rowcount == 0:
            return Admission(Outcome.DUPLICATE)
        if entry.part is None:
            return Admission(Outcome.NEW)
        return self._store_part(conn, entry.device_id, entry.part, now)

    def _store_part(
        self, conn: sqlite3.Connection, device: bytes, part: Part, now: float
    ) -> Admission:
        key = (device, part.request_id)
        # Parts of an expired assembly under a request id used again.
        conn.execute(
            "DELETE FROM parts WHERE device = ? AND request_id = ? AND expires <= ?",
            (*key, now),
        )
        if part.kind is not PartKind.REQUEST:
            total, low, high = conn.execute(
                "SELECT COALESCE(SUM(LENGTH(data)), 0), MIN(kind), MAX(kind) "
                "FROM parts WHERE device = ? AND request_id = ? AND idx >= 0",
                key,
            ).fetchone()
            if low is not None and not low == high == part.kind:
                return Admission(Outcome.REFUSED)
            if total + len(part.data) > self._limits.max_request_bytes:
                return Admission(Outcome.REFUSED)
        expires = now + self._limits.assembly_ttl_s
        conn.execute(
            "INSERT OR IGNORE INTO parts "
            "(device, request_id, idx, kind, final, data, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*key, part.index, int(part.kind), int(part.final), part.data, expires),
        )
        conn.execute(
            "UPDATE parts SET expires = ? WHERE device = ? AND request_id = ?",
            (expires, *key),
        )
        return Admission(Outcome.NEW, self._complete(conn, device, part.request_id))

    def _complete(
        self, conn: sqlite3.Connection, device: bytes, request_id: int
    ) -> Assembled | None:
        key = (device, request_id)
        row = conn.execute(
            "SELECT data, final FROM parts "
            "WHERE device = ? AND request_id = ? AND idx = -1",
            key,
        ).fetchone()
        if row is None:
            return None
        request, alone = row
        media_kind: PartKind | None = None
        media = b""
        if not alone:
            (last,) = conn.execute(
                "SELECT MIN(idx) FROM parts "
                "WHERE device = ? AND request_id = ? AND idx >= 0 AND final = 1",
                key,
            ).fetchone()
            if last is None:
                return None
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM parts "
                "WHERE device = ? AND request_id = ? AND idx BETWEEN 0 AND ?",
                (*key, last),
            ).fetchone()
            if count != last + 1:
                return None
            rows = conn.execute(
                "SELECT kind, data FROM parts "
                "WHERE device = ? AND request_id = ? AND idx BETWEEN 0 AND ? "
                "ORDER BY idx",
                (*key, last),
            ).fetchall()
            media_kind = PartKind(rows[0][0])
            media = b"".join(data for _, data in rows)
        conn.execute("DELETE FROM parts WHERE device = ? AND request_id = ?", key)
        return Assembled(
            device,
            request_id,
            request[:_MESSAGE_ID_SIZE],
            request[_MESSAGE_ID_SIZE:],
            media_kind,
            media,
        )

    def _purge(self, conn: sqlite3.Connection, now: float) -> None:
        seen = conn.execute(
            "DELETE FROM seen WHERE (device, message_id) IN "
            "(SELECT device, message_id FROM seen WHERE expires <= ? LIMIT ?)",
            (now, PURGE_ROWS),
        ).rowcount
        parts = conn.execute(
            "DELETE FROM parts WHERE rowid IN "
            "(SELECT rowid FROM parts WHERE expires <= ? LIMIT ?)",
            (now, PURGE_ROWS),
        ).rowcount
        if seen or parts:
            logger.debug("purged %d expired ids and %d stale parts", seen, parts)
