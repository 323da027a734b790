"""bench helpers: wrk report parsing and scripts, aggregation, the table, and the missing-wrk exit."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.cpu import CpuTimes
from bench.report import RunRecord, format_table, rps_ratio, summarize
from bench.wrk_runner import REALISTIC_LUA, REPORT_LUA, WrkResult, duration_seconds, parse_wrk_output, run_wrk

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


def _lua_headers(text: str) -> dict[str, str]:
    """`wrk.headers["Name"] = "value" .. "more"` statements (values may continue on `..` lines)."""
    joined = re.sub(r'"\s*\n\s*\.\.\s*"', "", text)
    return dict(re.findall(r'^wrk\.headers\["([^"]+)"\]\s*=\s*"([^"]*)"\s*$', joined, re.MULTILINE))


def test_realistic_lua_sends_an_api_clients_head() -> None:
    text = REALISTIC_LUA.read_text(encoding="utf-8")
    headers = _lua_headers(text)
    names = {name.lower() for name in headers}
    assert {"user-agent", "accept", "accept-encoding", "content-type", "authorization"} <= names
    assert {"traceparent", "tracestate", "x-request-id"} <= names
    assert headers["Authorization"].startswith("Bearer ") and len(headers["Authorization"]) > 100
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", headers["traceparent"])
    # as sent: request line, wrk's Host header, these headers, blank line
    head = "GET /api/resource HTTP/1.1\r\nHost: 127.0.0.1:12345\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    assert 9 <= len(headers) <= 12 and 550 <= len(head) <= 700, (len(headers), len(head))
    # wrk formats a static request once: no per-request Lua function
    assert "request = function" not in text and "function request" not in text
    # and the report line comes from report.lua, loaded from the same directory
    assert re.search(r'dofile\(here \.\. "report\.lua"\)', text)
    assert REALISTIC_LUA.parent == REPORT_LUA.parent


def test_run_wrk_passes_the_script(tmp_path: Path) -> None:
    fake = tmp_path / "wrk"
    argv_file = tmp_path / "argv"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\ncat <<"EOF"\n{WRK_STDOUT}EOF\n', encoding="utf-8")
    fake.chmod(0o755)
    result = run_wrk(str(fake), "http://127.0.0.1:1/api/resource", duration="1s", connections=10, script=REALISTIC_LUA)
    assert result.requests == 49481
    argv = argv_file.read_text(encoding="utf-8").splitlines()
    assert argv[argv.index("-s") + 1] == str(REALISTIC_LUA)
    assert argv[-1] == "http://127.0.0.1:1/api/resource" and "-c10" in argv and "-d1s" in argv
    run_wrk(str(fake), "http://127.0.0.1:1/", duration="1s", connections=1)
    argv = argv_file.read_text(encoding="utf-8").splitlines()
    assert argv[argv.index("-s") + 1] == str(REPORT_LUA), "plain by default"


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
    assert (direct.target, direct.runs, direct.rps, direct.p50_us) == ("direct", 3, 1100, 45)
    assert direct.proxy_cpu_us_per_req is None
    assert direct.backend_cpu_us_per_req == pytest.approx(10.0)
    assert (proxy.rps, proxy.errors) == (500, 3)
    assert proxy.proxy_cpu_us_per_req == pytest.approx(50.0)
    assert proxy.proxy_user_us_per_req == pytest.approx(37.5)  # medians of 37.5, 33.3, 40.0
    assert proxy.proxy_system_us_per_req == pytest.approx(12.5)  # medians of 12.5, 16.7, 10.0
    assert rps_ratio([direct, proxy]) == pytest.approx(500 / 1100)
    assert rps_ratio([proxy]) is None
    table = format_table([direct, proxy]).splitlines()
    assert table[0].split()[:4] == ["scenario", "target", "runs", "RPS"]
    assert table[2].split()[:4] == ["plain", "direct", "3", "1,100"]
    assert table[2].split()[10:] == ["-", "-", "-", "-", "-", "10.0", "1", "-"]
    assert table[3].split()[8:] == ["3", "0", "50.0", "0%", "37.5", "12.5", "2", "10.0", "0", "-"]
    assert len({len(line) for line in table}) == 1, "columns are aligned"


def test_missing_wrk_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WRK", raising=False)
    monkeypatch.setenv("PATH", "")
    assert main(["--runs", "1"]) == 2
    assert "apt-get install wrk" in capsys.readouterr().err


@pytest.mark.parametrize("wrk", ["/nonexistent/wrk", "no-such-wrk-command"])
def test_a_wrong_wrk_path_exits_2_with_the_install_hint_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, wrk: str
) -> None:
    monkeypatch.setenv("WRK", wrk)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        assert main(["--runs", "1", "--results-dir", str(tmp_path / "results")]) == 2
    finally:
        tempfile.tempdir = None
    assert "apt-get install wrk" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no temporary directory or result left behind"
