"""`python -m bench.accuracy`: how exactly a global limit holds across hosts and workers.

Starts one Redis-protocol server, backend_stub and `--instances` proxy instances (`--workers` each) on
their own ports, all with one route limited to `--limit` requests per `--window` per subject, then
offers `--load` x limit per window for one subject (the client address) split evenly over the
instances, for `--windows` windows, and prints what each complete window admitted (200s, binned by
the wall-clock window in which the response arrived: a window's admissions happen early in it, when
the offered load is over the limit, so none is near an edge), the worst overshoot and the worst
undershoot against the bar: every window admits <= 1.01 x limit + 4 and >= 0.95 x limit.

For contrast it prints what naive batching admits under the same load (every worker counts locally,
flushes every sync interval and admits while its stale count is under the limit, as Kong's
`sync_rate` does): simulated by `simulate` with the measured round trip, next to the same
simulation of the proxy's own accounting (`proxy.ratelimit.ledger`), so the two are compared like
for like. The load: `PacedLoad`, threads each holding one keep-alive connection, sending on a fixed
schedule (a late answer makes the next request go at once: the offered rate holds while the
connections keep up).
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack import RawHTTPConnection, Stack
from proxy.ratelimit.ledger import ADMIT, LEARN, Ledger, Sent

OVER = 1.01  # the bar: admitted <= OVER * limit + SLACK ...
SLACK = 4
UNDER = 0.95  # ... and >= UNDER * limit


# ---------------------------------------------------------------------------------------------- load


@dataclass(slots=True)
class Outcome:
    wall: float  # time.time() when the response arrived
    status: int
    latency: float  # seconds from sending the request to its response


class PacedLoad:
    """`rate` requests a second over `connections` keep-alive connections spread over `ports`, for `duration`."""

    def __init__(
        self, ports: Sequence[int], rate: float, duration: float, *, connections: int = 8, target: str = "/"
    ) -> None:
        self.ports = list(ports)
        self.rate = rate
        self.duration = duration
        self.connections = connections
        self.target = target
        self.outcomes: list[Outcome] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def start(self) -> PacedLoad:
        self.started = time.monotonic() + 0.05
        for index in range(self.connections):
            thread = threading.Thread(target=self._drive, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> list[Outcome]:
        """Wait for the end (bounded: the duration plus a request timeout); the outcomes in arrival order."""
        deadline = self.started + self.duration + 15.0
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [t for t in self._threads if t.is_alive()]
        if alive:
            self._stop.set()
            raise AssertionError(f"{len(alive)} load threads still running after the deadline")
        return sorted(self.outcomes, key=lambda o: o.wall)

    def __enter__(self) -> PacedLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15.0)

    def _drive(self, index: int) -> None:
        port = self.ports[index % len(self.ports)]
        gap = self.connections / self.rate
        due = self.started + gap * index / self.connections
        end = self.started + self.duration
        conn: RawHTTPConnection | None = None
        mine: list[Outcome] = []
        try:
            while due < end and not self._stop.is_set():
                pause = due - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)
                if conn is None:
                    conn = RawHTTPConnection("127.0.0.1", port, timeout=10.0)
                sent = time.monotonic()
                try:
                    conn.request("GET", self.target)
                    response = conn.read_response()
                except (OSError, AssertionError, ValueError) as exc:
                    with self._lock:
                        self.errors.append(f"conn {index}: {type(exc).__name__}: {exc}")
                    conn.close()
                    conn = None
                    due += gap
                    continue
                mine.append(Outcome(time.time(), response.status, time.monotonic() - sent))
                if (response.header("connection") or "").lower() == "close":
                    conn.close()
                    conn = None
                due += gap
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self.outcomes.extend(mine)


def admitted_per_window(outcomes: Sequence[Outcome], window: float, first: float, last: float) -> list[int]:
    """200s per complete window between Unix times `first` and `last`."""
    start = math.floor(first / window) + 1
    end = math.floor(last / window)  # exclusive: the window `last` falls in is partial
    counts = dict.fromkeys(range(start, end), 0)
    for outcome in outcomes:
        index = math.floor(outcome.wall / window)
        if outcome.status == 200 and index in counts:
            counts[index] += 1
    return [counts[index] for index in range(start, end)]


def within_bar(counts: Sequence[int], limit: int) -> bool:
    return bool(counts) and all(UNDER * limit <= n <= OVER * limit + SLACK for n in counts)


# ---------------------------------------------------------------------------------------------- live run


def accuracy_config(limit: int, window: str, sync_interval: str = "10ms") -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "upstreams": {"backend": {"servers": ["127.0.0.1:1"]}},
        "redis": {"url": "redis://127.0.0.1:1/0", "sync_interval": sync_interval, "timeout": "200ms"},
        "limits": {"accuracy": {"global_limit": limit, "window": window}},
        "routes": [{"prefix": "/", "upstream": "backend", "limits": ["accuracy"]}],
    }


@dataclass
class LiveResult:
    counts: list[int]
    offered: int
    errors: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def run_live(
    stack: Stack, *, limit: int, window: float, windows: int, instances: int, workers: int, load: float
) -> LiveResult:
    """Start `instances` proxies on `stack` (its Redis and backend), offer `load` x limit per window for
    `windows` windows, and count what each complete window admitted."""
    assert stack.redis is not None and stack.backend is not None
    config = accuracy_config(limit, f"{int(window * 1000)}ms")
    ports = []
    for index in range(instances):
        proxy = stack.start_proxy(
            config,
            workers=workers,
            upstream_servers=[stack.backend.address],
            redis_url=stack.redis.url,
            name=f"proxy{index}",
        )
        ports.append(proxy.port)
    # Start just after an edge so that whole windows are measured.
    time.sleep(window - time.time() % window + 0.01)
    first = time.time()
    load_run = PacedLoad(
        ports, load * limit / window, windows * window, connections=8 * instances, target="/api/resource"
    )
    with load_run:
        outcomes = load_run.join()
    last = first + windows * window
    statuses: dict[int, int] = {}
    for outcome in outcomes:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return LiveResult(admitted_per_window(outcomes, window, first, last), len(outcomes), load_run.errors, statuses)


# ---------------------------------------------------------------------------------------------- simulation


class NaiveView:
    """Naive batching (Kong's `sync_rate`): count locally, flush every interval, admit while the last
    count learned plus this worker's own since is under the limit."""

    def __init__(self, limit: int, length: float) -> None:
        self.limit = limit
        self.length = length
        self.window = -1
        self.learned = 0
        self.pending = 0
        self.inflight = 0
        self.urgent = False

    def admit(self, wall: float) -> bool:
        window = math.floor(wall / self.length)
        if window != self.window:
            self.window, self.learned, self.pending, self.inflight = window, 0, 0, 0
        if self.learned + self.inflight + self.pending + 1 > self.limit:
            return False
        self.pending += 1
        return True

    def take_batch(self) -> list[Sent]:
        count, self.pending = self.pending, 0
        self.inflight += count
        return [Sent(None, b"k", self.window, count, False)]

    def apply(self, batch: list[Sent], totals: list[int]) -> None:
        if batch[0].window == self.window:
            self.inflight -= batch[0].count
            self.learned = totals[0]


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    worker: int = field(compare=False)
    payload: Any = field(compare=False, default=None)


def simulate(
    *,
    workers: int,
    host_workers: int,
    limit: int,
    length: float,
    load: float,
    interval: float,
    rtt: float,
    windows: int,
    naive: bool = False,
) -> list[int]:
    """Requests admitted per complete window by `workers` workers against one shared counter: each with the
    proxy's ledger (or `NaiveView`) and a sync loop that sends every `interval` (the ledger's also as soon
    as it asks), one round trip of `rtt` at a time; the offered load, `load` x limit per window, is spread
    evenly over the workers, each with its own phase. A request the ledger cannot decide waits for the reply."""
    counts: dict[tuple[int], int] = {}
    books = [
        Ledger(
            limit=limit,
            length=length,
            sliding=False,
            min_workers=host_workers,
            share_ttl=2 * interval + rtt,
            max_entries=16,
        )
        for _ in range(workers)
    ]
    naives = [NaiveView(limit, length) for _ in range(workers)]
    busy = [False] * workers
    parked = [0] * workers
    admitted: dict[int, int] = {}
    events: list[_Event] = []
    sequence = 0

    def push(at: float, kind: str, worker: int, payload: Any = None) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, _Event(at, sequence, kind, worker, payload))

    def send(worker: int, now: float) -> None:
        busy[worker] = True
        batch = naives[worker].take_batch() if naive else books[worker].take_batch(now)
        push(now + rtt / 2, "redis", worker, batch)

    def count(now: float) -> None:
        index = math.floor(now / length)
        admitted[index] = admitted.get(index, 0) + 1

    def decide(worker: int, now: float) -> None:
        if naive:
            if naives[worker].admit(now):
                count(now)
            return
        book = books[worker]
        verdict = book.peek(b"k", now)
        if verdict == ADMIT:
            book.commit()
            count(now)
        elif verdict == LEARN:
            book.reserve()
            parked[worker] += 1
            if not busy[worker]:
                send(worker, now)

    start = 1000.0 * length
    end = start + windows * length
    gap = workers * length / (load * limit)
    for worker in range(workers):
        push(start + gap * worker / workers, "request", worker)
        push(start + interval * (worker + 1) / (workers + 1), "tick", worker)
    while events:
        event = heapq.heappop(events)
        now, worker = event.time, event.worker
        if now > end:
            break
        if event.kind == "request":
            decide(worker, now)
            push(now + gap, "request", worker)
        elif event.kind == "tick":
            if not busy[worker]:
                send(worker, now)
            push(now + interval, "tick", worker)
        elif event.kind == "redis":
            totals = []
            for sent in event.payload:
                key = (sent.window,)
                counts[key] = counts.get(key, 0) + sent.count
                totals.append(counts[key])
            push(now + rtt / 2, "reply", worker, (event.payload, totals))
        else:
            batch, totals = event.payload
            if naive:
                naives[worker].apply(batch, totals)
            else:
                books[worker].apply(batch, totals, None, now)
            busy[worker] = False
            waiting, parked[worker] = parked[worker], 0
            for _ in range(waiting):
                decide(worker, now)
            if not naive and books[worker].urgent:
                send(worker, now)
    first = math.floor(start / length)
    return [admitted.get(first + i, 0) for i in range(1, windows - 1)]


# ---------------------------------------------------------------------------------------------- main


def _line(name: str, counts: Sequence[int], limit: int) -> str:
    most, fewest = max(counts), min(counts)
    verdict = "within the bar" if within_bar(counts, limit) else "OUTSIDE the bar"
    return (
        f"{name:<34} per window: {' '.join(str(n) for n in counts)}\n"
        f"{'':<34} worst overshoot {most - limit:+d} ({100 * (most - limit) / limit:+.2f} %), "
        f"worst undershoot {max(0, limit - fewest)} (fewest {fewest}, {100 * (fewest - limit) / limit:+.2f} %): "
        f"{verdict}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="global_limit per window (default 2000)")
    parser.add_argument("--window", type=float, default=1.0, help="window in seconds (default 1)")
    parser.add_argument("--windows", type=int, default=12, help="windows of load (default 12; 10 complete)")
    parser.add_argument("--instances", type=int, default=2, help="proxy instances (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="workers per instance (default 2)")
    parser.add_argument("--load", type=float, default=3.0, help="offered load, x limit per window (default 3)")
    args = parser.parse_args(argv)
    limit, window = args.limit, args.window
    bar = f"bar: {UNDER * limit:.0f} <= admitted <= {OVER * limit + SLACK:.0f} per window"
    print(f"global_limit {limit} per {window:g}s window, {args.instances} instances x {args.workers} workers, ", end="")
    print(f"offered {args.load:g} x limit; {bar}")
    with tempfile.TemporaryDirectory(prefix="uvgate-accuracy-") as tmp, Stack(run_dir=Path(tmp)) as stack:
        stack.start(redis=True, backend=True)
        result = run_live(
            stack,
            limit=limit,
            window=window,
            windows=args.windows,
            instances=args.instances,
            workers=args.workers,
            load=args.load,
        )
    print(f"responses by status: {dict(sorted(result.statuses.items()))}; client errors: {len(result.errors)}")
    print(_line("uvgate (live)", result.counts, limit))
    workers = args.instances * args.workers
    common: dict[str, Any] = {
        "workers": workers,
        "host_workers": args.workers,
        "limit": limit,
        "length": window,
        "load": args.load,
        "interval": 0.01,
        "rtt": 0.0005,
        "windows": args.windows,
    }
    print(_line("uvgate accounting (simulated)", simulate(**common), limit))
    print(_line("naive batching (simulated)", simulate(**common, naive=True), limit))
    print(f"naive bound: workers x rate x interval = {workers} x {args.load * limit / window / workers:g}/s x 0.01 s")
    return 0 if within_bar(result.counts, limit) else 1


if __name__ == "__main__":
    sys.exit(main())
