"""JWKS: the signing keys of a JWT issuer, fetched at boot and refreshed in the background, per worker.

Theory of operation. `JwksSource` owns `keys` (kid -> `SigningKey`); it is their only writer. The
first fetch runs before the worker reports ready (`boot`). After that a fetch starts from the worker
tick every `jwks_refresh`, or, after a failure, with a backoff from 1 s up to 60 s (and never beyond
`jwks_refresh`), so a worker that booted without keys keeps trying. A failed fetch (refused, timed
out, not 200, too large, not a JWKS, no usable key) keeps the last good keys, is counted, and is
logged at most once a minute with the number of failures meanwhile; the recovery is logged too.

A token whose `kid` is not among the keys asks `unknown_kid`. With a fetch in flight the exchange
parks on `waiters` (a `WaitList`, with `jwks_wait` as its deadline: 503 `jwks_refresh_timeout`); every
fetch, good or bad, wakes them all when it ends and their step runs again. Without one, an unknown
kid starts a fetch only if the last fetch that an unknown kid started is `jwks_cooldown` old or more;
otherwise the kid is answered at once (401 `unknown signing key` while the keys are fresh, 503
`jwks_unavailable` while fetching fails) and remembered as unknown for the cooldown, so a stream of
tokens with made-up kids costs one fetch per cooldown, never one per request. An unknown kid that
arrives while a fetch not started by an unknown kid is in flight (the periodic one: it may have left
the issuer before the new key was published) books the next fetch to follow at once, within the same
cooldown budget.

At most one fetch is in flight; it is a task on the worker's loop (`fetch.request`), never a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from jwt import PyJWK, PyJWKError

from proxy.auth.fetch import Endpoint, FetchError, request
from proxy.auth.step import JWKS_REFRESH_TIMEOUT, JWKS_UNAVAILABLE, WAIT_VERDICT, Verdict, invalid_token
from proxy.config import JwtConfig
from proxy.errors import ServiceUnavailable
from proxy.exchange import Exchange, WaitList

if TYPE_CHECKING:
    from proxy.server import WorkerState

log = logging.getLogger("uvgate.auth.jwks")

LOG_EVERY = 60.0  # seconds between two log lines about failing fetches
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
UNKNOWN_KIDS_MAX = 1024  # kids remembered as unknown (cleared when full: a bound, not a policy)

# Which key types and curves may verify which algorithms (a key never verifies another family's tokens).
_FAMILIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("RSA", ""): ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
    ("OKP", "Ed25519"): ("EdDSA",),
    ("OKP", "Ed448"): ("EdDSA",),
}

Fetcher = Callable[[], Awaitable[bytes]]


class SigningKey:
    """One public key of the set and the algorithms it may verify."""

    __slots__ = ("algorithms", "key", "kid")

    def __init__(self, kid: str, key: Any, algorithms: frozenset[str]) -> None:
        self.kid = kid
        self.key = key  # a cryptography public key object, as pyjwt takes it
        self.algorithms = algorithms


def parse_jwks(document: bytes, allowed: frozenset[str]) -> dict[str, SigningKey]:
    """The usable keys of a JWKS document: signature keys with a kid, of a type that verifies one of the
    `allowed` algorithms (a JWK's own `alg`, when present, is the only one it may verify). Raises
    ValueError when the document is not a JWKS or has no usable key."""
    try:
        data = orjson.loads(document)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('not a JWKS (no "keys" list)')
    keys: dict[str, SigningKey] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("kid"), str):
            continue
        family = _FAMILIES.get((str(jwk.get("kty")), str(jwk.get("crv", "")) if jwk.get("kty") != "RSA" else ""))
        if family is None:
            continue
        algorithms = frozenset(family) & allowed
        if "alg" in jwk:
            algorithms &= {jwk["alg"]}
        if not algorithms:
            continue
        try:
            key = PyJWK(jwk, algorithm=min(algorithms)).key
        except (PyJWKError, ValueError, TypeError, KeyError):
            continue
        keys[jwk["kid"]] = SigningKey(jwk["kid"], key, algorithms)
    if not keys:
        raise ValueError("no usable signing key")
    return keys


class JwksSource:
    """The worker's view of the issuer's JWKS: keys, the fetch in flight, the exchanges waiting for it."""

    def __init__(self, config: JwtConfig, realm: str, state: WorkerState, fetcher: Fetcher | None = None) -> None:
        self.config = config
        self.state = state
        self.allowed = frozenset(config.algorithms)
        endpoint = Endpoint.parse(config.jwks_url, config.jwks_ca_file)
        self._fetcher = fetcher or (lambda: _get_jwks(endpoint, config))
        self.keys: dict[str, SigningKey] = {}
        self.loaded_at = 0.0  # Unix time of the last good fetch (0: never)
        self.ok = False  # the last fetch succeeded
        self.waiters = WaitList()
        self.task: asyncio.Task[None] | None = None
        self.task_by_kid = False  # the fetch in flight was started by an unknown kid
        self.follow_up = False  # fetch again as soon as the one in flight ends
        self.last_kid_fetch = -float("inf")  # loop time an unknown kid last started (or booked) a fetch
        self.unknown: dict[str, float] = {}  # kid -> loop time until which it is answered without a fetch
        self.next_fetch = float("inf")  # loop time of the next scheduled fetch
        self.failures = 0  # consecutive failed fetches
        # Counters (for tests and metrics).
        self.fetches = 0
        self.failed = 0
        self._unlogged = 0
        self._last_log = -float("inf")
        self.refresh_timeout = ServiceUnavailable(JWKS_REFRESH_TIMEOUT, headers=((b"retry-after", b"1"),))
        self.unavailable = Verdict(0.0, error=ServiceUnavailable(JWKS_UNAVAILABLE, headers=((b"retry-after", b"1"),)))
        self.unknown_key = Verdict(0.0, error=invalid_token(realm, "unknown signing key (kid)"))

    # ------------------------------------------------------------------ lifecycle

    async def boot(self) -> str | None:
        """The first fetch, awaited (before the worker reports ready): None if it succeeded, else why not.
        Either way the refresh schedule is set."""
        self.task = asyncio.current_task()
        try:
            return await self._fetch()
        finally:
            self.task = None

    def tick(self, now: float) -> None:
        """Worker tick: start the scheduled fetch when due."""
        if self.task is None and now >= self.next_fetch:
            self._start(by_kid=False)

    def close(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    # ------------------------------------------------------------------ the request path (misses only)

    def unknown_kid(self, exchange: Exchange, kid: str) -> Verdict:
        """A token names a key not in the set: park the exchange for a fetch, or answer."""
        now = self.state.now
        if self.task is not None:
            if not self.task_by_kid and not self.follow_up and now - self.last_kid_fetch >= self.config.jwks_cooldown:
                self.follow_up = True
                self.last_kid_fetch = now
            self.waiters.park(exchange, self.config.jwks_wait, self.refresh_timeout)
            return WAIT_VERDICT
        until = self.unknown.get(kid)
        if until is None or until <= now:
            if now - self.last_kid_fetch >= self.config.jwks_cooldown:
                self.last_kid_fetch = now
                self._start(by_kid=True)
                self.waiters.park(exchange, self.config.jwks_wait, self.refresh_timeout)
                return WAIT_VERDICT
            if len(self.unknown) >= UNKNOWN_KIDS_MAX:
                self.unknown.clear()
            self.unknown[kid] = now + max(self.config.jwks_cooldown, 1.0)
        return self.unknown_key if self.ok else self.unavailable

    # ------------------------------------------------------------------ fetching

    def _start(self, *, by_kid: bool) -> None:
        self.task_by_kid = by_kid
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._fetch()
        finally:
            self.task = None
            if self.follow_up:
                self.follow_up = False
                if self.ok:
                    self._start(by_kid=True)
            self.waiters.wake_all()

    async def _fetch(self) -> str | None:
        self.fetches += 1
        started = time.monotonic()
        try:
            keys = parse_jwks(await self._fetcher(), self.allowed)
        except (FetchError, ValueError) as exc:
            self._failed(str(exc), time.monotonic() - started)
            return str(exc)
        recovered = self.failures > 0
        self.keys = keys
        self.ok = True
        self.loaded_at = time.time()
        self.failures = 0
        self.unknown.clear()
        self.next_fetch = self.state.loop.time() + self.config.jwks_refresh
        if recovered:
            log.warning(
                "JWKS %s fetched again: %d keys (after %d failed fetches)", self.config.jwks_url, len(keys), self.failed
            )
        return None

    def _failed(self, reason: str, took: float) -> None:
        self.ok = False
        self.failures += 1
        self.failed += 1
        delay = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX, self.config.jwks_refresh)
        now = self.state.loop.time()
        self.next_fetch = now + delay
        if now - self._last_log < LOG_EVERY:
            self._unlogged += 1
            return
        self._last_log = now
        kept = (
            f"keeping the {len(self.keys)} keys of {time.time() - self.loaded_at:.0f}s ago"
            if self.keys
            else "no keys yet"
        )
        more = f"; {self._unlogged} more failures since the last report" if self._unlogged else ""
        self._unlogged = 0
        log.warning(
            "JWKS fetch from %s failed after %.1fs: %s (%s; next try in %.0fs%s)",
            self.config.jwks_url,
            took,
            reason,
            kept,
            delay,
            more,
        )


async def _get_jwks(endpoint: Endpoint, config: JwtConfig) -> bytes:
    status, body = await request(
        endpoint,
        headers=(("Accept", "application/json"), ("User-Agent", "uvgate")),
        timeout=config.jwks_timeout,
        max_bytes=config.jwks_max_bytes,
    )
    if status != 200:
        raise FetchError(f"HTTP {status}")
    return body
