"""bench.hotpath drives the compiled request path in-process: every request gets its one answer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hotpath_answers_every_request_and_prints_its_cost() -> None:
    for shape in ("plain", "realistic", "limited"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.hotpath", "--requests", "50", "--warmup", "5", "--shape", shape],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert re.fullmatch(rf"{shape}: \d+\.\d{{3}} µs/request \(best of 5 x 50\)\n", done.stdout), done.stdout


def test_hotpath_with_no_timed_requests_is_the_callgrind_baseline() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.hotpath", "--requests", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
