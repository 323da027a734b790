"""Helpers of the auth tests: tokens from a running auth_stub, requests with them, JWT surgery."""

from __future__ import annotations

import base64
from typing import Any

from devstack import Service, raw_request
from devstack.net import http_post_json
from devstack.rawhttp import RawResponse

DEV_SECRET = "uvgate-auth-stub-development-secret-not-for-production"  # auth_stub's default HS256 secret


def mint(auth: Service, **fields: Any) -> str:
    """A token from auth_stub's POST /token (api_key "k1" and RS256 unless given)."""
    fields.setdefault("api_key", "k1")
    status, answer = http_post_json(auth.url + "/token", fields)
    assert status == 200, answer
    token: str = answer["access_token"]
    return token


def get(proxy: Service, path: str, token: str | None = None, *headers: tuple[str, str]) -> RawResponse:
    """GET through `proxy`, with `Authorization: Bearer <token>` when given (or an Authorization header
    among `headers`)."""
    pairs = list(headers)
    if token is not None:
        pairs.append(("Authorization", f"Bearer {token}"))
    return raw_request(proxy.host, proxy.port, "GET", path, headers=pairs, timeout=10.0)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_signature_of(token: str, other: str) -> str:
    """`token` carrying the signature of `other` (well-formed, and wrong)."""
    return token.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


def challenge(response: RawResponse) -> str:
    return response.header("www-authenticate") or ""
