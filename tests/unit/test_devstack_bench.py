"""bench helpers: wrk report parsing, aggregation, the table, and the missing-wrk exit."""

from __future__ import annotations

import pytest

from bench.__main__ import main
from bench.cpu import CpuTimes
from bench.report import RunRecord, format_table, rps_ratio, summarize
from bench.wrk_runner import REPORT_LUA, WrkResult, duration_seconds, parse_wrk_output

WRK_STDOUT = """\
Running 1s test @ http://127.0.0.1:1/api/resource
  1 threads and 10 connections
Requests/sec:  49421.40
WRK_JSON {"requests":49481,"duration_us":1001206,"bytes":9055023,"latency_us":{"p50":152,"p90":331,"p99":856,\
"p999":4390,"mean":204.2,"max":5501},"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":3}}
"""


def _result(requests: int, p50: float = 100.0, errors: int = 0) -> WrkResult:
    errs = {"connect": 0, "read": 0, "write": 0, "status": errors, "timeout": 0}
    return WrkResult(requests, 1.0, p50, p50, p50 * 2, p50 * 3, p50, p50 * 4, errs)


def test_parse_wrk_output() -> None:
    result = parse_wrk_output(WRK_STDOUT)
    assert result.requests == 49481
    assert result.duration_s == pytest.approx(1.001206)
    assert result.rps == pytest.approx(49481 / 1.001206)
    assert (result.p50_us, result.p99_us, result.p999_us, result.max_us) == (152, 856, 4390, 5501)
    assert result.total_errors == 6
    assert result.as_dict()["errors"]["timeout"] == 3


def test_parse_wrk_output_without_report_line() -> None:
    with pytest.raises(ValueError, match="WRK_JSON"):
        parse_wrk_output("Requests/sec: 1\n")


def test_report_lua_ships() -> None:
    text = REPORT_LUA.read_text(encoding="utf-8")
    assert "done = function" in text and "WRK_JSON" in text


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("2m", 120), ("1h", 3600), ("30", 30)])
def test_duration_seconds(text: str, seconds: int) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5s", "10ms", "-1s", "s"])
def test_duration_seconds_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        duration_seconds(text)


def test_summarize_medians_and_ratio() -> None:
    records = [
        RunRecord("direct", 0, _result(1000, 50), None, 0.010),
        RunRecord("proxy", 0, _result(400, 120, errors=1), CpuTimes(0.015, 0.005), 0.004),
        RunRecord("direct", 1, _result(1200, 40), None, 0.012),
        RunRecord("proxy", 1, _result(600, 100), CpuTimes(0.020, 0.010), 0.006),
        RunRecord("direct", 2, _result(1100, 45), None, 0.011),
        RunRecord("proxy", 2, _result(500, 110, errors=2), CpuTimes(0.020, 0.005), 0.005),
    ]
    direct, proxy = summarize(records)
    assert (direct.scenario, direct.runs, direct.rps, direct.p50_us) == ("direct", 3, 1100, 45)
    assert direct.proxy_cpu_us_per_req is None
    assert direct.backend_cpu_us_per_req == pytest.approx(10.0)
    assert (proxy.rps, proxy.errors) == (500, 3)
    assert proxy.proxy_cpu_us_per_req == pytest.approx(50.0)
    assert proxy.proxy_user_us_per_req == pytest.approx(37.5)  # medians of 37.5, 33.3, 40.0
    assert proxy.proxy_system_us_per_req == pytest.approx(12.5)  # medians of 12.5, 16.7, 10.0
    assert rps_ratio([direct, proxy]) == pytest.approx(500 / 1100)
    assert rps_ratio([proxy]) is None
    table = format_table([direct, proxy]).splitlines()
    assert table[0].split()[:3] == ["scenario", "runs", "RPS"]
    assert table[2].split()[:3] == ["direct", "3", "1,100"] and table[2].split()[6] == "-"
    assert table[2].split()[6:] == ["-", "-", "-", "10.0"]
    assert table[3].split()[6:] == ["50.0", "37.5", "12.5", "10.0"]
    assert len({len(line) for line in table}) == 1, "columns are aligned"


def test_missing_wrk_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WRK", raising=False)
    monkeypatch.setenv("PATH", "")
    assert main(["--runs", "1"]) == 2
    assert "apt-get install wrk" in capsys.readouterr().err
