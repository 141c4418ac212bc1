"""A trace-driven network emulator, because CI kernels have no ``tc netem``.

An asyncio TCP proxy (:class:`tools.netem.proxy.NetemProxy`, CLI
``python -m tools.netem``) carries the daemon's real MQTT or WebSocket
connection through an emulated cellular link with ``mm-link`` + ``mm-delay``
semantics (../shared/design/PERFORMANCE.md §4): per direction, 1500-byte
delivery opportunities at a mahimahi trace's millisecond offsets (looped), a
bounded queue, a base delay drawn from measured round trips, and a radio that
pays an RRC wake-up delay after ``idle_s`` without traffic.

This package's top level is the pure part (no asyncio, time passed in):

- :mod:`~tools.netem.trace`: :func:`load_trace`, :class:`Trace`;
- :mod:`~tools.netem.shaper`: :class:`Shaper` (one direction), :class:`Radio`;
- :mod:`~tools.netem.models`: :class:`Distribution`, the RRC-Probe and Speedtest
  loaders and their documented fallbacks;
- :mod:`~tools.netem.errors`: the error tree.

:mod:`tools.netem.proxy` (asyncio) is imported on its own.
"""

from __future__ import annotations

from tools.netem.errors import (
    DataFormatError,
    LinkBusyError,
    NetemError,
    TraceFormatError,
)
from tools.netem.models import (
    DEFAULT_IDLE_S,
    FALLBACK_RTT_4G,
    FALLBACK_WAKEUP,
    Distribution,
    default_rtt_model,
    default_wakeup_model,
    load_rrc_probe,
    load_speedtest_rtt,
)
from tools.netem.shaper import (
    DEFAULT_QUEUE_LIMIT_BYTES,
    Direction,
    Radio,
    RadioCounters,
    Shaper,
    ShaperCounters,
)
from tools.netem.trace import MTU_BYTES, Trace, load_trace

__all__ = [
    "DEFAULT_IDLE_S",
    "DEFAULT_QUEUE_LIMIT_BYTES",
    "FALLBACK_RTT_4G",
    "FALLBACK_WAKEUP",
    "MTU_BYTES",
    "DataFormatError",
    "Direction",
    "Distribution",
    "LinkBusyError",
    "NetemError",
    "Radio",
    "RadioCounters",
    "Shaper",
    "ShaperCounters",
    "Trace",
    "TraceFormatError",
    "default_rtt_model",
    "default_wakeup_model",
    "load_rrc_probe",
    "load_speedtest_rtt",
    "load_trace",
]
