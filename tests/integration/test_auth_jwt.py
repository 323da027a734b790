"""JWT routes end to end: the live proxy (devstack), real auth_stub tokens (HS256, RS256, ES256) and keys."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, Service, Stack, free_port, http_get
from devstack.net import http_post_json
from tests.integration.authhelp import DEV_SECRET, b64, challenge, get, mint, with_signature_of

JWT_TABLE: dict[str, Any] = {
    "algorithms": ["RS256", "ES256", "HS256"],
    "secret": DEV_SECRET,
    "jwks_url": "http://127.0.0.1:1/.well-known/jwks.json",  # devstack points it at the auth_stub
    "issuer": "uvgate-auth-stub",
    "audience": "uvgate",
    "leeway": "30s",
    "subject_claim": "api_key",
    "forward_claims": {"api_key": "X-Api-Key", "sub": "X-Auth-Subject", "scope": "X-Auth-Scope"},
}


def jwt_config(**jwt_changes: Any) -> dict[str, Any]:
    return {
        "server": {"access_log": True},
        "auth": {"jwt": {**JWT_TABLE, **jwt_changes}},
        "upstreams": {"backend": {"servers": ["127.0.0.1:1"]}},
        "routes": [
            {"prefix": "/echo", "upstream": "backend", "auth": "jwt"},
            {"prefix": "/api/", "upstream": "backend", "auth": "jwt", "required_scope": "read"},
            {"prefix": "/open/", "upstream": "backend"},
        ],
    }


@pytest.fixture(scope="module")
def proxy(
    backend_stub: Service, auth_stub: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyService]:
    """One proxy for the checks that change nothing: 1 worker, keys from the session's auth_stub."""
    stack = Stack(run_dir=tmp_path_factory.mktemp("jwt-proxy"))
    try:
        yield stack.start_proxy(
            jwt_config(), workers=1, upstream_servers=[backend_stub.address], auth_url=auth_stub.url
        )
    finally:
        stack.stop()


ALGS = ["HS256", "RS256", "ES256"]


@pytest.mark.parametrize("alg", ALGS)
def test_a_valid_token_passes_with_its_identity_and_forged_identity_headers_are_stripped(
    proxy: ProxyService, auth_stub: Service, alg: str
) -> None:
    token = mint(auth_stub, alg=alg, api_key=f"key-{alg}", scope="read write")
    forged = (("X-Api-Key", "admin"), ("X-Auth-Subject", "root"), ("x-auth-scope", "everything"))
    response = get(proxy, "/echo/me", token, *forged)
    assert response.status == 200, response.body
    headers = response.json()["headers"]
    assert (headers["x-api-key"], headers["x-auth-subject"], headers["x-auth-scope"]) == (
        f"key-{alg}",
        f"key-{alg}",
        "read write",
    )
    assert headers["authorization"] == f"Bearer {token}", "the token itself is forwarded as sent"
    assert get(proxy, "/api/resource", token).status == 200, "the required scope is granted"


def test_identity_headers_are_stripped_on_a_route_without_auth(
    backend_stub: Service, auth_stub: Service, proxy_factory: ProxyFactory
) -> None:
    config = jwt_config()
    config["routes"] = [{"prefix": "/echo", "upstream": "backend"}]
    open_proxy = proxy_factory(config)
    response = get(open_proxy, "/echo", None, ("X-Api-Key", "admin"), ("X-Auth-Subject", "root"), ("X-Other", "1"))
    headers = response.json()["headers"]
    assert response.status == 200 and headers["x-other"] == "1"
    assert "x-api-key" not in headers and "x-auth-subject" not in headers


def _failure(alg: str, case: str, auth: Service) -> str:
    if case == "expired":
        return mint(auth, alg=alg, ttl=-120)  # beyond the 30 s leeway
    if case == "not yet valid":
        return mint(auth, alg=alg, nbf_offset=600)
    if case == "wrong issuer":
        return mint(auth, alg=alg, iss="someone-else")
    if case == "wrong audience":
        return mint(auth, alg=alg, aud="another-api")
    if case == "bad signature":
        return with_signature_of(mint(auth, alg=alg), mint(auth, alg=alg, api_key="other"))
    raise AssertionError(case)


DESCRIPTIONS = {
    "expired": "the token has expired",
    "not yet valid": "the token is not valid yet (nbf)",
    "wrong issuer": "the token has the wrong issuer",
    "wrong audience": "the token has the wrong audience",
    "bad signature": "the signature does not verify",
}


@pytest.mark.parametrize("case", list(DESCRIPTIONS))
@pytest.mark.parametrize("alg", ALGS)
def test_each_invalid_token_is_answered_401_invalid_token(
    proxy: ProxyService, auth_stub: Service, alg: str, case: str
) -> None:
    token = _failure(alg, case, auth_stub)
    for _ in range(2):  # the second answer comes from the negative cache: the same
        response = get(proxy, "/echo", token)
        assert response.status == 401, response.body
        description = DESCRIPTIONS[case]
        assert challenge(response) == (
            f'Bearer realm="uvgate", error="invalid_token", error_description="{description}"'
        )
        body = response.json()
        assert (body["error"], body["error_description"]) == ("invalid_token", description)
        assert token not in response.body.decode()


@pytest.mark.parametrize(
    ("value", "description"),
    [
        ("Bearer not-a-jwt", "malformed token"),
        ("Bearer a.b.c", "malformed token"),
        ("Bearer ", "malformed token"),
        ("Bearer a b", "malformed token"),
    ],
)
def test_malformed_tokens_are_answered_401(proxy: ProxyService, value: str, description: str) -> None:
    response = get(proxy, "/echo", None, ("Authorization", value))
    assert response.status == 401
    assert challenge(response).endswith(f'error="invalid_token", error_description="{description}"')


@pytest.mark.parametrize("value", [None, "Basic dXNlcjpwYXNz"])
def test_no_bearer_token_is_a_challenge_without_an_error_code(proxy: ProxyService, value: str | None) -> None:
    headers = () if value is None else (("Authorization", value),)
    response = get(proxy, "/echo", None, *headers)
    assert (response.status, challenge(response)) == (401, 'Bearer realm="uvgate"'), "RFC 6750 3.1"
    assert response.json()["error"] == "missing_token"


def test_a_valid_token_without_the_route_scope_is_answered_403(proxy: ProxyService, auth_stub: Service) -> None:
    token = mint(auth_stub, scope="write")
    response = get(proxy, "/api/resource", token)
    assert response.status == 403
    assert challenge(response) == (
        'Bearer realm="uvgate", error="insufficient_scope", '
        'error_description="the token lacks a required scope (read)", scope="read"'
    )
    assert response.json()["scope"] == "read"
    assert get(proxy, "/echo", token).status == 200, "the same token passes where no scope is required"


def _rsa_public_pem(auth: Service, kid: str) -> bytes:
    status, body = http_get(auth.url + "/.well-known/jwks.json")
    assert status == 200
    jwk = next(key for key in __import__("json").loads(body)["keys"] if key["kid"] == kid)
    from cryptography.hazmat.primitives import serialization

    public = jwt.PyJWK(jwk).key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _hs256_signed_with(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    """An HS256 JWT made by hand: pyjwt itself refuses a PEM public key as an HMAC secret."""
    import hashlib
    import hmac
    import json

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def test_algorithm_confusion_and_algorithms_outside_the_list_fail(
    proxy: ProxyService, auth_stub: Service, proxy_factory: ProxyFactory
) -> None:
    rs_token = mint(auth_stub, alg="RS256")
    kid = jwt.get_unverified_header(rs_token)["kid"]
    claims = jwt.decode(rs_token, options={"verify_signature": False})
    forged = _hs256_signed_with(_rsa_public_pem(auth_stub, kid), claims, kid)
    response = get(proxy, "/echo", forged)
    assert response.status == 401 and "the signature does not verify" in challenge(response)
    rs_only = proxy_factory(jwt_config(algorithms=["RS256"], secret=""))
    assert get(rs_only, "/echo", rs_token).status == 200
    for token in (forged, mint(auth_stub, alg="HS256"), mint(auth_stub, alg="ES256")):
        response = get(rs_only, "/echo", token)
        assert response.status == 401 and "the token algorithm is not allowed" in challenge(response)
    log = rs_only.read_log() + proxy.read_log()
    assert rs_token not in log and forged not in log, "no token in any log line"


# ---------------------------------------------------------------------------------------------- keys over time


@pytest.fixture
def own_auth_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """An auth_stub of this test alone (its keys rotate, or it goes away)."""
    stack = Stack(run_dir=tmp_path_factory.mktemp("own-auth"))
    try:
        yield stack.start_auth()
    finally:
        stack.stop()


def test_key_rotation_under_load_answers_no_401(
    own_auth_stub: Service, backend_stub: Service, proxy_factory: ProxyFactory
) -> None:
    """Clients keep sending tokens of the old keys while new ones arrive signed by the rotated keys: every
    request of either kind passes, in both workers (each learns the new kids with one JWKS fetch)."""
    proxy = proxy_factory(jwt_config(), workers=2, auth_url=own_auth_stub.url)
    old = [mint(own_auth_stub, alg=alg, api_key=f"old-{alg}") for alg in ("RS256", "ES256")]
    new: list[str] = []
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(index: int) -> None:
        deadline = time.monotonic() + 20.0
        with RawHTTPConnection(proxy.host, proxy.port, timeout=10.0) as conn:
            count = 0
            while not stop.is_set() and time.monotonic() < deadline and count < 2000:
                tokens = new if (new and index % 2) else old
                conn.request("GET", "/echo", headers=[("Authorization", f"Bearer {tokens[count % len(tokens)]}")])
                response = conn.read_response()
                statuses.append(response.status)
                if response.status != 200:
                    failures.append(f"{response.status} {response.body[:120]!r}")
                count += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)  # load before the rotation
        for alg in ("RS256", "ES256"):
            status, answer = http_post_json(own_auth_stub.url + "/rotate", {"alg": alg})
            assert status == 200, answer
        new.extend(mint(own_auth_stub, alg=alg, api_key=f"new-{alg}") for alg in ("RS256", "ES256"))
        time.sleep(1.0)  # load with both generations of keys
    finally:
        stop.set()
        for thread in threads:
            thread.join(30.0)
    assert jwt.get_unverified_header(new[0])["kid"] == "rs-2"
    assert not failures, failures[:5]
    assert len(statuses) > 100


def test_a_failed_jwks_refresh_keeps_the_last_good_keys(
    own_auth_stub: Service, backend_stub: Service, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(jwt_config(jwks_refresh="1s"), auth_url=own_auth_stub.url)
    seen, unseen = mint(own_auth_stub, api_key="seen"), mint(own_auth_stub, alg="ES256", api_key="unseen")
    assert get(proxy, "/echo", seen).status == 200
    own_auth_stub.stop()
    deadline = time.monotonic() + 15.0
    while "JWKS fetch from" not in proxy.read_log():
        assert time.monotonic() < deadline, "no failed refresh logged"
        time.sleep(0.05)
    assert "keeping the 2 keys" in proxy.read_log()
    response = get(proxy, "/echo", unseen)  # verified now, with the keys fetched before the outage
    assert response.status == 200 and response.json()["headers"]["x-api-key"] == "unseen"
    assert get(proxy, "/echo", seen).status == 200


def _unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"


def test_jwks_boot_require_refuses_to_start_without_keys(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(jwt_config(jwks_url=_unreachable(), jwks_boot="require", jwks_timeout="2s"), wait_ready=False)
    assert proxy.wait(30.0) == 3, proxy.read_log()
    assert "the first JWKS fetch from" in proxy.read_log()


class _JwksHandler(BaseHTTPRequestHandler):
    document = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_jwks_boot_serve_starts_answers_503_then_retries_until_keys_arrive(
    auth_stub: Service, backend_stub: Service, proxy_factory: ProxyFactory
) -> None:
    port = free_port()
    proxy = proxy_factory(
        jwt_config(jwks_url=f"http://127.0.0.1:{port}/.well-known/jwks.json", jwks_cooldown="30s"), auth_url=None
    )
    assert f"JWKS http://127.0.0.1:{port}/.well-known/jwks.json unavailable at start" in proxy.read_log()
    rs_token, hs_token = mint(auth_stub, api_key="late"), mint(auth_stub, alg="HS256")
    response = get(proxy, "/echo", rs_token)
    assert response.status == 503 and response.json()["error"] == "jwks_unavailable"
    assert get(proxy, "/echo", rs_token).status == 503, "answered at once while fetching fails"
    assert get(proxy, "/echo", hs_token).status == 200, "HS256 needs no JWKS"
    status, document = http_get(auth_stub.url + "/.well-known/jwks.json")
    assert status == 200
    _JwksHandler.document = document
    server = ThreadingHTTPServer(("127.0.0.1", port), _JwksHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        deadline = time.monotonic() + 20.0  # retries back off 1 s, 2 s, 4 s ...
        while (response := get(proxy, "/echo", rs_token)).status != 200:
            assert response.status == 503 and time.monotonic() < deadline, response.body
            time.sleep(0.1)
        assert response.json()["headers"]["x-api-key"] == "late"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
