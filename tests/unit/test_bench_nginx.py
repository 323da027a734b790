"""bench's nginx (reference proxy and backend), CLI choices, CPU split, ratios, the table.

Nothing here starts nginx or any other process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from backend_stub.app import API_BODY, HEALTH_BODY, NOT_FOUND_BODY
from bench.cpu import CpuTimes, tree_cpu_times
from bench.nginx import (
    BACKEND_KEEPALIVE_REQUESTS,
    NGINX_MISSING,
    NGINX_MISSING_BACKEND,
    TEMP_PATHS,
    find_nginx,
    nginx_argv,
    parse_nginx_version,
    render_backend_conf,
    render_nginx_conf,
)
from bench.report import (
    RunRecord,
    cpu_ratio,
    format_ratios,
    format_table,
    noise_notes,
    ratios,
    rps_ratio,
    saturation_notes,
    summarize,
)
from bench.scenarios import SCENARIOS
from bench.wrk_runner import BODY_LUA, REALISTIC_LUA, REPORT_LUA, WrkResult


def _result(requests: int, p50: float = 100.0) -> WrkResult:
    errs = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    return WrkResult(requests, 1.0, p50, p50, p50 * 2, p50 * 3, p50, p50 * 4, errs)


def _directives(conf: str) -> list[str]:
    """Statements without comments and blank lines, whitespace-normalised."""
    lines = (line.split("#", 1)[0].strip() for line in conf.splitlines())
    return [" ".join(line.split()) for line in lines if line]


# ---------------------------------------------------------------------------------------------- nginx.conf


def _main_context(run_dir: Path) -> tuple[str, ...]:
    """What both nginx configs start with: one worker in the foreground, files in the run dir."""
    return (
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f'error_log "{run_dir}/nginx-error.log" warn;',
        f'pid "{run_dir}/nginx.pid";',
        "worker_connections 4096;",
        "access_log off;",
    )


def test_render_nginx_conf_has_the_reference_setup(tmp_path: Path) -> None:
    conf = render_nginx_conf(run_dir=tmp_path, listen="127.0.0.1:18080", backend="127.0.0.1:18000")
    stmts = _directives(conf)
    for expected in (
        *_main_context(tmp_path),
        "server 127.0.0.1:18000;",
        "keepalive 256;",
        "listen 127.0.0.1:18080;",
        "proxy_pass http://backend;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    ):
        assert expected in stmts, expected
    assert not any(s.startswith("user ") for s in stmts), "no user directive unless asked"
    assert conf.count("{") == conf.count("}")
    for block in ("events {", "http {", "upstream backend {", "server {", "location / {"):
        assert block in stmts, block
    # the blocks nest as events | http > upstream, server > location
    order = [stmts.index(b) for b in ("events {", "http {", "upstream backend {", "server {", "location / {")]
    assert order == sorted(order)


def test_render_nginx_conf_keeps_every_temp_path_in_the_run_dir(tmp_path: Path) -> None:
    stmts = _directives(render_nginx_conf(run_dir=tmp_path, listen="127.0.0.1:1", backend="127.0.0.1:2"))
    temp = [s for s in stmts if "_temp_path " in s]
    assert sorted(s.split()[0] for s in temp) == sorted(f"{kind}_temp_path" for kind in TEMP_PATHS)
    for stmt in temp:
        assert stmt.split()[1].strip('";').startswith(f"{tmp_path}/temp/"), stmt
    assert {"client_body", "proxy", "fastcgi", "uwsgi", "scgi"} <= set(TEMP_PATHS)


def test_render_nginx_conf_user_and_quoting() -> None:
    run_dir = Path('/tmp/a dir/with "quote"')
    conf = render_nginx_conf(run_dir=run_dir, listen="127.0.0.1:1", backend="127.0.0.1:2", user=("root", "root"))
    stmts = _directives(conf)
    assert stmts[0] == "user root root;"
    assert r'pid "/tmp/a dir/with \"quote\"/nginx.pid";' in stmts
    assert "keepalive 256;" in stmts
    assert "keepalive 8;" in _directives(
        render_nginx_conf(run_dir=run_dir, listen="127.0.0.1:1", backend="127.0.0.1:2", keepalive=8)
    )


def _return_text(stmt: str) -> bytes:
    """The literal of `return <code> '<text>';`, unescaped as nginx reads it."""
    quoted = stmt.split(" ", 2)[2].removesuffix(";")
    assert quoted.startswith("'") and quoted.endswith("'"), stmt
    return re.sub(r"\\(.)", r"\1", quoted[1:-1]).encode()


def test_render_backend_conf_answers_like_backend_stub(tmp_path: Path) -> None:
    conf = render_backend_conf(run_dir=tmp_path, listen="127.0.0.1:18001")
    stmts = _directives(conf)
    for expected in (
        *_main_context(tmp_path),
        f"keepalive_requests {BACKEND_KEEPALIVE_REQUESTS};",
        "keepalive_timeout 3600s;",
        "default_type application/json;",
        "listen 127.0.0.1:18001;",
        "location /api/ {",
        "location = /health {",
        "location / {",
    ):
        assert expected in stmts, expected
    assert BACKEND_KEEPALIVE_REQUESTS >= 10**8, "no reconnects within a benchmark"
    assert not any(s.startswith(("proxy_pass", "upstream", "user ")) for s in stmts)
    returns = {stmts[i - 1]: s for i, s in enumerate(stmts) if s.startswith("return ")}
    assert returns["location /api/ {"].startswith("return 200 ")
    assert _return_text(returns["location /api/ {"]) == API_BODY
    assert _return_text(returns["location = /health {"]) == HEALTH_BODY
    assert returns["location / {"].startswith("return 404 ")
    assert _return_text(returns["location / {"]) == NOT_FOUND_BODY
    assert sorted(s.split()[0] for s in stmts if "_temp_path " in s) == sorted(f"{k}_temp_path" for k in TEMP_PATHS)
    assert conf.count("{") - API_BODY.count(b"{") - HEALTH_BODY.count(b"{") - NOT_FOUND_BODY.count(b"{") == (
        conf.count("}") - API_BODY.count(b"}") - HEALTH_BODY.count(b"}") - NOT_FOUND_BODY.count(b"}")
    )
    as_root = _directives(render_backend_conf(run_dir=tmp_path, listen="127.0.0.1:1", user=("root", "root")))
    assert as_root[0] == "user root root;"
    small = render_backend_conf(run_dir=tmp_path, listen="127.0.0.1:1", keepalive_requests=5)
    assert "keepalive_requests 5;" in _directives(small)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("nginx version: nginx/1.22.1", (1, 22, 1)),
        ("nginx version: nginx/1.18.0 (Ubuntu)\n", (1, 18, 0)),
        ("nginx version: openresty/1.21.4.1", None),
        ("", None),
    ],
)
def test_parse_nginx_version(text: str, version: tuple[int, int, int] | None) -> None:
    assert parse_nginx_version(text) == version


def test_nginx_argv_uses_e_only_where_supported(tmp_path: Path) -> None:
    base = ["/usr/sbin/nginx", "-p", f"{tmp_path}/", "-c", f"{tmp_path}/nginx.conf"]
    assert nginx_argv("/usr/sbin/nginx", tmp_path, (1, 22, 1)) == [*base, "-e", f"{tmp_path}/nginx-error.log"]
    assert nginx_argv("/usr/sbin/nginx", tmp_path, (1, 19, 5))[-2] == "-e"
    assert nginx_argv("/usr/sbin/nginx", tmp_path, (1, 18, 0)) == base
    assert nginx_argv("/usr/sbin/nginx", tmp_path, None) == base


def test_find_nginx_order(tmp_path: Path) -> None:
    fallback = tmp_path / "nginx"
    assert find_nginx({"NGINX": "/opt/nginx"}, lambda _: "/usr/bin/nginx", str(fallback)) == "/opt/nginx"
    assert find_nginx({}, lambda _: "/usr/bin/nginx", str(fallback)) == "/usr/bin/nginx"
    assert find_nginx({}, lambda _: None, str(fallback)) is None
    fallback.write_text("#!/bin/sh\n")
    assert find_nginx({}, lambda _: None, str(fallback)) is None, "not executable"
    fallback.chmod(0o755)
    assert find_nginx({"NGINX": ""}, lambda _: None, str(fallback)) == str(fallback)


# ---------------------------------------------------------------------------------------------- scenarios


def test_round_order_alternates() -> None:
    scenarios = ("direct", "nginx", "proxy", "baseline")
    assert bench_main.round_order(scenarios, 0) == scenarios
    assert bench_main.round_order(scenarios, 1) == ("baseline", "proxy", "nginx", "direct")
    assert bench_main.round_order(scenarios, 2) == scenarios
    firsts = [bench_main.round_order(("proxy", "baseline"), i)[0] for i in range(4)]
    assert firsts == ["proxy", "baseline", "proxy", "baseline"], "neither always runs first"


def test_scenario_choices_and_defaults() -> None:
    args = bench_main.build_parser().parse_args([])
    assert (args.scenario, args.runs, args.duration, args.connections, args.threads) == ("all", 3, "10s", 50, 1)
    assert (args.baseline, args.backend, args.request, args.target, args.tool) == (None, None, None, "all", "wrk")
    args = bench_main.build_parser().parse_args(["--baseline", "HEAD~1", "--backend", "stub", "--request", "realistic"])
    assert (args.baseline, args.backend, args.request) == ("HEAD~1", "stub", "realistic")


@pytest.mark.parametrize("argv", [["--backend", "apache"], ["--tool", "ab"]])
def test_bad_choices_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_scenario_scripts() -> None:
    assert {name: s.script for name, s in SCENARIOS.items()} == {
        "plain": REPORT_LUA,
        "realistic": REALISTIC_LUA,
        "jwt": REPORT_LUA.with_name("jwt.lua"),
        "limited": REPORT_LUA.with_name("jwt.lua"),
        "rejecting": REPORT_LUA.with_name("rejecting.lua"),
        "body": BODY_LUA,
        "workers": REPORT_LUA,
    }


def test_choose_backend() -> None:
    assert bench_main.BACKENDS == ("nginx", "stub")
    assert bench_main.choose_backend(None, "/usr/sbin/nginx") == "nginx"
    assert bench_main.choose_backend(None, None) == "stub"
    assert bench_main.choose_backend("stub", "/usr/sbin/nginx") == "stub"
    assert bench_main.choose_backend("nginx", "/usr/sbin/nginx") == "nginx"
    assert bench_main.choose_backend("nginx", None) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--scenario", "nginx"], NGINX_MISSING), (["--backend", "nginx", "--scenario", "proxy"], NGINX_MISSING_BACKEND)],
)
def test_nginx_required_but_missing_exits_2(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_run(*_: object) -> int:
        raise AssertionError("must not start anything")

    monkeypatch.setattr(bench_main, "find_wrk", lambda: "/usr/bin/wrk")
    monkeypatch.setattr(bench_main, "find_nginx", lambda: None)
    monkeypatch.setattr(bench_main, "run", no_run)
    assert bench_main.main(argv) == 2
    assert capsys.readouterr().err.strip().removeprefix("bench: ") == message
    assert "apt-get install nginx" in message


def test_main_passes_the_chosen_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str | None, str]] = []

    def fake_run(args: object, plan: bench_main.Plan, wrk: str, backend: str) -> int:
        seen.append((plan.binaries.get("nginx"), backend))
        return 0

    monkeypatch.setattr(bench_main, "find_peer", lambda spec: None)
    monkeypatch.setattr(bench_main, "nginx_version", lambda binary: "nginx version: nginx/1.22.1")
    monkeypatch.setattr(bench_main, "find_wrk", lambda: "/usr/bin/wrk")
    monkeypatch.setattr(bench_main, "run", fake_run)
    monkeypatch.setattr(bench_main, "find_nginx", lambda: None)
    assert bench_main.main([]) == 0
    monkeypatch.setattr(bench_main, "find_nginx", lambda: "/usr/sbin/nginx")
    assert bench_main.main([]) == 0
    assert bench_main.main(["--backend", "stub"]) == 0
    assert seen == [(None, "stub"), ("/usr/sbin/nginx", "nginx"), ("/usr/sbin/nginx", "stub")]


# ---------------------------------------------------------------------------------------------- CPU and ratios


def test_cpu_times_arithmetic() -> None:
    delta = CpuTimes(1.5, 0.75) - CpuTimes(1.0, 0.25)
    assert (delta.user_s, delta.system_s, delta.total_s) == pytest.approx((0.5, 0.5, 1.0))


def test_tree_cpu_times_of_this_process() -> None:
    times = tree_cpu_times(os.getpid())
    assert times.user_s > 0 and times.system_s >= 0


def _records() -> list[RunRecord]:
    # per run (µs/req): nginx 40 = 10 user + 30 sys; proxy 100 = 70 user + 30 sys, 120 = 84 + 36, ...
    return [
        RunRecord("direct", 0, _result(1000), None, 0.020),
        RunRecord("nginx", 0, _result(800), CpuTimes(0.008, 0.024), 0.020),
        RunRecord("proxy", 0, _result(500), CpuTimes(0.035, 0.015), 0.015),
        RunRecord("direct", 1, _result(1200), None, 0.024),
        RunRecord("nginx", 1, _result(900), CpuTimes(0.009, 0.027), 0.022),
        RunRecord("proxy", 1, _result(600), CpuTimes(0.0504, 0.0216), 0.018),
        RunRecord("direct", 2, _result(1100), None, 0.022),
        RunRecord("nginx", 2, _result(1000), CpuTimes(0.012, 0.028), 0.025),
        RunRecord("proxy", 2, _result(550), CpuTimes(0.0385, 0.0165), 0.016),
    ]


def test_run_record_cpu_split() -> None:
    nginx = _records()[1]
    assert nginx.proxy_cpu_s == pytest.approx(0.032)
    assert nginx.proxy_cpu_us_per_req == pytest.approx(40.0)
    assert (nginx.proxy_user_us_per_req, nginx.proxy_system_us_per_req) == pytest.approx((10.0, 30.0))
    data = nginx.as_dict()
    assert (data["proxy_user_s"], data["proxy_system_s"]) == pytest.approx((0.008, 0.024))
    assert data["proxy_system_us_per_req"] == pytest.approx(30.0)
    direct = _records()[0].as_dict()
    assert direct["proxy_cpu_s"] is direct["proxy_user_us_per_req"] is direct["proxy_system_us_per_req"] is None


def test_ratios_of_medians() -> None:
    summaries = summarize(_records())
    assert [s.target for s in summaries] == ["direct", "nginx", "proxy"]
    assert {s.scenario for s in summaries} == {"plain"}
    direct, nginx, proxy = summaries
    assert (nginx.proxy_cpu_us_per_req, nginx.proxy_user_us_per_req, nginx.proxy_system_us_per_req) == pytest.approx(
        (40.0, 10.0, 30.0)
    )
    assert (proxy.proxy_cpu_us_per_req, proxy.proxy_user_us_per_req, proxy.proxy_system_us_per_req) == pytest.approx(
        (100.0, 70.0, 30.0)
    )
    assert cpu_ratio(summaries) == pytest.approx(2.5)
    assert cpu_ratio(summaries, field="user") == pytest.approx(7.0)
    assert cpu_ratio(summaries, field="system") == pytest.approx(1.0)
    assert rps_ratio(summaries) == pytest.approx(550 / 1100)
    assert rps_ratio(summaries, "nginx", "direct") == pytest.approx(900 / 1100)
    values = ratios(summaries)
    assert values["uvgate_over_nginx_cpu_per_req"] == pytest.approx(2.5)
    assert values["proxy_over_nginx_rps"] == pytest.approx(550 / 900)
    assert cpu_ratio([direct, proxy]) is None, "no nginx row"
    assert cpu_ratio([direct, nginx], "direct", "nginx") is None, "direct has no proxy CPU"
    zero = summarize([RunRecord("nginx", 0, _result(100), CpuTimes(0.0, 0.0), 0.0), _records()[2]])
    assert cpu_ratio(zero) is None, "a zero denominator gives no ratio"


def test_format_ratios() -> None:
    summaries = summarize(_records())
    assert format_ratios(summaries) == [
        "proxy RPS / direct RPS: 0.50",
        "nginx RPS / direct RPS: 0.82",
        "uvgate CPU µs/req ÷ nginx CPU µs/req: 2.50 (user 7.00, sys 1.00)",
    ]
    without_nginx = [s for s in summaries if s.target != "nginx"]
    assert format_ratios(without_nginx) == ["proxy RPS / direct RPS: 0.50"]
    assert format_ratios([s for s in summaries if s.target == "direct"]) == []


def test_format_table_with_nginx_and_cpu_split() -> None:
    lines = format_table(summarize(_records())).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
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
    ]
    assert set(lines[1]) == {"-", " "}
    assert [line.split()[:2] for line in lines[2:]] == [["plain", "direct"], ["plain", "nginx"], ["plain", "proxy"]]
    assert lines[2].split()[10:] == ["-", "-", "-", "-", "-", "20.0", "2", "-"]
    # nginx: RPS 800/900/1000 (±11 %), p99 200 each, CPU 40/40/40 µs/req
    assert lines[3].split()[2:] == [
        *("3", "900", "11%", "100", "200", "0%", "0", "0"),
        *("40.0", "0%", "10.0", "30.0", "4", "25.0", "2", "-"),
    ]
    assert lines[4].split()[10:15] == ["100.0", "10%", "70.0", "30.0", "6"]
    assert len({len(line) for line in lines}) == 1, "columns are aligned"


# ---------------------------------------------------------------------------------------------- baseline


def _with_baseline() -> list[RunRecord]:
    # baseline per run (µs/req): 80 = 56 user + 24 sys, 96 = 67.2 + 28.8, 88 = 61.6 + 26.4; RPS 600, 700, 650
    return [
        *_records(),
        RunRecord("baseline", 0, _result(600), CpuTimes(0.0336, 0.0144), 0.018),
        RunRecord("baseline", 1, _result(700), CpuTimes(0.04704, 0.02016), 0.021),
        RunRecord("baseline", 2, _result(650), CpuTimes(0.04004, 0.01716), 0.019),
    ]


def test_core_shares() -> None:
    record = RunRecord("proxy", 0, WrkResult(1000, 2.0, 1, 1, 1, 1, 1, 1, {}), CpuTimes(1.2, 0.6), 0.5)
    assert (record.proxy_core_share, record.backend_core_share) == pytest.approx((0.9, 0.25))
    assert record.as_dict()["proxy_core_share"] == pytest.approx(0.9)
    direct = RunRecord("direct", 0, WrkResult(1000, 2.0, 1, 1, 1, 1, 1, 1, {}), None, 0.5)
    assert direct.proxy_core_share is None and direct.backend_core_share == pytest.approx(0.25)
    empty = RunRecord("proxy", 0, WrkResult(0, 0.0, 0, 0, 0, 0, 0, 0, {}), CpuTimes(0.0, 0.0), 0.0)
    assert empty.proxy_core_share is None and empty.proxy_cpu_us_per_req is None
    summary = summarize([record, record])[0]
    assert (summary.proxy_core_share, summary.backend_core_share) == pytest.approx((0.9, 0.25))
    assert summary.as_dict()["backend_core_share_median"] == pytest.approx(0.25)


def test_proxy_over_baseline_ratios() -> None:
    summaries = summarize(_with_baseline())
    assert [s.target for s in summaries] == ["direct", "nginx", "proxy", "baseline"]
    baseline = summaries[-1]
    assert (baseline.proxy_cpu_us_per_req, baseline.proxy_user_us_per_req) == pytest.approx((88.0, 61.6))
    values = ratios(summaries)
    assert values["proxy_over_baseline_cpu_per_req"] == pytest.approx(100 / 88)
    assert values["proxy_over_baseline_user_per_req"] == pytest.approx(70 / 61.6)
    assert values["proxy_over_baseline_system_per_req"] == pytest.approx(30 / 26.4)
    assert values["proxy_over_baseline_rps"] == pytest.approx(550 / 650)
    assert values["uvgate_over_nginx_cpu_per_req"] == pytest.approx(2.5), "the nginx ratio stays the working tree's"
    assert ratios(summarize(_records()))["proxy_over_baseline_cpu_per_req"] is None


def test_format_ratios_with_baseline() -> None:
    labels = {"baseline": "baseline@abc1234"}
    lines = format_ratios(summarize(_with_baseline()), labels)
    assert lines[:3] == format_ratios(summarize(_records()))
    assert lines[3] == ("proxy ÷ baseline@abc1234 CPU µs/req: 1.136 (+13.6 %) (user 1.136, sys 1.136); RPS 0.846")
    assert format_ratios(summarize(_with_baseline()))[3].startswith("proxy ÷ baseline CPU µs/req: 1.136")
    only = [s for s in summarize(_with_baseline()) if s.target in ("proxy", "baseline")]
    assert format_ratios(only, labels) == [lines[3]]


def test_format_table_labels_the_baseline() -> None:
    lines = format_table(summarize(_with_baseline()), {"baseline": "baseline@abc1234"}).splitlines()
    assert [line.split()[1] for line in lines[2:]] == ["direct", "nginx", "proxy", "baseline@abc1234"]
    assert lines[5].split()[2:15] == [
        *("3", "650", "8%", "100", "200", "0%", "0", "0"),
        *("88.0", "9%", "61.6", "26.4", "6"),
    ]
    assert len({len(line) for line in lines}) == 1, "columns are aligned"


def test_saturation_notes() -> None:
    def row(scenario: str, cpu_s: float) -> RunRecord:
        return RunRecord(scenario, 0, WrkResult(1000, 1.0, 1, 1, 1, 1, 1, 1, {}), CpuTimes(cpu_s, 0.0), 0.5)

    summaries = summarize([RunRecord("direct", 0, _result(1000), None, 0.9), row("nginx", 0.62), row("proxy", 0.95)])
    summaries += summarize([row("baseline", 0.5)])
    assert saturation_notes(summaries, {"baseline": "baseline@abc1234"}) == [
        "note: plain nginx used 62% of a core: not saturated (held back by the load side or other work), "
        "so its CPU µs/req is not its cost at saturation",
        "note: plain baseline@abc1234 used 50% of a core: not saturated (held back by the load side or other work), "
        "so its CPU µs/req is not its cost at saturation",
    ]
    assert saturation_notes(summaries, threshold=0.4) == []


def test_noise_notes() -> None:
    def row(target: str, cpu_s: float, round_: int) -> RunRecord:
        return RunRecord(target, round_, WrkResult(1000, 1.0, 1, 1, 1, 1, 1, 1, {}), CpuTimes(cpu_s, 0.0), 0.99)

    # nginx steady (19, 20, 21 µs/req: ±5 %), the proxy 20 to 30 (median 24: ±21 %).
    records = [row("nginx", c, i) for i, c in enumerate((0.019, 0.020, 0.021))]
    records += [row("proxy", c, i) for i, c in enumerate((0.020, 0.024, 0.030))]
    summaries = summarize(records)
    assert noise_notes(summaries) == [
        "note: plain proxy CPU µs/req varied ±21% over the rounds: the machine was not quiet, so its median "
        "(and the ratios using it) are uncertain by as much: re-run"
    ]
    assert noise_notes(summaries, threshold=0.25) == []
