"""Auth services inside the test process, for tests that control their timing: a JWKS endpoint and an RFC 7662
introspection endpoint, each answering from auth_stub's own key ring and issuer (auth_stub.issuer), each able
to hold its answers until the test lets them go, counting the requests it got."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import parse_qs

import orjson

from auth_stub.issuer import KeyRing, TokenIssuer


class StubServer:
    """A one-request-per-connection HTTP/1.1 server on 127.0.0.1; `gate` cleared holds every answer."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.requests = 0
        self.port = 0
        self.status = 200
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StubServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def answer(self, body: bytes) -> bytes:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            self.requests += 1
            await self.gate.wait()
            payload = self.answer(body)
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (self.status, len(payload), payload)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


class JwksServer(StubServer):
    """GET anything: the JWKS of `keys` (auth_stub's KeyRing)."""

    def __init__(self, keys: KeyRing, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.keys = keys
        self.padding = 0  # bytes of whitespace after the document (a JWKS too large)

    def answer(self, body: bytes) -> bytes:
        return orjson.dumps(self.keys.jwks()) + b" " * self.padding


class IntrospectionServer(StubServer):
    """POST token=...: auth_stub's RFC 7662 answer for it (`issuer.introspect`)."""

    def __init__(self, issuer: TokenIssuer) -> None:
        super().__init__()
        self.issuer = issuer
        self.tokens: list[str] = []
        self.extra: dict[str, Any] = {}

    def answer(self, body: bytes) -> bytes:
        token = parse_qs(body.decode())["token"][0]
        self.tokens.append(token)
        answer = self.issuer.introspect(token)
        if answer["active"]:
            answer.update(self.extra)
        return orjson.dumps(answer)
