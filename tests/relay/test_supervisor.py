"""The daemon's supervisor, and SIGTERM in the middle of traffic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.daemon import supervise

SCRIPT = Path(sys.executable).parent / "glasses-relay"


async def test_a_component_that_raises_is_restarted_and_counted() -> None:
    restarts: dict[str, int] = {}
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise RuntimeError("a bug")
        done.set()

    await asyncio.wait_for(supervise("flaky", flaky, restarts, base=0.01, cap=0.02), 5)
    assert runs == 4
    assert restarts == {"flaky": 3}
    assert done.is_set()


async def test_cancellation_is_not_a_failure() -> None:
    restarts: dict[str, int] = {}

    async def forever() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("forever", forever, restarts))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert restarts == {}


async def test_a_cancellation_that_clean_up_turns_into_an_error_still_stops() -> None:
    """Clean-up on the way out raises something else (a Bluetooth transport
    lost while disconnecting): that is still a cancellation, not a failure to
    restart (the daemon hung on SIGTERM that way)."""
    restarts: dict[str, int] = {}
    entered = asyncio.Event()
    failed = False

    async def link() -> None:
        nonlocal failed
        try:
            entered.set()
            await asyncio.Event().wait()
        finally:
            if not failed:  # once: a restarted link would block again
                failed = True
                await asyncio.sleep(0)
                raise RuntimeError("transport lost")

    task = asyncio.create_task(supervise("link", link, restarts, base=0.01))
    await entered.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    try:
        assert task.cancelled()
        assert restarts == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def read_ledger(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def glasses_and_daemon(
    tmp_path: Path,
) -> Iterator[tuple[Path, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """``glasses-relay sim`` (stress, unshaped) and a daemon on it, two processes.

    Yields the glasses' ledger, the sim and the daemon; stops what still runs.
    """
    state = tmp_path / "state"
    ledger = tmp_path / "glasses.jsonl"
    port = _free_port()
    sim = subprocess.Popen(
        [str(SCRIPT), "--state-dir", str(state), "sim", "--hci",
         f"tcp-server:127.0.0.1:{port}", "--scenario", "stress", "--profile",
         "unshaped", "--ledger", str(ledger)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    daemon = subprocess.Popen(
        [str(SCRIPT), "--state-dir", str(state), "run", "--sim",
         f"tcp-client:127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield ledger, sim, daemon
    finally:
        for process in (daemon, sim):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def wait_acked(ledger: Path, count: int, within: float = 40) -> bool:
    """Wait until the glasses' ledger has ``count`` acked messages."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if sum(e["event"] == "acked" for e in read_ledger(ledger)) >= count:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_during_traffic_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Acked messages survive a SIGTERM in the middle of traffic (in the outbox)."""
    state = tmp_path / "state"
    with glasses_and_daemon(tmp_path) as (ledger, _, daemon):
        wait_acked(ledger, 200)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        acked = {e["id"] for e in read_ledger(ledger) if e["event"] == "acked"}
        assert len(acked) >= 200
    # Everything acknowledged is in the outbox (no cloud was configured).
    import sqlite3

    with sqlite3.connect(state / "phone" / "outbox.sqlite3") as db:
        stored = {row[0].hex() for row in db.execute("SELECT msg_id FROM outbox")}
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged messages not in the outbox"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_as_the_glasses_process_dies_still_stops_the_daemon(
    tmp_path: Path,
) -> None:
    """The glasses' process killed and SIGTERM at the same moment: the link's
    teardown fails (the HCI transport is gone) while the daemon is being
    cancelled. It used to take that for a link failure, restart the link and
    never exit."""
    with glasses_and_daemon(tmp_path) as (ledger, sim, daemon):
        if not wait_acked(ledger, 50):
            pytest.fail("the glasses and the daemon never exchanged 50 messages")
        sim.kill()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
