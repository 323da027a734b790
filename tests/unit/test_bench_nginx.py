"""bench's nginx reference scenario and CPU split: config rendering, scenario planning, ratios, the table.

Nothing here starts nginx or any other process.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench.cpu import CpuTimes, tree_cpu_times
from bench.nginx import (
    NGINX_MISSING,
    TEMP_PATHS,
    find_nginx,
    nginx_argv,
    parse_nginx_version,
    render_nginx_conf,
)
from bench.report import RunRecord, cpu_ratio, format_ratios, format_table, ratios, rps_ratio, summarize
from bench.wrk_runner import WrkResult


def _result(requests: int, p50: float = 100.0) -> WrkResult:
    errs = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    return WrkResult(requests, 1.0, p50, p50, p50 * 2, p50 * 3, p50, p50 * 4, errs)


def _directives(conf: str) -> list[str]:
    """Statements without comments and blank lines, whitespace-normalised."""
    lines = (line.split("#", 1)[0].strip() for line in conf.splitlines())
    return [" ".join(line.split()) for line in lines if line]


# ---------------------------------------------------------------------------------------------- nginx.conf


def test_render_nginx_conf_has_the_reference_setup(tmp_path: Path) -> None:
    conf = render_nginx_conf(run_dir=tmp_path, listen="127.0.0.1:18080", backend="127.0.0.1:18000")
    stmts = _directives(conf)
    for expected in (
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f'error_log "{tmp_path}/nginx-error.log" warn;',
        f'pid "{tmp_path}/nginx.pid";',
        "worker_connections 4096;",
        "access_log off;",
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


def test_plan_scenarios() -> None:
    assert bench_main.SCENARIOS == ("direct", "nginx", "proxy")
    assert bench_main.plan_scenarios("all", "/usr/sbin/nginx") == (("direct", "nginx", "proxy"), None)
    assert bench_main.plan_scenarios("all", None) == (("direct", "proxy"), NGINX_MISSING)
    assert bench_main.plan_scenarios("proxy", None) == (("proxy",), None)
    assert bench_main.plan_scenarios("nginx", "/usr/sbin/nginx") == (("nginx",), None)
    assert "apt-get install nginx" in NGINX_MISSING and "\n" not in NGINX_MISSING


def test_scenario_choices_and_defaults() -> None:
    args = bench_main.build_parser().parse_args([])
    assert (args.scenario, args.runs, args.duration, args.connections, args.threads) == ("all", 3, "10s", 50, 1)
    for choice in ("direct", "nginx", "proxy", "all"):
        assert bench_main.build_parser().parse_args(["--scenario", choice]).scenario == choice


def test_explicit_nginx_scenario_without_nginx_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_main, "find_wrk", lambda: "/usr/bin/wrk")
    monkeypatch.setattr(bench_main, "find_nginx", lambda: None)

    def no_run(*_: object) -> int:
        raise AssertionError("must not start anything")

    monkeypatch.setattr(bench_main, "run", no_run)
    assert bench_main.main(["--scenario", "nginx"]) == 2
    assert "apt-get install nginx" in capsys.readouterr().err


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
    assert [s.scenario for s in summaries] == ["direct", "nginx", "proxy"]
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
    without_nginx = [s for s in summaries if s.scenario != "nginx"]
    assert format_ratios(without_nginx) == ["proxy RPS / direct RPS: 0.50"]
    assert format_ratios([s for s in summaries if s.scenario == "direct"]) == []


def test_format_table_with_nginx_and_cpu_split() -> None:
    lines = format_table(summarize(_records())).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
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
    ]
    assert set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["direct", "nginx", "proxy"]
    assert lines[2].split()[6:] == ["-", "-", "-", "20.0"]
    assert lines[3].split()[1:] == ["3", "900", "100", "200", "0", "40.0", "10.0", "30.0", "25.0"]
    assert lines[4].split()[6:9] == ["100.0", "70.0", "30.0"]
    assert len({len(line) for line in lines}) == 1, "columns are aligned"
