"""HTTP/1.1 forwarding through a real proxy process to the real backend_stub, over real sockets.

Covers connection reuse (downstream keep-alive, pipelining, the upstream keep-alive pool), header
rewriting (hop-by-hop removal both ways, X-Forwarded-*, X-Request-Id, Via), message semantics
(HEAD, 204, 304, Expect: 100-continue, HTTP/1.0 clients) and routing (404, host routes).
The backend_stub fixture is shared by the whole session: its counters are only compared as deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, RawResponse, Service
from devstack.rawhttp import build_request, parse_response
from tests.helpers import CLOSE_TIMEOUT, IO_TIMEOUT, assert_json_error, backend_stats, pattern

API_BODY = {"id": 1, "name": "resource", "tags": ["a", "b"], "ok": True}

Connect = Callable[..., RawHTTPConnection]


def _config(server: dict[str, Any] | None = None, routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "server": dict(server or {}),
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
        "routes": routes if routes is not None else [{"prefix": "/", "upstream": "backend"}],
    }


def _get(conn: RawHTTPConnection, target: str, **kwargs: Any) -> RawResponse:
    conn.request("GET", target, **kwargs)
    return conn.read_response()


def _echo(conn: RawHTTPConnection, target: str = "/echo", **kwargs: Any) -> dict[str, Any]:
    """One request to an /echo path on `conn`; the backend's view of it."""
    method = kwargs.pop("method", "GET")
    conn.request(method, target, **kwargs)
    response = conn.read_response()
    assert response.status == 200, response.raw[:500]
    echoed: dict[str, Any] = response.json()
    assert echoed["path"] == target
    return echoed


# ---------------------------------------------------------------------------------------------- connection reuse


def test_keep_alive_reuses_one_upstream_connection(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    # Each /stats call is itself one accepted connection (counted before it answers).
    before = backend_stats(backend_stub)["connections_accepted"]
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for i in range(50):
        _echo(conn, f"/echo/keepalive-{i}")
    assert not conn.closed_by_peer(0.05)
    middle = backend_stats(backend_stub)["connections_accepted"]
    assert middle - before - 1 == 1, "50 requests on one client connection should use one upstream connection"

    for c in range(5):
        client = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
        for i in range(9):
            _echo(client, f"/echo/client-{c}-{i}")
        last = _get(client, f"/echo/client-{c}-last", headers={"Connection": "close"})
        assert last.status == 200
        assert last.header("connection") == "close"
        assert client.closed_by_peer(CLOSE_TIMEOUT)
        client.close()
    after = backend_stats(backend_stub)["connections_accepted"]
    assert after - middle - 1 == 0, "sequential client connections should reuse the pooled upstream connection"


def test_pipelined_requests_answered_in_order(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    delays = [400, 300, 200, 100, 0]
    host = f"{proxy.host}:{proxy.port}"
    batch = [
        build_request("GET", f"/delay?ms={ms}", headers={"X-Request-Id": f"pipe-delay-{i}"}, host=host)
        for i, ms in enumerate(delays)
    ]
    batch += [build_request("GET", f"/echo/pipe-{i}", host=host) for i in range(3)]
    batch.append(build_request("POST", "/echo/pipe-body", body=b"pipelined body", host=host))
    batch.append(build_request("GET", "/echo/pipe-last", host=host))
    conn.send(b"".join(batch))

    for i in range(len(delays)):
        response = conn.read_response(timeout=10.0)
        assert response.status == 200
        assert response.header("x-request-id") == f"pipe-delay-{i}"
        assert response.json() == API_BODY
    for i in range(3):
        assert conn.read_response().json()["path"] == f"/echo/pipe-{i}"
    with_body = conn.read_response().json()
    assert (with_body["path"], with_body["method"], with_body["body"]) == ("/echo/pipe-body", "POST", "pipelined body")
    assert conn.read_response().json()["path"] == "/echo/pipe-last"
    # Nothing extra, and the connection is still usable.
    assert conn.buffer == b""
    _echo(conn, "/echo/after-pipeline")


# ---------------------------------------------------------------------------------------------- headers


def test_request_hop_by_hop_headers_not_forwarded(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    echoed = _echo(
        conn,
        headers=[
            ("Connection", "keep-alive, X-Custom-Hop"),
            ("X-Custom-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "foo/1"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End-To-End-Req", "yes"),
        ],
    )
    seen = echoed["headers"]
    for name in ("connection", "x-custom-hop", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert name not in seen, f"hop-by-hop request header {name!r} reached the backend: {seen}"
    assert seen["x-end-to-end-req"] == "yes"
    # The connection is still keep-alive for the client.
    _echo(conn, "/echo/second")


def test_upgrade_request_answered_as_plain_http(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    echoed = _echo(conn, headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
    assert "upgrade" not in echoed["headers"]
    assert "connection" not in echoed["headers"]
    _echo(conn, "/echo/after-upgrade")


def test_response_hop_by_hop_headers_stripped(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    response = _get(conn, "/hop")
    assert response.status == 200
    assert response.json() == {"ok": True}
    for name in ("X-Hop-Custom", "Keep-Alive", "Proxy-Connection", "Upgrade"):
        assert response.header(name) is None, f"{name} leaked to the client: {response.headers}"
    for value in response.header_values("connection"):
        assert "x-hop-custom" not in value.lower()
    assert response.header("x-end-to-end") == "yes"
    _echo(conn, "/echo/after-hop")


def test_forwarded_headers(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    echoed = _echo(
        conn,
        host="gw.example:8443",
        headers=[
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "spoofed.example"),
        ],
    )
    seen = echoed["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "gw.example:8443"
    raw_names = [name.lower() for name, _ in echoed["raw_headers"]]
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
        assert raw_names.count(name) == 1, echoed["raw_headers"]
    assert "via" not in seen  # no `via` configured

    plain = _echo(conn, "/echo/no-xff")["headers"]
    assert plain["x-forwarded-for"] == "127.0.0.1"
    assert plain["x-forwarded-host"] == f"{proxy.host}:{proxy.port}"


def test_request_id_generated_kept_and_echoed(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)

    ids = []
    for i in range(2):
        conn.request("GET", f"/echo/rid-{i}")
        response = conn.read_response()
        backend_id = response.json()["headers"]["x-request-id"]
        assert backend_id
        assert response.header_values("x-request-id") == [backend_id]
        ids.append(backend_id)
    assert ids[0] != ids[1]

    conn.request("GET", "/echo/rid-client", headers={"X-Request-Id": "client-abc-123"})
    response = conn.read_response()
    echoed = response.json()
    assert echoed["headers"]["x-request-id"] == "client-abc-123"
    assert [n.lower() for n, _ in echoed["raw_headers"]].count("x-request-id") == 1
    assert response.header_values("x-request-id") == ["client-abc-123"]

    # An upstream's own x-request-id does not replace or duplicate the proxy's.
    upstream_set = _get(conn, "/headers?x-request-id=from-upstream", headers={"X-Request-Id": "client-def-456"})
    assert upstream_set.status == 200
    assert upstream_set.header_values("x-request-id") == ["client-def-456"]

    # An id the proxy cannot safely forward (too long) is replaced by a generated one.
    too_long = "x" * 300
    conn.request("GET", "/echo/rid-long", headers={"X-Request-Id": too_long})
    response = conn.read_response()
    replaced = response.json()["headers"]["x-request-id"]
    assert replaced and replaced != too_long
    assert response.header("x-request-id") == replaced


def test_via_header_added(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(server={"via": "1.1 uvgate"}))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo")
    response = conn.read_response()
    assert response.json()["headers"]["via"] == "1.1 uvgate"
    assert response.header("via") == "1.1 uvgate"


# ---------------------------------------------------------------------------------------------- message semantics


def test_head_has_no_body_and_keeps_content_length(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("HEAD", "/sized?bytes=1000")
    response = conn.read_response(head_request=True)
    assert response.status == 200
    assert response.header("content-length") == "1000"
    assert response.body == b""
    conn.request("HEAD", "/sized?bytes=1000&chunked=1")
    assert conn.read_response(head_request=True).status == 200
    # No body bytes followed either head: the next response parses from the first byte.
    assert conn.buffer == b""
    assert _get(conn, "/sized?bytes=100").body == pattern(100)
    assert not conn.closed_by_peer(0.05)
    assert conn.buffer == b""


def test_204_and_304_have_no_body(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for status in (204, 304):
        response = _get(conn, f"/status/{status}")
        assert response.status == status
        assert response.body == b""
        assert response.header("transfer-encoding") is None
        if status == 204:
            assert response.header("content-length") is None
        # The next response on the connection starts right after the head.
        assert _get(conn, f"/echo/after-{status}").json()["path"] == f"/echo/after-{status}"
    assert not conn.closed_by_peer(0.05)
    assert conn.buffer == b""


def test_expect_100_continue(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    body = b"body sent after 100 Continue"
    conn.request("POST", "/echo", headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))])
    interim = conn.read_response()
    assert (interim.version, interim.status) == ("HTTP/1.1", 100)
    conn.send(body)
    final = conn.read_response()
    assert final.status == 200
    echoed = final.json()
    assert (echoed["method"], echoed["body"], echoed["body_length"]) == ("POST", body.decode(), len(body))


def test_http10_client(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config())

    # No Host, no keep-alive: answered, then closed.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo/http10", host=None, version="HTTP/1.0")
    response = conn.read_response()
    assert response.status == 200
    assert response.json()["path"] == "/echo/http10"
    assert conn.closed_by_peer(CLOSE_TIMEOUT)
    assert conn.buffer == b""

    # A chunked upstream response reaches an HTTP/1.0 client without chunked framing, ended by the close.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/sized?bytes=5000&chunked=1", version="HTTP/1.0")
    data = conn.read_until_closed(CLOSE_TIMEOUT)
    parsed = parse_response(data, eof=True)
    assert parsed is not None
    response, consumed = parsed
    assert consumed == len(data)
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert response.body == pattern(5000)

    # HTTP/1.0 keep-alive is honoured.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for i in range(2):
        conn.request("GET", f"/echo/http10-ka-{i}", version="HTTP/1.0", headers={"Connection": "keep-alive"})
        response = conn.read_response()
        assert response.status == 200
        assert response.json()["path"] == f"/echo/http10-ka-{i}"
        assert (response.header("connection") or "").lower() == "keep-alive"
    assert not conn.closed_by_peer(0.05)


# ---------------------------------------------------------------------------------------------- routing


def test_no_route_answers_404_json(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(routes=[{"prefix": "/api/", "upstream": "backend"}]))
    before = backend_stats(backend_stub)["requests"]
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    assert_json_error(_get(conn, "/nothing/here"), 404)
    assert_json_error(_get(conn, "/echo"), 404)
    # A 404 does not cost the connection.
    response = _get(conn, "/api/items")
    assert response.status == 200
    assert response.json() == API_BODY
    assert backend_stats(backend_stub)["requests"] - before == 2  # /api/items and this /stats


def test_host_routing(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy: ProxyService = proxy_factory(_config(routes=[{"prefix": "/", "upstream": "backend", "host": "a.example"}]))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    assert _echo(conn, host="a.example")["headers"]["host"] == "a.example"
    assert _get(conn, "/echo", host="A.Example:8080").status == 200  # case and port are ignored
    assert_json_error(_get(conn, "/echo", host="b.example"), 404)
    assert_json_error(_get(conn, "/echo", host=f"{proxy.host}:{proxy.port}"), 404)
    # Absolute-form: the target's authority is the host, whatever the Host header says.
    conn.request("GET", "http://a.example/echo/absolute", host="b.example")
    response = conn.read_response()
    assert response.status == 200
    assert response.json()["path"] == "/echo/absolute"
