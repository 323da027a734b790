"""auth_stub HTTP routes over the shared server core; all token logic lives in ``issuer``.

Each route allows one method (GET routes also HEAD); another method gets 405 with ``Allow``.
POST bodies are collected (at most 1 MiB) before the route runs. ``TokenRequestError`` and
malformed bodies become 400 here, at the HTTP boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs

import orjson

from auth_stub.issuer import TokenIssuer, TokenRequestError
from backend_stub.httpcore import (
    BufferedHandler,
    Endpoint,
    Handler,
    HttpConnection,
    HttpError,
    PreEncoded,
    Request,
    ServerState,
)

_NO_STORE: Final = ((b"Cache-Control", b"no-store"),)
BodyRoute = Callable[[Request, bytes, HttpConnection], None]


def _json_body(body: bytes, *, empty: object = None) -> Any:
    if not body.strip():
        if empty is None:
            raise HttpError(400, "request body must be a JSON object")
        return empty
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(400, "request body is not valid JSON") from None


class AuthApp:
    """The auth stub's routes; one instance per (single) worker."""

    __slots__ = ("_get", "_issuer", "_not_found", "_post")

    def __init__(self, state: ServerState, issuer: TokenIssuer) -> None:
        self._issuer = issuer
        self._not_found = PreEncoded(state, 404, b'{"error":"not found"}')
        self._get: dict[bytes, Handler] = {
            b"/health": PreEncoded(state, 200, b'{"status":"ok"}'),
            b"/.well-known/jwks.json": Endpoint(self._jwks),
        }
        self._post: dict[bytes, BodyRoute] = {
            b"/token": self._token,
            b"/rotate": self._rotate,
            b"/introspect": self._introspect,
        }

    def dispatch(self, request: Request) -> Handler:
        path = request.path
        method = request.method
        handler = self._get.get(path)
        if handler is not None:
            return handler if method in (b"GET", b"HEAD") else _method_not_allowed(b"GET, HEAD")
        route = self._post.get(path)
        if route is not None:
            return BufferedHandler(route) if method == b"POST" else _method_not_allowed(b"POST")
        return self._not_found

    def _jwks(self, request: Request, conn: HttpConnection) -> None:
        conn.send_json(200, self._issuer.keys.jwks())

    def _token(self, request: Request, body: bytes, conn: HttpConnection) -> None:
        try:
            answer = self._issuer.mint(_json_body(body))
        except TokenRequestError as exc:
            raise HttpError(400, str(exc)) from None
        conn.send_json(200, answer, headers=_NO_STORE)

    def _rotate(self, request: Request, body: bytes, conn: HttpConnection) -> None:
        options = _json_body(body, empty={})
        alg = options.get("alg", "RS256") if isinstance(options, dict) else None
        if not isinstance(alg, str):
            raise HttpError(400, "body must be a JSON object with an optional alg")
        try:
            new = self._issuer.keys.rotate(alg)
        except TokenRequestError as exc:
            raise HttpError(400, str(exc)) from None
        conn.send_json(200, {"kid": new.kid, "published": [key.kid for key in self._issuer.keys.published()]})

    def _introspect(self, request: Request, body: bytes, conn: HttpConnection) -> None:
        token: object = None
        if body.lstrip().startswith(b"{"):
            document = _json_body(body)
            token = document.get("token") if isinstance(document, dict) else None
        else:
            values = parse_qs(body.decode("latin-1")).get("token")
            token = values[-1] if values else None
        if not isinstance(token, str) or not token:
            raise HttpError(400, "invalid_request: token is required")
        conn.send_json(200, self._issuer.introspect(token), headers=_NO_STORE)


def _method_not_allowed(allow: bytes) -> Handler:
    headers = ((b"Allow", allow),)
    return Endpoint(lambda request, conn: conn.send_json(405, {"error": "method not allowed"}, headers=headers))
