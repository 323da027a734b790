"""The auth services of one worker, built from the config: what `gateway.auth_steps` binds routes to.

Theory of operation: one `JwtAuthority` (with its `JwksSource` when keys come from a JWKS URL) and one
`Introspector` per worker, each present when its `[auth.*]` table is. `boot` runs the first JWKS fetch
before the worker reports ready; when it fails, `auth.jwt.jwks_boot` decides: "serve" (the default, as
Envoy and Kong do) logs it and starts anyway: JWT routes answer 503 `jwks_unavailable` (a token whose
key is known, HS* included, still passes) while the source retries with backoff; "require" raises,
so the worker fails to boot and the supervisor exits 3 with the reason. `tick` (a worker tick
subscriber) starts due JWKS fetches and sweeps expired cache entries every `SWEEP_EVERY` seconds.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from proxy.auth.step import Authority
from proxy.config import BOOT_REQUIRE, HMAC_ALGORITHMS, Config

if TYPE_CHECKING:
    from proxy.auth.introspect import Introspector
    from proxy.auth.jwks import JwksSource
    from proxy.auth.jwt import JwtAuthority
    from proxy.server import WorkerState

log = logging.getLogger("uvgate.auth")

SWEEP_EVERY = 30.0


class AuthBootError(RuntimeError):
    """The first JWKS fetch failed and `auth.jwt.jwks_boot = "require"`."""


class AuthServices:
    """The worker's authorities by route `auth` mode, and their background work."""

    def __init__(self, config: Config, state: WorkerState) -> None:
        auth = config.auth
        self.realm = auth.realm
        self.jwks: JwksSource | None = None
        self.jwt: JwtAuthority | None = None
        self.introspect: Introspector | None = None
        # Imported only when configured: pyjwt and cryptography stay out of workers that never check a token.
        if auth.jwt is not None:
            from proxy.auth.jwks import JwksSource
            from proxy.auth.jwt import JwtAuthority

            if any(alg not in HMAC_ALGORITHMS for alg in auth.jwt.algorithms):
                self.jwks = JwksSource(auth.jwt, auth.realm, state)
            self.jwt = JwtAuthority(auth.jwt, auth.realm, self.jwks)
        if auth.introspect is not None:
            from proxy.auth.introspect import Introspector

            self.introspect = Introspector(auth.introspect, auth.realm, state)
        self._next_sweep = 0.0

    @property
    def authorities(self) -> dict[str, Authority]:
        """Route `auth` mode -> its authority."""
        out: dict[str, Authority] = {}
        if self.jwt is not None:
            out["jwt"] = self.jwt
        if self.introspect is not None:
            out["introspect"] = self.introspect
        return out

    async def boot(self) -> None:
        """Fetch the JWKS once before serving (see the module docstring for a failure)."""
        if self.jwks is None:
            return
        config = self.jwks.config
        problem = await self.jwks.boot()
        if problem is None:
            log.debug("JWKS %s: %d keys", config.jwks_url, len(self.jwks.keys))
            return
        if config.jwks_boot == BOOT_REQUIRE:
            raise AuthBootError(f"auth.jwt.jwks_url: the first JWKS fetch from {config.jwks_url} failed: {problem}")
        log.warning(
            "JWKS %s unavailable at start (%s): serving; JWT routes answer 503 jwks_unavailable for tokens "
            'whose key is unknown until a fetch succeeds (auth.jwt.jwks_boot = "serve")',
            config.jwks_url,
            problem,
        )

    def tick(self, now: float) -> None:
        """Worker tick: due JWKS fetches, and now and then a sweep of expired cache entries."""
        if self.jwks is not None:
            self.jwks.tick(now)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            wall = time.time()
            if self.jwt is not None:
                self.jwt.sweep(wall)
            if self.introspect is not None:
                self.introspect.sweep(wall)

    def close(self) -> None:
        """Cancel what runs in the background."""
        if self.jwks is not None:
            self.jwks.close()
        if self.introspect is not None:
            self.introspect.close()
