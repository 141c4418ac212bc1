"""Answers survive the gateway: killed, restarted, or replaced by another one.

docs/cloud.md §Delivery 5 and tools/cloud/store.py ("answers owed"): a
gateway that acknowledged a request and began answering it is SIGKILLed right
after the phone received the first piece; a successor (the same gateway
restarted on the same store, or another gateway sharing the Redis store)
sends the rest. After de-duplication by message id every piece index is
there exactly once and the last one is FINAL; the ``response`` ledger line is
written once.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

# The gateway's test phone and helpers (tests/tools is on sys.path: pytest's
# prepend import mode, and mypy's base directory).
from test_cloud import (
    LIMITS,
    LOOPBACK,
    Phone,
    Server,
    check_answer,
    config,
    gateway_process,
    ledger,
    message,
    mqtt_phone,
    poll,
    request,
    running,
    wait_for_text,
)

from protocol.bodies import Cancel, Request, RequestKind, ResponseText
from protocol.cloud import encode_batch
from protocol.constants import MessageKind
from protocol.message import Message
from tools.cloud.assistant import PIECE_DELAY_S, LatencyModel
from tools.cloud.redis_store import RedisStore
from tools.cloud.store import (
    Entry,
    IdempotencyStore,
    Part,
    PartKind,
    SqliteStore,
    StoredPiece,
)

LATENCY = "fixed:0.3"
"""The first piece comes 0.3 s after the request: time to see its signed ack."""
TEST_S = 20.0
_LISTENING = re.compile(r"ws: listening on ws://127\.0\.0\.1:(\d+)/")


def slow_request(text: str, rid: int) -> Message:
    """A request whose built-in answer pauses >= 0.14 s between its pieces.

    The pause is drawn from a generator seeded with the message id (with a
    fixed first-token time, its first draw), so the kill after the first
    piece lands well before the second.
    """
    low, high = PIECE_DELAY_S
    while True:
        msg = request(text, rid)
        rng = random.Random(int.from_bytes(msg.message_id, "big"))
        if rng.uniform(low, high) >= high - 0.01:
            return msg


def seqs(phone: Phone, rid: int) -> list[int]:
    return [ResponseText.decode(m.body).seq for m in phone.answer(rid)]


async def ws_port(log: Path) -> int:
    await wait_for_text(log, "ws: listening on")
    text = await asyncio.to_thread(log.read_text, errors="replace")
    match = _LISTENING.search(text)
    assert match is not None
    return int(match[1])


@asynccontextmanager
async def ws_phone(
    http: aiohttp.ClientSession, phone: Phone, port: int
) -> AsyncIterator[Callable[[bytes], Awaitable[None]]]:
    """The phone on a WebSocket: yields its send; feeds what comes down."""
    url = f"ws://{LOOPBACK}:{port}/v1/{phone.pseudonym}"
    async with http.ws_connect(url) as ws:

        async def pump() -> None:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    phone.feed(frame.data)

        reader = asyncio.create_task(pump())
        try:
            yield ws.send_bytes
        finally:
            reader.cancel()
            await asyncio.wait((reader,))


def owed_rows(state: Path) -> int:
    """Answers owed in the gateway's SQLite store, cancelled ones not counted."""
    path = state / "gateway" / "idempotency.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM owed WHERE cancelled = 0"
        ).fetchone()
    return int(count)


def events(paths: list[Path], mid: bytes) -> list[str]:
    return [e for path in paths for m, e in ledger(path) if m == mid.hex()]


@pytest.mark.timeout(TEST_S)
@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_websocket_answer_survives_a_gateway_kill(
    store: str, request: pytest.FixtureRequest, state: Path, tmp_path: Path
) -> None:
    """SQLite: the same gateway restarted; Redis: another one takes the device."""
    args = ["--listen", f"{LOOPBACK}:0", "--latency-model", LATENCY]
    if store == "redis":
        redis_server: Server = request.getfixturevalue("redis_server")
        args += ["--idempotency", redis_server.url]
    ledgers = [tmp_path / "ledger-0.jsonl", tmp_path / "ledger-1.jsonl"]
    logs = [tmp_path / "gateway-0.log", tmp_path / "gateway-1.log"]
    phone = Phone(state)
    phone.register()
    ask = slow_request("who wrote the book I was reading", 11)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        with gateway_process(state, logs[0], *args, "--ledger", str(ledgers[0])) as p0:
            async with ws_phone(http, phone, await ws_port(logs[0])) as send:
                await send(encode_batch([phone.seal(ask)]))
                await phone.until(lambda: len(phone.answer(11)) == 1)
                p0.send_signal(signal.SIGKILL)
                assert ask.message_id in phone.acked  # the phone forgot it
                assert not phone.answered(11), "the FINAL piece beat the kill"
                first = phone.answer(11)[0].message_id
            p0.wait(5.0)
        with gateway_process(state, logs[1], *args, "--ledger", str(ledgers[1])) as p1:
            async with ws_phone(http, phone, await ws_port(logs[1])) as send:
                await phone.until(lambda: phone.answered(11))
                assert "Umberto Eco" in check_answer(phone, 11)
                assert seqs(phone, 11) == [0, 1]
                assert phone.answer(11)[0].message_id == first  # the same id
                assert phone.down_count[first] >= 2  # resent by the successor
                pieces = [m.message_id for m in phone.answer(11)]
                await send(encode_batch([phone.seal(phone.ack_message(pieces))]))
                await poll(lambda: "response" in events(ledgers, ask.message_id))
                if store == "sqlite":
                    await poll(lambda: owed_rows(state) == 0)
            p1.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(p1.wait, 5.0) == 0
    assert sorted(events(ledgers, ask.message_id)) == ["processed", "response"]
    print(f"ws kill, {store}: {time.monotonic() - started:.1f} s")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.mark.timeout(TEST_S)
async def test_mqtt_answer_taken_over_from_a_killed_gateway(
    mosquitto: Server, redis_server: Server, state: Path, tmp_path: Path
) -> None:
    """Two gateways on one broker and one Redis: the owner dies, the other ends it."""
    phone = Phone(state)
    phone.register()
    ledgers = [tmp_path / f"ledger-{i}.jsonl" for i in range(2)]
    logs = [tmp_path / f"gateway-{i}.log" for i in range(2)]
    common = ["--broker", mosquitto.url, "--idempotency", redis_server.url]
    common += ["--latency-model", LATENCY]
    ask = slow_request("what's on my calendar", 12)
    started = time.monotonic()
    with (
        gateway_process(state, logs[0], *common, "--ledger", str(ledgers[0])) as p0,
        gateway_process(state, logs[1], *common, "--ledger", str(ledgers[1])) as p1,
    ):
        for log in logs:
            await wait_for_text(log, "mqtt: connected")
        async with mqtt_phone(mosquitto, phone) as send:
            await send(encode_batch([phone.seal(ask)]))
            await phone.until(lambda: len(phone.answer(12)) == 1)
            owners = [i for i in (0, 1) if events([ledgers[i]], ask.message_id)]
            assert len(owners) == 1
            owner, heir = [p0, p1][owners[0]], [p0, p1][1 - owners[0]]
            owner.send_signal(signal.SIGKILL)
            assert ask.message_id in phone.acked
            assert not phone.answered(12), "the FINAL piece beat the kill"
            first = phone.answer(12)[0].message_id
            # The glasses took the first piece: the phone ACKs it. Once the owner
            # is gone (its socket closed), the broker gives the ACK to the heir.
            await asyncio.to_thread(owner.wait, 5.0)
            await asyncio.sleep(0.2)
            await send(encode_batch([phone.seal(phone.ack_message([first]))]))
            await phone.until(lambda: phone.answered(12), 12.0)
            assert "14:00" in check_answer(phone, 12)
            assert seqs(phone, 12) == [0, 1]
            assert phone.down_count[first] == 1  # acknowledged: not resent
            await poll(lambda: "response" in events(ledgers, ask.message_id))
        heir.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(heir.wait, 5.0) == 0
    assert sorted(events(ledgers, ask.message_id)) == ["processed", "response"]
    assert "Traceback" not in logs[1 - owners[0]].read_text()
    print(f"mqtt takeover: {time.monotonic() - started:.1f} s")


async def test_restarted_gateway_resumes_at_start_without_the_device(
    mosquitto: Server, state: Path
) -> None:
    """Stopped mid-answer, started again: it goes on before the phone says a word."""
    phone = Phone(state)
    phone.register()
    cfg = config(state, broker_url=mosquitto.url, latency=LatencyModel("fixed", 0.3))
    ask = slow_request("read my last message", 13)
    async with mqtt_phone(mosquitto, phone) as send:
        async with running(cfg):
            await send(encode_batch([phone.seal(ask)]))
            await phone.until(lambda: len(phone.answer(13)) == 1)
        assert not phone.answered(13)
        first = phone.answer(13)[0].message_id
        async with running(cfg) as gateway:
            await phone.until(lambda: phone.answered(13))
            assert "Alex" in check_answer(phone, 13)
            assert phone.answer(13)[0].message_id == first
            pieces = [m.message_id for m in phone.answer(13)]
            await send(encode_batch([phone.seal(phone.ack_message(pieces))]))
            await poll(lambda: gateway.stats.downlink_acked == len(pieces))
            await poll(lambda: owed_rows(state) == 0)
    assert sorted(events([state / "ledger.jsonl"], ask.message_id)) == [
        "processed",
        "response",
    ]


async def test_a_cancelled_answer_is_not_resumed(
    mosquitto: Server, state: Path
) -> None:
    phone = Phone(state)
    phone.register()
    cfg = config(state, broker_url=mosquitto.url, latency=LatencyModel("fixed", 0.3))
    ask = request("what's the weather like", 14)
    cancel = message(MessageKind.CANCEL, Cancel("changed my mind").encode(), 14)
    async with mqtt_phone(mosquitto, phone) as send:
        async with running(cfg) as gateway:
            await send(encode_batch([phone.seal(ask), phone.seal(cancel)]))
            await phone.until(lambda: phone.acked[cancel.message_id] > 0)
            await asyncio.sleep(0.5)  # the answer would have begun by now
        async with running(cfg):
            await asyncio.sleep(0.6)
    assert phone.answer(14) == []
    assert gateway.stats.responses == 0
    assert owed_rows(state) == 0


# --- the stores -----------------------------------------------------------------------


def piece(seq: int, *, final: bool = False) -> StoredPiece:
    return StoredPiece(seq, os.urandom(16), final, os.urandom(40))


async def owe(store: IdempotencyStore, device: bytes, rid: int, owner: str) -> bytes:
    """Admit a REQUEST complete by itself; return its message id."""
    mid = os.urandom(16)
    body = Request(RequestKind.TEXT_QUERY, 1, 0, 0, None, "hi").encode()
    part = Part(rid, PartKind.REQUEST, -1, mid + body, final=True)
    (verdict,) = await store.admit([Entry(device, mid, part)], owner=owner)
    assert verdict.assembled is not None
    return mid


async def check_owed(store: IdempotencyStore, other: IdempotencyStore) -> None:
    device = os.urandom(16)
    mid = await owe(store, device, 3, "a")
    # The owner saves; the first save of an index wins.
    p0 = piece(0)
    assert await store.save_piece(device, mid, p0, owner="a") == p0
    assert await store.save_piece(device, mid, piece(0), owner="a") == p0
    # A device that connects to another gateway: it takes the answer over.
    (owed,) = await other.claim_owed(device, owner="b", steal=True)
    assert (owed.message_id, owed.request_id, owed.finished) == (mid, 3, False)
    assert owed.request is not None
    assert Request.decode(owed.request.body).text == "hi"
    assert owed.pieces == (p0,)
    assert await store.save_piece(device, mid, piece(1), owner="a") is None
    p1 = piece(1, final=True)
    assert await other.save_piece(device, mid, p1, owner="b") == p1
    assert await other.save_piece(device, mid, piece(2), owner="b") is None
    (owed,) = await store.claim_owed(device, owner="b", steal=False)
    assert (owed.finished, owed.request, owed.pieces) == (True, None, (p0, p1))
    # ACKs drop the envelopes; the last one drops the record.
    await store.mark_downlink_acked(device, [p0.message_id])
    (owed,) = await other.claim_owed(device, owner="b", steal=False)
    assert [(p.seq, p.acked) for p in owed.pieces] == [(0, True), (1, False)]
    assert owed.pieces[0].message_id == p0.message_id
    await other.mark_downlink_acked(device, [p1.message_id, p0.message_id])
    assert await store.claim_owed(device, owner="b", steal=True) == []
    assert await store.claim_response(device, mid)
    assert not await other.claim_response(device, mid)
    # A CANCEL drops the unfinished answers of its request id.
    cancelled = await owe(store, device, 4, "a")
    kept = await owe(store, device, 5, "a")
    await other.cancel_answer(device, 4)
    assert await store.save_piece(device, cancelled, piece(0), owner="a") is None
    (owed,) = await other.claim_owed(device, owner="a", steal=True)
    assert owed.message_id == kept
    # No record (expired): the piece goes unsaved.
    lost = piece(0)
    assert await store.save_piece(device, os.urandom(16), lost, owner="a") == lost


async def test_sqlite_answers_owed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "one.sqlite3", LIMITS)
    await store.open()
    try:
        await check_owed(store, store)
    finally:
        await store.aclose()
    path = tmp_path / "gw" / "idempotency.sqlite3"
    store = SqliteStore(path, LIMITS)
    await store.open()
    try:
        device = os.urandom(16)
        mid = await owe(store, device, 1, "old")
        assert await store.claim_orphans(owner="old", limit=10) == []
    finally:
        await store.aclose()
    reopened = SqliteStore(path, LIMITS)  # a restart: the predecessor's are orphans
    await reopened.open()
    try:
        (owed,) = await reopened.claim_orphans(owner="new", limit=10)
        assert (owed.device_id, owed.message_id) == (device, mid)
        assert await reopened.claim_orphans(owner="new", limit=10) == []
    finally:
        await reopened.aclose()


async def test_redis_answers_owed(redis_server: Server) -> None:
    one = RedisStore(redis_server.url, LIMITS, timeout_s=5.0)
    two = RedisStore(redis_server.url, LIMITS, timeout_s=5.0)
    try:
        await check_owed(one, two)
        # What check_owed left ("a" and "b" never renewed a heartbeat: dead).
        await one.heartbeat(owner="sweeper", lease_s=30.0)
        assert len(await one.claim_orphans(owner="sweeper", limit=10)) == 1
        device = os.urandom(16)
        await one.heartbeat(owner="alive", lease_s=30.0)
        kept = await owe(one, device, 1, "alive")
        await one.heartbeat(owner="dying", lease_s=0.2)
        orphan = await owe(one, device, 2, "dying")
        # The owner is alive: only a connecting device moves its answers.
        await two.heartbeat(owner="other", lease_s=30.0)
        assert await two.claim_owed(device, owner="other", steal=False) == []
        assert await two.claim_orphans(owner="other", limit=10) == []
        await asyncio.sleep(0.3)
        (owed,) = await two.claim_orphans(owner="other", limit=10)
        assert owed.message_id == orphan
        assert await one.claim_orphans(owner="third", limit=10) == []
        (owed,) = await two.claim_owed(device, owner="other", steal=False)
        assert owed.message_id == orphan  # its own now; "alive" keeps the other
        assert kept != orphan
    finally:
        await one.aclose()
        await two.aclose()
