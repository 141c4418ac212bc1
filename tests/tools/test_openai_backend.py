"""The ``openai`` assistant against a local fake of an OpenAI-compatible API.

The fake (an aiohttp server on 127.0.0.1:0) speaks the real formats: streamed
chat completions as server-sent events written in pieces split at awkward
bytes, ``/audio/transcriptions`` as multipart with a WAV, HTTP errors with
``retry-after``. Nothing here touches the internet.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import os
import random
import socket
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

# The gateway and its test phone from the gateway's own tests (tests/tools is on
# sys.path: pytest's prepend import mode, and mypy's base directory).
from test_cloud import LOOPBACK, WAIT_S, Phone, check_answer, config, request, running

from protocol.bodies import Request, RequestKind
from protocol.cloud import encode_batch
from relay.errors import ConfigError
from relay.sim.media import encode_lc3, synth_speech
from tools.cloud.__main__ import build_parser
from tools.cloud.app import _assistant
from tools.cloud.assistant import AssembledRequest
from tools.cloud.config import GatewayConfig, OpenAIConfig, config_from_args
from tools.cloud.openai_backend import (
    CUT_NOTICE,
    AssistantUnavailableError,
    AudioError,
    OpenAIAssistant,
    SentenceSplitter,
    SseDecoder,
    lc3_to_wav,
)

KEY = "sk-test-" + "0fa1" * 8
MODEL = "test-model"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- the fake API ---------------------------------------------------------------------


@dataclass
class Upload:
    """One /audio/transcriptions call as the fake parsed it."""

    model: str
    filename: str
    content_type: str
    channels: int
    sample_width: int
    rate: int
    frames: int
    peak: int


@dataclass
class FakeApi:
    """Plans per endpoint (consumed in order, the last one repeats) and records."""

    base_url: str = ""
    chat: list[Handler] = field(default_factory=list)
    transcribe: list[Handler] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    resumed: asyncio.Event = field(default_factory=asyncio.Event)

    async def hold(
        self, event: asyncio.Event | None = None, within: float = 5.0
    ) -> None:
        """Pause a handler until ``event`` (or teardown), at most ``within`` s."""
        waits = [asyncio.ensure_future(self.closing.wait())]
        if event is not None:
            waits.append(asyncio.ensure_future(event.wait()))
        _, pending = await asyncio.wait(
            waits, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def on_chat(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization"))
        self.bodies.append(await request.json())
        plan = self.chat.pop(0) if len(self.chat) > 1 else self.chat[0]
        return await plan(request)

    async def on_transcribe(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization"))
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        data = upload.file.read()
        with wave.open(io.BytesIO(data), "rb") as wav:
            pcm = wav.readframes(wav.getnframes())
            samples = memoryview(pcm).cast("h")
            self.uploads.append(
                Upload(
                    str(form["model"]),
                    upload.filename,
                    upload.content_type,
                    wav.getnchannels(),
                    wav.getsampwidth(),
                    wav.getframerate(),
                    wav.getnframes(),
                    max(abs(s) for s in samples),
                )
            )
        plan = (
            self.transcribe.pop(0) if len(self.transcribe) > 1 else self.transcribe[0]
        )
        return await plan(request)


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    app = web.Application(client_max_size=32 << 20)
    app.router.add_post("/v1/chat/completions", api.on_chat)
    app.router.add_post("/v1/audio/transcriptions", api.on_transcribe)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = runner.addresses[0][1]
    api.base_url = f"http://{LOOPBACK}:{port}/v1"
    try:
        yield api
    finally:
        api.closing.set()
        await runner.cleanup()


@pytest.fixture
async def make(fake: FakeApi) -> AsyncIterator[Callable[..., OpenAIAssistant]]:
    made: list[OpenAIAssistant] = []

    def build(**overrides: Any) -> OpenAIAssistant:
        fields: dict[str, Any] = {
            "base_url": fake.base_url,
            "model": MODEL,
            "timeout_s": 5.0,
            "max_retry_wait_s": 0.3,
        }
        fields.update(overrides)
        assistant = OpenAIAssistant(OpenAIConfig(**fields), KEY)
        made.append(assistant)
        return assistant

    yield build
    for assistant in made:
        await assistant.aclose()


# --- what the fake sends --------------------------------------------------------------


def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    doc = {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1_760_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n".encode()


def sse(deltas: list[str], *, finish: str | None = "stop", done: bool = True) -> bytes:
    """A stream as OpenAI sends it, with a comment, an event line and usage."""
    out = [b": OPENROUTER PROCESSING\n\n", chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": d}) for d in deltas]
    if finish is not None:
        out.append(chunk({}, finish))
        usage = {"id": "chatcmpl-7", "choices": [], "usage": {"total_tokens": 9}}
        out.append(b"event: message\ndata: " + json.dumps(usage).encode() + b"\n\n")
    if done:
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def awkward(data: bytes) -> list[bytes]:
    """Split inside every multi-byte character, after every CR, every 23 bytes."""
    cuts = {i + 1 for i, b in enumerate(data) if b >= 0xC0 or b == 0x0D}
    cuts |= set(range(23, len(data), 23))
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def write_awkwardly(response: web.StreamResponse, data: bytes) -> None:
    for piece in awkward(data):
        await response.write(piece)
        await asyncio.sleep(0.001)  # separate TCP segments, mostly


def stream(
    *parts: bytes, api: FakeApi, gate: asyncio.Event | None = None, cut: bool = False
) -> Handler:
    """Write ``parts`` (pausing on ``gate`` between them); ``cut`` drops the line."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8"}
        )
        await response.prepare(request)
        for index, part in enumerate(parts):
            if index:
                await api.hold(gate)
                api.resumed.set()
            await write_awkwardly(response, part)
        if cut:
            assert request.transport is not None
            request.transport.close()
        return response

    return handle


def status(code: int, headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = {"error": {"message": "private: what the user asked", "code": code}}
        return web.json_response(body, status=code, headers=headers)

    return handle


def transcript(text: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response({"text": text})

    return handle


def assembled(
    text: str | None,
    kind: RequestKind = RequestKind.TEXT_QUERY,
    *,
    audio: bytes = b"",
    photo: bytes = b"",
    codec: str | None = None,
) -> AssembledRequest:
    body = Request(kind, 3000, 0, len(audio or photo), None, text, codec)
    return AssembledRequest(os.urandom(16), 1, body, audio=audio, photo=photo)


async def collect(assistant: OpenAIAssistant, req: AssembledRequest) -> list[str]:
    return [piece async for piece in assistant.answer(req)]


def user_content(body: dict[str, Any]) -> Any:
    system, user = body["messages"]
    assert system["role"] == "system"
    assert "glasses" in system["content"]
    assert "first sentence" in system["content"]
    assert user["role"] == "user"
    return user["content"]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture everything at DEBUG; at the end, the key must be nowhere."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert KEY not in caplog.text
    assert KEY[8:] not in caplog.text


# --- parsing --------------------------------------------------------------------------


def test_sse_decoder_survives_any_split() -> None:
    data = (
        "\ufeff: comment\r\nevent: message\r\nid: 1\r\n"
        'data: {"x": "19 °C — 晴天 😀"}\r\n\r\n'
        "retry: 100\ndata: first\ndata:second\n\n"
        'data: {"y": 1}\r\rdata: [DONE]\n\n'
    ).encode()
    expected = ['{"x": "19 °C — 晴天 😀"}', "first\nsecond", '{"y": 1}', "[DONE]"]

    def run(pieces: list[bytes]) -> list[str]:
        decoder = SseDecoder()
        events = [event for piece in pieces for event in decoder.feed(piece)]
        return events + decoder.close()

    assert run([data]) == expected
    assert run([data[i : i + 1] for i in range(len(data))]) == expected
    for i in range(len(data) + 1):
        assert run([data[:i], data[i:]]) == expected, i
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), 6))
        bounds = [0, *cuts, len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        assert run(pieces) == expected
    # An unterminated last line is dropped; an over-long line is refused.
    decoder = SseDecoder()
    assert decoder.feed(b'data: {"cut') == []
    assert decoder.close() == []
    with pytest.raises(ValueError, match="line over"):
        SseDecoder(max_line=64).feed(b"data: " + b"x" * 100)


def test_sentence_splitter() -> None:
    text = (
        "  It is 3.14 km away. Dr. Smith agrees! Really?\n1. Go north.\n"
        "2. Turn left. 今天晴天。明天下雨。" + " word" * 60
    )
    splitter = SentenceSplitter(max_chars=80)
    pieces = [p for ch in text for p in splitter.feed(ch)]
    rest = splitter.flush()
    assert rest is not None
    pieces.append(rest)
    assert "".join(pieces) == text.lstrip()
    assert pieces[:7] == [
        "It is 3.14 km away.",
        " Dr. Smith agrees!",
        " Really?",
        "\n1. Go north.",
        "\n2. Turn left.",
        " 今天晴天。",
        "明天下雨。",
    ]
    assert all(len(p) <= 80 for p in pieces)
    assert all(p.startswith(" word") for p in pieces[7:])
    assert SentenceSplitter().feed("Ends with a dot.") == []  # "3." may go on


def test_lc3_to_wav() -> None:
    frames = encode_lc3(synth_speech(0.5, seed=3))
    data = lc3_to_wav(b"".join(frames))
    with wave.open(io.BytesIO(data), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (
            1,
            2,
            16_000,
        )
        assert wav.getnframes() == 160 * len(frames)
    for bad in (b"", b"\x00" * 41):
        with pytest.raises(AudioError):
            lc3_to_wav(bad)


# --- streaming ------------------------------------------------------------------------


async def test_first_sentence_arrives_before_the_rest_is_generated(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    head = ["Zürich", " is", " sunny", " at", " 19", " °C", ".", " Expect"]
    tail = [" light", " rain", " after", " 18:00", "!", " 晴天", "。"]
    whole = sse(head + tail)
    marker = chunk({"content": " Expect"})
    split = whole.index(marker) + len(marker)
    fake.chat = [stream(whole[:split], whole[split:], api=fake, gate=gate)]
    assistant = make()
    answer = assistant.answer(assembled("what's the weather in Zürich"))
    async with asyncio.timeout(WAIT_S):
        first = await anext(answer)
    assert first == "Zürich is sunny at 19 °C."
    assert not fake.resumed.is_set()  # the server is still holding back the rest
    gate.set()
    rest = [piece async for piece in answer]
    assert rest == [" Expect light rain after 18:00!", " 晴天。"]
    assert fake.auth == [f"Bearer {KEY}"]
    (body,) = fake.bodies
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert user_content(body) == "what's the weather in Zürich"


async def test_stream_cut_in_the_middle_ends_with_a_notice(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    deltas = ["The pharmacy", " is open", " until 20:00.", " On Sundays", " it"]
    fake.chat = [stream(sse(deltas, finish=None, done=False), api=fake, cut=True)]
    pieces = await collect(make(), assembled("is the pharmacy open"))
    assert pieces == ["The pharmacy is open until 20:00.", " On Sundays it", CUT_NOTICE]
    assert "cut off" in logs.text
    # A stream that stalls past --timeout is cut the same way.
    fake.chat = [stream(sse(deltas[:3], finish=None, done=False), b"", api=fake)]
    started = time.monotonic()
    pieces = await collect(make(timeout_s=0.5), assembled("is it open"))
    assert pieces == ["The pharmacy is open until 20:00.", CUT_NOTICE]
    assert time.monotonic() - started < 2.0
    # Stopped by the token limit: cut off too.
    fake.chat = [stream(sse(["It is open", " until"], finish="length"), api=fake)]
    assert await collect(make(), assembled("is it open")) == [
        "It is open until",
        CUT_NOTICE,
    ]


async def test_rate_limits_are_waited_out_and_retried(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    ok = stream(sse(["Yes.", " It is."]), api=fake)
    fake.chat = [
        status(429, {"retry-after": "0.2"}),
        status(429, {"retry-after": "3600"}),  # bounded by max_retry_wait (0.3 s)
        ok,
    ]
    started = time.monotonic()
    assert await collect(make(), assembled("is it")) == ["Yes.", " It is."]
    assert 0.45 <= time.monotonic() - started < 2.0
    assert len(fake.bodies) == 3
    # Three 429s in a row: the gateway gets an error (and apologises).
    fake.chat, fake.bodies = [status(429, {"retry-after": "0"})], []
    with pytest.raises(AssistantUnavailableError, match="429") as failed:
        await collect(make(), assembled("is it"))
    assert len(fake.bodies) == 3
    assert KEY not in str(failed.value)
    assert "private" not in str(failed.value)


async def test_server_errors_are_retried_once(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    fake.chat = [status(500), stream(sse(["Fine."]), api=fake)]
    assert await collect(make(), assembled("how are you")) == ["Fine."]
    assert len(fake.bodies) == 2
    fake.chat, fake.bodies = [status(503)], []
    with pytest.raises(AssistantUnavailableError, match="503") as failed:
        await collect(make(), assembled("how are you"))
    assert len(fake.bodies) == 2
    assert KEY not in str(failed.value)
    # Cut before any text: nothing was shown yet, so it is retried once too.
    fake.chat, fake.bodies = [stream(b": ping\n\n", api=fake, cut=True)], []
    fake.chat.append(stream(sse(["Fine", " again."]), api=fake))
    assert await collect(make(), assembled("how are you")) == ["Fine again."]
    assert len(fake.bodies) == 2
    # A server that ignores stream: true and answers with one JSON body.
    message = {"role": "assistant", "content": "Plain JSON. Still fine."}
    whole = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    async def unstreamed(request: web.Request) -> web.StreamResponse:
        return web.json_response(whole)

    fake.chat = [unstreamed]
    assert await collect(make(), assembled("how are you")) == [
        "Plain JSON.",
        " Still fine.",
    ]


async def test_refusals_are_one_error_piece(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    fake.chat = [status(401)]
    pieces = await collect(make(), assembled("what is my secret question"))
    assert len(pieces) == 1
    assert "401" in pieces[0]
    assert len(fake.bodies) == 1  # not retried
    warnings = [r for r in logs.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "openai assistant: chat completion refused: HTTP 401 Unauthorized"
    ]
    assert "private" not in logs.text
    assert "secret question" not in logs.text


async def test_unreachable_endpoint_raises_without_the_key(
    make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    with socket_port() as port:
        assistant = make(base_url=f"http://{LOOPBACK}:{port}/v1")
        with pytest.raises(AssistantUnavailableError) as failed:
            await collect(assistant, assembled("hello"))
    text = f"{failed.value!s} {failed.value!r} {failed.value.__cause__!s}"
    assert KEY not in text
    assert KEY not in repr(assistant)
    assert MODEL in repr(assistant)


@contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        yield port


# --- voice and photos -----------------------------------------------------------------


async def test_voice_is_decoded_and_transcribed(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    frames = encode_lc3(synth_speech(1.2, seed=5))
    audio = b"".join(frames)
    assert {len(f) for f in frames} == {40}
    fake.transcribe = [transcript(" How far is home? ")]
    fake.chat = [stream(sse(["About 2 km."]), api=fake)]
    voice = assembled(
        "how far is hom", RequestKind.VOICE_QUERY, audio=audio, codec="lc3"
    )
    assert await collect(make(), voice) == ["About 2 km."]
    (upload,) = fake.uploads
    assert upload.model == "whisper-1"
    assert upload.filename.endswith(".wav")
    assert upload.content_type == "audio/wav"
    assert (upload.channels, upload.sample_width, upload.rate) == (1, 2, 16_000)
    assert upload.frames == 160 * len(frames)
    assert upload.peak > 1000  # speech, not silence
    assert user_content(fake.bodies[0]) == "How far is home?"
    assert fake.auth == [f"Bearer {KEY}"] * 2


async def test_transcription_failures_fall_back_to_the_hint(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    audio = b"".join(encode_lc3(synth_speech(0.3, seed=1)))
    fake.chat = [stream(sse(["Sure."]), api=fake)]
    assistant = make(transcribe_model="whisper-large-v3")
    fake.transcribe = [status(500)]  # retried once, then the hint
    voice = assembled("what time is it", RequestKind.VOICE_QUERY, audio=audio)
    assert await collect(assistant, voice) == ["Sure."]
    assert [u.model for u in fake.uploads] == ["whisper-large-v3"] * 2
    assert user_content(fake.bodies[-1]) == "what time is it"
    fake.transcribe = [status(404)]  # no transcription there: remembered
    for _ in range(2):
        assert await collect(assistant, voice) == ["Sure."]
    assert len(fake.uploads) == 3
    assert user_content(fake.bodies[-1]) == "what time is it"
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert "transcription failed (/audio/transcriptions: HTTP 500" in warnings[0]
    assert "HTTP 404" in warnings[1]
    # No transcript and no hint: nothing is asked.
    silent = assembled(None, RequestKind.VOICE_QUERY, audio=audio)
    assert await collect(assistant, silent) == [
        "I did not catch a question. Please ask again."
    ]
    assert len(fake.bodies) == 3


async def test_photo_goes_as_an_image_part(
    fake: FakeApi, make: Callable[..., OpenAIAssistant], logs: pytest.LogCaptureFixture
) -> None:
    photo = b"\xff\xd8\xff\xe0" + os.urandom(5000) + b"\xff\xd9"
    fake.chat = [stream(sse(["A mug", ", 4.50 EUR."]), api=fake)]
    ask = assembled("how much is this", RequestKind.PHOTO_QUERY, photo=photo)
    assert await collect(make(), ask) == ["A mug, 4.50 EUR."]
    text, image = user_content(fake.bodies[0])
    assert text == {"type": "text", "text": "how much is this"}
    assert image["type"] == "image_url"
    prefix = "data:image/jpeg;base64,"
    assert image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix) :]) == photo


# --- configuration --------------------------------------------------------------------


def test_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def parse(*argv: str) -> GatewayConfig:
        args = build_parser().parse_args(["--listen", "127.0.0.1:0", *argv])
        return config_from_args(args, tmp_path)

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError) as missing:
        parse("--assistant", "openai", "--base-url", "http://127.0.0.1:1/v1")
    assert str(missing.value) == (
        "--assistant openai needs --model NAME and the API key in $OPENAI_API_KEY"
    )
    with pytest.raises(ConfigError, match="only with --assistant openai"):
        parse("--model", "gpt-4o-mini")
    monkeypatch.setenv("QWEN_KEY", KEY)
    qwen = "https://dashscope.aliyuncs.com/compatible-mode/v1/"
    cfg = parse(
        "--assistant", "openai", "--base-url", qwen, "--model", "qwen-plus",
        "--api-key-env", "QWEN_KEY", "--timeout", "12", "--max-retry-wait", "2",
    )  # fmt: skip
    assert cfg.openai is not None
    assert cfg.openai == OpenAIConfig(
        qwen, "qwen-plus", "QWEN_KEY", "whisper-1", 12.0, 2.0
    )
    assert KEY not in repr(cfg)
    assert cfg.openai.describe() == f"model qwen-plus at {qwen.rstrip('/')}"
    assert not cfg.openai.cleartext_remote
    for url in ("ftp://host/v1", "https://user:pw@host/v1", "https:///v1"):
        with pytest.raises(ConfigError, match="--base-url"):
            OpenAIConfig(url, "m")
    good: dict[str, Any] = {"base_url": "http://127.0.0.1/v1", "model": "m"}
    for bad in ({"timeout_s": 0.0}, {"max_retry_wait_s": -1.0}, {"model": "a b"}):
        with pytest.raises(ConfigError):
            OpenAIConfig(**(good | bad))
    assert not OpenAIConfig("http://localhost:11434/v1", "llama3.2").cleartext_remote
    assert not OpenAIConfig("http://[::1]:8080/v1", "m").cleartext_remote
    assert OpenAIConfig("http://10.0.0.7:8080/v1", "m").cleartext_remote


async def test_cleartext_to_a_remote_host_is_warned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    remote = OpenAIConfig("http://192.0.2.7:8000/v1", MODEL)
    cfg = GatewayConfig(
        tmp_path, listen=(LOOPBACK, 0), assistant="openai", openai=remote
    )
    assistant = _assistant(cfg)
    assert isinstance(assistant, OpenAIAssistant)
    await assistant.aclose()
    assert "cleartext" in logs.text
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match=r"\$OPENAI_API_KEY"):
        GatewayConfig(tmp_path, listen=(LOOPBACK, 0), assistant="openai", openai=remote)


# --- end to end -----------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


async def test_gateway_answers_from_the_openai_backend_over_websocket(
    fake: FakeApi,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("GR_TEST_KEY", KEY)
    fake.chat = [
        stream(sse(["Your last", " message is", " from Alex.", " Reply?"]), api=fake)
    ]
    settings = OpenAIConfig(fake.base_url, MODEL, api_key_env="GR_TEST_KEY")
    cfg = config(state, listen=(LOOPBACK, 0), assistant="openai", openai=settings)
    phone = Phone(state)
    phone.register()
    async with running(cfg) as gateway, aiohttp.ClientSession() as http:
        url = f"ws://{LOOPBACK}:{gateway.ws_port}/v1/{phone.pseudonym}"
        async with http.ws_connect(url) as ws:

            async def pump() -> None:
                async for frame in ws:
                    if frame.type is aiohttp.WSMsgType.BINARY:
                        phone.feed(frame.data)

            reader = asyncio.create_task(pump())
            try:
                ask = request("read my last message", 5)
                await ws.send_bytes(encode_batch([phone.seal(ask)]))
                await phone.until(lambda: phone.answered(5))
            finally:
                reader.cancel()
                await asyncio.wait((reader,))
    assert check_answer(phone, 5) == "Your last message is from Alex. Reply?"
    assert user_content(fake.bodies[0]) == "read my last message"
    assert fake.auth == [f"Bearer {KEY}"]
    assert f"assistant openai (model {MODEL} at {fake.base_url})" in logs.text
    assert gateway.stats.assistant_errors == 0
