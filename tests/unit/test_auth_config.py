"""[auth.jwt], [auth.introspect] and route auth settings: what the config check accepts and how it names
each problem."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.config import build
from proxy.errors import ConfigError

SECRET = "s" * 32
BASE: dict[str, Any] = {
    "upstreams": {"backend": {"servers": ["127.0.0.1:8000"]}},
    "routes": [{"prefix": "/api/", "upstream": "backend", "auth": "jwt"}],
    "auth": {
        "jwt": {
            "algorithms": ["RS256", "ES256"],
            "jwks_url": "http://127.0.0.1:8001/.well-known/jwks.json",
            "forward_claims": {"api_key": "X-Api-Key", "sub": "X-Auth-Subject"},
        }
    },
}


def config(**changes: Any) -> dict[str, Any]:
    """BASE with `auth.jwt` keys changed (None removes one)."""
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            data["auth"]["jwt"].pop(key, None)
        else:
            data["auth"]["jwt"][key] = value
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        build(data)
    return {key: reason for key, _, reason in info.value.problems}


def test_a_complete_jwt_section_is_read_with_its_defaults() -> None:
    auth = build(config(issuer="iss", audience="api", leeway="10s", subject_claim="api_key")).auth
    assert auth.jwt is not None and auth.realm == "uvgate"
    assert (auth.jwt.algorithms, auth.jwt.issuer, auth.jwt.audience, auth.jwt.leeway) == (
        ("RS256", "ES256"),
        "iss",
        ("api",),
        10.0,
    )
    assert auth.jwt.forward_claims == (("api_key", "x-api-key"), ("sub", "x-auth-subject"))
    assert (auth.jwt.cache_size, auth.jwt.jwks_refresh, auth.jwt.jwks_boot) == (100_000, 300.0, "serve")
    assert auth.identity_headers() == frozenset({b"x-api-key", b"x-auth-subject"})


@pytest.mark.parametrize("none", ["none", "None", "NONE"])
def test_the_none_algorithm_is_refused(none: str) -> None:
    assert "never accepted" in problems(config(algorithms=["RS256", none]))["auth.jwt.algorithms"]


def test_unknown_algorithms_are_named() -> None:
    assert "'XS256'" in problems(config(algorithms=["XS256"]))["auth.jwt.algorithms"]


def test_a_jwt_route_needs_the_jwt_table() -> None:
    data = copy.deepcopy(BASE)
    del data["auth"]
    assert problems(data) == {"routes[0].auth": "needs an [auth.jwt] table"}


def test_an_introspect_route_needs_its_table() -> None:
    data = copy.deepcopy(BASE)
    data["routes"][0]["auth"] = "introspect"
    assert problems(data) == {"routes[0].auth": "needs an [auth.introspect] table"}


def test_hs256_needs_a_secret_of_32_bytes_and_the_secret_is_never_shown() -> None:
    assert problems(config(algorithms=["HS256"], jwks_url=None)) == {"auth.jwt.secret": "is required for HS256"}
    with pytest.raises(ConfigError) as info:
        build(config(algorithms=["HS256"], jwks_url=None, secret="short-secret"))
    ((key, value, reason),) = info.value.problems
    assert key == "auth.jwt.secret" and "at least 32 bytes" in reason
    assert "short-secret" not in str(value) and "short-secret" not in str(info.value)
    assert build(config(algorithms=["HS256"], jwks_url=None, secret=SECRET)).auth.jwt is not None
    assert SECRET not in repr(build(config(algorithms=["HS256"], jwks_url=None, secret=SECRET)))


def test_key_algorithms_need_a_jwks_url_and_it_must_be_http() -> None:
    assert problems(config(jwks_url=None)) == {"auth.jwt.jwks_url": "is required for RS256, ES256"}
    assert "http:// or https://" in problems(config(jwks_url="ftp://x/jwks"))["auth.jwt.jwks_url"]
    assert build(config(jwks_url="https://idp.example.com:8443/keys")).auth.jwt is not None


def test_forwarded_claim_headers_are_checked() -> None:
    found = problems(config(forward_claims={"sub": "Authorization", "api_key": "Connection", "x": "X-Req id"}))
    assert found["auth.jwt.forward_claims.sub"] == "a header the proxy reads or sets itself"
    assert "manages itself" in found["auth.jwt.forward_claims.api_key"]
    assert found["auth.jwt.forward_claims.x"] == "not a valid header name"
    twice = problems(config(forward_claims={"sub": "X-Who", "api_key": "x-who"}))
    assert "already the header" in twice["auth.jwt.forward_claims.api_key"]


def test_route_scopes_need_an_auth_route_and_unknown_keys_are_named() -> None:
    data = copy.deepcopy(BASE)
    data["routes"][0].update(auth="none", required_scope="read")
    assert problems(data) == {"routes[0].required_scope": 'needs auth = "jwt" or "introspect"'}
    data["routes"][0].update(auth="jwt", required_scope="read write")
    assert build(data).routes[0].required_scope == ("read", "write")
    assert problems(config(jwks_boot="maybe"))["auth.jwt.jwks_boot"] == 'expected "serve" or "require"'
    assert problems(config(cache_sise=10)) == {"auth.jwt.cache_sise": "unknown key"}


def test_introspection_section() -> None:
    data = copy.deepcopy(BASE)
    data["routes"][0]["auth"] = "introspect"
    data["auth"] = {"introspect": {"url": "http://127.0.0.1:8001/introspect", "client_id": "gw"}}
    assert problems(data) == {"auth.introspect.client_id": "client_id and client_secret go together"}
    data["auth"]["introspect"]["client_secret"] = "pw"
    introspect = build(data).auth.introspect
    assert introspect is not None and (introspect.cache_ttl, introspect.timeout) == (300.0, 5.0)
    del data["auth"]["introspect"]["url"]
    assert problems(data)["auth.introspect.url"] == "is required"
