"""Auth where timing matters, through a worker in this process (tests/integration/inprocess.py) against the real
backend_stub, with JWKS and introspection endpoints the test holds and counts (tests/integration/authservers.py),
answering from auth_stub's own key ring and issuer."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from auth_stub.issuer import KeyRing, TokenIssuer
from devstack import Service
from proxy.auth.introspect import Introspector
from tests.integration.authhelp import b64, with_signature_of
from tests.integration.authservers import IntrospectionServer, JwksServer
from tests.integration.inprocess import Worker, request, run, until

SECRET = "in-process-test-secret-of-32-bytes-or-more"


def jwt_config(jwks_url: str, **changes: Any) -> dict[str, Any]:
    return {
        "auth": {
            "jwt": {
                "algorithms": ["RS256", "ES256", "HS256"],
                "secret": SECRET,
                "jwks_url": jwks_url + "/.well-known/jwks.json",
                "subject_claim": "api_key",
                "forward_claims": {"api_key": "X-Api-Key"},
                **changes,
            }
        },
        "upstreams": {"backend": {}},
        "routes": [
            {"prefix": "/echo", "upstream": "backend", "auth": "jwt"},
            {"prefix": "/open", "upstream": "backend"},
        ],
    }


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def issuer_of(keys: KeyRing) -> TokenIssuer:
    return TokenIssuer(keys, hs_secret=SECRET)


def token(issuer: TokenIssuer, **fields: Any) -> str:
    fields.setdefault("api_key", "k1")
    value: str = issuer.mint(fields)["access_token"]
    return value


def test_an_unknown_kid_waits_for_one_refresh_that_serves_every_waiting_request(backend_stub: Service) -> None:
    async def scenario() -> None:
        keys = KeyRing(grace=300)
        issuer = issuer_of(keys)
        async with JwksServer(keys) as jwks, Worker(jwt_config(jwks.url), backend_stub.address) as worker:
            assert worker.auth is not None and worker.auth.jwks is not None and worker.auth.jwt is not None
            source = worker.auth.jwks
            assert jwks.requests == 1, "fetched at boot"
            keys.rotate("RS256")
            fresh = token(issuer, api_key="rotated")
            jwks.gate.clear()
            clients = [await worker.client() for _ in range(5)]
            for client in clients:
                client.send(request("/echo", bearer(fresh)))
            await until(lambda: len(source.waiters) == 5, 5.0, "five exchanges parked on the refresh")
            await clients[0].nothing_for(0.1)
            assert jwks.requests == 2, "one refresh for all of them"
            jwks.gate.set()
            for client in clients:
                response = await client.response()
                assert response.status == 200 and response.json()["headers"]["x-api-key"] == "rotated"
            assert jwks.requests == 2 and worker.auth.jwt.verified == 1
            done = await worker.wait_finished(5)
            assert {exchange.subject for exchange in done} == {b"rotated"}

    run(scenario)


def test_unknown_kids_cost_one_refresh_per_cooldown_then_401(backend_stub: Service) -> None:
    async def scenario() -> None:
        keys = KeyRing(grace=300)
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"api_key": "x", "exp": int(time.time()) + 600}
        config = jwt_config("", jwks_cooldown="30s")
        async with JwksServer(keys) as jwks:
            config["auth"]["jwt"]["jwks_url"] = jwks.url + "/keys"
            async with Worker(config, backend_stub.address) as worker:
                client = await worker.client()
                for index in range(10):
                    forged = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": f"ghost-{index}"})
                    client.send(request("/echo", bearer(forged)))
                    response = await client.response()
                    assert response.status == 401
                    assert "unknown signing key (kid)" in (response.header("www-authenticate") or "")
                assert jwks.requests == 2, "boot, then one refresh for the first unknown kid; none for the others"
                client.send(request("/open/x", ("X-Api-Key", "forged")))
                assert (await client.response()).status in (200, 404)
                done = await worker.wait_finished(11)
                assert done[-1].subject == b"127.0.0.1", "without auth the subject is the client address"

    run(scenario)


def test_a_refresh_that_fails_or_outlasts_the_wait_answers_named_503s_and_keeps_the_keys(backend_stub: Service) -> None:
    async def scenario() -> None:
        keys = KeyRing(grace=300)
        issuer = issuer_of(keys)
        known = token(issuer, api_key="known")
        unknown = _with_kid(token(issuer, api_key="unknown"), "rs-9")  # a kid the JWKS does not have
        async with JwksServer(keys) as jwks:
            cases = (("jwks_unavailable", {"jwks_timeout": "300ms", "jwks_wait": "5s"}),
                     ("jwks_refresh_timeout", {"jwks_timeout": "5s", "jwks_wait": "300ms"}))  # fmt: skip
            for error, timing in cases:
                async with Worker(jwt_config(jwks.url, **timing), backend_stub.address) as worker:
                    jwks.gate.clear()
                    client = await worker.client()
                    started = time.monotonic()
                    client.send(request("/echo", bearer(unknown)))
                    response = await client.response()
                    assert (response.status, response.json()["error"]) == (503, error)
                    assert response.header("retry-after") == "1"
                    assert 0.25 <= time.monotonic() - started < 4.0
                    jwks.gate.set()
                    client.send(request("/echo", bearer(known)))
                    assert (await client.response()).status == 200, "the keys fetched before are still used"

    run(scenario)


def _with_kid(token_value: str, kid: str) -> str:
    """`token_value` re-labelled with another kid (its signature no longer matters: the kid is unknown)."""
    rest = token_value.split(".", 1)[1]
    header = {**jwt.get_unverified_header(token_value), "kid": kid}
    return f"{b64(json.dumps(header).encode())}.{rest}"


def test_the_verified_cache_holds_at_most_cache_size_tokens_and_rejections_skip_the_crypto(
    backend_stub: Service,
) -> None:
    async def scenario() -> None:
        keys = KeyRing(grace=300)
        issuer = issuer_of(keys)
        async with JwksServer(keys) as jwks, Worker(jwt_config(jwks.url, cache_size=8), backend_stub.address) as worker:
            authority = worker.auth.jwt if worker.auth is not None else None
            assert authority is not None
            client = await worker.client()
            tokens = [token(issuer, alg="HS256", api_key=f"user-{index}") for index in range(20)]
            for value in tokens:
                client.send(request("/echo", bearer(value)))
                assert (await client.response()).status == 200
                assert len(authority.cache) <= 8
            assert authority.verified == 20
            client.send(request("/echo", bearer(tokens[-1])))
            assert (await client.response()).status == 200
            assert authority.verified == 20, "a recent token is a cache hit"
            client.send(request("/echo", bearer(tokens[0])))
            assert (await client.response()).status == 200
            assert authority.verified == 21, "the oldest token was evicted: verified again"
            bad = with_signature_of(tokens[1], tokens[2])
            for _ in range(3):
                client.send(request("/echo", bearer(bad)))
                assert (await client.response()).status == 401
            assert authority.refused == 1, "a rejected token is answered from the negative cache"

    run(scenario)


def _self_signed(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 (the CA file the proxy trusts) and a server context with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "uvgate test JWKS")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "jwks.pem", directory / "jwks.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context


def test_jwks_over_https_and_its_size_limit(backend_stub: Service, tmp_path: Path) -> None:
    ca_file, server_tls = _self_signed(tmp_path)

    async def scenario() -> None:
        keys = KeyRing(grace=300)
        issuer = issuer_of(keys)
        async with JwksServer(keys, tls=server_tls) as jwks:
            config = jwt_config(jwks.url, jwks_ca_file=str(ca_file))
            async with Worker(config, backend_stub.address) as worker:
                client = await worker.client()
                client.send(request("/echo", bearer(token(issuer, alg="ES256"))))
                assert (await client.response()).status == 200
            jwks.padding = 4096
            async with Worker({**config, "auth": {"jwt": {**config["auth"]["jwt"], "jwks_max_bytes": "2KiB"}}},
                              backend_stub.address) as worker:  # fmt: skip
                assert worker.auth is not None and worker.auth.jwks is not None
                assert not worker.auth.jwks.keys and worker.auth.jwks.failed == 1
                client = await worker.client()
                client.send(request("/echo", bearer(token(issuer))))
                assert (await client.response()).json()["error"] == "jwks_unavailable"
            assert jwks.requests >= 3

    run(scenario)


# ---------------------------------------------------------------------------------------------- introspection


def introspect_config(url: str, **changes: Any) -> dict[str, Any]:
    return {
        "auth": {
            "introspect": {
                "url": url + "/introspect",
                "subject_claim": "client_id",
                "forward_claims": {"client_id": "X-Client-Id", "scope": "X-Auth-Scope"},
                **changes,
            }
        },
        "upstreams": {"backend": {}},
        "routes": [
            {"prefix": "/echo", "upstream": "backend", "auth": "introspect"},
            {"prefix": "/api/", "upstream": "backend", "auth": "introspect", "required_scope": "read"},
        ],
    }


@contextlib.asynccontextmanager
async def introspecting(
    issuer: TokenIssuer, backend: str, **changes: Any
) -> AsyncIterator[tuple[IntrospectionServer, Worker, Introspector]]:
    """An introspection endpoint answering for `issuer`, and a worker whose routes ask it."""
    async with (
        IntrospectionServer(issuer) as endpoint,
        Worker(introspect_config(endpoint.url, **changes), backend) as worker,
    ):
        assert worker.auth is not None and worker.auth.introspect is not None
        yield endpoint, worker, worker.auth.introspect


def test_introspection_active_inactive_and_cached(backend_stub: Service) -> None:
    async def scenario() -> None:
        issuer = issuer_of(KeyRing(grace=300))
        async with introspecting(issuer, backend_stub.address) as (endpoint, worker, _):
            client = await worker.client()
            active = token(issuer, api_key="client-7", scope="read")
            for _ in range(3):
                client.send(request("/echo", bearer(active)))
                response = await client.response()
                assert response.status == 200
                headers = response.json()["headers"]
                assert (headers["x-client-id"], headers["x-auth-scope"]) == ("client-7", "read")
            client.send(request("/api/x", bearer(active)))
            assert (await client.response()).status == 200
            assert endpoint.requests == 1, "one call for a token, then the cache"
            for inactive in (token(issuer, ttl=-10), "opaque-and-unknown"):
                for _ in range(2):
                    client.send(request("/echo", bearer(inactive)))
                    response = await client.response()
                    assert response.status == 401 and "the token is not active" in (
                        response.header("www-authenticate") or ""
                    )
            assert endpoint.requests == 3, "inactive answers are cached too"
            done = await worker.wait_finished(8)
            assert done[0].subject == b"client-7"
            endpoint.status = 500
            client.send(request("/echo", bearer(token(issuer, api_key="other"))))
            response = await client.response()
            assert (response.status, response.json()["error"]) == (503, "introspection_unavailable")

    run(scenario)


def test_concurrent_requests_for_one_token_share_one_introspection_call(backend_stub: Service) -> None:
    async def scenario() -> None:
        issuer = issuer_of(KeyRing(grace=300))
        async with introspecting(issuer, backend_stub.address) as (endpoint, worker, introspector):
            value = token(issuer, api_key="shared")
            endpoint.gate.clear()
            clients = [await worker.client() for _ in range(4)]
            for client in clients:
                client.send(request("/echo", bearer(value)))
            header = f"Bearer {value}".encode()
            await until(
                lambda: len(introspector.inflight.get(header, ())) == 4, 5.0, "four requests parked on one call"
            )
            # The call is made when the first request parks; the endpoint reads it on its own schedule.
            await until(lambda: endpoint.requests >= 1, 5.0, "the introspection call at the endpoint")
            assert endpoint.requests == 1
            endpoint.gate.set()
            for client in clients:
                assert (await client.response()).status == 200
            assert endpoint.requests == 1 and introspector.calls == 1

    run(scenario)


def test_introspection_cache_lifetime_is_bounded_by_cache_ttl_and_by_exp(backend_stub: Service) -> None:
    async def scenario() -> None:
        issuer = issuer_of(KeyRing(grace=300))
        async with introspecting(issuer, backend_stub.address, cache_ttl="1s") as (_, worker, introspector):
            cache = introspector.cache
            client = await worker.client()
            long_lived, short_lived = token(issuer, ttl=3600), token(issuer, ttl=30)
            for value in (long_lived, short_lived):
                client.send(request("/echo", bearer(value)))
                assert (await client.response()).status == 200
            now = time.time()
            cached = cache.get(f"Bearer {long_lived}".encode(), now)
            assert cached is not None and now < cached.deadline <= now + 1.0
            exp = jwt.decode(short_lived, options={"verify_signature": False})["exp"]
        async with introspecting(issuer, backend_stub.address, cache_ttl="5m") as (_, worker, introspector):
            client = await worker.client()
            client.send(request("/echo", bearer(short_lived)))
            assert (await client.response()).status == 200
            cached = introspector.cache.get(f"Bearer {short_lived}".encode(), time.time())
            assert cached is not None and cached.deadline == exp

    run(scenario)
