"""The benchmark's scenarios (what is sent, and to how many workers) and targets (where it is sent).

A scenario is a request shape plus a server setup: `plain`, `realistic`, `jwt`, `body`, `workers`.
Every target of a run (the backend `direct`, the peers `nginx`, `haproxy`, `caddy`, uvgate as `proxy`,
in the jwt scenario also uvgate's JWT route as `jwt`, with `--baseline` another commit's uvgate)
gets the same scenario in turn, round by round. `limited` and `rejecting` are declared in `PLANNED`:
they need rate limits in the proxy config (`Scenario.proxy_config`, as `jwt` adds its route) and join
`SCENARIOS` when limits exist. Answers with 429 already have their own count (`WrkResult.rejected`, the
table's `429` column): Locust fills it; wrk counts a 429 as a status error until a script counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.jwt import with_jwt_route
from bench.wrk_runner import BODY_LUA, JWT_LUA, REALISTIC_LUA, REPORT_LUA

__all__ = [
    "BODY_PATH",
    "PATH",
    "PEER_TARGETS",
    "PLANNED",
    "SCENARIOS",
    "TARGETS",
    "Scenario",
    "parse_names",
    "plan_targets",
    "round_order",
]

PATH = "/api/resource"
"""What every scenario but `body` requests: the backend's fixed 53-byte JSON answer."""
BODY_PATH = "/api/large"
"""`body`'s path: 256 KiB of JSON from the nginx backend (backend_stub answers its fixed 53 bytes)."""

ProxyConfigHook = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One request shape and server setup, run against every target."""

    name: str
    description: str
    script: Path
    """The wrk script (each prints the JSON report line of bench/wrk/report.lua)."""
    path: str = PATH
    workers: int = 1
    """Workers (uvgate, nginx), threads (HAProxy) or GOMAXPROCS (Caddy) of every proxy target."""
    tokens: bool = False
    """Needs auth_stub and the token file (script argument; the `jwt` target is added)."""
    proxy_config: ProxyConfigHook | None = None
    """Turns the proxy config template into this scenario's (e.g. adds the JWT route, or limits)."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("plain", "GET with wrk's minimal head (request line and Host): the forwarding floor", REPORT_LUA),
        Scenario("realistic", "GET with an API client's head: 11 header lines, ~615 bytes", REALISTIC_LUA),
        Scenario(
            "jwt",
            "GET with a bearer token, 1,000 RS256 tokens cycled; `jwt` checks it, the others forward it",
            JWT_LUA,
            tokens=True,
            proxy_config=with_jwt_route,
        ),
        Scenario("body", "POST of 16 KiB of JSON answered by 256 KiB of JSON (nginx backend)", BODY_LUA, BODY_PATH),
        Scenario("workers", "plain with 2 workers (threads) per proxy, on every CPU: scaling", REPORT_LUA, workers=2),
    )
}
"""The `--scenario` choices, in the order they run."""

PLANNED: dict[str, str] = {
    "limited": "jwt + local and global rate limits that never reject: needs rate limits in uvgate",
    "rejecting": "a rate limit at 10 % of the offered load (the cost of answering 429): needs rate limits in uvgate",
}
"""Scenarios of issue 11 that wait for a feature: accepted on the command line, skipped with this note."""

PEER_TARGETS = ("nginx", "haproxy", "caddy")
"""The other proxies, in the order they run within a round."""
TARGETS = ("direct", *PEER_TARGETS, "proxy")
"""The `--target` choices; `jwt` (with the jwt scenario) and `baseline` (with --baseline) follow `proxy`."""


def parse_names(text: str, choices: Sequence[str], planned: Sequence[str] = ()) -> tuple[str, ...]:
    """`a,b` or `all` as a tuple of names in the order of `choices` (`all` = every choice); ValueError for
    an unknown name. Names in `planned` are accepted and kept (last)."""
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    if not wanted:
        raise ValueError("no name given")
    if "all" in wanted:
        return tuple(choices)
    unknown = [name for name in wanted if name not in choices and name not in planned]
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)} (choose from {', '.join((*choices, *planned, 'all'))})")
    return tuple(n for n in choices if n in wanted) + tuple(n for n in planned if n in wanted)


def plan_targets(
    wanted: Sequence[str],
    available: Callable[[str], bool],
    *,
    scenario: Scenario,
    baseline: bool = False,
) -> tuple[tuple[str, ...], list[str]]:
    """The targets of one scenario, in round order, and the names of peers left out as not installed.

    `jwt` follows `proxy` when the scenario has tokens; `baseline` comes last.
    """
    targets: list[str] = []
    missing: list[str] = []
    for name in wanted:
        if name in PEER_TARGETS and not available(name):
            missing.append(name)
            continue
        if name == "direct" and scenario.workers > 1:
            continue  # the backend does not change with the proxies' workers: `plain` has it
        targets.append(name)
        if name == "proxy" and scenario.tokens:
            targets.append("jwt")
    if baseline:
        targets.append("baseline")
    return tuple(targets), missing


def round_order(targets: Sequence[str], index: int) -> tuple[str, ...]:
    """Round `index` runs the targets in order, the next one in reverse (ABBA): a drift over the
    invocation then favours no target over its neighbour, e.g. the proxy over the baseline."""
    return tuple(targets) if index % 2 == 0 else tuple(reversed(targets))
