"""Running wrk and parsing the JSON line printed by `bench/wrk/report.lua`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BODY_LUA",
    "JWT_LUA",
    "REALISTIC_LUA",
    "REJECTING_LUA",
    "REPORT_LUA",
    "WrkResult",
    "affinity",
    "duration_seconds",
    "find_wrk",
    "parse_wrk_output",
    "run_wrk",
    "wrk_version",
]

REPORT_LUA = Path(__file__).resolve().parent / "wrk" / "report.lua"
"""Prints the JSON report line; on its own, wrk sends its plain `GET <path>` with a Host header only."""
REALISTIC_LUA = REPORT_LUA.with_name("realistic.lua")
"""A real API client's request head (~600 bytes), then report.lua's report line."""
BODY_LUA = REPORT_LUA.with_name("body.lua")
"""POST with a 16 KiB JSON body, then report.lua's report line."""
JWT_LUA = REPORT_LUA.with_name("jwt.lua")
"""GET with a bearer token, cycling through a token file (script arguments: the file, then a Host value)."""
REJECTING_LUA = REPORT_LUA.with_name("rejecting.lua")
"""wrk's plain GET, counting the answers with status 429 (report.lua's `rejected`, apart from errors)."""
_MARKER = "WRK_JSON "
_DURATION = re.compile(r"^(\d+)(s|m|h)?$")
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run; latencies in microseconds."""

    requests: int
    duration_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    mean_us: float
    max_us: float
    errors: dict[str, int]
    rejected: int = 0
    """Answers with status 429, counted apart from `errors` (Locust, and wrk with rejecting.lua)."""

    @property
    def rps(self) -> float:
        """Requests per second over the measured duration."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def total_errors(self) -> int:
        """connect + read + write + status (non-2xx/3xx) + timeout errors."""
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "rps": self.rps,
            "latency_us": {
                "p50": self.p50_us,
                "p90": self.p90_us,
                "p99": self.p99_us,
                "p999": self.p999_us,
                "mean": self.mean_us,
                "max": self.max_us,
            },
            "errors": dict(self.errors),
            "rejected_429": self.rejected,
        }


def duration_seconds(text: str) -> int:
    """Seconds in a wrk duration such as "10s", "2m", "1h" or "30"; raises ValueError."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"expected a duration like 10s, 2m or 1h, got {text!r}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_wrk_output(text: str) -> WrkResult:
    """The result from wrk's stdout; ValueError if the report line is missing or malformed.

    A script that counts 429s (rejecting.lua) adds `rejected` to the report line; wrk itself counts those
    answers as status errors, so they are taken out of `errors["status"]`.
    """
    for line in text.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER) :])
            latency = data["latency_us"]
            rejected = int(data.get("rejected", 0))
            errors = {kind: int(data["errors"][kind]) for kind in ERROR_KINDS}
            if rejected > errors["status"]:
                raise ValueError(f"{rejected} answers with 429 but only {errors['status']} status errors: {line}")
            errors["status"] -= rejected
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=int(data["duration_us"]) / 1e6,
                p50_us=float(latency["p50"]),
                p90_us=float(latency["p90"]),
                p99_us=float(latency["p99"]),
                p999_us=float(latency["p999"]),
                mean_us=float(latency["mean"]),
                max_us=float(latency["max"]),
                errors=errors,
                rejected=rejected,
            )
    raise ValueError(f"no {_MARKER.strip()} line in wrk output:\n{text}")


def find_wrk() -> str | None:
    """Path of wrk: $WRK (a path or a command name) when set, else wrk on PATH; None when that is not an
    executable (a wrong $WRK is as missing as no wrk at all)."""
    return shutil.which(os.environ.get("WRK") or "wrk")


def wrk_version(wrk: str) -> str:
    """First line of `wrk -v` (which exits non-zero by design)."""
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


def affinity(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    """A preexec function pinning the child to `cpus`; None for no pinning."""
    if not cpus:
        return None
    cpu_set = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, cpu_set)

    return pin


def run_wrk(
    wrk: str,
    url: str,
    *,
    duration: str,
    connections: int,
    threads: int = 1,
    cpus: Sequence[int] | None = None,
    timeout: str = "2s",
    script: Path = REPORT_LUA,
    script_args: Sequence[str] = (),
) -> WrkResult:
    """Run wrk once (pinned to `cpus`) with `script` (and its `script_args`), which prints the JSON report
    line; RuntimeError if wrk fails."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}", f"--timeout={timeout}"]
    argv += ["-s", str(script), url]
    if script_args:
        argv += ["--", *script_args]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration_seconds(duration) + 60,
        check=False,
        preexec_fn=affinity(cpus),
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk_output(done.stdout)
