"""The auth step of a route and the per-worker token caches: the hot path of authentication.

Theory of operation. A route with `auth = "jwt"` or `"introspect"` gets one `AuthStep`, bound to its
worker's `Authority` (the JWT verifier or the introspection client) and the route's required scopes.
The Authorization value was kept by the header scan (`exchange.authorization`); its last `KEY_TAIL`
bytes (the end of a JWT signature: random) are the dict key, and the entry keeps the whole value, which
must be equal. So a token seen before costs one slice, one dict lookup (hashing 32 bytes, not the whole
value, a new bytes object per request), one compare of the value and one of its deadline with the
wall-clock time of the request head (`t_start + worker.wall_offset`: no clock read), then the identity
is applied:
the scopes are compared with the route's, the subject is put on the exchange, and the forwarded-claim
headers, encoded once as upstream header lines when the token was verified, are added to the upstream
request in one piece.

Everything else is the authority's (`authenticate`): a token not cached, or whose entry has expired. It
answers with a `Verdict`: an identity (which it caches until the token's `exp`), an error to answer
(cached for a short time in its negative cache when deciding it cost something), or `WAIT_VERDICT`
after parking the exchange (an unknown signing key, an introspection call in flight); the gateway
re-runs the step when the exchange wakes, and the cache or the authority answers then.

`TokenCache` is a bounded dict of value tail -> `Verdict` with its whole value and a deadline each (two
values with the same tail share a slot: the later one replaces the other). An expired entry is never
used (the lookup compares), is dropped when looked up, and by `sweep`; when the cache is full the
expired entries go first and, if that is not enough, the oldest quarter (insertion order): amortised
O(1) per insert, and a plain dict for the lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

import orjson

from proxy.errors import Forbidden, ProxyError, Unauthorized
from proxy.exchange import WAIT

if TYPE_CHECKING:
    from proxy.exchange import Exchange

# The error codes the auth steps answer with (`error` in the JSON body), each made where its failure is
# decided (here, proxy.auth.jwks, proxy.auth.introspect). `FAILURE_REASONS` is every one of them: the
# `reason` label of uvgate_auth_failures_total, which proxy.metrics counts for exactly these.
MISSING_TOKEN: Final = "missing_token"
INVALID_TOKEN: Final = "invalid_token"
INSUFFICIENT_SCOPE: Final = "insufficient_scope"
JWKS_UNAVAILABLE: Final = "jwks_unavailable"
JWKS_REFRESH_TIMEOUT: Final = "jwks_refresh_timeout"
INTROSPECTION_UNAVAILABLE: Final = "introspection_unavailable"
INTROSPECTION_BUSY: Final = "introspection_busy"
INTROSPECTION_TIMEOUT: Final = "introspection_timeout"
FAILURE_REASONS: Final = frozenset(
    {
        MISSING_TOKEN,
        INVALID_TOKEN,
        INSUFFICIENT_SCOPE,
        JWKS_UNAVAILABLE,
        JWKS_REFRESH_TIMEOUT,
        INTROSPECTION_UNAVAILABLE,
        INTROSPECTION_BUSY,
        INTROSPECTION_TIMEOUT,
    }
)

_BEARER: Final = b"bearer "
# RFC 6750 2.1 b64token: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/", then "=" padding.
_TOKEN_CHARS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
_IDENTITY_TABLE: Final = bytes(range(256))
_B64TOKEN: Final = bytes(sorted(_TOKEN_CHARS))


class Verdict:
    """What a token is worth until `deadline` (Unix time): an identity, or an `error` to answer."""

    __slots__ = ("deadline", "error", "key", "lines", "scopes", "subject")

    def __init__(
        self,
        deadline: float,
        *,
        error: ProxyError | None = None,
        subject: bytes = b"",
        lines: bytes = b"",
        scopes: frozenset[str] = frozenset(),
    ) -> None:
        self.deadline = deadline
        self.key = b""  # the Authorization value it is cached for (set by TokenCache.put)
        self.error = error
        self.subject = subject
        self.lines = lines  # the forwarded claims as upstream header lines ("name: value" CRLF each)
        self.scopes = scopes


KEY_TAIL: Final = 32  # bytes of the Authorization value used as the cache key (the whole value is compared)
WAIT_VERDICT: Final = Verdict(0.0, error=WAIT)
"""What an authority returns after parking the exchange (never cached)."""


class Authority(Protocol):
    """Decides about tokens the route step has no cached verdict for (one per kind, per worker)."""

    cache: TokenCache

    def authenticate(self, exchange: Exchange, header: bytes, now: float) -> Verdict:
        """The verdict on `header` (the Authorization value) at Unix time `now`: an identity (cached),
        an error, or `WAIT_VERDICT` once the exchange is parked."""


class TokenCache:
    """Authorization value -> `Verdict`, at most `limit` entries, none used past its deadline. The dict is
    keyed by the value's last `KEY_TAIL` bytes; a verdict put here belongs to the cache (its `key`)."""

    __slots__ = ("entries", "evicted", "hits", "limit", "misses")

    def __init__(self, limit: int) -> None:
        self.entries: dict[bytes, Verdict] = {}
        self.limit = limit
        self.evicted = 0  # entries dropped for room before their deadline
        # Lookups by the auth steps (metrics read them): a usable entry, or none (the authority decided).
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes, now: float) -> Verdict | None:
        tail = key[-KEY_TAIL:]
        verdict = self.entries.get(tail)
        if verdict is None or verdict.key != key:
            return None
        if verdict.deadline > now:
            return verdict
        self.entries.pop(tail, None)
        return None

    def put(self, key: bytes, verdict: Verdict, now: float) -> None:
        verdict.key = key
        entries = self.entries
        tail = key[-KEY_TAIL:]
        if len(entries) >= self.limit and tail not in entries:
            self.sweep(now)
            if len(entries) >= self.limit:
                oldest = list(entries)[: max(1, self.limit // 4)]
                for old in oldest:
                    del entries[old]
                self.evicted += len(oldest)
        entries[tail] = verdict

    def sweep(self, now: float) -> None:
        """Drop every expired entry."""
        entries = self.entries
        expired = [key for key, verdict in entries.items() if verdict.deadline <= now]
        for key in expired:
            del entries[key]

    def __len__(self) -> int:
        return len(self.entries)


class AuthStep:
    """A route's authentication: the cached verdict on the request's token, else its authority's."""

    __slots__ = ("authority", "cache", "missing", "required", "scope_error")

    def __init__(self, authority: Authority, required: tuple[str, ...], realm: str) -> None:
        self.authority = authority
        self.cache = authority.cache
        self.required = frozenset(required)
        self.missing = missing_token(realm)
        self.scope_error = insufficient_scope(realm, required)

    def check(self, exchange: Exchange) -> ProxyError | None:
        header = exchange.authorization
        if header is None:
            return self.missing
        now = exchange.t_start + exchange.worker.wall_offset
        cache = self.cache
        verdict = cache.entries.get(header[-KEY_TAIL:])
        if verdict is None or verdict.deadline <= now or verdict.key != header:
            cache.misses += 1
            verdict = self.authority.authenticate(exchange, header, now)
            error = verdict.error
            if error is not None:
                return error
        else:
            cache.hits += 1
        if self.required and not self.required <= verdict.scopes:
            return self.scope_error
        exchange.subject = verdict.subject
        if verdict.lines:
            exchange.add_request_lines(verdict.lines)
        return None


# ---------------------------------------------------------------------------------------------- helpers (misses)


def bearer_token(header: bytes) -> bytes | None:
    """The token of a `Bearer` credential (RFC 6750 2.1); None when the scheme is another one (or the
    value is empty); b"" when it is a malformed bearer credential (no token, a list, bad characters)."""
    if header[:7].lower() != _BEARER:
        return b"" if header.lower().strip() == b"bearer" else None
    token = header[7:].lstrip(b" ")
    if not token or token.translate(_IDENTITY_TABLE, _B64TOKEN):
        return b""
    return token


def first_look(rejected: TokenCache, missing: Verdict, header: bytes, now: float) -> Verdict | bytes:
    """What every authority checks first about an Authorization value: the rejection cached for it, or
    `missing` when it is no bearer credential; else its token (b"" when malformed)."""
    verdict = rejected.get(header, now)
    if verdict is not None:
        return verdict
    token = bearer_token(header)
    if token is None:
        return missing
    return token


def _quoted(text: str) -> bytes:
    """`text` made safe inside an HTTP quoted-string (our own messages: ASCII, no quote or backslash)."""
    return text.encode("ascii", "replace").replace(b'"', b"'").replace(b"\\", b"/")


def missing_token(realm: str) -> Unauthorized:
    """401 for a request without a bearer credential: a challenge without an error code (RFC 6750 3.1)."""
    return Unauthorized(
        MISSING_TOKEN,
        headers=((b"www-authenticate", b'Bearer realm="%s"' % _quoted(realm)),),
        fields={"error_description": "a bearer token is required"},
    )


def invalid_token(realm: str, description: str) -> Unauthorized:
    """401 `invalid_token` with a description (RFC 6750 3.1); never the token itself."""
    challenge = b'Bearer realm="%s", error="invalid_token", error_description="%s"' % (
        _quoted(realm),
        _quoted(description),
    )
    return Unauthorized(
        INVALID_TOKEN, headers=((b"www-authenticate", challenge),), fields={"error_description": description}
    )


def insufficient_scope(realm: str, required: tuple[str, ...]) -> Forbidden:
    """403 `insufficient_scope` naming the scopes the route requires (RFC 6750 3.1)."""
    scope = " ".join(required)
    description = f"the token lacks a required scope ({scope})"
    challenge = b'Bearer realm="%s", error="insufficient_scope", error_description="%s", scope="%s"' % (
        _quoted(realm),
        _quoted(description),
        _quoted(scope),
    )
    return Forbidden(
        INSUFFICIENT_SCOPE,
        headers=((b"www-authenticate", challenge),),
        fields={"error_description": description, "scope": scope},
    )


def claim_text(value: object) -> str:
    """A claim as a header value: strings as they are, numbers and booleans in JSON, a list of strings
    joined by spaces, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join([str(item) for item in value])
    return orjson.dumps(value).decode()


def header_value(value: object) -> bytes | None:
    """`claim_text(value)` in UTF-8, or None if it holds a control character (never a header value)."""
    data = claim_text(value).encode("utf-8", "replace")
    for byte in data:
        if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
            return None
    return data


def scopes_of(claims: dict[str, object]) -> frozenset[str]:
    """Granted scopes: `scope` (space-separated, RFC 8693 / 7662) or `scp` (a list or a string)."""
    value = claims.get("scope", claims.get("scp"))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset([item for item in value if isinstance(item, str)])
    return frozenset()


class IdentityMapper:
    """Turns verified claims into a `Verdict`: the subject claim and the forwarded-claim headers."""

    __slots__ = ("forward", "realm", "subject_claim")

    def __init__(self, realm: str, subject_claim: str, forward: tuple[tuple[str, str], ...]) -> None:
        self.realm = realm
        self.subject_claim = subject_claim
        self.forward = [(claim, header.encode()) for claim, header in forward]

    def verdict(self, claims: dict[str, object], deadline: float) -> Verdict:
        """An identity valid until `deadline`, or a 401 verdict when a claim cannot be used."""
        subject = claims.get(self.subject_claim)
        subject_value = None if subject is None or subject == "" else header_value(subject)
        if subject_value is None:
            return Verdict(
                deadline, error=invalid_token(self.realm, f"the token has no usable {self.subject_claim} claim")
            )
        lines: list[bytes] = []
        for claim, name in self.forward:
            if claim not in claims:
                continue
            value = header_value(claims[claim])
            if value is None:
                return Verdict(deadline, error=invalid_token(self.realm, f"claim {claim} cannot be a header value"))
            lines.append(b"%s: %s\r\n" % (name, value))
        return Verdict(deadline, subject=subject_value, lines=b"".join(lines), scopes=scopes_of(claims))
