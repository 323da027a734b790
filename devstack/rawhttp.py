"""Raw HTTP/1.1 over a blocking socket, with deadlines, for tests that need exact bytes on the wire.

`parse_response` is pure (bytes in, response out); `RawHTTPConnection` adds a socket so a test can
send malformed or pipelined requests, read responses one at a time and see when the peer closes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RawHTTPConnection", "RawResponse", "build_request", "parse_response", "raw_request"]

MAX_HEAD = 1024 * 1024

Headers = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One parsed response; header names keep their case, lookups ignore it."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    trailers: tuple[tuple[str, str], ...] = ()
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header `name`, or None."""
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name`, in order."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def _parse_fields(lines: list[str]) -> tuple[tuple[str, str], ...]:
    fields = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line!r}")
        fields.append((name, value.strip(" \t")))
    return tuple(fields)


def _parse_chunked(buf: bytes, pos: int) -> tuple[bytes, tuple[tuple[str, str], ...], int] | None:
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = buf[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError(f"malformed chunk size {size_text!r}") from None
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)
            trailer_lines: list[str] = []
            while end >= 0 and end != pos:
                trailer_lines.append(buf[pos:end].decode("latin-1"))
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return bytes(body), _parse_fields(trailer_lines), end + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        body += buf[pos : pos + size]
        pos += size + 2


def parse_response(buf: bytes, *, head_request: bool = False, eof: bool = False) -> tuple[RawResponse, int] | None:
    """Parse one response from the start of `buf`: (response, bytes consumed), or None if incomplete.

    `head_request`: the request was HEAD (no body follows). `eof`: the peer has closed, which
    completes a response delimited by connection close. Raises ValueError on malformed input.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ValueError("response head larger than 1 MiB")
        if eof and buf:
            raise ValueError(f"connection closed inside the response head: {buf[:200]!r}")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(status_text) != 3 or not status_text.isdigit():
        raise ValueError(f"malformed status line {lines[0]!r}")
    status = int(status_text)
    headers = _parse_fields(lines[1:])
    pos = end + 4

    def done(body: bytes, consumed: int, trailers: tuple[tuple[str, str], ...] = ()) -> tuple[RawResponse, int]:
        response = RawResponse(version, status, reason, headers, body, trailers, bytes(buf[:consumed]))
        return response, consumed

    lookup = {k.lower(): v for k, v in headers}
    if head_request or 100 <= status < 200 or status in (204, 304):
        return done(b"", pos)
    codings = [c.strip().lower() for c in lookup.get("transfer-encoding", "").split(",") if c.strip()]
    if codings and codings[-1] == "chunked":
        chunked = _parse_chunked(buf, pos)
        if chunked is None:
            if eof:
                raise ValueError("connection closed inside a chunked body")
            return None
        body, trailers, consumed = chunked
        return done(body, consumed, trailers)
    if "content-length" in lookup and not codings:
        length = int(lookup["content-length"])
        if len(buf) < pos + length:
            if eof:
                raise ValueError(f"connection closed after {len(buf) - pos} of {length} body bytes")
            return None
        return done(bytes(buf[pos : pos + length]), pos + length)
    if not eof:
        return None
    return done(bytes(buf[pos:]), len(buf))


def build_request(
    method: str = "GET",
    target: str = "/",
    *,
    headers: Headers = (),
    body: bytes = b"",
    host: str | None = "localhost",
    version: str = "HTTP/1.1",
) -> bytes:
    """Request bytes; adds Host (unless `host` is None or given) and Content-Length for a body."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {k.lower() for k, _ in pairs}
    if host is not None and "host" not in names:
        pairs.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    return head.encode("latin-1") + body


class RawHTTPConnection:
    """A blocking client connection; every read has a deadline (TimeoutError past it)."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> RawHTTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def request(self, method: str = "GET", target: str = "/", **kwargs: Any) -> None:
        """Send `build_request(method, target, **kwargs)` with Host defaulting to host:port."""
        kwargs.setdefault("host", f"{self.host}:{self.port}")
        self.send(build_request(method, target, **kwargs))

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete response from {self.host}:{self.port} in time; have {self.buffer[:200]!r}")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if data:
            self.buffer += data
        else:
            self.eof = True

    def read_response(self, *, head_request: bool = False, timeout: float | None = None) -> RawResponse:
        """Read the next response (1xx responses are returned too; call again for the final one)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            parsed = parse_response(self.buffer, head_request=head_request, eof=self.eof)
            if parsed is not None:
                response, consumed = parsed
                self.buffer = self.buffer[consumed:]
                return response
            if self.eof:
                raise ConnectionError(f"{self.host}:{self.port} closed the connection before a response")
            self._fill(deadline)

    def _fill_until_closed(self, deadline: float) -> None:
        while not self.eof:
            self._fill(deadline)

    def read_until_closed(self, timeout: float | None = None) -> bytes:
        """Everything until the peer closes (buffered bytes included); TimeoutError if it does not."""
        self._fill_until_closed(time.monotonic() + (self.timeout if timeout is None else timeout))
        data, self.buffer = self.buffer, b""
        return data

    def closed_by_peer(self, timeout: float) -> bool:
        """True if the peer closes (or resets) within `timeout`; bytes received meanwhile stay buffered."""
        try:
            self._fill_until_closed(time.monotonic() + timeout)
        except TimeoutError:
            return False
        except ConnectionResetError:
            self.eof = True
        return True


def raw_request(
    host: str,
    port: int,
    method: str = "GET",
    target: str = "/",
    *,
    headers: Headers = (),
    body: bytes = b"",
    timeout: float = 5.0,
) -> RawResponse:
    """One request on a fresh connection, one response read within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with RawHTTPConnection(host, port, timeout=timeout) as conn:
        conn.request(method, target, headers=headers, body=body)
        return conn.read_response(head_request=method == "HEAD", timeout=max(0.0, deadline - time.monotonic()))
