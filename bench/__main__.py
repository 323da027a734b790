"""`python -m bench` (`make bench`): wrk straight to backend_stub vs through the proxy, in one run.

Starts backend_stub (1 worker) and the proxy (1 worker, configs/bench.toml) through devstack. With
2+ CPUs the proxy (supervisor and worker) is pinned to CPU 0 and backend_stub and wrk to CPU 1.
Scenarios alternate run by run so drift hits both alike; each measured run follows a short warm-up.
Prints one table and writes every number to bench/results/<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import RunRecord, format_mib, format_table, rps_ratio, summarize
from bench.wrk_runner import duration_seconds, find_wrk, run_wrk, wrk_version
from devstack import PROJECT_ROOT, ProxyService, Service, Stack, StackError, http_get
from devstack.procfs import rss_bytes, tree_cpu_seconds

SCENARIOS = ("direct", "proxy")
PATH = "/api/resource"

INSTALL_WRK = """\
wrk is not installed; the benchmark needs it as the load generator.
  Debian/Ubuntu:  sudo apt-get install wrk
  macOS:          brew install wrk
  or set WRK=/path/to/wrk"""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="wrk: backend_stub direct vs through the proxy"
    )
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all", help="default: all")
    parser.add_argument("--duration", default="10s", help="wrk -d per measured run (default 10s)")
    parser.add_argument("--warmup", default="2s", help="wrk -d of the warm-up before each run (default 2s)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per scenario (default 3)")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "bench.toml", help="proxy config")
    parser.add_argument("--proxy-workers", type=int, default=1, help="proxy workers (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "bench" / "results", help="JSON output")
    return parser


def _workers_rss(proxy: ProxyService) -> dict[str, int | None]:
    return {str(pid): rss_bytes(pid) for pid in proxy.children()}


def _sum_rss(sizes: dict[str, int | None]) -> int | None:
    present = [v for v in sizes.values() if v is not None]
    return sum(present) if present else None


def _check(url: str) -> None:
    status, body = http_get(url, timeout=5.0)
    if status != 200:
        raise StackError(f"GET {url} answered {status}, not 200: {body[:200]!r}")


def run(args: argparse.Namespace, wrk: str) -> int:
    """Start the stack, run the scenarios, print the table, write the JSON."""
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    proxy_cpus, load_cpus = ([0], [1]) if pin else (None, None)
    records: list[RunRecord] = []
    rss: dict[str, Any] = {}
    with Stack() as stack:
        backend: Service = stack.start_backend(workers=1, cpus=load_cpus)
        proxy: ProxyService | None = None
        if "proxy" in scenarios:
            proxy = stack.start_proxy(args.config, workers=args.proxy_workers, cpus=proxy_cpus)
            rss["initial"] = _workers_rss(proxy)
        urls = {"direct": backend.url + PATH, "proxy": (proxy.url if proxy else "") + PATH}
        for scenario in scenarios:
            _check(urls[scenario])
        print(f"backend_stub {backend.url} (pid {backend.pid})", flush=True)
        if proxy is not None:
            print(f"proxy        {proxy.url} (pid {proxy.pid}, workers {proxy.children()})", flush=True)
        print(f"pinning: {'proxy on CPU 0, backend and wrk on CPU 1' if pin else 'off'}", flush=True)
        for index in range(args.runs):
            for scenario in scenarios:
                url = urls[scenario]
                run_wrk(
                    wrk, url, duration=args.warmup, connections=args.connections, threads=args.threads, cpus=load_cpus
                )
                if scenario == "proxy" and proxy is not None and "start" not in rss:
                    rss["start"] = _workers_rss(proxy)
                proxy_before = tree_cpu_seconds(proxy.pid) if proxy is not None else 0.0
                backend_before = tree_cpu_seconds(backend.pid)
                result = run_wrk(
                    wrk, url, duration=args.duration, connections=args.connections, threads=args.threads, cpus=load_cpus
                )
                backend_cpu = tree_cpu_seconds(backend.pid) - backend_before
                proxy_cpu = tree_cpu_seconds(proxy.pid) - proxy_before if proxy is not None else None
                record = RunRecord(scenario, index, result, proxy_cpu if scenario == "proxy" else None, backend_cpu)
                records.append(record)
                print(
                    f"  run {index + 1}/{args.runs} {scenario:<6} {result.rps:>10,.0f} req/s  "
                    f"p50 {result.p50_us:,.0f} µs  p99 {result.p99_us:,.0f} µs  errors {result.total_errors}",
                    flush=True,
                )
        if proxy is not None:
            rss["end"] = _workers_rss(proxy)
            if not proxy.running:
                raise StackError(f"the proxy exited during the benchmark:\n{proxy.process.log_tail()}")

    summaries = summarize(records)
    ratio = rps_ratio(summaries)
    print()
    print(format_table(summaries))
    if ratio is not None:
        print(f"\nproxy RPS / direct RPS: {ratio:.2f}")
    if "start" in rss:
        start, end = _sum_rss(rss["start"]), _sum_rss(rss["end"])
        growth = format_mib(end - start) if start is not None and end is not None else "-"
        print(f"proxy worker RSS: start {format_mib(start)}, end {format_mib(end)} (growth {growth})")
    errors = sum(s.errors for s in summaries)
    if errors:
        print(f"WARNING: {errors} wrk errors (connect/read/write/status/timeout); see the JSON for details")

    now = dt.datetime.now(dt.UTC)
    document = {
        "timestamp": now.isoformat(),
        "host": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "wrk": wrk_version(wrk),
        "params": {
            "scenarios": list(scenarios),
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "runs": args.runs,
            "proxy_workers": args.proxy_workers,
            "config": str(args.config),
            "pinned": pin,
        },
        "summary": [s.as_dict() for s in summaries],
        "proxy_over_direct_rps": ratio,
        "proxy_worker_rss_bytes": rss,
        "runs": [r.as_dict() for r in records],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 2 when wrk is missing or the arguments are invalid."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("duration", "warmup"):
        try:
            duration_seconds(getattr(args, name))
        except ValueError as exc:
            parser.error(f"--{name}: {exc}")
    if args.runs < 1 or args.connections < 1 or args.threads < 1 or args.threads > args.connections:
        parser.error("--runs, --connections and --threads must be >= 1, with threads <= connections")
    wrk = find_wrk()
    if wrk is None:
        print(INSTALL_WRK, file=sys.stderr)
        return 2
    try:
        return run(args, wrk)
    except (StackError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
