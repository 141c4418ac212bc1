"""The idempotency store: processed ids, request assembly, answers owed.

docs/cloud.md §Delivery 3-5. One operation does the work of a batch of
uplink messages, :meth:`IdempotencyStore.admit`: for each message it records
``(device id, message id)`` if it is new (atomic set-if-absent, kept
``idempotency_ttl_s``) and, in the same atomic step, stores the message's
part of a request (a REQUEST or a media chunk). When that part completes its
request, the store hands the whole request back exactly once, forgets its
parts and, still in the same step, keeps the request as an **answer owed**
(:class:`OwedAnswer`) owned by the admitting gateway. So among gateways
sharing one store the one that receives the last part answers, whichever
received the first, and a request acknowledged to the phone is never lost
with the gateway that was answering it.

Answers owed (:mod:`tools.cloud.downlink` uses them): each piece is saved
before it is sent (:meth:`~IdempotencyStore.save_piece`: set-if-absent per
index, so the first save fixes the index's message id and bytes for every
gateway); the phone's ACKs drop a piece's envelope, keeping a tombstone of
its index, and the record goes once every piece up to the FINAL one is
acknowledged. Each record has an owner; gateways take records over from dead
owners or, for a device that connects to them, from anyone (``claim_*``); a
gateway that lost a record gets None at its next save and stops.
:meth:`~IdempotencyStore.claim_response` decides once per request who writes
its ``response`` ledger line; a CANCEL drops unfinished answers. Everything
expires after ``idempotency_ttl_s``.

Two implementations behind :class:`IdempotencyStore`:

* :class:`SqliteStore` (this module), for one gateway: a WAL database in the
  state directory; every call runs in one dedicated worker thread, never on
  the event loop. One gateway per file, so every owner but the caller counts
  as dead (a restarted gateway takes over its predecessor's answers at once).
  Schema::

      seen(device BLOB, message_id BLOB, expires REAL,
           PRIMARY KEY (device, message_id)) WITHOUT ROWID
      parts(device BLOB, request_id INTEGER, idx INTEGER,  -- -1: the REQUEST
            kind INTEGER, final INTEGER, data BLOB, expires REAL,
            UNIQUE (device, request_id, idx))
      owed(device BLOB, message_id BLOB,        -- the REQUEST's message id
           request_id INTEGER, owner TEXT,
           final_seq INTEGER,                   -- NULL: the answer is unfinished
           acked INTEGER, cancelled INTEGER, expires REAL,
           body BLOB, media_kind INTEGER, media BLOB,  -- emptied once finished
           PRIMARY KEY (device, message_id))
      pieces(device BLOB, message_id BLOB,      -- the piece's message id
             request BLOB, seq INTEGER, final INTEGER,
             envelope BLOB,                     -- NULL once the phone ACKed it
             expires REAL,
             PRIMARY KEY (device, message_id), UNIQUE (device, request, seq))
      responses(device BLOB, message_id BLOB, expires REAL,
                PRIMARY KEY (device, message_id)) WITHOUT ROWID

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
    "OwedAnswer",
    "Outcome",
    "Part",
    "PartKind",
    "SqliteStore",
    "StoreLimits",
    "StoreUnavailableError",
    "StoredPiece",
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


@dataclass(frozen=True, slots=True)
class StoredPiece:
    """One answer piece as the store keeps it.

    Attributes:
        seq: The piece index (``ResponseText.seq``).
        message_id: Its message id, fixed for every resend by any gateway.
        final: Whether it carries FINAL (the answer's last piece).
        envelope: The sealed downlink envelope; empty once the phone ACKed it.
    """

    seq: int
    message_id: bytes
    final: bool
    envelope: bytes = b""

    @property
    def acked(self) -> bool:
        """Whether the phone acknowledged it (its envelope is dropped)."""
        return not self.envelope


@dataclass(frozen=True, slots=True)
class OwedAnswer:
    """An answer owed to a device (module docstring), as claimed.

    Attributes:
        device_id: The device that asked.
        message_id: The REQUEST message's id (the record's key).
        request_id: The request id.
        request: The request, to (re)generate the answer from; None once the
            FINAL piece is saved (the request's media is then dropped).
        pieces: The saved pieces, by index (acknowledged ones included).
    """

    device_id: bytes
    message_id: bytes
    request_id: int
    request: Assembled | None
    pieces: tuple[StoredPiece, ...] = ()

    @property
    def finished(self) -> bool:
        """Whether the FINAL piece is saved (nothing left to generate)."""
        return self.request is None or any(piece.final for piece in self.pieces)


class IdempotencyStore(Protocol):
    """The gateway's shared state (see the module docstring).

    Every method but :meth:`aclose` raises :class:`StoreUnavailableError`
    when the store fails.
    """

    @property
    def description(self) -> str:
        """What and where the store is, for logs."""
        ...

    async def admit(
        self, entries: Sequence[Entry], *, owner: str = ""
    ) -> list[Admission]:
        """Record a batch of messages, in order; one verdict per entry.

        Call after the envelopes opened and before acknowledging them (if it
        fails, acknowledge nothing). Each request completed is kept as an
        answer owed by ``owner`` (empty: by no one, any gateway may claim it).
        """
        ...

    async def save_piece(
        self, device_id: bytes, request: bytes, piece: StoredPiece, *, owner: str
    ) -> StoredPiece | None:
        """Save a piece of the answer to ``request`` (its REQUEST's id).

        Returns:
            The piece to send: ``piece``, or the one saved earlier for its
            index (perhaps acknowledged already); ``piece`` too if the answer
            has no record (expired or lost: it goes unsaved). None if the
            answer is no longer ``owner``'s (taken over, cancelled, or
            finished before this index): stop.
        """
        ...

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Record the phone's ACKs of answer pieces (module docstring)."""
        ...

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Return which of ``ids`` the phone acknowledged (to any gateway)."""
        ...

    async def claim_owed(
        self, device_id: bytes, *, owner: str, steal: bool
    ) -> list[OwedAnswer]:
        """Return the device's answers owed that ``owner`` owns afterwards.

        Those it owned, those of dead gateways and, with ``steal`` (the
        device connected to ``owner``), all.
        """
        ...

    async def claim_orphans(self, *, owner: str, limit: int) -> list[OwedAnswer]:
        """Take over up to ``limit`` answers owed by dead gateways."""
        ...

    async def heartbeat(self, *, owner: str, lease_s: float) -> None:
        """Prove ``owner`` alive for ``lease_s``; renew it well before."""
        ...

    async def claim_response(self, device_id: bytes, request: bytes) -> bool:
        """Whether the caller is the first to claim this request's response."""
        ...

    async def cancel_answer(self, device_id: bytes, request_id: int) -> None:
        """Drop the unfinished answers of ``request_id`` (a CANCEL came)."""
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
    """CREATE TABLE IF NOT EXISTS owed (
        device BLOB NOT NULL,
        message_id BLOB NOT NULL,
        request_id INTEGER NOT NULL,
        owner TEXT NOT NULL,
        final_seq INTEGER,
        acked INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        expires REAL NOT NULL,
        body BLOB NOT NULL,
        media_kind INTEGER,
        media BLOB NOT NULL,
        PRIMARY KEY (device, message_id)
    )""",
    "CREATE INDEX IF NOT EXISTS owed_owner ON owed (owner)",
    "CREATE INDEX IF NOT EXISTS owed_expires ON owed (expires)",
    """CREATE TABLE IF NOT EXISTS pieces (
        device BLOB NOT NULL,
        message_id BLOB NOT NULL,
        request BLOB NOT NULL,
        seq INTEGER NOT NULL,
        final INTEGER NOT NULL,
        envelope BLOB,
        expires REAL NOT NULL,
        PRIMARY KEY (device, message_id),
        UNIQUE (device, request, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS pieces_expires ON pieces (expires)",
    """CREATE TABLE IF NOT EXISTS responses (
        device BLOB NOT NULL,
        message_id BLOB NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY (device, message_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires)",
)
_SEEN: Final = """
    INSERT INTO seen (device, message_id, expires) VALUES (?, ?, ?)
    ON CONFLICT (device, message_id) DO UPDATE SET expires = excluded.expires
    WHERE seen.expires <= ?"""
_RESPONSE: Final = """
    INSERT INTO responses (device, message_id, expires) VALUES (?, ?, ?)
    ON CONFLICT (device, message_id) DO UPDATE SET expires = excluded.expires
    WHERE responses.expires <= ?"""
_OWE: Final = """
    INSERT OR REPLACE INTO owed (device, message_id, request_id, owner, expires,
        body, media_kind, media) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
_PURGED: Final = {  # table: its key (WITHOUT ROWID tables have no rowid)
    "seen": "device, message_id",
    "parts": "rowid",
    "owed": "rowid",
    "pieces": "rowid",
    "responses": "device, message_id",
}


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

    async def admit(
        self, entries: Sequence[Entry], *, owner: str = ""
    ) -> list[Admission]:
        """See :meth:`IdempotencyStore.admit`; one transaction per call."""
        if not entries:
            return []
        return await self._run(self._admit_sync, list(entries), owner)

    async def save_piece(
        self, device_id: bytes, request: bytes, piece: StoredPiece, *, owner: str
    ) -> StoredPiece | None:
        """See :meth:`IdempotencyStore.save_piece`."""
        return await self._run(
            self._transaction, self._save_piece, device_id, request, piece, owner
        )

    async def mark_downlink_acked(self, device_id: bytes, ids: Sequence[bytes]) -> None:
        """Drop the acknowledged pieces' envelopes; delete finished answers."""
        if ids:
            await self._run(self._transaction, self._mark_acked, device_id, list(ids))

    async def downlink_acked(
        self, device_id: bytes, ids: Sequence[bytes]
    ) -> set[bytes]:
        """Always empty: one gateway sees every ACK itself."""
        return set()

    async def claim_owed(
        self, device_id: bytes, *, owner: str, steal: bool
    ) -> list[OwedAnswer]:
        """Every answer owed to the device (one gateway: other owners are dead)."""
        return await self._run(self._transaction, self._claim, owner, device_id, 0)

    async def claim_orphans(self, *, owner: str, limit: int) -> list[OwedAnswer]:
        """Up to ``limit`` answers owed by earlier gateway processes."""
        return await self._run(self._transaction, self._claim, owner, None, limit)

    async def heartbeat(self, *, owner: str, lease_s: float) -> None:
        """Nothing to prove: one gateway per database."""

    async def claim_response(self, device_id: bytes, request: bytes) -> bool:
        """See :meth:`IdempotencyStore.claim_response`."""
        return await self._run(
            self._transaction, self._claim_response, device_id, request
        )

    async def cancel_answer(self, device_id: bytes, request_id: int) -> None:
        """See :meth:`IdempotencyStore.cancel_answer`."""
        await self._run(self._transaction, self._cancel, device_id, request_id)

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

    def _transaction(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run ``fn(conn, now, *args)`` in one write transaction."""
        conn = self._db()
        now = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn, now, *args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def _admit_sync(self, entries: list[Entry], owner: str) -> list[Admission]:
        return self._transaction(self._admit_all, entries, owner)

    def _admit_all(
        self, conn: sqlite3.Connection, now: float, entries: list[Entry], owner: str
    ) -> list[Admission]:
        out = [self._admit_one(conn, entry, now, owner) for entry in entries]
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            self._purge(conn, now)
        return out

    def _admit_one(
        self, conn: sqlite3.Connection, entry: Entry, now: float, owner: str
    ) -> Admission:
        expires = now + self._limits.idempotency_ttl_s
        cursor = conn.execute(_SEEN, (entry.device_id, entry.message_id, expires, now))
        if cursor.rowcount == 0:
            return Admission(Outcome.DUPLICATE)
        if entry.part is None:
            return Admission(Outcome.NEW)
        admission = self._store_part(conn, entry.device_id, entry.part, now)
        done = admission.assembled
        if done is not None:  # owed from now on, in the same transaction
            kind = None if done.media_kind is None else int(done.media_kind)
            key = (done.device_id, done.message_id, done.request_id)
            conn.execute(_OWE, (*key, owner, expires, done.body, kind, done.media))
        return admission

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

    # -- answers owed -------------------------------------------------------------

    def _save_piece(
        self,
        conn: sqlite3.Connection,
        now: float,
        device: bytes,
        request: bytes,
        piece: StoredPiece,
        owner: str,
    ) -> StoredPiece | None:
        row = conn.execute(
            "SELECT owner, final_seq, cancelled FROM owed "
            "WHERE device = ? AND message_id = ? AND expires > ?",
            (device, request, now),
        ).fetchone()
        if row is None:
            return piece  # no record: sent unsaved
        holder, final_seq, cancelled = row
        if cancelled or holder != owner:
            return None
        saved = conn.execute(
            "SELECT message_id, final, envelope FROM pieces "
            "WHERE device = ? AND request = ? AND seq = ?",
            (device, request, piece.seq),
        ).fetchone()
        if saved is not None:
            return StoredPiece(piece.seq, saved[0], bool(saved[1]), saved[2] or b"")
        if final_seq is not None:
            return None  # finished: no piece after the FINAL one
        tail = (piece.envelope, now + self._limits.idempotency_ttl_s)
        conn.execute(
            "INSERT INTO pieces "
            "(device, message_id, request, seq, final, envelope, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device, piece.message_id, request, piece.seq, int(piece.final), *tail),
        )
        if piece.final:
            conn.execute(
                "UPDATE owed SET final_seq = ?, media = x'', media_kind = NULL "
                "WHERE device = ? AND message_id = ?",
                (piece.seq, device, request),
            )
        return piece

    def _mark_acked(
        self, conn: sqlite3.Connection, now: float, device: bytes, ids: list[bytes]
    ) -> None:
        for mid in ids:
            row = conn.execute(
                "UPDATE pieces SET envelope = NULL WHERE device = ? AND message_id = ? "
                "AND envelope IS NOT NULL RETURNING request",
                (device, mid),
            ).fetchone()
            if row is None:
                continue
            key = (device, row[0])
            owed = conn.execute(
                "UPDATE owed SET acked = acked + 1 WHERE device = ? AND message_id = ? "
                "RETURNING acked, final_seq",
                key,
            ).fetchone()
            if owed is not None and owed[1] is not None and owed[0] > owed[1]:
                conn.execute(
                    "DELETE FROM owed WHERE device = ? AND message_id = ?", key
                )
                conn.execute("DELETE FROM pieces WHERE device = ? AND request = ?", key)

    def _claim(
        self,
        conn: sqlite3.Connection,
        now: float,
        owner: str,
        device: bytes | None,
        limit: int,
    ) -> list[OwedAnswer]:
        if device is None:  # not ours: an earlier process's (one gateway per file)
            rows = conn.execute(
                "SELECT device, message_id FROM owed WHERE (owner < ? OR owner > ?) "
                "AND cancelled = 0 AND expires > ? LIMIT ?",
                (owner, owner, now, limit),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT device, message_id FROM owed "
                "WHERE device = ? AND cancelled = 0 AND expires > ?",
                (device, now),
            ).fetchall()
        out: list[OwedAnswer] = []
        for key in rows:
            conn.execute(
                "UPDATE owed SET owner = ? WHERE device = ? AND message_id = ?",
                (owner, *key),
            )
            out.append(self._load(conn, key[0], key[1]))
        return out

    def _load(
        self, conn: sqlite3.Connection, device: bytes, request: bytes
    ) -> OwedAnswer:
        request_id, final_seq, body, kind, media = conn.execute(
            "SELECT request_id, final_seq, body, media_kind, media FROM owed "
            "WHERE device = ? AND message_id = ?",
            (device, request),
        ).fetchone()
        pieces = tuple(
            StoredPiece(seq, mid, bool(final), envelope or b"")
            for seq, mid, final, envelope in conn.execute(
                "SELECT seq, message_id, final, envelope FROM pieces "
                "WHERE device = ? AND request = ? ORDER BY seq",
                (device, request),
            )
        )
        assembled = None
        if final_seq is None:
            media_kind = None if kind is None else PartKind(kind)
            assembled = Assembled(device, request_id, request, body, media_kind, media)
        return OwedAnswer(device, request, request_id, assembled, pieces)

    def _claim_response(
        self, conn: sqlite3.Connection, now: float, device: bytes, request: bytes
    ) -> bool:
        expires = now + self._limits.idempotency_ttl_s
        return conn.execute(_RESPONSE, (device, request, expires, now)).rowcount > 0

    def _cancel(
        self, conn: sqlite3.Connection, now: float, device: bytes, request_id: int
    ) -> None:
        rows = conn.execute(
            "UPDATE owed SET cancelled = 1, body = x'', media = x'' "
            "WHERE device = ? AND request_id = ? AND final_seq IS NULL "
            "AND cancelled = 0 RETURNING message_id",
            (device, request_id),
        ).fetchall()
        for (request,) in rows:
            conn.execute(
                "DELETE FROM pieces WHERE device = ? AND request = ?",
                (device, request),
            )

    def _purge(self, conn: sqlite3.Connection, now: float) -> None:
        counts = {
            table: conn.execute(
                f"DELETE FROM {table} WHERE ({key}) IN "  # noqa: S608 - fixed names
                f"(SELECT {key} FROM {table} WHERE expires <= ? LIMIT ?)",
                (now, PURGE_ROWS),
            ).rowcount
            for table, key in _PURGED.items()
        }
        if any(counts.values()):
            logger.debug("purged expired rows: %s", counts)
