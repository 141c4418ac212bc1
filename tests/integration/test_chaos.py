"""Chaos: glasses, daemon and gateway as real processes through a real mosquitto.

While messages flow, the broker crashes and comes back, the daemon is
SIGKILLed and restarted, the BLE link drops, and the gateway stalls. Anyone
can then check delivery from the two audit ledgers: every message the phone
acknowledged as durable to the glasses is processed by the gateway exactly
once, and every answer the gateway sent reaches the glasses. Over WebSocket
the gateway itself is SIGKILLed; a kill between its store's commit and its
ledger line keeps the message (a resend is a duplicate, acknowledged) but
loses the line (tools/cloud/ledger.py), so there the gateway's idempotency
store is the record of what it admitted, and the ledger must agree with it.

The same run with the daemon's test-only forget-on-PUBACK switch must lose
messages: that proves the check can see loss. ``make soak`` runs the full size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import Mosquitto, free_port

SCRIPT = Path(sys.executable).parent / "glasses-relay"


@dataclass
class Plan:
    messages: int
    broker_crashes: int
    daemon_kills: int
    link_drops: int
    timeout: float


ANSWER_SETTLE_S = 2.0
"""Seconds without a new gateway response line before the answers are checked."""
SMALL = Plan(messages=1000, broker_crashes=1, daemon_kills=1, link_drops=2, timeout=150)
FULL = Plan(
    messages=10_000, broker_crashes=3, daemon_kills=3, link_drops=5, timeout=1500
)


def read_ledger(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Run:
    """The processes of one chaos run, and their ledgers."""

    def __init__(
        self,
        tmp: Path,
        broker: Mosquitto,
        plan: Plan,
        *,
        forget: bool,
        uplink: str = "mqtt",
    ) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.state.mkdir(mode=0o700)
        self.broker = broker
        self.plan = plan
        self.forget = forget
        self.hci_port = free_port()
        self.glasses_ledger = tmp / "glasses.jsonl"
        self.gateway_ledger = tmp / "gateway.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.uplink = uplink
        self.ws_port = free_port()

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(SCRIPT), "--state-dir", str(self.state), "-v", *args],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.procs.append(proc)
        return proc

    def start_gateway(self) -> None:
        where = (
            ["--broker", self.broker.url]
            if self.uplink == "mqtt"
            else ["--listen", f"127.0.0.1:{self.ws_port}"]
        )
        self.gateway = self.spawn(
            "gateway", "cloud", *where,
            "--ledger", str(self.gateway_ledger), "--latency-model", "fixed:0.05",
        )  # fmt: skip

    def start(self) -> None:
        self.start_gateway()
        self.sim = self.spawn(
            "sim", "sim", "--hci", f"tcp-server:127.0.0.1:{self.hci_port}",
            "--scenario", "stress", "--profile", "unshaped",
            "--max-messages", str(self.plan.messages),
            "--ledger", str(self.glasses_ledger),
        )  # fmt: skip
        self.start_daemon()

    def start_daemon(self) -> None:
        extra = ["--test-forget-on-puback"] if self.forget else []
        where = (
            ["--broker", self.broker.url]
            if self.uplink == "mqtt"
            else ["--gateway", f"ws://127.0.0.1:{self.ws_port}"]
        )
        self.daemon = self.spawn(
            "daemon", "run", "--sim", f"tcp-client:127.0.0.1:{self.hci_port}",
            *where, *extra,
        )  # fmt: skip

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def acked(self) -> set[str]:
        return {
            str(e["id"])
            for e in read_ledger(self.glasses_ledger)
            if e["event"] == "acked"
        }

    def sent(self) -> set[str]:
        return {
            str(e["id"])
            for e in read_ledger(self.glasses_ledger)
            if e["event"] == "sent"
        }

    def processed(self) -> Counter[str]:
        return Counter(
            str(e["id"])
            for e in read_ledger(self.gateway_ledger)
            if e["event"] == "processed"
        )

    def admitted(self) -> set[str]:
        """Ids in the gateway's idempotency store: admitted once, durably."""
        path = self.state / "gateway" / "idempotency.sqlite3"
        if not path.exists():
            return set()
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        ) as db:
            return {
                bytes(row[0]).hex() for row in db.execute("SELECT message_id FROM seen")
            }

    def received(self) -> set[str]:
        """Processed by the gateway: a ledger line, or (WebSocket runs, where the
        gateway is killed) in its store."""
        ledger = set(self.processed())
        return ledger | self.admitted() if self.uplink == "ws" else ledger

    def responses(self) -> set[str]:
        return {
            str(e["id"])
            for e in read_ledger(self.gateway_ledger)
            if e["event"] == "response"
        }

    def answered(self) -> set[str]:
        return {
            str(e["id"])
            for e in read_ledger(self.glasses_ledger)
            if e["event"] == "answered"
        }

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_until(check, limit: float, what: str, run: Run) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.2)
    tails = {
        name: (run.tmp / f"{name}.log").read_text(errors="replace")[-1500:]
        for name in ("daemon", "gateway", "sim")
    }
    raise AssertionError(f"timed out waiting for {what}: {tails}")


async def chaos(tmp: Path, plan: Plan, *, forget: bool, uplink: str = "mqtt") -> Run:
    broker = Mosquitto(tmp / "broker")
    await broker.start()
    run = Run(tmp, broker, plan, forget=forget, uplink=uplink)
    run.start()
    n = plan.messages
    try:
        # Faults spread over the run, each at a point of progress.
        events = [
            ((i + 1) / (plan.link_drops + 1), "drop") for i in range(plan.link_drops)
        ]
        events += [
            ((i + 0.5) / plan.daemon_kills * 0.8, "kill")
            for i in range(plan.daemon_kills)
        ]
        if forget:
            # The lossy control stalls the gateway from the start, so most
            # messages pile up in the broker before it crashes
            # (a fast relay would otherwise be done before any later point).
            events.append((0.0, "crash"))
        else:
            events += [
                ((i + 0.7) / plan.broker_crashes * 0.9, "crash")
                for i in range(plan.broker_crashes)
            ]
        for fraction, what in sorted(events):
            await wait_until(lambda f=fraction: len(run.acked()) >= f * n, plan.timeout,
                             f"{fraction:.0%} acked before {what}", run)  # fmt: skip
            if what == "drop":
                os.kill(run.sim.pid, signal.SIGUSR1)
            elif what == "kill":
                assert run.daemon is not None
                run.daemon.send_signal(signal.SIGKILL)
                run.daemon.wait(timeout=10)
                run.start_daemon()
            elif uplink == "ws":
                # The gateway crashes and comes back (WebSocket has no broker).
                run.gateway.send_signal(signal.SIGKILL)
                run.gateway.wait(timeout=10)
                run.start_gateway()
            else:
                # The gateway stalls, messages pile up in the broker, and the
                # broker crashes with them: only end-to-end acks notice.
                if forget:
                    # Stalled once subscribed, before the daemon's backlog
                    # flows: all but the broker's in-flight window piles up.
                    await wait_until(
                        lambda: "mqtt: connected" in run.log("gateway"), 60,
                        "the gateway subscribed", run,
                    )  # fmt: skip
                os.kill(run.gateway.pid, signal.SIGSTOP)
                before = len(run.acked())
                more = n // 2 if forget else 50
                with contextlib.suppress(AssertionError):
                    # Until the glasses have seen more messages stored (so the
                    # daemon has more to publish into the stalled broker).
                    await wait_until(
                        lambda b=before, m=more: len(run.acked()) >= min(n, b + m),
                        30, "more messages during the stall", run,
                    )  # fmt: skip
                await asyncio.sleep(1.0)
                await broker.kill()
                await broker.start()
                os.kill(run.gateway.pid, signal.SIGCONT)
        await wait_until(lambda: len(run.acked()) >= n, plan.timeout, "all acked", run)
        if not forget:
            await wait_until(
                lambda: run.acked() <= run.received(), plan.timeout,
                "every acked message processed", run,
            )  # fmt: skip
            # A request processed last has no response line until its answer
            # is produced: wait until no new line has come for a while too.
            deadline = time.monotonic() + plan.timeout
            seen: set[str] | None = None
            while seen != run.responses():
                seen = run.responses()
                await wait_until(
                    lambda: run.responses() <= run.answered(),
                    max(1.0, deadline - time.monotonic()),
                    "every answer at the glasses", run,
                )  # fmt: skip
                await asyncio.sleep(ANSWER_SETTLE_S)
        else:
            await asyncio.sleep(8)  # give a lossy relay every chance to deliver
        return run
    finally:
        run.stop()
        await broker.stop()


async def check_no_loss(tmp: Path, plan: Plan, uplink: str = "mqtt") -> None:
    run = await chaos(tmp, plan, forget=False, uplink=uplink)
    acked = run.acked()
    processed = run.processed()
    assert len(acked) == plan.messages
    assert acked == run.sent()
    missing = acked - run.received()
    assert not missing, f"{len(missing)} acked messages never processed"
    twice = [i for i, c in processed.items() if c != 1]
    assert not twice, f"processed more than once: {twice[:5]}"
    admitted = run.admitted()
    assert set(processed) <= admitted  # the ledger agrees with the store
    if uplink == "mqtt":  # the gateway is never killed: its ledger is complete
        assert acked <= set(processed)
    responses = {
        str(e["id"])
        for e in read_ledger(run.gateway_ledger)
        if e["event"] == "response"
    }
    answered = {
        str(e["id"])
        for e in read_ledger(run.glasses_ledger)
        if e["event"] == "answered"
    }
    assert responses, "the scenario asks questions: the gateway must answer some"
    assert responses <= answered, (
        f"{len(responses - answered)} answers never reached the glasses"
    )


@pytest.mark.timeout(400)
async def test_chaos_mqtt_small(tmp_path: Path) -> None:
    await check_no_loss(tmp_path, SMALL)


@pytest.mark.timeout(400)
async def test_forget_on_puback_control_loses_messages(tmp_path: Path) -> None:
    run = await chaos(tmp_path, SMALL, forget=True)
    lost = run.acked() - set(run.processed())
    assert lost, "forgetting on PUBACK should lose messages when the broker crashes"


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_chaos_mqtt_full(tmp_path: Path) -> None:
    await check_no_loss(tmp_path, FULL)


@pytest.mark.timeout(400)
async def test_chaos_websocket_small(tmp_path: Path) -> None:
    """The scaled-down WebSocket run: the gateway crashes instead of the broker.

    (The full run in ``make soak`` is what caught a full unacknowledged window
    ending every new BLE session at its first send; this size does not fill it.)"""
    await check_no_loss(tmp_path, SMALL, uplink="ws")


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_chaos_websocket_full(tmp_path: Path) -> None:
    """The same over WebSocket, with the gateway crashing instead of the broker."""
    await check_no_loss(tmp_path, FULL, uplink="ws")
