"""``glasses-relay bench latency``: the router against always-cloud and always-local.

One seeded request mix (:func:`make_plan`) is played once per strategy through
the real path: emulated glasses on the bumble test bed -> the daemon (its BLE
link, Noise session, router, phone-side skills, outbox and WebSocket uplink)
-> the trace-driven shaper (:class:`tools.netem.proxy.NetemProxy`, a mahimahi
trace per direction, base round trips from the Speedtest data and the radio's
RRC wake-up after 10 s idle) -> the reference gateway with the built-in
assistant's latency model (lognormal, median 0.8 s, p95 2.0 s).

Each strategy runs in its own process (a *lane*, :func:`lane_main`) with its
own daemon, shaper and gateway; the lanes run side by side and differ only in
routing: ``router`` (the deadline-aware :func:`relay.router.decide.decide`),
``always_cloud`` (everything the cloud can answer goes to the cloud) and
``always_local`` (everything the phone can answer is answered on the phone).
``oracle`` is computed, not run: per request, the better of what
``always_cloud`` and ``always_local`` actually got.

Time is compressed only by skipping idle gaps: between two requests the
shaper's trace clock jumps to the next arrival (:meth:`NetemProxy.skip`),
never by scaling. Every request therefore meets the traces at the same offset
in every lane, and the request's message ids (which seed the assistant's
first-token draw) are derived from the seed, so the cloud is as slow for
request *i* in every lane.

Scoring (the issue's fixed rules): phone-only kinds score 1.0 answered
locally; "either" kinds 1.0 from the cloud, 0.6 from the phone; cloud-only
kinds 1.0 from the cloud; a holding reply is not an answer. A request's
utility is the best score among the answers that reached the glasses within
the deadline (from the end of the utterance or photo capture, BLE upload
included), 0 if none did; it gives up at 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from protocol.bodies import Event, EventType, Request, RequestKind, ResponseText
from protocol.constants import MessageFlags, MessageKind
from protocol.errors import RemoteProtocolError
from protocol.message import Message
from relay.errors import ConfigError
from tools.bench.children import code_env, module_command

__all__ = [
    "CLASSES",
    "DEFAULT_REQUESTS",
    "GIVE_UP_S",
    "STRATEGIES",
    "LaneResult",
    "PlannedRequest",
    "RequestOutcome",
    "lane_main",
    "make_plan",
    "run_bench",
    "run_lane",
    "score",
    "summarize",
]

DEFAULT_REQUESTS: Final = 120
GIVE_UP_S: Final = 10.0
"""A request with no useful answer this long after capture end counts as late."""
MEAN_GAP_S: Final = 20.0
"""Mean time between two requests (Poisson arrivals)."""
PHOTO_BYTES: Final = 100_000
PHOTO_LEAD_S: Final = 1.0
"""Spoken lead-in of a photo question ("how much is this?") before the capture."""
STRATEGIES: Final = ("router", "always_cloud", "always_local")
CLASSES: Final = ("phone_only", "either", "cloud_only")
QUALITY: Final = {
    ("phone_only", "local"): 1.0,
    ("either", "cloud"): 1.0,
    ("either", "local"): 0.6,
    ("cloud_only", "cloud"): 1.0,
}
"""Score of an answer by request class and the route that produced it."""
BARCODE: Final = "4006381333931"
"""The EAN-13 in the barcode photos (a product of the skills' demo catalogue)."""

# (weight, class, kind, text, intent, voice seconds range or None for a photo)
_TEMPLATES: Final[tuple[tuple[float, str, RequestKind, str, str | None, bool], ...]] = (
    (0.05, "phone_only", RequestKind.TIME, "what time is it", None, False),
    (0.04, "phone_only", RequestKind.BATTERY, "how is my battery", None, False),
    (0.04, "phone_only", RequestKind.MEDIA, "next track", "next", False),
    (0.03, "phone_only", RequestKind.VOLUME, "volume up", "up", False),
    (
        0.04,
        "phone_only",
        RequestKind.TIMER,
        "set a timer for five minutes",
        None,
        False,
    ),
    (0.20, "either", RequestKind.VOICE_QUERY, "what is 12 times 7", None, False),
    (0.10, "either", RequestKind.NAVIGATION, "what's my next turn", "next_step", False),
    (0.05, "either", RequestKind.VOICE_QUERY, "say that again", "repeat", False),
    (0.15, "either", RequestKind.PHOTO_QUERY, "how much is this", "barcode", True),
    (0.15, "cloud_only", RequestKind.VOICE_QUERY, "", None, False),
    (
        0.10,
        "cloud_only",
        RequestKind.PHOTO_QUERY,
        "is this cheaper online",
        "price",
        True,
    ),
    (0.05, "cloud_only", RequestKind.PAYMENT, "pay for the coffee", "pay", False),
)
"""The request mix: 20% phone-only, 50% either, 30% cloud-only; 25% photos."""
_OPEN_QUESTIONS: Final = (
    "why is the sky blue",
    "what should I cook tonight",
    "who painted this ceiling",
    "summarise my unread messages",
    "how do plants make sugar",
)


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of the seeded mix.

    Attributes:
        index: Position in the plan (0-based).
        arrival_s: When the user starts (wake word), seconds of trace time.
        klass: ``phone_only``, ``either`` or ``cloud_only`` (fixed for scoring).
        kind: The request kind.
        text: The glasses' transcript hint.
        intent: The glasses' intent hint.
        voice_s: Seconds of speech (0 for a photo).
        photo: Whether a ~100 KB photo follows (its capture ends the request).
    """

    index: int
    arrival_s: float
    klass: str
    kind: RequestKind
    text: str
    intent: str | None
    voice_s: float
    photo: bool

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.name.lower()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PlannedRequest:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["kind"] = RequestKind[str(values["kind"]).upper()]
        return cls(**values)  # type: ignore[arg-type]


def make_plan(requests: int, seed: int) -> list[PlannedRequest]:
    """The seeded request mix: Poisson arrivals (mean gap 20 s), kinds by weight.

    Raises:
        ConfigError: ``requests`` is not positive.
    """
    if requests <= 0:
        raise ConfigError(f"--requests {requests}: must be at least 1")
    rng = random.Random(f"glasses-relay latency plan {seed}")
    weights = [t[0] for t in _TEMPLATES]
    plan = []
    at = 5.0
    for index in range(requests):
        _, klass, kind, text, intent, photo = rng.choices(_TEMPLATES, weights)[0]
        if not text:  # an open question: a new one each time (no cache hit)
            text = f"{rng.choice(_OPEN_QUESTIONS)} (question {index})"
        voice_s = 0.0 if photo else round(rng.uniform(2.0, 5.0), 1)
        plan.append(
            PlannedRequest(
                index, round(at, 3), klass, kind, text, intent, voice_s, photo
            )
        )
        at += rng.expovariate(1 / MEAN_GAP_S)
    return plan


def score(klass: str, route: str | None) -> float:
    """The score of an answer from ``route`` to a request of class ``klass``."""
    if route is None:
        return 0.0
    return QUALITY.get((klass, route), 0.0)


@dataclass(slots=True)
class RequestOutcome:
    """What the glasses saw for one request in one lane.

    Attributes:
        index: The request's position in the plan.
        klass: Its class.
        kind: Its kind (lower case).
        answers: ``[seconds after capture end, route]`` of the first piece of
            each answer (per route) that reached the glasses.
        holding: Seconds after capture end of a holding reply, if any.
        route: The daemon's route (``local``, ``cloud``, ``hedged``).
        reason: The daemon's reason.
        hedged: Whether a hedge fired (the phone started its own answer).
        local_computed: Whether the phone computed an answer.
        cloud_computed: Whether the request went to the cloud.
        start_lag_s: How late the request started against its planned arrival
            (the previous one overran the gap).
    """

    index: int
    klass: str
    kind: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    holding: float | None = None
    route: str | None = None
    reason: str | None = None
    hedged: bool = False
    local_computed: bool = False
    cloud_computed: bool = False
    start_lag_s: float = 0.0

    def utility(self, deadline_s: float) -> float:
        """Best score among the answers within the deadline."""
        return max(
            (score(self.klass, r) for t, r in self.answers if t <= deadline_s),
            default=0.0,
        )

    def latency_s(self) -> float:
        """Time to the first useful answer, :data:`GIVE_UP_S` if none came."""
        useful = [t for t, r in self.answers if score(self.klass, r) > 0]
        return min([GIVE_UP_S, *useful])


@dataclass(slots=True)
class LaneResult:
    """One lane's outcomes and counters."""

    strategy: str
    outcomes: list[RequestOutcome]
    wall_s: float
    skipped_s: float
    wakeups: int
    notes: list[str] = field(default_factory=list)


# -- one lane -------------------------------------------------------------------


def _message_id(seed: int, index: int, part: str) -> bytes:
    """Deterministic ids: the same request has the same ids in every lane."""
    return hashlib.sha256(f"{seed}/{index}/{part}".encode()).digest()[:16]


def _reliable(
    kind: MessageKind, mid: bytes, body: bytes, rid: int, *, final: bool = False
) -> Message:
    flags = MessageFlags.RELIABLE | (MessageFlags.FINAL if final else MessageFlags.NONE)
    return Message(kind, mid, body, flags, rid)


class _Media:
    """Speech and photos made once per lane (encoding is not what is measured)."""

    def __init__(self, seed: int) -> None:
        from relay.sim import media

        self._voice = media.voice_frames(5.0, seed)
        self._photo = media.photo(PHOTO_BYTES, seed)
        self._barcode = media.barcode_photo(BARCODE, PHOTO_BYTES, seed)

    def speech(self, seconds: float) -> list[bytes]:
        frames = self._voice[: round(seconds * 100)]
        return [b"".join(frames[i : i + 10]) for i in range(0, len(frames), 10)]

    def photo(self, barcode: bool) -> bytes:
        return self._barcode if barcode else self._photo


async def run_lane(
    strategy: str,
    plan: Sequence[PlannedRequest],
    uplink_trace: Path,
    downlink_trace: Path,
    *,
    seed: int = 1,
    deadline_s: float = 3.0,
    profile: str = "android-2m",
    switch_after: int | None = None,
    switch_traces: tuple[Path, Path] | None = None,
    drain_wait_s: float = 20.0,
    progress: bool = False,
) -> LaneResult:
    """Play ``plan`` through one strategy; see the module docstring.

    ``switch_after``/``switch_traces`` switch both directions to other traces
    after that many requests (to test that the router follows the network).
    Before each request the lane waits up to ``drain_wait_s`` for the link to
    be idle so that it can skip to the request's arrival; a request that
    starts late is counted (``start_lag_s``).

    Raises:
        ConfigError: an unknown strategy, or a trace that cannot be read.
    """
    from relay.cloudlink import CloudConfig
    from relay.daemon import Daemon, DaemonConfig
    from relay.identity import PhoneIdentity
    from relay.outbox import Outbox
    from relay.router.decide import Policy
    from relay.router.strategies import Strategy
    from relay.sim.bed import in_process
    from relay.sim.glasses import GlassesAppConfig
    from relay.sim.profiles import get_profile
    from relay.state import ensure_state_dir
    from relay.uplink.factory import uplink_factory
    from tools.cloud.app import CloudGateway
    from tools.cloud.assistant import DEFAULT_LATENCY
    from tools.cloud.config import GatewayConfig
    from tools.netem import default_rtt_model, default_wakeup_model, load_trace
    from tools.netem.proxy import NetemConfig, NetemProxy

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    up, down = load_trace(uplink_trace), load_trace(downlink_trace)
    media = _Media(seed)
    started = time.monotonic()
    outcomes: list[RequestOutcome] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gr-latency-") as tmp:
        state = Path(tmp) / "state"
        ensure_state_dir(state)
        PhoneIdentity(state)  # the gateway knows the device from its start
        gateway = CloudGateway(
            GatewayConfig(
                state_dir=state, listen=("127.0.0.1", 0), latency=DEFAULT_LATENCY
            )
        )
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(gateway.serving())
            proxy = await stack.enter_async_context(
                NetemProxy(
                    "127.0.0.1",
                    0,
                    "127.0.0.1",
                    gateway.ws_port,
                    up,
                    down,
                    config=NetemConfig(
                        rtt=default_rtt_model(),
                        wakeup=default_wakeup_model(),
                        seed=seed,
                    ),
                )
            )
            bed = await stack.enter_async_context(
                in_process(
                    state,
                    get_profile(profile),
                    GlassesAppConfig(scenario=None, seed=seed),
                )
            )
            ensure_state_dir(state / "phone")
            outbox = await Outbox.open(state / "phone" / "outbox.sqlite3")
            stack.push_async_callback(outbox.close)
            config = DaemonConfig(
                state_dir=state,
                cloud=CloudConfig(announce_presence=False),
                policy=Policy(deadline_s=deadline_s),
                strategy=Strategy(strategy),
                emulate_local_cost=True,
            )
            device_id = PhoneIdentity(state).device_id
            daemon = Daemon(
                config,
                bed.backend,
                uplink_factory(
                    "ws", device_id=device_id, gateway=f"ws://127.0.0.1:{proxy.port}"
                ),
                outbox=outbox,
            )
            daemon_task = asyncio.create_task(daemon.run(), name="bench daemon")

            async def stop_daemon() -> None:
                daemon_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    async with asyncio.timeout(5):
                        await daemon_task
                await daemon.close()

            stack.push_async_callback(stop_daemon)
            async with asyncio.timeout(60):
                await bed.app.wait_established()
                for _ in range(1200):  # bounded by the timeout above
                    if daemon.cloud.connected:
                        break
                    await asyncio.sleep(0.05)
            daemon.skills.remember_route(
                ["Turn left onto Main Street", "Continue 300 m", "Turn right"],
                time.monotonic(),
            )
            responses: dict[int, list[tuple[float, Message]]] = {}

            def on_response(message: Message, at: float) -> None:
                responses.setdefault(message.request_id, []).append((at, message))

            bed.app.on_response = on_response
            # The trace clock starts now; request i starts at its arrival.
            base = proxy.trace_time()
            for count, planned in enumerate(plan):
                if switch_after is not None and count == switch_after:
                    assert switch_traces is not None  # noqa: S101
                    proxy.switch_trace("uplink", load_trace(switch_traces[0]))
                    proxy.switch_trace("downlink", load_trace(switch_traces[1]))
                skipped_before = proxy.stats().skipped_s
                lag = await _advance(proxy, base + planned.arrival_s, drain_wait_s)
                # The phone's radio estimate sees the skipped idle time too.
                daemon.estimators.idle_skipped(proxy.stats().skipped_s - skipped_before)
                outcome = await _ask(
                    bed.app, daemon, planned, media, responses, seed, deadline_s
                )
                outcome.start_lag_s = lag
                outcomes.append(outcome)
                if progress:
                    useful = sum(o.utility(deadline_s) > 0 for o in outcomes)
                    sys.stderr.write(
                        f"\r{strategy}: {count + 1}/{len(plan)} requests, "
                        f"{useful} within {deadline_s:g} s   "
                    )
                    sys.stderr.flush()
            skipped = proxy.stats().skipped_s
            wakeups = proxy.radio.counters().wakeups
    if progress:
        sys.stderr.write("\n")
    late_starts = sum(o.start_lag_s > 1.0 for o in outcomes)
    if late_starts:
        notes.append(f"{late_starts} requests started over 1 s after their arrival")
    return LaneResult(
        strategy, outcomes, time.monotonic() - started, skipped, wakeups, notes
    )


async def _advance(proxy: object, target: float, drain_wait_s: float) -> float:
    """Skip the idle link's trace clock to ``target``; returns how late we are."""
    from tools.netem import LinkBusyError
    from tools.netem.proxy import NetemProxy

    assert isinstance(proxy, NetemProxy)  # noqa: S101
    for _ in range(max(1, round(drain_wait_s / 0.05))):
        gap = target - proxy.trace_time()
        if gap <= 0:
            return -gap
        try:
            proxy.skip(gap)
        except LinkBusyError:
            await asyncio.sleep(0.05)
            continue
        return 0.0
    return max(0.0, proxy.trace_time() - target)


async def _ask(
    app: object,
    daemon: object,
    planned: PlannedRequest,
    media: _Media,
    responses: dict[int, list[tuple[float, Message]]],
    seed: int,
    deadline_s: float,
) -> RequestOutcome:
    """Ask one request as the glasses would and collect what came back."""
    from relay.daemon import Daemon
    from relay.sim.glasses import GlassesApp

    assert isinstance(app, GlassesApp)  # noqa: S101
    assert isinstance(daemon, Daemon)  # noqa: S101
    rid = planned.index + 1
    index = planned.index
    start = time.monotonic()
    pieces: list[bytes] = []
    chunks: list[bytes] = []
    wake = Event(EventType.WAKE_WORD, int(start * 1e6)).encode()
    await app.send(
        _reliable(MessageKind.EVENT, _message_id(seed, index, "wake"), wake, 0)
    )
    if planned.photo:
        await asyncio.sleep(PHOTO_LEAD_S)  # "how much is this?" then the capture
        photo = media.photo(planned.intent == "barcode")
        capture_end = time.monotonic()
        size, codec = len(photo), "jpeg"
        pieces = [photo[i : i + 4096] for i in range(0, len(photo), 4096)]
    else:
        chunks = media.speech(planned.voice_s)
        capture_end = start + planned.voice_s
        size, codec = sum(len(c) for c in chunks), "lc3"
    request = Request(
        planned.kind,
        round(deadline_s * 1000),
        int(capture_end * 1e6),
        size,
        planned.intent,
        planned.text,
        codec,
    )
    await app.send(
        _reliable(
            MessageKind.REQUEST,
            _message_id(seed, index, "request"),
            request.encode(),
            rid,
        )
    )
    if planned.photo:
        for n, piece in enumerate(pieces):
            await app.send(
                _reliable(
                    MessageKind.PHOTO_CHUNK,
                    _message_id(seed, index, f"photo{n}"),
                    n.to_bytes(4, "big") + piece,
                    rid,
                    final=n == len(pieces) - 1,
                )
            )
    else:
        for n, chunk in enumerate(chunks):
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.1 - time.monotonic()))
            await app.send(
                _reliable(
                    MessageKind.AUDIO_CHUNK,
                    _message_id(seed, index, f"audio{n}"),
                    n.to_bytes(4, "big") + chunk,
                    rid,
                    final=n == len(chunks) - 1,
                )
            )
    outcome = RequestOutcome(index, planned.klass, planned.kind.name.lower())
    while True:
        now = time.monotonic()
        routes = _routes_seen(responses.get(rid, []), capture_end, outcome)
        trace = daemon.traces.get(rid)
        best = max(
            (score(planned.klass, r) for t, r in routes if t <= deadline_s), default=0
        )
        if best >= 1.0 or now - capture_end >= GIVE_UP_S:
            break
        if trace is not None and best > 0:
            # Stop once every route the daemon runs has answered, or the
            # deadline has passed with a useful answer in hand.
            running = {"local"} if trace.local_computed else set()
            if trace.cloud_computed:
                running.add("cloud")
            if running <= {r for _, r in routes} or now - capture_end > deadline_s:
                break
        if trace is None and best == 0 and now - capture_end > deadline_s and routes:
            break
        await asyncio.sleep(0.02)
    trace = daemon.traces.get(rid)
    if trace is not None:
        outcome.route = trace.route
        outcome.reason = trace.reason
        outcome.hedged = trace.hedged
        outcome.local_computed = trace.local_computed
        outcome.cloud_computed = trace.cloud_computed
    return outcome


def _routes_seen(
    seen: list[tuple[float, Message]], capture_end: float, outcome: RequestOutcome
) -> list[tuple[float, str]]:
    """First answer piece per route, in seconds after capture end."""
    firsts: dict[str, float] = {}
    for at, message in seen:
        if message.kind is MessageKind.HOLDING:
            if outcome.holding is None:
                outcome.holding = round(at - capture_end, 4)
            continue
        try:
            route = ResponseText.decode(message.body).route or "cloud"
        except RemoteProtocolError:
            continue
        firsts.setdefault(route, round(at - capture_end, 4))
    outcome.answers = sorted((t, r) for r, t in firsts.items())
    return outcome.answers


# -- results --------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _figures(
    outcomes: Sequence[RequestOutcome], deadline_s: float, latencies: Sequence[float]
) -> dict[str, object]:
    n = len(outcomes)
    utilities = [o.utility(deadline_s) for o in outcomes]
    return {
        "within_budget_ratio": round(sum(u > 0 for u in utilities) / n, 4),
        "utility": round(sum(utilities) / n, 4),
        "p50_ms": round(_quantile(latencies, 0.50) * 1000),
        "p95_ms": round(_quantile(latencies, 0.95) * 1000),
        "p99_ms": round(_quantile(latencies, 0.99) * 1000),
        "hedges": sum(o.hedged for o in outcomes),
        "extra_cloud_requests_ratio": round(
            sum(o.local_computed and o.cloud_computed for o in outcomes) / n, 4
        ),
        "by_class": {
            klass: round(
                sum(
                    u
                    for u, o in zip(utilities, outcomes, strict=True)
                    if o.klass == klass
                )
                / max(1, sum(o.klass == klass for o in outcomes)),
                4,
            )
            for klass in CLASSES
        },
    }


def summarize(
    lanes: dict[str, LaneResult], deadline_s: float
) -> dict[str, dict[str, object]]:
    """Per-strategy figures, plus the computed ``oracle``."""
    result: dict[str, dict[str, object]] = {}
    for name, lane in lanes.items():
        figures = _figures(
            lane.outcomes, deadline_s, [o.latency_s() for o in lane.outcomes]
        )
        figures["wall_s"] = round(lane.wall_s, 1)
        figures["radio_wakeups"] = lane.wakeups
        if lane.notes:
            figures["notes"] = lane.notes
        result[name] = figures
    if "always_cloud" in lanes and "always_local" in lanes:
        chosen = []
        latencies = []
        for cloud, local in zip(
            lanes["always_cloud"].outcomes, lanes["always_local"].outcomes, strict=True
        ):
            pick = max(
                (cloud, local),
                key=lambda o: (o.utility(deadline_s), -o.latency_s()),
            )
            chosen.append(dataclasses.replace(pick, hedged=False, local_computed=False))
            latencies.append(pick.latency_s())
        oracle = _figures(chosen, deadline_s, latencies)
        oracle["computed"] = "per request, the better of always_cloud and always_local"
        result["oracle"] = oracle
    return result


def lane_to_json(lane: LaneResult) -> dict[str, object]:
    """JSON form of a lane (what a lane process writes)."""
    return {
        "strategy": lane.strategy,
        "wall_s": lane.wall_s,
        "skipped_s": lane.skipped_s,
        "wakeups": lane.wakeups,
        "notes": lane.notes,
        "outcomes": [dataclasses.asdict(o) for o in lane.outcomes],
    }


def lane_from_json(data: dict[str, object]) -> LaneResult:
    """Inverse of :func:`lane_to_json`."""
    raw = data["outcomes"]
    assert isinstance(raw, list)  # noqa: S101
    outcomes = []
    for item in raw:
        values = dict(item)
        values["answers"] = [(float(t), str(r)) for t, r in values["answers"]]
        outcomes.append(RequestOutcome(**values))
    return LaneResult(
        str(data["strategy"]),
        outcomes,
        float(data["wall_s"]),  # type: ignore[arg-type]
        float(data["skipped_s"]),  # type: ignore[arg-type]
        int(data["wakeups"]),  # type: ignore[call-overload]
        list(data["notes"]),  # type: ignore[call-overload]
    )


# -- the command ----------------------------------------------------------------


def run_bench(
    *,
    uplink_trace: Path,
    downlink_trace: Path,
    requests: int = DEFAULT_REQUESTS,
    seed: int = 1,
    deadline_s: float = 3.0,
    profile: str = "android-2m",
    strategies: Sequence[str] = STRATEGIES,
    parallel: bool = True,
    progress: bool = False,
    keep: Path | None = None,
) -> dict[str, object]:
    """Run every strategy's lane (side by side by default) and summarize.

    ``keep``: a directory to copy each lane's per-request outcomes into.

    Raises:
        ConfigError: a trace that does not exist, or a lane that failed.
    """
    for path in (uplink_trace, downlink_trace):
        if not path.is_file():
            raise ConfigError(f"trace {path} does not exist")
    plan = make_plan(requests, seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gr-latency-run-") as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps([p.to_dict() for p in plan]))
        procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        lanes: dict[str, LaneResult] = {}

        def start(name: str) -> None:
            out = Path(tmp) / f"{name}.json"
            command = [
                *module_command("tools.bench.latency"), "--strategy", name,
                "--plan", str(plan_file), "--out", str(out),
                "--uplink-trace", str(uplink_trace),
                "--downlink-trace", str(downlink_trace),
                "--seed", str(seed), "--deadline", str(deadline_s),
                "--profile", profile,
            ]  # fmt: skip
            if progress:
                command.append("--progress")
            procs[name] = (subprocess.Popen(command, env=code_env()), out)  # noqa: S603

        def finish(name: str) -> None:
            proc, out = procs[name]
            code = proc.wait(timeout=3600)
            if code != 0 or not out.is_file():
                raise ConfigError(f"the {name} lane failed (exit {code})")
            lanes[name] = lane_from_json(json.loads(out.read_text()))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / out.name).write_text(out.read_text())

        try:
            if parallel:
                for name in strategies:
                    start(name)
                for name in strategies:
                    finish(name)
            else:
                for name in strategies:
                    start(name)
                    finish(name)
        finally:
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {
        "trace": {"uplink": uplink_trace.name, "downlink": downlink_trace.name},
        "requests": requests,
        "seed": seed,
        "deadline_s": deadline_s,
        "profile": profile,
        "strategies": summarize(lanes, deadline_s),
        "wall_s": round(time.monotonic() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
    }


def lane_main(argv: Sequence[str] | None = None) -> int:
    """One lane in its own process (``python -m tools.bench.latency``)."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench.latency")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--uplink-trace", type=Path, required=True)
    parser.add_argument("--downlink-trace", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--profile", default="android-2m")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    from relay import log

    log.configure(int(os.environ.get("GLASSES_RELAY_BENCH_VERBOSITY", "0")))
    plan = [PlannedRequest.from_dict(p) for p in json.loads(args.plan.read_text())]
    lane = asyncio.run(
        run_lane(
            args.strategy,
            plan,
            args.uplink_trace,
            args.downlink_trace,
            seed=args.seed,
            deadline_s=args.deadline,
            profile=args.profile,
            progress=args.progress,
        )
    )
    args.out.write_text(json.dumps(lane_to_json(lane)))
    return 0


if __name__ == "__main__":
    sys.exit(lane_main())
