"""JWT verification for tokens the route step has no cached verdict for (the slow path of `auth = "jwt"`).

Theory of operation. `JwtAuthority.authenticate` takes a bearer JWT from first sight to a verdict:
the negative cache first (a token rejected a moment ago is answered without the crypto), then the
token's header: its `alg` must be in `auth.jwt.algorithms` (never `none`); an HS* token is verified
with the configured secret and nothing else, any other with the JWKS key its `kid` names (or, without
a kid, each key that may verify its `alg`), and only if that key's type belongs to the algorithm, so
a token cannot pick how it is checked (no RS/HS confusion). pyjwt checks the signature, then `exp`,
`nbf` and `iat` with `leeway`, `iss` and `aud` when configured, and the required claims. A verified
token becomes an identity (`step.IdentityMapper`) cached until `exp` + leeway, when verification
itself would start refusing it. A rejected one is cached for `negative_ttl` (a not-yet-valid one no
longer than until it becomes valid). An unknown kid goes to the JWKS source (`jwks.unknown_kid`),
which parks the exchange for a fetch or answers. Nothing here logs: the answers say why, and a token
never appears anywhere but in the cache keys.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

import jwt
import orjson

from proxy.auth.jwks import JwksSource, SigningKey
from proxy.auth.step import IdentityMapper, TokenCache, Verdict, first_look, invalid_token, missing_token
from proxy.config import HMAC_ALGORITHMS, JwtConfig

if TYPE_CHECKING:
    from proxy.exchange import Exchange

# Tokens without `exp` (allowed when `required_claims` leaves it out) are re-verified this often.
NO_EXP_TTL = 300.0

_DESCRIPTIONS: dict[type[Exception], str] = {
    jwt.ExpiredSignatureError: "the token has expired",
    jwt.ImmatureSignatureError: "the token is not valid yet (nbf)",
    jwt.InvalidIssuedAtError: "the token was issued in the future (iat)",
    jwt.InvalidIssuerError: "the token has the wrong issuer",
    jwt.InvalidAudienceError: "the token has the wrong audience",
    jwt.MissingRequiredClaimError: "the token lacks a required claim",
    jwt.InvalidSignatureError: "the signature does not verify",
    jwt.InvalidAlgorithmError: "the token algorithm is not allowed",
}


class JwtAuthority:
    """Per-worker JWT verification: caches, keys, the answers it gives."""

    def __init__(self, config: JwtConfig, realm: str, jwks: JwksSource | None) -> None:
        self.config = config
        self.jwks = jwks
        self.cache = TokenCache(config.cache_size)
        self.rejected = TokenCache(config.negative_cache_size)
        self.identities = IdentityMapper(realm, config.subject_claim, config.forward_claims)
        self.allowed = frozenset(config.algorithms)
        self.secret = config.secret.encode()
        self.options: dict[str, Any] = {
            "require": list(config.required_claims),
            "verify_aud": bool(config.audience),
            "verify_iss": config.issuer is not None,
        }
        self.audience = list(config.audience) or None
        self.realm = realm
        self.missing = Verdict(0.0, error=missing_token(realm))
        self.errors = {kind: invalid_token(realm, text) for kind, text in _DESCRIPTIONS.items()}
        self.malformed = invalid_token(realm, "malformed token")
        self.not_allowed = invalid_token(realm, "the token algorithm is not allowed")
        self.wrong_key = invalid_token(realm, "the signing key does not match the token algorithm")
        self.invalid = invalid_token(realm, "the token is invalid")
        # Counters (for tests and metrics).
        self.verified = 0  # tokens that went through the crypto and passed
        self.refused = 0  # tokens that went through the crypto (or a parse) and failed

    def authenticate(self, exchange: Exchange, header: bytes, now: float) -> Verdict:
        """The verdict on an Authorization value that the step's cache had nothing valid for."""
        token = first_look(self.rejected, self.missing, header, now)
        if isinstance(token, Verdict):
            return token
        if not token or token.count(b".") != 2:
            return self._reject(header, self.malformed, now)
        fields = _header(token)
        if fields is None:
            return self._reject(header, self.malformed, now)
        alg = fields.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed:
            return self._reject(header, self.not_allowed, now)
        if alg in HMAC_ALGORITHMS:
            return self._verify(header, token, alg, [self.secret], now)
        if self.jwks is None:
            return self._reject(header, self.not_allowed, now)
        kid = fields.get("kid")
        if kid is None:
            keys = [key.key for key in self.jwks.keys.values() if alg in key.algorithms]
            if not keys:
                return self._reject(header, self.wrong_key, now)
            return self._verify(header, token, alg, keys, now)
        if not isinstance(kid, str):
            return self._reject(header, self.malformed, now)
        signing: SigningKey | None = self.jwks.keys.get(kid)
        if signing is None:
            return self.jwks.unknown_kid(exchange, kid)
        if alg not in signing.algorithms:
            return self._reject(header, self.wrong_key, now)
        return self._verify(header, token, alg, [signing.key], now)

    def _verify(self, header: bytes, token: bytes, alg: str, keys: list[Any], now: float) -> Verdict:
        config = self.config
        claims: dict[str, Any] | None = None
        failure: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    options=self.options,  # type: ignore[arg-type]
                    audience=self.audience,
                    issuer=config.issuer,
                    leeway=config.leeway,
                )
                break
            except jwt.InvalidSignatureError as exc:
                failure = exc  # (without a kid: the next key may be the one)
            except (jwt.PyJWTError, orjson.JSONDecodeError, ValueError, TypeError) as exc:
                failure = exc
                break
        if claims is None:
            error = self.errors.get(type(failure), self.invalid) if failure is not None else self.invalid
            if isinstance(failure, jwt.DecodeError) and not isinstance(failure, jwt.InvalidSignatureError):
                error = self.malformed
            until = now + config.negative_ttl
            if isinstance(failure, jwt.ImmatureSignatureError):
                until = min(until, _number(_unverified_claims(token), "nbf", until) - config.leeway)
            return self._reject(header, error, now, until)
        self.verified += 1
        exp = claims.get("exp")
        deadline = float(exp) + config.leeway if isinstance(exp, int | float) else now + NO_EXP_TTL
        verdict = self.identities.verdict(claims, deadline)
        if verdict.error is not None:
            return self._reject(header, verdict.error, now)
        self.cache.put(header, verdict, now)
        return verdict

    def _reject(self, header: bytes, error: Any, now: float, until: float | None = None) -> Verdict:
        self.refused += 1
        verdict = Verdict(now + self.config.negative_ttl if until is None else until, error=error)
        if verdict.deadline > now:
            self.rejected.put(header, verdict, now)
        return verdict

    def sweep(self, now: float) -> None:
        """Drop expired entries of both caches (a worker tick subscriber, now and then)."""
        self.cache.sweep(now)
        self.rejected.sweep(now)


def _header(token: bytes) -> dict[str, Any] | None:
    """The JOSE header of a compact JWT, only to choose the algorithm and key (pyjwt parses it again and
    checks its `alg` against the one chosen); None when it is not base64url JSON of an object. One
    segment with the C base64 decoder: pyjwt's own helper validates all three segments character by
    character in Python, a third of the cost of a first verification."""
    segment = token[: token.index(b".")]
    try:
        data = orjson.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unverified_claims(token: bytes) -> dict[str, Any]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _number(claims: dict[str, Any], name: str, default: float) -> float:
    value = claims.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
