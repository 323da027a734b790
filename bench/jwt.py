"""The `jwt` scenario: a JWT route in the proxy config, auth_stub tokens, the check that they pass.

The proxy gets the template's routes plus `[auth.jwt]` (RS256 and ES256 from auth_stub's JWKS; devstack
points jwks_url at the auth_stub it started) and one more route, chosen by `Host: jwt.bench`, with the
same prefix and upstream as the template's `/api/` route and `auth = "jwt"`. The `proxy` target sends
the same tokens to the `/api/` route without auth, the `jwt` target to the JWT route: same request
bytes but for the Host value, same backend answer, so the difference of the two rows is what checking
the token (a warm cache: 1,000 tokens, each verified once per worker) and forwarding the identity cost.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from devstack import RawHTTPConnection, RawResponse
from devstack.net import StackError, http_post_json

JWT_HOST = "jwt.bench"
TOKENS = 1000

AUTH_JWT: dict[str, Any] = {
    "algorithms": ["RS256", "ES256"],
    "jwks_url": "http://127.0.0.1:1/.well-known/jwks.json",  # devstack puts auth_stub's address here
    "issuer": "uvgate-auth-stub",
    "audience": "uvgate",
    "leeway": "30s",
    "subject_claim": "api_key",
    "forward_claims": {"api_key": "X-Api-Key", "sub": "X-Auth-Subject", "scope": "X-Auth-Scope"},
}


def with_jwt_route(template: dict[str, Any], prefix: str = "/api/") -> dict[str, Any]:
    """A copy of `template` with `[auth.jwt]` and a JWT route (Host `jwt.bench`) beside its `prefix` route."""
    data = copy.deepcopy(template)
    data["auth"] = {"jwt": copy.deepcopy(AUTH_JWT)}
    routes = data.get("routes", [])
    plain = next((route for route in routes if route.get("prefix") == prefix), None)
    if plain is None:
        raise StackError(f"the bench config has no {prefix} route to put a JWT route beside")
    routes.append({"prefix": prefix, "upstream": plain["upstream"], "host": JWT_HOST, "auth": "jwt"})
    return data


def mint_tokens(auth_url: str, path: Path, count: int = TOKENS, alg: str = "RS256") -> Path:
    """`count` distinct tokens (api keys bench-0000...) from auth_stub's POST /token, one a line, valid 6 h."""
    tokens = []
    for index in range(count):
        status, answer = http_post_json(
            auth_url + "/token", {"api_key": f"bench-{index:04d}", "alg": alg, "scope": "read", "ttl": 6 * 3600}
        )
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise StackError(f"POST {auth_url}/token answered {status}: {answer!r}")
        tokens.append(answer["access_token"])
    path.write_text("\n".join(tokens) + "\n", encoding="ascii")
    return path


def check_jwt_route(host: str, port: int, path: str, token: str) -> None:
    """The JWT route answers 200 to a token and 401 without one; StackError otherwise."""
    with_token = _get(host, port, path, [("Authorization", f"Bearer {token}")])
    without = _get(host, port, path, [])
    if with_token.status != 200 or without.status != 401:
        raise StackError(
            f"the JWT route answered {with_token.status} with a token and {without.status} without one "
            f"(expected 200 and 401): {with_token.body[:200]!r}"
        )


def _get(host: str, port: int, path: str, headers: list[tuple[str, str]]) -> RawResponse:
    with RawHTTPConnection(host, port, timeout=5.0) as conn:
        conn.request("GET", path, host=JWT_HOST, headers=headers)
        return conn.read_response()
