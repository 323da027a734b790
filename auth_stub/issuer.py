"""Signing keys, token minting, JWKS and introspection for auth_stub: pure logic, no sockets.

Theory of operation
-------------------
``KeyRing`` holds one current signing key per asymmetric algorithm (RS256 on RSA 2048, ES256 on
P-256), named ``rs-1``, ``es-1``, ``rs-2``... ``rotate`` retires the current key of an algorithm,
stamping the retirement time from the injected clock, and makes a fresh key current. The
published set (the JWKS, and the keys introspection trusts) is every current key plus each
retired key for ``grace`` seconds after its retirement; older ones are dropped whenever the ring
is read. HS256 tokens use one shared secret (kid ``hs-1``) that is never published.
``TokenIssuer`` validates a /token request, mints with PyJWT, and introspects by checking the
signature with PyJWT and ``exp``/``nbf`` against the same injected clock, so tests move time
without sleeping.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.types import Options

Clock = Callable[[], float]
SigningPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyFactory = Callable[[str], SigningPrivateKey]

ASYMMETRIC_ALGS: Final = ("RS256", "ES256")
ALGS: Final = ("HS256", *ASYMMETRIC_ALGS)
HS_KID: Final = "hs-1"
DEFAULT_ISSUER: Final = "uvgate-auth-stub"
DEFAULT_AUDIENCE: Final = "uvgate"
DEFAULT_HS_SECRET: Final = "uvgate-auth-stub-development-secret-not-for-production"
DEFAULT_TTL: Final = 3600
_KID_PREFIX: Final = {"RS256": "rs", "ES256": "es"}
# Signature only: exp and nbf are checked against the injected clock, aud and iss are reported, not enforced.
_SIGNATURE_ONLY: Final[Options] = {
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


class TokenRequestError(ValueError):
    """A /token or /rotate request the issuer refuses (an HTTP 400)."""


def generate_key(alg: str) -> SigningPrivateKey:
    """A fresh private key for RS256 (RSA 2048) or ES256 (P-256)."""
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise TokenRequestError(f"alg must be one of {', '.join(ASYMMETRIC_ALGS)}")


def b64url_uint(value: int, length: int | None = None) -> str:
    """Big-endian unsigned integer as base64url without padding (RFC 7518 6.2/6.3)."""
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One asymmetric signing key and its public JWK."""

    kid: str
    alg: str
    private_key: SigningPrivateKey

    def jwk(self) -> dict[str, str]:
        """The public key as a JWK (RFC 7517), never the private part."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            rsa_numbers = public.public_numbers()
            return {
                "kty": "RSA",
                "kid": self.kid,
                "use": "sig",
                "alg": self.alg,
                "n": b64url_uint(rsa_numbers.n),
                "e": b64url_uint(rsa_numbers.e),
            }
        ec_numbers = public.public_numbers()
        return {
            "kty": "EC",
            "kid": self.kid,
            "use": "sig",
            "alg": self.alg,
            "crv": "P-256",
            "x": b64url_uint(ec_numbers.x, 32),
            "y": b64url_uint(ec_numbers.y, 32),
        }


class KeyRing:
    """Current and recently retired signing keys, one current key per asymmetric algorithm."""

    def __init__(self, *, grace: float, clock: Clock = time.time, key_factory: KeyFactory = generate_key) -> None:
        self._grace = grace
        self._clock = clock
        self._key_factory = key_factory
        self._serial = dict.fromkeys(ASYMMETRIC_ALGS, 0)
        self._current = {alg: self._new_key(alg) for alg in ASYMMETRIC_ALGS}
        self._retired: list[tuple[float, SigningKey]] = []  # (retired at, key), oldest first

    def _new_key(self, alg: str) -> SigningKey:
        self._serial[alg] += 1
        return SigningKey(f"{_KID_PREFIX[alg]}-{self._serial[alg]}", alg, self._key_factory(alg))

    def current(self, alg: str) -> SigningKey:
        """The key that signs new ``alg`` tokens."""
        return self._current[alg]

    def rotate(self, alg: str) -> SigningKey:
        """Make a new key current for ``alg``; the old one stays published for ``grace`` seconds."""
        if alg not in self._current:
            raise TokenRequestError(f"alg must be one of {', '.join(ASYMMETRIC_ALGS)}")
        new = self._new_key(alg)
        self._retired.append((self._clock(), self._current[alg]))
        self._current[alg] = new
        return new

    def published(self) -> list[SigningKey]:
        """Current keys, then retired keys still within their grace period (expired ones are dropped)."""
        now = self._clock()
        self._retired = [(at, key) for at, key in self._retired if now - at < self._grace]
        return [*self._current.values(), *(key for _, key in self._retired)]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWKS document: every published public key."""
        return {"keys": [key.jwk() for key in self.published()]}


class TokenIssuer:
    """Mints and introspects tokens for the keys of a ``KeyRing`` and one HS256 secret."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        hs_secret: str = DEFAULT_HS_SECRET,
        clock: Clock = time.time,
    ) -> None:
        self.keys = keys
        self._issuer = issuer
        self._audience = audience
        self._hs_secret = hs_secret
        self._clock = clock

    def mint(self, request: object) -> dict[str, Any]:
        """Answer a /token request body (already JSON-decoded); raises ``TokenRequestError``.

        Fields: ``api_key`` (required), ``ttl`` (default 3600, may be <= 0), ``scope``, ``alg``
        (HS256, RS256 or ES256; default RS256), ``aud``, ``iss``, ``nbf_offset`` and ``claims``
        (extra claims, applied last so they may override the standard ones).
        """
        if not isinstance(request, dict):
            raise TokenRequestError("body must be a JSON object")
        api_key = request.get("api_key")
        if not isinstance(api_key, str) or not api_key:
            raise TokenRequestError("api_key is required (a non-empty string)")
        alg = request.get("alg", "RS256")
        if alg not in ALGS:
            raise TokenRequestError(f"alg must be one of {', '.join(ALGS)}")
        ttl = _number(request, "ttl", DEFAULT_TTL)
        nbf_offset = _number(request, "nbf_offset", 0)
        scope = request.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise TokenRequestError("scope must be a space-separated string")
        issuer = request.get("iss", self._issuer)
        if not isinstance(issuer, str):
            raise TokenRequestError("iss must be a string")
        audience = request.get("aud", self._audience)
        if not (
            isinstance(audience, str) or (isinstance(audience, list) and all(isinstance(a, str) for a in audience))
        ):
            raise TokenRequestError("aud must be a string or a list of strings")
        extra = request.get("claims", {})
        if not isinstance(extra, dict):
            raise TokenRequestError("claims must be an object")

        now = int(self._clock())
        claims: dict[str, Any] = {
            "sub": api_key,
            "api_key": api_key,
            "iat": now,
            "nbf": now + nbf_offset,
            "exp": now + ttl,
            "iss": issuer,
            "aud": audience,
            "jti": secrets.token_hex(16),
        }
        if scope is not None:
            claims["scope"] = scope
        claims.update(extra)
        try:
            if alg == "HS256":
                token = jwt.encode(claims, self._hs_secret, algorithm=alg, headers={"kid": HS_KID})
            else:
                key = self.keys.current(alg)
                token = jwt.encode(claims, key.private_key, algorithm=alg, headers={"kid": key.kid})
        except (TypeError, ValueError) as exc:
            raise TokenRequestError(f"cannot encode claims: {exc}") from None
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl}

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token signed by a published key or the secret and within exp/nbf, else None."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):
            return None
        candidates: list[str | rsa.RSAPublicKey | ec.EllipticCurvePublicKey] = []
        if alg == "HS256":
            candidates.append(self._hs_secret)
        elif alg in ASYMMETRIC_ALGS:
            candidates.extend(
                key.private_key.public_key()
                for key in self.keys.published()
                if key.alg == alg and (kid is None or key.kid == kid)
            )
        for verify_key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(token, verify_key, algorithms=[alg], options=_SIGNATURE_ONLY)
            except jwt.PyJWTError:
                continue
            return claims if self._in_time(claims) else None
        return None

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 answer for a token: ``{"active": false}`` unless ``verify`` accepts it."""
        claims = self.verify(token)
        if claims is None:
            return {"active": False}
        answer: dict[str, Any] = {"active": True}
        for name in ("sub", "scope", "exp", "iat", "nbf", "iss", "aud", "jti"):
            if name in claims:
                answer[name] = claims[name]
        answer["client_id"] = claims.get("api_key", claims.get("sub"))
        answer["token_type"] = "Bearer"
        return answer

    def _in_time(self, claims: dict[str, Any]) -> bool:
        now = self._clock()
        exp = claims.get("exp")
        if not _is_number(exp) or exp <= now:
            return False
        nbf = claims.get("nbf")
        return nbf is None or (_is_number(nbf) and nbf <= now)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(request: dict[str, Any], name: str, default: int) -> int:
    value = request.get(name, default)
    if not _is_number(value):
        raise TokenRequestError(f"{name} must be a number of seconds")
    return int(value)
