"""`python -m bench` (`make bench`): the scenarios against the backend direct, the peers and uvgate.

Starts the backend (an nginx instance serving backend_stub's fixed answers and a 256 KiB one, or
backend_stub itself; 1 worker), then scenario by scenario (plain, realistic, jwt, limited, rejecting,
body, workers; see bench/scenarios.py and, for the rate-limit scenarios, bench/limits.py) the targets:
nginx, HAProxy and Caddy (bench/nginx.py, bench/peers/; each skipped with a note when not installed),
uvgate (configs/bench.toml), when named uvgate with metrics off or the access log on (bench/switches.py)
and, with `--baseline REF`, the uvgate of commit REF built from a temporary export (bench/baseline.py), all
through devstack. With 2+ CPUs the targets are pinned to CPU 0 (CPUs
0-1 in `workers`), the backend and the load generator to CPU 1. Within a scenario the targets
alternate run by run (ABBA) over `--runs` rounds, each measured run after a short warm-up. Prints a
progress line per run, then one table (medians and spreads), and writes bench/results/<UTC
timestamp>.json and .png (the chart; needs matplotlib).
`limited` also starts Redis and prints the limits' paired cost and Redis commands per 1,000 requests;
`rejecting` first calibrates its limit with a short run against the proxy without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from bench.chart import ChartUnavailable, write_chart
from bench.cpu import CpuTimes, machine_ticks, tree_cpu_times
from bench.jwt import JWT_HOST, check_jwt_route, mint_tokens
from bench.limits import (
    LIMITS,
    LIMITS_HOST,
    RejectLimit,
    check_limit_route,
    commands_per_1000,
    limited_lines,
    redis_commands,
    reject_limit,
    rejecting_line,
    with_reject_limit,
)
from bench.locust_runner import INSTALL_LOCUST, find_locust, locust_env, locust_version, run_locust
from bench.nginx import (
    NGINX_MISSING,
    NGINX_MISSING_BACKEND,
    ConfRenderer,
    find_nginx,
    nginx_version,
    render_backend_conf,
    render_nginx_conf,
    start_nginx,
    write_large_body,
)
from bench.peers import PEERS, find_peer, peer_version, start_peer
from bench.report import (
    RunRecord,
    ScenarioSummary,
    format_mib,
    format_ratios,
    format_table,
    noise_notes,
    paired_difference,
    paired_ratio,
    ratios_by_scenario,
    saturation_notes,
    steal_notes,
    summarize,
)
from bench.scenarios import (
    PEER_TARGETS,
    SCENARIOS,
    TARGET_CHOICES,
    TARGETS,
    Scenario,
    parse_names,
    plan_targets,
    round_order,
)
from bench.switches import (
    ACCESS_LOG_FILE,
    ACCESSLOG,
    SWITCH_TARGETS,
    switch_dir,
    switch_report,
    switched_config,
    template_problems,
)
from bench.wrk_runner import WrkResult, duration_seconds, find_wrk, run_wrk, wrk_version
from devstack import PROJECT_ROOT, Service, Stack, StackError, http_get
from devstack.config import load_config_source
from devstack.procfs import rss_bytes, tree_cpu_seconds

BACKENDS = ("nginx", "stub")
"""`--backend` choices: an nginx instance answering like backend_stub, or backend_stub itself."""
TOOLS = ("wrk", "locust")
"""`--tool` choices: the load generator."""
UVGATE = ("proxy", *SWITCH_TARGETS, "baseline")
"""The targets whose server is a uvgate (RSS tracked, code checked); `jwt` and `limits` are served by `proxy`."""
JWT = "jwt"
"""In the jwt and limited scenarios: uvgate's JWT route (same proxy and request as `proxy`, whose route has
no auth)."""
ROUTE_HOSTS = {JWT: JWT_HOST, LIMITS: LIMITS_HOST}
"""The extra uvgate targets (`Scenario.extra_targets`) and the Host value that chooses their route."""
SCENARIO_ALIASES = {"limits": "limited"}
"""Old scenario names: `--request limits` added the limited route to the old bench."""
OLD_TARGET_FLAGS = ("direct", "nginx", "proxy")
"""What `--scenario` meant before scenarios existed; still accepted as `--target`."""

INSTALL_WRK = """\
wrk is not installed; the benchmark needs it as the load generator.
  Debian/Ubuntu:  sudo apt-get install wrk
  macOS:          brew install wrk
  or set WRK=/path/to/wrk"""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="the scenarios against the backend direct, nginx, HAProxy, Caddy and uvgate, in one run",
    )
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated: {', '.join(SCENARIOS)} or all (default all)",
    )
    parser.add_argument(
        "--target",
        default="all",
        help=f"comma-separated: {', '.join(TARGET_CHOICES)} or all (default all = {', '.join(TARGETS)}; peers "
        f"that are not installed are skipped; {', '.join(SWITCH_TARGETS)} run only when named, as in "
        f"all,{','.join(SWITCH_TARGETS)})",
    )
    parser.add_argument("--request", help="the same as --scenario (kept for old command lines; `limits` is `limited`)")
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
    parser.add_argument("--tool", choices=TOOLS, default="wrk", help="load generator (default wrk)")
    parser.add_argument("--duration", default="10s", help="wrk -d per measured run (default 10s)")
    parser.add_argument("--warmup", default="2s", help="wrk -d of the warm-up before each run (default 2s)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c, Locust users (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="rounds: measured runs per target (default 3)")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "bench.toml", help="proxy config")
    parser.add_argument("--proxy-workers", type=int, default=1, help="proxy workers except in `workers` (default 1)")
    parser.add_argument(
        "--max-steal",
        type=float,
        default=5.0,
        metavar="PERCENT",
        help="measure a run again when the hypervisor stole more than this share of the busy CPU time during it "
        "(steal in /proc/stat; default 5; 100 never)",
    )
    parser.add_argument(
        "--steal-retries",
        type=int,
        default=2,
        metavar="N",
        help="at most this many extra attempts per run under --max-steal; the least-stolen is kept (default 2)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-chart", action="store_true", help="no PNG chart")
    parser.add_argument(
        "--results-dir", type=Path, default=PROJECT_ROOT / "bench" / "results", help="JSON and PNG output"
    )
    return parser


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run measures: scenarios, wanted targets, the binaries found and the notes on what is left out."""

    scenarios: tuple[Scenario, ...]
    targets: tuple[str, ...]
    binaries: dict[str, str]
    """Peer target -> binary (only those found and working)."""
    versions: dict[str, str]
    notes: tuple[str, ...]


def resolve_names(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
    """(scenario names, target names, notes) from --scenario / --request / --target; ValueError if unknown.

    An old `--scenario direct|nginx|proxy` (before scenarios existed) selects that target.
    """
    notes: list[str] = []
    scenario_text: str = args.scenario
    target_text: str = args.target
    if scenario_text in OLD_TARGET_FLAGS:
        notes.append(f"--scenario {scenario_text} is read as --target {scenario_text}")
        target_text, scenario_text = scenario_text, "plain"
    if args.request:
        scenario_text = args.request
    names = parse_names(scenario_text, tuple(SCENARIOS), SCENARIO_ALIASES)
    return names, parse_names(target_text, TARGET_CHOICES, everything=TARGETS), notes


def find_peers(targets: Sequence[str], explicit: bool) -> tuple[dict[str, str], dict[str, str], list[str], list[str]]:
    """(binaries, versions, notes, fatal problems) of the peer targets wanted.

    A peer that is missing or does not run is a note when the targets were the default (`all`) and a
    fatal problem when it was asked for by name.
    """
    binaries: dict[str, str] = {}
    versions: dict[str, str] = {}
    notes: list[str] = []
    fatal: list[str] = []
    for name in targets:
        if name not in PEER_TARGETS:
            continue
        if name == "nginx":
            binary = find_nginx()
            if binary is None:
                (fatal if explicit else notes).append(NGINX_MISSING)
                continue
            binaries[name], versions[name] = binary, nginx_version(binary)
            continue
        spec = PEERS[name]
        found = find_peer(spec)
        if found is None:
            (fatal if explicit else notes).append(spec.missing)
            continue
        try:
            versions[name] = peer_version(spec, found)
        except StackError as exc:
            if explicit:
                fatal.append(str(exc))
            else:
                notes.append(f"{exc}: skipping the {name} target")
            continue
        binaries[name] = found
    return binaries, versions, notes, fatal


def choose_backend(choice: str | None, nginx: str | None) -> str | None:
    """`--backend`, or nginx when installed and else the stub by default; None if nginx is asked for but missing."""
    if choice is None:
        return "nginx" if nginx is not None else "stub"
    return None if choice == "nginx" and nginx is None else choice


@dataclass(slots=True)
class Target:
    """A target's URL and the server whose CPU counts as the proxy's (None in `direct`)."""

    url: str
    server: Service | None
    script_args: tuple[str, ...] = ()  # after `--` on wrk's command line (the jwt script: token file, Host)
    host: str | None = None  # a Host value (uvgate's JWT route)


@dataclass(slots=True)
class Context:
    """What every scenario of a run shares."""

    args: argparse.Namespace
    tool: str
    """The wrk or locust binary."""
    stack: Stack
    backend: Service
    binaries: dict[str, str]
    baseline: Baseline | None
    tokens: Path | None
    proxy_cpus: list[int] | None
    load_cpus: list[int] | None
    all_cpus: list[int] | None
    records: list[RunRecord] = field(default_factory=list)
    code: dict[str, RunningCode] = field(default_factory=dict)
    rss: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Scenario -> uvgate target -> `initial`/`start`/`end` -> worker pid -> RSS bytes."""
    step: int = 0
    steps: int = 0
    load_runs: int = 0
    redis_per_1000: list[float] = field(default_factory=list)
    """Redis commands per 1,000 requests of each measured `limits` run."""
    reject: RejectLimit | None = None
    """The rejecting scenario's limit, once calibrated."""


def _workers_rss(proxy: Service) -> dict[str, int | None]:
    return {str(pid): rss_bytes(pid) for pid in proxy.children()}


def _sum_rss(sizes: dict[str, int | None]) -> int | None:
    present = [v for v in sizes.values() if v is not None]
    return sum(present) if present else None


def _check(target: Target) -> None:
    headers = {"Host": target.host} if target.host else None
    status, body = http_get(target.url, timeout=5.0, headers=headers)
    if status != 200:
        raise StackError(f"GET {target.url} answered {status}, not 200: {body[:200]!r}")


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
    write_large_body(run_dir)
    backend = start_nginx(
        nginx,
        render=lambda listen, user: render_backend_conf(run_dir=run_dir, listen=listen, user=user),
        run_dir=run_dir,
        probe_path=SCENARIOS["plain"].path,
        name="nginx-backend",
        host=stack.host,
        cpus=cpus,
        env=stack.env,
        startup_timeout=stack.startup_timeout,
    )
    cleanup.callback(backend.stop)
    return backend


def _nginx_renderer(run_dir: Path, backend: str, workers: int) -> ConfRenderer:
    def render(listen: str, user: tuple[str, str] | None) -> str:
        return render_nginx_conf(run_dir=run_dir, listen=listen, backend=backend, user=user, workers=workers)

    return render


def _start_servers(
    ctx: Context, scenario: Scenario, targets: Sequence[str], cleanup: contextlib.ExitStack
) -> dict[str, Service]:
    """The peers and uvgates of `targets` for `scenario`, all in front of the backend, by target."""
    stack, backend = ctx.stack, ctx.backend
    cpus = ctx.proxy_cpus if scenario.workers == 1 else ctx.all_cpus
    servers: dict[str, Service] = {}
    probe = SCENARIOS["plain"].path
    for name in targets:
        if name == "nginx":
            run_dir = stack.run_dir / scenario.name / "nginx"
            servers[name] = start_nginx(
                ctx.binaries[name],
                render=_nginx_renderer(run_dir, backend.address, scenario.workers),
                run_dir=run_dir,
                probe_path=probe,
                host=stack.host,
                cpus=cpus,
                env=stack.env,
                startup_timeout=stack.startup_timeout,
            )
        elif name in PEERS:
            servers[name] = start_peer(
                PEERS[name],
                ctx.binaries[name],
                run_dir=stack.run_dir / scenario.name / name,
                backend=backend.address,
                probe_path=probe,
                threads=scenario.workers,
                host=stack.host,
                cpus=cpus,
                env=stack.env,
                startup_timeout=stack.startup_timeout,
            )
        elif name in UVGATE:
            # The baseline imports from its own tree only (see bench/baseline.py); the config is the same.
            env = baseline_env(ctx.baseline.root) if name == "baseline" and ctx.baseline is not None else None
            config = load_config_source(ctx.args.config)
            if scenario.proxy_config is not None:
                config = scenario.proxy_config(config)
            if name in SWITCH_TARGETS:
                directory = switch_dir(stack.run_dir, scenario.name, name)
                directory.mkdir(parents=True, exist_ok=True)
                config = switched_config(name, config, directory)
            if scenario.reject_share is not None and ctx.reject is not None:
                config = with_reject_limit(config, ctx.reject)
            workers = scenario.workers if scenario.workers > 1 else ctx.args.proxy_workers
            servers[name] = stack.start_proxy(
                config, workers=workers, upstream_servers=[backend.address], cpus=cpus, env=env, name=name
            )
        else:
            continue
        cleanup.callback(servers[name].stop)  # before the baseline's tree goes, and before the backend
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


def _load(ctx: Context, scenario: Scenario, target: Target, duration: str, name: str) -> WrkResult:
    """One run of the load generator against `target` with the scenario's request."""
    args = ctx.args
    if args.tool == "locust":
        ctx.load_runs += 1  # the CSV goes to the run dir, removed with it
        prefix = ctx.stack.run_dir / "locust" / f"{ctx.load_runs:04d}-{scenario.name}-{name}"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        return run_locust(
            ctx.tool,
            target.url.removesuffix(scenario.path),
            seconds=duration_seconds(duration),
            users=args.connections,
            csv_prefix=prefix,
            env=locust_env(scenario=scenario.name, path=scenario.path, tokens=ctx.tokens, host=target.host),
            cpus=ctx.load_cpus,
        )
    return run_wrk(
        ctx.tool,
        target.url,
        duration=duration,
        connections=args.connections,
        threads=args.threads,
        cpus=ctx.load_cpus,
        script=scenario.script,
        script_args=target.script_args,
    )


def _measure(ctx: Context, scenario: Scenario, name: str, index: int, target: Target) -> RunRecord:
    """One measured run of target `name` with the CPU its server and the backend used meanwhile."""
    server = target.server
    server_before = tree_cpu_times(server.pid) if server is not None else None
    backend_before = tree_cpu_seconds(ctx.backend.pid)
    machine_before = machine_ticks()
    result = _load(ctx, scenario, target, ctx.args.duration, name)
    machine_after = machine_ticks()
    backend_cpu = tree_cpu_seconds(ctx.backend.pid) - backend_before
    server_cpu: CpuTimes | None = None
    if server is not None and server_before is not None:
        server_cpu = tree_cpu_times(server.pid) - server_before
    steal = None if machine_before is None or machine_after is None else machine_after.steal_share(machine_before)
    return RunRecord(name, index, result, server_cpu, backend_cpu, scenario.name, steal)


def _measure_quietly(
    ctx: Context, scenario: Scenario, name: str, index: int, target: Target
) -> tuple[RunRecord, float | None]:
    """`_measure`, again (up to `--steal-retries` times) while the hypervisor stole more than `--max-steal`
    of the busy CPU time; the attempt with the least steal is kept (the earliest of equals), with the
    others in its `discarded`.

    Returns it and, in the `limits` target, its Redis commands per 1,000 requests.
    """
    limit = ctx.args.max_steal / 100
    store = ctx.stack.redis if name == LIMITS else None
    attempts: list[tuple[RunRecord, float | None]] = []
    best = 0
    for attempt in range(ctx.args.steal_retries + 1):
        before = redis_commands(store.host, store.port) if store is not None else 0
        record = _measure(ctx, scenario, name, index, target)
        per_1000 = None
        if store is not None:
            per_1000 = commands_per_1000(before, redis_commands(store.host, store.port), record.result.requests)
        attempts.append((record, per_1000))
        steal, least = record.steal_share, attempts[best][0].steal_share
        if steal is not None and least is not None and steal < least:
            best = attempt
        if steal is None or steal <= limit or attempt == ctx.args.steal_retries:
            break
        print(
            f"  ({scenario.name} {name}: the hypervisor stole {steal:.1%} of the busy CPU time, more than "
            f"{ctx.args.max_steal:g} %: measuring again)",
            flush=True,
        )
    kept, per_1000 = attempts[best]
    others = tuple(r for n, (r, _) in enumerate(attempts) if n != best)
    return dataclasses.replace(kept, kept_attempt=best + 1, discarded=others), per_1000


def _targets_of(ctx: Context, scenario: Scenario, servers: dict[str, Service]) -> dict[str, Target]:
    extra = () if ctx.tokens is None or not scenario.tokens else (str(ctx.tokens),)
    path = scenario.path
    targets = {"direct": Target(ctx.backend.url + path, None, extra)}
    targets |= {name: Target(svc.url + path, svc, extra) for name, svc in servers.items()}
    if "proxy" in servers and scenario.tokens and ctx.tokens is not None:
        proxy = servers["proxy"]
        token = ctx.tokens.read_text().split()[0]
        for name in scenario.extra_targets:
            host = ROUTE_HOSTS[name]
            targets[name] = Target(proxy.url + path, proxy, (str(ctx.tokens), host), host)
        if JWT in scenario.extra_targets:
            check_jwt_route(proxy.host, proxy.port, path, token)
        if LIMITS in scenario.extra_targets:
            check_limit_route(proxy.host, proxy.port, path, token)
    return targets


def calibrate_reject_limit(ctx: Context, scenario: Scenario) -> RejectLimit:
    """The rejecting scenario's limit: its share of what uvgate forwards without it in one warm-up-long
    run of the scenario's request (the proxy started for this run only)."""
    share = scenario.reject_share if scenario.reject_share is not None else 0.1
    plain = Scenario(scenario.name, scenario.description, scenario.script, scenario.path)
    with contextlib.ExitStack() as cleanup:
        proxy = _start_servers(ctx, plain, ["proxy"], cleanup)["proxy"]
        result = _load(ctx, plain, Target(proxy.url + plain.path, proxy), ctx.args.warmup, "proxy")
    limit = reject_limit(result.rps, ctx.args.proxy_workers, share)
    print(
        f"scenario {scenario.name}: calibration {result.rps:,.0f} req/s without the limit -> "
        f"limit {limit.total_rate:,}/s ({limit.rate:,}/s per worker, burst {limit.burst:,})",
        flush=True,
    )
    return limit


def run_scenario(ctx: Context, scenario: Scenario, names: Sequence[str], labels: dict[str, str]) -> None:
    """Start the targets of `scenario`, run its rounds (records into ctx.records), stop them."""
    if scenario.redis and ctx.stack.redis is None:
        redis = ctx.stack.start_redis()  # before the proxies: their redis.url points at it
        print(f"redis        {redis.url}", flush=True)
    if scenario.reject_share is not None and ctx.reject is None:
        ctx.reject = calibrate_reject_limit(ctx, scenario)
    with contextlib.ExitStack() as cleanup:
        servers = _start_servers(ctx, scenario, names, cleanup)
        code = _verify_code(servers, ctx.baseline)
        ctx.code |= {f"{scenario.name}/{n}": c for n, c in code.items()}
        targets = _targets_of(ctx, scenario, servers)
        for name in names:
            if name not in ROUTE_HOSTS:
                _check(targets[name])
        print(f"scenario {scenario.name}: {scenario.description}", flush=True)
        for name, svc in servers.items():
            runs = f"; runs {code[name].describe()}" if name in code else ""
            print(
                f"  {labels.get(name, name):<12} {svc.url} (pid {svc.pid}, workers {svc.children()}){runs}", flush=True
            )
        rss = {name: {"initial": _workers_rss(servers[name])} for name in UVGATE if name in servers}
        width = max(len(labels.get(n, n)) for n in names)
        for index in range(ctx.args.runs):
            for name in round_order(names, index):
                target = targets[name]
                _load(ctx, scenario, target, ctx.args.warmup, name)
                if name in rss and "start" not in rss[name]:
                    rss[name]["start"] = _workers_rss(servers[name])
                ctx.step += 1
                record, per_1000 = _measure_quietly(ctx, scenario, name, index, target)
                ctx.records.append(record)
                if per_1000 is not None:
                    ctx.redis_per_1000.append(per_1000)
                result, cpu = record.result, record.proxy_cpu_us_per_req
                print(
                    f"  [{ctx.step}/{ctx.steps}] {scenario.name} round {index + 1}/{ctx.args.runs} "
                    f"{labels.get(name, name):<{width}} {result.rps:>9,.0f} req/s  p99 {result.p99_us:,.0f} µs  "
                    f"errors {result.total_errors}"
                    + (f"  429 {result.rejected}" if result.rejected else "")
                    + (f"  CPU {cpu:,.1f} µs/req" if cpu is not None else "")
                    + (f"  steal {record.steal_share:.1%}" if record.steal_share is not None else "")
                    + (f" (measured {record.attempts} times)" if record.attempts > 1 else "")
                    + (f"  Redis {per_1000:.1f} cmd/1k req" if per_1000 is not None else ""),
                    flush=True,
                )
        for name in rss:
            rss[name]["end"] = _workers_rss(servers[name])
        for name, svc in [*servers.items(), ("backend", ctx.backend)]:
            if not svc.running:
                raise _exited(svc, name)
        ctx.rss[scenario.name] = rss
        if ACCESSLOG in servers:  # hundreds of MB over the rounds; a failed run keeps it with the run dir
            (switch_dir(ctx.stack.run_dir, scenario.name, ACCESSLOG) / ACCESS_LOG_FILE).unlink(missing_ok=True)


def footer_lines(
    summaries: Sequence[ScenarioSummary],
    labels: dict[str, str],
    paired: dict[str, float | None],
    plan: Plan,
    backend_kind: str,
    machine: str,
    limit_text: Sequence[str] = (),
    switch_text: Sequence[str] = (),
    paired_nginx: Mapping[str, float | None] | None = None,
    steal_text: Sequence[str] = (),
) -> list[str]:
    """What follows the table: ratios per scenario, saturation, noise and steal notes, uvgate ÷ nginx paired by
    round (`paired_nginx`), the paired auth cost, the paired costs
    of metrics and the access log (`switch_report`), the rate-limit figures (`limit_report`), what was left
    out, the machine, and a warning when the load generator saw errors."""
    lines = format_ratios(summaries, labels) + saturation_notes(summaries, labels) + noise_notes(summaries, labels)
    lines += steal_text
    lines += [
        f"{n}: uvgate CPU µs/req ÷ nginx CPU µs/req, paired by round: median {v:.2f}"
        for n, v in (paired_nginx or {}).items()
        if v is not None
    ]
    lines += [
        f"{n}: auth (jwt - proxy) CPU µs/req, paired by round: median {v:+.2f}"
        for n, v in paired.items()
        if v is not None
    ]
    lines += switch_text
    lines += limit_text
    lines += [f"note: {note}" for note in plan.notes]
    if backend_kind == "stub" and any(s.name == "body" for s in plan.scenarios):
        lines.append("note: body with backend_stub: the answer is its fixed 53 bytes, not 256 KiB (nginx backend)")
    lines.append(f"machine: {machine}")
    errors = sum(s.errors for s in summaries)
    if errors:
        lines.append(f"WARNING: {errors} load-generator errors (connect/read/write/status/timeout); see the JSON")
    return lines


def limit_report(
    records: Sequence[RunRecord], redis_per_1000: Sequence[float], reject: RejectLimit | None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The rate-limit scenarios' figures for the JSON (by scenario) and the footer: in `limited` the paired
    cost of the limits (limits - jwt) and Redis commands per 1,000 requests, in `rejecting` the limit and
    the share of the proxy's requests it admitted."""
    figures: dict[str, dict[str, Any]] = {}
    limited = [r for r in records if r.scenario == "limited"]
    cost = paired_difference(limited, LIMITS, JWT) if limited else None
    if limited:
        figures["limited"] = {
            "limits_minus_jwt_cpu_per_req_paired": cost,
            "redis_commands_per_1000_requests": statistics.median(redis_per_1000) if redis_per_1000 else None,
            "redis_commands_per_1000_requests_runs": list(redis_per_1000),
        }
    lines = limited_lines(cost, redis_per_1000)
    rejecting = [r for r in records if r.scenario == "rejecting" and r.target == "proxy"]
    if reject is not None and rejecting:
        requests = sum(r.result.requests for r in rejecting)
        rejected = sum(r.result.rejected for r in rejecting)
        figures["rejecting"] = {
            "limit_per_s": reject.total_rate,
            "limit_per_worker_per_s": reject.rate,
            "limit_burst": reject.burst,
            "calibration_rps": reject.offered_rps,
            "admitted_share": (requests - rejected) / requests if requests else None,
        }
        lines.append(rejecting_line(reject, requests, rejected))
    return figures, lines


def rss_lines(rss: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str]) -> list[str]:
    """Each uvgate's workers' RSS after the first warm-up and at the end, by scenario."""
    lines = []
    for scenario_name, by_target in rss.items():
        for name, sizes in by_target.items():
            if "start" in sizes:
                start, end = _sum_rss(sizes["start"]), _sum_rss(sizes["end"])
                growth = format_mib(end - start) if start is not None and end is not None else "-"
                label = f"{scenario_name} {labels.get(name, name)}"
                lines.append(f"{label} worker RSS: start {format_mib(start)}, end {format_mib(end)} (growth {growth})")
    return lines


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo, else platform.processor(), else `unknown`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pinning_text(pin: bool, nproc: int) -> str:
    """The placement of the processes, for the header and the JSON."""
    if not pin:
        return f"pinning off ({nproc} CPUs)"
    return (
        "targets on CPU 0 (CPUs 0-1 in `workers`), backend and load generator on CPU 1"
        if nproc == 2
        else f"targets on CPU 0 (all CPUs in `workers`), backend and load generator on CPU 1 ({nproc} CPUs)"
    )


def run(args: argparse.Namespace, plan: Plan, tool: str, backend_kind: str) -> int:
    """Build the baseline if asked, start the backend, run the scenarios, print the table, write JSON and PNG."""
    nproc = len(os.sched_getaffinity(0))
    pin = not args.no_pin and nproc >= 2
    proxy_cpus, load_cpus = ([0], [1]) if pin else (None, None)
    all_cpus = sorted(os.sched_getaffinity(0)) if pin else None
    labels: dict[str, str] = {}
    nginx_binary = plan.binaries.get("nginx") or find_nginx()
    baseline_info: dict[str, Any] | None = None
    source = worktree_label()
    commit = resolve_commit(args.baseline) if args.baseline is not None else None  # fails before anything starts
    started = dt.datetime.now(dt.UTC)
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
        backend = _start_backend(backend_kind, stack, cleanup, nginx_binary, load_cpus)
        tokens: Path | None = None
        if any(s.tokens for s in plan.scenarios):
            auth = stack.start_auth(cpus=load_cpus)  # before the proxies: their JWKS URL points at it
            cleanup.callback(auth.stop)
            tokens = mint_tokens(auth.url, stack.run_dir / "tokens.txt")
            print(f"auth_stub    {auth.url}: {tokens} (1,000 RS256 tokens)", flush=True)
        ctx = Context(args, tool, stack, backend, plan.binaries, baseline, tokens, proxy_cpus, load_cpus, all_cpus)
        available = plan.binaries.__contains__
        per_scenario = {
            s.name: plan_targets(plan.targets, available, scenario=s, baseline=baseline is not None)[0]
            for s in plan.scenarios
        }
        ctx.steps = sum(len(t) for t in per_scenario.values()) * args.runs
        seconds = ctx.steps * (duration_seconds(args.duration) + duration_seconds(args.warmup))
        what = f"nginx, {nginx_version(nginx_binary)}" if backend_kind == "nginx" and nginx_binary else "backend_stub"
        print(f"backend      {backend.url} ({what}; pid {backend.pid}, workers {backend.children()})", flush=True)
        for name, version in plan.versions.items():
            print(f"{name:<12} {plan.binaries[name]}: {version}", flush=True)
        print(f"proxy        {source}", flush=True)
        if baseline is not None:
            print(f"baseline     {args.baseline} = {baseline.commit.short}, built in {baseline.build_seconds:.0f} s")
        print(f"machine      {nproc} CPUs, {cpu_model()}; {pinning_text(pin, nproc)}", flush=True)
        print(
            f"plan         {len(plan.scenarios)} scenario(s) x targets x {args.runs} rounds = {ctx.steps} runs "
            f"of {args.duration} (+{args.warmup} warm-up) with {args.tool}: about {seconds / 60:.0f} min"
            + (
                f" (more if the hypervisor steals over {args.max_steal:g} % of the busy CPU time: such runs are "
                "measured again)"
                if args.steal_retries and args.max_steal < 100
                else ""
            ),
            flush=True,
        )
        for scenario in plan.scenarios:
            if not per_scenario[scenario.name]:
                print(f"scenario {scenario.name}: skipped, none of the targets asked for runs it", flush=True)
                continue
            run_scenario(ctx, scenario, per_scenario[scenario.name], labels)
        code = ctx.code

    summaries = summarize(ctx.records)
    ratio_values = ratios_by_scenario(summaries)
    paired = {
        s.name: paired_difference([r for r in ctx.records if r.scenario == s.name], JWT, "proxy")
        for s in plan.scenarios
    }
    for name, value in paired.items():
        if name in ratio_values:
            ratio_values[name]["jwt_minus_proxy_cpu_per_req_paired"] = value
    paired_nginx = {
        s.name: paired_ratio([r for r in ctx.records if r.scenario == s.name], "proxy", "nginx") for s in plan.scenarios
    }
    for name, value in paired_nginx.items():
        if name in ratio_values:
            ratio_values[name]["uvgate_over_nginx_cpu_per_req_paired"] = value
    figures, limit_text = limit_report(ctx.records, ctx.redis_per_1000, ctx.reject)
    switch_figures, switch_text = switch_report(ctx.records)
    for name, values in [*figures.items(), *switch_figures.items()]:
        ratio_values.setdefault(name, {}).update(values)
    print()
    print(format_table(summaries, labels))
    print()
    machine = f"{nproc} CPUs, {cpu_model()}; {pinning_text(pin, nproc)}; backend {backend_kind}"
    print(
        "\n".join(
            footer_lines(
                summaries,
                labels,
                paired,
                plan,
                backend_kind,
                machine,
                limit_text,
                switch_text,
                paired_nginx,
                steal_notes(ctx.records, args.max_steal / 100, args.steal_retries, labels),
            )
        )
    )
    print("\n".join(rss_lines(ctx.rss, labels)))

    document = {
        "timestamp": started.isoformat(),
        "host": {
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "pinning": pinning_text(pin, nproc),
        "tool": {"name": args.tool, "version": wrk_version(tool) if args.tool == "wrk" else locust_version(tool)},
        "params": {
            "scenarios": [s.name for s in plan.scenarios],
            "targets": list(plan.targets),
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "runs": args.runs,
            "max_steal_percent": args.max_steal,
            "steal_retries": args.steal_retries,
            "proxy_workers": args.proxy_workers,
            "config": str(args.config),
            "pinned": pin,
            "backend": backend_kind,
            "baseline": args.baseline,
        },
        "peers": {name: {"binary": plan.binaries[name], "version": v} for name, v in plan.versions.items()},
        "notes": list(plan.notes),
        "backend": {"kind": backend_kind, "workers": 1},
        "proxy": {"source": source},
        "baseline": baseline_info,
        "code": {name: {"modules": list(c.modules), "roots": list(c.roots)} for name, c in code.items()},
        "labels": labels,
        "summary": [s.as_dict() for s in summaries],
        "ratios": ratio_values,
        "worker_rss_bytes": ctx.rss,
        "runs": [r.as_dict() for r in ctx.records],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("%Y%m%dT%H%M%SZ")
    out = args.results_dir / f"{stem}.json"
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    if not args.no_chart:
        title = f"{started:%Y-%m-%d %H:%M} UTC, {nproc} CPUs {cpu_model()}, {args.tool}, backend {backend_kind}"
        try:
            print(f"chart:   {write_chart(summaries, args.results_dir / f'{stem}.png', labels=labels, title=title)}")
        except ChartUnavailable as exc:
            print(f"chart:   none ({exc})")
    return 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def make_plan(args: argparse.Namespace) -> tuple[Plan | None, str | None]:
    """The plan, or None and the reason to exit 2 (an unknown name, a peer asked for but missing, a config
    that has not got proxy's side of a switched target's comparison)."""
    try:
        scenario_names, target_names, notes = resolve_names(args)
    except ValueError as exc:
        return None, str(exc)
    explicit = "all" not in (n.strip() for n in args.target.split(",")) or args.scenario in OLD_TARGET_FLAGS
    binaries, versions, peer_notes, fatal = find_peers(target_names, explicit)
    if fatal:
        return None, "\n".join(fatal)
    switched = [n for n in target_names if n in SWITCH_TARGETS]
    if switched:
        try:
            problems = template_problems(load_config_source(args.config), switched)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems = [f"--config {args.config}: {exc}"]
        if problems:
            return None, "\n".join(problems)
        if "proxy" not in target_names:
            notes.append(f"{', '.join(switched)} without proxy: no paired cost (add proxy to --target)")
    if not scenario_names:
        return None, "no scenario to run: " + "; ".join(notes)
    plan = Plan(tuple(SCENARIOS[n] for n in scenario_names), target_names, binaries, versions, (*notes, *peer_notes))
    return plan, None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 2 when the load generator (or a peer asked for by name) is missing or the
    arguments are invalid."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("duration", "warmup"):
        try:
            duration_seconds(getattr(args, name))
        except ValueError as exc:
            parser.error(f"--{name}: {exc}")
    if args.runs < 1 or args.connections < 1 or args.threads < 1 or args.threads > args.connections:
        parser.error("--runs, --connections and --threads must be >= 1, with threads <= connections")
    if not 0 < args.max_steal <= 100 or args.steal_retries < 0:
        parser.error("--max-steal must be a percentage in (0, 100] and --steal-retries >= 0")
    tool = find_wrk() if args.tool == "wrk" else find_locust()
    if tool is None:
        print(INSTALL_WRK if args.tool == "wrk" else INSTALL_LOCUST, file=sys.stderr)
        return 2
    plan, problem = make_plan(args)
    if plan is None:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(note, flush=True)
    backend = choose_backend(args.backend, plan.binaries.get("nginx") or find_nginx())
    if backend is None:
        print(NGINX_MISSING_BACKEND, file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every process is stopped and the baseline's export removed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, plan, tool, backend)
    except (StackError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
