"""Where a request is answered: the deadline-aware decision, pure.

``decide(request, snapshot, policy) -> RouteDecision``: no I/O, no clock, no
asyncio. The daemon gathers what it knows into a :class:`Snapshot` (mostly from
:class:`relay.router.estimators.Estimators`), the user's knobs are a
:class:`Policy`, and every decision carries the predicted answer times and a
human-readable reason. The model and the rules are explained in
docs/router.md; in short:

Prediction (seconds after the end of capture, ``capture_end_s``)::

    media on the phone  t_media = max(capture_end, now + media_bytes_remaining / ble)
    BLE down            ble_down = answer_bytes / ble
    local               t_media + service_s + ble_down
    upload done         t_up = max(start + (outbox_bytes_ahead + request_bytes) / up,
                                   t_media + min(request_bytes, upload_tail_bytes) / up)
                        start = now (+ wakeup_s if the radio is cold)
    cloud               t_up + rtt + first_token_s + answer_bytes / down + ble_down

The upload streams: media is forwarded to the cloud as it crosses BLE, so once
the last media byte is on the phone only the last piece (one outbox batch,
``upload_tail_bytes``) remains; a radio that must wake up delays the start of
the upload, which a long utterance hides.

Rules, in order (a route "makes it" when predicted within ``deadline - margin``):

1. phone-only kinds (:data:`PHONE_ONLY` or ``local.phone_only``): LOCAL;
2. no local option: CLOUD, with a holding reply if the uplink is down;
3. uplink down or not configured: LOCAL;
4. battery saver (or battery below ``low_battery_pct``), data saver with media
   over ``data_saver_bytes``, or a local answer as good as the cloud's: LOCAL,
   unless only the cloud makes it;
5. the cloud makes it: CLOUD, or HEDGED (cloud, with a local answer started at
   ``hedge_after_s`` if no first token came) when a local answer started then
   still makes it and the hedge budget allows;
6. only the phone makes it: LOCAL;
7. neither: the one predicted sooner.

Invariant: a route predicted to miss is never chosen while the other is
predicted to make it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from protocol.bodies import Request, RequestKind
from relay.errors import ConfigError

__all__ = [
    "CLOUD_QUALITY",
    "PHONE_ONLY",
    "LocalOption",
    "Policy",
    "Route",
    "RouteDecision",
    "Snapshot",
    "decide",
]

PHONE_ONLY: Final = frozenset(
    {
        RequestKind.TIME,
        RequestKind.BATTERY,
        RequestKind.MEDIA,
        RequestKind.VOLUME,
        RequestKind.TIMER,
    }
)
"""Kinds only the phone can answer (its clock, battery, media keys, timers)."""

CLOUD_QUALITY: Final = 1.0
"""Quality of a cloud answer; a local option at least this good is preferred."""

_MIN_RATE: Final = 1.0
"""Bytes/s used for a rate that is zero, negative or not a number."""

_MAX_COUNT: Final = 2**62
"""Sizes and counts are clamped to this (beyond it a float conversion fails)."""


class Route(enum.StrEnum):
    """Who answers."""

    LOCAL = "local"
    CLOUD = "cloud"
    HEDGED = "hedged"
    """The cloud, with a local answer armed at ``hedge_after_s``."""


@dataclass(frozen=True, slots=True)
class LocalOption:
    """What the phone can do for one request (a matching phone-side skill).

    Attributes:
        skill: Name of the skill, for the reason and the trace.
        quality: Answer quality relative to the cloud's 1.0: 1.0 for a
            phone-only skill or an exact cached answer, 0.6 for an "either"
            skill that answers less well than the cloud would.
        service_s: On-phone answer time once the request's media is on the
            phone, seconds.
        phone_only: Only the phone can answer (the cloud has no such skill).
    """

    skill: str
    quality: float
    service_s: float
    phone_only: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the daemon knows when a request is routed.

    Times are monotonic seconds on the phone's clock, rates bytes/s, sizes
    bytes. Every field but the two uplink flags has a default, so the daemon
    may fill in only what it knows; values out of range (negative, zero rates,
    NaN) are tolerated: :func:`decide` treats them pessimistically.

    Attributes:
        uplink_configured: An uplink to the cloud is configured.
        uplink_connected: The uplink is connected now.
        local: What the phone can do for this request; None: nothing.
        now_s: Now.
        capture_end_s: End of the utterance or photo capture, converted to the
            phone's clock; may be later than ``now_s`` (user still speaking).
        media_bytes_remaining: Media of the request still to cross BLE after
            ``now_s``.
        request_bytes: Bytes the cloud route must upload for this request in
            total (metadata and media).
        ble_goodput_bps: BLE goodput, either direction.
        uplink_bps: Uplink throughput.
        downlink_bps: Downlink throughput.
        rtt_s: Round trip phone - gateway.
        radio_cold: The cellular radio has been idle past its threshold and was
            not pre-warmed: the first packet waits ``wakeup_s``.
        wakeup_s: Radio wake-up (RRC promotion) delay.
        first_token_s: Cloud first-token time for this kind (a high quantile).
        outbox_bytes_ahead: Bytes queued in the outbox ahead of this request.
        answer_bytes: Size of the first piece of the answer.
        battery_pct: Phone battery, percent; None: unknown.
        requests_seen: Requests routed so far (this one included).
        hedges_used: Hedges started so far (local answers started because the
            cloud had not answered by ``hedge_after_s``).
        upload_tail_bytes: Bytes still to upload once the last media byte is
            on the phone (one outbox batch; the rest streamed while it crossed
            BLE).
    """

    uplink_configured: bool
    uplink_connected: bool
    local: LocalOption | None = None
    now_s: float = 0.0
    capture_end_s: float = 0.0
    media_bytes_remaining: int = 0
    request_bytes: int = 0
    ble_goodput_bps: float = 100_000.0
    uplink_bps: float = 1_000_000.0
    downlink_bps: float = 2_000_000.0
    rtt_s: float = 0.08
    radio_cold: bool = False
    wakeup_s: float = 0.8
    first_token_s: float = 1.6
    outbox_bytes_ahead: int = 0
    answer_bytes: int = 2048
    battery_pct: int | None = None
    requests_seen: int = 0
    hedges_used: int = 0
    upload_tail_bytes: int = 4096


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, slots=True)
class Policy:
    """The user's routing knobs (``[router]`` in the configuration).

    Attributes:
        deadline_s: Answer deadline, seconds after the end of capture (a
            request's own, tighter deadline wins).
        margin_s: Safety margin: a route "makes it" when predicted within
            ``deadline_s - margin_s``.
        hedge_budget: Most hedges as a fraction of the requests seen (the issue
            allows 10% extra work; 0.08 leaves room). 0 disables hedging.
        hedge_slack_s: A request the phone answers in time still goes to the
            cloud, with a hedge, when the cloud is predicted late by less
            than this (predictions are uncertain; the hedge secures the
            phone's answer, the cloud may still bring the better one).
        battery_saver: Prefer the phone whenever it answers in time.
        data_saver: Do not upload more than ``data_saver_bytes`` for a request
            the phone answers in time.
        data_saver_bytes: What "big" means for ``data_saver``.
        late_cloud_follows: A cloud answer arriving after a local (hedged) one
            is still shown (applied by the daemon, not by :func:`decide`).
        low_battery_pct: The battery saver engages by itself below this
            battery level (0 disables).

    Raises:
        ConfigError: A value is out of range (one line, naming the key).
    """

    deadline_s: float = 3.0
    margin_s: float = 0.2
    hedge_budget: float = 0.08
    hedge_slack_s: float = 1.0
    battery_saver: bool = False
    data_saver: bool = False
    data_saver_bytes: int = 20_000
    late_cloud_follows: bool = True
    low_battery_pct: int = 15

    def __post_init__(self) -> None:
        """Validate the values."""
        _check(
            math.isfinite(self.deadline_s) and self.deadline_s > 0,
            f"router.deadline_s must be a number of seconds > 0, "
            f"got {self.deadline_s!r}",
        )
        _check(
            math.isfinite(self.margin_s) and 0 <= self.margin_s < self.deadline_s,
            f"router.margin_s must be >= 0 and less than the deadline "
            f"({self.deadline_s:g} s), got {self.margin_s!r}",
        )
        _check(
            0.0 <= self.hedge_budget <= 1.0,
            f"router.hedge_budget must be a fraction from 0 to 1, "
            f"got {self.hedge_budget!r}",
        )
        _check(
            math.isfinite(self.hedge_slack_s) and self.hedge_slack_s >= 0,
            f"router.hedge_slack_s must be a number of seconds >= 0, "
            f"got {self.hedge_slack_s!r}",
        )
        _check(
            self.data_saver_bytes >= 0,
            f"router.data_saver_bytes must be >= 0, got {self.data_saver_bytes!r}",
        )
        _check(
            0 <= self.low_battery_pct <= 100,
            f"router.low_battery_pct must be from 0 to 100, "
            f"got {self.low_battery_pct!r}",
        )

    @property
    def deadline_ms(self) -> int:
        """The deadline in milliseconds (the ``router.deadline_ms`` key)."""
        return round(self.deadline_s * 1000)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The route, why, and the predictions behind it.

    Attributes:
        route: Who answers.
        reason: Human-readable, with the predicted times.
        holding: Send a holding reply now (the request needs the cloud and the
            uplink is down or not configured).
        predicted_local_s: Predicted local answer, seconds after capture end;
            None when the phone cannot answer.
        predicted_cloud_s: Predicted cloud answer, seconds after capture end;
            None when the cloud cannot answer (phone-only, uplink down).
        hedge_after_s: For HEDGED: seconds after capture end at which the
            daemon starts the local answer if the cloud has produced no first
            token yet; None otherwise.
        deadline_s: The deadline applied, seconds after capture end.
    """

    route: Route
    reason: str
    holding: bool = False
    predicted_local_s: float | None = None
    predicted_cloud_s: float | None = None
    hedge_after_s: float | None = None
    deadline_s: float | None = None


def _rate(value: float) -> float:
    return value if value > 0 else _MIN_RATE  # NaN > 0 is False


def _span(value: float) -> float:
    """A duration: negative means 0, NaN means unknown (infinite)."""
    if math.isnan(value):
        return math.inf
    return max(value, 0.0)


def _size(value: int) -> int:
    return min(max(value, 0), _MAX_COUNT)


def _s(value: float) -> str:
    return f"{value:.2f} s"


def _lead(snapshot: Snapshot) -> float:
    """Seconds from capture end to now (negative while still capturing)."""
    lead = snapshot.now_s - snapshot.capture_end_s
    return lead if math.isfinite(lead) else 0.0


def _media_on_phone(snapshot: Snapshot) -> float:
    """When the request's media is all on the phone, after capture end."""
    ble = _rate(snapshot.ble_goodput_bps)
    return max(0.0, _lead(snapshot) + _size(snapshot.media_bytes_remaining) / ble)


def _ble_down(snapshot: Snapshot) -> float:
    """Time for the answer's first piece to cross BLE to the glasses."""
    return _size(snapshot.answer_bytes) / _rate(snapshot.ble_goodput_bps)


def _local_time(snapshot: Snapshot, local: LocalOption) -> float:
    """Predicted local answer, seconds after capture end."""
    return _media_on_phone(snapshot) + _span(local.service_s) + _ble_down(snapshot)


def _cloud_time(snapshot: Snapshot) -> float:
    """Predicted cloud answer, seconds after capture end (uplink up)."""
    up = _rate(snapshot.uplink_bps)
    request = _size(snapshot.request_bytes)
    wakeup = _span(snapshot.wakeup_s) if snapshot.radio_cold else 0.0
    uploaded = max(
        _lead(snapshot) + wakeup + (_size(snapshot.outbox_bytes_ahead) + request) / up,
        _media_on_phone(snapshot)
        + min(request, _size(snapshot.upload_tail_bytes)) / up,
    )
    return (
        uploaded
        + _span(snapshot.rtt_s)
        + _span(snapshot.first_token_s)
        + _size(snapshot.answer_bytes) / _rate(snapshot.downlink_bps)
        + _ble_down(snapshot)
    )


def _deadline(request: Request, policy: Policy) -> float:
    if request.deadline_ms > 0:
        return min(policy.deadline_s, request.deadline_ms / 1000)
    return policy.deadline_s


def decide(request: Request, snapshot: Snapshot, policy: Policy) -> RouteDecision:
    """Choose who answers ``request``; pure, never raises.

    Call once per request, when its metadata arrives, with a fresh snapshot.

    Args:
        request: The request's metadata (its kind and deadline are used).
        snapshot: What the daemon knows now.
        policy: The user's knobs.

    Returns:
        The route, the reason and the predictions (see the module docstring).
    """
    name = request.kind.name.lower()
    local = snapshot.local
    deadline = _deadline(request, policy)
    budget = deadline - policy.margin_s

    if request.kind in PHONE_ONLY or (local is not None and local.phone_only):
        t_phone = None if local is None else _local_time(snapshot, local)
        timing = "" if t_phone is None else f", predicted {_s(t_phone)}"
        return RouteDecision(
            Route.LOCAL,
            f"{name} is answered by the phone{timing}",
            predicted_local_s=t_phone,
            deadline_s=deadline,
        )

    if not snapshot.uplink_configured or not snapshot.uplink_connected:
        if local is not None:
            t_local = _local_time(snapshot, local)
            state = "down" if snapshot.uplink_configured else "not configured"
            return RouteDecision(
                Route.LOCAL,
                f"uplink {state}; phone ({local.skill}) predicted {_s(t_local)}",
                predicted_local_s=t_local,
                deadline_s=deadline,
            )
        why = (
            "uplink down, queued until it returns"
            if snapshot.uplink_configured
            else "no uplink configured, kept in the outbox"
        )
        return RouteDecision(
            Route.CLOUD, f"{name} needs the cloud; {why}", True, deadline_s=deadline
        )

    t_cloud = _cloud_time(snapshot)
    cloud_ok = t_cloud <= budget
    if local is None:
        return RouteDecision(
            Route.CLOUD,
            f"{name} needs the cloud; predicted {_s(t_cloud)} "
            f"({'<=' if cloud_ok else '>'} {_s(budget)})",
            predicted_cloud_s=t_cloud,
            deadline_s=deadline,
        )
    return _either(snapshot, policy, local, t_cloud, deadline)


def _saver(snapshot: Snapshot, policy: Policy, local: LocalOption) -> str | None:
    """Why the phone is preferred whenever it answers in time, if it is."""
    battery = snapshot.battery_pct
    if policy.battery_saver:
        return "battery saver"
    if battery is not None and battery < policy.low_battery_pct:
        return f"battery {battery}% < {policy.low_battery_pct}%"
    if policy.data_saver and snapshot.request_bytes > policy.data_saver_bytes:
        return f"data saver, {snapshot.request_bytes} B > {policy.data_saver_bytes} B"
    if local.quality >= CLOUD_QUALITY:
        return "phone answers as well as the cloud"
    return None


def _either(
    snapshot: Snapshot,
    policy: Policy,
    local: LocalOption,
    t_cloud: float,
    deadline: float,
) -> RouteDecision:
    """Rules 4 to 7: a request both the phone and the (reachable) cloud answer."""
    budget = deadline - policy.margin_s
    t_local = _local_time(snapshot, local)
    local_ok = t_local <= budget
    cloud_ok = t_cloud <= budget
    phone = f"phone ({local.skill}) predicted {_s(t_local)}"
    cloud = f"cloud predicted {_s(t_cloud)}"

    def route(
        kind: Route, reason: str, hedge_after: float | None = None
    ) -> RouteDecision:
        return RouteDecision(
            kind,
            reason,
            predicted_local_s=t_local,
            predicted_cloud_s=t_cloud,
            hedge_after_s=hedge_after,
            deadline_s=deadline,
        )

    saver = _saver(snapshot, policy, local)
    if saver is not None and (local_ok or not cloud_ok):
        return route(Route.LOCAL, f"{saver}; {phone}, {cloud}, budget {_s(budget)}")

    if cloud_ok:
        ok = f"{cloud} <= {_s(budget)}"
        hedge_at = budget - _span(local.service_s) - _ble_down(snapshot)
        if not local_ok or hedge_at < _media_on_phone(snapshot):
            also = f"; {saver}, but" if saver is not None else "; no hedge,"
            return route(Route.CLOUD, f"{ok}{also} {phone} > {_s(budget)}")
        seen = min(max(snapshot.requests_seen, 1), _MAX_COUNT)
        if snapshot.hedges_used < policy.hedge_budget * seen:
            return route(
                Route.HEDGED, f"{ok}; hedge ({local.skill}) at {_s(hedge_at)}", hedge_at
            )
        return route(
            Route.CLOUD,
            f"{ok}; no hedge, budget used ({snapshot.hedges_used} hedges, "
            f"{policy.hedge_budget:g} x {seen} requests allowed)",
        )

    # The cloud is predicted a little late: predictions are uncertain, and a
    # hedge still secures the phone's answer in time, so the cloud gets its
    # chance (the better answer) while the hedge budget allows.
    hedge_at = budget - _span(local.service_s) - _ble_down(snapshot)
    seen = min(max(snapshot.requests_seen, 1), _MAX_COUNT)
    if (
        local_ok
        and saver is None
        and t_cloud <= budget + policy.hedge_slack_s
        and hedge_at >= _media_on_phone(snapshot)
        and snapshot.hedges_used < policy.hedge_budget * seen
    ):
        return route(
            Route.HEDGED,
            f"{cloud} > {_s(budget)} by less than {_s(policy.hedge_slack_s)}; "
            f"hedge ({local.skill}) at {_s(hedge_at)}",
            hedge_at,
        )
    if local_ok:
        return route(Route.LOCAL, f"{cloud} > {_s(budget)}; {phone}")
    if t_cloud < t_local:
        return route(
            Route.CLOUD,
            f"both late; {cloud} < {phone}, budget {_s(budget)}",
        )
    return route(Route.LOCAL, f"both late; {phone} <= {cloud}, budget {_s(budget)}")
