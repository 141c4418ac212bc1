"""Delay models: the base round trip and the radio wake-up (RRC promotion) delay.

Both are :class:`Distribution` objects sampled with a caller-owned
:class:`random.Random`, so runs are reproducible from a seed.

Sources (../shared/design/PERFORMANCE.md §4.2, provenance in
../shared/data/README.md):

* **Wake-up**: the SIGCOMM21-5G artifact's ``RRC-Probe/data/*.csv``: one UDP
  probe after ``interval`` seconds idle; columns ``interval``, ``RTT1`` (ms),
  ``KeepOrDrop``. :func:`load_rrc_probe` keeps the probes marked ``YEP`` with a
  positive ``RTT1`` and ``interval >= idle_s``, and subtracts the same file's
  connected-state median (probes with ``interval < 0.5`` s), leaving the
  promotion penalty a packet pays on top of the base delay.
* **Base RTT**: the artifact's Ookla ``dataset_speedtest_ookla.csv``
  (``latency_ms`` per ``radio_type``), read by :func:`load_speedtest_rtt`.

That data has **no licence grant**: it is read from the shared data folder when
it exists and is never copied into this repository. Without it,
:func:`default_wakeup_model` and :func:`default_rtt_model` fall back to
:data:`FALLBACK_WAKEUP` and :data:`FALLBACK_RTT_4G`, built from the numbers
quoted in PERFORMANCE.md.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import logging
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tools.netem.errors import DataFormatError

__all__ = [
    "ACTIVE_INTERVAL_S",
    "DEFAULT_IDLE_S",
    "DEFAULT_RADIO_TYPE",
    "FALLBACK_RTT_4G",
    "FALLBACK_WAKEUP",
    "RRC_PROBE_DIR",
    "SHARED_DATA_DIR",
    "SPEEDTEST_CSV",
    "Distribution",
    "default_rtt_model",
    "default_wakeup_model",
    "load_rrc_probe",
    "load_speedtest_rtt",
]

logger = logging.getLogger(__name__)

DEFAULT_IDLE_S: Final = 10.0
"""Idle time after which the next packet pays a wake-up delay.

PERFORMANCE.md: the RRC-Probe step appears at ≈10-12 s idle; the routing
model charges the penalty "if idle > ≈10 s".
"""

ACTIVE_INTERVAL_S: Final = 0.5
"""RRC-Probe probes sent less than this long after the previous one find the
radio connected; their median is the file's baseline RTT."""

DEFAULT_RADIO_TYPE: Final = "4G-LTE"
"""Speedtest ``radio_type`` of the default base RTT (the T7/T8 reference model)."""

SHARED_DATA_DIR: Final = Path(__file__).resolve().parents[3] / "shared" / "data"
"""The project's shared data folder (``../shared/data`` next to the repository)."""

RRC_PROBE_DIR: Final = SHARED_DATA_DIR / "traces" / "5g-rtt" / "RRC-Probe" / "data"
SPEEDTEST_CSV: Final = (
    SHARED_DATA_DIR
    / "traces"
    / "5g-rtt"
    / "NW-Perf-Speedtest"
    / "dataset_speedtest_ookla.csv"
)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A distribution of delays in seconds, as a piecewise-linear inverse CDF.

    Attributes:
        knots: ``(cumulative probability, seconds)`` pairs; probabilities rise
            from 0 to 1, values never decrease and are ``>= 0``.
        source: where the numbers come from, for logs and reports.
    """

    knots: tuple[tuple[float, float], ...]
    source: str

    def __post_init__(self) -> None:
        """Check the knots.

        Raises:
            ValueError: fewer than one knot, probabilities not from 0 to 1 or
                decreasing, values negative or decreasing.
        """
        knots = self.knots
        if not knots:
            raise ValueError("a distribution needs at least one knot")
        if len(knots) > 1 and (knots[0][0] != 0.0 or knots[-1][0] != 1.0):
            raise ValueError("knot probabilities must run from 0 to 1")
        for (p0, v0), (p1, v1) in itertools.pairwise(knots):
            if p1 < p0 or v1 < v0:
                raise ValueError("knots must not decrease")
        if knots[0][1] < 0:
            raise ValueError("delays must be >= 0")

    @classmethod
    def constant(cls, seconds: float, source: str = "constant") -> Distribution:
        """Always ``seconds``."""
        return cls(((0.0, seconds), (1.0, seconds)), source)

    @classmethod
    def uniform(cls, low_s: float, high_s: float, source: str) -> Distribution:
        """Uniform between ``low_s`` and ``high_s``."""
        return cls(((0.0, low_s), (1.0, high_s)), source)

    @classmethod
    def from_samples(cls, samples_s: Iterable[float], source: str) -> Distribution:
        """The empirical distribution of measured values (interpolated).

        Raises:
            ValueError: no samples, or a negative one.
        """
        values = sorted(samples_s)
        if not values:
            raise ValueError("no samples")
        if len(values) == 1:
            return cls.constant(values[0], source)
        last = len(values) - 1
        return cls(tuple((i / last, v) for i, v in enumerate(values)), source)

    def quantile(self, p: float) -> float:
        """The value below which a fraction ``p`` (0..1) of draws falls."""
        knots = self.knots
        if len(knots) == 1 or p <= 0.0:
            return knots[0][1]
        if p >= 1.0:
            return knots[-1][1]
        i = bisect.bisect_right(knots, p, key=lambda knot: knot[0])
        (p0, v0), (p1, v1) = knots[i - 1], knots[i]
        if p1 == p0:
            return v1
        return v0 + (v1 - v0) * (p - p0) / (p1 - p0)

    def sample(self, rng: random.Random) -> float:
        """One draw, in seconds."""
        return self.quantile(rng.random())

    @property
    def median(self) -> float:
        """The 50th percentile, in seconds."""
        return self.quantile(0.5)


FALLBACK_WAKEUP: Final = Distribution.uniform(
    0.8,
    1.6,
    "fallback: uniform 0.8-1.6 s, the RRC promotion after >=10 s idle quoted in "
    "PERFORMANCE.md (RRC-Probe medians 0.79-1.64 s; they include one base RTT)",
)
"""Wake-up delay when the RRC-Probe files are not available."""

FALLBACK_RTT_4G: Final = Distribution(
    ((0.0, 0.041), (0.1, 0.041), (0.5, 0.074), (0.9, 0.096), (1.0, 0.111)),
    "fallback: Speedtest 4G-LTE latency p10 41, p50 74, p90 96, max 111 ms "
    "(PERFORMANCE.md §4.2; below p10 clamped to p10)",
)
"""Base round trip when the Speedtest file is not available."""


def _rows(path: Path, required: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in required if name not in (reader.fieldnames or ())]
        if missing:
            raise DataFormatError(path, 1, f"missing columns {', '.join(missing)}")
        for row in reader:
            yield reader.line_num, row


def _number(path: Path, line: int, text: str | None) -> float:
    try:
        return float(text or "")
    except ValueError:
        raise DataFormatError(path, line, f"not a number: {text!r}") from None


def load_rrc_probe(
    paths: Iterable[Path | str], *, idle_s: float = DEFAULT_IDLE_S
) -> Distribution:
    """Wake-up delays measured by RRC-Probe after at least ``idle_s`` idle.

    Per file: baseline = median ``RTT1`` of kept probes with
    ``interval < ACTIVE_INTERVAL_S``; wake-up = ``RTT1 - baseline`` of kept probes
    with ``interval >= idle_s``, clamped at 0. Kept = ``KeepOrDrop == "YEP"`` and
    ``RTT1 > 0``. The files' delays are pooled.

    Args:
        paths: ``RRC-Probe/data/*.csv`` files.
        idle_s: the idle threshold of the radio model.

    Returns:
        The empirical distribution of the pooled wake-up delays.

    Raises:
        DataFormatError: a column is missing, a value is not a number, or a file
            has no connected-state or no post-idle probes.
        OSError: a file cannot be read.
    """
    delays: list[float] = []
    names: list[str] = []
    for raw in paths:
        path = Path(raw)
        active: list[float] = []
        idle: list[float] = []
        for line, row in _rows(path, ("interval", "RTT1", "KeepOrDrop")):
            if row["KeepOrDrop"] != "YEP":
                continue
            rtt_ms = _number(path, line, row["RTT1"])
            interval = _number(path, line, row["interval"])
            if rtt_ms <= 0:
                continue
            if interval < ACTIVE_INTERVAL_S:
                active.append(rtt_ms)
            elif interval >= idle_s:
                idle.append(rtt_ms)
        if not active or not idle:
            raise DataFormatError(
                path, 0, f"no connected-state probes or none after >= {idle_s} s idle"
            )
        baseline = statistics.median(active)
        delays += [max(0.0, rtt - baseline) / 1000.0 for rtt in idle]
        names.append(path.name)
    if not names:
        raise ValueError("no RRC-Probe files given")
    return Distribution.from_samples(
        delays,
        f"RRC-Probe ({len(delays)} probes after >= {idle_s:g} s idle): "
        + ", ".join(names),
    )


def load_speedtest_rtt(
    path: Path | str, *, radio_type: str = DEFAULT_RADIO_TYPE
) -> Distribution:
    """Base round trips from the Ookla Speedtest file, one radio type.

    Args:
        path: ``dataset_speedtest_ookla.csv``.
        radio_type: a ``radio_type`` value (``4G-LTE``, ``5G-NSA-Low-Band``,
            ``5G-NSA-mmWave``, ``5G-SA-Low-Band``).

    Returns:
        The empirical distribution of ``latency_ms`` / 1000 of every row of that
        radio type (as PERFORMANCE.md §4.2 counts them).

    Raises:
        DataFormatError: a column is missing, a value is not a number, or no row
            has that radio type.
        OSError: the file cannot be read.
    """
    path = Path(path)
    rtts = [
        _number(path, line, row["latency_ms"]) / 1000.0
        for line, row in _rows(path, ("latency_ms", "radio_type"))
        if row["radio_type"] == radio_type
    ]
    rtts = [rtt for rtt in rtts if rtt > 0]
    if not rtts:
        raise DataFormatError(path, 0, f"no rows with radio_type {radio_type!r}")
    return Distribution.from_samples(
        rtts, f"Speedtest {radio_type} latency ({len(rtts)} tests)"
    )


def default_wakeup_model(
    *, idle_s: float = DEFAULT_IDLE_S, data: Path | str = RRC_PROBE_DIR
) -> Distribution:
    """The RRC-Probe wake-up delays if ``data`` exists, else :data:`FALLBACK_WAKEUP`.

    Args:
        idle_s: the idle threshold of the radio model.
        data: a directory of RRC-Probe CSVs (all are pooled) or one CSV.

    Raises:
        DataFormatError: the data exists but cannot be used.
    """
    data = Path(data)
    files = sorted(data.glob("*.csv")) if data.is_dir() else [data]
    files = [file for file in files if file.is_file()]
    if not files:
        logger.info("no RRC-Probe data at %s; using %s", data, FALLBACK_WAKEUP.source)
        return FALLBACK_WAKEUP
    return load_rrc_probe(files, idle_s=idle_s)


def default_rtt_model(
    *, data: Path | str = SPEEDTEST_CSV, radio_type: str = DEFAULT_RADIO_TYPE
) -> Distribution:
    """The Speedtest round trips if ``data`` exists, else :data:`FALLBACK_RTT_4G`.

    The fallback holds 4G-LTE numbers whatever ``radio_type`` asks for.

    Raises:
        DataFormatError: the file exists but cannot be used.
    """
    data = Path(data)
    if not data.is_file():
        logger.info("no Speedtest data at %s; using %s", data, FALLBACK_RTT_4G.source)
        return FALLBACK_RTT_4G
    return load_speedtest_rtt(data, radio_type=radio_type)
