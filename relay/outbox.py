"""Durable outbox: sealed envelopes waiting for the gateway's signed acknowledgement.

The daemon seals each message for the cloud into an opaque envelope and puts it here;
the uplink takes envelopes out in priority-then-insertion order and sends them; a row
is deleted only by :meth:`Outbox.ack`, which the caller invokes after verifying the
gateway's *signed* end-to-end acknowledgement (never on an MQTT PUBACK). The envelope
bytes are stored and resent unchanged; they are never logged.

Storage and threading:
    One SQLite file in WAL mode and one connection, used by a worker thread. The
    event loop talks to the worker through a FIFO queue and awaits futures. Requests
    are handled in submission order, so a ``put`` that returned is visible to every
    later ``next_batch``.

Inline commits (``OutboxConfig.inline_commit``, with ``synchronous = NORMAL`` only):
    A put that finds the worker with nothing queued or in hand (every request handed
    to it has completed on the loop) commits on the event loop's thread instead,
    with the lazy writes held on the loop side, at most once per loop iteration (a
    burst goes to the worker, which groups it; a caller putting in a loop still
    yields; a put of more than ``commit_max_batch`` items goes to the worker too). At
    a low rate (39 puts a second at the android-2m link rate) this spares the
    hand-off to the worker and back, two thread wake-ups after an idle gap, and the
    wait for them: p99 added latency halved, CPU a little lower
    (docs/benchmarks-history.md, ``tools.bench.coldpath``). The two
    threads never use the connection at once: the worker holds a lock while it
    serves a request, and posts what it completed only after releasing it. SQLite's
    automatic checkpoint, which runs in whichever thread commits, is off then; the
    worker checkpoints every ``_CHECKPOINT_COMMITS`` commits or
    ``_CHECKPOINT_BYTES`` of envelopes, so no fsync ever runs on the loop. With
    ``FULL`` every commit fsyncs, so every request goes to the worker.

Rows just stored, in memory:
    The sender reads what to send with :meth:`Outbox.next_rows`, a query on the
    worker. Once it has read everything sendable (at some :attr:`Outbox.generation`),
    what becomes sendable next is only what later puts store, so
    :meth:`Outbox.rows_stored_since` hands it those rows from memory (up to
    ``_FRESH_MAX``; any expiry, purge or re-seal in between makes it say "ask the
    store"), which spares a round trip to the worker per message at a steady rate.

Unwritten rows (``OutboxConfig.write_delay``):
    A put marked ``hold`` (the cloud link's, while its uplink is connected) is not
    written at once: it stays in memory, sendable (it is a fresh row at once), for
    up to ``write_delay`` seconds. If the gateway's signed acknowledgement for it
    comes first (:meth:`Outbox.ack`), it is never written: its put completes with
    ``ACKNOWLEDGED`` (durable at the gateway, so the glasses may be acknowledged)
    and neither an insert nor a delete reaches SQLite. Otherwise it is written
    then, as any put, and completes with what the store says. Until its put
    completes the glasses are not acknowledged and keep the message, so a crash
    loses nothing the glasses do not resend (docs/cloud.md, "Rows the gateway
    acknowledges before they are written"). At most ``commit_max_batch`` rows and
    ``max_unwritten_bytes`` are held; a put beyond either writes those held first.
    Any put not held (the uplink down, a caller awaiting its put) writes them
    first too, so the store's order stays the put order, as do
    :meth:`Outbox.close`, :meth:`Outbox.purge` and the re-seal calls;
    :meth:`Outbox.next_rows` returns them with the stored rows. Nothing is held
    while ``commit_max_batch`` rows wait to be committed (the store is behind):
    such a put is written at once, so its caller's backpressure counts it. An
    id held while the store had rows may be stored as well (written before, the
    glasses' ACK lost, then resent): the ack deletes that copy too.

Lazy writes (attempt marks and deletes the caller marks ``lazy``) wait on the
event-loop side for the next other request and go to the worker with it, or
after ``lazy_flush_interval``, so they wake the worker no more often than puts.

Group commit:
    Puts already queued when the worker takes one share its transaction. Once puts
    come faster than transactions (the last one carried several), ``put`` calls that
    reach the worker within ``commit_interval`` seconds of the first one, up to
    ``commit_max_batch`` rows, share one transaction; at a slower steady rate each
    commits at once (waiting would only add latency: at the android-2m link rate, 39
    messages a second, it cost 2.5 ms of p50 and about 2 points of a core). Every
    ``put`` returns only after that transaction has committed: when it returns the row
    is durable and the glasses may be acknowledged. A ``put`` whose awaiting task is
    cancelled may still have been committed; the glasses resend it and the duplicate
    is recognised.

Durability (``OutboxConfig.synchronous``):
    ``NORMAL`` (default): a committed row survives a crash or SIGKILL of the process at
    any point; after a power loss or an operating-system crash the last transactions
    before the most recent WAL checkpoint may roll back (SQLite does not fsync the WAL
    on each commit). The glasses were already acknowledged for those rows, so they can
    be lost; this is accepted as rare on phones.
    ``FULL``: the WAL is fsynced at every commit, so a committed row also survives
    power loss (on storage that honours fsync). It costs one fsync per group commit,
    which grouping amortises over the batch.

Limits and policy when full (named in :class:`OutboxConfig`):
    Every row whose ``put`` returned was acknowledged to the glasses as durable, so it
    is never dropped to make room, with exactly two exceptions, both counted:

    a. real-time rows (declared ``realtime``, e.g. live audio) whose ``expires_at`` has
       passed are dropped (``dropped_expired``);
    b. rows older than ``max_age_s`` are dropped (``dropped_age``).

    :meth:`Outbox.expire` applies (a) and (b) explicitly; it also runs at open and
    whenever a put would exceed ``max_rows`` or ``max_bytes``. If the put still does not
    fit, it is refused with :class:`OutboxFullError`: the caller must stop
    acknowledging the glasses, so backpressure reaches the source. A real-time put is
    dropped at once instead (no backpressure; counted as ``dropped_realtime_full``,
    and ``OutboxFullError.realtime`` is set); it is never acknowledged as durable.
    A duplicate of a stored row is recognised even when the outbox is full.
    ``max_bytes`` bounds the sum of envelope sizes; the file itself tracks the peak
    (SQLite reuses freed pages) plus a bounded WAL (SQLite's automatic checkpoint,
    or the worker's every ``_CHECKPOINT_BYTES``, then ``journal_size_limit``).

Time:
    ``clock`` (default :func:`time.time`) gives wall-clock seconds; it is stored in the
    rows, so it must mean the same thing across restarts. It is read on the event-loop
    thread only and is injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

__all__ = [
    "MSG_ID_SIZE",
    "EnvelopeTooLargeError",
    "ExpireResult",
    "Outbox",
    "OutboxClosedError",
    "OutboxConfig",
    "OutboxError",
    "OutboxFullError",
    "OutboxItem",
    "OutboxRow",
    "OutboxStats",
    "OutboxStorageError",
    "Priority",
    "PutOutcome",
    "Synchronous",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MSG_ID_SIZE: Final = 16
"""Length of a message id in bytes (the outbox primary key)."""

_MAX_PRIORITY: Final = 255
_SCHEMA_VERSION: Final = 1
_FILE_MODE: Final = 0o600
_BUSY_TIMEOUT_S: Final = 5.0
_WAL_SIZE_LIMIT: Final = 8 * 1024 * 1024
_SQL_CHUNK: Final = 500  # ids per IN (...) clause; far below SQLite's variable limit
_MAX_WRITES: Final = 256  # queued write requests folded into one transaction
_CHECKPOINT_COMMITS: Final = 64
"""With inline commits: commits between the worker's WAL checkpoints (SQLite's
own, run by whichever thread commits, is off so that none runs on the loop)."""
_CHECKPOINT_BYTES: Final = 4 * 1024 * 1024
"""... or envelope bytes stored, whichever comes first (bounds the WAL)."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    msg_id     BLOB PRIMARY KEY NOT NULL CHECK (length(msg_id) = 16),
    priority   INTEGER NOT NULL,
    realtime   INTEGER NOT NULL,
    expires_at REAL,
    created_at REAL NOT NULL,
    size       INTEGER NOT NULL,
    topic      TEXT NOT NULL,
    envelope   BLOB NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_send_order ON outbox (priority);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at);
CREATE INDEX IF NOT EXISTS outbox_expires ON outbox (expires_at)
    WHERE expires_at IS NOT NULL;
"""
_INSERT: Final = (
    "INSERT OR IGNORE INTO outbox "
    "(msg_id, priority, realtime, expires_at, created_at, size, topic, envelope) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_FRESH_MAX: Final = 256
"""Rows kept in memory for :meth:`Outbox.rows_stored_since` (then: ask the store)."""
# rowid grows with every insert (max + 1), so it is the insertion order, also across
# restarts. The unary + keeps the planner on outbox_send_order (no sort step).

_SELECT_SENDABLE: Final = (
    "SELECT msg_id, priority, realtime, expires_at, created_at, size, topic, "
    "envelope, attempts FROM outbox "
    "WHERE (+expires_at IS NULL OR +expires_at > ?) AND +created_at >= ? "
    "ORDER BY priority, rowid"
)


class OutboxError(Exception):
    """Base class of every error raised by the outbox."""


class OutboxFullError(OutboxError):
    """A put was refused because the outbox is at ``max_rows`` or ``max_bytes``.

    Nothing was stored: do not acknowledge the message to the glasses.

    Attributes:
        msg_id: The refused message id.
        realtime: True if the refused item was real-time (counted as
            ``dropped_realtime_full`` instead of ``refused_full``).
    """

    def __init__(self, msg_id: bytes, *, realtime: bool) -> None:
        kind = "real-time put dropped" if realtime else "put refused"
        super().__init__(f"outbox full: {kind} for {msg_id.hex()}")
        self.msg_id = msg_id
        self.realtime = realtime


class EnvelopeTooLargeError(OutboxError, ValueError):
    """An envelope is larger than ``max_bytes`` and could never be stored."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"envelope of {size} bytes exceeds max_bytes={limit}")
        self.size = size
        self.limit = limit


class OutboxClosedError(OutboxError):
    """The outbox was used after :meth:`Outbox.close`."""


class OutboxStorageError(OutboxError):
    """SQLite or the file system failed; the cause is chained (``__cause__``)."""


class Priority(enum.IntEnum):
    """Customary priorities; lower is more urgent. Any int 0..255 is accepted."""

    INTERACTIVE = 0
    NORMAL = 1
    TELEMETRY = 2


class Synchronous(enum.StrEnum):
    """SQLite ``synchronous`` setting; see the module docstring for durability."""

    NORMAL = "NORMAL"
    FULL = "FULL"


class PutOutcome(enum.Enum):
    """What happened to one item handed to :meth:`Outbox.put_many`."""

    STORED = "stored"
    """Newly stored and durable: acknowledge it."""
    DUPLICATE = "duplicate"
    """Already stored by an earlier put (durable): acknowledge it."""
    REFUSED_FULL = "refused_full"
    """Not stored, outbox full: do not acknowledge it."""
    DROPPED_REALTIME = "dropped_realtime"
    """Real-time item not stored, outbox full: dropped and counted."""
    ACKNOWLEDGED = "acknowledged"
    """Held unwritten and acknowledged by the gateway within ``write_delay``:
    durable there, never written here: acknowledge it."""


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """Outbox limits and tuning; see the module docstring for the policy when full.

    Attributes:
        max_bytes: Cap on the sum of stored envelope sizes.
        max_rows: Cap on the number of stored rows.
        max_age_s: Rows older than this are dropped (counted as ``dropped_age``).
        commit_interval: Seconds the worker waits for more puts to join a transaction
            while puts come faster than transactions (0 = only those already
            queued).
        commit_max_batch: Most rows in one group-commit transaction.
        lazy_flush_interval: Longest a lazy write (an attempt mark, an ack
            from the cloud link) waits for another transaction to ride on
            before it gets one of its own.
        synchronous: SQLite ``synchronous`` mode (``NORMAL`` or ``FULL``).
        inline_commit: With ``NORMAL``, commit a lone put on the event loop's
            thread when the worker has nothing to do ("Inline commits" in the
            module docstring); ``False`` sends every request to the worker.
        write_delay: Seconds a put marked ``hold`` stays unwritten, in memory
            and sendable, waiting for the gateway's acknowledgement ("Unwritten
            rows" in the module docstring); 0 writes every put at once. The
            glasses keep each such message this much longer.
        max_unwritten_bytes: Most envelope bytes held unwritten (and at most
            ``commit_max_batch`` rows). Policy when reached: the held rows are
            written at once.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_rows: int = 100_000
    max_age_s: float = 7 * 24 * 3600.0
    commit_interval: float = 0.002
    commit_max_batch: int = 256
    lazy_flush_interval: float = 0.1
    synchronous: Synchronous = Synchronous.NORMAL
    inline_commit: bool = True
    write_delay: float = 0.5
    max_unwritten_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        """Validate the limits.

        Raises:
            ValueError: A limit is not positive, or ``synchronous`` is unknown.
        """
        if self.max_bytes < 1 or self.max_rows < 1 or self.commit_max_batch < 1:
            raise ValueError("max_bytes, max_rows and commit_max_batch must be >= 1")
        if not self.max_age_s > 0:
            raise ValueError("max_age_s must be > 0")
        if not 0 <= self.commit_interval <= 1:
            raise ValueError("commit_interval must be within [0, 1] seconds")
        if not 0 <= self.lazy_flush_interval <= 10:
            raise ValueError("lazy_flush_interval must be within [0, 10] seconds")
        if not 0 <= self.write_delay <= 5:
            raise ValueError("write_delay must be within [0, 5] seconds")
        if self.max_unwritten_bytes < 1:
            raise ValueError("max_unwritten_bytes must be >= 1")
        Synchronous(self.synchronous)  # raises ValueError if unknown


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A sealed message to store.

    Attributes:
        msg_id: Stable 16-byte message id, the primary key.
        envelope: The sealed, opaque envelope, sent unchanged (never logged).
        topic: Route/topic the uplink publishes it on.
        priority: 0..255, lower is more urgent (see :class:`Priority`).
        realtime: True only for classes declared real-time (e.g. live audio).
        expires_at: Clock time after which a real-time row may be dropped; only
            allowed when ``realtime`` is true.
    """

    msg_id: bytes
    envelope: bytes = field(repr=False)
    topic: str
    priority: int = Priority.NORMAL
    realtime: bool = False
    expires_at: float | None = None

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            ValueError: Bad id length, priority out of range, or an expiry on a
                non-real-time item.
        """
        if len(self.msg_id) != MSG_ID_SIZE:
            raise ValueError(f"msg_id must be {MSG_ID_SIZE} bytes")
        if not 0 <= self.priority <= _MAX_PRIORITY:
            raise ValueError(f"priority must be within 0..{_MAX_PRIORITY}")
        if self.expires_at is not None and not self.realtime:
            raise ValueError("expires_at is only allowed on real-time items")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A stored row, as returned by :meth:`Outbox.next_batch`.

    Attributes:
        msg_id: The 16-byte message id.
        priority: 0..255, lower is more urgent.
        realtime: Whether the row is of a real-time class.
        expires_at: Expiry of a real-time row, else None.
        created_at: Clock time of the put.
        size: Envelope size in bytes.
        topic: Route/topic string.
        envelope: The sealed envelope (never logged).
        attempts: How many times :meth:`Outbox.mark_attempt` was called for it.
    """

    msg_id: bytes
    priority: int
    realtime: bool
    expires_at: float | None
    created_at: float
    size: int
    topic: str
    envelope: bytes = field(repr=False)
    attempts: int


@dataclass(frozen=True, slots=True)
class ExpireResult:
    """Rows dropped by one application of the expiry policy.

    Attributes:
        expired: Real-time rows past their ``expires_at``.
        aged: Rows older than ``max_age_s``.
    """

    expired: int
    aged: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox; counters start at zero on every open.

    Attributes:
        rows: Rows stored (depth).
        total_bytes: Sum of stored envelope sizes.
        oldest_age_s: Age of the oldest row by the clock, None when empty.
        stored: Rows newly stored.
        duplicates: Puts of an id that was already stored.
        acked: Rows deleted by :meth:`Outbox.ack`.
        refused_full: Puts refused with :class:`OutboxFullError`.
        dropped_realtime_full: Real-time puts dropped because the outbox was full.
        dropped_expired: Real-time rows dropped past their expiry.
        dropped_age: Rows dropped for exceeding ``max_age_s``.
        transactions: Write transactions committed.
        put_transactions: Of those, group commits of puts.
        unwritten: Rows held in memory, not yet written (``write_delay``);
            not counted in ``rows``.
        acked_unwritten: Held rows the gateway acknowledged before they were
            written (never written: an insert and a delete saved each).
    """

    rows: int
    total_bytes: int
    oldest_age_s: float | None
    stored: int
    duplicates: int
    acked: int
    refused_full: int
    dropped_realtime_full: int
    dropped_expired: int
    dropped_age: int
    transactions: int
    put_transactions: int
    unwritten: int = 0
    acked_unwritten: int = 0


@dataclass(slots=True)
class _State:
    """Depth and counters; mutated by whoever holds the store (see _Store)."""

    rows: int = 0
    total_bytes: int = 0
    stored: int = 0
    duplicates: int = 0
    acked: int = 0
    refused_full: int = 0
    dropped_realtime_full: int = 0
    dropped_expired: int = 0
    dropped_age: int = 0
    transactions: int = 0
    put_transactions: int = 0
    inline_transactions: int = 0
    checkpoints: int = 0


def _chunks(ids: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(ids), _SQL_CHUNK):
        yield ids[start : start + _SQL_CHUNK]


def _with_ids(head: str, n: int, tail: str = "") -> str:
    """Return ``head (?, ...) tail`` with ``n`` placeholders (head ends in IN)."""
    return f"{head} ({','.join('?' * n)}){tail}"


def _secure_file(path: Path, *, create: bool) -> None:
    """Create or check one file: regular, ours, mode 0600 (tightened if wider)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, _FILE_MODE)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutboxStorageError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise OutboxStorageError(f"{path} is not owned by this user")
        if st.st_mode & 0o077:
            logger.warning(
                "tightening mode of %s from %o to %o",
                path,
                stat.S_IMODE(st.st_mode),
                _FILE_MODE,
            )
            os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)


def _configure(
    conn: sqlite3.Connection, synchronous: Synchronous, *, autocheckpoint: bool
) -> None:
    """Set the pragmas and check that the file is WAL with a known schema."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxStorageError(f"cannot enable WAL (journal_mode={mode})")
    conn.execute(f"PRAGMA synchronous={Synchronous(synchronous)}")
    conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, _SCHEMA_VERSION):
        raise OutboxStorageError(f"unknown outbox schema version {version}")


class _Store:
    """The SQLite side: used by the worker, or by an inline commit, never at once."""

    def __init__(self, path: Path, config: OutboxConfig) -> None:
        self._path = path
        self._config = config
        self._conn: sqlite3.Connection | None = None
        self._refusing = False
        self.state = _State()
        self.inline = config.inline_commit and (
            Synchronous(config.synchronous) is Synchronous.NORMAL
        )
        """Lone puts may commit on the loop's thread; checkpoints are ours."""
        self.commits_since_checkpoint = 0
        self.bytes_since_checkpoint = 0

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxClosedError("outbox is not open")
        return self._conn

    def open(self, now: float) -> None:
        _secure_file(self._path, create=True)
        for suffix in ("-wal", "-shm"):
            _secure_file(self._path.with_name(self._path.name + suffix), create=False)
        # Used by the worker, and with inline commits by the loop's thread while
        # the worker has nothing to do (Outbox._queue_puts): never at once.
        conn = sqlite3.connect(
            self._path,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=not self.inline,
        )
        self._conn = conn
        try:
            _configure(conn, self._config.synchronous, autocheckpoint=not self.inline)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            rows, total = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM outbox"
            ).fetchone()
            self.state.rows, self.state.total_bytes = int(rows), int(total)
            self.expire(now)
        except BaseException:
            self.close()
            raise
        logger.info(
            "outbox open: %s, %d rows, %d bytes, synchronous=%s",
            self._path,
            self.state.rows,
            self.state.total_bytes,
            self._config.synchronous,
        )

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; on failure the in-memory state is restored."""
        conn = self.conn
        saved = dataclasses.replace(self.state)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self.state = saved
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self.state.transactions += 1
        self.commits_since_checkpoint += 1

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (PASSIVE: waits for no reader)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.commits_since_checkpoint = self.bytes_since_checkpoint = 0
        self.state.checkpoints += 1

    @property
    def checkpoint_due(self) -> bool:
        """Inline commits on, and _CHECKPOINT_COMMITS or _CHECKPOINT_BYTES reached."""
        return self.inline and (
            self.commits_since_checkpoint >= _CHECKPOINT_COMMITS
            or self.bytes_since_checkpoint >= _CHECKPOINT_BYTES
        )

    def checkpoint_if_due(self) -> None:
        """Checkpoint when :attr:`checkpoint_due`; a failure is logged."""
        if self.checkpoint_due:
            try:
                self.checkpoint()
            except sqlite3.Error as exc:  # the WAL grows until the next due one
                self.commits_since_checkpoint = self.bytes_since_checkpoint = 0
                logger.warning("outbox WAL checkpoint failed: %s", exc)

    def _fits(self, size: int) -> bool:
        st = self.state
        return (
            st.rows < self._config.max_rows
            and st.total_bytes + size <= self._config.max_bytes
        )

    def _delete(
        self, conn: sqlite3.Connection, sql: str, params: Sequence[object]
    ) -> int:
        sizes = conn.execute(sql, params).fetchall()
        self.state.rows -= len(sizes)
        self.state.total_bytes -= sum(size for (size,) in sizes)
        return len(sizes)

    def _expire_in(self, conn: sqlite3.Connection, now: float) -> ExpireResult:
        expired = self._delete(
            conn,
            "DELETE FROM outbox WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "RETURNING size",
            (now,),
        )
        aged = self._delete(
            conn,
            "DELETE FROM outbox WHERE created_at < ? RETURNING size",
            (now - self._config.max_age_s,),
        )
        self.state.dropped_expired += expired
        self.state.dropped_age += aged
        if expired:
            logger.debug("dropped %d expired real-time rows", expired)
        if aged:
            logger.warning(
                "dropped %d rows older than max_age_s=%s", aged, self._config.max_age_s
            )
        return ExpireResult(expired=expired, aged=aged)

    def expire(self, now: float) -> ExpireResult:
        with self._transaction() as conn:
            return self._expire_in(conn, now)

    def write_batch(self, batch: Sequence[_WriteRequest]) -> list[object]:
        """Apply queued puts, acks and attempt marks in one transaction, in order.

        Returns one result per request: a list of outcomes for a put, the
        number of rows deleted or updated for an ack or a mark.
        """
        results: list[object] = []
        puts = False
        with self._transaction() as conn:
            st = self.state
            expired_at: float | None = None
            for request in batch:
                if isinstance(request, _IdsRequest):
                    if request.op is _IdsOp.ACK:
                        results.append(self._ack_in(conn, request.ids))
                    else:
                        results.append(self._mark_in(conn, request.ids))
                    continue
                puts = True
                outcomes: list[PutOutcome] = []
                for item in request.items:
                    size = len(item.envelope)
                    if not self._fits(size):
                        if conn.execute(
                            "SELECT 1 FROM outbox WHERE msg_id = ?", (item.msg_id,)
                        ).fetchone():
                            st.duplicates += 1
                            outcomes.append(PutOutcome.DUPLICATE)
                            continue
                        if expired_at is None or request.now > expired_at:
                            self._expire_in(conn, request.now)
                            expired_at = request.now
                        if not self._fits(size):
                            outcomes.append(self._refuse(item))
                            continue
                    cursor = conn.execute(
                        _INSERT,
                        (
                            item.msg_id,
                            item.priority,
                            int(item.realtime),
                            item.expires_at,
                            request.now,
                            size,
                            item.topic,
                            item.envelope,
                        ),
                    )
                    if cursor.rowcount == 1:
                        self.bytes_since_checkpoint += size
                        st.rows += 1
                        st.total_bytes += size
                        st.stored += 1
                        outcomes.append(PutOutcome.STORED)
                    else:
                        st.duplicates += 1
                        outcomes.append(PutOutcome.DUPLICATE)
                results.append(outcomes)
        if puts:
            self.state.put_transactions += 1
        if self._refusing and self._fits(0):
            self._refusing = False
            logger.info("outbox accepting puts again (%d rows)", self.state.rows)
        return results

    def _refuse(self, item: OutboxItem) -> PutOutcome:
        st = self.state
        if not self._refusing:
            self._refusing = True
            logger.warning(
                "outbox full (%d rows, %d bytes; limits %d rows, %d bytes): "
                "refusing puts",
                st.rows,
                st.total_bytes,
                self._config.max_rows,
                self._config.max_bytes,
            )
        if item.realtime:
            st.dropped_realtime_full += 1
            return PutOutcome.DROPPED_REALTIME
        st.refused_full += 1
        return PutOutcome.REFUSED_FULL

    def next_batch(
        self, max_items: int, max_bytes: int, exclude: frozenset[bytes], now: float
    ) -> tuple[list[OutboxRow], bool]:
        """The rows to send, and whether they are all there was to send."""
        rows: list[OutboxRow] = []
        total = 0
        complete = True
        cursor = self.conn.execute(
            _SELECT_SENDABLE, (now, now - self._config.max_age_s)
        )
        try:
            for record in cursor:
                msg_id, prio, realtime, expires, created, size, topic, env, tries = (
                    record
                )
                if msg_id in exclude:
                    continue
                if rows and total + size > max_bytes:
                    complete = False
                    break
                rows.append(
                    OutboxRow(
                        msg_id=msg_id,
                        priority=prio,
                        realtime=bool(realtime),
                        expires_at=expires,
                        created_at=created,
                        size=size,
                        topic=topic,
                        envelope=env,
                        attempts=tries,
                    )
                )
                total += size
                if len(rows) >= max_items:
                    complete = cursor.fetchone() is None
                    break
        finally:
            cursor.close()
        return rows, complete

    def _ack_in(self, conn: sqlite3.Connection, ids: Sequence[bytes]) -> int:
        deleted = 0
        for chunk in _chunks(ids):
            deleted += self._delete(
                conn,
                _with_ids(
                    "DELETE FROM outbox WHERE msg_id IN", len(chunk), " RETURNING size"
                ),
                chunk,
            )
        self.state.acked += deleted
        return deleted

    def rows_with_topic(self, topic: str, limit: int) -> list[tuple[bytes, bytes]]:
        cursor = self.conn.execute(
            "SELECT msg_id, envelope FROM outbox WHERE topic = ? "
            "ORDER BY rowid LIMIT ?",
            (topic, limit),
        )
        try:
            return [(bytes(a), bytes(b)) for a, b in cursor.fetchall()]
        finally:
            cursor.close()

    def replace_envelopes(
        self, old_topic: str, rows: Sequence[tuple[bytes, bytes, str]]
    ) -> int:
        updated = 0
        with self._transaction() as conn:
            for msg_id, envelope, topic in rows:
                cursor = conn.execute(
                    "UPDATE outbox SET envelope = ?, topic = ?, size = ? "
                    "WHERE msg_id = ? AND topic = ? RETURNING size",
                    (envelope, topic, len(envelope), msg_id, old_topic),
                )
                updated += len(cursor.fetchall())
                cursor.close()
        # Sizes changed: recount the bytes held.
        (total,) = self.conn.execute(
            "SELECT coalesce(sum(size), 0) FROM outbox"
        ).fetchone()
        self.state.total_bytes = int(total)
        return updated

    def purge(self) -> int:
        with self._transaction() as conn:
            deleted = conn.execute("DELETE FROM outbox").rowcount
        self.state.rows = 0
        self.state.total_bytes = 0
        return int(deleted)

    def _mark_in(self, conn: sqlite3.Connection, ids: Sequence[bytes]) -> int:
        updated = 0
        for chunk in _chunks(ids):
            updated += conn.execute(
                _with_ids(
                    "UPDATE outbox SET attempts = attempts + 1 WHERE msg_id IN",
                    len(chunk),
                ),
                chunk,
            ).rowcount
        return updated

    def stats(self, now: float) -> OutboxStats:
        (oldest,) = self.conn.execute("SELECT min(created_at) FROM outbox").fetchone()
        st = self.state
        return OutboxStats(
            rows=st.rows,
            total_bytes=st.total_bytes,
            oldest_age_s=None if oldest is None else max(0.0, now - oldest),
            stored=st.stored,
            duplicates=st.duplicates,
            acked=st.acked,
            refused_full=st.refused_full,
            dropped_realtime_full=st.dropped_realtime_full,
            dropped_expired=st.dropped_expired,
            dropped_age=st.dropped_age,
            transactions=st.transactions,
            put_transactions=st.put_transactions,
        )


@dataclass(slots=True)
class _PutRequest:
    items: Sequence[OutboxItem]
    now: float
    future: asyncio.Future[list[PutOutcome]]
    held: bool = False  # rows held unwritten first: already fresh (sent) rows


@dataclass(slots=True)
class _Unwritten:
    """A put held in memory (``write_delay``) until acknowledged or written."""

    item: OutboxItem
    deadline: float  # loop time: written then unless acknowledged
    future: asyncio.Future[PutOutcome]
    also: list[asyncio.Future[PutOutcome]] = field(default_factory=list)
    acked: bool = False
    maybe_stored: bool = False  # the store held rows then: the id may be there too


class _IdsOp(enum.Enum):
    ACK = "ack"
    MARK = "mark"


@dataclass(slots=True)
class _IdsRequest:
    """Delete acknowledged rows, or count a send attempt, by id."""

    op: _IdsOp
    ids: Sequence[bytes]
    future: asyncio.Future[int]
    lazy: bool = False  # may wait for the next write transaction
    since: float = 0.0  # lazy: when it was submitted (monotonic), for its deadline


_WriteRequest = _PutRequest | _IdsRequest


@dataclass(slots=True)
class _Job:
    run: Callable[[_Store], None]


@dataclass(slots=True)
class _Stop:
    future: asyncio.Future[None]


_Request = _PutRequest | _IdsRequest | _Job | _Stop
_Posted = tuple[int, Callable[..., object], tuple[object, ...]]
"""A completion for the loop: requests it ends, callback, arguments."""


def _by_priority(row: OutboxRow) -> int:
    return row.priority


def _row(item: OutboxItem, now: float) -> OutboxRow:
    """The row ``item`` is (or will be) once stored at ``now``."""
    return OutboxRow(
        msg_id=item.msg_id,
        priority=item.priority,
        realtime=item.realtime,
        expires_at=item.expires_at,
        created_at=now,
        size=len(item.envelope),
        topic=item.topic,
        envelope=item.envelope,
        attempts=0,
    )


def _first(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[list[PutOutcome]]
) -> asyncio.Future[PutOutcome]:
    """A future of the first outcome of a put request's future."""
    single: asyncio.Future[PutOutcome] = loop.create_future()

    def done(f: asyncio.Future[list[PutOutcome]]) -> None:
        if single.done():
            return
        if f.cancelled():
            single.cancel()
        elif (exc := f.exception()) is not None:
            single.set_exception(exc)
        else:
            single.set_result(f.result()[0])

    future.add_done_callback(done)
    return single


def _settle(entry: _Unwritten, outcome: PutOutcome) -> None:
    """Complete a held put (and any put of the same id made while it was held)."""
    _set_result(entry.future, outcome)
    again = (
        PutOutcome.DUPLICATE
        if outcome in (PutOutcome.STORED, PutOutcome.DUPLICATE, PutOutcome.ACKNOWLEDGED)
        else outcome
    )
    for future in entry.also:
        _set_result(future, again)


def _settle_written(
    entries: Sequence[_Unwritten], future: asyncio.Future[list[PutOutcome]]
) -> None:
    """Complete held puts from the outcome of their (late) write."""
    if future.cancelled():
        for entry in entries:
            for each in (entry.future, *entry.also):
                each.cancel()
        return
    exc = future.exception()
    if exc is not None:
        for entry in entries:
            for each in (entry.future, *entry.also):
                _set_exception(each, exc)
        return
    for entry, outcome in zip(entries, future.result(), strict=True):
        _settle(entry, outcome)


def _merge_held(
    rows: list[OutboxRow],
    complete: bool,
    held: Sequence[_Unwritten],
    max_items: int,
    max_bytes: int,
    exclude: frozenset[bytes],
    now: float,
) -> tuple[list[OutboxRow], bool]:
    """Add held rows to what the store returned, as the store would have.

    Held rows are newer than every stored row, so they go after stored rows
    of the same priority. When the store stopped early, only held rows of a
    higher priority (lower number) than its last row may join: the rest
    would come after stored rows not read.
    """
    limit = rows[-1].priority if rows and not complete else None
    seen = {row.msg_id for row in rows}
    extra = [
        _row(entry.item, now)
        for entry in held
        if not entry.acked
        and entry.item.msg_id not in exclude
        and entry.item.msg_id not in seen
        and (entry.item.expires_at is None or entry.item.expires_at > now)
        and (limit is None or entry.item.priority < limit)
    ]
    if not extra:
        return rows, complete
    merged = sorted([*rows, *extra], key=_by_priority)  # stable: stored first
    out: list[OutboxRow] = []
    total = 0
    for row in merged:
        if len(out) >= max_items or (out and total + row.size > max_bytes):
            return out, False
        out.append(row)
        total += row.size
    return out, complete


def _storage_error(exc: sqlite3.Error | OSError) -> OutboxStorageError:
    err = OutboxStorageError(f"outbox storage failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _set_result(future: asyncio.Future[_T], result: _T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[_T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _fail_writes(batch: Sequence[_WriteRequest], exc: Exception) -> None:
    for request in batch:
        future: asyncio.Future[Any] = request.future
        _set_exception(future, exc)


def _nothing() -> None:
    """The completion of a job that only makes the worker checkpoint."""


class Outbox:
    """The durable outbox; create it with :meth:`open`, release it with :meth:`close`.

    Use as ``async with await Outbox.open(path, config) as outbox: ...``. All methods
    must be called from the event loop that opened it. Concurrent callers are fine;
    their requests are served in order by one worker thread.
    """

    def __init__(
        self,
        path: Path,
        config: OutboxConfig,
        clock: Callable[[], float],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Use :meth:`open` instead; this only wires the parts together."""
        self._path = path
        self._config = config
        self._clock = clock
        self._loop = loop
        self._store = _Store(path, config)
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._held: list[_WriteRequest] = []  # lazy writes (worker thread only)
        self._held_until = 0.0  # when the held writes must be written
        self._grouping = False  # the last put transaction carried several puts
        self._opened: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._serve, args=(clock(),), name=f"outbox:{path.name}", daemon=True
        )
        self._closing = False
        self._closed = False
        self._nonempty = asyncio.Event()
        self._generation = 0
        self._fresh: list[tuple[int, OutboxRow]] = []
        self._fresh_base = 0  # rows_stored_since answers for generations >= this
        self._rewriting = 0  # purges, re-seals, expiries queued: ask the store
        self._dropped_seen = 0
        self._lazy: list[_IdsRequest] = []  # lazy writes not yet queued (loop side)
        self._lazy_timer: asyncio.TimerHandle | None = None
        # Requests queued whose completion has not yet run on the loop: while
        # any is, puts go to the worker (in order); at 0 the worker is idle.
        self._outstanding = 0
        self._inline_this_turn = False  # one inline commit per loop iteration
        self._store_lock = threading.Lock()  # held while the store is in use
        # Worker thread: completions of the request being served, posted once
        # the lock is released (a put they free must find it free).
        self._collected: list[_Posted] = []
        self._collecting = False
        self._stored_listeners: list[Callable[[], None]] = []
        self._debug = logger.isEnabledFor(logging.DEBUG)
        # Puts held unwritten (write_delay), in put order (so deadline order).
        self._unwritten: dict[bytes, _Unwritten] = {}
        self._unwritten_bytes = 0
        self._unwritten_timer: asyncio.TimerHandle | None = None
        self._acked_unwritten = 0
        self._rows_writing = 0  # rows in put requests not yet completed
        self._store_rows = 0  # rows in the store after the last completed request

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        config: OutboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (or create, mode 0600) the outbox file and start its worker thread.

        Applies the expiry policy once at open. Call once per daemon start; reopening
        after a crash yields every row whose ``put`` had returned.

        Args:
            path: The SQLite file; its directory must exist.
            config: Limits and tuning; defaults to ``OutboxConfig()``.
            clock: Wall-clock seconds, read on the event-loop thread.

        Returns:
            The open outbox.

        Raises:
            OutboxStorageError: The directory is missing, the file is not a regular
                file owned by this user, or SQLite failed.
        """
        loop = asyncio.get_running_loop()
        outbox = cls(Path(path), config or OutboxConfig(), clock, loop)
        outbox._thread.start()
        try:
            await outbox._opened
        except BaseException:  # failed, or cancelled while the worker was opening
            outbox._closing = outbox._closed = True
            outbox._enqueue(_Stop(loop.create_future()))
            await asyncio.to_thread(outbox._thread.join)
            raise
        return outbox

    async def __aenter__(self) -> Self:
        """Return the outbox itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the outbox."""
        await self.close()

    @property
    def config(self) -> OutboxConfig:
        """The configuration the outbox was opened with."""
        return self._config

    @property
    def generation(self) -> int:
        """Rows newly stored since open; pass it to :meth:`wait_stored`."""
        return self._generation

    async def put(self, item: OutboxItem) -> bool:
        """Store one item durably; returns once its transaction has committed.

        Call it before acknowledging the message to the glasses. Both True and False
        mean the row is durable and may be acknowledged.

        Args:
            item: The sealed message.

        Returns:
            True if newly stored, False if the id was already stored (nothing new
            was written).

        Raises:
            OutboxFullError: Not stored (the outbox is full after the expiry policy);
                do not acknowledge it. For a real-time item ``realtime`` is set: it
                was dropped and counted, the stream just moves on.
            EnvelopeTooLargeError: The envelope exceeds ``max_bytes``.
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed; nothing was stored.
        """
        (outcome,) = await self._submit_puts((item,))
        if outcome is PutOutcome.STORED:
            return True
        if outcome is PutOutcome.DUPLICATE:
            return False
        raise OutboxFullError(item.msg_id, realtime=item.realtime)

    async def put_many(self, items: Iterable[OutboxItem]) -> list[PutOutcome]:
        """Store several items; each is judged on its own, as by :meth:`put`.

        Items are split into transactions of at most ``commit_max_batch`` rows and
        returns once all of them have committed.

        Args:
            items: The sealed messages, stored in this order.

        Returns:
            One outcome per item, in order. Acknowledge ``STORED`` and ``DUPLICATE``
            items only.

        Raises:
            EnvelopeTooLargeError: An envelope exceeds ``max_bytes`` (nothing stored).
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed.
        """
        return await self._submit_puts(tuple(items))

    def put_soon(
        self, item: OutboxItem, *, hold: bool = False
    ) -> asyncio.Future[PutOutcome]:
        """Queue one item as :meth:`put_many` does, without waiting for the commit.

        The returned future gives the item's :class:`PutOutcome` once its
        transaction has committed (acknowledge it only then), or the storage
        error. Items queued back to back share a transaction (group commit).
        A lone put may commit before this returns (an inline commit: the
        ``on_stored`` listeners run then too); the future still completes
        on a later loop iteration.

        With ``hold`` (and a ``write_delay``), the item is held unwritten
        but sendable at once (the ``on_stored`` listeners run now): the
        future gives ``ACKNOWLEDGED`` if :meth:`ack` names it within
        ``write_delay``, else the outcome of its write then ("Unwritten
        rows" in the module docstring). See :meth:`holds`.

        Raises:
            EnvelopeTooLargeError: The envelope exceeds ``max_bytes``.
            OutboxClosedError: The outbox is closed.
        """
        if hold and self._config.write_delay > 0:
            return self._hold(item)
        (future,) = self._queue_puts((item,))
        return _first(self._loop, future)

    def holds(self, msg_id: bytes) -> bool:
        """Whether the row ``msg_id`` is held unwritten (its put not yet complete)."""
        return msg_id in self._unwritten

    def _hold(self, item: OutboxItem) -> asyncio.Future[PutOutcome]:
        self._check_open()
        size = len(item.envelope)
        if size > self._config.max_bytes:
            raise EnvelopeTooLargeError(size, self._config.max_bytes)
        known = self._unwritten.get(item.msg_id)
        if known is None and self._rows_writing >= self._config.commit_max_batch:
            # The store is behind: write this one too, so that the caller's
            # count of puts not yet committed (its backpressure) sees it.
            (written,) = self._queue_puts((item,))
            return _first(self._loop, written)
        future: asyncio.Future[PutOutcome] = self._loop.create_future()
        if known is not None:  # the glasses sent it again meanwhile
            known.also.append(future)
            return future
        if (
            len(self._unwritten) >= self._config.commit_max_batch
            or self._unwritten_bytes + size > self._config.max_unwritten_bytes
        ):
            self._write_unwritten()
        now = self._clock()
        deadline = self._loop.time() + self._config.write_delay
        self._unwritten[item.msg_id] = _Unwritten(
            item,
            deadline,
            future,
            # A copy may be stored (written earlier, the glasses' ACK lost):
            # the gateway's ack must delete it too.
            maybe_stored=self._store_rows > 0 or self._rows_writing > 0,
        )
        self._unwritten_bytes += size
        if self._unwritten_timer is None:
            self._unwritten_timer = self._loop.call_at(deadline, self._write_due)
        self._generation += 1
        self._fresh.append((self._generation, _row(item, now)))
        if len(self._fresh) > _FRESH_MAX:
            self._forget_fresh()
        self._nonempty.set()
        self._call_listeners()
        return future

    def _write_due(self) -> None:
        """Timer: write the held rows whose ``write_delay`` has passed."""
        self._unwritten_timer = None
        if self._closing:
            return
        now = self._loop.time()
        due = 0
        for entry in self._unwritten.values():
            if entry.deadline > now:
                break
            due += 1
        self._write_unwritten(due)
        if self._unwritten:
            first = next(iter(self._unwritten.values()))
            self._unwritten_timer = self._loop.call_at(first.deadline, self._write_due)

    def _take_unwritten(self, msg_id: bytes) -> _Unwritten | None:
        """Take a held row out of memory (its bytes; the timer if it was the last)."""
        entry = self._unwritten.pop(msg_id, None)
        if entry is None:
            return None
        self._unwritten_bytes -= len(entry.item.envelope)
        if not self._unwritten and self._unwritten_timer is not None:
            self._unwritten_timer.cancel()
            self._unwritten_timer = None
        return entry

    def _write_unwritten(self, count: int | None = None) -> None:
        """Write the first ``count`` held rows (all by default) as ordinary puts."""
        ids = list(self._unwritten)[:count]
        if not ids:
            return
        entries = [e for e in map(self._take_unwritten, ids) if e is not None]
        step = self._config.commit_max_batch
        futures = self._queue_puts([e.item for e in entries], held=True)
        for index, future in enumerate(futures):
            part = entries[index * step : (index + 1) * step]
            future.add_done_callback(functools.partial(_settle_written, part))

    async def next_batch(
        self,
        max_items: int,
        max_bytes: int,
        *,
        exclude: Set[bytes] = frozenset(),
    ) -> list[OutboxRow]:
        """Return the next rows to send, in priority-then-insertion order.

        Call it from the uplink; rows stay stored until :meth:`ack`. Expired
        real-time rows and rows past ``max_age_s`` are skipped. The first row is
        returned even if it alone exceeds ``max_bytes``; after it the batch stops at
        the first row that would exceed it.

        Args:
            max_items: Most rows to return (>= 1).
            max_bytes: Byte budget for the envelopes.
            exclude: Ids already in flight, skipped (copied before use).

        Returns:
            Up to ``max_items`` rows; empty if nothing is sendable.

        Raises:
            ValueError: ``max_items`` < 1.
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed.
        """
        rows, _ = await self.next_rows(max_items, max_bytes, exclude=exclude)
        return rows

    def rows_stored_since(
        self,
        generation: int,
        max_items: int,
        max_bytes: int,
        *,
        exclude: Set[bytes] = frozenset(),
    ) -> list[OutboxRow] | None:
        """The rows stored after ``generation``, from memory, or None: ask the store.

        For a caller that read every sendable row (``next_rows`` said
        complete) when :attr:`generation` was ``generation``: what is
        sendable now is what puts stored since, which this returns as
        :meth:`next_rows` would (priority, then insertion order; ``exclude``
        and expired rows left out), and complete. None when the outbox does
        not hold all of them in memory (more than ``_FRESH_MAX``, or rows
        were expired, purged or re-sealed since), or when they do not fit
        ``max_items`` and ``max_bytes``.
        """
        self._check_open()
        if generation < self._fresh_base or self._rewriting:
            return None
        fresh = self._fresh
        stale = 0
        while stale < len(fresh) and fresh[stale][0] <= generation:
            stale += 1
        if stale:
            del fresh[:stale]  # the caller has them; it asks only forward
            self._fresh_base = generation
        now = self._clock()
        rows = [
            row
            for _, row in fresh
            if row.msg_id not in exclude
            and (row.expires_at is None or row.expires_at > now)
        ]
        if len(rows) > max_items or sum(row.size for row in rows) > max_bytes:
            return None
        rows.sort(key=_by_priority)
        return rows

    def _keep_fresh(
        self, batch: Sequence[_WriteRequest], results: Sequence[object]
    ) -> None:
        generation = self._generation
        fresh = self._fresh
        for request, result in zip(batch, results, strict=True):
            if (
                not isinstance(request, _PutRequest)
                or request.held  # fresh since they were held
                or not isinstance(result, list)
            ):
                continue
            for item, outcome in zip(request.items, result, strict=True):
                if outcome is not PutOutcome.STORED:
                    continue
                generation += 1
                fresh.append((generation, _row(item, request.now)))
        if len(fresh) > _FRESH_MAX:
            fresh.clear()
            self._fresh_base = generation

    async def _rewrite(self, fn: Callable[[_Store], _T]) -> _T:
        """Run a job that may delete or change rows (expiry, purge, re-seal).

        Until it is done, and for what puts stored meanwhile,
        :meth:`rows_stored_since` sends the sender to the store, whose reads
        are served after the job.
        """
        self._rewriting += 1
        self._forget_fresh()
        try:
            return await self._call(fn)
        finally:
            self._rewriting -= 1
            self._forget_fresh()

    def _forget_fresh(self) -> None:
        """Rows may have left or changed: later calls must ask the store."""
        self._fresh.clear()
        self._fresh_base = self._generation

    async def next_rows(
        self,
        max_items: int,
        max_bytes: int,
        *,
        exclude: Set[bytes] = frozenset(),
    ) -> tuple[list[OutboxRow], bool]:
        """Like :meth:`next_batch`; also says whether nothing else was sendable.

        Returns:
            The rows, and True if no other sendable row was left behind (by
            ``max_items``, ``max_bytes`` or ``exclude`` aside), so until
            :attr:`generation` changes or ids leave ``exclude`` another call
            would return nothing new.

        Raises:
            ValueError: ``max_items`` < 1.
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed.
        """
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        skip = frozenset(exclude)
        now = self._clock()
        # Held rows as of now: the store has them only if written after
        # this read (which is queued first), so they are added from memory.
        held = list(self._unwritten.values())
        rows, complete = await self._call(
            lambda store: store.next_batch(max_items, max_bytes, skip, now)
        )
        if not held:
            return rows, complete
        return _merge_held(rows, complete, held, max_items, max_bytes, skip, now)

    async def ack(self, ids: Iterable[bytes]) -> int:
        """Delete rows acknowledged by the gateway.

        Call it only after verifying the gateway's signed acknowledgement.

        Args:
            ids: Acknowledged message ids; unknown ids are ignored.

        Returns:
            The number of rows deleted.

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed; nothing was deleted.
        """
        return await self.ack_soon(ids)

    def ack_soon(
        self, ids: Iterable[bytes], *, lazy: bool = False
    ) -> asyncio.Future[int]:
        """Queue the deletion of acknowledged rows; the future gives the count.

        Like :meth:`ack`, without waiting: requests are served in order, so a
        :meth:`next_batch` called after this never returns these rows unless
        ``lazy``. Queued writes share one transaction. With ``lazy`` the
        delete waits up to ``lazy_flush_interval`` for another write to ride
        on; until the future is done, :meth:`next_batch` may still return
        these rows (exclude them), and a crash may keep them (resent, then
        dropped by the gateway as duplicates).

        Held unwritten rows among ``ids`` are dropped from memory at once
        (their puts complete with ``ACKNOWLEDGED``) and counted in the result.

        Raises:
            OutboxClosedError: The outbox is closed.
        """
        if not self._unwritten:
            return self._submit_ids(_IdsOp.ACK, ids, lazy=lazy)
        self._check_open()
        stored: list[bytes] = []
        dropped = 0
        for msg_id in ids:
            entry = self._take_unwritten(msg_id)
            if entry is None or entry.maybe_stored:
                stored.append(msg_id)
            if entry is None:
                continue
            dropped += 1
            entry.acked = True
            _settle(entry, PutOutcome.ACKNOWLEDGED)
        self._acked_unwritten += dropped
        future = self._submit_ids(_IdsOp.ACK, stored, lazy=lazy)
        if not dropped:
            return future
        total: asyncio.Future[int] = self._loop.create_future()

        def add(f: asyncio.Future[int]) -> None:
            if f.cancelled():
                if not total.done():
                    total.cancel()
            elif (exc := f.exception()) is not None:
                _set_exception(total, exc)
            else:
                _set_result(total, f.result() + dropped)

        future.add_done_callback(add)
        return total

    def _submit_ids(
        self, op: _IdsOp, ids: Iterable[bytes], *, lazy: bool = False
    ) -> asyncio.Future[int]:
        self._check_open()
        future: asyncio.Future[int] = self._loop.create_future()
        unique = tuple(dict.fromkeys(ids))
        if not unique:
            future.set_result(0)
        elif lazy:
            self._lazy.append(_IdsRequest(op, unique, future, lazy, time.monotonic()))
            if self._lazy_timer is None:
                self._lazy_timer = self._loop.call_later(
                    self._config.lazy_flush_interval, self._flush_lazy, True
                )
        else:
            self._flush_lazy()
            self._enqueue(_IdsRequest(op, unique, future, lazy))
        return future

    def _flush_lazy(self, due: bool = False) -> None:
        """Queue the lazy writes held on the loop side, ahead of another request.

        ``due`` (their timer fired): nothing came to ride on, so they go as
        ordinary writes instead of waiting again in the worker.
        """
        if self._lazy_timer is not None:
            if not due:
                self._lazy_timer.cancel()
            self._lazy_timer = None
        if not self._lazy:
            return
        held, self._lazy = self._lazy, []
        for request in held:
            if due:
                request.lazy = False
            self._enqueue(request)

    async def rows_with_topic(
        self, topic: str, limit: int = 500
    ) -> list[tuple[bytes, bytes]]:
        """Return ``(msg_id, envelope)`` of up to ``limit`` rows stored under ``topic``.

        Raises:
            OutboxClosedError: The outbox is closed.
        """
        self._write_unwritten()
        return await self._call(lambda store: store.rows_with_topic(topic, limit))

    async def replace_envelopes(
        self, old_topic: str, rows: Sequence[tuple[bytes, bytes, str]]
    ) -> int:
        """Replace the stored bytes of rows still under ``old_topic``, in one commit.

        For rows stored before they could be sealed (the gateway's key was not
        known yet): each ``(msg_id, envelope, topic)`` replaces the row's bytes
        and topic once; from then on the row resends identical bytes.

        Returns:
            How many rows were replaced.

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed; nothing was replaced.
        """
        self._write_unwritten()
        return await self._rewrite(
            lambda store: store.replace_envelopes(old_topic, rows)
        )

    async def purge(self) -> int:
        """Delete every row (the user unpaired the glasses); returns how many.

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed; nothing was deleted.
        """
        self._write_unwritten()
        return await self._rewrite(lambda store: store.purge())

    async def mark_attempt(self, ids: Iterable[bytes]) -> int:
        """Count one more send attempt for each row; call it when sending them.

        Args:
            ids: Message ids just sent; unknown ids are ignored.

        Returns:
            The number of rows updated.

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed.
        """
        return await self.mark_attempt_soon(ids)

    def mark_attempt_soon(
        self, ids: Iterable[bytes], *, lazy: bool = False
    ) -> asyncio.Future[int]:
        """Queue :meth:`mark_attempt` without waiting; the future gives the count.

        With ``lazy`` the mark waits up to ``lazy_flush_interval`` for the next
        put or ack to share its transaction, so until then
        :meth:`next_batch` may return the old count, and a crash may lose it.

        Raises:
            OutboxClosedError: The outbox is closed.
        """
        return self._submit_ids(_IdsOp.MARK, ids, lazy=lazy)

    async def expire(self, now: float | None = None) -> ExpireResult:
        """Apply the expiry policy: drop expired real-time rows and over-age rows.

        Call it periodically (e.g. from the uplink's timer); puts also apply it when
        the outbox is full.

        Args:
            now: Clock time to judge by; defaults to ``clock()``.

        Returns:
            How many rows were dropped, by reason (also added to the counters).

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed; nothing was dropped.
        """
        at = self._clock() if now is None else now
        return await self._rewrite(lambda store: store.expire(at))

    async def stats(self) -> OutboxStats:
        """Return a consistent snapshot of depth, oldest age and counters.

        Raises:
            OutboxClosedError: The outbox is closed.
            OutboxStorageError: SQLite failed.
        """
        now = self._clock()
        stats = await self._call(lambda store: store.stats(now))
        return dataclasses.replace(
            stats,
            unwritten=len(self._unwritten),
            acked_unwritten=self._acked_unwritten,
        )

    async def wait_nonempty(self) -> None:
        """Wait until the outbox holds at least one row (returns at once if it does).

        Raises:
            OutboxClosedError: The outbox is or gets closed.
        """
        self._check_open()
        await self._nonempty.wait()
        self._check_open()

    async def wait_stored(self, after: int) -> int:
        """Wait until a row is newly stored after :attr:`generation` was ``after``.

        The uplink reads ``generation`` before ``next_batch``; if the batch is empty
        it calls ``wait_stored(generation_read)``, which cannot miss a put.

        Args:
            after: A value previously read from :attr:`generation`.

        Returns:
            The new generation.

        Raises:
            OutboxClosedError: The outbox is or gets closed.
        """
        while self._generation <= after:
            self._check_open()
            stored = asyncio.Event()
            unlisten = self.on_stored(stored.set)
            try:
                await stored.wait()
            finally:
                unlisten()
        return self._generation

    def on_stored(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the loop when rows are newly stored, and at close.

        The cheap form of :meth:`wait_stored` for a loop that has other things
        to wake it too: it can wait on one event of its own, set by ``listener``.

        Returns:
            A function that removes the listener.
        """
        self._stored_listeners.append(listener)
        return lambda: self._stored_listeners.remove(listener)

    async def close(self) -> None:
        """Finish queued requests, close the database and stop the worker thread.

        Idempotent. Later calls of other methods raise :class:`OutboxClosedError`.
        """
        if self._closing:
            if not self._closed:
                await asyncio.to_thread(self._thread.join)
            return
        self._write_unwritten()
        self._flush_lazy()
        self._closing = True
        done: asyncio.Future[None] = self._loop.create_future()
        self._enqueue(_Stop(done))
        self._nonempty.set()
        self._call_listeners()
        try:
            await asyncio.shield(done)
        finally:
            await asyncio.to_thread(self._thread.join)
            self._closed = True
            logger.info("outbox closed: %s", self._path)

    # -- event-loop side plumbing ------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise OutboxClosedError("outbox is closed")

    def _enqueue(self, request: _Request) -> None:
        """Hand ``request`` to the worker (loop thread); it completes it once."""
        self._outstanding += 1
        self._requests.put(request)

    def _post(self, done: int, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` on the loop, where ``done`` queued requests end.

        Called from the worker thread; while it serves a request under the
        store lock, held back until the lock is released.
        """
        if self._collecting:
            self._collected.append((done, callback, args))
            return
        try:
            self._loop.call_soon_threadsafe(self._finish, done, callback, args)
        except RuntimeError:  # the loop is closed; nobody is waiting any more
            logger.debug("event loop closed; outbox result dropped")

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """Worker thread: hold the store lock; post what completed after it."""
        self._collecting = True
        try:
            with self._store_lock:
                yield
        finally:
            self._collecting = False
            collected, self._collected = self._collected, []
            for done, callback, args in collected:
                self._post(done, callback, *args)

    def _finish(
        self, done: int, callback: Callable[..., object], args: tuple[object, ...]
    ) -> None:
        self._outstanding -= done
        callback(*args)

    def _observe(self, rows: int, stored: int) -> None:
        """Update the wake-up events after a request completed (loop thread)."""
        self._store_rows = rows
        if rows or self._closing:
            self._nonempty.set()
        else:
            self._nonempty.clear()
        if stored:
            self._generation += stored
            self._call_listeners()

    def _call_listeners(self) -> None:
        for listener in tuple(self._stored_listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail a put or close
                logger.exception("outbox on_stored listener failed")

    def _queue_puts(
        self, items: Sequence[OutboxItem], *, held: bool = False
    ) -> list[asyncio.Future[list[PutOutcome]]]:
        self._check_open()
        for item in items:
            if len(item.envelope) > self._config.max_bytes:
                raise EnvelopeTooLargeError(len(item.envelope), self._config.max_bytes)
        if not items:
            return []
        if not held and self._unwritten:
            # Rows held were put first: they go to the store first, so the
            # store's insertion order stays the put order.
            self._write_unwritten()
        now = self._clock()
        step = self._config.commit_max_batch
        if (
            self._store.inline
            and self._outstanding == 0
            and not self._inline_this_turn
            and len(items) <= step
            and self._store_lock.acquire(blocking=False)
        ):
            try:
                return [
                    self._writing(len(items), self._commit_inline(items, now, held))
                ]
            finally:
                self._store_lock.release()
        futures: list[asyncio.Future[list[PutOutcome]]] = []
        self._flush_lazy()
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            future: asyncio.Future[list[PutOutcome]] = self._loop.create_future()
            self._enqueue(_PutRequest(chunk, now, future, held))
            futures.append(self._writing(len(chunk), future))
        return futures

    def _writing(
        self, rows: int, future: asyncio.Future[list[PutOutcome]]
    ) -> asyncio.Future[list[PutOutcome]]:
        """Count ``rows`` as being written until ``future`` completes."""
        self._rows_writing += rows
        future.add_done_callback(functools.partial(self._rows_written, rows))
        return future

    def _rows_written(self, rows: int, _: asyncio.Future[list[PutOutcome]]) -> None:
        self._rows_writing -= rows

    def _commit_inline(
        self, items: Sequence[OutboxItem], now: float, held: bool = False
    ) -> asyncio.Future[list[PutOutcome]]:
        """Commit a lone put (and the lazy writes held here) on the loop's thread.

        Only while the worker has nothing queued or in hand, at most once per
        loop iteration (a burst goes to the worker, which groups it, and a
        caller putting in a loop still yields). Spares the hand-off to the
        worker and back (two thread wake-ups, the loop's self-pipe), which
        at a low rate cost more than the transaction (docs/benchmarks-history.md).
        """
        self._inline_this_turn = True
        self._loop.call_soon(self._next_turn)
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        future: asyncio.Future[list[PutOutcome]] = self._loop.create_future()
        batch: list[_WriteRequest] = [
            *self._lazy,
            _PutRequest(items, now, future, held),
        ]
        self._lazy = []
        store = self._store
        outcome = self._write_batch(store, batch, len(items))
        if isinstance(outcome, Exception):
            _fail_writes(batch, outcome)
            return future
        store.state.inline_transactions += 1
        if store.checkpoint_due:
            # The worker checkpoints after every job (see _serve); until this
            # one completes, puts go to the worker, so it is queued once.
            self._enqueue(_Job(lambda _: self._post(1, _nothing)))
        self._complete_writes(batch, *outcome)
        return future

    def _next_turn(self) -> None:
        self._inline_this_turn = False

    async def _submit_puts(self, items: Sequence[OutboxItem]) -> list[PutOutcome]:
        futures = self._queue_puts(items)
        outcomes: list[PutOutcome] = []
        for future in futures:
            outcomes.extend(await future)
        return outcomes

    async def _call(self, fn: Callable[[_Store], _T]) -> _T:
        self._check_open()
        self._flush_lazy()
        future: asyncio.Future[_T] = self._loop.create_future()

        def run(store: _Store) -> None:
            try:
                try:
                    result = fn(store)
                except (sqlite3.Error, OSError) as exc:
                    raise _storage_error(exc) from exc
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                self._post(1, _set_exception, future, exc)
                return
            self._post(1, self._complete, future, result, store.state.rows)

        self._enqueue(_Job(run))
        return await future

    def _complete(self, future: asyncio.Future[_T], result: _T, rows: int) -> None:
        self._observe(rows, 0)
        _set_result(future, result)

    def _complete_writes(
        self,
        batch: Sequence[_WriteRequest],
        results: Sequence[object],
        rows: int,
        stored: int,
        dropped: int,
    ) -> None:
        if dropped != self._dropped_seen:  # puts made room by expiring rows
            self._dropped_seen = dropped
            self._forget_fresh()
        if stored:
            self._keep_fresh(batch, results)
        for request, result in zip(batch, results, strict=True):
            future: asyncio.Future[Any] = request.future
            _set_result(future, result)
        self._observe(rows, stored)

    # -- worker thread -------------------------------------------------------------

    def _serve(self, now: float) -> None:
        """Worker thread: open the store, then serve requests in order until stopped."""
        store = self._store
        try:
            try:
                store.open(now)
            except (sqlite3.Error, OSError) as exc:
                raise _storage_error(exc) from exc
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            self._post(0, _set_exception, self._opened, exc)
            return
        self._post(0, self._complete, self._opened, None, store.state.rows)
        carried: _Request | None = None
        while True:
            if carried is not None:
                request = carried
            elif self._held:
                try:
                    request = self._requests.get(
                        timeout=max(0.0, self._held_until - time.monotonic())
                    )
                except queue.Empty:
                    with self._serving():
                        self._write(store, [], 0)  # held lazy writes waited enough
                    continue
            else:
                request = self._requests.get()
            carried = None
            with self._serving():  # an inline commit never overlaps (see there)
                if isinstance(request, _PutRequest | _IdsRequest):
                    carried = self._serve_writes(store, request)
                elif isinstance(request, _Job):
                    if self._held and time.monotonic() >= self._held_until:
                        self._write(store, [], 0)  # due before this read
                    request.run(store)
                    store.checkpoint_if_due()  # after purges, re-seals, inline puts
                else:
                    if self._held:
                        self._write(store, [], 0)  # lazy writes still held
                    try:
                        store.close()
                    except sqlite3.Error as exc:
                        error = _storage_error(exc)
                        self._post(1, _set_exception, request.future, error)
                    else:
                        self._post(1, _set_result, request.future, None)
                    return

    def _serve_writes(self, store: _Store, first: _WriteRequest) -> _Request | None:
        """Gather queued writes into one transaction; return a read met meanwhile.

        Puts wait up to ``commit_interval`` for more puts (group commit) while
        puts come faster than transactions (the last one carried several);
        otherwise, and for acks and attempt marks, only what is already
        queued is taken.
        """
        config = self._config
        batch: list[_WriteRequest] = [first]
        count = len(first.items) if isinstance(first, _PutRequest) else 0
        waits = isinstance(first, _PutRequest) and self._grouping
        carried: _Request | None = None
        deadline = time.monotonic() + config.commit_interval
        while count < config.commit_max_batch and len(batch) < _MAX_WRITES:
            timeout = deadline - time.monotonic() if waits else 0.0
            try:
                if timeout > 0:
                    request = self._requests.get(timeout=timeout)
                else:
                    request = self._requests.get_nowait()
            except queue.Empty:
                break
            if isinstance(request, _PutRequest):
                count += len(request.items)
                waits = self._grouping
            elif not isinstance(request, _IdsRequest):
                carried = request
                break
            batch.append(request)
        if all(isinstance(r, _IdsRequest) and r.lazy for r in batch):
            # Held for the next transaction, at most lazy_flush_interval after
            # the first of them and at most _MAX_WRITES of them.
            if not self._held:
                # From when the first was submitted: time held on the loop
                # side counts (lazy_flush_interval is the longest wait).
                first_since = min(
                    (r.since for r in batch if isinstance(r, _IdsRequest) and r.since),
                    default=time.monotonic(),
                )
                self._held_until = first_since + config.lazy_flush_interval
            self._held.extend(batch)
            if len(self._held) < _MAX_WRITES and time.monotonic() < self._held_until:
                return carried
            batch = []
        puts = sum(isinstance(r, _PutRequest) for r in batch)
        if puts:
            self._grouping = puts > 1
        self._write(store, batch, count)
        return carried

    def _write(self, store: _Store, batch: list[_WriteRequest], count: int) -> None:
        """Commit ``batch`` after any held lazy writes, in one transaction."""
        if self._held:
            batch = [*self._held, *batch]
            self._held.clear()
        outcome = self._write_batch(store, batch, count)
        if isinstance(outcome, Exception):
            self._post(len(batch), _fail_writes, batch, outcome)
            return
        self._post(len(batch), self._complete_writes, batch, *outcome)
        store.checkpoint_if_due()

    def _write_batch(
        self, store: _Store, batch: Sequence[_WriteRequest], count: int
    ) -> tuple[list[object], int, int, int] | Exception:
        """Commit ``batch``; return what :meth:`_complete_writes` takes after it.

        That is (results, rows, stored, dropped), or the error for every
        request of the batch (:func:`_fail_writes`).
        """
        started = time.perf_counter()
        try:
            try:
                results = store.write_batch(batch)
            except (sqlite3.Error, OSError) as exc:
                raise _storage_error(exc) from exc
        except Exception as exc:  # handed to the awaiting callers
            logger.exception("outbox group commit of %d rows failed", count)
            return exc
        if self._debug:
            logger.debug(
                "committed %d new rows from %d writes in %.2f ms",
                count,
                len(batch),
                (time.perf_counter() - started) * 1e3,
            )
        stored = sum(
            o is PutOutcome.STORED
            for outcomes in results
            if isinstance(outcomes, list)
            for o in outcomes
        )
        st = store.state
        return results, st.rows, stored, st.dropped_expired + st.dropped_age
