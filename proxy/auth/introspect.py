"""Opaque bearer tokens checked against an RFC 7662 introspection endpoint (the slow path of
`auth = "introspect"`).

Theory of operation. `Introspector.authenticate` is asked about a token the route step had no valid
cached verdict for. The first request for a token starts one call (a task on the worker loop: POST
`token=...`, HTTP Basic credentials when configured) and parks on that call's `WaitList` with the
call's timeout as its deadline (503 `introspection_timeout`); requests for the same token that come
while it is in flight park on the same list: one call per token, whatever the concurrency. When the
call ends, its answer is cached and the waiters wake and run their step again, which finds it:
- `"active": true`: an identity (`step.IdentityMapper`), cached for `cache_ttl` at most and never past
  the token's `exp`;
- `"active": false` (or an active answer already past its `exp`): 401, cached for `inactive_ttl`;
- the call failed (refused, timed out, not 200, not JSON): 503 `introspection_unavailable`, cached for
  one second, so the waiters get it and a failing endpoint is not called once per request.
At most `max_inflight` calls run at once per worker; a new token beyond that is answered 503
`introspection_busy`. Failures are logged at most once a minute, without the token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from proxy.auth.fetch import Endpoint, FetchError, request
from proxy.auth.step import (
    INTROSPECTION_BUSY,
    INTROSPECTION_TIMEOUT,
    INTROSPECTION_UNAVAILABLE,
    WAIT_VERDICT,
    IdentityMapper,
    TokenCache,
    Verdict,
    first_look,
    invalid_token,
    missing_token,
)
from proxy.config import IntrospectConfig
from proxy.errors import ServiceUnavailable
from proxy.exchange import WaitList

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.server import WorkerState

log = logging.getLogger("uvgate.auth.introspect")

FAILURE_TTL = 1.0  # a failed call's 503 is reused this long for its token
LOG_EVERY = 60.0

Caller = Callable[[bytes], Awaitable[tuple[int, bytes]]]


class Introspector:
    """Per-worker introspection: caches, the calls in flight and the exchanges waiting for them."""

    def __init__(self, config: IntrospectConfig, realm: str, state: WorkerState, caller: Caller | None = None) -> None:
        self.config = config
        self.state = state
        endpoint = Endpoint.parse(config.url, config.ca_file)
        self._call: Caller = caller or (lambda token: _post(endpoint, config, token))
        self.cache = TokenCache(config.cache_size)
        self.rejected = TokenCache(config.negative_cache_size)
        self.identities = IdentityMapper(realm, config.subject_claim, config.forward_claims)
        self.inflight: dict[bytes, WaitList] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.missing = Verdict(0.0, error=missing_token(realm))
        self.malformed = invalid_token(realm, "malformed token")
        self.inactive = invalid_token(realm, "the token is not active")
        self.unavailable = ServiceUnavailable(INTROSPECTION_UNAVAILABLE, headers=((b"retry-after", b"1"),))
        self.busy = Verdict(0.0, error=ServiceUnavailable(INTROSPECTION_BUSY, headers=((b"retry-after", b"1"),)))
        self.timeout = ServiceUnavailable(INTROSPECTION_TIMEOUT, headers=((b"retry-after", b"1"),))
        # Counters (for tests and metrics).
        self.calls = 0
        self.failed = 0
        self._unlogged = 0
        self._last_log = -float("inf")

    def authenticate(self, exchange: Exchange, header: bytes, now: float) -> Verdict:
        """The verdict on an Authorization value the step's cache had nothing valid for."""
        token = first_look(self.rejected, self.missing, header, now)
        if isinstance(token, Verdict):
            return token
        if not token:
            verdict = Verdict(now + self.config.inactive_ttl, error=self.malformed)
            self.rejected.put(header, verdict, now)
            return verdict
        waiters = self.inflight.get(header)
        if waiters is None:
            if len(self.inflight) >= self.config.max_inflight:
                return self.busy
            waiters = self.inflight[header] = WaitList()
            task = asyncio.get_running_loop().create_task(self._introspect(header, token, waiters))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        waiters.park(exchange, self.config.timeout, self.timeout)
        return WAIT_VERDICT

    async def _introspect(self, header: bytes, token: bytes, waiters: WaitList) -> None:
        self.calls += 1
        try:
            answer = await self._answer(token)
        except FetchError as exc:
            self._failed(str(exc))
            now = time.time()
            self.rejected.put(header, Verdict(now + FAILURE_TTL, error=self.unavailable), now)
        else:
            self._store(header, answer)
        finally:
            del self.inflight[header]
            waiters.wake_all()

    async def _answer(self, token: bytes) -> dict[str, Any]:
        status, body = await self._call(token)
        if status != 200:
            raise FetchError(f"HTTP {status}")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FetchError("the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise FetchError('the answer has no boolean "active" (RFC 7662 2.2)')
        return answer

    def _store(self, header: bytes, answer: dict[str, Any]) -> None:
        now = time.time()
        config = self.config
        deadline = now + config.cache_ttl
        exp = answer.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            deadline = min(deadline, float(exp))
        if answer["active"] is not True or deadline <= now:
            self.rejected.put(header, Verdict(now + config.inactive_ttl, error=self.inactive), now)
            return
        verdict = self.identities.verdict(answer, deadline)
        if verdict.error is not None:
            self.rejected.put(header, Verdict(now + config.inactive_ttl, error=verdict.error), now)
            return
        self.cache.put(header, verdict, now)

    def _failed(self, reason: str) -> None:
        self.failed += 1
        now = self.state.loop.time()
        if now - self._last_log < LOG_EVERY:
            self._unlogged += 1
            return
        self._last_log = now
        more = f" ({self._unlogged} more failures since the last report)" if self._unlogged else ""
        self._unlogged = 0
        log.warning("token introspection at %s failed: %s%s", self.config.url, reason, more)

    def sweep(self, now: float) -> None:
        """Drop expired entries of both caches."""
        self.cache.sweep(now)
        self.rejected.sweep(now)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def _post(endpoint: Endpoint, config: IntrospectConfig, token: bytes) -> tuple[int, bytes]:
    headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Accept", "application/json"),
        ("User-Agent", "uvgate"),
    ]
    if config.client_id:
        credentials = f"{quote(config.client_id, safe='')}:{quote(config.client_secret, safe='')}"
        headers.append(("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()))
    body = b"token=" + quote(token.decode("ascii"), safe="").encode() + b"&token_type_hint=access_token"
    return await request(
        endpoint, method="POST", body=body, headers=tuple(headers), timeout=config.timeout, max_bytes=config.max_bytes
    )
