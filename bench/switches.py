"""uvgate with one setting switched, against `proxy`: `nometrics` (metrics off) and `accesslog` (access log on).

Each is a uvgate of its own, started like `proxy` (same template, same scenario hooks, workers, pinning and
request) from a config that differs from proxy's in that one setting, so the paired difference of their
proxy CPU µs/req (`bench.report.paired_difference`, per round, ABBA) is what the feature costs:

- metrics: `proxy - nometrics`, with `[metrics] enabled = false` in nometrics (issue bar: at most 3 % of the
  proxy's CPU per request; metrics are on by default, as in configs/bench.toml);
- access log: `accesslog - proxy`, with `server.access_log = true` and `access_log_path` a file in the run dir
  (the proxy buffers the lines and writes once per tick or 64 KiB, as in production; the default is off).

`template_problems` says when the template has not got proxy's side of a comparison (metrics off, or the
access log on), which would make the difference meaningless. The targets are not among `--target all`:
each adds a run per round to every scenario; they are chosen by name (`--target proxy,nometrics,accesslog`).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import RunRecord, paired_difference

__all__ = [
    "ACCESSLOG",
    "ACCESS_LOG_FILE",
    "METRICS_BAR",
    "NOMETRICS",
    "SWITCHES",
    "SWITCH_TARGETS",
    "Switch",
    "switch_dir",
    "switch_report",
    "switched_config",
    "template_problems",
]

NOMETRICS = "nometrics"
"""uvgate with `[metrics] enabled = false`."""
ACCESSLOG = "accesslog"
"""uvgate with the access log on, to `ACCESS_LOG_FILE` in its run dir."""
ACCESS_LOG_FILE = "access.log"
METRICS_BAR = 0.03
"""The issue's bar: metrics cost at most this share of the proxy's CPU per request."""


@dataclass(frozen=True, slots=True)
class Switch:
    """A target that is `proxy` with one feature switched, and how its cost is read."""

    target: str
    feature: str
    """What the difference is the cost of, for the footer."""
    on: str
    """The target with the feature on (the minuend)."""
    off: str
    """The target with the feature off (the subtrahend)."""
    bar: float | None = None
    """The most the feature may cost, as a share of proxy's CPU µs/req (None: measured, no bar)."""

    @property
    def key(self) -> str:
        """The JSON key of the paired difference, e.g. `proxy_minus_nometrics_cpu_per_req_paired`."""
        return f"{self.on}_minus_{self.off}_cpu_per_req_paired"


SWITCHES = (
    Switch(NOMETRICS, "metrics", "proxy", NOMETRICS, METRICS_BAR),
    Switch(ACCESSLOG, "access log", ACCESSLOG, "proxy"),
)
SWITCH_TARGETS = tuple(s.target for s in SWITCHES)
"""The `--target` choices outside `all`, in the order they run (after `proxy` and its extra targets)."""


def switch_dir(run_dir: Path, scenario: str, target: str) -> Path:
    """Where a switched target of `scenario` keeps its files (the access log)."""
    return run_dir / scenario / target


def switched_config(target: str, template: dict[str, Any], directory: Path) -> dict[str, Any]:
    """A copy of `template` with `target`'s switch (its access log, if any, in `directory`); KeyError for a
    target that is not a switch."""
    data = copy.deepcopy(template)
    if target == NOMETRICS:
        data.setdefault("metrics", {})["enabled"] = False
    elif target == ACCESSLOG:
        server = data.setdefault("server", {})
        server["access_log"] = True
        server["access_log_path"] = str(directory / ACCESS_LOG_FILE)
    else:
        raise KeyError(target)
    return data


def template_problems(template: dict[str, Any], targets: Sequence[str]) -> list[str]:
    """Why the switched `targets` would not compare on with off against the template's `proxy`."""
    problems = []
    if NOMETRICS in targets and template.get("metrics", {}).get("enabled", True) is not True:
        problems.append(f"--target {NOMETRICS} compares against proxy with metrics on: the config turns them off")
    if ACCESSLOG in targets and template.get("server", {}).get("access_log", False) is not False:
        problems.append(f"--target {ACCESSLOG} compares against proxy without access log: the config turns it on")
    return problems


def switch_report(records: Sequence[RunRecord]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per scenario, each switch's paired cost against `proxy` for the JSON (by scenario) and the footer: the
    median over rounds of (on - off) CPU µs/req, and that as a share of proxy's median CPU µs/req."""
    figures: dict[str, dict[str, Any]] = {}
    lines: list[str] = []
    for scenario in dict.fromkeys(r.scenario for r in records):
        runs = [r for r in records if r.scenario == scenario]
        proxy = [v for r in runs if r.target == "proxy" and (v := r.proxy_cpu_us_per_req) is not None]
        proxy_cpu = statistics.median(proxy) if proxy else None
        for switch in SWITCHES:
            cost = paired_difference(runs, switch.on, switch.off)
            if cost is None:
                continue
            share = cost / proxy_cpu if proxy_cpu else None
            figures.setdefault(scenario, {})[switch.key] = cost
            figures[scenario][f"{switch.on}_minus_{switch.off}_share_of_proxy_cpu"] = share
            line = (
                f"{scenario}: {switch.feature} ({switch.on} - {switch.off}) CPU µs/req, paired by round: "
                f"median {cost:+.2f}"
            )
            if share is not None:
                line += f" = {share:+.1%} of proxy's {proxy_cpu:.1f}"
                if switch.bar is not None:
                    verdict = "within" if share <= switch.bar else "OVER"
                    line += f" ({verdict} the bar of {switch.bar:.0%})"
            lines.append(line)
    return figures, lines
