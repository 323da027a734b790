"""bench's steal time: reading /proc/stat, measuring a run again while the hypervisor steals, the notes.

Nothing here starts a process; `_measure` is replaced by a function that hands out prepared records.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

import bench.__main__ as bench_main
from bench.cpu import MachineTicks, machine_ticks, parse_machine_ticks
from bench.limits import LIMITS
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
    assert ticks == MachineTicks(46895 + 44770 + 30255 + 29962, 29962), "idle and iowait are not busy"
    assert parse_machine_ticks("cpu  1 2 3 4 5 6 7\n") is None, "a kernel without steal time"
    assert parse_machine_ticks("intr 1 2\n") is None


def test_steal_share_between_two_readings() -> None:
    earlier = MachineTicks(1000, 10)
    assert MachineTicks(1200, 40).steal_share(earlier) == pytest.approx(0.15)
    assert MachineTicks(1000, 10).steal_share(earlier) is None, "no busy tick went by"


def test_machine_ticks_reads_this_machines_proc_stat() -> None:
    """The kit and CI run on Linux, whose /proc/stat has had the steal field since 2.6.11."""
    first = machine_ticks()
    assert first is not None and first.busy > 0 and 0 <= first.steal <= first.busy


def _record(steal: float | None, requests: int = 1000) -> RunRecord:
    result = WrkResult(requests, 1.0, 1, 1, 1, 1, 1, 1, {})
    return RunRecord("proxy", 0, result, None, 0.5, "plain", steal)


def _context(max_steal: float, retries: int, redis: object = None) -> bench_main.Context:
    args = argparse.Namespace(max_steal=max_steal, steal_retries=retries)
    return cast(bench_main.Context, SimpleNamespace(args=args, stack=SimpleNamespace(redis=redis)))


def _measure_with(
    monkeypatch: pytest.MonkeyPatch,
    steals: list[float | None],
    max_steal: float,
    retries: int,
    name: str = "proxy",
    redis: object = None,
) -> tuple[RunRecord, float | None, int]:
    """_measure_quietly over records whose steal shares are `steals` in turn (attempt n has 1000 + n
    requests, to tell them apart): the record kept, its Redis figure and how many attempts were taken."""
    queue = [_record(steal, 1000 + n) for n, steal in enumerate(steals)]
    taken: list[RunRecord] = []

    def fake(*_: object) -> RunRecord:
        taken.append(queue[len(taken)])
        return taken[-1]

    monkeypatch.setattr(bench_main, "_measure", fake)
    target = bench_main.Target("http://127.0.0.1:1/", None)
    context = _context(max_steal, retries, redis)
    record, per_1000 = bench_main._measure_quietly(context, SCENARIOS["plain"], name, 0, target)
    return record, per_1000, len(taken)


def _requests(record: RunRecord) -> list[int]:
    return [r.result.requests for r in record.discarded]


def test_a_quiet_run_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    record, per_1000, taken = _measure_with(monkeypatch, [0.04, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.kept_attempt, record.steal_share) == (1, 1, 1, 0.04)
    assert record.result.requests == 1000 and record.discarded == () and per_1000 is None
    record, _, taken = _measure_with(monkeypatch, [0.05, 0.0], max_steal=5, retries=2)
    assert (taken, record.steal_share) == (1, 0.05), "at the limit is within it"


def test_a_stolen_run_is_measured_again_and_the_least_stolen_attempt_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    record, _, taken = _measure_with(monkeypatch, [0.30, 0.02, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.kept_attempt, record.steal_share) == (2, 2, 2, 0.02)
    assert (record.result.requests, _requests(record)) == (1001, [1000])
    record, _, taken = _measure_with(monkeypatch, [0.30, 0.10, 0.20], max_steal=5, retries=2)
    assert (taken, record.attempts, record.kept_attempt, record.steal_share) == (3, 3, 2, 0.10)
    assert (record.result.requests, _requests(record)) == (1001, [1000, 1002])
    record, _, taken = _measure_with(monkeypatch, [0.30, 0.10, 0.10], max_steal=5, retries=2)
    assert (record.kept_attempt, record.result.requests) == (2, 1001), "the earliest of equals"
    record, _, taken = _measure_with(monkeypatch, [0.30, 0.10], max_steal=5, retries=0)
    assert (taken, record.attempts, record.steal_share) == (1, 1, 0.30), "no retries asked for"
    record, _, taken = _measure_with(monkeypatch, [0.30, 0.10], max_steal=100, retries=2)
    assert (taken, record.attempts, record.steal_share) == (1, 1, 0.30), "--max-steal 100: never"
    record, _, taken = _measure_with(monkeypatch, [None, 0.0], max_steal=5, retries=2)
    assert (taken, record.attempts, record.steal_share) == (1, 1, None), "no steal figure: nothing to wait for"
    record, _, taken = _measure_with(monkeypatch, [0.30, None, 0.0], max_steal=5, retries=2)
    assert (taken, record.kept_attempt, record.steal_share) == (2, 1, 0.30), "a figure beats none"


def test_the_kept_attempt_keeps_its_own_redis_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis's command count before and after each of three attempts: 0 -> 101, 101 -> 152, 152 -> 403.
    counts = iter([0, 101, 101, 152, 152, 403])
    monkeypatch.setattr(bench_main, "redis_commands", lambda host, port: next(counts))
    redis = SimpleNamespace(host="127.0.0.1", port=1)
    record, per_1000, taken = _measure_with(
        monkeypatch, [0.30, 0.10, 0.20], max_steal=5, retries=2, name=LIMITS, redis=redis
    )
    assert (taken, record.kept_attempt) == (3, 2)
    assert per_1000 == pytest.approx(1000 * (152 - 101 - 1) / 1001), "the second attempt's, not the last"


def test_the_json_says_which_attempt_was_kept_and_what_the_others_read() -> None:
    first, third = _record(0.30, 900), _record(0.20, 950)
    record = dataclasses.replace(_record(0.02), kept_attempt=2, discarded=(first, third))
    data = record.as_dict()
    assert (data["steal_share"], data["attempts"], data["kept_attempt"]) == (0.02, 3, 2)
    assert data["discarded"] == [
        {"steal_share": 0.30, "proxy_cpu_us_per_req": None, "rps": 900.0},
        {"steal_share": 0.20, "proxy_cpu_us_per_req": None, "rps": 950.0},
    ]


def test_steal_notes() -> None:
    quiet = [_record(0.01), _record(0.02)]
    assert steal_notes(quiet, 0.05, 2) == []
    again = [_record(0.01), dataclasses.replace(_record(0.03), target="nginx", discarded=(_record(0.3),))]
    assert steal_notes(again, 0.05, 2) == [
        "note: 1 of 2 runs were measured again (up to 2 more times) because the hypervisor stole more than 5% of "
        "the busy CPU time during them (steal in /proc/stat); each keeps its least-stolen attempt"
    ]
    stolen = dataclasses.replace(_record(0.074), target="baseline", index=2, discarded=(_record(0.3), _record(0.2)))
    busy = [*again, stolen]
    assert steal_notes(busy, 0.05, 2, {"baseline": "baseline@abc1234"})[1] == (
        "note: steal over 5% in the kept run of plain baseline@abc1234 round 3 (7.4%): the host was busy, and "
        "CPU µs/req measured under steal reads high: re-run when it is quieter"
    )
    assert steal_notes([_record(0.3)], 1.0, 2) == [
        "note: steal over 5% in the kept run of plain proxy round 1 (30%): the host was busy, and CPU µs/req "
        "measured under steal reads high: re-run when it is quieter"
    ], "--max-steal 100 turns the retries off, not the warning"
    assert steal_notes([_record(0.03)], 0.025, 2)[0].startswith("note: steal over 2.5% in the kept run of plain")
    assert steal_notes([_record(0.2137)], 0.125, 2)[0].startswith(
        "note: steal over 5% in the kept run of plain proxy round 1 (21.4%)"
    ), "run figures to a tenth of a percent"
    assert (
        "more than 12.5% of the busy CPU time"
        in steal_notes([dataclasses.replace(_record(0.03), discarded=(_record(0.2),))], 0.125, 2)[0]
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
