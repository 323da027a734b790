"""The Redis sync of one worker: every ledger's pending increments in one round trip.

Theory of operation. One task on the worker's loop (never a thread) runs a round trip every
`sync_interval`, and at once when a ledger asks for one early (a share ran out, a subject must learn
its count: `urge` sets an event; the hot path never awaits). A round trip takes every ledger's batch
and has Redis run, per key, `INCRBY key n` (n may be 0: learning costs the same command), `PEXPIRE key
ttl` the first time this worker touches the key in its window, and for sliding windows `GET` of the
previous window's key; the totals go back to the ledgers (`apply`) and the parked exchanges are
woken. Those commands go as one Lua script (`SYNC_SCRIPT`, EVALSHA: one command to encode and one
array to parse, where a pipeline of a window edge's thousands of commands cost redis-py tens of ms of
the worker's loop, awaiting each reply), or, to a Cluster, as one non-transactional pipeline (a script
must keep to one slot). Keys are `<key_prefix>{<route>|<limit>|<subject>}:<window>`: the hash tag
keeps a subject's windows on one Cluster slot, so redis-py's cluster pipeline sends one request per
node holding a slot of the batch. A round trip is bounded by `timeout` (connecting included). When it
fails (refused, reset, slower than `timeout`, any error of the client), its increments are dropped
(Redis may have applied them), the client is dropped (the next attempt reconnects), `SyncHealth.up`
goes false, the parked exchanges are woken (the steps then serve on local limits, or answer 503, per
`failure_mode`), and attempts continue with backoff (doubling from `sync_interval` to
`MAX_BACKOFF`), a PING when there is nothing to send, until one succeeds: `up` again. With nothing to
send while up, a PING every `PROBE_EVERY` seconds notices an outage that no increment would (a subject
refused from its known count sends nothing), and every 2 x `sync_interval` + `timeout` while a ledger
holds deferred increments (subjects far from their limit admit without round trips). Failures are
counted and logged at most once per `LOG_EVERY` seconds; the recovery is logged once. A command that
Redis refuses within an answered round trip (a counter key holding something else than an integer)
fails that key only: it is logged the same way, the key is deleted (keys under `key_prefix` are the
proxy's) and its subject learns its count again. `boot` makes
the first connection before the worker reports ready (a cold client pays imports and a handshake that
would not fit a round trip's budget) and then starts the loop; a failure there is a failure like any.
For the metrics (read by `proxy.metricsio.WorkerMetrics.fold`): `latency`, a histogram of the round
trips made (script calls or pipelines, and PINGs, answered or failed: a timeout counts its whole budget), `errors`
(failed round trips, the boot's included) and `key_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from proxy.config import RedisConfig
from proxy.exchange import WaitList
from proxy.metrics import Histogram
from proxy.ratelimit.ledger import Ledger, Sent
from proxy.ratelimit.step import SyncHealth

log = logging.getLogger("uvgate.ratelimit")

MAX_BACKOFF = 1.0
LOG_EVERY = 10.0
# A round trip's commands, for a standalone or Sentinel Redis. Per entry two keys (the window's, and the
# previous window's or '' when the limit has fixed windows) and two arguments (the increment, and the
# key's expiry in ms or 0 when this worker set it already); the replies come in the order a pipeline of
# the same commands would give them, a command's own error (pcall) in its place.
SYNC_SCRIPT = """
local out = {}
local n = 0
for i = 1, #KEYS, 2 do
  n = n + 1
  out[n] = redis.pcall('INCRBY', KEYS[i], ARGV[i])
  if ARGV[i + 1] ~= '0' then
    n = n + 1
    out[n] = redis.pcall('PEXPIRE', KEYS[i], ARGV[i + 1])
  end
  if KEYS[i + 1] ~= '' then
    n = n + 1
    out[n] = redis.pcall('GET', KEYS[i + 1])
  end
end
return out
"""
BOOT_TIMEOUT = 2.0
PROBE_EVERY = 1.0  # with nothing to send, a PING this often: an outage is noticed (and the link kept warm)


class _Book:
    """A ledger and how its keys are named and expire."""

    __slots__ = ("base", "ledger", "ttl_ms")

    def __init__(self, ledger: Ledger, base: bytes, ttl_ms: int) -> None:
        self.ledger = ledger
        self.base = base
        self.ttl_ms = ttl_ms

    def key(self, subject: bytes, window: int) -> bytes:
        """The counter key of `subject` in `window` (`base` ends with the hash tag's opening)."""
        return b"%s%s}:%d" % (self.base, subject, window)


def make_client(config: RedisConfig) -> Any:
    """A redis-py asyncio client for `config.url`: standalone, Cluster (`cluster`) or Sentinel's master.
    No retries of its own: the sync's timeout and backoff decide."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
    }
    if config.url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(config.url)
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host.strip("[]"), int(port or 26379)))
        path = [piece for piece in parts.path.split("/") if piece]
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, socket_timeout=config.timeout, socket_connect_timeout=config.timeout
        )
        db = int(path[1]) if len(path) > 1 else 0
        return sentinel.master_for(path[0], db=db, password=password, retry=Retry(NoBackoff(), 0), **options)
    if config.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(config.url, retry=Retry(NoBackoff(), 0), **options)
    return Redis.from_url(config.url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **options)


class RedisSync:
    """Sends the worker's ledgers' increments to Redis and brings the totals back (see the module doc)."""

    def __init__(self, config: RedisConfig, loop: asyncio.AbstractEventLoop, health: SyncHealth, waiters: WaitList):
        self.config = config
        self.loop = loop
        self.health = health
        self.waiters = waiters
        self.books: list[_Book] = []
        self.client: Any = None
        self.script: Any = None  # SYNC_SCRIPT registered (redis-py loads it again when Redis lost it)
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.round_trips = 0
        self.errors = 0  # failed round trips, all told
        self.key_errors = 0  # commands Redis refused within answered round trips
        self.latency = Histogram()  # seconds per round trip made, answered or failed
        self._next_key_log = 0.0
        self._unlogged = 0  # failures since the last log line
        self._next_log = 0.0
        self._answered = 0.0  # time.monotonic() of the last answer
        self._closing: set[asyncio.Task[None]] = set()  # clients of failed round trips being closed

    def add(self, ledger: Ledger, route: str, limit: str) -> None:
        """Sync `ledger`, the counters of `limit` on `route`."""
        base = b"%s{%s|%s|" % (self.config.key_prefix.encode(), route.encode(), limit.encode())
        self.books.append(_Book(ledger, base, int(ledger.length * 2000) + 1000))

    def urge(self) -> None:
        """A ledger wants a round trip now (called from the hot path: sets an event, nothing more)."""
        self.event.set()

    async def boot(self) -> None:
        """Connect before the worker serves (redis-py's modules imported, the first connection made and the
        script loaded, within `BOOT_TIMEOUT` or the round-trip timeout if longer), then start the sync. A
        failure is logged and the worker serves per failure_mode while the sync retries with backoff."""
        self.client = make_client(self.config)
        try:
            await asyncio.wait_for(self._warm(self.client), max(BOOT_TIMEOUT, self.config.timeout))
        except Exception as exc:  # whatever the client raised: Redis is not usable yet
            self._failed(exc)
        self.task = self.loop.create_task(self._run())

    async def _warm(self, client: Any) -> None:
        """The first connection, and the script loaded (the first round trip would otherwise find it missing)."""
        await client.ping()
        if not self.config.cluster:
            await client.script_load(SYNC_SCRIPT)

    async def close(self) -> None:
        """Stop: one last round trip for what is pending (within the timeout), then close the client."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.health.up:
            await self.round_trip(final=True)
        await self._drop_client()

    async def _run(self) -> None:
        interval = self.config.sync_interval
        backoff = 0.0
        while True:
            if backoff:
                await asyncio.sleep(backoff)
            elif not self.event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.event.wait(), interval)
            self.event.clear()
            try:
                answered = await self.round_trip()
            except Exception as exc:  # a bug past the client: never let it end the sync of the worker
                log.exception("rate-limit sync: unexpected error")
                self._failed(exc)
                answered = False
            backoff = 0.0 if answered else min(MAX_BACKOFF, max(interval, backoff * 2))

    async def round_trip(self, final: bool = False) -> bool:
        """One sync: True when Redis answered (or there was nothing to send while healthy). `final` (the
        last, at close) sends every pending increment, the deferred ones too."""
        wall = math.inf if final else time.time()
        batches = [book.ledger.take_batch(wall) for book in self.books]
        if not any(batches) and self.health.up:
            # Nothing to send: a PING now and then tells an outage. Ledgers holding deferred increments
            # (admitting without a round trip) probe every share life, so that failure_mode acts in time.
            holding = any(book.ledger.holds() for book in self.books)
            every = 2 * self.config.sync_interval + self.config.timeout if holding else PROBE_EVERY
            if time.monotonic() - self._answered < every:
                return True
        started = time.perf_counter()
        try:
            replies = await asyncio.wait_for(self._send(batches), self.config.timeout)
        except asyncio.CancelledError:
            self._forget(batches)
            raise
        except Exception as exc:  # any failure of the round trip is Redis failing, whatever the client raised
            self.latency.observe(time.perf_counter() - started)
            self._forget(batches)
            self._failed(exc)
            return False
        self.latency.observe(time.perf_counter() - started)
        self.round_trips += 1
        self._answered = time.monotonic()
        wall = time.time()
        position = 0
        broken: list[bytes] = []
        for book, batch in zip(self.books, batches, strict=True):
            ledger = book.ledger
            answered: list[Sent] = []
            refused: list[Sent] = []
            totals: list[int] = []
            previous: list[int] | None = [] if ledger.sliding else None
            for sent in batch:
                total = replies[position]
                position += 2 if sent.expire else 1
                value = replies[position] if previous is not None else None
                position += 1 if previous is not None else 0
                if isinstance(total, Exception) or isinstance(value, Exception):
                    refused.append(sent)  # e.g. a key that holds no integer: that key only
                    self._key_error(sent, total if isinstance(total, Exception) else value)
                    broken.append(book.key(sent.subject, sent.window))
                    broken.append(book.key(sent.subject, sent.window - 1))
                    continue
                answered.append(sent)
                totals.append(int(total))
                if previous is not None:
                    previous.append(int(value) if value is not None else 0)
            ledger.apply(answered, totals, previous, wall)
            if refused:
                ledger.failed(refused)
        if broken:
            await self._reset(broken)
        if not self.health.up:
            self.health.set(True)
            log.warning("Redis %s answers again: global limits enforced again", self._where())
        self.waiters.wake_all()
        return True

    async def _reset(self, keys: list[bytes]) -> None:
        """Delete counter keys that hold something else than a count (they are ours: under key_prefix), so
        that their subjects are counted again from the next round trip; bounded by the timeout, failures
        ignored (the next round trip tries again)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pipe.execute(raise_on_error=False), self.config.timeout)

    async def _send(self, batches: list[list[Sent]]) -> list[Any]:
        client = self.client
        if client is None:
            client = self.client = make_client(self.config)
        if not any(batches):
            await client.ping()
            return []
        if self.config.cluster:
            pipe = client.pipeline(transaction=False)
            for book, batch in zip(self.books, batches, strict=True):
                sliding = book.ledger.sliding
                for sent in batch:
                    key = book.key(sent.subject, sent.window)
                    pipe.incrby(key, sent.count)
                    if sent.expire:
                        pipe.pexpire(key, book.ttl_ms)
                    if sliding:
                        pipe.get(book.key(sent.subject, sent.window - 1))
            # A command's own error (say, a key that holds no integer) comes back in its place; a connection
            # error still raises.
            return list(await pipe.execute(raise_on_error=False))
        keys: list[bytes] = []
        args: list[int] = []
        for book, batch in zip(self.books, batches, strict=True):
            sliding = book.ledger.sliding
            ttl = book.ttl_ms
            for sent in batch:
                keys.append(book.key(sent.subject, sent.window))
                keys.append(book.key(sent.subject, sent.window - 1) if sliding else b"")
                args.append(sent.count)
                args.append(ttl if sent.expire else 0)
        if self.script is None:
            self.script = client.register_script(SYNC_SCRIPT)
        return list(await self.script(keys=keys, args=args, client=client))

    def _key_error(self, sent: Sent, error: object) -> None:
        """Redis refused a key's command (the round trip itself worked): counted, logged like failures."""
        self.key_errors += 1
        now = time.monotonic()
        if now >= self._next_key_log:
            self._next_key_log = now + LOG_EVERY
            log.error(
                "Redis %s refused the counter of %r in window %d (%d such errors so far): %s",
                self._where(),
                sent.subject,
                sent.window,
                self.key_errors,
                error,
            )

    def _forget(self, batches: list[list[Sent]]) -> None:
        for book, batch in zip(self.books, batches, strict=True):
            book.ledger.failed(batch)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._unlogged += 1
        was_up = self.health.up
        self.health.set(False)
        self.waiters.wake_all()
        client, self.client = self.client, None
        if client is not None:
            task = self.loop.create_task(_close_quietly(client, self.config.timeout))
            self._closing.add(task)  # held until done (the loop keeps only a weak reference)
            task.add_done_callback(self._closing.discard)
        now = time.monotonic()
        if was_up or now >= self._next_log:
            self._next_log = now + LOG_EVERY
            mode = "serving on local limits only" if not self.health.closed else "answering 503 on global limits"
            reason = str(exc) or type(exc).__name__
            log.error(
                "Redis %s sync failed (%d failures since the last report): %s; %s until it answers again",
                self._where(),
                self._unlogged,
                reason,
                mode,
            )
            self._unlogged = 0

    async def _drop_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _close_quietly(client, self.config.timeout)

    def _where(self) -> str:
        """The URL's scheme and hosts, never its credentials."""
        parts = urlsplit(self.config.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def _close_quietly(client: Any, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.aclose(), max(timeout, 0.5))
