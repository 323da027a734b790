"""Aggregating wrk runs into the one table `python -m bench` prints (pure functions)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bench.cpu import CpuTimes
from bench.wrk_runner import WrkResult

__all__ = [
    "TABLE_HEADER",
    "CpuField",
    "RunRecord",
    "ScenarioSummary",
    "cpu_ratio",
    "format_mib",
    "format_ratios",
    "format_table",
    "ratios",
    "rps_ratio",
    "summarize",
]

CpuField = Literal["total", "user", "system"]
"""Which part of the proxy CPU per request a ratio compares."""


def _per_req(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else seconds * 1e6 / requests


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One measured run: wrk's numbers plus the CPU the proxy on the path and the backend used meanwhile.

    `proxy_cpu` is the process tree under test: uvgate (supervisor + workers) in `proxy`, nginx
    (master + worker) in `nginx`, None in `direct`.
    """

    scenario: str
    index: int
    result: WrkResult
    proxy_cpu: CpuTimes | None
    backend_cpu_s: float

    @property
    def proxy_cpu_s(self) -> float | None:
        """Proxy user + system CPU seconds; None when no proxy is on the path."""
        return None if self.proxy_cpu is None else self.proxy_cpu.total_s

    @property
    def proxy_cpu_us_per_req(self) -> float | None:
        """Proxy CPU per request, in µs; None when no proxy is on the path."""
        return _per_req(self.proxy_cpu_s, self.result.requests)

    @property
    def proxy_user_us_per_req(self) -> float | None:
        """Proxy user CPU per request, in µs."""
        return _per_req(None if self.proxy_cpu is None else self.proxy_cpu.user_s, self.result.requests)

    @property
    def proxy_system_us_per_req(self) -> float | None:
        """Proxy system (kernel) CPU per request, in µs."""
        return _per_req(None if self.proxy_cpu is None else self.proxy_cpu.system_s, self.result.requests)

    @property
    def backend_cpu_us_per_req(self) -> float | None:
        """Backend CPU per request, in µs."""
        return _per_req(self.backend_cpu_s, self.result.requests)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scenario": self.scenario,
            "run": self.index,
            **self.result.as_dict(),
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_user_s": None if self.proxy_cpu is None else self.proxy_cpu.user_s,
            "proxy_system_s": None if self.proxy_cpu is None else self.proxy_cpu.system_s,
            "backend_cpu_s": self.backend_cpu_s,
            "proxy_cpu_us_per_req": self.proxy_cpu_us_per_req,
            "proxy_user_us_per_req": self.proxy_user_us_per_req,
            "proxy_system_us_per_req": self.proxy_system_us_per_req,
            "backend_cpu_us_per_req": self.backend_cpu_us_per_req,
        }


@dataclass(frozen=True, slots=True)
class ScenarioSummary:
    """Medians over the runs of one scenario (errors are summed); each CPU figure is its own median."""

    scenario: str
    runs: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    proxy_cpu_us_per_req: float | None
    backend_cpu_us_per_req: float | None
    proxy_user_us_per_req: float | None = None
    proxy_system_us_per_req: float | None = None

    def cpu(self, field: CpuField) -> float | None:
        """Median proxy CPU µs/request: total, user or system."""
        if field == "user":
            return self.proxy_user_us_per_req
        if field == "system":
            return self.proxy_system_us_per_req
        return self.proxy_cpu_us_per_req

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
            "proxy_user_us_per_req_median": self.proxy_user_us_per_req,
            "proxy_system_us_per_req_median": self.proxy_system_us_per_req,
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
                proxy_user_us_per_req=_median([r.proxy_user_us_per_req for r in runs]),
                proxy_system_us_per_req=_median([r.proxy_system_us_per_req for r in runs]),
            )
        )
    return out


def _find(summaries: Sequence[ScenarioSummary], scenario: str) -> ScenarioSummary | None:
    return next((s for s in summaries if s.scenario == scenario), None)


def rps_ratio(
    summaries: Sequence[ScenarioSummary], numerator: str = "proxy", denominator: str = "direct"
) -> float | None:
    """Median RPS of `numerator` / median RPS of `denominator`, when both were measured."""
    num, den = _find(summaries, numerator), _find(summaries, denominator)
    if num is None or den is None or den.rps <= 0:
        return None
    return num.rps / den.rps


def cpu_ratio(
    summaries: Sequence[ScenarioSummary],
    numerator: str = "proxy",
    denominator: str = "nginx",
    field: CpuField = "total",
) -> float | None:
    """Median proxy CPU µs/req of `numerator` / that of `denominator` (uvgate ÷ nginx by default)."""
    num, den = _find(summaries, numerator), _find(summaries, denominator)
    if num is None or den is None:
        return None
    top, bottom = num.cpu(field), den.cpu(field)
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def ratios(summaries: Sequence[ScenarioSummary]) -> dict[str, float | None]:
    """Every ratio the footer shows, by JSON key (None when a side is missing)."""
    return {
        "proxy_over_direct_rps": rps_ratio(summaries, "proxy", "direct"),
        "nginx_over_direct_rps": rps_ratio(summaries, "nginx", "direct"),
        "proxy_over_nginx_rps": rps_ratio(summaries, "proxy", "nginx"),
        "uvgate_over_nginx_cpu_per_req": cpu_ratio(summaries, "proxy", "nginx", "total"),
        "uvgate_over_nginx_user_per_req": cpu_ratio(summaries, "proxy", "nginx", "user"),
        "uvgate_over_nginx_system_per_req": cpu_ratio(summaries, "proxy", "nginx", "system"),
    }


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_ratios(summaries: Sequence[ScenarioSummary]) -> list[str]:
    """The footer lines under the table; only ratios whose scenarios were both measured."""
    r = ratios(summaries)
    lines = []
    if r["proxy_over_direct_rps"] is not None:
        lines.append(f"proxy RPS / direct RPS: {_ratio(r['proxy_over_direct_rps'])}")
    if r["nginx_over_direct_rps"] is not None:
        lines.append(f"nginx RPS / direct RPS: {_ratio(r['nginx_over_direct_rps'])}")
    if r["uvgate_over_nginx_cpu_per_req"] is not None:
        lines.append(
            f"uvgate CPU µs/req ÷ nginx CPU µs/req: {_ratio(r['uvgate_over_nginx_cpu_per_req'])} "
            f"(user {_ratio(r['uvgate_over_nginx_user_per_req'])}, "
            f"sys {_ratio(r['uvgate_over_nginx_system_per_req'])})"
        )
    return lines


def format_mib(size: int | None) -> str:
    """Bytes as MiB with one decimal, or '-'."""
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_HEADER = (
    "scenario",
    "runs",
    "RPS",
    "p50 µs",
    "p99 µs",
    "errors",
    "proxy CPU µs/req",
    "user µs/req",
    "sys µs/req",
    "backend CPU µs/req",
)


def format_table(summaries: Sequence[ScenarioSummary]) -> str:
    """The result table: one row per scenario; proxy CPU is uvgate's in `proxy`, nginx's in `nginx`."""
    rows = [TABLE_HEADER] + [
        (
            s.scenario,
            str(s.runs),
            f"{s.rps:,.0f}",
            f"{s.p50_us:,.0f}",
            f"{s.p99_us:,.0f}",
            str(s.errors),
            _num(s.proxy_cpu_us_per_req, ".1f"),
            _num(s.proxy_user_us_per_req, ".1f"),
            _num(s.proxy_system_us_per_req, ".1f"),
            _num(s.backend_cpu_us_per_req, ".1f"),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
