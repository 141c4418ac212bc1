"""The local status API: ``/healthz``, ``/metrics`` (Prometheus), ``/status`` (JSON).

With the daemon's rolling capture (``--capture-ring``): ``POST /capture``
writes it to a file and returns the path, ``GET /capture.pcapng`` returns it,
``GET /capture/events?since=N`` returns the link events after number ``N``
(``glasses-relay sniff --from-daemon``). Without one, these answer 404 with
one line saying how to turn it on.

Served with aiohttp on a Unix socket with mode 0600 in the state directory
(``<state>/phone/status.sock``), or on 127.0.0.1:PORT when configured, never
on a public address. ``glasses-relay status`` finds the socket through the
state directory. A socket left by a daemon that was killed is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from relay.capture_ring import NO_RING
from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.capture_ring import CaptureRing

__all__ = ["SOCKET_NAME", "StatusServer", "socket_path"]

_LOGGER: Final = logging.getLogger(__name__)

SOCKET_NAME: Final = "status.sock"
StatusFn = Callable[[], dict[str, object]]
_BUCKETS: Final = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` serves its status."""
    return state_dir / "phone" / SOCKET_NAME


def _remove_stale(path: Path) -> None:
    """Remove a socket no daemon answers on (left by a SIGKILL)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError(f"another daemon is running with this state directory ({path})")


class _Metrics(Collector):
    """Builds the Prometheus families from the daemon's status snapshot."""

    def __init__(self, status: StatusFn) -> None:
        self._status = status

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus' own protocol
        doc = self._status()
        link = doc["link"]
        uplink = doc["uplink"]
        outbox = doc["outbox"]
        assert isinstance(link, dict)  # noqa: S101
        assert isinstance(uplink, dict)  # noqa: S101
        assert isinstance(outbox, dict)  # noqa: S101
        up = GaugeMetricFamily(
            "glasses_relay_link_up", "1 when a session with the glasses is up"
        )
        up.add_metric([], 1.0 if link.get("state") == "connected" else 0.0)
        yield up
        for direction in ("in", "out"):
            frames = CounterMetricFamily(
                f"glasses_relay_link_frames_{direction}",
                "GATT values " + ("received" if direction == "in" else "written"),
            )
            frames.add_metric([], float(link.get(f"frames_{direction}", 0)))
            yield frames
            size = CounterMetricFamily(
                f"glasses_relay_link_bytes_{direction}",
                f"bytes {direction} on the BLE link",
            )
            size.add_metric([], float(link.get(f"bytes_{direction}", 0)))
            yield size
        drops = CounterMetricFamily(
            "glasses_relay_drops",
            "records dropped, by layer and reason",
            labels=["layer", "reason"],
        )
        for layer in ("reassembly", "crypto"):
            table = link.get(f"{layer}_drops", {})
            assert isinstance(table, dict)  # noqa: S101
            for reason, count in table.items():
                drops.add_metric([layer, str(reason)], float(count))
        yield drops
        for name, key, text in (
            ("glasses_relay_outbox_depth", "rows", "messages waiting in the outbox"),
            ("glasses_relay_outbox_bytes", "bytes", "bytes waiting in the outbox"),
            (
                "glasses_relay_outbox_oldest_age_seconds",
                "oldest_age_s",
                "age of the oldest row",
            ),
            (
                "glasses_relay_outbox_unwritten",
                "unwritten",
                "messages sent and held in memory, not yet written",
            ),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], float(outbox.get(key) or 0))
            yield gauge
        never = CounterMetricFamily(
            "glasses_relay_outbox_acked_unwritten",
            "messages the gateway acknowledged before they were written",
        )
        never.add_metric([], float(outbox.get("acked_unwritten") or 0))
        yield never
        connected = GaugeMetricFamily(
            "glasses_relay_uplink_up", "1 when the uplink is connected"
        )
        connected.add_metric([], 1.0 if uplink.get("state") == "connected" else 0.0)
        yield connected
        inflight = GaugeMetricFamily(
            "glasses_relay_uplink_in_flight",
            "envelopes sent, awaiting the gateway's signed ack",
        )
        inflight.add_metric([], float(uplink.get("in_flight", 0)))
        yield inflight
        requests = CounterMetricFamily(
            "glasses_relay_requests",
            "requests by route and outcome",
            labels=["route", "outcome"],
        )
        histogram = HistogramMetricFamily(
            "glasses_relay_response_seconds",
            "end of capture on the glasses to the first answer byte sent to them",
        )
        counts: dict[tuple[str, str], int] = {}
        times: list[float] = []
        recent = doc.get("requests", [])
        assert isinstance(recent, list)  # noqa: S101
        for item in recent:
            assert isinstance(item, dict)  # noqa: S101
            response = item.get("response_ms")
            outcome = (
                "pending"
                if response is None
                else ("within_budget" if float(response) <= 3000 else "late")
            )
            label = (str(item.get("route")), outcome)
            counts[label] = counts.get(label, 0) + 1
            if response is not None:
                times.append(float(response) / 1000)
        for (route, outcome), count in counts.items():
            requests.add_metric([route, outcome], float(count))
        yield requests
        buckets = [(str(b), float(sum(1 for t in times if t <= b))) for b in _BUCKETS]
        buckets.append(("+Inf", float(len(times))))
        histogram.add_metric([], buckets, sum(times))
        yield histogram


class StatusServer:
    """Serves the daemon's status until :meth:`close`."""

    def __init__(
        self,
        status: StatusFn,
        *,
        state_dir: Path,
        tcp_port: int | None = None,
        capture: CaptureRing | None = None,
    ) -> None:
        """``status`` returns the /status document; nothing is served until start."""
        self._status = status
        self._capture = capture
        self._state_dir = state_dir
        self._tcp_port = tcp_port
        self._runner: web.AppRunner | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Metrics(status))
        self.started = time.monotonic()
        self.where = ""

    async def start(self) -> None:
        """Listen on the Unix socket (or loopback TCP).

        Raises:
            ConfigError: another daemon serves this state directory.
        """
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_json)
        app.router.add_post("/capture", self._capture_write)
        app.router.add_get("/capture.pcapng", self._capture_pcapng)
        app.router.add_get("/capture/events", self._capture_events)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if self._tcp_port is not None:
            site: web.BaseSite = web.TCPSite(self._runner, "127.0.0.1", self._tcp_port)
            self.where = f"http://127.0.0.1:{self._tcp_port}"
        else:
            path = socket_path(self._state_dir)
            _remove_stale(path)
            old = os.umask(0o177)
            try:
                site = web.UnixSite(self._runner, str(path))
                await site.start()
            finally:
                os.umask(old)
            path.chmod(0o600)
            self.where = str(path)
            _LOGGER.info("status API on %s", self.where)
            return
        await site.start()
        _LOGGER.info("status API on %s", self.where)

    async def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._tcp_port is None:
            with contextlib.suppress(FileNotFoundError):
                socket_path(self._state_dir).unlink()

    async def _healthz(self, request: web.Request) -> web.Response:
        del request
        return web.json_response({"ok": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        del request
        body = generate_latest(self._registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def _status_json(self, request: web.Request) -> web.Response:
        del request
        return web.json_response(self._status())

    def _ring(self) -> CaptureRing:
        if self._capture is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": NO_RING}), content_type="application/json"
            )
        return self._capture

    async def _capture_write(self, request: web.Request) -> web.Response:
        del request
        ring = self._ring()
        try:
            path = await ring.write()
        except OSError as exc:
            _LOGGER.warning("capture ring: cannot write: %s", exc)
            return web.json_response(
                {"error": f"cannot write the capture: {exc.strerror or exc}"},
                status=500,
            )
        size = (await asyncio.to_thread(path.stat)).st_size
        return web.json_response(
            {"path": str(path), "bytes": size, "ring": ring.stats()}
        )

    async def _capture_pcapng(self, request: web.Request) -> web.Response:
        del request
        data = await self._ring().pcapng()
        return web.Response(
            body=data,
            content_type="application/x-pcapng",
            headers={"Content-Disposition": 'attachment; filename="ring.pcapng"'},
        )

    async def _capture_events(self, request: web.Request) -> web.Response:
        ring = self._ring()
        raw = request.query.get("since")
        since: int | None = None
        if raw is not None:
            try:
                since = int(raw)
            except ValueError:
                since = -1
            if since < 0:
                return web.json_response(
                    {"error": "since: a number of 0 or more"}, status=400
                )
        return web.json_response(ring.batch(since))
