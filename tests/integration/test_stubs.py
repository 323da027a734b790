"""backend_stub and auth_stub as real subprocesses, exercised over real sockets with the stdlib only.

Every stub is started by a fixture that reads its "listening on" line with a deadline and, in its
finalizer, always stops it: SIGTERM, wait with a timeout, SIGKILL if it does not exit.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
IO_TIMEOUT = 10.0
HS_SECRET = "integration-test-hs256-secret-0123456789abcdef"
PATTERN = b"0123456789abcdef"
API_BODY = {"id": 1, "name": "resource", "tags": ["a", "b"], "ok": True}


# -- process management ------------------------------------------------------------------------


@dataclass
class Stub:
    proc: subprocess.Popen[bytes]
    host: str
    port: int

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=IO_TIMEOUT)

    def socket(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT)

    def request(
        self, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload)
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"})
        return status, json.loads(data)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of ``proc``, polling with a deadline (never a blind sleep)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no 'listening on' line within {timeout}s (got {buffer!r})")
            if selector.select(remaining):
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"stub exited with {proc.wait(STOP_TIMEOUT)} before listening: {buffer!r}")
                buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


def stop(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> int:
    """Signal, wait up to STOP_TIMEOUT, SIGKILL on timeout; returns the exit code."""
    try:
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode


def start(module: str, *args: str) -> Stub:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        line = read_line(proc, START_TIMEOUT)
        match = re.fullmatch(rf"{module} listening on http://(127\.0\.0\.1):(\d+)", line)
        assert match is not None, line
        return Stub(proc, match.group(1), int(match.group(2)))
    except BaseException:
        stop(proc)
        raise


StubFactory = Callable[..., Stub]


@pytest.fixture
def stub_factory() -> Iterator[StubFactory]:
    """Start fresh stubs for one test; all are stopped afterwards, whatever happened."""
    started: list[Stub] = []

    def factory(module: str, *args: str) -> Stub:
        stub = start(module, *args)
        started.append(stub)
        return stub

    try:
        yield factory
    finally:
        for stub in started:
            stop(stub.proc)


@pytest.fixture(scope="module")
def backend() -> Iterator[Stub]:
    stub = start("backend_stub")
    try:
        yield stub
    finally:
        stop(stub.proc)


@pytest.fixture(scope="module")
def auth() -> Iterator[Stub]:
    stub = start("auth_stub", "--hs-secret", HS_SECRET)
    try:
        yield stub
    finally:
        stop(stub.proc)


# -- raw HTTP/1.1 reading ----------------------------------------------------------------------


class RawReader:
    """Reads successive responses from one socket (pipelining, HTTP/1.0, aborts)."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def close(self) -> None:
        self.file.close()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        if not status_line:
            raise EOFError("connection closed before a response")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = self.file.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self.file.readline(), 16):
                body += self.file.read(size)
                self.file.readline()
            self.file.readline()
        else:
            body = b""
        return status, headers, body

    def at_eof(self) -> bool:
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True


def request_bytes(path: str, *, version: str = "1.1", method: str = "GET", headers: str = "") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: stub\r\n{headers}\r\n".encode()


def pattern_sha256(length: int) -> str:
    digest = hashlib.sha256()
    block = PATTERN * (65536 // len(PATTERN))
    whole, rest = divmod(length, len(block))
    for _ in range(whole):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# -- backend_stub ------------------------------------------------------------------------------


def test_api_and_health(backend: Stub) -> None:
    status, headers, body = backend.request("GET", "/api/resource")
    assert status == 200
    assert json.loads(body) == API_BODY
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Date"].endswith(" GMT")
    status, _, body = backend.request("GET", "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_keep_alive_reuses_one_connection(stub_factory: StubFactory) -> None:
    stub = stub_factory("backend_stub")
    conn = stub.connection()
    try:
        for _ in range(100):
            conn.request("GET", "/api/resource")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read()) == API_BODY
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert stats["connections_accepted"] == 1
    assert stats["requests"] == 101


def test_pipelined_requests_answer_in_order(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(
                request_bytes("/delay?ms=100&n=1") + request_bytes("/echo?n=2") + request_bytes("/status/201?n=3")
            )
            first, second, third = reader.response(), reader.response(), reader.response()
        finally:
            reader.close()
    assert (first[0], json.loads(first[2])) == (200, API_BODY)
    assert second[0] == 200 and json.loads(second[2])["path"] == "/echo?n=2"
    assert (third[0], json.loads(third[2])) == (201, {"status": 201})


def test_echo_content_length_body(backend: Stub) -> None:
    body = "héllo wörld".encode()
    status, _, data = backend.request("POST", "/echo/sub/path?q=1&r=2", body, {"X-Test": "1"})
    doc = json.loads(data)
    assert status == 200
    assert doc["method"] == "POST"
    assert doc["path"] == "/echo/sub/path?q=1&r=2"
    assert doc["http_version"] == "1.1"
    assert doc["chunked"] is False
    assert doc["body"] == "héllo wörld"
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["headers"]["x-test"] == "1"
    assert ["X-Test", "1"] in doc["raw_headers"]


def test_echo_chunked_request_body(backend: Stub) -> None:
    pieces = [b"first piece,", b"x" * 100_000, b"", b"last"]
    conn = backend.connection()
    try:
        conn.request("PUT", "/echo", body=iter(pieces), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        doc = json.loads(response.read())
    finally:
        conn.close()
    body = b"".join(pieces)
    assert response.status == 200
    assert doc["chunked"] is True
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["body"] == body.decode()
    assert doc["headers"]["transfer-encoding"] == "chunked"


def test_echo_large_body_hashed_not_returned(backend: Stub) -> None:
    body = os.urandom(3 * 1024 * 1024)
    status, _, data = backend.request("POST", "/echo", body)
    doc = json.loads(data)
    assert status == 200
    assert doc["body"] is None
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_echo_duplicate_headers_joined(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(request_bytes("/echo", headers="X-Dup: a\r\nx-dup: b\r\n"))
            doc = json.loads(reader.response()[2])
        finally:
            reader.close()
    assert doc["headers"]["x-dup"] == "a, b"
    assert doc["raw_headers"][-2:] == [["X-Dup", "a"], ["x-dup", "b"]]


@pytest.mark.parametrize("chunked", [False, True])
def test_sized_10_mib_body(backend: Stub, chunked: bool) -> None:
    length = 10 * 1024 * 1024
    conn = backend.connection()
    try:
        conn.request("GET", f"/sized?bytes={length}" + ("&chunked=1" if chunked else ""))
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/octet-stream"
        if chunked:
            assert response.getheader("Transfer-Encoding") == "chunked"
            assert response.getheader("Content-Length") is None
        else:
            assert response.getheader("Content-Length") == str(length)
        digest = hashlib.sha256()
        received = 0
        while piece := response.read(256 * 1024):
            digest.update(piece)
            received += len(piece)
    finally:
        conn.close()
    assert received == length
    assert digest.hexdigest() == pattern_sha256(length)


def test_sized_pattern_and_head(backend: Stub) -> None:
    status, _, body = backend.request("GET", "/sized?bytes=40")
    assert (status, body) == (200, (PATTERN * 3)[:40])
    status, headers, body = backend.request("HEAD", "/sized?bytes=123456")
    assert (status, headers["Content-Length"], body) == (200, "123456", b"")
    status, _, body = backend.request("GET", "/sized")
    assert status == 400 and "bytes" in json.loads(body)["error"]


def test_delay(backend: Stub) -> None:
    started = time.monotonic()
    status, _, body = backend.request("GET", "/delay?ms=200")
    assert time.monotonic() - started >= 0.2
    assert (status, json.loads(body)) == (200, API_BODY)


def test_delay_abandoned_by_client_leaves_server_healthy(backend: Stub) -> None:
    for _ in range(5):
        with backend.socket() as sock:
            sock.sendall(request_bytes("/delay?ms=300"))
    status, _, _ = backend.request("GET", "/health")
    assert status == 200


def test_status_codes(backend: Stub) -> None:
    status, headers, body = backend.request("GET", "/status/404")
    assert (status, json.loads(body)) == (404, {"status": 404})
    status, headers, body = backend.request("GET", "/status/503")
    assert (status, json.loads(body)) == (503, {"status": 503})
    for code in (204, 304):
        status, headers, body = backend.request("GET", f"/status/{code}")
        assert (status, body) == (code, b"")
        assert headers["Content-Length"] is None
    status, headers, body = backend.request("HEAD", "/status/200")
    assert (status, headers["Content-Length"], body) == (200, str(len(b'{"status":200}')), b"")


def test_hop_headers_then_connection_reused(backend: Stub) -> None:
    conn = backend.connection()
    try:
        conn.request("GET", "/hop")
        response = conn.getresponse()
        assert json.loads(response.read()) == {"ok": True}
        headers = response.headers
        assert headers["Connection"] == "keep-alive, X-Hop-Custom"
        assert headers["X-Hop-Custom"] == "secret"
        assert headers["Keep-Alive"] == "timeout=5"
        assert headers["Proxy-Connection"] == "keep-alive"
        assert headers["Upgrade"] == "foo/1"
        assert headers["X-End-To-End"] == "yes"
        sock = conn.sock
        conn.request("GET", "/api/resource")
        assert json.loads(conn.getresponse().read()) == API_BODY
        assert conn.sock is sock
    finally:
        conn.close()


def test_abort_closes_without_response(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(request_bytes("/abort"))
            assert reader.at_eof()
        finally:
            reader.close()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        backend.request("GET", "/abort")


def test_reset_mid_body(backend: Stub) -> None:
    conn = backend.connection()
    try:
        conn.request("GET", "/reset-mid-body?bytes=200000")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == "200000"
        with pytest.raises(http.client.IncompleteRead) as info:
            response.read()
    finally:
        conn.close()
    assert len(info.value.partial) == 100_000
    assert info.value.partial == (PATTERN * 6250)[:100_000]


def test_drip(backend: Stub) -> None:
    conn = backend.connection()
    try:
        started = time.monotonic()
        conn.request("GET", "/drip?bytes=1000&chunks=5&interval_ms=60")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        body = response.read()
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert body == (PATTERN * 63)[:1000]
    assert elapsed >= 0.24


def test_close_endpoint(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(request_bytes("/close"))
            status, headers, body = reader.response()
            assert (status, headers["connection"], json.loads(body)) == (200, "close", API_BODY)
            assert reader.at_eof()
        finally:
            reader.close()


def test_headers_endpoint(backend: Stub) -> None:
    query = urlencode([("X-Alpha", "1"), ("X-Beta", "two words")])
    status, headers, body = backend.request("GET", f"/headers?{query}")
    assert (status, json.loads(body)) == (200, {"ok": True})
    assert headers["X-Alpha"] == "1"
    assert headers["X-Beta"] == "two words"
    status, _, _ = backend.request("GET", "/headers?X-Evil=a%0d%0aSet-Cookie:%20x")
    assert status == 400


def test_not_found(backend: Stub) -> None:
    status, headers, body = backend.request("GET", "/nope")
    assert (status, json.loads(body)) == (404, {"error": "not found"})
    assert headers["Content-Type"] == "application/json"


def test_http10(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(request_bytes("/api/x", version="1.0"))
            status, headers, body = reader.response()
            assert (status, headers["connection"], json.loads(body)) == (200, "close", API_BODY)
            assert reader.at_eof()
        finally:
            reader.close()
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(request_bytes("/api/x", version="1.0", headers="Connection: keep-alive\r\n"))
            assert reader.response()[1]["connection"] == "keep-alive"
            sock.sendall(request_bytes("/health", version="1.0", headers="Connection: keep-alive\r\n"))
            assert json.loads(reader.response()[2]) == {"status": "ok"}
        finally:
            reader.close()


def test_malformed_request_gets_400_and_close(backend: Stub) -> None:
    with backend.socket() as sock:
        reader = RawReader(sock)
        try:
            sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            status, headers, _ = reader.response()
            assert (status, headers["connection"]) == (400, "close")
            assert reader.at_eof()
        finally:
            reader.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_zero(stub_factory: StubFactory, signum: int) -> None:
    stub = stub_factory("backend_stub")
    conn = stub.connection()  # an idle keep-alive connection must not hold the shutdown up
    try:
        conn.request("GET", "/api/resource")
        conn.getresponse().read()
        assert stop(stub.proc, signum) == 0
    finally:
        conn.close()


def test_workers_serve_from_two_processes_and_stop(stub_factory: StubFactory) -> None:
    stub = stub_factory("backend_stub", "--workers", "2")
    pids = set()
    for _ in range(40):
        status, _, body = stub.request("GET", "/stats")
        assert status == 200
        pids.add(json.loads(body)["pid"])
    assert len(pids) == 2
    assert stub.proc.pid not in pids
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.proc.wait(STOP_TIMEOUT) == 0
    assert stub.proc.stdout is not None and stub.proc.stdout.read() == b""  # the line was printed once
    assert wait_until(lambda: all(process_gone(pid) for pid in pids), STOP_TIMEOUT)


def test_workers_die_with_their_parent(stub_factory: StubFactory) -> None:
    stub = stub_factory("backend_stub", "--workers", "2")
    pids = set()
    for _ in range(40):
        pids.add(json.loads(stub.request("GET", "/stats")[2])["pid"])
    assert len(pids) == 2
    stop(stub.proc, signal.SIGKILL)
    try:
        assert wait_until(lambda: all(process_gone(pid) for pid in pids), STOP_TIMEOUT)
    finally:
        for pid in pids:  # our own grandchildren, only if the test failed
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- auth_stub ---------------------------------------------------------------------------------


def mint(stub: Stub, **fields: Any) -> str:
    status, answer = stub.json("POST", "/token", {"api_key": "key-1", **fields})
    assert status == 200, answer
    assert answer["token_type"] == "Bearer"
    token: str = answer["access_token"]
    return token


def jwks_key(stub: Stub, kid: str) -> Any:
    status, document = stub.json("GET", "/.well-known/jwks.json")
    assert status == 200
    return jwt.PyJWKSet.from_dict(document)[kid].key


def test_auth_health(auth: Stub) -> None:
    assert auth.json("GET", "/health") == (200, {"status": "ok"})


def test_jwks_document(auth: Stub) -> None:
    status, document = auth.json("GET", "/.well-known/jwks.json")
    assert status == 200
    by_type = {key["kty"]: key for key in document["keys"]}
    assert set(by_type) == {"RSA", "EC"}
    assert {"kid", "use", "alg", "n", "e"} <= set(by_type["RSA"])
    assert {"kid", "use", "alg", "crv", "x", "y"} <= set(by_type["EC"])
    assert all(key["use"] == "sig" and "d" not in key for key in document["keys"])
    assert HS_SECRET not in json.dumps(document)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_token_verifies_against_jwks(auth: Stub, alg: str) -> None:
    token = mint(auth, alg=alg, scope="read write", ttl=120)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    claims = jwt.decode(
        token, jwks_key(auth, header["kid"]), algorithms=[alg], audience="uvgate", issuer="uvgate-auth-stub"
    )
    assert claims["sub"] == claims["api_key"] == "key-1"
    assert claims["scope"] == "read write"
    assert claims["exp"] - claims["iat"] == 120


def test_hs256_token_verifies_with_secret(auth: Stub) -> None:
    token = mint(auth, alg="HS256", aud="other-aud", claims={"tenant": "t1"})
    assert jwt.get_unverified_header(token)["kid"] == "hs-1"
    claims = jwt.decode(token, HS_SECRET, algorithms=["HS256"], audience="other-aud")
    assert claims["tenant"] == "t1"


def test_token_bad_requests(auth: Stub) -> None:
    status, _, _ = auth.request("POST", "/token", b"{not json")
    assert status == 400
    assert auth.json("POST", "/token", {"ttl": 5})[0] == 400
    assert auth.json("POST", "/token", {"api_key": "k", "alg": "none"})[0] == 400
    status, headers, _ = auth.request("GET", "/token")
    assert (status, headers["Allow"]) == (405, "POST")


def test_introspection(auth: Stub) -> None:
    token = mint(auth, alg="ES256", scope="read")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = auth.request("POST", "/introspect", urlencode({"token": token}), form)
    answer = json.loads(body)
    assert status == 200
    assert answer["active"] is True
    assert (answer["sub"], answer["client_id"], answer["scope"]) == ("key-1", "key-1", "read")
    assert (answer["iss"], answer["aud"], answer["token_type"]) == ("uvgate-auth-stub", "uvgate", "Bearer")
    assert answer["exp"] > answer["iat"]
    assert auth.json("POST", "/introspect", {"token": mint(auth, alg="HS256")})[1]["active"] is True

    expired = mint(auth, ttl=-10)
    assert auth.json("POST", "/introspect", {"token": expired}) == (200, {"active": False})
    assert auth.json("POST", "/introspect", {"token": "not-a-jwt"}) == (200, {"active": False})
    status, _, _ = auth.request("POST", "/introspect", "", form)
    assert status == 400


def test_rotation_keeps_old_kid_for_grace(stub_factory: StubFactory) -> None:
    stub = stub_factory("auth_stub", "--grace", "3")
    old_token = mint(stub)
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    status, rotated = stub.json("POST", "/rotate", {"alg": "RS256"})
    assert status == 200
    assert rotated["kid"] != old_kid
    assert {rotated["kid"], old_kid} <= set(rotated["published"])
    jwt.decode(old_token, jwks_key(stub, old_kid), algorithms=["RS256"], audience="uvgate")
    new_token = mint(stub)
    assert jwt.get_unverified_header(new_token)["kid"] == rotated["kid"]
    assert stub.json("POST", "/introspect", {"token": old_token})[1]["active"] is True

    def old_kid_dropped() -> bool:
        document = stub.json("GET", "/.well-known/jwks.json")[1]
        return old_kid not in {key["kid"] for key in document["keys"]}

    assert wait_until(old_kid_dropped, 15.0)
    assert stub.json("POST", "/introspect", {"token": old_token})[1] == {"active": False}
    assert stub.json("POST", "/introspect", {"token": new_token})[1]["active"] is True
    assert stub.json("POST", "/rotate", {"alg": "HS256"})[0] == 400
    assert stop(stub.proc) == 0
