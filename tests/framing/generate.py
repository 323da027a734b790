"""Generators of HTTP/1.1 request streams and upstream responses, valid and near-valid.

Theory of operation: every generator is a function of a `random.Random`, so one description of the
input space serves three drivers: hypothesis (`st.randoms()`, which records and shrinks each choice),
the differential oracle (a seeded `Random` per case: case N of a run is reproducible from its seed
alone) and the mutation fuzzers (seeds). Most choices are valid; each element also has near-valid
variants (odd bytes in names and values, framing header variants, chunk extensions and trailers,
whitespace and line-ending slips), drawn rarely enough that a stream of several requests usually
gets past its first one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

Rng = random.Random

METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH")
ODD_METHODS = (b"FOO", b"get", b"CONNECT", b"TRACE", b"PROPFIND", b"G\x00T", b"")
TARGETS = (b"/", b"/a/b?x=1&y=2", b"/echo/x", b"/api/v1/items", b"/a%20b", b"/p?q=%2F", b"/~u/;p")
ODD_TARGETS = (
    b"*",
    b"http://h.example/abs?q",
    b"http://h.example",
    b"https://h.example:8443/p",
    b"HTTP://h/x",
    b"http://u@h/x",
    b"/a/../b",
    b"/a/./b",
    b"/%2e%2e/x",
    b"/a/%2E/b",
    b"/a#frag",
    b"//double",
    b"?q",
    b"h/p",
    b"/\x80\xff",
    b"/a\tb",
    b"/a b",
    b"/" + b"x" * 5000,
)
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
ODD_VERSIONS = (b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/11", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/3.0")
HOSTS = (b"h", b"example.com", b"example.com:8080", b"127.0.0.1", b"[::1]:80")
ODD_HOSTS = (b"", b"a b", b"a/b", b"a@b", b"a%41", b"a:b:c", b"[::1", b"h\x80", b"h ", b"a,b", b"h:99999")
NAMES = (b"Accept", b"User-Agent", b"X-Custom", b"Cookie", b"Authorization", b"x-a", b"Cache-Control", b"Via")
SPECIAL_NAMES = (
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Upgrade",
    b"Expect",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Request-Id",
    b"Proxy-Authorization",
)
ODD_NAMES = (b"X Y", b" X", b"X ", b"X\x7f", b"X\x80", b"X\t", b"X\x00", b"X;", b"X@", b"", b'X"', b"{X}")
VALUES = (b"v", b"text/html, */*;q=0.8", b"a=b; c=d", b"", b"Bearer abc.def", b"1.2.3.4", b"max-age=0")
ODD_VALUES = (
    b" padded ",
    b"\tv\t",
    b"a\x80\xffb",
    b"a\x7fb",
    b"a\x01b",
    b"a\x00b",
    b"a\rb",
    b"a\nb",
    b"a\r\n b",
    b"a\r\n\tb",
    b"\x0bv",
    b"a\x1fb",
    b'"quoted, comma"',
)
LENGTH_FORMS = (b"%d", b" %d", b"%d ", b"0%d", b"+%d", b"-%d", b"%d,%d", b"%d, %d", b"0x%x", b"%d.0", b"%da")
TE_VALUES = (
    b"chunked",
    b"Chunked",
    b"CHUNKED",
    b" chunked ",
    b"chunked\t",
    b"\tchunked",
    b"chunked, chunked",
    b"gzip, chunked",
    b"chunked, gzip",
    b"identity",
    b"gzip",
    b"chunked;q=1",
    b"\x0bchunked",
    b"chunked\x00",
    b"chunk",
    b"",
    b"identity, chunked",
    b"chunked,",
    b",chunked",
)
CONNECTION_VALUES = (
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"close, X-Custom",
    b"X-Custom",
    b"content-length",
    b"transfer-encoding",
    b"keep-alive, TE",
    b"Close",
    b"host",
)
EXTENSIONS = (b";a=b", b";a", b';a="q;x"', b" ;a=b", b";a=b;c", b";\ta", b"\t;a", b";a=", b";=b", b";a=b\x80")
TRAILERS = (
    b"X-T: v\r\n",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Bad Trailer\r\n",
    b"X:\x01\r\n",
)
STATUSES = (200, 201, 204, 206, 301, 304, 400, 404, 500, 503)
ODD_STATUSES = (100, 101, 102, 103, 199, 600, 999, 0, 99)


def _odd(rng: Rng, rate: float) -> bool:
    """Draw a near-valid variant (never when `rate` is 0, whatever the draw)."""
    return rate > 0 and rng.random() < rate


def _pick(rng: Rng, common: Sequence[bytes], odd: Sequence[bytes], odd_rate: float) -> bytes:
    return rng.choice(odd) if _odd(rng, odd_rate) else rng.choice(common)


def _body(rng: Rng) -> bytes:
    size = rng.choice((0, 1, 3, 10, 100, 1000, 5000))
    return bytes(rng.choice(b"abcdefghij\r\n0;") for _ in range(size)) if size <= 100 else b"b" * size


def _eol(rng: Rng, odd: float) -> bytes:
    return _pick(rng, (b"\r\n",), (b"\n", b"\r", b"\r\r\n", b" \r\n"), odd)


@dataclass
class Options:
    """How often each near-valid variant is drawn (0: never)."""

    odd: float = 0.04  # each element of a request or response
    pipeline: int = 4  # most requests in one stream


def chunked_body(rng: Rng, body: bytes, odd: float) -> bytes:
    """`body` as chunks, sometimes with extensions, odd size forms or trailers."""
    pieces = []
    rest = body
    while rest:
        size = rng.randint(1, len(rest))
        form = _pick(
            rng, (b"%x", b"%X"), (b"0%x", b"%x ", b" %x", b"0x%x", b"-%x", b"%xg", b"fffffffffffffffff%x"), odd
        )
        ext = rng.choice(EXTENSIONS) if _odd(rng, 4 * odd) else b""
        tail = _pick(rng, (b"\r\n",), (b"\n", b"", b"X\r\n", b"\r\n\r\n"), odd)
        pieces.append(form % size + ext + _eol(rng, odd) + rest[:size] + tail)
        rest = rest[size:]
    last = _pick(rng, (b"0",), (b"00", b"0;a=b", b"000000", b" 0"), 2 * odd)
    trailers = b"".join(rng.choice(TRAILERS) for _ in range(rng.choice((0, 0, 0, 1, 2)) if odd else 0))
    return b"".join(pieces) + last + b"\r\n" + trailers + _eol(rng, odd)


def request(rng: Rng, options: Options | None = None) -> bytes:
    """One request (valid with a probability of roughly (1 - odd) ** 10)."""
    opt = options or Options()
    odd = opt.odd
    method = _pick(rng, METHODS, ODD_METHODS, odd)
    target = _pick(rng, TARGETS, ODD_TARGETS, odd)
    if method == b"OPTIONS" and rng.random() < 0.2:
        target = b"*"
    version = _pick(rng, VERSIONS, ODD_VERSIONS, odd)
    sp = _pick(rng, (b" ",), (b"  ", b"\t", b""), odd)
    headers: list[tuple[bytes, bytes]] = []
    if not _odd(rng, odd):
        headers.append(
            (_pick(rng, (b"Host", b"host", b"HOST"), (b"Host ", b" Host"), odd), _pick(rng, HOSTS, ODD_HOSTS, odd))
        )
    if _odd(rng, odd):
        headers.append((b"Host", rng.choice(HOSTS)))
    for _ in range(rng.choice((0, 0, 1, 2, 3))):
        headers.append((_pick(rng, NAMES, ODD_NAMES, odd), _pick(rng, VALUES, ODD_VALUES, odd)))
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        name = rng.choice(SPECIAL_NAMES)
        value = rng.choice(CONNECTION_VALUES) if name == b"Connection" else _pick(rng, VALUES, ODD_VALUES, odd)
        if name == b"Expect":
            value = _pick(rng, (b"100-continue",), (b"magic", b"100-Continue"), 0.3 if odd else 0.0)
        if name == b"Upgrade":
            if not odd:
                continue  # (an Upgrade request with a body is refused)
            value = b"websocket"
        headers.append((name, value))
    body = b""
    framing = rng.random()
    wants_body = method in (b"POST", b"PUT", b"PATCH") or _odd(rng, odd)
    if wants_body and framing < 0.45:
        body = _body(rng)
        declared = len(body) if not _odd(rng, odd) else max(0, len(body) + rng.choice((-2, -1, 1, 7)))
        form = _pick(rng, (b"%d",), LENGTH_FORMS, odd)
        headers.append(
            (
                _pick(rng, (b"Content-Length", b"content-length"), (b"Content-Length ", b"Content_Length"), odd),
                form.replace(b"%d", b"%d" % declared).replace(b"%x", b"%x" % declared),
            )
        )
        if _odd(rng, odd):
            headers.append((b"Content-Length", rng.choice((b"%d" % declared, b"%d" % (declared + 1)))))
    elif wants_body and framing < 0.9 and (odd or version == b"HTTP/1.1"):
        headers.append((b"Transfer-Encoding", _pick(rng, (b"chunked",), TE_VALUES, odd)))
        if _odd(rng, odd):
            headers.append(rng.choice(((b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3"))))
        body = chunked_body(rng, _body(rng), odd)
    rng.shuffle(headers)
    lines = b"".join(
        name + _pick(rng, (b": ",), (b":", b" : ", b":\t", b":  "), odd) + value + _eol(rng, odd)
        for name, value in headers
    )
    return method + sp + target + sp + version + _eol(rng, odd) + lines + _eol(rng, odd) + body


def request_stream(rng: Rng, options: Options | None = None) -> bytes:
    """A pipeline of requests, sometimes followed by a partial one or stray bytes."""
    opt = options or Options()
    stream = b"".join(request(rng, opt) for _ in range(rng.randint(1, opt.pipeline)))
    tail = rng.random()
    if tail < 0.1:
        partial = request(rng, opt)
        stream += partial[: rng.randint(0, len(partial))]
    elif tail < 0.1 + opt.odd:
        stream += rng.choice((b"\r\n", b"\r\n\r\n", b"GARBAGE", b"\x00", b"\n"))
    return stream


def cuts(rng: Rng, size: int, most: int = 6) -> list[int]:
    """Offsets at which to cut a `size`-byte stream into reads (none, a few, or one byte at a time)."""
    if size < 2:
        return []
    shape = rng.random()
    if shape < 0.05 and size <= 400:
        return list(range(1, size))
    return sorted(rng.randint(1, size - 1) for _ in range(rng.randint(0, most)))


@dataclass
class UpstreamCase:
    """An upstream response and how the exchange around it goes."""

    method: bytes  # of the client's request
    response: bytes
    eof: bool  # the upstream closes after sending it


def response(rng: Rng, head_request: bool, options: Options | None = None) -> bytes:
    """One upstream response, maybe after informational ones, maybe near-valid."""
    opt = options or Options()
    odd = opt.odd
    out = b""
    while rng.random() < 0.1:
        out += b"HTTP/1.1 %d Info\r\nX-I: 1\r\n\r\n" % rng.choice((100, 102, 103))
    status = rng.choice(ODD_STATUSES) if _odd(rng, odd) else rng.choice(STATUSES)
    version = _pick(rng, (b"HTTP/1.1", b"HTTP/1.0"), (b"HTTP/1.2", b"HTTP/2", b"http/1.1", b"HTTP/1.1 "), odd)
    reason = _pick(rng, (b"OK", b"Whatever", b""), (b"\x80\xff", b"a\tb", b"a\x01b"), odd)
    headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"text/plain")]
    for _ in range(rng.choice((0, 1, 2))):
        headers.append((_pick(rng, NAMES, ODD_NAMES, odd / 2), _pick(rng, VALUES, ODD_VALUES, odd / 2)))
    for _ in range(rng.choice((0, 0, 1, 2))):
        name = rng.choice((b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Upgrade", b"Trailer", b"X-Request-Id"))
        headers.append((name, rng.choice(CONNECTION_VALUES) if name == b"Connection" else b"v"))
    if rng.random() < 0.2:
        headers.append((b"X-Custom", b"nominated?"))
    body = _body(rng)
    framing = rng.random()
    payload = body
    if framing < 0.45:
        declared = len(body) if not _odd(rng, odd) else max(0, len(body) + rng.choice((-1, 1, 5)))
        headers.append(
            (
                b"Content-Length",
                _pick(rng, (b"%d",), LENGTH_FORMS, odd)
                .replace(b"%d", b"%d" % declared)
                .replace(b"%x", b"%x" % declared),
            )
        )
        if _odd(rng, odd):
            headers.append((b"Transfer-Encoding", b"chunked"))
    elif framing < 0.85:
        headers.append((b"Transfer-Encoding", _pick(rng, (b"chunked",), TE_VALUES, odd)))
        payload = chunked_body(rng, body, odd)
    if head_request and not _odd(rng, odd):
        payload = b""
    if status in (204, 304) and not _odd(rng, odd):
        payload = b""
    rng.shuffle(headers)
    lines = b"".join(name + b": " + value + _eol(rng, odd / 2) for name, value in headers)
    out += version + b" %d " % status + reason + _eol(rng, odd / 2) + lines + _eol(rng, odd / 2) + payload
    if _odd(rng, odd):
        out += rng.choice((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"garbage", b"\r\n"))
    return out


def upstream_case(rng: Rng, options: Options | None = None) -> UpstreamCase:
    method = b"HEAD" if rng.random() < 0.15 else b"GET"
    return UpstreamCase(method, response(rng, method == b"HEAD", options), rng.random() < 0.7)
