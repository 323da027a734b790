"""Exception hierarchy: each error knows the HTTP status and the short code it maps to.

Protocol shells catch `ProxyError` and answer with the pre-encoded error response for
`status`; nothing else needs an `isinstance` chain.
"""

from __future__ import annotations


class IllegalTransition(RuntimeError):
    """An exchange was asked to change phase in a way its state machine forbids (a bug, never input)."""


class ConfigError(Exception):
    """A configuration file failed validation; `problems` lists (key, value, reason)."""

    def __init__(self, problems: list[tuple[str, object, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{key}: {reason} (got {value!r})" for key, value, reason in problems))


class ProxyError(Exception):
    """Base class of errors answered with an HTTP status."""

    status = 500
    code = "internal_error"
    close = False  # close the downstream connection after answering

    def __init__(
        self,
        detail: str = "",
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        fields: dict[str, object] | None = None,
    ) -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code  # the `error` code of the JSON answer
        self.headers = headers  # extra response headers (WWW-Authenticate, Retry-After, RateLimit-*)
        self.fields = fields  # extra members of the JSON answer


class Suspended(ProxyError):
    """Not an answer: what a pipeline step returns after parking its exchange (`gateway.WAIT`)."""

    status = 503
    code = "suspended"


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"
    close = True


class Unauthorized(ProxyError):
    """No valid credentials (RFC 6750: missing, malformed, expired or unverifiable bearer token)."""

    status = 401
    code = "invalid_token"


class Forbidden(ProxyError):
    """Valid credentials without what the route requires (a scope)."""

    status = 403
    code = "insufficient_scope"


class NotFound(ProxyError):
    status = 404
    code = "no_route"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    close = True


class ExpectationFailed(ProxyError):
    status = 417
    code = "expectation_failed"
    close = True


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"
    close = True


class HeadersTooLarge(ProxyError):
    status = 431
    code = "request_header_fields_too_large"
    close = True


class TooManyRequests(ProxyError):
    """A rate limit of the route is spent (RFC 6585 4): `Retry-After` says when to come back."""

    status = 429
    code = "rate_limited"


class NotImplementedByProxy(ProxyError):
    status = 501
    code = "not_implemented"
    close = True


class VersionNotSupported(ProxyError):
    status = 505
    code = "http_version_not_supported"
    close = True


class BadGateway(ProxyError):
    status = 502
    code = "bad_gateway"


class ServiceUnavailable(ProxyError):
    status = 503
    code = "service_unavailable"


class GatewayTimeout(ProxyError):
    status = 504
    code = "gateway_timeout"
