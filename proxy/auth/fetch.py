"""A small HTTP/1.1 client for the auth services (JWKS, token introspection): slow path, one call at a time.

Theory of operation: each call opens a connection on the worker's own event loop (TLS for https, the
system's CA store or a configured CA file), sends one request with `Connection: close`, reads the
response through httptools' parser and closes. Everything from connect to the last byte is bounded
by `timeout`, and the response (head and body) by `max_bytes`. No thread and no blocking call: host
names are resolved by the loop (uvloop asks libuv's resolver pool). Failures raise `FetchError`, whose
message says what went wrong and never includes the request body (it may carry a token).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class FetchError(Exception):
    """A call that did not produce a complete response (refused, timed out, too large, malformed)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a URL points: host, port, request target, and the TLS context for https (else None)."""

    url: str
    host: str
    port: int
    target: str
    tls: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str, ca_file: str = "") -> Endpoint:
        """From an http:// or https:// URL (validated by the config already)."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        tls = ssl.create_default_context(cafile=ca_file or None) if https else None
        return cls(url=url, host=host, port=port, target=target, tls=tls)

    @property
    def host_header(self) -> str:
        default = 443 if self.tls is not None else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class _Response:
    """httptools callback target: status, body, completeness."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.framed = False  # Content-Length or Transfer-Encoding: else the body ends with the connection

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_bytes:
            raise FetchError(f"response body larger than {self.max_bytes} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def request(
    endpoint: Endpoint,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    timeout: float,
    max_bytes: int,
) -> tuple[int, bytes]:
    """(status, body) of one request to `endpoint`; raises FetchError."""
    lines = [f"{method} {endpoint.target} HTTP/1.1", f"Host: {endpoint.host_header}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(endpoint, head + body, max_bytes)
    except TimeoutError:
        raise FetchError(f"no complete response within {timeout:g}s") from None
    except OSError as exc:
        raise FetchError(f"{type(exc).__name__}: {exc.strerror or exc}") from None


async def _exchange(endpoint: Endpoint, data: bytes, max_bytes: int) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, ssl=endpoint.tls, server_hostname=endpoint.host if endpoint.tls else None
    )
    try:
        writer.write(data)
        response = _Response(max_bytes)
        parser = httptools.HttpResponseParser(response)
        received = 0
        while not response.complete:
            chunk = await reader.read(65536)
            if not chunk:
                if parser.get_status_code() and not response.framed:
                    break  # a body delimited by the close
                raise FetchError("connection closed before the response was complete")
            received += len(chunk)
            if received > max_bytes + 16384:
                raise FetchError(f"response larger than {max_bytes} bytes")
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserCallbackError as exc:
                if isinstance(exc.__context__, FetchError):
                    raise exc.__context__ from None
                raise FetchError("malformed response") from None
            except httptools.HttpParserError:
                raise FetchError("malformed response") from None
        return parser.get_status_code(), b"".join(response.body)
    finally:
        writer.close()
