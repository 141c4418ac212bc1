"""The ``openai`` assistant: any OpenAI-compatible chat completions endpoint.

``glasses-relay cloud --assistant openai --base-url URL --model NAME`` answers
with OpenAI, Qwen through DashScope's compatible mode, a llama.cpp server or
Ollama: whatever speaks ``POST {base}/chat/completions`` with ``stream: true``
(server-sent events) and, for voice queries, ``POST {base}/audio/transcriptions``.

- **Voice**: the glasses' LC3 frames (10 ms, 16 kHz, 40 bytes) are decoded to
  16-bit PCM, wrapped as a WAV and transcribed; if that fails (or the endpoint
  has no transcription: HTTP 404, remembered), the glasses' transcript hint in
  the request's text is the question instead.
- **Photos** go as an ``image_url`` content part holding a ``data:`` URL.
- **Streaming**: text deltas are regrouped into sentence-sized pieces
  (:class:`SentenceSplitter`), so the first sentence goes down to the glasses
  while the rest is still being generated.
- **Errors**: HTTP 429 waits for ``retry-after`` (at most ``max_retry_wait_s``)
  and retries up to twice; a 5xx, a refused connection or a stream that ends
  before any text is retried once; a stream cut after some text ends the
  answer with :data:`CUT_NOTICE`; any other 4xx is one short piece of error
  text. What cannot be retried any more raises
  :class:`AssistantUnavailableError`, and the gateway apologises. One
  ``--timeout`` bounds the whole answer: transcription, waits and the stream.

The API key is sent as ``Authorization: Bearer ...`` and appears in no log,
repr or exception; logs carry statuses, sizes and durations, never questions,
answers or response bodies.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import io
import json
import logging
import random
import re
import sys
import wave
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

import aiohttp
import lc3

from relay.errors import RelayError
from tools.cloud.assistant import AssembledRequest
from tools.cloud.config import OpenAIConfig, parse_base_url

__all__ = [
    "CUT_NOTICE",
    "AssistantUnavailableError",
    "AudioError",
    "OpenAIAssistant",
    "SentenceSplitter",
    "SseDecoder",
    "lc3_to_wav",
]

logger = logging.getLogger(__name__)

CHAT_PATH: Final = "/chat/completions"
TRANSCRIBE_PATH: Final = "/audio/transcriptions"
CONNECT_TIMEOUT_S: Final = 5.0
RATE_LIMIT_RETRIES: Final = 2
"""Retries after HTTP 429."""
TRANSIENT_RETRIES: Final = 1
"""Retries after a 5xx, a failed connection or a stream ending before any text."""
DEFAULT_RETRY_WAIT_S: Final = 1.0
"""Wait after a 429 without a usable ``retry-after``."""
TRANSIENT_WAIT_S: Final = (0.2, 0.6)
"""Bounds of the uniform wait before retrying a transient failure."""
MAX_PIECE_CHARS: Final = 160
"""A piece is cut after this many characters when no sentence ends earlier."""
MAX_ANSWER_CHARS: Final = 4000
"""Text read from one stream; beyond it the answer ends with the cut notice."""
MAX_LINE_BYTES: Final = 1 << 20
"""Longest server-sent-events line; a longer one cuts the stream."""
MAX_JSON_BYTES: Final = 1 << 20
"""Largest non-streamed JSON body read (transcriptions, non-stream answers)."""
SAMPLE_RATE: Final = 16_000
LC3_FRAME_US: Final = 10_000
LC3_FRAME_BYTES: Final = 40
"""The glasses' LC3 frame: 10 ms at 32 kbit/s."""
MAX_TRANSCRIBE_S: Final = 300.0
"""Longer audio is not transcribed (the transcript hint is used)."""

CUT_NOTICE: Final = " (answer cut off)"
NO_QUESTION: Final = "I did not catch a question. Please ask again."
EMPTY_ANSWER: Final = "The assistant gave no answer. Please ask again."
PHOTO_QUESTION: Final = "What is in this photo?"
SYSTEM_PROMPT: Final = (
    "You are the assistant of a pair of smart glasses. Your answers are shown as "
    "text on the glasses' small display, a sentence at a time, while the user "
    "is walking or looking at something. Answer in plain text without markdown, "
    "lists or emoji, in at most three short sentences, and put the direct "
    "answer in the first sentence. Answer in the language of the question."
)


class AssistantUnavailableError(RelayError):
    """The endpoint could not answer: unreachable, overloaded or too slow.

    The message names the path and the status or the kind of failure, never
    the key, the question or a response body.
    """


class AudioError(ValueError):
    """The request's audio cannot be decoded for transcription."""


class _RefusedError(Exception):
    """A 4xx (other than 429) or another status that is not worth retrying."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason


class _StreamCutError(Exception):
    """The stream ended before ``[DONE]`` or a finish reason of ``stop``."""


# --- server-sent events ------------------------------------------------------------

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class SseDecoder:
    """Server-sent events, fed in chunks split anywhere; yields ``data`` payloads.

    Lines end with CRLF, LF or CR (a CR at the end of a chunk waits for the
    next one, in case an LF follows). ``data:`` lines accumulate; a blank line
    dispatches them joined by newlines. Comments (``:``), ``event:``, ``id:``
    and ``retry:`` lines are ignored. Lines are decoded as UTF-8 only once
    complete, so a character split across chunks is whole again.

    Args:
        max_line: Longest line accepted (the overflow policy: an error).
    """

    __slots__ = ("_data", "_max_line", "_pending", "_started")

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        """Start with nothing pending."""
        self._pending = bytearray()
        self._data: list[str] = []
        self._max_line = max_line
        self._started = False

    def feed(self, chunk: bytes) -> list[str]:
        """Take the next bytes of the stream; return the events they complete.

        Raises:
            ValueError: a line longer than ``max_line``.
        """
        self._pending += chunk
        events: list[str] = []
        start = 0
        for match in _LINE_END.finditer(self._pending):
            if match.group() == b"\r" and match.end() == len(self._pending):
                break  # maybe the first half of a CRLF
            self._line(bytes(self._pending[start : match.start()]), events)
            start = match.end()
        del self._pending[:start]
        if len(self._pending) > self._max_line:
            raise ValueError(f"server-sent-events line over {self._max_line} bytes")
        return events

    def close(self) -> list[str]:
        """The stream ended: dispatch what complete lines left pending.

        An unterminated last line is dropped (it is most likely cut).
        """
        events: list[str] = []
        if self._pending.endswith(b"\r"):
            self._line(bytes(self._pending[:-1]), events)
        self._pending.clear()
        self._line(b"", events)
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value.removeprefix(" "))


# --- sentence-sized pieces ----------------------------------------------------------

_SENTENCE_END: Final = re.compile(
    r"[.!?…]+[\"'”’)\]»]*(?=\s)|[。！？]+[”’」』）)]*"  # noqa: RUF001 - closing marks
)
_LAST_WORD: Final = re.compile(r"(\S+)$")
_ABBREVIATIONS: Final = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "e.g", "i.e", "vs", "approx", "ca")
)


def _ends_sentence(text: str, start: int) -> bool:
    """Whether the punctuation at ``text[start]`` ends a sentence.

    Not after an abbreviation ("Dr.") or a list number at the start of a line.
    """
    if text[start] != "." or text[start : start + 2] == "..":
        return True
    word = _LAST_WORD.search(text, 0, start)
    if word is None:
        return True
    token = word[1]
    if token.lower() in _ABBREVIATIONS:
        return False
    at_line_start = word.start() == 0 or text[word.start() - 1] == "\n"
    return not (token.isdigit() and at_line_start)


class SentenceSplitter:
    """Regroup streamed text deltas into sentence-sized pieces.

    A piece is cut after a sentence end (``.``, ``!``, ``?`` or ``…`` followed
    by white space, or a full-width CJK one), or at the last space before
    ``max_chars`` when no sentence ends sooner. White space after a sentence
    end starts the next piece, so the pieces joined are the text (less leading
    white space).

    Args:
        max_chars: Longest piece without a sentence end.
    """

    __slots__ = ("_buffer", "_max_chars", "received")

    def __init__(self, max_chars: int = MAX_PIECE_CHARS) -> None:
        """Start empty."""
        self._buffer = ""
        self._max_chars = max_chars
        self.received = 0
        """Characters taken so far (leading white space excluded)."""

    def feed(self, text: str) -> list[str]:
        """Take the next delta; return the pieces it completes."""
        if not self.received:
            text = text.lstrip()
        self.received += len(text)
        self._buffer += text
        pieces: list[str] = []
        while (cut := self._cut()) is not None:
            pieces.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
        return pieces

    def flush(self) -> str | None:
        """The text left at the end, or None if it is only white space."""
        rest, self._buffer = self._buffer, ""
        return rest if rest.strip() else None

    def _cut(self) -> int | None:
        buffer = self._buffer
        for match in _SENTENCE_END.finditer(buffer):
            if match.start() and _ends_sentence(buffer, match.start()):
                return match.end()
        if len(buffer) >= self._max_chars:
            space = buffer.rfind(" ", self._max_chars // 2, self._max_chars)
            return space if space > 0 else self._max_chars
        return None


# --- audio --------------------------------------------------------------------------


def lc3_to_wav(frames: bytes, frame_bytes: int = LC3_FRAME_BYTES) -> bytes:
    """Decode concatenated LC3 frames (10 ms, 16 kHz) into a mono 16-bit WAV.

    CPU work: call it through ``asyncio.to_thread``.

    Raises:
        AudioError: no frames, a length that is not whole frames, or too long.
    """
    if not frames or len(frames) % frame_bytes:
        raise AudioError(f"{len(frames)} bytes are not whole {frame_bytes}-byte frames")
    count = len(frames) // frame_bytes
    if count * LC3_FRAME_US / 1e6 > MAX_TRANSCRIBE_S:
        raise AudioError(f"{count} frames are more than {MAX_TRANSCRIBE_S:g} s")
    decoder = lc3.Decoder(LC3_FRAME_US, SAMPLE_RATE)
    pcm = bytearray()
    view = memoryview(frames)
    for offset in range(0, len(frames), frame_bytes):
        pcm += decoder.decode(view[offset : offset + frame_bytes], bit_depth=16)
    if sys.byteorder == "big":  # lc3 writes native order; WAV is little-endian
        samples = array.array("h", pcm)
        samples.byteswap()
        pcm = bytearray(samples.tobytes())
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


# --- the backend --------------------------------------------------------------------


@dataclass(slots=True)
class _Retries:
    """Retries one call (transcription or chat completion) has used."""

    rate_limited: int = 0
    transient: int = 0


@dataclass(frozen=True, slots=True)
class _Chunk:
    text: str = ""
    finish: str | None = None
    done: bool = False


def _parse_event(data: str) -> _Chunk:
    """One ``data`` payload of the stream.

    Raises:
        _StreamCutError: the server reported an error inside the stream.
    """
    if data.strip() == "[DONE]":
        return _Chunk(done=True)
    try:
        doc = json.loads(data)
    except ValueError:
        logger.debug(
            "openai assistant: skipped a malformed event (%d chars)", len(data)
        )
        return _Chunk()
    if not isinstance(doc, dict):
        return _Chunk()
    if doc.get("error") is not None:
        raise _StreamCutError("error event")
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return _Chunk()  # e.g. the usage chunk
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else None
    finish = choice.get("finish_reason")
    return _Chunk(
        text if isinstance(text, str) else "",
        finish if isinstance(finish, str) else None,
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or a date)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _refusal(status: int) -> str:
    """The piece shown on the glasses when the endpoint refuses a question."""
    if status in (401, 403):
        return f"The assistant service refused the gateway's API key (HTTP {status})."
    if status == 404:
        return f"The assistant service has no such model or address (HTTP {status})."
    if status == 413:
        return f"The question was too large for the assistant (HTTP {status})."
    return f"The assistant service refused the question (HTTP {status})."


def _image_type(photo: bytes, codec: str | None) -> str:
    if photo.startswith(b"\x89PNG"):
        return "image/png"
    if photo.startswith(b"RIFF") and photo[8:12] == b"WEBP":
        return "image/webp"
    if photo.startswith(b"\xff\xd8") or codec in (None, "jpeg", "jpg"):
        return "image/jpeg"
    return f"image/{codec}"


def _message_text(doc: object) -> str:
    """The answer of a non-streamed chat completion.

    Raises:
        _StreamCutError: it holds no message text.
    """
    try:
        text = doc["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError) as exc:
        raise _StreamCutError("no message in the JSON answer") from exc
    if not isinstance(text, str):
        raise _StreamCutError("no message in the JSON answer")
    return text


async def _read_json(response: aiohttp.ClientResponse) -> object:
    """Read a bounded JSON body.

    Raises:
        _StreamCutError: larger than :data:`MAX_JSON_BYTES`, or not JSON.
    """
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise _StreamCutError(f"JSON body over {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise _StreamCutError("malformed JSON body") from exc


class OpenAIAssistant:
    """An :class:`~tools.cloud.assistant.Assistant` over an OpenAI-compatible API.

    One ``aiohttp.ClientSession`` per instance, opened on first use; call
    :meth:`aclose` at shutdown.

    Args:
        settings: Endpoint, model, timeouts.
        api_key: The bearer token (read from the environment by the caller).
    """

    __slots__ = (
        "_api_key",
        "_base",
        "_closed",
        "_rng",
        "_session",
        "_settings",
        "_transcription",
    )

    def __init__(self, settings: OpenAIConfig, api_key: str) -> None:
        """Prepare; nothing touches the network before the first answer."""
        self._settings = settings
        self._api_key = api_key
        self._base = parse_base_url(settings.base_url)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._transcription = True
        self._rng = random.Random()

    def __repr__(self) -> str:
        """Model and endpoint, never the key."""
        return f"OpenAIAssistant({self._settings.describe()})"

    @property
    def name(self) -> str:
        """``openai``."""
        return "openai"

    @property
    def settings(self) -> OpenAIConfig:
        """The endpoint's configuration (it holds no key)."""
        return self._settings

    async def aclose(self) -> None:
        """Close the HTTP session; call once, at gateway shutdown."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise AssistantUnavailableError("the openai assistant is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}"}
            )
        return self._session

    async def answer(self, request: AssembledRequest) -> AsyncIterator[str]:
        """Stream the answer to ``request`` in sentence-sized pieces.

        Raises:
            AssistantUnavailableError: the endpoint stayed unreachable,
                overloaded or silent (after the retries, within the timeout).
        """
        started = asyncio.get_running_loop().time()
        deadline = started + self._settings.timeout_s
        question = await self._question(request, deadline)
        if not question and not request.photo:
            yield NO_QUESTION
            return
        content: str | list[dict[str, Any]] = question
        if request.photo:
            mime = _image_type(request.photo, request.request.codec)
            url = f"data:{mime};base64,{base64.b64encode(request.photo).decode()}"
            content = [
                {"type": "text", "text": question or PHOTO_QUESTION},
                {"type": "image_url", "image_url": {"url": url}},
            ]
        body = {
            "model": self._settings.model,
            "stream": True,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": content},
            ],
        }
        async for piece in self._chat(body, started, deadline):
            yield piece

    # --- transcription ---------------------------------------------------------------

    async def _question(self, request: AssembledRequest, deadline: float) -> str:
        """The question: the transcribed audio, else the request's text."""
        hint = (request.request.text or "").strip()
        if not request.audio or not self._transcription:
            return hint
        text = await self._transcribe(request, deadline)
        return text or hint

    async def _transcribe(
        self, request: AssembledRequest, deadline: float
    ) -> str | None:
        """The transcript, or None after logging one warning."""
        codec = (request.request.codec or "lc3").lower()
        if codec != "lc3":
            logger.warning(
                "openai assistant: cannot transcribe %s audio; using the transcript "
                "hint",
                codec,
            )
            return None
        try:
            wav = await asyncio.to_thread(lc3_to_wav, request.audio)
        except AudioError as exc:
            logger.warning("openai assistant: %s; using the transcript hint", exc)
            return None

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("model", self._settings.transcribe_model)
            data.add_field("response_format", "json")
            data.add_field("file", wav, filename="speech.wav", content_type="audio/wav")
            return data

        started = asyncio.get_running_loop().time()
        try:
            response = await self._post(TRANSCRIBE_PATH, form, deadline, _Retries())
            async with response:
                doc = await _read_json(response)
        except _RefusedError as exc:
            if exc.status == 404:
                self._transcription = False
                logger.warning(
                    "openai assistant: %s has no %s (HTTP 404); using the glasses' "
                    "transcript hints from now on",
                    self._base,
                    TRANSCRIBE_PATH,
                )
            else:
                logger.warning(
                    "openai assistant: transcription refused: HTTP %d %s; using the "
                    "transcript hint",
                    exc.status,
                    exc.reason,
                )
            return None
        except (AssistantUnavailableError, _StreamCutError) as exc:
            logger.warning(
                "openai assistant: transcription failed (%s); using the transcript "
                "hint",
                exc,
            )
            return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning(
                "openai assistant: transcription failed (%s); using the transcript "
                "hint",
                type(exc).__name__,
            )
            return None
        text = doc.get("text") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            logger.warning(
                "openai assistant: the transcription had no text; using the "
                "transcript hint"
            )
            return None
        logger.debug(
            "openai assistant: transcribed %d bytes of audio in %.2f s (%d chars)",
            len(wav),
            asyncio.get_running_loop().time() - started,
            len(text),
        )
        return text.strip()

    # --- chat ------------------------------------------------------------------------

    async def _chat(
        self, body: dict[str, Any], started: float, deadline: float
    ) -> AsyncIterator[str]:
        """Stream one chat completion as pieces, retrying what may be retried."""
        loop = asyncio.get_running_loop()
        retries = _Retries()
        splitter = SentenceSplitter()
        first = True
        while True:
            try:
                response = await self._post(CHAT_PATH, lambda: body, deadline, retries)
            except _RefusedError as exc:
                logger.warning(
                    "openai assistant: chat completion refused: HTTP %d %s",
                    exc.status,
                    exc.reason,
                )
                yield _refusal(exc.status)
                return
            cut: str | None = None
            async with response, contextlib.aclosing(self._deltas(response)) as deltas:
                try:
                    async for text in deltas:
                        for piece in splitter.feed(text):
                            if first:
                                first = False
                                logger.debug(
                                    "openai assistant: first piece after %.2f s",
                                    loop.time() - started,
                                )
                            yield piece
                        if splitter.received > MAX_ANSWER_CHARS:
                            cut = f"over {MAX_ANSWER_CHARS} characters"
                            break
                except _StreamCutError as exc:
                    cut = str(exc)
            if cut is not None and not splitter.received:
                if retries.transient < TRANSIENT_RETRIES:
                    retries.transient += 1
                    logger.info(
                        "openai assistant: the stream ended before any text (%s); "
                        "retrying",
                        cut,
                    )
                    await self._pause(self._rng.uniform(*TRANSIENT_WAIT_S), deadline)
                    continue
                raise AssistantUnavailableError(
                    f"{CHAT_PATH}: the stream ended before any text ({cut})"
                )
            break
        rest = splitter.flush()
        if rest is not None:
            yield rest
        if cut is not None:
            logger.warning(
                "openai assistant: the answer was cut off after %d chars (%s)",
                splitter.received,
                cut,
            )
            yield CUT_NOTICE
        elif not splitter.received:
            yield EMPTY_ANSWER
        logger.debug(
            "openai assistant: %d chars in %.2f s",
            splitter.received,
            loop.time() - started,
        )

    async def _deltas(
        self, response: aiohttp.ClientResponse
    ) -> AsyncGenerator[str, None]:
        """The text deltas of one 2xx response (streamed, or one JSON body).

        Raises:
            _StreamCutError: the stream broke, reported an error, or ended
                without ``[DONE]`` or a ``stop`` finish reason.
        """
        try:
            if response.content_type == "application/json":  # stream: true ignored
                yield _message_text(await _read_json(response))
                return
            decoder = SseDecoder()
            finish: str | None = None
            done = False
            async for chunk in response.content.iter_any():
                for data in decoder.feed(chunk):
                    event = _parse_event(data)
                    finish, done = event.finish or finish, event.done
                    if done:
                        break
                    if event.text:
                        yield event.text
                if done:
                    break
            else:
                for data in decoder.close():
                    event = _parse_event(data)
                    finish, done = event.finish or finish, event.done
                    if event.text:
                        yield event.text
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _StreamCutError(type(exc).__name__) from exc
        except ValueError as exc:  # an over-long line
            raise _StreamCutError(str(exc)) from exc
        if done:
            finish = finish or "stop"
        if finish is None:
            raise _StreamCutError("the stream ended without [DONE]")
        if finish not in ("stop", "tool_calls"):
            raise _StreamCutError(f"finish reason {finish}")

    # --- HTTP ------------------------------------------------------------------------

    async def _post(
        self,
        path: str,
        body: Callable[[], dict[str, Any] | aiohttp.FormData],
        deadline: float,
        retries: _Retries,
    ) -> aiohttp.ClientResponse:
        """POST ``body()`` to ``{base}{path}``; return the 2xx response.

        Retries 429 (after ``retry-after``, bounded) and transient failures;
        the caller releases the response.

        Raises:
            _RefusedError: a status not worth retrying.
            AssistantUnavailableError: no success within the retries or time.
        """
        loop = asyncio.get_running_loop()
        url = self._base + path
        session = self._http()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssistantUnavailableError(
                    f"{path}: no answer within {self._settings.timeout_s:g} s"
                )
            timeout = aiohttp.ClientTimeout(
                total=remaining, connect=min(CONNECT_TIMEOUT_S, remaining)
            )
            payload = body()
            kwargs: dict[str, Any] = (
                {"data": payload}
                if isinstance(payload, aiohttp.FormData)
                else {"json": payload}
            )
            try:
                response = await session.post(
                    url, timeout=timeout, allow_redirects=False, **kwargs
                )
            except TimeoutError as exc:
                raise AssistantUnavailableError(
                    f"{path}: no response within {self._settings.timeout_s:g} s"
                ) from exc
            except aiohttp.ClientError as exc:
                if retries.transient >= TRANSIENT_RETRIES:
                    raise AssistantUnavailableError(
                        f"{path}: {type(exc).__name__}"
                    ) from exc
                retries.transient += 1
                wait = self._rng.uniform(*TRANSIENT_WAIT_S)
                logger.info(
                    "openai assistant: %s failed (%s); retrying in %.1f s",
                    path,
                    type(exc).__name__,
                    wait,
                )
                await self._pause(wait, deadline)
                continue
            status, reason = response.status, response.reason or ""
            if 200 <= status < 300:
                return response
            after = _retry_after(response.headers)
            response.release()
            if status == 429 and retries.rate_limited < RATE_LIMIT_RETRIES:
                retries.rate_limited += 1
                wait = DEFAULT_RETRY_WAIT_S if after is None else after
                wait = min(wait, self._settings.max_retry_wait_s)
            elif status >= 500 and retries.transient < TRANSIENT_RETRIES:
                retries.transient += 1
                wait = self._rng.uniform(*TRANSIENT_WAIT_S)
                if after is not None:
                    wait = min(after, self._settings.max_retry_wait_s)
            elif status == 429 or status >= 500:
                raise AssistantUnavailableError(f"{path}: HTTP {status} {reason}")
            else:
                raise _RefusedError(status, reason)
            logger.info(
                "openai assistant: %s: HTTP %d %s; retrying in %.1f s",
                path,
                status,
                reason,
                wait,
            )
            await self._pause(wait, deadline)

    async def _pause(self, wait: float, deadline: float) -> None:
        """Sleep ``wait`` seconds before a retry, unless that passes the deadline.

        Raises:
            AssistantUnavailableError: the retry would start after the deadline.
        """
        if asyncio.get_running_loop().time() + wait >= deadline:
            raise AssistantUnavailableError(
                f"no answer within {self._settings.timeout_s:g} s"
            )
        await asyncio.sleep(wait)
