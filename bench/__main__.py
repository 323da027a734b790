"""`python -m bench` (`make bench`): wrk straight to backend_stub, through nginx and through the proxy.

Starts backend_stub (1 worker), nginx (1 worker, the reference; skipped with a note when nginx is not
installed) and the proxy (1 worker, configs/bench.toml) through devstack. With 2+ CPUs the proxy
(supervisor and worker) and nginx (master and worker) are pinned to CPU 0, backend_stub and wrk to
CPU 1. Scenarios alternate run by run (direct, nginx, proxy) so drift hits all alike; each measured
run follows a short warm-up. Prints one table and writes every number to
bench/results/<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cpu import CpuTimes, tree_cpu_times
from bench.nginx import NGINX_MISSING, find_nginx, nginx_version, start_nginx
from bench.report import RunRecord, format_mib, format_ratios, format_table, ratios, summarize
from bench.wrk_runner import duration_seconds, find_wrk, run_wrk, wrk_version
from devstack import PROJECT_ROOT, ProxyService, Service, Stack, StackError, http_get
from devstack.procfs import rss_bytes, tree_cpu_seconds

SCENARIOS = ("direct", "nginx", "proxy")
"""In the order they run within each round."""
PATH = "/api/resource"

INSTALL_WRK = """\
wrk is not installed; the benchmark needs it as the load generator.
  Debian/Ubuntu:  sudo apt-get install wrk
  macOS:          brew install wrk
  or set WRK=/path/to/wrk"""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="wrk: backend_stub direct vs through nginx vs through the proxy"
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


def plan_scenarios(choice: str, nginx: str | None) -> tuple[tuple[str, ...], str | None]:
    """The scenarios to run for `--scenario choice`, and a note when nginx has to be left out."""
    wanted = SCENARIOS if choice == "all" else (choice,)
    if "nginx" in wanted and nginx is None:
        return tuple(s for s in wanted if s != "nginx"), NGINX_MISSING
    return wanted, None


def _workers_rss(proxy: ProxyService) -> dict[str, int | None]:
    return {str(pid): rss_bytes(pid) for pid in proxy.children()}


def _sum_rss(sizes: dict[str, int | None]) -> int | None:
    present = [v for v in sizes.values() if v is not None]
    return sum(present) if present else None


def _check(url: str) -> None:
    status, body = http_get(url, timeout=5.0)
    if status != 200:
        raise StackError(f"GET {url} answered {status}, not 200: {body[:200]!r}")


def _exited(service: Service, what: str) -> StackError:
    return StackError(f"{what} exited during the benchmark; log {service.log_path}:\n{service.process.log_tail()}")


def run(args: argparse.Namespace, wrk: str, nginx_binary: str | None) -> int:
    """Start the stack, run the scenarios, print the table, write the JSON."""
    scenarios, note = plan_scenarios(args.scenario, nginx_binary)
    if note is not None:
        print(note, flush=True)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    proxy_cpus, load_cpus = ([0], [1]) if pin else (None, None)
    records: list[RunRecord] = []
    rss: dict[str, Any] = {}
    nginx_info: dict[str, Any] = {"binary": nginx_binary, "version": None, "skipped": note}
    with Stack() as stack, contextlib.ExitStack() as cleanup:
        backend: Service = stack.start_backend(workers=1, cpus=load_cpus)
        nginx: Service | None = None
        if "nginx" in scenarios and nginx_binary is not None:
            nginx_info["version"] = nginx_version(nginx_binary)
            nginx = start_nginx(
                nginx_binary,
                backend=backend.address,
                run_dir=stack.run_dir / "nginx",
                probe_path=PATH,
                host=stack.host,
                cpus=proxy_cpus,
                env=stack.env,
                startup_timeout=stack.startup_timeout,
            )
            cleanup.callback(nginx.stop)
        proxy: ProxyService | None = None
        if "proxy" in scenarios:
            proxy = stack.start_proxy(args.config, workers=args.proxy_workers, cpus=proxy_cpus)
            rss["initial"] = _workers_rss(proxy)
        servers = {name: svc for name, svc in (("nginx", nginx), ("proxy", proxy)) if svc is not None}
        urls = {"direct": backend.url + PATH, **{name: svc.url + PATH for name, svc in servers.items()}}
        for scenario in scenarios:
            _check(urls[scenario])
        print(f"backend_stub {backend.url} (pid {backend.pid})", flush=True)
        if nginx is not None:
            version = nginx_info["version"]
            print(f"nginx        {nginx.url} (pid {nginx.pid}, workers {nginx.children()}, {version})", flush=True)
        if proxy is not None:
            print(f"proxy        {proxy.url} (pid {proxy.pid}, workers {proxy.children()})", flush=True)
        on_cpu0 = " and ".join(name for name in ("proxy", "nginx") if name in servers)
        placement = (f"{on_cpu0} on CPU 0, " if on_cpu0 else "") + "backend and wrk on CPU 1"
        print(f"pinning: {placement if pin else 'off'}", flush=True)
        for index in range(args.runs):
            for scenario in scenarios:
                url = urls[scenario]
                run_wrk(
                    wrk, url, duration=args.warmup, connections=args.connections, threads=args.threads, cpus=load_cpus
                )
                if scenario == "proxy" and proxy is not None and "start" not in rss:
                    rss["start"] = _workers_rss(proxy)
                server = servers.get(scenario)
                server_before = tree_cpu_times(server.pid) if server is not None else None
                backend_before = tree_cpu_seconds(backend.pid)
                result = run_wrk(
                    wrk, url, duration=args.duration, connections=args.connections, threads=args.threads, cpus=load_cpus
                )
                backend_cpu = tree_cpu_seconds(backend.pid) - backend_before
                server_cpu: CpuTimes | None = None
                if server is not None and server_before is not None:
                    server_cpu = tree_cpu_times(server.pid) - server_before
                record = RunRecord(scenario, index, result, server_cpu, backend_cpu)
                records.append(record)
                cpu = record.proxy_cpu_us_per_req
                print(
                    f"  run {index + 1}/{args.runs} {scenario:<6} {result.rps:>10,.0f} req/s  "
                    f"p50 {result.p50_us:,.0f} µs  p99 {result.p99_us:,.0f} µs  errors {result.total_errors}"
                    + (f"  CPU {cpu:,.1f} µs/req" if cpu is not None else ""),
                    flush=True,
                )
        if proxy is not None:
            rss["end"] = _workers_rss(proxy)
            if not proxy.running:
                raise _exited(proxy, "the proxy")
        if nginx is not None and not nginx.running:
            raise _exited(nginx, "nginx")

    summaries = summarize(records)
    ratio_values = ratios(summaries)
    print()
    print(format_table(summaries))
    footer = format_ratios(summaries)
    if footer:
        print()
        print("\n".join(footer))
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
        "nginx": nginx_info,
        "summary": [s.as_dict() for s in summaries],
        "ratios": ratio_values,
        "proxy_over_direct_rps": ratio_values["proxy_over_direct_rps"],
        "proxy_worker_rss_bytes": rss,
        "runs": [r.as_dict() for r in records],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 2 when wrk (or nginx for `--scenario nginx`) is missing or the arguments are invalid."""
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
    nginx = find_nginx()
    if nginx is None and args.scenario == "nginx":
        print(NGINX_MISSING, file=sys.stderr)
        return 2
    try:
        return run(args, wrk, nginx)
    except (StackError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
