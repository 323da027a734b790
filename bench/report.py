"""Aggregating wrk runs into the one table `python -m bench` prints (pure functions)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.wrk_runner import WrkResult

__all__ = ["RunRecord", "ScenarioSummary", "format_mib", "format_table", "rps_ratio", "summarize"]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One measured run: wrk's numbers plus CPU seconds the proxy and backend trees used meanwhile."""

    scenario: str
    index: int
    result: WrkResult
    proxy_cpu_s: float | None
    backend_cpu_s: float

    @property
    def proxy_cpu_us_per_req(self) -> float | None:
        """Proxy CPU (supervisor + workers) per request, in µs; None when the proxy is not on the path."""
        if self.proxy_cpu_s is None or not self.result.requests:
            return None
        return self.proxy_cpu_s * 1e6 / self.result.requests

    @property
    def backend_cpu_us_per_req(self) -> float | None:
        """Backend CPU per request, in µs."""
        return self.backend_cpu_s * 1e6 / self.result.requests if self.result.requests else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scenario": self.scenario,
            "run": self.index,
            **self.result.as_dict(),
            "proxy_cpu_s": self.proxy_cpu_s,
            "backend_cpu_s": self.backend_cpu_s,
            "proxy_cpu_us_per_req": self.proxy_cpu_us_per_req,
            "backend_cpu_us_per_req": self.backend_cpu_us_per_req,
        }


@dataclass(frozen=True, slots=True)
class ScenarioSummary:
    """Medians over the runs of one scenario (errors are summed)."""

    scenario: str
    runs: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    proxy_cpu_us_per_req: float | None
    backend_cpu_us_per_req: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scenario": self.scenario,
            "runs": self.runs,
            "rps_median": self.rps,
            "p50_us_median": self.p50_us,
            "p99_us_median": self.p99_us,
            "errors_total": self.errors,
            "proxy_cpu_us_per_req_median": self.proxy_cpu_us_per_req,
            "backend_cpu_us_per_req_median": self.backend_cpu_us_per_req,
        }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(records: Sequence[RunRecord]) -> list[ScenarioSummary]:
    """One summary per scenario, in order of first appearance."""
    order = list(dict.fromkeys(r.scenario for r in records))
    out = []
    for scenario in order:
        runs = [r for r in records if r.scenario == scenario]
        out.append(
            ScenarioSummary(
                scenario=scenario,
                runs=len(runs),
                rps=statistics.median(r.result.rps for r in runs),
                p50_us=statistics.median(r.result.p50_us for r in runs),
                p99_us=statistics.median(r.result.p99_us for r in runs),
                errors=sum(r.result.total_errors for r in runs),
                proxy_cpu_us_per_req=_median([r.proxy_cpu_us_per_req for r in runs]),
                backend_cpu_us_per_req=_median([r.backend_cpu_us_per_req for r in runs]),
            )
        )
    return out


def rps_ratio(summaries: Sequence[ScenarioSummary]) -> float | None:
    """Median proxy RPS / median direct RPS, when both were measured."""
    by_name = {s.scenario: s for s in summaries}
    if "proxy" in by_name and "direct" in by_name and by_name["direct"].rps > 0:
        return by_name["proxy"].rps / by_name["direct"].rps
    return None


def format_mib(size: int | None) -> str:
    """Bytes as MiB with one decimal, or '-'."""
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summaries: Sequence[ScenarioSummary]) -> str:
    """The result table: one row per scenario."""
    header = ("scenario", "runs", "RPS", "p50 µs", "p99 µs", "errors", "proxy CPU µs/req", "backend CPU µs/req")
    rows = [header] + [
        (
            s.scenario,
            str(s.runs),
            f"{s.rps:,.0f}",
            f"{s.p50_us:,.0f}",
            f"{s.p99_us:,.0f}",
            str(s.errors),
            _num(s.proxy_cpu_us_per_req, ".1f"),
            _num(s.backend_cpu_us_per_req, ".1f"),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
