"""Tests of relay.outbox: order, idempotence, limits, group commit, crash recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import relay
from relay.outbox import (
    _CHECKPOINT_BYTES,
    _CHECKPOINT_COMMITS,
    EnvelopeTooLargeError,
    ExpireResult,
    Outbox,
    OutboxClosedError,
    OutboxConfig,
    OutboxFullError,
    OutboxItem,
    OutboxStorageError,
    Priority,
    PutOutcome,
    Synchronous,
)

T0 = 1_700_000_000.0
REPO_ROOT = Path(relay.__file__).resolve().parent.parent


class FakeClock:
    """Wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def item(
    n: int,
    *,
    priority: int = Priority.NORMAL,
    size: int = 10,
    realtime: bool = False,
    expires_at: float | None = None,
) -> OutboxItem:
    return OutboxItem(
        msg_id=mid(n),
        envelope=bytes([n % 256]) * size,
        topic=f"d/1/up/{n}",
        priority=priority,
        realtime=realtime,
        expires_at=expires_at,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
async def outbox(db: Path, clock: FakeClock) -> AsyncIterator[Outbox]:
    config = OutboxConfig(commit_interval=0)
    async with await Outbox.open(db, config, clock=clock) as ob:
        yield ob


def file_mode(path: Path) -> int | None:
    """Permission bits of ``path``, None if it does not exist (run off the loop)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def make_loose_file(path: Path) -> None:
    path.touch()
    path.chmod(0o644)


async def all_ids(ob: Outbox) -> list[bytes]:
    return [row.msg_id for row in await ob.next_batch(10**6, 10**9)]


async def test_priority_then_insertion_order_and_ack(outbox: Outbox) -> None:
    prios = [2, 1, 0, 2, 1, 0, 1]
    for n, prio in enumerate(prios):
        assert await outbox.put(item(n, priority=prio))
    rows = await outbox.next_batch(100, 10**6)
    assert [r.msg_id for r in rows] == [mid(n) for n in (2, 5, 1, 4, 6, 0, 3)]
    first = rows[0]
    assert first.priority == 0
    assert first.topic == "d/1/up/2"
    assert first.envelope == bytes([2]) * 10
    assert first.size == 10
    assert first.created_at == T0
    assert first.attempts == 0
    assert not first.realtime
    assert first.expires_at is None

    assert await outbox.ack([mid(2), mid(5), mid(99), mid(2)]) == 2
    assert await outbox.ack([]) == 0
    assert await all_ids(outbox) == [mid(n) for n in (1, 4, 6, 0, 3)]
    stats = await outbox.stats()
    assert (stats.rows, stats.total_bytes, stats.acked) == (5, 50, 2)


async def test_next_batch_limits_and_exclude(outbox: Outbox) -> None:
    for n in range(6):
        await outbox.put(item(n, size=100))
    assert [r.msg_id for r in await outbox.next_batch(2, 10**6)] == [mid(0), mid(1)]
    # Byte budget stops before the first row that would exceed it.
    assert len(await outbox.next_batch(10, 250)) == 2
    # An oversized first row is still returned, alone.
    assert [r.msg_id for r in await outbox.next_batch(10, 1)] == [mid(0)]
    inflight = {mid(0), mid(2)}
    rows = await outbox.next_batch(3, 10**6, exclude=inflight)
    assert [r.msg_id for r in rows] == [mid(1), mid(3), mid(4)]
    all_six = {mid(n) for n in range(6)}
    assert await outbox.next_batch(10, 10**6, exclude=all_six) == []
    with pytest.raises(ValueError, match="max_items"):
        await outbox.next_batch(0, 10)


async def test_mark_attempt(outbox: Outbox) -> None:
    await outbox.put_many([item(1), item(2)])
    assert await outbox.mark_attempt([mid(1), mid(1), mid(7)]) == 1
    assert await outbox.mark_attempt([mid(1), mid(2)]) == 2
    assert await outbox.mark_attempt([]) == 0
    rows = {r.msg_id: r.attempts for r in await outbox.next_batch(10, 10**6)}
    assert rows == {mid(1): 2, mid(2): 1}


async def test_queued_puts_acks_and_marks_share_one_transaction(
    db: Path, clock: FakeClock
) -> None:
    # The worker's batching (a lone put would otherwise commit inline).
    config = OutboxConfig(commit_interval=0.05, inline_commit=False)
    async with await Outbox.open(db, config, clock=clock) as ob:
        await ob.put_many([item(1), item(2)])
        before = (await ob.stats()).transactions
        # Queued back to back, none awaited before the next: one commit.
        put = ob.put_soon(item(3))
        ack = ob.ack_soon([mid(1)])
        mark = ob.mark_attempt_soon([mid(2)])
        assert await put is PutOutcome.STORED
        assert await ack == 1
        assert await mark == 1
        assert (await ob.stats()).transactions == before + 1
        rows = {r.msg_id: r.attempts for r in await ob.next_batch(10, 10**6)}
        assert rows == {mid(2): 1, mid(3): 0}


async def test_lazy_marks_wait_for_the_next_write_or_close(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, lazy_flush_interval=10)
    async with await Outbox.open(db, config) as ob:
        await ob.put_many([item(1), item(2)])
        before = (await ob.stats()).transactions
        lazy = ob.mark_attempt_soon([mid(1)], lazy=True)
        await ob.next_batch(10, 10**6)  # served after the mark: it stays held
        assert not lazy.done()
        assert (await ob.stats()).transactions == before
        assert await ob.ack([mid(2)]) == 1  # the next write carries it
        assert await lazy == 1
        assert (await ob.stats()).transactions == before + 1
        held = ob.mark_attempt_soon([mid(1)], lazy=True)
    assert await held == 1  # written at close
    async with await Outbox.open(db, config) as ob:
        (row,) = await ob.next_batch(10, 10**6)
        assert row.attempts == 2


async def test_next_rows_says_whether_anything_was_left(outbox: Outbox) -> None:
    await outbox.put_many([item(1, size=100), item(2, size=100), item(3, size=100)])
    rows, complete = await outbox.next_rows(2, 10**6)
    assert ([r.msg_id for r in rows], complete) == ([mid(1), mid(2)], False)
    rows, complete = await outbox.next_rows(3, 10**6)
    assert (len(rows), complete) == (3, True)
    rows, complete = await outbox.next_rows(10, 150)  # cut by bytes
    assert (len(rows), complete) == (1, False)
    rows, complete = await outbox.next_rows(10, 10**6, exclude={mid(1), mid(3)})
    assert ([r.msg_id for r in rows], complete) == ([mid(2)], True)


async def test_a_lazy_ack_waits_at_most_the_flush_interval(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, lazy_flush_interval=0.05)
    async with await Outbox.open(db, config) as ob:
        await ob.put_many([item(1), item(2)])
        before = (await ob.stats()).transactions
        lazy = ob.ack_soon([mid(1)], lazy=True)
        # Nothing else is written: it gets its own transaction, soon.
        async with asyncio.timeout(5):
            assert await lazy == 1
        assert (await ob.stats()).transactions == before + 1
        assert [r.msg_id for r in await ob.next_batch(10, 10**6)] == [mid(2)]


async def test_duplicate_put_is_idempotent(outbox: Outbox) -> None:
    assert await outbox.put(item(1, priority=2)) is True
    changed = OutboxItem(mid(1), b"other", "other/topic", priority=0)
    assert await outbox.put(changed) is False
    rows = await outbox.next_batch(10, 10**6)
    assert len(rows) == 1
    assert (rows[0].envelope, rows[0].priority) == (bytes([1]) * 10, 2)
    # Concurrent duplicates in one group commit: exactly one is stored.
    results = await asyncio.gather(*(outbox.put(item(5)) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    outcomes = await outbox.put_many([item(6), item(6), item(1)])
    assert outcomes == [PutOutcome.STORED, PutOutcome.DUPLICATE, PutOutcome.DUPLICATE]
    stats = await outbox.stats()
    assert (stats.rows, stats.stored, stats.duplicates) == (3, 3, 12)


async def test_realtime_expiry_is_counted(outbox: Outbox, clock: FakeClock) -> None:
    await outbox.put(item(1, realtime=True, expires_at=T0 + 1))
    await outbox.put(item(2, realtime=True, expires_at=T0 + 5))
    await outbox.put(item(3, realtime=True))  # real-time without a deadline
    await outbox.put(item(4))
    clock.now = T0 + 2
    # Expired rows are no longer offered, even before expire() runs.
    assert await all_ids(outbox) == [mid(2), mid(3), mid(4)]
    assert await outbox.expire() == ExpireResult(expired=1, aged=0)
    assert await outbox.expire(T0 + 5) == ExpireResult(expired=1, aged=0)
    assert await all_ids(outbox) == [mid(3), mid(4)]
    stats = await outbox.stats()
    assert (stats.rows, stats.total_bytes, stats.dropped_expired) == (2, 20, 2)
    assert stats.dropped_age == 0


async def test_age_cap(db: Path, clock: FakeClock) -> None:
    config = OutboxConfig(max_age_s=100.0, max_rows=2, commit_interval=0)
    async with await Outbox.open(db, config, clock=clock) as ob:
        await ob.put(item(1))
        clock.now = T0 + 50
        await ob.put(item(2))
        clock.now = T0 + 101
        assert await all_ids(ob) == [mid(2)]  # over-age rows are not offered
        # Full (2 rows): the put applies the policy and drops only the aged row.
        assert await ob.put(item(3))
        assert await all_ids(ob) == [mid(2), mid(3)]
        stats = await ob.stats()
        assert (stats.dropped_age, stats.dropped_expired, stats.rows) == (1, 0, 2)
        assert stats.oldest_age_s == pytest.approx(51.0)
    # The policy also runs at open.
    clock.now = T0 + 1000
    async with await Outbox.open(db, config, clock=clock) as ob:
        stats = await ob.stats()
        assert (stats.rows, stats.dropped_age, stats.oldest_age_s) == (0, 2, None)


async def test_full_refuses_and_never_drops_acknowledged_rows(
    db: Path, clock: FakeClock
) -> None:
    config = OutboxConfig(max_rows=3, commit_interval=0)
    async with await Outbox.open(db, config, clock=clock) as ob:
        for n in (1, 2, 3):
            assert await ob.put(item(n, priority=Priority.TELEMETRY))
        with pytest.raises(OutboxFullError) as refused:
            await ob.put(item(4, priority=Priority.INTERACTIVE))
        assert refused.value.msg_id == mid(4)
        assert not refused.value.realtime
        # A resend of a stored row is still recognised (and may be acknowledged).
        assert await ob.put(item(2)) is False
        with pytest.raises(OutboxFullError) as dropped:
            await ob.put(item(5, realtime=True, expires_at=T0 + 10))
        assert dropped.value.realtime
        outcomes = await ob.put_many([item(6), item(1), item(7, realtime=True)])
        assert outcomes == [
            PutOutcome.REFUSED_FULL,
            PutOutcome.DUPLICATE,
            PutOutcome.DROPPED_REALTIME,
        ]
        assert await all_ids(ob) == [mid(1), mid(2), mid(3)]
        stats = await ob.stats()
        assert (stats.refused_full, stats.dropped_realtime_full) == (2, 2)
        assert (stats.dropped_expired, stats.dropped_age, stats.rows) == (0, 0, 3)
        # Room again after an ack.
        assert await ob.ack([mid(1)]) == 1
        assert await ob.put(item(4, priority=Priority.INTERACTIVE))


async def test_full_drops_expired_realtime_rows_first(
    db: Path, clock: FakeClock
) -> None:
    config = OutboxConfig(max_bytes=300, commit_interval=0)
    async with await Outbox.open(db, config, clock=clock) as ob:
        await ob.put(item(1, size=100, realtime=True, expires_at=T0 + 1))
        await ob.put(item(2, size=100, realtime=True, expires_at=T0 + 60))
        await ob.put(item(3, size=100))
        with pytest.raises(OutboxFullError):
            await ob.put(item(4, size=100))  # nothing has expired yet
        clock.now = T0 + 2
        assert await ob.put(item(4, size=100))
        assert await all_ids(ob) == [mid(2), mid(3), mid(4)]
        stats = await ob.stats()
        assert (stats.rows, stats.total_bytes) == (3, 300)
        assert (stats.dropped_expired, stats.refused_full) == (1, 1)
        with pytest.raises(EnvelopeTooLargeError):
            await ob.put(item(9, size=301))


async def test_stats_snapshot(outbox: Outbox, clock: FakeClock) -> None:
    empty = await outbox.stats()
    assert (empty.rows, empty.total_bytes, empty.oldest_age_s) == (0, 0, None)
    await outbox.put(item(1, size=7))
    clock.now = T0 + 30
    await outbox.put(item(2, size=5))
    clock.now = T0 + 45
    stats = await outbox.stats()
    assert (stats.rows, stats.total_bytes, stats.stored) == (2, 12, 2)
    assert stats.oldest_age_s == pytest.approx(45.0)
    with pytest.raises(AttributeError):
        stats.rows = 0  # type: ignore[misc]


async def test_group_commit_shares_transactions(db: Path) -> None:
    config = OutboxConfig(commit_interval=0.005, commit_max_batch=64)
    async with await Outbox.open(db, config) as ob:
        before = await ob.stats()
        results = await asyncio.gather(*(ob.put(item(n)) for n in range(300)))
        assert all(results)
        after = await ob.stats()
        commits = after.put_transactions - before.put_transactions
        assert 300 // 64 < commits < 300 // 4, commits
        assert after.transactions - before.transactions == commits
        assert after.rows == 300
        # put_many splits by commit_max_batch.
        outcomes = await ob.put_many(item(n) for n in range(1000, 1200))
        assert outcomes == [PutOutcome.STORED] * 200
        final = await ob.stats()
        assert final.put_transactions - after.put_transactions == 4  # 64+64+64+8


async def test_on_stored_calls_listeners_for_new_rows_and_at_close(
    outbox: Outbox,
) -> None:
    calls: list[int] = []
    unlisten = outbox.on_stored(lambda: calls.append(outbox.generation))
    other: list[int] = []
    outbox.on_stored(lambda: other.append(1))
    await outbox.put(item(1))
    assert calls == [1]  # after the generation moved
    await outbox.put(item(1))  # a duplicate stores nothing
    assert calls == [1]
    unlisten()
    await outbox.put(item(2))
    assert calls == [1]
    assert other == [1, 1]
    await outbox.close()
    assert other == [1, 1, 1]


async def test_wait_nonempty_and_wait_stored(outbox: Outbox) -> None:
    waiter = asyncio.ensure_future(outbox.wait_nonempty())
    gen = outbox.generation
    stored = asyncio.ensure_future(outbox.wait_stored(gen))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert not stored.done()
    await outbox.put(item(1))
    async with asyncio.timeout(2):
        await waiter
        assert await stored == gen + 1
    # A duplicate stores nothing: wait_stored keeps waiting.
    again = asyncio.ensure_future(outbox.wait_stored(outbox.generation))
    await outbox.put(item(1))
    await asyncio.sleep(0)
    assert not again.done()
    await outbox.ack([mid(1)])
    emptied = asyncio.ensure_future(outbox.wait_nonempty())
    await asyncio.sleep(0)
    assert not emptied.done()
    await outbox.close()
    async with asyncio.timeout(2):
        for task in (again, emptied):
            with pytest.raises(OutboxClosedError):
                await task


async def test_reopen_keeps_rows_and_order(db: Path, clock: FakeClock) -> None:
    config = OutboxConfig(commit_interval=0, synchronous=Synchronous.FULL)
    async with await Outbox.open(db, config, clock=clock) as ob:
        await ob.put_many([item(1), item(2, priority=0), item(3)])
        await ob.mark_attempt([mid(3)])
    async with await Outbox.open(db, config, clock=clock) as ob:
        async with asyncio.timeout(1):
            await ob.wait_nonempty()
        rows = await ob.next_batch(10, 10**6)
        assert [r.msg_id for r in rows] == [mid(2), mid(1), mid(3)]
        assert rows[2].attempts == 1
        await ob.ack([mid(3)])
        await ob.put(item(4))
        assert await all_ids(ob) == [mid(2), mid(1), mid(4)]
        stats = await ob.stats()
        assert (stats.rows, stats.total_bytes) == (3, 30)


async def test_file_mode_is_0600(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    async with await Outbox.open(db) as ob:
        await ob.put(item(1))
        for path in (db, tmp_path / "outbox.sqlite3-wal"):
            assert await asyncio.to_thread(file_mode, path) == 0o600, path
    # A file created too open is tightened at open.
    loose = tmp_path / "loose.sqlite3"
    await asyncio.to_thread(make_loose_file, loose)
    assert await asyncio.to_thread(file_mode, loose) == 0o644
    async with await Outbox.open(loose):
        assert await asyncio.to_thread(file_mode, loose) == 0o600


async def test_open_needs_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(OutboxStorageError) as raised:
        await Outbox.open(tmp_path / "missing" / "outbox.sqlite3")
    assert isinstance(raised.value.__cause__, FileNotFoundError)


async def test_close_is_clean_and_idempotent(db: Path) -> None:
    ob = await Outbox.open(db)
    pending = [asyncio.ensure_future(ob.put(item(n))) for n in range(5)]
    await asyncio.sleep(0)
    await ob.close()
    assert all(task.result() for task in pending)  # queued puts finished first
    await ob.close()
    with pytest.raises(OutboxClosedError):
        await ob.put(item(9))
    with pytest.raises(OutboxClosedError):
        await ob.stats()
    # The WAL was checkpointed and removed by the last connection.
    assert await asyncio.to_thread(file_mode, db.with_name(db.name + "-wal")) is None
    async with await Outbox.open(db) as again:
        assert len(await all_ids(again)) == 5


def test_item_validation() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        OutboxItem(b"short", b"x", "t")
    with pytest.raises(ValueError, match="priority"):
        OutboxItem(mid(1), b"x", "t", priority=256)
    with pytest.raises(ValueError, match="real-time"):
        OutboxItem(mid(1), b"x", "t", expires_at=T0)
    assert "secret" not in repr(OutboxItem(mid(1), b"secret", "t"))
    with pytest.raises(ValueError, match="max_age_s"):
        OutboxConfig(max_age_s=0)
    with pytest.raises(ValueError, match="max_rows"):
        OutboxConfig(max_rows=0)
    with pytest.raises(ValueError, match="OFF"):
        OutboxConfig(synchronous="OFF")  # type: ignore[arg-type]


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from relay.outbox import Outbox, OutboxConfig, OutboxItem

    async def producer(ob, start, step):
        for n in range(start, 10**6, step):
            await ob.put(OutboxItem(n.to_bytes(16, "big"), b"e" * 200, "t"))
            sys.stdout.write(f"{n}\\n")
            sys.stdout.flush()

    async def main():
        ob = await Outbox.open(sys.argv[1], OutboxConfig())
        await asyncio.gather(*(producer(ob, i, 16) for i in range(16)))

    asyncio.run(main())
    """
)


async def test_crash_recovery_after_sigkill(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_SCRIPT,
        str(db),
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    printed: list[int] = []
    try:
        async with asyncio.timeout(10):
            while len(printed) < 500:
                line = await proc.stdout.readline()
                assert line, "producer exited early"
                printed.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed.extend(int(line) for line in rest.split())
    async with await Outbox.open(db) as ob:
        present = set(await all_ids(ob))
    missing = [n for n in printed if mid(n) not in present]
    assert not missing, f"{len(missing)} acknowledged rows lost"
    assert len(present) >= len(printed)


async def test_open_cancelled_midway_stops_the_worker(db: Path) -> None:
    task = asyncio.ensure_future(Outbox.open(db))
    await asyncio.sleep(0)
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task
    async with await Outbox.open(db) as ob:  # the file is usable afterwards
        assert await ob.put(item(1))


async def test_cloud_link_applies_expiry_with_no_uplink(
    tmp_path: Path, outbox: Outbox, clock: FakeClock
) -> None:
    """Expired real-time rows leave the outbox on the cloud link's timer, with no
    put and no uplink (they would otherwise sit there, never sent, forever)."""
    from relay.cloudlink import CloudConfig, CloudLink
    from relay.identity import PhoneIdentity

    await outbox.put(item(1, realtime=True, expires_at=T0 + 1))
    await outbox.put(item(2))
    link = CloudLink(
        PhoneIdentity(tmp_path / "state"),
        outbox,
        None,
        lambda message: None,
        config=CloudConfig(expire_every=0.01, key_poll=0.01),
    )
    task = asyncio.create_task(link.run())
    try:
        clock.now = T0 + 2
        for _ in range(1000):  # 10 s at most
            if (await outbox.stats()).rows == 1:
                break
            await asyncio.sleep(0.01)
        stats = await outbox.stats()
        assert (stats.dropped_expired, await all_ids(outbox)) == (1, [mid(2)])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("epoch_messages", "kind"), [(2, 0x13), (0, 0x11)])
async def test_cloud_link_seals_under_epoch_keys_unless_told_not_to(
    tmp_path: Path, outbox: Outbox, epoch_messages: int, kind: int
) -> None:
    """What the outbox stores: epoch envelopes (one HPKE seal and signature per
    epoch) by default, per-message ones with ``epoch_messages = 0``; both open."""
    from protocol.cloud import GatewayRecord
    from protocol.constants import MessageKind
    from protocol.envelope import (
        DeviceKeys,
        EpochKeyCache,
        GatewayKeys,
        open_uplink,
    )
    from protocol.message import Message
    from relay.cloudlink import CloudConfig, CloudLink
    from relay.identity import PhoneIdentity

    identity = PhoneIdentity(tmp_path / "state")
    gateway = GatewayKeys.generate()
    public = gateway.public()
    (tmp_path / "gateway.json").write_text(
        GatewayRecord(3, public.encryption, public.verify).encode()
    )
    link = CloudLink(
        identity,
        outbox,
        None,
        lambda message: None,
        gateway_key_file=tmp_path / "gateway.json",
        config=CloudConfig(epoch_messages=epoch_messages),
    )
    sent = [
        Message(MessageKind.EVENT, os.urandom(16), b"tick %d" % n) for n in range(5)
    ]
    for message in sent:
        assert await link.put(message, Priority.NORMAL) is PutOutcome.STORED
    rows = await outbox.next_batch(10, 10**6)
    assert [row.envelope[1] for row in rows] == [kind] * 5
    device: DeviceKeys = identity.device_keys
    cache = EpochKeyCache()
    opened = [
        open_uplink(
            row.envelope,
            topic=row.topic,
            device_id=identity.device_id,
            gateway_keys={3: gateway},
            device=device.public(),
            epochs=cache,
        )
        for row in rows
    ]
    assert opened == [m.encode() for m in sent]
    assert cache.opened == (3 if epoch_messages else 0)


async def test_lazy_writes_are_not_held_past_the_interval_by_reads(db: Path) -> None:
    """Reads keep coming (a pump draining a backlog) and no put: the held
    delete is still written within lazy_flush_interval, not held forever."""
    config = OutboxConfig(commit_interval=0, lazy_flush_interval=0.05)
    async with await Outbox.open(db, config) as ob:
        await ob.put_many([item(1), item(2)])
        lazy = ob.ack_soon([mid(1)], lazy=True)
        async with asyncio.timeout(5):
            while not lazy.done():
                await ob.next_batch(10, 10**6)  # back to back, well under 50 ms
        assert await lazy == 1
    config = OutboxConfig(commit_interval=0, lazy_flush_interval=0)
    async with await Outbox.open(db, config) as ob:
        lazy = ob.ack_soon([mid(2)], lazy=True)
        await ob.next_batch(10, 10**6)  # 0: written before the read
        assert lazy.done()
        assert await lazy == 1


async def test_rows_stored_since_hands_new_rows_from_memory(
    outbox: Outbox, clock: FakeClock
) -> None:
    await outbox.put_many([item(1), item(2)])
    _, complete = await outbox.next_rows(10, 10**6)
    assert complete
    drained = outbox.generation
    assert outbox.rows_stored_since(drained, 10, 10**6) == []
    await outbox.put_many(
        [item(3, priority=2), item(4, priority=0), item(5, priority=2), item(1)]
    )  # item 1 is a duplicate: not new
    fresh = outbox.rows_stored_since(drained, 10, 10**6, exclude={mid(5)})
    assert fresh is not None
    assert [r.msg_id for r in fresh] == [mid(4), mid(3)]  # as next_rows orders
    stored = {r.msg_id: r for r in await outbox.next_batch(10, 10**6)}
    assert all(row == stored[row.msg_id] for row in fresh)
    # What does not fit the limits, or lies before what it kept: ask the store.
    assert outbox.rows_stored_since(drained, 2, 10**6) is None
    assert outbox.rows_stored_since(drained, 10, 25) is None
    assert outbox.rows_stored_since(drained - 1, 10, 10**6) is None  # handed out
    later = outbox.generation
    assert outbox.rows_stored_since(later, 10, 10**6) == []
    assert outbox.rows_stored_since(drained, 10, 10**6) is None  # pruned
    # An expired real-time row is left out, as the store's query leaves it.
    await outbox.put(item(6, realtime=True, expires_at=clock.now + 1))
    clock.now += 2
    assert outbox.rows_stored_since(later, 10, 10**6) == []


async def test_rows_stored_since_says_ask_the_store_after_rows_left(
    outbox: Outbox, clock: FakeClock
) -> None:
    drained = outbox.generation
    await outbox.put(item(1, realtime=True, expires_at=clock.now + 1))
    clock.now += 2
    assert (await outbox.expire()).expired == 1
    assert outbox.rows_stored_since(drained, 10, 10**6) is None
    drained = outbox.generation
    await outbox.put(item(2))
    assert await outbox.purge() == 1
    assert outbox.rows_stored_since(drained, 10, 10**6) is None
    # More rows than it keeps in memory.
    drained = outbox.generation
    await outbox.put_many([item(n) for n in range(10, 10 + 257)])
    assert outbox.rows_stored_since(drained, 10**4, 10**9) is None
    drained = outbox.generation
    await outbox.put(item(5))
    fresh = outbox.rows_stored_since(drained, 10, 10**6)
    assert fresh is not None
    assert [r.msg_id for r in fresh] == [mid(5)]


@pytest.mark.parametrize("inline", [False, True])
async def test_a_lone_put_commits_without_waiting_for_company(
    db: Path, inline: bool
) -> None:
    """At a slow steady rate the group-commit wait would only add latency: a
    put that finds no other queued commits at once, even with a long
    commit_interval; puts that come together still share a transaction
    (with inline commits, all but the first: it found the worker idle)."""
    config = OutboxConfig(commit_interval=1.0, inline_commit=inline)
    async with await Outbox.open(db, config) as ob:
        async with asyncio.timeout(0.9):  # each would wait 1 s before
            for n in range(3):
                assert await ob.put(item(n))
        before = (await ob.stats()).put_transactions
        futures = [ob.put_soon(item(n)) for n in range(10, 14)]
        assert await asyncio.gather(*futures) == [PutOutcome.STORED] * 4
        assert (await ob.stats()).put_transactions == before + 1 + inline
        order = [item(n).msg_id for n in (0, 1, 2, 10, 11, 12, 13)]
        assert await all_ids(ob) == order


async def test_time_a_lazy_write_waits_on_the_loop_side_counts(db: Path) -> None:
    """lazy_flush_interval bounds the whole wait: a lazy write queued to the
    worker by a read late in its interval is not held a second interval."""
    interval = 0.5
    config = OutboxConfig(commit_interval=0, lazy_flush_interval=interval)
    async with await Outbox.open(db, config) as ob:
        await ob.put_many([item(1), item(2)])
        loop = asyncio.get_running_loop()
        started = loop.time()
        lazy = ob.ack_soon([mid(1)], lazy=True)
        await asyncio.sleep(0.8 * interval)  # held on the loop side meanwhile
        async with asyncio.timeout(5):
            while not lazy.done():
                await ob.next_batch(10, 10**6)  # reads carry it to the worker
        assert await lazy == 1
        # Held twice it would come at 1.8 intervals.
        assert loop.time() - started < 1.5 * interval


def rows_on_disk(db: Path) -> int:
    """Rows a second connection sees: what has committed, whoever committed it."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(count)


async def test_a_lone_put_commits_inline_with_the_lazy_writes_it_carries(
    db: Path,
) -> None:
    """With synchronous=NORMAL a put that finds the worker idle commits on the
    loop's thread before put_soon returns, taking the lazy writes held on the
    loop side into its transaction; FULL, or inline_commit=False, never do."""
    async with await Outbox.open(db, OutboxConfig(lazy_flush_interval=10)) as ob:
        assert await ob.put(item(1))
        await asyncio.sleep(0)  # a new loop iteration
        before = (await ob.stats()).transactions
        await asyncio.sleep(0)
        inline_before = ob._store.state.inline_transactions
        mark = ob.mark_attempt_soon([mid(1)], lazy=True)
        put = ob.put_soon(item(2))
        assert ob._store.state.inline_transactions == inline_before + 1
        assert rows_on_disk(db) == 2  # committed already, not awaited
        assert await put is PutOutcome.STORED
        assert await mark == 1
        assert (await ob.stats()).transactions == before + 1
        rows = {r.msg_id: r.attempts for r in await ob.next_batch(10, 10**6)}
        assert rows == {mid(1): 1, mid(2): 0}
    for config in (
        OutboxConfig(synchronous=Synchronous.FULL),
        OutboxConfig(inline_commit=False),
    ):
        async with await Outbox.open(db, config) as ob:
            assert not ob._store.inline
            assert await ob.put(item(3 + config.inline_commit))
            assert ob._store.state.inline_transactions == 0  # the worker did


async def test_a_put_behind_queued_work_waits_its_turn_in_order(db: Path) -> None:
    """While the worker has a request, a put goes to it too: order is kept."""
    async with await Outbox.open(db, OutboxConfig(commit_interval=0)) as ob:
        await ob.put_many([item(1), item(2)])
        await asyncio.sleep(0)
        ack = ob.ack_soon([mid(1)])  # queued to the worker, not yet done
        puts = [ob.put_soon(item(n)) for n in (3, 4)]
        assert ob._outstanding == 3  # all with the worker
        outcomes = await asyncio.gather(ack, *puts)
        assert outcomes == [1, PutOutcome.STORED, PutOutcome.STORED]
        assert await all_ids(ob) == [mid(2), mid(3), mid(4)]


async def test_inline_commits_leave_wal_checkpoints_to_the_worker(db: Path) -> None:
    """SQLite's automatic checkpoint is off with inline commits (it would run
    on the loop's thread); the worker checkpoints every _CHECKPOINT_COMMITS."""
    async with await Outbox.open(db, OutboxConfig(commit_interval=0)) as ob:
        for n in range(2 * _CHECKPOINT_COMMITS + 2):
            assert await ob.put(item(n))
            await asyncio.sleep(0)
        await ob.stats()  # served after any checkpoint queued before it
        state = ob._store.state
        assert state.inline_transactions > _CHECKPOINT_COMMITS
        assert state.checkpoints >= 1
        assert ob._store.commits_since_checkpoint < _CHECKPOINT_COMMITS + 2
        (auto,) = ob._store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert auto == 0
        # Large envelopes: a checkpoint after _CHECKPOINT_BYTES, not 64 commits.
        before = state.checkpoints
        size = _CHECKPOINT_BYTES // 3 + 1
        for n in range(1000, 1004):
            assert await ob.put(item(n, size=size))
            await asyncio.sleep(0)
        await ob.stats()
        assert ob._store.state.checkpoints > before


async def test_a_failing_stored_listener_does_not_fail_the_put(db: Path) -> None:
    async with await Outbox.open(db) as ob:

        def buggy() -> None:
            raise RuntimeError("a listener's bug")

        ob.on_stored(buggy)
        lazy = ob.ack_soon([mid(9)], lazy=True)
        assert await ob.put(item(1))  # inline: the listener runs in the put
        assert await ob.put_many([item(2), item(3)]) == [PutOutcome.STORED] * 2
        assert await lazy == 0  # what rode with the put still completed


# -- rows held unwritten (write_delay) -------------------------------------------


async def test_a_held_row_acked_in_time_is_never_written(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=5.0)
    async with await Outbox.open(db, config) as ob:
        before = (await ob.stats()).transactions
        drained = ob.generation
        put = ob.put_soon(item(1), hold=True)
        assert ob.holds(mid(1))
        # Sendable at once, from memory, as a stored row would be.
        fresh = ob.rows_stored_since(drained, 10, 10**6)
        assert fresh is not None
        assert [r.msg_id for r in fresh] == [mid(1)]
        assert await ob.ack([mid(1)]) == 1
        assert await put is PutOutcome.ACKNOWLEDGED
        assert not ob.holds(mid(1))
        stats = await ob.stats()
        assert (stats.rows, stats.stored, stats.acked) == (0, 0, 0)
        assert stats.transactions == before  # no insert, no delete
        assert (stats.unwritten, stats.acked_unwritten) == (0, 1)
    async with await Outbox.open(db, config) as ob:
        assert await all_ids(ob) == []


async def test_a_held_row_not_acked_is_written_when_the_delay_ends(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=0.05)
    async with await Outbox.open(db, config) as ob:
        put = ob.put_soon(item(1), hold=True)
        assert (await ob.stats()).unwritten == 1
        async with asyncio.timeout(5):
            assert await put is PutOutcome.STORED
        stats = await ob.stats()
        assert (stats.rows, stats.stored, stats.unwritten) == (1, 1, 0)
        # Written once: an ack now deletes it as any stored row.
        assert await ob.ack([mid(1)]) == 1
        assert (await ob.stats()).acked_unwritten == 0


async def test_held_rows_are_read_with_the_stored_ones_in_order(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=5.0)
    async with await Outbox.open(db, config) as ob:
        await ob.put_many([item(1, priority=1), item(2, priority=2)])
        held = [
            ob.put_soon(item(3, priority=1), hold=True),
            ob.put_soon(item(4, priority=0), hold=True),
            ob.put_soon(item(5, priority=2), hold=True),
        ]
        rows, complete = await ob.next_rows(10, 10**6)
        assert [r.msg_id for r in rows] == [mid(n) for n in (4, 1, 3, 2, 5)]
        assert complete
        rows, complete = await ob.next_rows(10, 10**6, exclude={mid(4)})
        assert [r.msg_id for r in rows] == [mid(n) for n in (1, 3, 2, 5)]
        rows, complete = await ob.next_rows(2, 10**6)
        assert [r.msg_id for r in rows] == [mid(4), mid(1)]
        assert not complete
        # The store stopped at priority 1: a held priority-2 row must not
        # overtake the stored priority-2 row it did not read.
        rows, complete = await ob.next_rows(1, 10**6, exclude={mid(4)})
        assert [r.msg_id for r in rows] == [mid(1)]
        assert not complete
        assert await ob.ack([mid(3), mid(4), mid(5)]) == 3
        assert [f.result() for f in held] == [PutOutcome.ACKNOWLEDGED] * 3
        assert await all_ids(ob) == [mid(1), mid(2)]


async def test_holding_is_bounded_and_close_writes_what_is_held(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=5.0, commit_max_batch=2)
    async with await Outbox.open(db, config) as ob:
        first = [ob.put_soon(item(n), hold=True) for n in (1, 2)]
        third = ob.put_soon(item(3), hold=True)  # over the bound: 1 and 2 written
        assert [await f for f in first] == [PutOutcome.STORED] * 2
        assert not ob.holds(mid(1))
        assert ob.holds(mid(3))
        again = ob.put_soon(item(3), hold=True)  # the glasses resent it meanwhile
    assert await third is PutOutcome.STORED  # the clean close wrote it
    assert await again is PutOutcome.DUPLICATE
    async with await Outbox.open(db, config) as ob:
        assert await all_ids(ob) == [mid(1), mid(2), mid(3)]


async def test_a_held_duplicate_is_acknowledged_with_the_first(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=5.0)
    async with await Outbox.open(db, config) as ob:
        first = ob.put_soon(item(1), hold=True)
        second = ob.put_soon(item(1), hold=True)
        assert await ob.ack([mid(1), mid(2)]) == 1
        assert await first is PutOutcome.ACKNOWLEDGED
        assert await second is PutOutcome.DUPLICATE


async def test_without_a_write_delay_hold_changes_nothing(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=0)
    async with await Outbox.open(db, config) as ob:
        assert await ob.put_soon(item(1), hold=True) is PutOutcome.STORED
        assert not ob.holds(mid(1))
        assert (await ob.stats()).rows == 1


async def test_an_ack_of_a_held_row_also_deletes_a_stored_copy(db: Path) -> None:
    """The row was written (its ACK to the glasses lost), the glasses resent
    it, and the resend is held: the gateway's ack must clear both."""
    config = OutboxConfig(commit_interval=0, write_delay=5.0)
    async with await Outbox.open(db, config) as ob:
        assert await ob.put(item(1))
        again = ob.put_soon(item(1), hold=True)
        assert ob.holds(mid(1))
        await ob.ack([mid(1)])
        assert await again is PutOutcome.ACKNOWLEDGED
        assert (await ob.stats()).rows == 0
        assert await all_ids(ob) == []


async def test_a_put_not_held_writes_the_held_rows_first(db: Path) -> None:
    config = OutboxConfig(commit_interval=0, write_delay=5.0)
    async with await Outbox.open(db, config) as ob:
        held = ob.put_soon(item(1), hold=True)
        assert await ob.put(item(2))  # e.g. the uplink dropped meanwhile
        assert await held is PutOutcome.STORED
        assert await all_ids(ob) == [mid(1), mid(2)]  # put order kept


async def test_nothing_is_held_while_the_store_is_behind(db: Path) -> None:
    """Rows queued for writing and not yet committed: a put asked to be held
    is written instead, so the caller's count of uncommitted puts (its
    backpressure) includes it."""
    config = OutboxConfig(
        commit_interval=0, write_delay=5.0, commit_max_batch=2, inline_commit=False
    )
    async with await Outbox.open(db, config) as ob:
        queued = [ob.put_soon(item(n)) for n in (1, 2)]
        third = ob.put_soon(item(3), hold=True)
        assert not ob.holds(mid(3))
        assert [await f for f in (*queued, third)] == [PutOutcome.STORED] * 3
        later = ob.put_soon(item(4), hold=True)  # written: held again
        assert ob.holds(mid(4))
        await ob.ack([mid(4)])
        assert await later is PutOutcome.ACKNOWLEDGED


async def test_a_cancelled_ack_of_held_and_stored_rows_raises_nothing(
    db: Path,
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    config = OutboxConfig(commit_interval=0, write_delay=5.0, inline_commit=False)
    try:
        async with await Outbox.open(db, config) as ob:
            assert await ob.put(item(1))
            held = ob.put_soon(item(2), hold=True)
            acking = asyncio.create_task(ob.ack([mid(1), mid(2)]))
            await asyncio.sleep(0)  # the ack is queued
            acking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acking
            await ob.stats()  # the store's delete has completed by now
            assert await all_ids(ob) == []
            assert await held is PutOutcome.ACKNOWLEDGED
    finally:
        loop.set_exception_handler(None)
    assert errors == []
