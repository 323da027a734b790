"""Aggregating wrk (or Locust) runs into the table `python -m bench` prints (pure functions).

Runs are grouped by (scenario, target): each summary holds the median of every figure over the rounds
and, for RPS, p99 and proxy CPU µs/req, the spread: half the range (max - min) over the median.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.cpu import CpuTimes
from bench.wrk_runner import WrkResult

__all__ = [
    "SATURATED",
    "STEAL_WARN",
    "TABLE_HEADER",
    "CpuField",
    "RunRecord",
    "ScenarioSummary",
    "by_scenario",
    "cpu_difference",
    "cpu_ratio",
    "format_mib",
    "format_ratios",
    "format_table",
    "noise_notes",
    "paired_difference",
    "paired_ratio",
    "ratios",
    "ratios_by_scenario",
    "rps_ratio",
    "saturation_notes",
    "spread",
    "steal_notes",
    "summarize",
    "value_range",
]

CpuField = Literal["total", "user", "system"]
"""Which part of the proxy CPU per request a ratio compares."""


SATURATED = 0.9
"""Share of a core below which a proxy row gets a note: it waited for the load side part of the time."""
NOISY = 0.1
"""Spread of CPU µs/req over the rounds (half the range over the median) beyond which a row gets a note."""
STEAL_WARN = 0.05
"""Steal (share of the busy CPU time) over which a kept run is named in a note, whatever --max-steal is."""


def _per_req(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else seconds * 1e6 / requests


def _share(seconds: float | None, duration_s: float) -> float | None:
    return None if seconds is None or duration_s <= 0 else seconds / duration_s


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One measured run: wrk's numbers plus the CPU the proxy on the path and the backend used meanwhile.

    `proxy_cpu` is the process tree under test: uvgate (supervisor + workers) in `proxy` and `jwt`,
    the baseline commit's uvgate in `baseline`, nginx (master + worker) in `nginx`, the HAProxy or
    Caddy process in `haproxy` and `caddy`, None in `direct`. `index` is the round.
    """

    target: str
    index: int
    result: WrkResult
    proxy_cpu: CpuTimes | None
    backend_cpu_s: float
    scenario: str = "plain"
    steal_share: float | None = None
    """Share of the machine's busy CPU time the hypervisor stole during the run (None off Linux)."""
    kept_attempt: int = 1
    """Which attempt this is (1 = the first) when the run was measured more than once."""
    discarded: tuple[RunRecord, ...] = ()
    """The other attempts, in order, when steal over `--max-steal` had the run measured again."""

    @property
    def attempts(self) -> int:
        """How many times the run was measured."""
        return 1 + len(self.discarded)

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

    @property
    def proxy_core_share(self) -> float | None:
        """Proxy CPU seconds per second of the run (1.0 = one core busy throughout)."""
        return _share(self.proxy_cpu_s, self.result.duration_s)

    @property
    def backend_core_share(self) -> float | None:
        """Backend CPU seconds per second of the run."""
        return _share(self.backend_cpu_s, self.result.duration_s)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "scenario": self.scenario,
            "target": self.target,
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
            "proxy_core_share": self.proxy_core_share,
            "backend_core_share": self.backend_core_share,
            "steal_share": self.steal_share,
            "attempts": self.attempts,
            "kept_attempt": self.kept_attempt,
            "discarded": [
                {"steal_share": r.steal_share, "proxy_cpu_us_per_req": r.proxy_cpu_us_per_req, "rps": r.result.rps}
                for r in self.discarded
            ],
        }


@dataclass(frozen=True, slots=True)
class ScenarioSummary:
    """One target in one scenario: medians over its runs (errors and 429s summed); each CPU figure is its
    own median; the `*_spread` fields are half the range over the median (0.03 = ±3 %)."""

    target: str
    runs: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    proxy_cpu_us_per_req: float | None
    backend_cpu_us_per_req: float | None
    proxy_user_us_per_req: float | None = None
    proxy_system_us_per_req: float | None = None
    proxy_core_share: float | None = None
    backend_core_share: float | None = None
    scenario: str = "plain"
    rejected: int = 0
    rps_spread: float | None = None
    p99_spread: float | None = None
    cpu_spread: float | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(min, max) over the rounds of `rps`, `p99_us` and `proxy_cpu_us_per_req` (the chart's whiskers)."""
    steal_share: float | None = None
    """Median share of the machine's busy CPU time stolen by the hypervisor during the kept attempts."""

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
            "target": self.target,
            "runs": self.runs,
            "rps_median": self.rps,
            "rps_spread": self.rps_spread,
            "p50_us_median": self.p50_us,
            "p99_us_median": self.p99_us,
            "p99_spread": self.p99_spread,
            "errors_total": self.errors,
            "rejected_429_total": self.rejected,
            "proxy_cpu_us_per_req_median": self.proxy_cpu_us_per_req,
            "proxy_cpu_spread": self.cpu_spread,
            "ranges": {name: list(pair) for name, pair in self.ranges.items()},
            "proxy_user_us_per_req_median": self.proxy_user_us_per_req,
            "proxy_system_us_per_req_median": self.proxy_system_us_per_req,
            "backend_cpu_us_per_req_median": self.backend_cpu_us_per_req,
            "proxy_core_share_median": self.proxy_core_share,
            "backend_core_share_median": self.backend_core_share,
            "steal_share_median": self.steal_share,
        }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def value_range(values: Sequence[float | None]) -> tuple[float, float] | None:
    """(min, max) of the values present; None without any."""
    present = [v for v in values if v is not None]
    return (min(present), max(present)) if present else None


def spread(values: Sequence[float | None]) -> float | None:
    """Half the range of `values` over their median (0.05 = ±5 %); None without values or a zero median."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    middle = statistics.median(present)
    return None if middle == 0 else (max(present) - min(present)) / 2 / abs(middle)


def summarize(records: Sequence[RunRecord]) -> list[ScenarioSummary]:
    """One summary per (scenario, target), in order of first appearance."""
    order = list(dict.fromkeys((r.scenario, r.target) for r in records))
    out = []
    for scenario, target in order:
        runs = [r for r in records if r.scenario == scenario and r.target == target]
        series: dict[str, list[float | None]] = {
            "rps": [r.result.rps for r in runs],
            "p99_us": [r.result.p99_us for r in runs],
            "proxy_cpu_us_per_req": [r.proxy_cpu_us_per_req for r in runs],
        }
        ranges = {name: pair for name, values in series.items() if (pair := value_range(values)) is not None}
        out.append(
            ScenarioSummary(
                target=target,
                runs=len(runs),
                rps=statistics.median(r.result.rps for r in runs),
                p50_us=statistics.median(r.result.p50_us for r in runs),
                p99_us=statistics.median(r.result.p99_us for r in runs),
                errors=sum(r.result.total_errors for r in runs),
                proxy_cpu_us_per_req=_median([r.proxy_cpu_us_per_req for r in runs]),
                backend_cpu_us_per_req=_median([r.backend_cpu_us_per_req for r in runs]),
                proxy_user_us_per_req=_median([r.proxy_user_us_per_req for r in runs]),
                proxy_system_us_per_req=_median([r.proxy_system_us_per_req for r in runs]),
                proxy_core_share=_median([r.proxy_core_share for r in runs]),
                backend_core_share=_median([r.backend_core_share for r in runs]),
                scenario=scenario,
                rejected=sum(r.result.rejected for r in runs),
                rps_spread=spread(series["rps"]),
                p99_spread=spread(series["p99_us"]),
                cpu_spread=spread(series["proxy_cpu_us_per_req"]),
                ranges=ranges,
                steal_share=_median([r.steal_share for r in runs]),
            )
        )
    return out


def _find(summaries: Sequence[ScenarioSummary], target: str) -> ScenarioSummary | None:
    return next((s for s in summaries if s.target == target), None)


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


def cpu_difference(
    summaries: Sequence[ScenarioSummary], minuend: str, subtrahend: str, field: CpuField = "total"
) -> float | None:
    """Median proxy CPU µs/req of `minuend` minus that of `subtrahend` (what `jwt` adds over `proxy`)."""
    top, bottom = _find(summaries, minuend), _find(summaries, subtrahend)
    if top is None or bottom is None:
        return None
    a, b = top.cpu(field), bottom.cpu(field)
    return None if a is None or b is None else a - b


def _round_pairs(records: Sequence[RunRecord], first: str, second: str) -> list[tuple[float, float]]:
    """(`first`, `second`) proxy CPU µs/req of each round and scenario that measured both."""
    by_round: dict[tuple[str, int], dict[str, float]] = {}
    for record in records:
        value = record.proxy_cpu_us_per_req
        if value is not None and record.target in (first, second):
            by_round.setdefault((record.scenario, record.index), {})[record.target] = value
    return [(r[first], r[second]) for r in by_round.values() if first in r and second in r]


def paired_difference(records: Sequence[RunRecord], minuend: str, subtrahend: str) -> float | None:
    """Median over rounds of (`minuend` - `subtrahend`) proxy CPU µs/req, each pair from the same round
    (adjacent runs, ABBA) and scenario: less sensitive to a drift of the machine's load than a difference of
    medians."""
    pairs = [a - b for a, b in _round_pairs(records, minuend, subtrahend)]
    return statistics.median(pairs) if pairs else None


def paired_ratio(records: Sequence[RunRecord], numerator: str, denominator: str) -> float | None:
    """Median over rounds of `numerator` ÷ `denominator` proxy CPU µs/req, paired like `paired_difference`:
    a second view of the ratio of medians, steadier when the machine's load comes in waves."""
    pairs = [a / b for a, b in _round_pairs(records, numerator, denominator) if b > 0]
    return statistics.median(pairs) if pairs else None


def ratios(summaries: Sequence[ScenarioSummary]) -> dict[str, float | None]:
    """Every ratio the footer shows, by JSON key (None when a side is missing)."""
    return {
        "proxy_over_direct_rps": rps_ratio(summaries, "proxy", "direct"),
        "nginx_over_direct_rps": rps_ratio(summaries, "nginx", "direct"),
        "proxy_over_nginx_rps": rps_ratio(summaries, "proxy", "nginx"),
        "uvgate_over_nginx_cpu_per_req": cpu_ratio(summaries, "proxy", "nginx", "total"),
        "uvgate_over_nginx_user_per_req": cpu_ratio(summaries, "proxy", "nginx", "user"),
        "uvgate_over_nginx_system_per_req": cpu_ratio(summaries, "proxy", "nginx", "system"),
        "proxy_over_baseline_cpu_per_req": cpu_ratio(summaries, "proxy", "baseline", "total"),
        "proxy_over_baseline_user_per_req": cpu_ratio(summaries, "proxy", "baseline", "user"),
        "proxy_over_baseline_system_per_req": cpu_ratio(summaries, "proxy", "baseline", "system"),
        "proxy_over_baseline_rps": rps_ratio(summaries, "proxy", "baseline"),
        "jwt_minus_proxy_cpu_per_req": cpu_difference(summaries, "jwt", "proxy", "total"),
        "jwt_minus_proxy_user_per_req": cpu_difference(summaries, "jwt", "proxy", "user"),
        "jwt_minus_proxy_system_per_req": cpu_difference(summaries, "jwt", "proxy", "system"),
        "jwt_over_proxy_rps": rps_ratio(summaries, "jwt", "proxy"),
        "uvgate_over_haproxy_cpu_per_req": cpu_ratio(summaries, "proxy", "haproxy", "total"),
        "uvgate_over_caddy_cpu_per_req": cpu_ratio(summaries, "proxy", "caddy", "total"),
    }


def by_scenario(summaries: Sequence[ScenarioSummary]) -> dict[str, list[ScenarioSummary]]:
    """The summaries grouped by scenario, in order of first appearance."""
    groups: dict[str, list[ScenarioSummary]] = {}
    for s in summaries:
        groups.setdefault(s.scenario, []).append(s)
    return groups


def ratios_by_scenario(summaries: Sequence[ScenarioSummary]) -> dict[str, dict[str, float | None]]:
    """`ratios` within each scenario (figures are only compared within a scenario)."""
    return {scenario: ratios(group) for scenario, group in by_scenario(summaries).items()}


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _label(target: str, labels: Mapping[str, str] | None) -> str:
    return (labels or {}).get(target, target)


def format_ratios(summaries: Sequence[ScenarioSummary], labels: Mapping[str, str] | None = None) -> list[str]:
    """The footer lines under the table, scenario by scenario (`<scenario>: ` before each line when there are
    several); only ratios whose targets were both measured.

    proxy ÷ baseline gets three decimals and the change in percent: it is read against a 3 % bar.
    """
    groups = by_scenario(summaries)
    if len(groups) > 1:
        return [f"{name}: {line}" for name, group in groups.items() for line in _scenario_ratios(group, labels)]
    return _scenario_ratios(summaries, labels)


def _scenario_ratios(summaries: Sequence[ScenarioSummary], labels: Mapping[str, str] | None) -> list[str]:
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
    for peer in ("haproxy", "caddy"):
        if r[f"uvgate_over_{peer}_cpu_per_req"] is not None:
            lines.append(f"uvgate CPU µs/req ÷ {peer} CPU µs/req: {_ratio(r[f'uvgate_over_{peer}_cpu_per_req'])}")
    total = r["proxy_over_baseline_cpu_per_req"]
    if total is not None:
        lines.append(
            f"proxy ÷ {_label('baseline', labels)} CPU µs/req: {_ratio(total, 3)} ({(total - 1) * 100:+.1f} %) "
            f"(user {_ratio(r['proxy_over_baseline_user_per_req'], 3)}, "
            f"sys {_ratio(r['proxy_over_baseline_system_per_req'], 3)}); "
            f"RPS {_ratio(r['proxy_over_baseline_rps'], 3)}"
        )
    added = r["jwt_minus_proxy_cpu_per_req"]
    if added is not None:
        lines.append(
            f"auth (jwt - proxy) CPU µs/req: {added:+.2f} "
            f"(user {r['jwt_minus_proxy_user_per_req'] or 0.0:+.2f}, "
            f"sys {r['jwt_minus_proxy_system_per_req'] or 0.0:+.2f}); "
            f"RPS jwt / proxy {_ratio(r['jwt_over_proxy_rps'], 3)}"
        )
    return lines


def noise_notes(
    summaries: Sequence[ScenarioSummary], labels: Mapping[str, str] | None = None, threshold: float = NOISY
) -> list[str]:
    """A note for each proxy row whose CPU µs/req varied by more than ±`threshold` over the rounds.

    The same binary doing the same work costs the same per request; a wide spread means something else
    changed between rounds (other work on the machine, a host under load), and the medians and the
    ratios between rows are uncertain by about as much.
    """
    return [
        f"note: {s.scenario} {_label(s.target, labels)} CPU µs/req varied ±{s.cpu_spread:.0%} over the rounds: "
        "the machine was not quiet, so its median (and the ratios using it) are uncertain by as much: re-run"
        for s in summaries
        if s.cpu_spread is not None and s.cpu_spread > threshold
    ]


def steal_notes(
    records: Sequence[RunRecord], limit: float, retries: int, labels: Mapping[str, str] | None = None
) -> list[str]:
    """Notes on steal time: how many runs were measured again because the hypervisor stole more than
    `limit` of the busy CPU time during them (`retries` extra attempts at most), and which runs kept more
    than `limit` or STEAL_WARN, whichever is lower (so turning the retries off keeps the warning).
    """
    lines = []
    again = [r for r in records if r.attempts > 1]
    if again:
        lines.append(
            f"note: {len(again)} of {len(records)} runs were measured again (up to {retries} more times) because "
            f"the hypervisor stole more than {_share_text(limit)} of the busy CPU time during them (steal in "
            "/proc/stat); each keeps its least-stolen attempt"
        )
    warn = min(limit, STEAL_WARN)
    over = [r for r in records if r.steal_share is not None and r.steal_share > warn]
    if over:
        runs = ", ".join(
            f"{r.scenario} {_label(r.target, labels)} round {r.index + 1} ({_share_text(r.steal_share or 0.0)})"
            for r in over
        )
        lines.append(
            f"note: steal over {_share_text(warn)} in the kept run of {runs}: the host was busy, and CPU µs/req "
            "measured under steal reads high: re-run when it is quieter"
        )
    return lines


def _share_text(share: float) -> str:
    return f"{round(share * 100, 1):g}%"  # 5%, 2.5%, 21.4%: as given, to a tenth


def saturation_notes(
    summaries: Sequence[ScenarioSummary], labels: Mapping[str, str] | None = None, threshold: float = SATURATED
) -> list[str]:
    """A note for each proxy row whose median share of a core stayed below `threshold`.

    Such a proxy was held back by the load side (wrk + backend) or by other work on the machine. Its
    CPU µs/req is then not its cost at saturation: waiting for requests adds idle wake-ups and
    fewer requests per event-loop turn, so comparing it with a saturated row overstates the gap.
    """
    return [
        f"note: {s.scenario} {_label(s.target, labels)} used {s.proxy_core_share:.0%} of a core: not saturated "
        f"(held back by the load side or other work), so its CPU µs/req is not its cost at saturation"
        for s in summaries
        if s.proxy_core_share is not None and s.proxy_core_share < threshold
    ]


def format_mib(size: int | None) -> str:
    """Bytes as MiB with one decimal, or '-'."""
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_HEADER = (
    "scenario",
    "target",
    "runs",
    "RPS",
    "±",
    "p50 µs",
    "p99 µs",
    "±",
    "errors",
    "429",
    "proxy CPU µs/req",
    "±",
    "user µs/req",
    "sys µs/req",
    "proxy core %",
    "backend CPU µs/req",
    "backend core %",
    "steal %",
)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}"


def _spread(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def format_table(summaries: Sequence[ScenarioSummary], labels: Mapping[str, str] | None = None) -> str:
    """The result table: one row per scenario and target, the target named by `labels` where given (e.g.
    `baseline@<hash>`).

    Figures are medians over the rounds; each `±` column is the spread of the figure before it (half the
    range over the median). proxy CPU is the process tree of the target (uvgate's in `proxy` and `jwt`,
    the baseline commit's in `baseline`, the peer's in `nginx`, `haproxy`, `caddy`); the core columns are
    CPU seconds per second of the run, in percent of one core.
    """
    rows = [TABLE_HEADER] + [
        (
            s.scenario,
            _label(s.target, labels),
            str(s.runs),
            f"{s.rps:,.0f}",
            _spread(s.rps_spread),
            f"{s.p50_us:,.0f}",
            f"{s.p99_us:,.0f}",
            _spread(s.p99_spread),
            str(s.errors),
            str(s.rejected),
            _num(s.proxy_cpu_us_per_req, ".1f"),
            _spread(s.cpu_spread),
            _num(s.proxy_user_us_per_req, ".1f"),
            _num(s.proxy_system_us_per_req, ".1f"),
            _percent(s.proxy_core_share),
            _num(s.backend_cpu_us_per_req, ".1f"),
            _percent(s.backend_core_share),
            _num(None if s.steal_share is None else s.steal_share * 100, ".1f"),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
