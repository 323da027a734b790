"""The bench kit: peers' configs, scenarios and targets, spreads, Locust folding, request shapes, the chart.

Nothing here starts a server or a load generator.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench.chart import CHART_NAMES, PALETTE, ChartUnavailable, target_colours, write_chart
from bench.cpu import CpuTimes
from bench.locust_runner import (
    LOCUSTFILE,
    REJECTED_NAME,
    find_locust,
    fold_locust_csv,
    locust_argv,
    locust_env,
    run_locust,
)
from bench.nginx import LARGE_BODY_SIZE, LARGE_PATH, large_body, render_backend_conf, render_nginx_conf
from bench.peers import CADDY, HAPROXY, PEERS, find_peer, peer_version, render_peer_conf
from bench.report import (
    RunRecord,
    ScenarioSummary,
    format_ratios,
    paired_difference,
    paired_ratio,
    ratios_by_scenario,
    saturation_notes,
    spread,
    summarize,
)
from bench.scenarios import SCENARIOS, TARGETS, parse_names, plan_targets, round_order
from bench.shapes import BODY_SIZE, REALISTIC_HEADERS, order_document
from bench.wrk_runner import BODY_LUA, REALISTIC_LUA, WrkResult
from devstack import StackError


def _result(requests: int, p99: float = 200.0, rejected: int = 0) -> WrkResult:
    errs = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    return WrkResult(requests, 1.0, 100.0, 150.0, p99, p99 * 2, 110.0, p99 * 3, errs, rejected)


def _directives(conf: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in conf.splitlines())
    return [" ".join(line.split()) for line in lines if line]


# ---------------------------------------------------------------------------------------------- peers


def test_haproxy_conf_is_fair(tmp_path: Path) -> None:
    conf = render_peer_conf(HAPROXY, run_dir=tmp_path, listen="127.0.0.1:18080", backend="127.0.0.1:18000")
    stmts = _directives(conf)
    for expected in (
        "nbthread 1",
        "mode http",
        "option http-keep-alive",
        "http-reuse always",
        "option forwardfor",
        "bind 127.0.0.1:18080",
        "server backend 127.0.0.1:18000",
    ):
        assert expected in stmts, expected
    assert not any(s.startswith(("log ", "option httplog")) for s in stmts), "no access log"
    assert "$" not in conf, "every placeholder filled in"
    two = _directives(render_peer_conf(HAPROXY, run_dir=tmp_path, listen="x:1", backend="y:2", threads=2))
    assert "nbthread 2" in two


def test_caddy_conf_is_fair(tmp_path: Path) -> None:
    conf = render_peer_conf(CADDY, run_dir=tmp_path, listen="127.0.0.1:18080", backend="127.0.0.1:18000", keepalive=64)
    data = json.loads(conf)
    assert data["admin"] == {"disabled": True, "config": {"persist": False}}
    server = data["apps"]["http"]["servers"]["bench"]
    assert server["listen"] == ["127.0.0.1:18080"]
    assert server["automatic_https"] == {"disable": True}
    assert "logs" not in server, "no access log"
    (handler,) = server["routes"][0]["handle"]
    assert handler["handler"] == "reverse_proxy"
    assert handler["upstreams"] == [{"dial": "127.0.0.1:18000"}]
    assert handler["transport"]["keep_alive"]["enabled"] is True
    assert handler["transport"]["keep_alive"]["max_idle_conns_per_host"] == 64
    assert data["storage"]["root"] == f"{tmp_path}/data", "nothing written outside the run dir"
    env = CADDY.env(2, tmp_path)
    assert env["GOMAXPROCS"] == "2" and env["HOME"] == str(tmp_path)


def test_peer_command_lines(tmp_path: Path) -> None:
    assert HAPROXY.argv("/usr/sbin/haproxy", tmp_path / "h.cfg") == [
        "/usr/sbin/haproxy",
        "-db",
        "-f",
        f"{tmp_path}/h.cfg",
    ]
    assert CADDY.argv("/usr/bin/caddy", tmp_path / "c.json") == [
        "/usr/bin/caddy",
        "run",
        "--config",
        f"{tmp_path}/c.json",
    ]
    assert list(PEERS) == ["haproxy", "caddy"]
    for spec in PEERS.values():
        assert f"apt-get install {spec.name}" in spec.missing and "\n" not in spec.missing


def test_find_peer_order(tmp_path: Path) -> None:
    assert find_peer(HAPROXY, {"HAPROXY": "/opt/haproxy"}, lambda _: "/usr/bin/haproxy") == "/opt/haproxy"
    assert find_peer(HAPROXY, {}, lambda _: "/usr/bin/haproxy") == "/usr/bin/haproxy"
    assert find_peer(CADDY, {}, lambda _: None, fallback_dirs=(str(tmp_path),)) is None
    binary = tmp_path / "caddy"
    binary.write_text("#!/bin/sh\n")
    assert find_peer(CADDY, {}, lambda _: None, fallback_dirs=(str(tmp_path),)) is None, "not executable"
    binary.chmod(0o755)
    assert find_peer(CADDY, {"CADDY": ""}, lambda _: None, fallback_dirs=(str(tmp_path),)) == str(binary)


def test_a_wrong_peer_binary_gives_the_install_hint(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="apt-get install haproxy"):
        peer_version(HAPROXY, str(tmp_path / "missing"))
    with pytest.raises(StackError, match="apt-get install caddy"):
        peer_version(CADDY, "/bin/false")


def test_missing_peers_are_notes_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "find_peer", lambda spec: None)
    monkeypatch.setattr(bench_main, "find_nginx", lambda: None)
    binaries, versions, notes, fatal = bench_main.find_peers(TARGETS, explicit=False)
    assert (binaries, versions, fatal) == ({}, {}, [])
    assert [n.split()[0] for n in notes] == ["nginx", "haproxy", "caddy"]
    _, _, notes, fatal = bench_main.find_peers(("haproxy", "proxy"), explicit=True)
    assert notes == [] and fatal == [HAPROXY.missing]


def test_a_broken_peer_is_a_note_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "find_peer", lambda spec: "/bin/false")
    _, _, notes, fatal = bench_main.find_peers(("caddy",), explicit=False)
    assert fatal == [] and notes[0].endswith("skipping the caddy target") and "apt-get install caddy" in notes[0]
    _, _, notes, fatal = bench_main.find_peers(("caddy",), explicit=True)
    assert notes == [] and "skipping" not in fatal[0] and "apt-get install caddy" in fatal[0]


def test_a_peer_asked_for_but_missing_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_run(*_: object) -> int:
        raise AssertionError("must not start anything")

    monkeypatch.setattr(bench_main, "find_wrk", lambda: "/usr/bin/wrk")
    monkeypatch.setattr(bench_main, "find_peer", lambda spec: None)
    monkeypatch.setattr(bench_main, "run", no_run)
    assert bench_main.main(["--target", "caddy,proxy"]) == 2
    assert "apt-get install caddy" in capsys.readouterr().err


def test_nginx_for_the_body_and_workers_scenarios(tmp_path: Path) -> None:
    stmts = _directives(render_nginx_conf(run_dir=tmp_path, listen="127.0.0.1:1", backend="127.0.0.1:2", workers=2))
    assert "worker_processes 2;" in stmts
    assert "proxy_max_temp_file_size 0;" in stmts and "client_body_buffer_size 64k;" in stmts
    backend = _directives(render_backend_conf(run_dir=tmp_path, listen="127.0.0.1:1"))
    at = backend.index(f"location = {LARGE_PATH} {{")
    assert backend[at + 1] == f'root "{tmp_path}/www";'
    assert backend[at + 2] == "error_page 405 =200 $uri;"
    body = large_body()
    assert len(body) == LARGE_BODY_SIZE == 256 * 1024
    assert len(json.loads(body)["items"]) > 2000
    with pytest.raises(ValueError):
        large_body(5)


# ---------------------------------------------------------------------------------------------- scenarios


def test_scenarios_of_the_issue() -> None:
    assert list(SCENARIOS) == ["plain", "realistic", "jwt", "limited", "rejecting", "body", "workers"]
    assert SCENARIOS["body"].path == LARGE_PATH and SCENARIOS["workers"].workers == 2
    assert SCENARIOS["jwt"].tokens and SCENARIOS["jwt"].proxy_config is not None
    limited, rejecting = SCENARIOS["limited"], SCENARIOS["rejecting"]
    assert limited.tokens and limited.redis and limited.extra_targets == ("jwt", "limits")
    assert rejecting.reject_share == pytest.approx(0.1) and rejecting.uvgate_only and not rejecting.tokens
    assert all(s.proxy_config is None for name, s in SCENARIOS.items() if name not in ("jwt", "limited"))


def test_parse_names() -> None:
    choices = tuple(SCENARIOS)
    assert parse_names("all", choices) == choices
    assert parse_names("body, plain", choices) == ("plain", "body"), "run order, not typing order"
    assert parse_names("limits,plain", choices, {"limits": "limited"}) == ("plain", "limited"), "an old name"
    with pytest.raises(ValueError, match="unknown huge"):
        parse_names("plain,huge", choices)
    with pytest.raises(ValueError):
        parse_names(" , ", choices)


def _args(*argv: str) -> argparse.Namespace:
    return bench_main.build_parser().parse_args(list(argv))


def test_resolve_names_keeps_old_command_lines() -> None:
    assert bench_main.resolve_names(_args()) == (tuple(SCENARIOS), TARGETS, [])
    scenarios, targets, notes = bench_main.resolve_names(_args("--scenario", "proxy", "--request", "jwt"))
    assert (scenarios, targets) == (("jwt",), ("proxy",))
    assert notes == ["--scenario proxy is read as --target proxy"]
    assert bench_main.resolve_names(_args("--scenario", "nginx"))[:2] == (("plain",), ("nginx",))
    scenarios, targets, notes = bench_main.resolve_names(_args("--scenario", "proxy", "--request", "limits"))
    assert (scenarios, targets, notes) == (("limited",), ("proxy",), ["--scenario proxy is read as --target proxy"])
    assert bench_main.resolve_names(_args("--scenario", "limited,rejecting"))[0] == ("limited", "rejecting")


def test_plan_targets() -> None:
    def everything(name: str) -> bool:
        return True

    plain, jwt, workers = SCENARIOS["plain"], SCENARIOS["jwt"], SCENARIOS["workers"]
    assert plan_targets(TARGETS, everything, scenario=plain) == (TARGETS, [])
    assert plan_targets(TARGETS, lambda name: name == "nginx", scenario=plain) == (
        ("direct", "nginx", "proxy"),
        ["haproxy", "caddy"],
    )
    assert plan_targets(TARGETS, everything, scenario=jwt, baseline=True)[0] == (*TARGETS, "jwt", "baseline")
    assert plan_targets(TARGETS, everything, scenario=workers)[0] == ("nginx", "haproxy", "caddy", "proxy")
    assert plan_targets(("proxy",), everything, scenario=plain, baseline=True)[0] == ("proxy", "baseline")
    limited, rejecting = SCENARIOS["limited"], SCENARIOS["rejecting"]
    assert plan_targets(TARGETS, everything, scenario=limited)[0] == (*TARGETS, "jwt", "limits")
    assert plan_targets(TARGETS, everything, scenario=rejecting, baseline=True) == (("proxy", "baseline"), [])


def test_round_order_is_abba() -> None:
    assert round_order(TARGETS, 1) == tuple(reversed(TARGETS))
    assert [round_order(TARGETS, i)[0] for i in range(3)] == ["direct", "proxy", "direct"]


def test_pinning_is_stated() -> None:
    assert "CPU 0" in bench_main.pinning_text(True, 2) and "CPU 1" in bench_main.pinning_text(True, 2)
    assert bench_main.pinning_text(False, 2) == "pinning off (2 CPUs)"
    assert bench_main.cpu_model()


# ---------------------------------------------------------------------------------------------- folding


def _two_scenarios() -> list[RunRecord]:
    # plain: nginx 10 µs/req, proxy 12/13/14 µs/req; realistic: nginx 11, proxy 16
    records = []
    for index, (proxy_cpu, rps) in enumerate([(0.012, 1000), (0.0143, 1100), (0.0126, 900)]):
        records.append(RunRecord("nginx", index, _result(1000), CpuTimes(0.005, 0.005), 0.004, "plain"))
        records.append(RunRecord("proxy", index, _result(rps, 300.0 + index), CpuTimes(proxy_cpu, 0.0), 0.004))
    for index in range(3):
        records.append(RunRecord("nginx", index, _result(1000), CpuTimes(0.011, 0.0), 0.004, "realistic"))
        records.append(RunRecord("proxy", index, _result(1000, rejected=2), CpuTimes(0.016, 0.0), 0.004, "realistic"))
    return records


def test_spread() -> None:
    assert spread([90.0, 100.0, 110.0]) == pytest.approx(0.1)
    assert spread([5.0]) == 0.0
    assert spread([None, None]) is None
    assert spread([0.0, 0.0]) is None


def test_summaries_by_scenario_and_target() -> None:
    summaries = summarize(_two_scenarios())
    assert [(s.scenario, s.target) for s in summaries] == [
        ("plain", "nginx"),
        ("plain", "proxy"),
        ("realistic", "nginx"),
        ("realistic", "proxy"),
    ]
    proxy = summaries[1]
    assert proxy.proxy_cpu_us_per_req == pytest.approx(13.0)
    assert proxy.cpu_spread == pytest.approx(1 / 13)
    assert proxy.rps_spread == pytest.approx(100 / 1000)
    assert proxy.p99_spread == pytest.approx(1 / 301)
    assert proxy.ranges["p99_us"] == (300.0, 302.0)
    assert proxy.ranges["proxy_cpu_us_per_req"] == pytest.approx((12.0, 14.0))
    assert "proxy_cpu_us_per_req" not in summarize([RunRecord("direct", 0, _result(5), None, 0.0)])[0].ranges
    assert summaries[3].rejected == 6
    data = summaries[3].as_dict()
    assert (data["scenario"], data["target"], data["rejected_429_total"]) == ("realistic", "proxy", 6)
    assert data["ranges"]["rps"] == [1000.0, 1000.0]
    by = ratios_by_scenario(summaries)
    assert by["plain"]["uvgate_over_nginx_cpu_per_req"] == pytest.approx(1.3)
    assert by["realistic"]["uvgate_over_nginx_cpu_per_req"] == pytest.approx(16 / 11)


def test_footer_names_the_scenario() -> None:
    lines = format_ratios(summarize(_two_scenarios()))
    assert lines == [
        "plain: uvgate CPU µs/req ÷ nginx CPU µs/req: 1.30 (user 2.60, sys 0.00)",
        "realistic: uvgate CPU µs/req ÷ nginx CPU µs/req: 1.45 (user 1.45, sys -)",
    ]
    assert saturation_notes(summarize(_two_scenarios()))[0].startswith("note: plain nginx used 1% of a core")


def test_peer_ratios_in_the_footer() -> None:
    records = [
        RunRecord("haproxy", 0, _result(1000), CpuTimes(0.010, 0.0), 0.0),
        RunRecord("caddy", 0, _result(1000), CpuTimes(0.040, 0.0), 0.0),
        RunRecord("proxy", 0, _result(1000), CpuTimes(0.020, 0.0), 0.0),
    ]
    assert format_ratios(summarize(records)) == [
        "uvgate CPU µs/req ÷ haproxy CPU µs/req: 2.00",
        "uvgate CPU µs/req ÷ caddy CPU µs/req: 0.50",
    ]


def test_paired_difference_pairs_within_a_scenario() -> None:
    records = [
        RunRecord("proxy", 0, _result(1000), CpuTimes(0.010, 0.0), 0.0, "jwt"),
        RunRecord("jwt", 0, _result(1000), CpuTimes(0.012, 0.0), 0.0, "jwt"),
        RunRecord("proxy", 0, _result(1000), CpuTimes(0.050, 0.0), 0.0, "plain"),
    ]
    assert paired_difference(records, "jwt", "proxy") == pytest.approx(2.0)


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    # Rounds' ratios 1.1, 1.2 and 1.8: median 1.2, where the ratio of the medians is 36 / 20 = 1.8. A round
    # with one side missing (proxy, round 3) does not count.
    cpu = {("nginx", 0): 0.010, ("proxy", 0): 0.011, ("nginx", 1): 0.030, ("proxy", 1): 0.036}
    cpu |= {("nginx", 2): 0.020, ("proxy", 2): 0.036, ("proxy", 3): 0.050}
    records = [RunRecord(t, i, _result(1000), CpuTimes(c, 0.0), 0.0) for (t, i), c in cpu.items()]
    assert paired_ratio(records, "proxy", "nginx") == pytest.approx(1.2)
    assert paired_ratio(records, "proxy", "haproxy") is None


# ---------------------------------------------------------------------------------------------- Locust

LOCUST_STATS = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
GET,plain,9000,30,4,4.5,0.5,120,53,900.0,3.0,4,5,5,6,7,9,12,20,60,110,120
GET,429,1000,0,2,2.1,0.4,30,17,100.0,0.0,2,2,3,3,4,5,7,9,25,30,30
,Aggregated,10000,30,4,4.3,0.4,120,49,1000.0,3.0,4,5,5,6,7,9,12,19,58,110,120
"""
LOCUST_FAILURES = """\
Method,Name,Error,Occurrences
GET,plain,"HTTPError('502 Client Error: Bad Gateway for url: plain')",20
GET,plain,"ConnectionRefusedError(111, 'Connection refused')",10
"""


def test_fold_locust_csv() -> None:
    result = fold_locust_csv(LOCUST_STATS, LOCUST_FAILURES)
    assert result.requests == 10000
    assert result.duration_s == pytest.approx(10.0)
    assert result.rps == pytest.approx(1000.0)
    assert (result.p50_us, result.p90_us, result.p99_us, result.p999_us) == (4000, 7000, 19000, 58000)
    assert (result.mean_us, result.max_us) == pytest.approx((4300, 120000))
    assert result.rejected == 1000, "429s apart"
    assert result.errors == {"connect": 10, "read": 0, "write": 0, "status": 20, "timeout": 0}
    assert result.total_errors == 30
    assert result.as_dict()["rejected_429"] == 1000
    assert fold_locust_csv(LOCUST_STATS).errors["status"] == 30, "failures without details count as status"


def test_fold_locust_csv_without_aggregated_row() -> None:
    with pytest.raises(ValueError, match="Aggregated"):
        fold_locust_csv(LOCUST_STATS.splitlines()[0] + "\n")


def test_locust_records_fold_into_the_table() -> None:
    result = fold_locust_csv(LOCUST_STATS, LOCUST_FAILURES)
    (summary,) = summarize([RunRecord("proxy", 0, result, CpuTimes(0.2, 0.1), 0.05)])
    assert (summary.rps, summary.rejected, summary.errors) == (1000.0, 1000, 30)
    assert summary.proxy_cpu_us_per_req == pytest.approx(30.0)


def test_locust_command_line_and_env(tmp_path: Path) -> None:
    argv = locust_argv("/venv/bin/locust", "http://127.0.0.1:1", users=50, seconds=10, csv_prefix=tmp_path / "run")
    assert argv[:3] == ["/venv/bin/locust", "-f", str(LOCUSTFILE)]
    assert {"--headless", "--only-summary"} <= set(argv)
    assert argv[argv.index("--users") + 1] == argv[argv.index("--spawn-rate") + 1] == "50"
    assert argv[argv.index("--run-time") + 1] == "10s" and argv[argv.index("--csv") + 1] == f"{tmp_path}/run"
    env = locust_env(scenario="jwt", path="/api/resource", tokens=tmp_path / "t.txt", host="jwt.bench")
    assert env == {
        "BENCH_SCENARIO": "jwt",
        "BENCH_PATH": "/api/resource",
        "BENCH_TOKENS": f"{tmp_path}/t.txt",
        "BENCH_HOST": "jwt.bench",
    }
    assert locust_env(scenario="plain", path="/x", tokens=None, host=None) == {
        "BENCH_SCENARIO": "plain",
        "BENCH_PATH": "/x",
    }
    text = LOCUSTFILE.read_text(encoding="utf-8")
    assert "FastHttpUser" in text and f'REJECTED_NAME = "{REJECTED_NAME}"' in text


def test_find_locust(tmp_path: Path) -> None:
    assert find_locust({"LOCUST": "/opt/locust"}) == "/opt/locust"
    python = tmp_path / "python"
    assert find_locust({}, lambda _: "/usr/bin/locust", str(python)) == "/usr/bin/locust"
    beside = tmp_path / "locust"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert find_locust({}, lambda _: None, str(python)) == str(beside)


def test_missing_locust_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_main, "find_locust", lambda: None)
    assert bench_main.main(["--tool", "locust"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- shapes


def test_locust_sends_the_wrk_scripts_bytes() -> None:
    joined = re.sub(r'"\s*\n\s*\.\.\s*"', "", REALISTIC_LUA.read_text(encoding="utf-8"))
    lua_headers = dict(re.findall(r'^wrk\.headers\["([^"]+)"\]\s*=\s*"([^"]*)"\s*$', joined, re.MULTILINE))
    assert lua_headers == REALISTIC_HEADERS
    body = order_document()
    assert len(body) == BODY_SIZE == 16384
    assert len(json.loads(body)["items"]) == 220
    lua = BODY_LUA.read_text(encoding="utf-8")
    assert "for i = 1, 220 do" in lua and '{"id":%d,"sku":"SKU-%06d","qty":%d,"note":"ordinary line item"}' in lua
    assert body.startswith(b'{"order":"bench","items":[{"id":1,"sku":"SKU-000007","qty":1,')


# ---------------------------------------------------------------------------------------------- chart


def test_target_colours_are_stable() -> None:
    colours = target_colours(["proxy", "nginx", "custom"])
    assert len(set(colours.values())) == 3
    assert target_colours(["nginx"])["nginx"] == colours["nginx"] == PALETTE[1]
    assert CHART_NAMES["proxy"] == "uvgate"
    every = target_colours(["direct", "nginx", "haproxy", "caddy", "proxy", "jwt", "limits", "nometrics", "accesslog"])
    assert len(set(every.values())) == 9, "every target of a full run with the switched uvgates has its own colour"
    assert target_colours(["accesslog"]) == {"accesslog": every["accesslog"]}


def test_chart_is_a_png(tmp_path: Path) -> None:
    summaries: list[ScenarioSummary] = summarize(_two_scenarios())
    summaries += summarize([RunRecord("direct", 0, _result(5000), None, 0.01, "plain")])
    out = write_chart(summaries, tmp_path / "results" / "run.png", labels={"proxy": "uvgate"}, title="canned")
    assert out == tmp_path / "results" / "run.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- report footer


def _plan(*scenarios: str, notes: tuple[str, ...] = ()) -> bench_main.Plan:
    return bench_main.Plan(tuple(SCENARIOS[n] for n in scenarios), TARGETS, {}, {}, notes)


def test_footer_lines() -> None:
    summaries = summarize(_two_scenarios())
    lines = bench_main.footer_lines(
        summaries, {}, {"plain": None, "jwt": 1.5}, _plan("plain", "body", notes=("caddy not found",)), "stub", "2 CPUs"
    )
    assert lines[:2] == format_ratios(summaries)
    assert "jwt: auth (jwt - proxy) CPU µs/req, paired by round: median +1.50" in lines
    with_pairs = bench_main.footer_lines(summaries, {}, {}, _plan("plain"), "nginx", "x", paired_nginx={"plain": 1.234})
    assert "plain: uvgate CPU µs/req ÷ nginx CPU µs/req, paired by round: median 1.23" in with_pairs
    assert "note: caddy not found" in lines
    assert any(line.startswith("note: body with backend_stub") for line in lines)
    assert lines[-1] == "machine: 2 CPUs"
    nginx_backend = bench_main.footer_lines(summaries, {}, {}, _plan("body"), "nginx", "x")
    assert not any("backend_stub" in line for line in nginx_backend)
    failed = [RunRecord("proxy", 0, WrkResult(10, 1.0, 1, 1, 1, 1, 1, 1, {"status": 3}), None, 0.0)]
    assert bench_main.footer_lines(summarize(failed), {}, {}, _plan("plain"), "nginx", "x")[-1].startswith("WARNING: 3")


def test_rss_lines() -> None:
    rss = {"plain": {"proxy": {"initial": {}, "start": {"1": 2**20}, "end": {"1": 3 * 2**20}}, "baseline": {}}}
    assert bench_main.rss_lines(rss, {"proxy": "uvgate"}) == [
        "plain uvgate worker RSS: start 1.0 MiB, end 3.0 MiB (growth 2.0 MiB)"
    ]


def test_run_locust_folds_what_locust_wrote(tmp_path: Path) -> None:
    fake = tmp_path / "locust"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do if [ "$1" = --csv ]; then prefix=$2; fi; shift; done\n'
        'cat "$STATS" > "${prefix}_stats.csv"\n'
        'test "$BENCH_SCENARIO" = plain && test -n "$PYTHONPATH"\n'
    )
    fake.chmod(0o755)
    (tmp_path / "stats.csv").write_text(LOCUST_STATS)
    env = {"STATS": str(tmp_path / "stats.csv"), **locust_env(scenario="plain", path="/", tokens=None, host=None)}
    result = run_locust(str(fake), "http://127.0.0.1:1", seconds=1, users=2, csv_prefix=tmp_path / "run", env=env)
    assert (result.requests, result.rejected, result.errors["status"]) == (10000, 1000, 30)
    (tmp_path / "fail").write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    (tmp_path / "fail").chmod(0o755)
    with pytest.raises(RuntimeError, match="exited 3:\nboom"):
        run_locust(str(tmp_path / "fail"), "http://x", seconds=1, users=1, csv_prefix=tmp_path / "f", env={})


def test_chart_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ChartUnavailable, match=r"pip install -e '\.\[bench\]'"):
        write_chart(summarize(_two_scenarios()), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
