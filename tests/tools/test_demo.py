"""``glasses-relay demo``: the whole path, and what a broker subscriber sees of it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zlib
from pathlib import Path

import aiomqtt
import cbor2
import pytest
from servers import Mosquitto

from relay.sim.scenarios import _DAY_SCRIPT, Ask

SCRIPT = Path(sys.executable).parent / "glasses-relay"
FIELDS = ("id", "kind", "route", "response_ms", "within_budget")


def check_summary(summary: dict) -> None:  # type: ignore[type-arg]
    requests = summary["requests"]
    assert len(requests) >= 4
    for item in requests:
        for key in FIELDS:
            assert key in item, key
        assert item["route"] in ("local", "cloud", "hedged")
    assert summary["answered"] == len(requests)
    assert summary["lost"] == 0
    assert {"local", "cloud"} <= {r["route"] for r in requests}
    assert 0.0 <= summary["within_budget_ratio"] <= 1.0
    assert summary["assistant_latency_model"].startswith("lognormal")


@pytest.mark.timeout(180)
def test_demo_over_websocket(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(SCRIPT), "--state-dir", str(tmp_path / "state"), "demo",
         "--duration", "12", "--json"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    check_summary(json.loads(out.stdout))
    assert "within 3 s" in out.stderr  # the table for people


# Ciphertext is uniformly random, so a needle of k bytes turns up in N bytes
# of it by chance with probability about N / 256**k: 1 in 60 for a 3-byte
# needle in the demo's ~300 kB (a CI run once failed on b"eur" that way).
# Every needle is therefore at least _MIN_NEEDLE bytes (under 1e-8 at 6), and
# short values are searched for as the plaintext carries them: CBOR-encoded
# under their key, or with the words around them.
_MIN_NEEDLE = 6


def plaintexts() -> list[bytes]:
    """Byte strings of the day scenario that must never cross the broker in clear."""
    words = [
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # the start of every JPEG Pillow writes
        b"GR-Glasses",
        b"voice_query",
        b"telemetry",
        cbor2.dumps("c") + cbor2.dumps("lc3"),  # the codec field of a media body
        cbor2.dumps("c") + cbor2.dumps("jpeg"),
    ]
    for _, action in _DAY_SCRIPT:
        if isinstance(action, Ask) and action.text:
            words.append(action.text.encode())
            words += [w.encode() for w in action.text.split() if len(w) >= _MIN_NEEDLE]
    # Words the built-in assistant answers with.
    words += [b"Cafe Central", b" EUR to ", b"pharmacy", b"weather", b"Grazie"]
    return words


def test_every_plaintext_needle_is_long_enough_not_to_match_by_chance() -> None:
    short = [w for w in plaintexts() if len(w) < _MIN_NEEDLE]
    assert not short, short


@pytest.mark.timeout(180)
async def test_demo_over_mqtt_shows_the_broker_only_sealed_envelopes(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    await broker.start()
    payloads: list[tuple[str, bytes]] = []
    try:
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="sniffer"
        ) as sniffer:
            await sniffer.subscribe("#")

            async def collect() -> None:
                async for message in sniffer.messages:
                    assert isinstance(message.payload, bytes)
                    payloads.append((str(message.topic), message.payload))

            collector = asyncio.create_task(collect())
            demo = await asyncio.create_subprocess_exec(
                str(SCRIPT), "--state-dir", str(tmp_path / "state"), "demo",
                "--duration", "12", "--uplink", "mqtt", "--broker", broker.url,
                "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await asyncio.wait_for(demo.communicate(), 120)
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
    finally:
        await broker.stop()
    assert demo.returncode == 0, stderr.decode()[-3000:]
    check_summary(json.loads(stdout))
    topics = {t.rsplit("/", 1)[-1] for t, _ in payloads}
    assert {"up", "down", "presence"} <= topics
    blob = b"".join(p for _, p in payloads)
    assert len(payloads) > 20
    for word in plaintexts():
        leaks = [topic for topic, payload in payloads if word in payload]
        assert not leaks, (word, leaks[:3])
    for topic, _ in payloads:  # pseudonymous topics: no names, no ids in clear
        assert "glasses" not in topic.lower()
    compressed = len(zlib.compress(blob, 9))
    assert compressed >= 0.85 * len(blob), compressed / len(blob)
