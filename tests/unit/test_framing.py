from __future__ import annotations

import orjson
import pytest

from proxy.errors import BadGateway
from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, BodyKind
from proxy.forwarding import connection_tokens, valid_request_id
from proxy.http1.framing import ResponseHeadRewriter, chunk, error_response
from proxy.routing import Router, host_without_port


def test_rewriter_strips_hop_by_hop_and_nominated_headers() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: foo\r\nX-Request-Id: stale\r\n"
        b"Transfer-Encoding: chunked\r\nX-End: yes"
    )
    cleaned = ResponseHeadRewriter(drop=(b"x-request-id",)).clean(head)
    assert cleaned == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-End: yes"


def test_rewriter_keeps_lookalike_names_and_normalises_version() -> None:
    head = b"HTTP/1.0 404 Not Found\r\nX-Connection: 1\r\nConnectionx: 2\r\nTEA: 3"
    assert (
        ResponseHeadRewriter().clean(head) == b"HTTP/1.1 404 Not Found\r\nX-Connection: 1\r\nConnectionx: 2\r\nTEA: 3"
    )


def test_connection_tokens() -> None:
    assert connection_tokens(b" Keep-Alive , X-Foo,,close") == {b"keep-alive", b"x-foo", b"close"}


def test_chunk_encoding() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"


def test_error_response_is_complete_json() -> None:
    raw = error_response(503, "no_healthy_upstream", b"rid-1", close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nconnection: close" in head
    assert b"content-length: %d" % len(body) in head
    assert orjson.loads(body) == {"error": "no_healthy_upstream", "request_id": "rid-1"}


@pytest.mark.parametrize(
    ("value", "ok"), [(b"abc-123", True), (b"", False), (b"a b", False), (b"x" * 129, False), (b"\xff", False)]
)
def test_request_id_validation(value: bytes, ok: bool) -> None:
    assert valid_request_id(value) is ok


@pytest.mark.parametrize(
    ("head", "status", "method", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", 200, b"GET", BODY_LENGTH),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked", 200, b"GET", BODY_CHUNKED),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked  ", 200, b"GET", BODY_CHUNKED),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: gzip", 304, b"GET", BODY_NONE),
        (b"HTTP/1.1 200 OK\r\nServer: x", 200, b"GET", BODY_UNTIL_CLOSE),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", 200, b"HEAD", BODY_NONE),
        (b"HTTP/1.1 204 No Content", 204, b"GET", BODY_NONE),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5", 304, b"GET", BODY_NONE),
    ],
)
def test_response_body_kind(head: bytes, status: int, method: bytes, kind: BodyKind) -> None:
    found, cleaned = ResponseHeadRewriter().inspect(head, status, method == b"HEAD")
    assert found is kind
    assert b"transfer-encoding" not in cleaned.lower()


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: gzip, chunked",  # a coding the proxy cannot undo for the client
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked\t",  # llhttp reads the body to the close, not chunked
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5",
    ],
)
def test_response_framings_the_proxy_cannot_pass_on_are_502(framing: bytes) -> None:
    with pytest.raises(BadGateway):
        ResponseHeadRewriter().inspect(b"HTTP/1.1 200 OK\r\n" + framing, 200, False)


def test_inspect_leaves_plain_heads_alone() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b"
    assert ResponseHeadRewriter().inspect(head, 200, False) == (BODY_LENGTH, head)
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 5"
    assert ResponseHeadRewriter().inspect(old, 200, False)[1] == b"HTTP/1.1 200 OK\r\nContent-Length: 5"


def test_router_longest_prefix_and_hosts() -> None:
    router: Router[str] = Router(
        [(None, "/", "root"), (None, "/api/", "api"), (None, "/api/v2/", "v2"), ("Example.com", "/api/", "host-api")]
    )
    assert router.match(b"other", b"/api/v2/x?y=1") == "v2"
    assert router.match(b"other", b"/api/v1") == "api"
    assert router.match(b"other", b"/apix") == "root"
    assert router.match(b"EXAMPLE.com:8080", b"/api/v1") == "host-api"
    # A host's routes win over hostless ones, whatever their length (a virtual host, as in NGINX, Envoy and
    # Kong); the hostless routes are the fallback when none of the host's routes matches.
    assert router.match(b"example.com", b"/api/v2/x") == "host-api"
    assert router.match(b"example.com", b"/other") == "root"
    assert Router([(None, "/api/", "api")]).match(b"h", b"/nope") is None


def test_host_without_port() -> None:
    assert host_without_port(b"Example.COM:80") == b"example.com"
    assert host_without_port(b"[::1]:8080") == b"[::1]"
    assert host_without_port(b"h") == b"h"


def test_inspect_cuts_exactly_the_lines_clean_removes() -> None:
    """`inspect` removes lines by the offsets of its scan; `clean` by a case-insensitive regex pass: the same
    head comes out of both, whatever the mix of names, cases, blanks and Connection values."""
    import random

    rng = random.Random(1234)
    names = [
        b"Content-Length",
        b"content-length",
        b"Transfer-Encoding",
        b"Connection",
        b"CONNECTION",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"Upgrade",
        b"TE",
        b"Trailer",
        b"X-Request-Id",
        b"X-Hop",
        b"X-Connection",
        b"Connectionx",
        b"",
        b"Server",
        b"Date",
        b"Content-Type",
        b"TEA",
        b"Upgrade-Insecure",
    ]
    values = [b"keep-alive", b"close", b"Keep-Alive", b"keep-alive, X-Hop", b"x-hop", b"upgrade", b"5", b"", b"chunked"]
    values += [b"a: b", b"chunked ", b"close ", b" keep-alive\t"]
    rewriter = ResponseHeadRewriter(drop=(b"x-request-id",))
    compared = 0
    for _ in range(5000):
        lines = [rng.choice((b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"))]
        for _ in range(rng.randrange(0, 8)):
            name = rng.choice(names)
            value = rng.choice(values)
            if rng.random() < 0.05:
                lines.append(name + value)  # no colon at all
                continue
            lines.append(name + rng.choice((b"", b" ", b"\t")) + b":" + rng.choice((b"", b" ", b"  ")) + value)
        head = b"\r\n".join(lines)
        try:
            _, out = rewriter.inspect(head, 200, False)
        except BadGateway:
            continue
        assert out == rewriter.clean(head), head
        compared += 1
    assert compared > 2000
