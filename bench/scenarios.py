"""The benchmark's scenarios (what is sent, and to how many workers) and targets (where it is sent).

A scenario is a request shape plus a server setup: `plain`, `realistic`, `jwt`, `limited`, `rejecting`,
`body`, `workers`. Every target of a run (the backend `direct`, the peers `nginx`, `haproxy`, `caddy`,
uvgate as `proxy`, with `--baseline` another commit's uvgate) gets the same scenario in turn, round by
round. A scenario can add uvgate targets after `proxy` (`extra_targets`: the same proxy and request on
another route, chosen by Host): `jwt` adds the JWT route as `jwt`, `limited` adds it and the same route
with limits as `limits`. `rejecting` concerns uvgate alone (`uvgate_only`: the peers have no limit), its
limit set from a calibration run (bench/limits.py); its wrk script counts 429s apart from errors (the
table's `429` column, as Locust's are). Outside `all`, `--target` also takes uvgate with one setting
switched (bench/switches.py: `nometrics`, `accesslog`), which follow `proxy` and its extra targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.jwt import with_jwt_route
from bench.limits import LIMITS, with_limited_routes
from bench.switches import SWITCH_TARGETS
from bench.wrk_runner import BODY_LUA, JWT_LUA, REALISTIC_LUA, REJECTING_LUA, REPORT_LUA

__all__ = [
    "BODY_PATH",
    "PATH",
    "PEER_TARGETS",
    "SCENARIOS",
    "TARGETS",
    "TARGET_CHOICES",
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
    extra_targets: tuple[str, ...] = ()
    """uvgate targets that follow `proxy`: the same proxy on another route (chosen by Host)."""
    redis: bool = False
    """Needs the Redis server started by the bench (global limits)."""
    reject_share: float | None = None
    """The proxy's route gets a limit at this share of the load it forwarded without it (calibrated)."""

    @property
    def uvgate_only(self) -> bool:
        """Only uvgate targets run it (a limit that rejects: the peers have none)."""
        return self.reject_share is not None


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
            extra_targets=("jwt",),
        ),
        Scenario(
            "limited",
            "jwt with a local and a global rate limit that never reject (Redis); `limits` has them, `jwt` not",
            JWT_LUA,
            tokens=True,
            proxy_config=with_limited_routes,
            extra_targets=("jwt", LIMITS),
            redis=True,
        ),
        Scenario(
            "rejecting",
            "plain GET to a route limited to 10 % of the load it forwarded without the limit (429s counted)",
            REJECTING_LUA,
            reject_share=0.1,
        ),
        Scenario("body", "POST of 16 KiB of JSON answered by 256 KiB of JSON (nginx backend)", BODY_LUA, BODY_PATH),
        Scenario("workers", "plain with 2 workers (threads) per proxy, on every CPU: scaling", REPORT_LUA, workers=2),
    )
}
"""The `--scenario` choices, in the order they run."""

PEER_TARGETS = ("nginx", "haproxy", "caddy")
"""The other proxies, in the order they run within a round."""
TARGETS = ("direct", *PEER_TARGETS, "proxy")
"""`--target all`; a scenario's extra targets and `baseline` (with --baseline) follow `proxy`."""
TARGET_CHOICES = (*TARGETS, *SWITCH_TARGETS)
"""The `--target` choices: `all`'s and the switched uvgates, which are named to run (`all,nometrics` works)."""


def parse_names(
    text: str,
    choices: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    *,
    everything: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """`a,b` or `all` (with other names or not) as a tuple of names in the order of `choices`; `all` stands for
    `everything` (default: every choice). ValueError for an unknown name. A name in `aliases` stands for its
    value (an old name)."""
    wanted = [(aliases or {}).get(name.strip(), name.strip()) for name in text.split(",") if name.strip()]
    if not wanted:
        raise ValueError("no name given")
    unknown = [name for name in wanted if name not in choices and name != "all"]
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)} (choose from {', '.join((*choices, 'all'))})")
    if "all" in wanted:
        wanted += everything if everything is not None else choices
    return tuple(n for n in choices if n in wanted)


def plan_targets(
    wanted: Sequence[str],
    available: Callable[[str], bool],
    *,
    scenario: Scenario,
    baseline: bool = False,
) -> tuple[tuple[str, ...], list[str]]:
    """The targets of one scenario, in round order, and the names of peers left out as not installed.

    The scenario's extra targets follow `proxy`, then the switched uvgates of `wanted`; `baseline` comes
    last; a uvgate-only scenario has no `direct` and no peer.
    """
    targets: list[str] = []
    missing: list[str] = []
    for name in wanted:
        if scenario.uvgate_only and name not in ("proxy", *SWITCH_TARGETS):
            continue
        if name in PEER_TARGETS and not available(name):
            missing.append(name)
            continue
        if name == "direct" and scenario.workers > 1:
            continue  # the backend does not change with the proxies' workers: `plain` has it
        targets.append(name)
        if name == "proxy":
            targets.extend(scenario.extra_targets)
    if baseline:
        targets.append("baseline")
    return tuple(targets), missing


def round_order(targets: Sequence[str], index: int) -> tuple[str, ...]:
    """Round `index` runs the targets in order, the next one in reverse (ABBA): a drift over the
    invocation then favours no target over its neighbour, e.g. the proxy over the baseline."""
    return tuple(targets) if index % 2 == 0 else tuple(reversed(targets))
