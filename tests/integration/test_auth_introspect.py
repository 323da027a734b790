"""Opaque-token routes end to end: the live proxy asks the real auth_stub's RFC 7662 endpoint."""

from __future__ import annotations

from devstack import ProxyFactory, Service
from tests.integration.authhelp import challenge, get, mint

CONFIG = {
    "auth": {
        "introspect": {
            "url": "http://127.0.0.1:1/introspect",  # devstack points it at the auth_stub
            "subject_claim": "client_id",
            "forward_claims": {"client_id": "X-Client-Id", "scope": "X-Auth-Scope"},
        }
    },
    "upstreams": {"backend": {"servers": ["127.0.0.1:1"]}},
    "routes": [
        {"prefix": "/echo", "upstream": "backend", "auth": "introspect"},
        {"prefix": "/api/", "upstream": "backend", "auth": "introspect", "required_scope": "admin"},
    ],
}


def test_active_tokens_pass_with_their_identity_and_inactive_ones_get_401(
    auth_stub: Service, backend_stub: Service, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(CONFIG)
    token = mint(auth_stub, api_key="opaque-client", scope="read")
    for _ in range(2):
        response = get(proxy, "/echo", token, ("X-Client-Id", "forged"))
        assert response.status == 200, response.body
        headers = response.json()["headers"]
        assert (headers["x-client-id"], headers["x-auth-scope"]) == ("opaque-client", "read")
    assert get(proxy, "/api/x", token).status == 403
    for inactive in (mint(auth_stub, ttl=-5), "not-a-token-auth-stub-knows"):
        response = get(proxy, "/echo", inactive)
        assert response.status == 401
        assert challenge(response) == (
            'Bearer realm="uvgate", error="invalid_token", error_description="the token is not active"'
        )
    assert challenge(get(proxy, "/echo")) == 'Bearer realm="uvgate"'
