"""The chart of ``glasses-relay bench throughput --plot FILE``.

One PNG, two panels side by side: goodput (kB/s, with a tick at the link's
ceiling) and daemon CPU (% of one core), each with a pair of bars per link
profile: the shipped, batched relay against the naive one. Goodput spanning
more than :data:`LOG_SPREAD` times from its smallest to its largest figure
(``unshaped`` beside the BLE profiles) gets a logarithmic axis, so every
profile's bars stay readable. Pillow only; the file is written atomically
(``FILE.tmp``, then :func:`os.replace`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from PIL import Image, ImageDraw, ImageFont

from relay.errors import ConfigError

__all__ = [
    "BATCHED_COLOUR",
    "CEILING_COLOUR",
    "LOG_SPREAD",
    "NAIVE_COLOUR",
    "write_throughput_chart",
]

BATCHED_COLOUR: Final = (31, 119, 180)
NAIVE_COLOUR: Final = (255, 127, 14)
CEILING_COLOUR: Final = (214, 39, 40)
_INK: Final = (40, 40, 40)
_GRID: Final = (225, 225, 225)
_WIDTH: Final = 1200
_HEIGHT: Final = 800
_TOP: Final = 110  # highest point a bar can reach
_BASE: Final = 700  # bars stand on this row
_LEFT: Final = 70  # room for the axis labels inside each panel
_RIGHT: Final = 20
LOG_SPREAD: Final = 20.0
"""Largest over smallest positive goodput beyond which its axis is logarithmic."""

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_Group = tuple[str, float | None, float | None, float | None]
"""A group of bars: its label, batched, naive and ceiling (display units)."""


def _num(value: object, scale: float = 1.0) -> float | None:
    """``value * scale`` if a finite number (negatives as 0), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(float(value), 0.0) * scale if math.isfinite(value) else None


def _font(size: float) -> _Font:
    """Pillow's built-in font at ``size`` (its bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _axis_top(peak: float) -> tuple[float, float]:
    """A round top for an axis showing ``peak`` with headroom, and its step."""
    if peak <= 0:
        return 1.0, 0.2
    raw = peak * 1.12 / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return math.ceil(peak * 1.12 / step) * step, step


def _log_axis(values: Sequence[float]) -> tuple[float, float]:
    """Whole decades around the positive ``values``: (bottom, top)."""
    positive = [v for v in values if v > 0]
    low = 10.0 ** math.floor(math.log10(min(positive)))
    high = 10.0 ** math.ceil(math.log10(max(positive) * 1.12))
    return low, high


def _log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times each power of ten from ``low`` to ``high``."""
    ticks: list[float] = []
    decade = low
    while decade <= high * (1 + 1e-9):
        ticks += [m * decade for m in (1, 2, 5) if m * decade <= high * (1 + 1e-9)]
        decade *= 10
    return ticks


def _distinct(results: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    """The distinct values of ``key``, in order of appearance."""
    return list(dict.fromkeys(str(r.get(key) or "?") for r in results))


def _panel(
    draw: ImageDraw.ImageDraw,
    x0: int,
    title: str,
    groups: list[_Group],
    paired: bool,
    unit: str,
    *,
    log: bool = False,
) -> None:
    """Draw one panel: grid, ceiling ticks, bar pairs and their labels.

    With ``log`` the axis runs over whole decades (``values`` must hold a
    positive one) and a bar's height is its value's logarithm above the
    bottom decade.
    """
    font, small = _font(13), _font(11)
    width = _WIDTH // 2 - _LEFT - _RIGHT
    left = x0 + _LEFT
    values = [v for g in groups for v in g[1:] if v is not None]
    span = _BASE - _TOP
    ticks: list[tuple[float, str]]
    if log:
        low, high = _log_axis(values)
        decades = math.log10(high / low)

        def y_of(value: float) -> int:
            if value <= low:
                return _BASE
            return _BASE - round(math.log10(value / low) / decades * span)

        ticks = [(t, f"{t:,g}{unit}") for t in _log_ticks(low, high)]
        title += ", log scale"
    else:
        top, step = _axis_top(max(values, default=0.0))

        def y_of(value: float) -> int:
            return _BASE - round(value / top * span)

        decimals = max(0, -math.floor(math.log10(step)))
        ticks = [
            (i * step, f"{i * step:,.{decimals}f}{unit}")
            for i in range(round(top / step) + 1)
        ]

    draw.text((left + width / 2, _TOP - 26), title, fill=_INK, font=font, anchor="ms")
    for at, tick in ticks:
        y = y_of(at)
        draw.line((left, y, left + width, y), fill=_GRID)
        draw.text((left - 6, y), tick, fill=_INK, font=small, anchor="rm")
    group_w = width / len(groups)
    bar_w = min(group_w * 0.6, 160) / (2 if paired else 1)
    for i, (label, batched, naive, ceiling) in enumerate(groups):
        mid = left + group_w * (i + 0.5)
        first = mid - bar_w if paired else mid - bar_w / 2
        bars = [(batched, BATCHED_COLOUR)] + ([(naive, NAIVE_COLOUR)] if paired else [])
        ceiling_y = None if ceiling is None else y_of(ceiling)
        if ceiling_y is not None:
            end = first + bar_w * len(bars) + 6
            draw.line((first - 6, ceiling_y, end, ceiling_y), CEILING_COLOUR, 3)
        for j, (value, colour) in enumerate(bars):
            bx0 = round(first + j * bar_w) + 2
            bx1 = round(first + (j + 1) * bar_w) - 2
            if value is None:
                text = "n/a"
            else:  # three figures or more: no decimals, so pairs of labels fit
                text = f"{value:,.{0 if value >= 100 else 1}f}{unit}"
            y = _BASE
            if value is not None and value > 0:
                y = min(y_of(value), _BASE - 1)
                draw.rectangle((bx0, y, bx1, _BASE - 1), fill=colour)
            if ceiling_y is not None and y - 18 <= ceiling_y <= y:
                y = ceiling_y - 2  # the label clears the ceiling tick
            xy = ((bx0 + bx1) / 2, y - 4)
            draw.text(xy, text, fill=_INK, font=small, anchor="ms")
        # Alternate rows when the names would run into each other.
        row = 18 * (i % 2) if len(groups) > 4 else 0
        draw.text((mid, _BASE + 10 + row), label, fill=_INK, font=font, anchor="mt")
    draw.line((left, _BASE, left + width, _BASE), fill=_INK)


def _render(results: Sequence[Mapping[str, Any]]) -> Image.Image:
    """Draw the chart in memory."""
    img = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    uplinks = _distinct(results, "uplink")
    title = (
        f"bench throughput {', '.join(_distinct(results, 'mode'))} "
        f"over {', '.join(uplinks)}"
    )
    draw.text((20, 14), title, fill=_INK, font=_font(18))
    goodput: list[_Group] = []
    cpu: list[_Group] = []
    for r in results:
        label = str(r.get("profile") or "pipeline")
        if len(uplinks) > 1:
            label += f" ({r.get('uplink') or '?'})"
        naive = r.get("naive")
        n: Mapping[str, Any] = naive if isinstance(naive, Mapping) else {}
        ceiling = _num(r.get("ceiling_bytes_per_s"), 1e-3)
        if ceiling is None:
            ceiling = _num(n.get("ceiling_bytes_per_s"), 1e-3)
        kb = [_num(x.get("goodput_bytes_per_s"), 1e-3) for x in (r, n)]
        pct = [_num(x.get("cpu_fraction"), 100.0) for x in (r, n)]
        goodput.append((label, kb[0], kb[1], ceiling))
        cpu.append((label, pct[0], pct[1], None))
    paired = any(isinstance(r.get("naive"), Mapping) for r in results)
    legend = [("batched (ours)", BATCHED_COLOUR)] + (
        [("naive", NAIVE_COLOUR)] if paired else []
    )
    x, font = 20, _font(13)
    for name, colour in legend:
        draw.rectangle((x, 48, x + 13, 61), fill=colour)
        draw.text((x + 19, 55), name, fill=_INK, font=font, anchor="lm")
        x += 40 + round(draw.textlength(name, font=font))
    if any(g[3] is not None for g in goodput):
        draw.line((x, 55, x + 14, 55), CEILING_COLOUR, 3)
        draw.text((x + 19, 55), "link ceiling", fill=_INK, font=font, anchor="lm")
    positive = [v for g in goodput for v in g[1:] if v is not None and v > 0]
    log = bool(positive) and max(positive) > LOG_SPREAD * min(positive)
    _panel(draw, 0, "goodput (kB/s)", goodput, paired, "", log=log)
    _panel(draw, _WIDTH // 2, "daemon CPU (% of one core)", cpu, paired, "%")
    return img


def write_throughput_chart(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write a PNG chart of goodput and CPU per profile, batched against naive.

    Args:
        results: Benchmark results as printed by ``bench throughput --json``
            (``profile``, ``uplink``, ``mode``, ``goodput_bytes_per_s``,
            ``ceiling_bytes_per_s``, ``cpu_fraction`` and ``naive``, a mapping of
            the same figures or None). A missing or None figure is drawn as
            "n/a" without a bar.
        path: Where the PNG goes; its directory must exist.

    Raises:
        ConfigError: No results, a missing directory, or the write failed.
    """
    if not results:
        raise ConfigError("bench throughput --plot: no results to draw")
    if not path.name:
        raise ConfigError(f"cannot write the chart {path}: not a file name")
    if not path.parent.is_dir():
        raise ConfigError(
            f"cannot write the chart {path}: directory {path.parent} does not exist"
        )
    img = _render(results)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        img.save(tmp, format="PNG")
        tmp.replace(path)  # os.replace: atomic on POSIX
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(
            f"cannot write the chart {path}: {exc.strerror or exc}"
        ) from None
