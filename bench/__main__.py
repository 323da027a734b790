"""`python -m bench` (`make bench`): wrk straight to the backend, through nginx and through the proxy.

Starts the backend (an nginx instance serving backend_stub's fixed answers, or backend_stub itself;
1 worker), nginx (1 worker, the reference; skipped with a note when nginx is not installed), the
proxy (1 worker, configs/bench.toml) and, with `--baseline REF`, the proxy of commit REF built from
a temporary export (see bench/baseline.py), all through devstack. With 2+ CPUs the proxies (supervisor
and worker) and nginx (master and worker) are pinned to CPU 0, the backend and wrk to CPU 1.
Scenarios alternate run by run (direct, nginx, proxy, baseline, then the reverse order in the next
round) so drift hits all alike; each measured run follows a short warm-up. Prints one table and
writes every number to bench/results/<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench.baseline import (
    Baseline,
    RunningCode,
    baseline_env,
    check_code,
    prepared_baseline,
    resolve_commit,
    running_code,
    worktree_label,
)
from bench.cpu import CpuTimes, tree_cpu_times
from bench.jwt import JWT_HOST, check_jwt_route, mint_tokens, with_jwt_route
from bench.limits import LIMITS, LIMITS_HOST, check_limit_route, redis_commands, with_limit_route
from bench.nginx import (
    NGINX_MISSING,
    NGINX_MISSING_BACKEND,
    find_nginx,
    nginx_version,
    render_backend_conf,
    render_nginx_conf,
    start_nginx,
)
from bench.report import (
    RunRecord,
    format_mib,
    format_ratios,
    format_table,
    paired_difference,
    ratios,
    saturation_notes,
    summarize,
)
from bench.wrk_runner import REQUEST_SCRIPTS, WrkResult, duration_seconds, find_wrk, run_wrk, wrk_version
from devstack import PROJECT_ROOT, Service, Stack, StackError, http_get
from devstack.config import load_config_source
from devstack.procfs import rss_bytes, tree_cpu_seconds

SCENARIOS = ("direct", "nginx", "proxy")
"""The `--scenario` choices, in the order they run within a round; `baseline` (with --baseline) follows."""
BACKENDS = ("nginx", "stub")
"""`--backend` choices: an nginx instance answering like backend_stub, or backend_stub itself."""
UVGATE = ("proxy", "baseline")
"""The scenarios whose server is a uvgate (RSS tracked, code checked)."""
JWT = "jwt"
"""With `--request jwt`: the proxy's JWT route (same proxy and request as `proxy`, whose route has no auth)."""
PATH = "/api/resource"

INSTALL_WRK = """\
wrk is not installed; the benchmark needs it as the load generator.
  Debian/Ubuntu:  sudo apt-get install wrk
  macOS:          brew install wrk
  or set WRK=/path/to/wrk"""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="wrk: the backend direct vs through nginx vs through the proxy"
    )
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all", help="default: all")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the proxy of this git ref or commit (built in a temporary export), as `baseline`",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="nginx answering like backend_stub, or backend_stub (default: nginx if found)",
    )
    parser.add_argument(
        "--request",
        choices=tuple(REQUEST_SCRIPTS),
        default="plain",
        help="plain: wrk's bare GET; realistic: an API client's ~600-byte head; body: POST 16 KiB of JSON; "
        "jwt: GET with 1,000 distinct RS256 tokens, adds the `jwt` scenario; limits: plain GET, adds the "
        "`limits` scenario (a route with a local and a global limit, never refusing; Redis started) (default plain)",
    )
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


def plan_scenarios(
    choice: str, nginx: str | None, baseline: bool = False, jwt: bool = False, limits: bool = False
) -> tuple[tuple[str, ...], str | None]:
    """The scenarios to run for `--scenario choice` (plus `baseline`, and `jwt` or `limits` after `proxy`
    with `--request jwt` or `--request limits`), and a note when nginx has to be left out."""
    wanted: tuple[str, ...] = SCENARIOS if choice == "all" else (choice,)
    for extra, asked in ((JWT, jwt), (LIMITS, limits)):
        if asked and "proxy" in wanted:
            index = wanted.index("proxy") + 1
            wanted = (*wanted[:index], extra, *wanted[index:])
    if baseline:
        wanted = (*wanted, "baseline")
    if "nginx" in wanted and nginx is None:
        return tuple(s for s in wanted if s != "nginx"), NGINX_MISSING
    return wanted, None


def choose_backend(choice: str | None, nginx: str | None) -> str | None:
    """`--backend`, or nginx when installed and else the stub by default; None if nginx is asked for but missing."""
    if choice is None:
        return "nginx" if nginx is not None else "stub"
    return None if choice == "nginx" and nginx is None else choice


def round_order(scenarios: Sequence[str], index: int) -> tuple[str, ...]:
    """Round `index` runs the scenarios in order, the next one in reverse (ABBA): a drift over the
    invocation then favours no scenario over its neighbour, e.g. the proxy over the baseline."""
    return tuple(scenarios) if index % 2 == 0 else tuple(reversed(scenarios))


@dataclass(slots=True)
class Target:
    """A scenario's URL and the server whose CPU counts as the proxy's (None in `direct`)."""

    url: str
    server: Service | None
    script_args: tuple[str, ...] = ()  # after `--` on wrk's command line (the jwt script: token file, Host)


def _workers_rss(proxy: Service) -> dict[str, int | None]:
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


def _start_backend(
    kind: str, stack: Stack, cleanup: contextlib.ExitStack, nginx: str | None, cpus: Sequence[int] | None
) -> Service:
    if kind == "stub":
        return stack.start_backend(workers=1, cpus=cpus)
    if nginx is None:
        raise StackError(NGINX_MISSING_BACKEND)
    run_dir = stack.run_dir / "nginx-backend"
    backend = start_nginx(
        nginx,
        render=lambda listen, user: render_backend_conf(run_dir=run_dir, listen=listen, user=user),
        run_dir=run_dir,
        probe_path=PATH,
        name="nginx-backend",
        host=stack.host,
        cpus=cpus,
        env=stack.env,
        startup_timeout=stack.startup_timeout,
    )
    cleanup.callback(backend.stop)
    return backend


def _start_servers(
    args: argparse.Namespace,
    scenarios: Sequence[str],
    stack: Stack,
    cleanup: contextlib.ExitStack,
    *,
    backend: Service,
    nginx: str | None,
    baseline: Baseline | None,
    cpus: Sequence[int] | None,
) -> dict[str, Service]:
    """The nginx reference and the uvgate proxies asked for, all in front of `backend`, by scenario (the
    `jwt` scenario is served by the `proxy` one)."""
    servers: dict[str, Service] = {}
    if "nginx" in scenarios and nginx is not None:
        run_dir = stack.run_dir / "nginx"
        servers["nginx"] = start_nginx(
            nginx,
            render=lambda listen, user: render_nginx_conf(
                run_dir=run_dir, listen=listen, backend=backend.address, user=user
            ),
            run_dir=run_dir,
            probe_path=PATH,
            host=stack.host,
            cpus=cpus,
            env=stack.env,
            startup_timeout=stack.startup_timeout,
        )
        cleanup.callback(servers["nginx"].stop)
    for name in UVGATE:
        if name not in scenarios:
            continue
        # The baseline imports from its own tree only (see bench/baseline.py); the config is the same.
        env = baseline_env(baseline.root) if name == "baseline" and baseline is not None else None
        config = load_config_source(args.config)
        if args.request == "jwt":
            config = with_jwt_route(config)
        if args.request == "limits":
            config = with_limit_route(config)
        proxy = stack.start_proxy(
            config,
            workers=args.proxy_workers,
            upstream_servers=[backend.address],
            redis_url=stack.redis.url if args.request == "limits" and stack.redis is not None else None,
            cpus=cpus,
            env=env,
            name=name,
        )
        cleanup.callback(proxy.stop)  # before the baseline's tree goes, and before the backend
        servers[name] = proxy
    return servers


def _verify_code(servers: dict[str, Service], baseline: Baseline | None) -> dict[str, RunningCode]:
    """Which compiled uvgate code each uvgate process runs; StackError if the baseline's is not its own."""
    code = {name: running_code(svc.pid) for name, svc in servers.items() if name in UVGATE}
    if baseline is not None and "baseline" in code:
        problem = check_code(code["baseline"], baseline.root)
        if problem is not None:
            raise StackError(f"the baseline proxy does not run the baseline build: {problem}")
    if "proxy" in code and "baseline" in code and code["proxy"].compiled != code["baseline"].compiled:
        print("WARNING: one of proxy and baseline runs compiled code and the other does not", flush=True)
    return code


def _wrk(args: argparse.Namespace, wrk: str, target: Target, duration: str, cpus: Sequence[int] | None) -> WrkResult:
    """One wrk run against `target` with the command line's load and request."""
    return run_wrk(
        wrk,
        target.url,
        duration=duration,
        connections=args.connections,
        threads=args.threads,
        cpus=cpus,
        script=REQUEST_SCRIPTS[args.request],
        script_args=target.script_args,
    )


def _measure(
    args: argparse.Namespace,
    wrk: str,
    scenario: str,
    index: int,
    target: Target,
    backend: Service,
    cpus: Sequence[int] | None,
) -> RunRecord:
    """One measured wrk run of `scenario` with the CPU its server and the backend used meanwhile."""
    server = target.server
    server_before = tree_cpu_times(server.pid) if server is not None else None
    backend_before = tree_cpu_seconds(backend.pid)
    result = _wrk(args, wrk, target, args.duration, cpus)
    backend_cpu = tree_cpu_seconds(backend.pid) - backend_before
    server_cpu: CpuTimes | None = None
    if server is not None and server_before is not None:
        server_cpu = tree_cpu_times(server.pid) - server_before
    return RunRecord(scenario, index, result, server_cpu, backend_cpu)


def run(args: argparse.Namespace, wrk: str, nginx_binary: str | None, backend_kind: str) -> int:
    """Build the baseline if asked, start the stack, run the scenarios, print the table, write the JSON."""
    scenarios, note = plan_scenarios(
        args.scenario,
        nginx_binary,
        baseline=args.baseline is not None,
        jwt=args.request == "jwt",
        limits=args.request == "limits",
    )
    if note is not None:
        print(note, flush=True)
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    proxy_cpus, load_cpus = ([0], [1]) if pin else (None, None)
    records: list[RunRecord] = []
    rss: dict[str, dict[str, Any]] = {name: {} for name in UVGATE if name in scenarios}
    labels: dict[str, str] = {}
    nginx_info: dict[str, Any] = {"binary": nginx_binary, "version": None, "skipped": note}
    backend_info: dict[str, Any] = {"kind": backend_kind, "workers": 1}
    baseline_info: dict[str, Any] | None = None
    source = worktree_label()
    commit = resolve_commit(args.baseline) if args.baseline is not None else None  # fails before anything starts
    with Stack() as stack, contextlib.ExitStack() as cleanup:
        baseline: Baseline | None = None
        if commit is not None:
            print(f"building the baseline ({args.baseline} = {commit.short}) in a temporary export ...", flush=True)
            baseline = cleanup.enter_context(
                prepared_baseline(commit, python=stack.python, env=stack.env, log_dir=stack.run_dir)
            )
            labels["baseline"] = f"baseline@{baseline.commit.short}"
            baseline_info = {
                "ref": baseline.commit.ref,
                "commit": baseline.commit.sha,
                "short": baseline.commit.short,
                "label": labels["baseline"],
                "build_seconds": round(baseline.build_seconds, 1),
            }
        if nginx_binary is not None:
            nginx_info["version"] = nginx_version(nginx_binary)
        backend = _start_backend(backend_kind, stack, cleanup, nginx_binary, load_cpus)
        tokens: Path | None = None
        if args.request == "jwt":
            auth = stack.start_auth(cpus=load_cpus)  # before the proxies: their JWKS URL points at it
            cleanup.callback(auth.stop)
            tokens = mint_tokens(auth.url, stack.run_dir / "tokens.txt")
            print(f"auth_stub    {auth.url}: {tokens} (1,000 RS256 tokens)", flush=True)
        if args.request == "limits":
            redis = stack.start_redis()  # before the proxies: their redis.url points at it
            print(f"redis        {redis.url}", flush=True)
        backend_info["version"] = nginx_info["version"] if backend_kind == "nginx" else None
        servers = _start_servers(
            args, scenarios, stack, cleanup, backend=backend, nginx=nginx_binary, baseline=baseline, cpus=proxy_cpus
        )
        code = _verify_code(servers, baseline)
        for name in rss:
            rss[name]["initial"] = _workers_rss(servers[name])
        extra = () if tokens is None else (str(tokens),)
        targets = {"direct": Target(backend.url + PATH, None, extra)}
        targets |= {name: Target(svc.url + PATH, svc, extra) for name, svc in servers.items()}
        if JWT in scenarios and tokens is not None:
            proxy = servers["proxy"]
            targets[JWT] = Target(proxy.url + PATH, proxy, (str(tokens), JWT_HOST))
            check_jwt_route(proxy.host, proxy.port, PATH, tokens.read_text().split()[0])
        if LIMITS in scenarios:
            proxy = servers["proxy"]
            targets[LIMITS] = Target(proxy.url + PATH, proxy, (LIMITS_HOST,))
            check_limit_route(proxy.host, proxy.port, PATH)
        for scenario in scenarios:
            _check(targets[scenario].url)
        commands_per_1000: list[float] = []  # Redis commands per 1,000 requests of each `limits` run

        what = f"nginx, {nginx_info['version']}" if backend_kind == "nginx" else "backend_stub"
        print(f"backend      {backend.url} ({what}; pid {backend.pid}, workers {backend.children()})", flush=True)
        notes = {"nginx": str(nginx_info["version"]), "proxy": source}
        if baseline is not None:
            notes["baseline"] = f"{args.baseline} = {baseline.commit.short}, built in {baseline.build_seconds:.0f} s"
        for name, svc in servers.items():
            runs = f"; runs {code[name].describe()}" if name in code else ""
            print(f"{name:<12} {svc.url} (pid {svc.pid}, workers {svc.children()}) {notes[name]}{runs}", flush=True)
        on_cpu0 = " and ".join(servers)
        placement = (f"{on_cpu0} on CPU 0, " if on_cpu0 else "") + "backend and wrk on CPU 1"
        print(
            f"pinning: {placement if pin else 'off'}; request: {args.request} ({REQUEST_SCRIPTS[args.request].name})",
            flush=True,
        )

        width = max(len(labels.get(name, name)) for name in scenarios)
        for index in range(args.runs):
            for scenario in round_order(scenarios, index):
                target = targets[scenario]
                _wrk(args, wrk, target, args.warmup, load_cpus)
                if scenario in rss and "start" not in rss[scenario]:
                    rss[scenario]["start"] = _workers_rss(servers[scenario])
                store = stack.redis if scenario == LIMITS else None
                before = redis_commands(store.host, store.port) if store is not None else 0
                record = _measure(args, wrk, scenario, index, target, backend, load_cpus)
                records.append(record)
                if store is not None and record.result.requests:
                    commands = redis_commands(store.host, store.port) - before - 1  # not the first INFO
                    commands_per_1000.append(1000 * commands / record.result.requests)
                result, cpu, label = record.result, record.proxy_cpu_us_per_req, labels.get(scenario, scenario)
                print(
                    f"  run {index + 1}/{args.runs} {label:<{width}} {result.rps:>10,.0f} req/s  "
                    f"p50 {result.p50_us:,.0f} µs  p99 {result.p99_us:,.0f} µs  errors {result.total_errors}"
                    + (f"  CPU {cpu:,.1f} µs/req" if cpu is not None else ""),
                    flush=True,
                )
        for name in rss:
            rss[name]["end"] = _workers_rss(servers[name])
        for name, svc in [*servers.items(), ("backend", backend)]:
            if not svc.running:
                raise _exited(svc, name)

    summaries = summarize(records)
    ratio_values = ratios(summaries)
    ratio_values["jwt_minus_proxy_cpu_per_req_paired"] = paired_difference(records, JWT, "proxy")
    ratio_values["limits_minus_proxy_cpu_per_req_paired"] = paired_difference(records, LIMITS, "proxy")
    ratio_values["redis_commands_per_1000_requests"] = (
        statistics.median(commands_per_1000) if commands_per_1000 else None
    )
    print()
    print(format_table(summaries, labels))
    footer = format_ratios(summaries, labels) + saturation_notes(summaries, labels)
    paired = ratio_values["jwt_minus_proxy_cpu_per_req_paired"]
    if paired is not None:
        footer.append(f"auth (jwt - proxy) CPU µs/req, paired by round: median {paired:+.2f}")
    limits_paired = ratio_values["limits_minus_proxy_cpu_per_req_paired"]
    if limits_paired is not None:
        footer.append(f"rate limits (limits - proxy) CPU µs/req, paired by round: median {limits_paired:+.2f}")
    if commands_per_1000:
        runs = ", ".join(f"{value:.1f}" for value in commands_per_1000)
        footer.append(
            f"Redis commands per 1,000 requests (limits): median "
            f"{statistics.median(commands_per_1000):.1f} (runs: {runs})"
        )
    if footer:
        print()
        print("\n".join(footer))
    for name, sizes in rss.items():
        if "start" in sizes:
            start, end = _sum_rss(sizes["start"]), _sum_rss(sizes["end"])
            growth = format_mib(end - start) if start is not None and end is not None else "-"
            label = labels.get(name, name)
            print(f"{label} worker RSS: start {format_mib(start)}, end {format_mib(end)} (growth {growth})")
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
            "backend": backend_kind,
            "request": args.request,
            "baseline": args.baseline,
        },
        "nginx": nginx_info,
        "backend": backend_info,
        "proxy": {"source": source},
        "baseline": baseline_info,
        "code": {name: {"modules": list(c.modules), "roots": list(c.roots)} for name, c in code.items()},
        "labels": labels,
        "summary": [s.as_dict() for s in summaries],
        "ratios": ratio_values,
        "proxy_over_direct_rps": ratio_values["proxy_over_direct_rps"],
        "proxy_worker_rss_bytes": rss.get("proxy", {}),
        "baseline_worker_rss_bytes": rss.get("baseline"),
        "runs": [r.as_dict() for r in records],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 2 when wrk (or nginx where it is required) is missing or the arguments are invalid."""
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
    backend = choose_backend(args.backend, nginx)
    if backend is None:
        print(NGINX_MISSING_BACKEND, file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every process is stopped and the baseline's export removed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, wrk, nginx, backend)
    except (StackError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
