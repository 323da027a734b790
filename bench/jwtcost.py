"""`python -m bench.jwtcost`: what a token costs the proxy, measured in-process on the proxy's own code.

- cold: the first sight of a token in a worker: `JwtAuthority.authenticate` on tokens it has never seen
  (header parse, signature and claims by pyjwt, the identity made and cached), in µs per token, for HS256,
  RS256 and ES256 tokens minted by auth_stub's issuer; the keys come from a JWKS document through the
  proxy's `JwksSource`, as in a worker.
- warm: the route step on a token already cached (`AuthStep.check`: the key's slice, one dict lookup, the
  compare of the whole Authorization value (a new bytes object per request, as from the parser) and of
  the deadline, the identity applied to the exchange: the subject and three forwarded claims as header
  lines), in ns per request.

Each figure is the median of `--rounds` rounds (fresh tokens every cold round). The numbers are CPU time on
this machine with whatever else runs on it; `make bench ARGS="--scenario jwt"` gives the end-to-end cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson
import uvloop

from auth_stub.issuer import KeyRing, TokenIssuer
from proxy.auth.jwks import JwksSource
from proxy.auth.jwt import JwtAuthority
from proxy.auth.step import AuthStep
from proxy.config import build
from proxy.exchange import Downstream, Exchange
from proxy.server import WorkerState

SECRET = "bench-jwtcost-secret-of-at-least-32-bytes"
ALGS = ("HS256", "RS256", "ES256")


def _config() -> Any:
    return build(
        {
            "auth": {
                "jwt": {
                    "algorithms": list(ALGS),
                    "secret": SECRET,
                    "jwks_url": "http://127.0.0.1:1/jwks",
                    "issuer": "uvgate-auth-stub",
                    "audience": "uvgate",
                    "subject_claim": "api_key",
                    "forward_claims": {"api_key": "X-Api-Key", "sub": "X-Auth-Subject", "scope": "X-Auth-Scope"},
                    "cache_size": 1_000_000,
                }
            },
            "upstreams": {"backend": {"servers": ["127.0.0.1:1"]}},
            "routes": [{"prefix": "/", "upstream": "backend", "auth": "jwt"}],
        }
    )


async def _measure(tokens: int, rounds: int, hits: int) -> dict[str, dict[str, float]]:
    config = _config()
    keys = KeyRing(grace=300)
    issuer = TokenIssuer(keys, hs_secret=SECRET)
    document = orjson.dumps(keys.jwks())

    async def fetch() -> bytes:
        return document

    state = WorkerState(asyncio.get_running_loop(), config)
    jwks = JwksSource(config.auth.jwt, "bench", state, fetcher=fetch)
    assert await jwks.boot() is None
    authority = JwtAuthority(config.auth.jwt, "bench", jwks)
    step = AuthStep(authority, ("read",), "bench")
    exchange = Exchange(
        worker=state,
        downstream=Downstream(),  # (never called: the exchange only carries the token)
        method=b"GET",
        target=b"/api/resource",
        host=b"h",
        headers=[],
        request_id=b"1",
        forward_lines=b"",
        client=b"127.0.0.1",
    )
    results: dict[str, dict[str, float]] = {}
    for alg in ALGS:
        cold: list[float] = []
        header = b""
        for _ in range(rounds):
            headers = [
                b"Bearer "
                + issuer.mint({"api_key": f"k{i}", "alg": alg, "scope": "read write"})["access_token"].encode()
                for i in range(tokens)
            ]
            now = time.time()
            started = time.process_time()
            for header in headers:
                verdict = authority.authenticate(exchange, header, now)
                assert verdict.error is None, verdict.error
            cold.append((time.process_time() - started) * 1e6 / tokens)
        # Each request brings its own bytes object: the dict lookup hashes the whole value every time.
        copies = [bytes(bytearray(header)) for _ in range(hits)]
        warm: list[float] = []
        empty: list[float] = []
        check = step.check
        for _ in range(rounds):
            started = time.process_time()
            for value in copies:
                exchange.forward_lines = b""
                exchange.authorization = value
            empty.append((time.process_time() - started) * 1e9 / hits)
            copies = [bytes(bytearray(header)) for _ in range(hits)]
            started = time.process_time()
            for value in copies:
                exchange.forward_lines = b""
                exchange.authorization = value
                check(exchange)
            warm.append((time.process_time() - started) * 1e9 / hits)
        results[alg] = {
            "cold_us_per_token": statistics.median(cold),
            "warm_ns_per_request": statistics.median(warm) - statistics.median(empty),
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jwtcost", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="distinct tokens per algorithm and round (300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is printed (3)")
    parser.add_argument("--hits", type=int, default=100_000, help="cached-token checks per warm round (100000)")
    args = parser.parse_args(argv)
    loop = uvloop.new_event_loop()
    try:
        results = loop.run_until_complete(_measure(args.tokens, args.rounds, args.hits))
    finally:
        loop.close()
    from proxy import compiled

    print(f"JWT cost per token, median of {args.rounds} rounds ({'compiled' if compiled() else 'pure Python'} step)")
    print(f"{'alg':<6}  {'cold µs/token':>13}  {'warm ns/request':>15}")
    for alg, values in results.items():
        print(f"{alg:<6}  {values['cold_us_per_token']:>13.1f}  {values['warm_ns_per_request']:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
