"""bench's steal time: reading /proc/stat, measuring a run again while the hypervisor steals, the notes.

Nothing here starts a process; `_measure` is replaced by a function that hands out prepared records.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

import bench.__main__ as bench_main
from bench.cpu import MachineTicks, machine_ticks, parse_machine_ticks
from bench.report import RunRecord, format_table, steal_notes, summarize
from bench.scenarios import SCENARIOS
from bench.wrk_runner import WrkResult

PROC_STAT = """cpu  46895 0 44770 50098 470 0 30255 29962 0 0
cpu0 23356 0 19513 28529 72 0 16978 12602 0 0
cpu1 23538 0 25256 21568 398 0 13277 17360 0 0
intr 1 2 3
"""


def test_parse_the_machine_line_of_proc_stat() -> None:
    ticks = parse_machine_ticks(PROC_STAT)
    assert ticks == MachineTicks(46895 + 44770 + 50098 + 470 + 30255 + 29962, 29962)
    assert parse_machine_ticks("cpu  1 2 3 4 5 6 7\n") is None, "a kernel without steal time"
    assert parse_machine_ticks("intr 1 2\n") is None


def test_steal_share_between_two_readings() -> None:
    earlier = MachineTicks(1000, 10)
    assert MachineTicks(1200, 40).steal_share(earlier) == pytest.approx(0.15)
    assert MachineTicks(1000, 10).steal_share(earlier) is None, "no tick went by"


def test_this_machine_has_steal_time() -> None:
    first = machine_ticks()
    assert first is not None and first.total > 0 and 0 <= first.steal <= first.total


def _record(steal: float | None, requests: int = 1000) -> RunRecord:
    result = WrkResult(requests, 1.0, 1, 1, 1, 1, 1, 1, {})
    return RunRecord("proxy", 0, result, None, 0.5, "plain", steal)


def _context(max_steal: float, retries: int) -> bench_main.Context:
    args = argparse.Namespace(max_steal=max_steal, steal_retries=retries)
    return cast(bench_main.Context, SimpleNamespace(args=args, stack=SimpleNamespace(redis=None)))


def _measure_with(
    monkeypatch: pytest.MonkeyPatch, steals: list[float | None], max_steal: float, retries: int
) -> tuple[RunRecord, int]:
    """_measure_quietly over records whose steal shares are `steals` in turn (each with a distinct request
    count, to tell them apart): the record kept and how many were taken."""
    queue = [_record(steal, 1000 + n) for n, steal in enumerate(steals)]
    taken = []

    def fake(*_: object) -> RunRecord:
        taken.append(queue[len(taken)])
        return taken[-1]

    monkeypatch.setattr(bench_main, "_measure", fake)
    target = bench_main.Target("http://127.0.0.1:1/", None)
    record, per_1000 = bench_main._measure_quietly(_context(max_steal, retries), SCENARIOS["plain"], "proxy", 0, target)
    assert per_1000 is None
    return record, len(taken)


def test_a_quiet_run_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    record, taken = _measure_with(monkeypatch, [0.04, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.steal_share, record.result.requests) == (1, 1, 0.04, 1000)


def test_a_stolen_run_is_measured_again_and_the_least_stolen_attempt_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    record, taken = _measure_with(monkeypatch, [0.30, 0.02, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.steal_share, record.result.requests) == (2, 2, 0.02, 1001)
    record, taken = _measure_with(monkeypatch, [0.30, 0.10, 0.20], max_steal=5, retries=2)
    assert (taken, record.attempts, record.steal_share, record.result.requests) == (3, 3, 0.10, 1001)
    record, taken = _measure_with(monkeypatch, [0.30, 0.10], max_steal=5, retries=0)
    assert (taken, record.attempts, record.steal_share) == (1, 1, 0.30), "no retries asked for"
    record, taken = _measure_with(monkeypatch, [None, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.steal_share) == (1, 1, None), "no steal figure: nothing to wait for"


def test_steal_notes() -> None:
    quiet = [_record(0.01), _record(0.02)]
    assert steal_notes(quiet, 0.05, 2) == []
    again = [_record(0.01), RunRecord("nginx", 0, _record(0.03).result, None, 0.5, "plain", 0.03, attempts=2)]
    assert steal_notes(again, 0.05, 2) == [
        "note: 1 of 2 runs were measured again (up to 2 more times) because the hypervisor stole more than 5% of "
        "the CPU time during them (steal in /proc/stat); each keeps its least-stolen attempt"
    ]
    busy = [*again, RunRecord("proxy", 1, _record(0.2).result, None, 0.5, "plain", 0.21, attempts=3)]
    assert steal_notes(busy, 0.05, 2)[1] == (
        "note: 1 runs kept more than 5% steal (up to 21%): the host was busy, and their CPU µs/req is inflated: "
        "re-run when it is quieter"
    )


def test_the_table_shows_the_median_steal() -> None:
    records = [_record(0.01), _record(0.05), _record(0.30)]
    summary = summarize(records)[0]
    assert summary.steal_share == pytest.approx(0.05)
    assert summary.as_dict()["steal_share_median"] == pytest.approx(0.05)
    lines = format_table([summary]).splitlines()
    assert lines[0].split()[-2:] == ["steal", "%"]
    assert lines[2].split()[-1] == "5.0"


@pytest.mark.parametrize("argv", [["--max-steal", "0"], ["--max-steal", "101"], ["--steal-retries", "-1"]])
def test_bad_steal_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main.main(["--results-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert "--max-steal must be a percentage in (0, 100] and --steal-retries >= 0" in capsys.readouterr().err
