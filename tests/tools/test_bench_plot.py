"""``bench throughput --plot``: the PNG's bars measure what the results say.

Bars are found by colour, not by position, so the tests hold for any layout
that keeps the two panels side by side on a common baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from relay.errors import ConfigError
from tools.bench.plot import (
    BATCHED_COLOUR,
    CEILING_COLOUR,
    LOG_SPREAD,
    NAIVE_COLOUR,
    write_throughput_chart,
)

# (profile, batched goodput, ceiling, batched CPU, naive goodput, naive CPU)
FIGURES = [
    ("android-2m", 150_000.0, 162_667.0, 0.20, 60_000.0, 0.40),
    ("ios", 60_000.0, 65_067.0, 0.10, 30_000.0, 0.25),
    ("ble40", 27_000.0, 29_333.0, 0.05, 20_000.0, 0.15),
]


def _result(
    profile: str | None,
    goodput: float | None,
    ceiling: float | None,
    cpu: float | None,
    naive: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "profile": profile,
        "uplink": "mqtt",
        "mode": "e2e",
        "goodput_bytes_per_s": goodput,
        "ceiling_bytes_per_s": ceiling,
        "cpu_fraction": cpu,
        "naive": naive,
    }


def _three_profiles() -> list[dict[str, Any]]:
    return [
        _result(
            name,
            goodput,
            ceiling,
            cpu,
            {
                "goodput_bytes_per_s": n_goodput,
                "ceiling_bytes_per_s": ceiling,
                "cpu_fraction": n_cpu,
            },
        )
        for name, goodput, ceiling, cpu, n_goodput, n_cpu in FIGURES
    ]


Box = tuple[int, int, int, int]  # x0, x1, top, bottom (inclusive)
RGB = tuple[int, int, int]


def _baseline(img: Image.Image) -> int:
    """The lowest row holding a batched pixel: where every bar stands."""
    width, height = img.size
    for y in range(height - 1, -1, -1):
        if any(img.getpixel((x, y)) == BATCHED_COLOUR for x in range(width)):
            return y
    raise AssertionError("no batched bar at all")


def _bars(img: Image.Image, colour: RGB) -> list[Box]:
    """The bars of ``colour``, left to right, as boxes standing on the baseline.

    A column's bar height is its run of ``colour`` upwards from the baseline, so
    the legend's swatch (same colour, far above) is never part of a bar.
    """
    base = _baseline(img)
    width = img.size[0]
    boxes: list[Box] = []
    for x in range(width):
        top = base + 1
        while top > 0 and img.getpixel((x, top - 1)) == colour:
            top -= 1
        if top > base:
            continue
        if boxes and boxes[-1][1] == x - 1 and boxes[-1][2] == top:
            boxes[-1] = (boxes[-1][0], x, top, base)
        else:
            boxes.append((x, x, top, base))
    return boxes


def _height(box: Box) -> int:
    return box[3] - box[2] + 1


def _assert_proportional(heights: list[int], values: list[float]) -> None:
    for h, v in zip(heights, values, strict=True):
        ratio = (h / heights[0]) / (v / values[0])
        assert 0.9 <= ratio <= 1.1, (heights, values)


def test_bars_measure_the_figures(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    write_throughput_chart(_three_profiles(), path)

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (1200, 800)
        assert img.mode == "RGB"
        img.load()
        batched = _bars(img, BATCHED_COLOUR)
        naive = _bars(img, NAIVE_COLOUR)

    # three groups per panel; the goodput panel is the left one
    assert len(batched) == 6
    assert len(naive) == 6
    half = 1200 // 2
    assert all(b[1] < half for b in batched[:3] + naive[:3])
    assert all(b[0] >= half for b in batched[3:] + naive[3:])
    # each naive bar stands right of its batched partner, before the next group
    for b, n in zip(batched, naive, strict=True):
        assert b[1] < n[0] < b[1] + (n[1] - n[0]) + 10

    goodput_h = [_height(b) for b in batched[:3]]
    goodputs = [f[1] for f in FIGURES]
    assert goodput_h == sorted(goodput_h, reverse=True)
    assert len(set(goodput_h)) == 3
    _assert_proportional(goodput_h, goodputs)
    # naive goodput shares the panel's scale with batched
    _assert_proportional(
        [goodput_h[0], *(_height(n) for n in naive[:3])],
        [goodputs[0], *(f[4] for f in FIGURES)],
    )

    cpu_b = [_height(b) for b in batched[3:]]
    cpu_n = [_height(n) for n in naive[3:]]
    _assert_proportional(cpu_b, [f[3] for f in FIGURES])
    # per profile, naive burns more CPU than batched, and the bars say by how much
    for hb, hn, figures in zip(cpu_b, cpu_n, FIGURES, strict=True):
        assert hn > hb
        _assert_proportional([hb, hn], [figures[3], figures[5]])


def test_ceiling_tick_sits_at_the_ceiling(tmp_path: Path) -> None:
    # goodput well below the ceiling, so a wrong tick position shows
    figures = [("a", 50_000.0, 160_000.0), ("b", 60_000.0, 80_000.0)]
    results = [_result(name, g, c, 0.1, None) for name, g, c in figures]
    path = tmp_path / "chart.png"
    write_throughput_chart(results, path)
    with Image.open(path) as img:
        img.load()
        bars = _bars(img, BATCHED_COLOUR)[:2]
        for bar, (name, goodput, ceiling) in zip(bars, figures, strict=True):
            x = (bar[0] + bar[1]) // 2
            tick = [y for y in range(bar[2]) if img.getpixel((x, y)) == CEILING_COLOUR]
            assert tick, f"no ceiling tick above the {name} bar"
            tick = [y for y in tick if y >= tick[-1] - 5]  # not the legend's
            tick_height = bar[3] - sum(tick) / len(tick)
            ratio = (tick_height / _height(bar)) / (ceiling / goodput)
            assert 0.9 <= ratio <= 1.1


def test_missing_naive_and_cpu_draw_without_naive_pixels(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    results = [_result("android-2m", 150_000.0, 162_667.0, None, None)]
    write_throughput_chart(results, path)
    with Image.open(path) as img:
        img.load()
        data = img.tobytes()
        batched = _bars(img, BATCHED_COLOUR)
    pixels = {data[i : i + 3] for i in range(0, len(data), 3)}
    assert bytes(NAIVE_COLOUR) not in pixels
    # the goodput bar is there; the CPU one (None) is not
    assert len(batched) == 1
    assert batched[0][1] < 1200 // 2


def test_pipeline_mixed_and_degenerate_results_draw(tmp_path: Path) -> None:
    results = [
        _result(None, 9_500_000.0, None, 0.9, {"goodput_bytes_per_s": None}),
        {**_result("ios", 0.0, 0.0, 0.0, None), "uplink": "ws", "mode": "pipeline"},
        {"profile": "ble40"},
        _result("nan", float("nan"), float("inf"), -1.0, None),
    ]
    path = tmp_path / "chart.png"
    write_throughput_chart(results, path)
    with Image.open(path) as img:
        img.load()
        assert len(_bars(img, BATCHED_COLOUR)) == 2  # the pipeline's two figures
        assert len(_bars(img, NAIVE_COLOUR)) == 0


def test_all_zero_figures_do_not_divide_by_zero(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    write_throughput_chart([_result("ios", 0.0, None, 0.0, None)], path)
    with Image.open(path) as img:
        assert img.size == (1200, 800)


def test_empty_results_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    with pytest.raises(ConfigError, match="no results"):
        write_throughput_chart([], path)
    assert not path.exists()


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "chart.png"
    with pytest.raises(ConfigError, match="does not exist") as info:
        write_throughput_chart(_three_profiles(), path)
    assert "\n" not in str(info.value)
    assert not path.parent.exists()


def test_write_failure_is_a_config_error_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    path.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(ConfigError, match=r"cannot write the chart .*chart\.png"):
        write_throughput_chart(_three_profiles(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]


def test_success_leaves_no_tmp_and_replaces_an_old_chart(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    path.write_bytes(b"old")
    write_throughput_chart(_three_profiles(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_goodput_spanning_decades_gets_a_log_axis(tmp_path: Path) -> None:
    # unshaped beside the BLE profiles: on a linear axis ble40's bar would be
    # a few pixels; on the log one, height differences are ratios of goodput.
    figures = [
        ("ble40", 26_000.0),
        ("android-2m", 160_000.0),
        ("unshaped", 5_600_000.0),
    ]
    assert figures[-1][1] / figures[0][1] > LOG_SPREAD
    results = [_result(name, g, None, 0.1, None) for name, g in figures]
    path = tmp_path / "chart.png"
    write_throughput_chart(results, path)
    with Image.open(path) as img:
        img.load()
        low, mid, high = (_height(b) for b in _bars(img, BATCHED_COLOUR)[:3])
    assert low > 50  # readable (linear: about 2 pixels)
    expected = math.log(5_600_000 / 160_000) / math.log(160_000 / 26_000)
    assert (high - mid) / (mid - low) == pytest.approx(expected, rel=0.1)
