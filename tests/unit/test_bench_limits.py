"""The bench's rate-limit scenarios: configs, the rejecting limit, Redis commands, the footer, 429s from wrk.

Nothing here starts a server; the wrk report line is parsed from text.
"""

from __future__ import annotations

from typing import Any

import pytest

import bench.__main__ as bench_main
from bench.cpu import CpuTimes
from bench.jwt import JWT_HOST
from bench.limits import (
    LIMITS_HOST,
    commands_per_1000,
    limited_lines,
    reject_limit,
    rejecting_line,
    with_limit_route,
    with_limited_routes,
    with_reject_limit,
)
from bench.report import RunRecord
from bench.wrk_runner import REJECTING_LUA, WrkResult, parse_wrk_output
from devstack import StackError
from proxy.config import build

TEMPLATE: dict[str, Any] = {
    "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
    "routes": [{"prefix": "/api/", "upstream": "backend"}],
}


def _result(requests: int, rejected: int = 0) -> WrkResult:
    return WrkResult(requests, 1.0, 1, 1, 1, 1, 1, 1, {"status": 0}, rejected)


def test_limited_routes_add_the_jwt_route_and_the_same_route_with_limits() -> None:
    config = with_limited_routes(TEMPLATE)
    routes = {route.get("host"): route for route in config["routes"]}
    assert routes[None] == {"prefix": "/api/", "upstream": "backend"}, "the /api/ route keeps no auth, no limit"
    assert routes[JWT_HOST]["auth"] == "jwt" and "limits" not in routes[JWT_HOST]
    assert (routes[LIMITS_HOST]["auth"], routes[LIMITS_HOST]["limits"]) == ("jwt", ["bench"])
    limit = config["limits"]["bench"]
    assert limit["local_rate"] > 0 and limit["global_limit"] > 0, "local and global"
    assert "redis" in config and "redis" not in TEMPLATE, "the template is not changed"


def test_limit_route_needs_the_route_beside_it() -> None:
    with pytest.raises(StackError, match="no /api/ route"):
        with_limit_route({"routes": [{"prefix": "/other/", "upstream": "backend"}]})


def test_reject_limit_is_the_share_of_the_load_over_the_workers() -> None:
    limit = reject_limit(12_345.0, 1)
    assert (limit.rate, limit.burst, limit.total_rate) == (1234, 12, 1234)
    two = reject_limit(12_345.0, 2)
    assert (two.rate, two.total_rate) == (617, 1234)
    assert reject_limit(3.0, 1).rate == 1 and reject_limit(3.0, 1).burst == 1, "at least one"
    for rps, workers, share in ((0.0, 1, 0.1), (100.0, 0, 0.1), (100.0, 1, 1.0)):
        with pytest.raises(ValueError):
            reject_limit(rps, workers, share)


def test_reject_limit_on_the_api_route_is_a_valid_config() -> None:
    config = with_reject_limit(TEMPLATE, reject_limit(10_000.0, 1))
    assert config["routes"][0]["limits"] == ["reject"]
    assert config["limits"]["reject"] == {"local_rate": 1000, "local_burst": 10}
    assert "redis" not in config, "a local bucket needs no Redis"
    assert "limits" not in TEMPLATE["routes"][0]
    checked = build(config)
    assert checked.limits["reject"].local_rate == 1000


def test_limited_config_is_a_valid_config() -> None:
    config = with_limited_routes(TEMPLATE)
    assert build(config).limits["bench"].global_limit == 1_000_000_000


def test_commands_per_1000() -> None:
    assert commands_per_1000(100, 151, 10_000) == pytest.approx(5.0), "the INFO after is not the proxy's"
    assert commands_per_1000(100, 101, 0) is None


def test_limited_lines_against_the_bars() -> None:
    assert limited_lines(None, []) == []
    cost, commands = limited_lines(1.5, [4.0, 30.0, 5.0])
    assert cost == "limited: rate limits (limits - jwt) CPU µs/req, paired by round: median +1.50 (within the bar of 4)"
    assert (
        commands
        == "limited: Redis commands per 1,000 requests: median 5.0 (runs: 4.0, 30.0, 5.0; within the bar of 20)"
    )
    assert "OVER the bar of 4" in limited_lines(4.5, [])[0]
    assert "OVER the bar of 20" in limited_lines(None, [21.0])[0]


def test_rejecting_line() -> None:
    line = rejecting_line(reject_limit(10_000.0, 1), 20_000, 18_500)
    assert line == (
        "rejecting: limit 1,000/s (1,000/s per worker, burst 10) = 10% of the 10,000 req/s the proxy forwarded "
        "without it; proxy runs admitted 7.5% of 20,000 requests (18,500 answered 429)"
    )


def test_limit_report() -> None:
    records = [
        RunRecord("jwt", 0, _result(1000), CpuTimes(0.020, 0.0), 0.0, "limited"),
        RunRecord("limits", 0, _result(1000), CpuTimes(0.022, 0.0), 0.0, "limited"),
        RunRecord("proxy", 0, _result(1000, 900), CpuTimes(0.005, 0.0), 0.0, "rejecting"),
        RunRecord("baseline", 0, _result(1000, 0), CpuTimes(0.005, 0.0), 0.0, "rejecting"),
    ]
    figures, lines = bench_main.limit_report(records, [6.0, 8.0], reject_limit(5000.0, 1))
    assert figures["limited"]["limits_minus_jwt_cpu_per_req_paired"] == pytest.approx(2.0)
    assert figures["limited"]["redis_commands_per_1000_requests"] == pytest.approx(7.0)
    assert figures["rejecting"]["limit_per_s"] == 500 and figures["rejecting"]["admitted_share"] == pytest.approx(0.1)
    assert len(lines) == 3 and lines[-1].startswith("rejecting: limit 500/s")
    assert bench_main.limit_report(records[:1], [], None)[0]["limited"]["limits_minus_jwt_cpu_per_req_paired"] is None
    assert bench_main.limit_report([], [], None) == ({}, [])


def test_footer_carries_the_limit_lines_before_the_notes() -> None:
    plan = bench_main.Plan((), ("proxy",), {}, {}, ("a note",))
    lines = bench_main.footer_lines([], {}, {}, plan, "nginx", "2 CPUs", ["limited: x"])
    assert lines == ["limited: x", "note: a note", "machine: 2 CPUs"]


WRK_LINE = (
    'WRK_JSON {"requests":10000,"duration_us":1000000,"bytes":1,'
    '"latency_us":{"p50":1,"p90":2,"p99":3,"p999":4,"mean":1.5,"max":5},'
    '"errors":{"connect":0,"read":0,"write":0,"status":9005,"timeout":0}%s}\n'
)


def test_wrk_429s_apart_from_status_errors() -> None:
    result = parse_wrk_output(WRK_LINE % ',"rejected":9000')
    assert (result.rejected, result.errors["status"], result.total_errors) == (9000, 5, 5)
    plain = parse_wrk_output(WRK_LINE % "")
    assert (plain.rejected, plain.errors["status"]) == (0, 9005), "without the counting script"
    with pytest.raises(ValueError, match="9999 answers with 429"):
        parse_wrk_output(WRK_LINE % ',"rejected":9999')


def test_rejecting_script_counts_429_and_reports_them() -> None:
    text = REJECTING_LUA.read_text()
    assert "status == 429" in text and "rejected_total" in text and 'dofile(here .. "report.lua")' in text
    report = REJECTING_LUA.with_name("report.lua").read_text()
    assert "rejected_total ~= nil" in report and '"rejected":%d' in report
