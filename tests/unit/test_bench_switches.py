"""The bench's switched uvgate targets (`nometrics`, `accesslog`): configs, planning and their footer lines.

Nothing here starts a server; the configs are checked by the proxy's own validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_main
from bench.cpu import CpuTimes
from bench.report import RunRecord
from bench.scenarios import SCENARIOS, TARGET_CHOICES, TARGETS, parse_names, plan_targets
from bench.switches import (
    ACCESS_LOG_FILE,
    SWITCH_TARGETS,
    switch_dir,
    switch_report,
    switched_config,
    template_problems,
)
from bench.wrk_runner import WrkResult
from devstack.config import load_config_source
from proxy.config import build

BENCH_TOML = Path(__file__).resolve().parents[2] / "configs" / "bench.toml"


def _result(requests: int) -> WrkResult:
    return WrkResult(requests, 1.0, 1, 1, 1, 1, 1, 1, {"status": 0})


def _record(target: str, index: int, cpu_s: float, scenario: str = "plain") -> RunRecord:
    return RunRecord(target, index, _result(1000), CpuTimes(cpu_s, 0.0), 0.0, scenario)


def test_switched_configs_differ_from_proxys_in_one_setting(tmp_path: Path) -> None:
    template = load_config_source(BENCH_TOML)
    proxy = build(template)
    assert proxy.metrics.enabled and not proxy.server.access_log, "proxy: metrics on, access log off"
    off = build(switched_config("nometrics", template, tmp_path))
    assert not off.metrics.enabled
    assert (off.server, off.routes, off.upstreams) == (proxy.server, proxy.routes, proxy.upstreams)
    logged = build(switched_config("accesslog", template, tmp_path))
    assert logged.server.access_log and logged.server.access_log_path == str(tmp_path / ACCESS_LOG_FILE)
    assert logged.metrics == proxy.metrics and logged.routes == proxy.routes
    assert load_config_source(BENCH_TOML) == template, "the template is not changed"
    with pytest.raises(KeyError):
        switched_config("proxy", template, tmp_path)
    assert switch_dir(tmp_path, "plain", "accesslog") == tmp_path / "plain" / "accesslog"


def test_a_template_without_proxys_side_is_refused() -> None:
    template: dict[str, Any] = {"server": {"access_log": True}, "metrics": {"enabled": False}}
    problems = template_problems(template, SWITCH_TARGETS)
    assert len(problems) == 2 and "metrics on" in problems[0] and "without access log" in problems[1]
    assert template_problems(template, ()) == []
    assert template_problems(load_config_source(BENCH_TOML), SWITCH_TARGETS) == []


def test_switched_targets_are_named_not_part_of_all() -> None:
    assert set(SWITCH_TARGETS) == {"nometrics", "accesslog"} and not set(SWITCH_TARGETS) & set(TARGETS)
    assert parse_names("all", TARGET_CHOICES, everything=TARGETS) == TARGETS
    assert parse_names("accesslog,all", TARGET_CHOICES, everything=TARGETS) == (*TARGETS, "accesslog")
    assert parse_names("nometrics,proxy", TARGET_CHOICES, everything=TARGETS) == ("proxy", "nometrics")
    assert parse_names("all", TARGET_CHOICES) == TARGET_CHOICES, "without `everything`, all is every choice"
    with pytest.raises(ValueError, match="unknown metrics"):
        parse_names("all,metrics", TARGET_CHOICES, everything=TARGETS)
    args = bench_main.build_parser().parse_args(["--target", "proxy,accesslog,nometrics"])
    assert bench_main.resolve_names(args)[1] == ("proxy", "nometrics", "accesslog")


def test_switched_targets_follow_proxy_and_its_extra_targets() -> None:
    def everything(name: str) -> bool:
        return True

    wanted = (*TARGETS, *SWITCH_TARGETS)
    plain, limited, rejecting = SCENARIOS["plain"], SCENARIOS["limited"], SCENARIOS["rejecting"]
    assert plan_targets(wanted, everything, scenario=plain)[0] == (*TARGETS, "nometrics", "accesslog")
    assert plan_targets(wanted, everything, scenario=limited, baseline=True)[0] == (
        *TARGETS,
        "jwt",
        "limits",
        "nometrics",
        "accesslog",
        "baseline",
    )
    assert plan_targets(wanted, everything, scenario=rejecting)[0] == ("proxy", "nometrics", "accesslog"), "uvgates"
    assert set(SWITCH_TARGETS) <= set(bench_main.UVGATE), "RSS tracked and code checked like proxy's"


def test_make_plan_checks_the_config(tmp_path: Path) -> None:
    parser = bench_main.build_parser()
    plan, problem = bench_main.make_plan(parser.parse_args(["--scenario", "plain", "--target", "proxy,nometrics"]))
    assert problem is None and plan is not None and plan.targets == ("proxy", "nometrics") and not plan.notes
    metrics_off = tmp_path / "off.toml"
    metrics_off.write_text(BENCH_TOML.read_text() + "\n[metrics]\nenabled = false\n")
    args = parser.parse_args(["--target", "proxy,nometrics", "--config", str(metrics_off)])
    assert bench_main.make_plan(args) == (None, template_problems({"metrics": {"enabled": False}}, ["nometrics"])[0])
    missing = parser.parse_args(["--target", "accesslog", "--config", str(tmp_path / "none.toml")])
    plan, problem = bench_main.make_plan(missing)
    assert plan is None and problem is not None and "none.toml" in problem
    alone = parser.parse_args(["--target", "accesslog"])
    plan, problem = bench_main.make_plan(alone)
    assert plan is not None and plan.notes == ("accesslog without proxy: no paired cost (add proxy to --target)",)
    assert bench_main.make_plan(parser.parse_args(["--target", "proxy,nometrics"]))[0] is not None


def test_switch_report_pairs_each_against_proxy() -> None:
    # plain, proxy 30/34/32 µs/req; nometrics 1 µs less each round (2 in round 2); accesslog 3 more each round
    records = []
    for index, (proxy, gap) in enumerate([(0.030, 0.001), (0.034, 0.002), (0.032, 0.001)]):
        records.append(_record("proxy", index, proxy))
        records.append(_record("nometrics", index, proxy - gap))
        records.append(_record("accesslog", index, proxy + 0.003))
    records.append(_record("proxy", 0, 0.040, "realistic"))
    records.append(_record("nometrics", 0, 0.038, "realistic"))
    figures, lines = switch_report(records)
    plain = figures["plain"]
    assert plain["proxy_minus_nometrics_cpu_per_req_paired"] == pytest.approx(1.0)
    assert plain["proxy_minus_nometrics_share_of_proxy_cpu"] == pytest.approx(1 / 32)
    assert plain["accesslog_minus_proxy_cpu_per_req_paired"] == pytest.approx(3.0)
    assert figures["realistic"]["proxy_minus_nometrics_share_of_proxy_cpu"] == pytest.approx(2 / 40)
    assert "accesslog_minus_proxy_cpu_per_req_paired" not in figures["realistic"], "not measured there"
    assert lines == [
        "plain: metrics (proxy - nometrics) CPU µs/req, paired by round: median +1.00 = +3.1% of proxy's 32.0 "
        "(OVER the bar of 3%)",
        "plain: access log (accesslog - proxy) CPU µs/req, paired by round: median +3.00 = +9.4% of proxy's 32.0",
        "realistic: metrics (proxy - nometrics) CPU µs/req, paired by round: median +2.00 = +5.0% of proxy's 40.0 "
        "(OVER the bar of 3%)",
    ]
    cheap = [_record("proxy", 0, 0.050), _record("nometrics", 0, 0.049)]
    assert switch_report(cheap)[1][0].endswith("= +2.0% of proxy's 50.0 (within the bar of 3%)")
    assert switch_report([_record("proxy", 0, 0.050), _record("jwt", 0, 0.060)]) == ({}, [])


def test_footer_carries_the_switch_lines() -> None:
    records = [_record("proxy", 0, 0.030), _record("nometrics", 0, 0.029)]
    summaries = bench_main.summarize(records)
    _, switch_text = switch_report(records)
    plan = bench_main.Plan((SCENARIOS["plain"],), ("proxy", "nometrics"), {}, {}, ())
    lines = bench_main.footer_lines(summaries, {}, {"plain": None}, plan, "nginx", "x", ["limit line"], switch_text)
    assert lines.index(switch_text[0]) < lines.index("limit line") < lines.index("machine: x")
