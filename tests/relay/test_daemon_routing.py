"""The daemon's request path on the real test bed: local answers, early media.

Emulated glasses (bumble) and the daemon in this process, no uplink: what the
phone can answer is answered on it (docs/router.md); media that arrives before
its request is held until the request is routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from daemon_bed import daemon_on_bed

from protocol.bodies import Request, RequestKind, ResponseText
from protocol.constants import MessageFlags, MessageKind
from protocol.message import Message
from relay.daemon import Daemon


def reliable(
    kind: MessageKind, body: bytes, rid: int, *, final: bool = False
) -> Message:
    flags = MessageFlags.RELIABLE | (MessageFlags.FINAL if final else MessageFlags.NONE)
    return Message(kind, bytes([rid, kind]) * 8, body, flags, rid)


async def ask_and_wait(tmp_path: Path, *, media_first: bool) -> tuple[str, str, Daemon]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    answers: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    # No uplink: the phone answers what it can.
    async with daemon_on_bed(state, None) as (daemon, bed):

        def on_response(message: Message, at: float) -> None:
            del at
            if message.kind is MessageKind.RESPONSE_TEXT:
                body = ResponseText.decode(message.body)
                answers.put_nowait((body.text, body.route or ""))

        bed.app.on_response = on_response
        task = asyncio.create_task(daemon.run())
        try:
            async with asyncio.timeout(30):
                await bed.app.wait_established()
                audio = bytes(400)
                request = Request(
                    RequestKind.VOICE_QUERY,
                    3000,
                    int(time.monotonic() * 1e6),
                    len(audio),
                    None,
                    "what is 12 times 7",
                    "lc3",
                )
                chunk = reliable(
                    MessageKind.AUDIO_CHUNK, bytes(4) + audio, 7, final=True
                )
                first = reliable(MessageKind.REQUEST, request.encode(), 7)
                for message in (chunk, first) if media_first else (first, chunk):
                    await bed.app.send(message)
                text, route = await answers.get()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await daemon.close()
    return text, route, daemon


async def test_phone_answers_what_it_can_without_an_uplink(tmp_path: Path) -> None:
    text, route, daemon = await ask_and_wait(tmp_path, media_first=False)
    assert route == "local"
    assert "84" in text
    trace = daemon.traces[7]
    assert trace.route == "local"
    assert "uplink" in trace.reason
    assert (trace.local_computed, trace.cloud_computed) == (True, False)


async def test_media_before_its_request_is_held_not_lost(tmp_path: Path) -> None:
    text, route, daemon = await ask_and_wait(tmp_path, media_first=True)
    assert (route, "84" in text) == ("local", True)
    assert daemon.stats.local_answers == 1
