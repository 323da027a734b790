"""`python -m bench --tool locust`: Locust (bench/locustfile.py) as the load generator instead of wrk.

Each run is `locust --headless --csv <prefix>` with as many users as wrk would have connections; its
`<prefix>_stats.csv` and `<prefix>_failures.csv` fold into the `WrkResult` that wrk's runs give, so
the table, JSON and chart are the same. Answers with status 429 are recorded by the locustfile under
their own name (`REJECTED_NAME`) and counted as `rejected`, apart from errors. Locust itself is not
imported here (it is in the `bench` extra only).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.wrk_runner import ERROR_KINDS, WrkResult, affinity

__all__ = [
    "INSTALL_LOCUST",
    "LOCUSTFILE",
    "REJECTED_NAME",
    "find_locust",
    "fold_locust_csv",
    "locust_argv",
    "locust_env",
    "locust_version",
    "run_locust",
]

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REJECTED_NAME = "429"
"""The locustfile records answers with status 429 under this name (a success in Locust's terms)."""

INSTALL_LOCUST = """\
locust is not installed; --tool locust needs it (it is in the bench extra).
  pip install -e '.[bench]'      (in the venv: .venv/bin/python -m pip install -e '.[bench]')
  or set LOCUST=/path/to/locust"""


def find_locust(
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    python: str = sys.executable,
) -> str | None:
    """$LOCUST, else `locust` next to the running interpreter (the venv), else on PATH, else None."""
    env = os.environ if environ is None else environ
    if env.get("LOCUST"):
        return env["LOCUST"]
    beside = Path(python).parent / "locust"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return which("locust")


def locust_version(locust: str) -> str:
    """The first line of `locust --version`, or `unknown`."""
    try:
        done = subprocess.run([locust, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (done.stdout + done.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


def locust_argv(locust: str, url: str, *, users: int, seconds: int, csv_prefix: Path) -> list[str]:
    """A headless run of bench/locustfile.py: `users` users started at once, for `seconds`, CSV at `csv_prefix`."""
    return [
        locust,
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{seconds}s",
        "--host",
        url,
        "--csv",
        str(csv_prefix),
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
    ]


def locust_env(*, scenario: str, path: str, tokens: Path | None, host: str | None) -> dict[str, str]:
    """What bench/locustfile.py reads: the scenario, the path, the token file and a Host value."""
    env = {"BENCH_SCENARIO": scenario, "BENCH_PATH": path}
    if tokens is not None:
        env["BENCH_TOKENS"] = str(tokens)
    if host is not None:
        env["BENCH_HOST"] = host
    return env


def _error_kind(error: str) -> str:
    text = error.lower()
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if "connect" in text or "refused" in text:
        return "connect"
    if "reset" in text or "closed" in text or "broken pipe" in text:
        return "read"
    return "status"


def fold_locust_csv(stats: str, failures: str = "") -> WrkResult:
    """One run's `_stats.csv` (and `_failures.csv`) text as a `WrkResult`; ValueError if there is no
    `Aggregated` row.

    Latencies: Locust's percentiles (ms) in µs. Requests: every answer, 429s included (as wrk counts
    them); rejected: the requests recorded as `REJECTED_NAME`; errors: Locust's failures by kind
    (`_failures.csv`), any left over as `status`. Duration: requests over Locust's requests/s.
    """
    rows = list(csv.DictReader(io.StringIO(stats)))
    total = next((row for row in rows if row.get("Name") == "Aggregated"), None)
    if total is None:
        raise ValueError(f"no Aggregated row in Locust's stats:\n{stats}")
    requests = int(total["Request Count"])
    failed = int(total["Failure Count"])
    rejected = sum(int(row["Request Count"]) for row in rows if row.get("Name") == REJECTED_NAME)
    rps = float(total["Requests/s"])
    errors = dict.fromkeys(ERROR_KINDS, 0)
    for row in csv.DictReader(io.StringIO(failures)):
        errors[_error_kind(row.get("Error", ""))] += int(row.get("Occurrences", "0") or 0)
    errors["status"] += max(0, failed - sum(errors.values()))

    def us(column: str) -> float:
        value = total.get(column, "")
        return float(value) * 1000 if value not in ("", "N/A", None) else 0.0

    return WrkResult(
        requests=requests,
        duration_s=requests / rps if rps > 0 else 0.0,
        p50_us=us("50%"),
        p90_us=us("90%"),
        p99_us=us("99%"),
        p999_us=us("99.9%"),
        mean_us=us("Average Response Time"),
        max_us=us("Max Response Time"),
        errors=errors,
        rejected=rejected,
    )


def run_locust(
    locust: str,
    url: str,
    *,
    seconds: int,
    users: int,
    csv_prefix: Path,
    env: Mapping[str, str],
    cpus: Sequence[int] | None = None,
) -> WrkResult:
    """One headless Locust run (pinned to `cpus`), folded; RuntimeError if it fails or writes no stats."""
    argv = locust_argv(locust, url, users=users, seconds=seconds, csv_prefix=csv_prefix)
    root = str(LOCUSTFILE.parent.parent)  # the locustfile imports bench.shapes
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        env=child_env,
        preexec_fn=affinity(cpus),
    )
    stats = csv_prefix.with_name(csv_prefix.name + "_stats.csv")
    if done.returncode != 0 or not stats.exists():
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    failures = csv_prefix.with_name(csv_prefix.name + "_failures.csv")
    failures_text = failures.read_text(encoding="utf-8") if failures.exists() else ""
    return fold_locust_csv(stats.read_text(encoding="utf-8"), failures_text)
