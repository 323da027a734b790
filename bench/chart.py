"""The PNG chart of a bench run: proxy CPU µs per request, RPS and p99 latency per target and scenario.

A grid of bar charts: one row per figure (CPU µs/req, RPS, p99 in ms), one column per scenario (each
panel with its own scale: a 256 KiB answer costs far more than a plain one), one bar and colour per
target (the same colour in every panel and every run: `target_colours`); each bar is the median over
the rounds and its whiskers reach the smallest and the largest round. Needs matplotlib (the `bench` extra);
`ChartUnavailable` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.report import ScenarioSummary

__all__ = ["CHART_NAMES", "INSTALL_MATPLOTLIB", "PALETTE", "ChartUnavailable", "target_colours", "write_chart"]

INSTALL_MATPLOTLIB = "matplotlib is not installed: no chart (pip install -e '.[bench]' adds it)"

PALETTE = (
    "#4c72b0",
    "#55a868",
    "#c44e52",
    "#8172b2",
    "#ccb974",
    "#64b5cd",
    "#dd8452",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#2f4b7c",
)
"""Colour-blind-friendly enough, and distinct in grey scale for the first four."""
CHART_NAMES = {
    "direct": "direct (no proxy)",
    "proxy": "uvgate",
    "jwt": "uvgate, JWT checked",
    "nometrics": "uvgate, metrics off",
    "accesslog": "uvgate, access log on",
}
"""How the chart names the targets whose table name says less to a reader."""
KNOWN_ORDER = ("direct", "nginx", "haproxy", "caddy", "proxy", "jwt", "baseline", "nometrics", "accesslog")
"""The targets whose colour is fixed (`PALETTE` in this order); other targets take the colours left."""


class ChartUnavailable(RuntimeError):
    """matplotlib is missing."""


def target_colours(targets: Sequence[str]) -> dict[str, str]:
    """One colour per target: known targets keep theirs whatever else ran; others take the rest in order."""
    colours = {name: PALETTE[i] for i, name in enumerate(KNOWN_ORDER) if name in targets}
    spare = [c for c in PALETTE if c not in colours.values()]
    for name in targets:
        if name not in colours:
            colours[name] = spare.pop(0) if spare else "#777777"
    return colours


def _panels() -> tuple[tuple[str, str, float], ...]:
    """(figure field, y label, scale) of each panel."""
    return (
        ("proxy_cpu_us_per_req", "proxy CPU per request (µs)", 1.0),
        ("rps", "throughput (requests/s)", 1.0),
        ("p99_us", "p99 latency (ms)", 1e-3),
    )


def _whiskers(
    present: Sequence[ScenarioSummary], field: str, scale: float, heights: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The distances from each bar (the median) down to the smallest and up to the largest round."""
    low: list[float] = []
    high: list[float] = []
    for summary, height in zip(present, heights, strict=True):
        smallest, largest = summary.ranges.get(field, (height / scale, height / scale))
        low.append(max(0.0, height - smallest * scale))
        high.append(max(0.0, largest * scale - height))
    return low, high


def write_chart(
    summaries: Sequence[ScenarioSummary],
    path: Path,
    *,
    labels: Mapping[str, str] | None = None,
    title: str = "",
) -> Path:
    """Draw the chart of `summaries` into `path` (PNG) and return it; ChartUnavailable without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ChartUnavailable(INSTALL_MATPLOTLIB) from exc

    from matplotlib.patches import Patch

    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    targets = list(dict.fromkeys(s.target for s in summaries))
    colours = target_colours(targets)
    names = {**CHART_NAMES, **(labels or {})}
    columns = max(1, len(scenarios))
    figure, grid = plt.subplots(3, columns, figsize=(max(6.0, 3.4 * columns), 10), squeeze=False)
    for row, (field, ylabel, scale) in enumerate(_panels()):
        for column, scenario in enumerate(scenarios):
            axis = grid[row][column]
            present = [s for s in summaries if s.scenario == scenario and getattr(s, field) is not None]
            xs = list(range(len(present)))
            heights = [float(getattr(s, field)) * scale for s in present]
            low, high = _whiskers(present, field, scale, heights)
            axis.bar(xs, heights, 0.7, yerr=[low, high], capsize=3, color=[colours[s.target] for s in present])
            axis.set_xticks(xs, [names.get(s.target, s.target) for s in present], rotation=30, ha="right")
            axis.grid(axis="y", alpha=0.3)
            axis.set_axisbelow(True)
            if row == 0:
                axis.set_title(f"scenario: {scenario}", fontsize="medium")
            if column == 0:
                axis.set_ylabel(ylabel)
            if not present:
                axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    handles = [Patch(color=colours[t], label=names.get(t, t)) for t in targets]
    figure.legend(handles=handles, title="target", loc="lower center", ncols=min(7, len(targets)), fontsize="small")
    figure.text(
        0.5,
        0.075,
        "bars: median over the rounds; whiskers: smallest to largest round. CPU and p99: lower is better; RPS: higher.",
        fontsize="x-small",
        ha="center",
    )
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)
    return path
