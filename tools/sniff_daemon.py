"""``glasses-relay sniff --from-daemon``: record the running daemon's link.

The daemon must keep a rolling capture (``glasses-relay run --capture-ring
MINUTES``, relay/capture_ring.py). ``sniff`` finds it as ``glasses-relay
status`` does (``--port``, else the configuration's ``status.port``, else
the 0600 Unix socket in the state directory) and, every
:data:`~tools.sniff.FLUSH_INTERVAL_S`, asks for the link events after the
last one it has (``GET /capture/events?since=N``), bounded per answer by the
daemon. They become pcapng with the same synthesized connection, MTU
exchange and discovery as the other modes
(:class:`protocol.capture.stream.LinkCapture`): a link already up when the
recording starts is synthesized at its first value. Only what crosses the
link after the start is recorded (the ring's older minutes:
``POST /capture``); events the ring dropped before ``sniff`` read them are
counted as ``missed``. Values are ciphertext, so there is no ``--plaintext``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Final

import aiohttp

from protocol.capture import CaptureError
from protocol.capture.stream import EventKind, LinkCapture, LinkEvent, LinkInfo
from relay.capture_ring import NO_RING
from relay.errors import ConfigError
from tools.output import say
from tools.sniff import (
    FLUSH_INTERVAL_S,
    PROGRESS_INTERVAL_S,
    SniffOptions,
    finish,
    part_file,
    progress,
    stop_on_signals,
)
from tools.status import daemon_endpoint

__all__ = ["DaemonRecorder", "record_from_daemon"]

REQUEST_TIMEOUT_S: Final = 10.0
"""Longest wait for one answer of the daemon."""
NO_DAEMON: Final = (
    "no daemon is running for this state directory (start one with "
    "'glasses-relay run --capture-ring MINUTES')"
)


class DaemonRecorder:
    """Turns the daemon's ``/capture/events`` answers into pcapng bytes."""

    def __init__(self) -> None:
        """Start with no link known."""
        self._capture = LinkCapture(
            comment="Recorded by glasses-relay sniff --from-daemon "
            "from the daemon's capture ring."
        )
        self._infos: dict[int, LinkInfo] = {}
        self.last = 0
        """Number of the last event received (the next ``since``)."""
        self.values = 0
        """ATT values recorded."""
        self.missed = 0
        """Events the daemon's ring dropped before they were asked for."""
        self.packets = 0
        """Packets written so far."""
        self.bytes = 0
        """Bytes of pcapng produced so far."""

    def feed(self, doc: dict[str, object]) -> bytes:
        """The pcapng bytes of one answer.

        Raises:
            CaptureError: the answer is not a ``/capture/events`` document.
        """
        links, events, last = doc.get("links"), doc.get("events"), doc.get("last")
        missed = doc.get("missed", 0)
        if not isinstance(links, dict) or not isinstance(events, list):
            raise CaptureError("capture events: no links or events")
        if not isinstance(last, int) or not isinstance(missed, int):
            raise CaptureError("capture events: no last or missed")
        for number, info in links.items():
            try:
                self._infos[int(number)] = LinkInfo.from_json(info)
            except ValueError:
                raise CaptureError("capture events: a bad link number") from None
        out = []
        for item in events:
            event = LinkEvent.from_json(item)
            out.append(self._capture.feed(event, self._infos))
            if event.kind in (EventKind.NOTIFY, EventKind.WRITE):
                self.values += 1
            elif event.kind is EventKind.DOWN:
                self._infos.pop(event.link, None)
        self.missed += missed
        self.packets = self._capture.packets
        self.bytes = self._capture.bytes
        self.last = last
        return b"".join(out)


async def _events(
    client: aiohttp.ClientSession, base: str, since: int | None
) -> dict[str, object]:
    """One ``/capture/events`` answer.

    Raises:
        ConfigError: the daemon keeps no capture ring.
        aiohttp.ClientError, TimeoutError, ValueError: no usable answer.
    """
    query = "" if since is None else f"?since={since}"
    async with client.get(f"{base}/capture/events{query}") as response:
        if response.status == 404:
            raise ConfigError(NO_RING)
        response.raise_for_status()
        doc = await response.json()
    if not isinstance(doc, dict):
        raise CaptureError("capture events: not an object")
    return doc


async def record_from_daemon(
    options: SniffOptions, state_flag: str | None
) -> dict[str, object]:
    """Record ``options.duration`` seconds of the daemon's link into ``--out``.

    Raises:
        ConfigError: no daemon answers, or it keeps no capture ring.
    """
    endpoint = daemon_endpoint(state_flag, options.port)
    if endpoint is None:
        raise ConfigError(NO_DAEMON)
    connector, base = endpoint
    recorder = DaemonRecorder()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        try:
            recorder.feed(await _events(client, base, None))
        except ConfigError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"{NO_DAEMON}: {type(exc).__name__}") from None
        async with part_file(options.out) as (part, file):
            started = time.monotonic()
            with stop_on_signals() as stop:
                await _record(options, recorder, client, base, file.write, stop)
    return await finish(
        options,
        part,
        time.monotonic() - started,
        nothing=f"nothing crossed the daemon's link in {options.duration:g} s: "
        "nothing was recorded (are the glasses connected?)",
        extra={"missed": recorder.missed},
    )


async def _record(
    options: SniffOptions,
    recorder: DaemonRecorder,
    client: aiohttp.ClientSession,
    base: str,
    write: Callable[[bytes], object],
    stop: asyncio.Event,
) -> None:
    """Poll, write and show progress until the time is up (or ``stop``)."""
    started = time.monotonic()
    deadline = started + options.duration
    next_progress = started + PROGRESS_INTERVAL_S
    tty = sys.stderr.isatty()
    while (now := time.monotonic()) < deadline and not stop.is_set():
        await asyncio.sleep(min(FLUSH_INTERVAL_S, deadline - now))
        more = True
        while more:
            try:
                doc = await _events(client, base, recorder.last)
                chunk = recorder.feed(doc)
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                say(f"sniff: the daemon stopped answering ({type(exc).__name__})")
                progress(recorder, time.monotonic() - started, tty=tty, last=True)
                return
            except CaptureError as exc:
                raise ConfigError(f"the daemon's capture events: {exc}") from None
            if chunk:
                await asyncio.to_thread(write, chunk)
            more = doc.get("more") is True
        now = time.monotonic()
        if next_progress <= now < deadline and not stop.is_set():
            next_progress += PROGRESS_INTERVAL_S
            progress(recorder, now - started, tty=tty)
    progress(recorder, time.monotonic() - started, tty=tty, last=True)
