"""auth_stub token logic without sockets: minting, JWKS shape, rotation grace, introspection."""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth_stub.issuer import (
    DEFAULT_AUDIENCE,
    DEFAULT_HS_SECRET,
    DEFAULT_ISSUER,
    HS_KID,
    KeyRing,
    SigningPrivateKey,
    TokenIssuer,
    TokenRequestError,
    b64url_uint,
)

SECRET = "unit-test-hs256-secret-with-more-than-32-bytes"
GRACE = 300.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def key_pool() -> dict[str, list[SigningPrivateKey]]:
    """A few real keys per algorithm, generated once (RSA 2048 generation is slow)."""
    return {
        "RS256": [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)],
        "ES256": [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)],
    }


@pytest.fixture
def key_factory(key_pool: dict[str, list[SigningPrivateKey]]) -> Callable[[str], SigningPrivateKey]:
    cursors: dict[str, Iterator[SigningPrivateKey]] = {alg: iter(keys) for alg, keys in key_pool.items()}
    return lambda alg: next(cursors[alg])


@pytest.fixture
def clock() -> FakeClock:
    # Real time, so PyJWT's own exp/nbf checks agree with the stub's; tests move it forward only.
    return FakeClock(float(int(time.time())))


@pytest.fixture
def keys(clock: FakeClock, key_factory: Callable[[str], SigningPrivateKey]) -> KeyRing:
    return KeyRing(grace=GRACE, clock=clock, key_factory=key_factory)


@pytest.fixture
def issuer(keys: KeyRing, clock: FakeClock) -> TokenIssuer:
    return TokenIssuer(keys, hs_secret=SECRET, clock=clock)


def _b64decode(value: str) -> bytes:
    assert "=" not in value and "+" not in value and "/" not in value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _jwk_key(keys: KeyRing, kid: str) -> jwt.PyJWK:
    return jwt.PyJWKSet.from_dict(keys.jwks())[kid]


def test_initial_keys_and_jwks_shape(keys: KeyRing) -> None:
    jwks = keys.jwks()
    assert [key["kid"] for key in jwks["keys"]] == ["rs-1", "es-1"]
    rsa_jwk, ec_jwk = jwks["keys"]
    assert set(rsa_jwk) == {"kty", "kid", "use", "alg", "n", "e"}
    assert (rsa_jwk["kty"], rsa_jwk["use"], rsa_jwk["alg"]) == ("RSA", "sig", "RS256")
    rsa_numbers = keys.current("RS256").private_key.public_key().public_numbers()
    assert isinstance(rsa_numbers, rsa.RSAPublicNumbers)
    assert int.from_bytes(_b64decode(rsa_jwk["n"]), "big") == rsa_numbers.n
    assert _b64decode(rsa_jwk["e"]) == b"\x01\x00\x01"
    assert set(ec_jwk) == {"kty", "kid", "use", "alg", "crv", "x", "y"}
    assert (ec_jwk["kty"], ec_jwk["crv"], ec_jwk["alg"]) == ("EC", "P-256", "ES256")
    ec_numbers = keys.current("ES256").private_key.public_key().public_numbers()
    assert isinstance(ec_numbers, ec.EllipticCurvePublicNumbers)
    assert _b64decode(ec_jwk["x"]) == ec_numbers.x.to_bytes(32, "big")
    assert _b64decode(ec_jwk["y"]) == ec_numbers.y.to_bytes(32, "big")


def test_b64url_uint_pads_to_length_and_strips_padding() -> None:
    assert b64url_uint(65537) == "AQAB"
    assert b64url_uint(1, 32) == base64.urlsafe_b64encode(b"\x00" * 31 + b"\x01").rstrip(b"=").decode()
    assert b64url_uint(0) == "AA"


def test_jwks_never_contains_secret_or_private_parts(issuer: TokenIssuer) -> None:
    text = json.dumps(issuer.keys.jwks())
    assert SECRET not in text
    assert DEFAULT_HS_SECRET not in text
    assert '"d"' not in text


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_mint_asymmetric_verifies_against_jwks(issuer: TokenIssuer, clock: FakeClock, alg: str) -> None:
    answer = issuer.mint({"api_key": "key-1", "scope": "read write", "alg": alg, "ttl": 120})
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 120
    token = answer["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    assert header["kid"] == issuer.keys.current(alg).kid
    claims = jwt.decode(
        token,
        _jwk_key(issuer.keys, header["kid"]),
        algorithms=[alg],
        audience=DEFAULT_AUDIENCE,
        issuer=DEFAULT_ISSUER,
    )
    now = int(clock.now)
    assert claims["sub"] == claims["api_key"] == "key-1"
    assert claims["scope"] == "read write"
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 120)
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16


def test_mint_defaults_to_rs256_and_one_hour(issuer: TokenIssuer) -> None:
    answer = issuer.mint({"api_key": "k"})
    assert answer["expires_in"] == 3600
    assert jwt.get_unverified_header(answer["access_token"])["alg"] == "RS256"
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert "scope" not in claims
    assert claims["exp"] - claims["iat"] == 3600


def test_mint_hs256_uses_secret_and_hs_kid(issuer: TokenIssuer) -> None:
    token = issuer.mint({"api_key": "k", "alg": "HS256"})["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == HS_KID
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=DEFAULT_AUDIENCE)
    assert claims["api_key"] == "k"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-that-is-also-32-bytes-long", algorithms=["HS256"], audience=DEFAULT_AUDIENCE)


def test_mint_overrides_and_extra_claims(issuer: TokenIssuer, clock: FakeClock) -> None:
    token = issuer.mint(
        {
            "api_key": "k",
            "aud": ["a", "b"],
            "iss": "other-issuer",
            "nbf_offset": 30,
            "claims": {"tenant": "t1", "roles": ["admin"]},
        }
    )["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == ["a", "b"]
    assert claims["iss"] == "other-issuer"
    assert claims["nbf"] == int(clock.now) + 30
    assert claims["tenant"] == "t1"
    assert claims["roles"] == ["admin"]


def test_jti_is_unique(issuer: TokenIssuer) -> None:
    tokens = [issuer.mint({"api_key": "k", "alg": "HS256"})["access_token"] for _ in range(5)]
    jtis = {jwt.decode(token, options={"verify_signature": False})["jti"] for token in tokens}
    assert len(jtis) == 5


@pytest.mark.parametrize(
    "request_body",
    [
        [],
        "x",
        {},
        {"api_key": ""},
        {"api_key": 5},
        {"api_key": "k", "alg": "none"},
        {"api_key": "k", "alg": "HS512"},
        {"api_key": "k", "ttl": "60"},
        {"api_key": "k", "ttl": True},
        {"api_key": "k", "scope": ["a"]},
        {"api_key": "k", "aud": 3},
        {"api_key": "k", "aud": ["a", 1]},
        {"api_key": "k", "iss": None},
        {"api_key": "k", "nbf_offset": "soon"},
        {"api_key": "k", "claims": ["x"]},
    ],
)
def test_mint_rejects_bad_requests(issuer: TokenIssuer, request_body: object) -> None:
    with pytest.raises(TokenRequestError):
        issuer.mint(request_body)


def test_rotation_keeps_old_key_for_grace_then_drops_it(issuer: TokenIssuer, clock: FakeClock) -> None:
    keys = issuer.keys
    old_token = issuer.mint({"api_key": "k", "alg": "RS256"})["access_token"]
    new = keys.rotate("RS256")
    assert new.kid == "rs-2"
    assert keys.current("RS256") is new
    assert [key.kid for key in keys.published()] == ["rs-2", "es-1", "rs-1"]
    assert issuer.introspect(old_token)["active"] is True
    new_token = issuer.mint({"api_key": "k"})["access_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == "rs-2"

    clock.advance(GRACE - 1)
    assert "rs-1" in {key["kid"] for key in keys.jwks()["keys"]}
    clock.advance(1)
    assert [key.kid for key in keys.published()] == ["rs-2", "es-1"]
    assert issuer.introspect(old_token) == {"active": False}
    assert issuer.introspect(new_token)["active"] is True


def test_rotation_per_algorithm_and_each_retirement_has_its_own_clock(issuer: TokenIssuer, clock: FakeClock) -> None:
    keys = issuer.keys
    keys.rotate("ES256")
    clock.advance(100)
    keys.rotate("ES256")
    assert [key.kid for key in keys.published()] == ["rs-1", "es-3", "es-1", "es-2"]
    clock.advance(GRACE - 100)
    assert [key.kid for key in keys.published()] == ["rs-1", "es-3", "es-2"]
    clock.advance(100)
    assert [key.kid for key in keys.published()] == ["rs-1", "es-3"]


def test_rotate_rejects_unknown_algorithm(keys: KeyRing) -> None:
    with pytest.raises(TokenRequestError):
        keys.rotate("HS256")


def test_zero_grace_drops_retired_key_at_once(
    clock: FakeClock, key_factory: Callable[[str], SigningPrivateKey]
) -> None:
    keys = KeyRing(grace=0, clock=clock, key_factory=key_factory)
    keys.rotate("RS256")
    assert [key.kid for key in keys.published()] == ["rs-2", "es-1"]


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_introspect_active_token(issuer: TokenIssuer, clock: FakeClock, alg: str) -> None:
    token = issuer.mint({"api_key": "client-7", "scope": "read", "alg": alg, "ttl": 60})["access_token"]
    answer = issuer.introspect(token)
    now = int(clock.now)
    assert answer["active"] is True
    assert answer["sub"] == "client-7"
    assert answer["client_id"] == "client-7"
    assert answer["scope"] == "read"
    assert (answer["iat"], answer["exp"]) == (now, now + 60)
    assert answer["iss"] == DEFAULT_ISSUER
    assert answer["aud"] == DEFAULT_AUDIENCE
    assert answer["token_type"] == "Bearer"


def test_introspect_expiry_follows_the_clock(issuer: TokenIssuer, clock: FakeClock) -> None:
    token = issuer.mint({"api_key": "k", "ttl": 10})["access_token"]
    clock.advance(9)
    assert issuer.introspect(token)["active"] is True
    clock.advance(1)
    assert issuer.introspect(token) == {"active": False}


@pytest.mark.parametrize("ttl", [0, -60])
def test_expired_at_mint_is_inactive(issuer: TokenIssuer, ttl: int) -> None:
    token = issuer.mint({"api_key": "k", "ttl": ttl, "alg": "ES256"})["access_token"]
    assert issuer.introspect(token) == {"active": False}


def test_not_before_in_future_is_inactive_until_reached(issuer: TokenIssuer, clock: FakeClock) -> None:
    token = issuer.mint({"api_key": "k", "nbf_offset": 30, "alg": "HS256"})["access_token"]
    assert issuer.introspect(token) == {"active": False}
    clock.advance(30)
    assert issuer.introspect(token)["active"] is True


def test_introspect_rejects_foreign_and_malformed_tokens(
    issuer: TokenIssuer, key_pool: dict[str, list[SigningPrivateKey]]
) -> None:
    claims = {"sub": "k", "exp": int(time.time()) + 60}
    foreign = key_pool["RS256"][-1]  # not in the ring: the fixture ring only used the first one
    forged = jwt.encode(claims, foreign, algorithm="RS256", headers={"kid": "rs-1"})
    wrong_secret = jwt.encode(claims, "a-different-secret-of-at-least-32-bytes!", algorithm="HS256")
    unsigned = jwt.encode(claims, None, algorithm="none")
    for token in (forged, wrong_secret, unsigned, "garbage", "a.b.c", ""):
        assert issuer.introspect(token) == {"active": False}


def test_introspect_token_without_kid_tries_published_keys(issuer: TokenIssuer) -> None:
    key = issuer.keys.current("ES256").private_key
    token = jwt.encode({"sub": "k", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    answer = issuer.introspect(token)
    assert answer["active"] is True
    assert answer["client_id"] == "k"


def test_kids_count_up_per_algorithm(keys: KeyRing) -> None:
    kids = [keys.rotate(alg).kid for alg in itertools.islice(itertools.cycle(["RS256", "ES256"]), 4)]
    assert kids == ["rs-2", "es-2", "rs-3", "es-3"]
