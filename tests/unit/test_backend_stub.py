"""backend_stub's HTTP core and routes fed bytes through a MockTransport and a MockLoop (no sockets)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from backend_stub.app import API_BODY, PATTERN, BackendApp, drip_chunks, pattern_chunks
from backend_stub.httpcore import CHUNK_SIZE, MAX_PIPELINE, Handler, HttpConnection, Request, ServerState, Sleep


class MockTimer:
    def __init__(self, loop: MockLoop, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        loop.timers.append(self)

    def cancel(self) -> None:
        self.cancelled = True


class MockLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[MockTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> MockTimer:
        return MockTimer(self, self.now + delay, callback, args)

    def pending(self) -> list[MockTimer]:
        return [timer for timer in self.timers if not timer.cancelled]

    def advance(self, seconds: float) -> None:
        """Move time forward and fire due timers in order (including ones they schedule)."""
        deadline = self.now + seconds
        while True:
            due = sorted((t for t in self.pending() if t.when <= deadline), key=lambda t: t.when)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback(*timer.args)
        self.now = deadline


class MockTransport:
    """Records writes; ``high_water`` makes it call pause_writing like a real transport."""

    def __init__(self, high_water: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.reading = True
        self.high_water = high_water
        self.buffered = 0
        self.protocol: HttpConnection | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))
        if self.high_water is not None:
            was_paused = self.buffered >= self.high_water
            self.buffered += len(data)
            if not was_paused and self.buffered >= self.high_water and self.protocol is not None:
                self.protocol.pause_writing()

    def writelines(self, pieces: Any) -> None:
        self.write(b"".join(bytes(piece) for piece in pieces))

    def drain(self) -> None:
        """The peer read everything: empty the buffer and resume the protocol if it was paused."""
        paused = self.high_water is not None and self.buffered >= self.high_water
        self.buffered = 0
        if paused and self.protocol is not None:
            self.protocol.resume_writing()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered if self.high_water is not None else 0


class Peer:
    """A protocol under test plus its transport and loop."""

    def __init__(self, high_water: int | None = None) -> None:
        self.loop = MockLoop()
        self.state = ServerState(self.loop, server_name="backend_stub")  # type: ignore[arg-type]
        self.transport = MockTransport(high_water)
        self.protocol = HttpConnection(self.state, BackendApp(self.state))
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def lose(self) -> None:
        self.transport.closed = True
        self.protocol.connection_lost(None)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into (status, lower-cased headers, body) by Content-Length or chunked framing."""
    responses = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body += data[:size]
                data = data[size + 2 :]
                if size == 0:
                    break
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, data = data[:length], data[length:]
        responses.append((status, headers, body))
    return responses


def get(path: str, extra: str = "", version: str = "1.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: stub\r\n{extra}\r\n".encode()


def expected_pattern(offset: int, length: int) -> bytes:
    return bytes(PATTERN[i % 16] for i in range(offset, offset + length))


def test_api_is_one_write_with_date_and_length() -> None:
    peer = Peer()
    peer.send(get("/api/resource"))
    assert len(peer.transport.writes) == 1
    [(status, headers, body)] = parse_responses(peer.transport.data)
    assert status == 200
    assert body == API_BODY
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(API_BODY))
    assert headers["date"].endswith("GMT")
    assert "connection" not in headers
    assert not peer.transport.closed


def test_date_line_is_shared_until_refreshed() -> None:
    peer = Peer()
    peer.send(get("/api/a"))
    peer.state.date_line = b"Date: Thu, 01 Jan 2037 00:00:00 GMT\r\n"
    peer.send(get("/api/b"))
    first, second = parse_responses(peer.transport.data)
    assert first[1]["date"] != second[1]["date"] == "Thu, 01 Jan 2037 00:00:00 GMT"


def test_pipelined_requests_answer_in_order() -> None:
    peer = Peer()
    peer.send(get("/echo?n=1") + get("/delay?ms=50") + get("/echo?n=3") + get("/status/201"))
    assert [json.loads(r[2])["path"] for r in parse_responses(peer.transport.data)] == ["/echo?n=1"]
    peer.loop.advance(0.05)
    responses = parse_responses(peer.transport.data)
    assert [r[0] for r in responses] == [200, 200, 200, 201]
    assert responses[1][2] == API_BODY
    assert json.loads(responses[2][2])["path"] == "/echo?n=3"


def test_long_pipeline_does_not_recurse_and_pauses_reading() -> None:
    peer = Peer()
    peer.send(get("/delay?ms=1") + get("/api/x") * (MAX_PIPELINE + 500))
    assert not peer.transport.reading  # queue full while the delayed response holds the line
    peer.loop.advance(0.001)
    assert len(parse_responses(peer.transport.data)) == MAX_PIPELINE + 501
    assert peer.transport.reading


def test_http10_closes_unless_keep_alive_asked() -> None:
    peer = Peer()
    peer.send(get("/api/x", version="1.0"))
    [(_, headers, body)] = parse_responses(peer.transport.data)
    assert headers["connection"] == "close"
    assert body == API_BODY
    assert peer.transport.closed

    peer = Peer()
    peer.send(get("/api/x", "Connection: keep-alive\r\n", version="1.0") + get("/health", version="1.0"))
    first, second = parse_responses(peer.transport.data)
    assert first[1]["connection"] == "keep-alive"
    assert second[1]["connection"] == "close"
    assert peer.transport.closed


def test_connection_close_request() -> None:
    peer = Peer()
    peer.send(get("/api/x", "Connection: close\r\n") + get("/api/ignored"))
    [(_, headers, _)] = parse_responses(peer.transport.data)
    assert headers["connection"] == "close"
    assert peer.transport.closed


def test_head_has_headers_but_no_body() -> None:
    peer = Peer()
    peer.send(
        get("/api/x", method="HEAD") + get("/sized?bytes=1000", method="HEAD") + get("/status/404", method="HEAD")
    )
    data = peer.transport.data
    heads = [block for block in data.split(b"\r\n\r\n") if block]
    assert len(heads) == 3 and data.endswith(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(API_BODY) in heads[0]
    assert b"Content-Length: 1000" in heads[1]
    assert heads[2].startswith(b"HTTP/1.1 404 ")


def test_chunked_request_body_is_consumed_and_hashed() -> None:
    peer = Peer()
    body = b"hello " * 1000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:7], body[7:4000], body[4000:]))
    request = b"POST /echo/x?y=1 HTTP/1.1\r\nHost: stub\r\nX-Dup: a\r\nTransfer-Encoding: chunked\r\nx-dup: b\r\n\r\n"
    for i in range(0, len(request + chunked + b"0\r\n\r\n"), 97):  # arbitrary fragmentation
        peer.send((request + chunked + b"0\r\n\r\n")[i : i + 97])
    peer.send(get("/api/after"))
    echo, after = parse_responses(peer.transport.data)
    doc = json.loads(echo[2])
    assert doc["method"] == "POST"
    assert doc["path"] == "/echo/x?y=1"
    assert doc["chunked"] is True
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert doc["body"] == body.decode()
    assert doc["headers"]["x-dup"] == "a, b"
    assert doc["raw_headers"][1:3] == [["X-Dup", "a"], ["Transfer-Encoding", "chunked"]]
    assert after[2] == API_BODY


def test_echo_drops_large_body_text_but_hashes_it() -> None:
    peer = Peer()
    body = b"x" * ((1 << 20) + 1)
    peer.send(b"PUT /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 65536):
        peer.send(body[i : i + 65536])
    doc = json.loads(parse_responses(peer.transport.data)[0][2])
    assert doc["body"] is None
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_continue_is_answered_before_body() -> None:
    peer = Peer()
    peer.send(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert peer.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"
    peer.send(b"ok")
    assert json.loads(peer.transport.data.split(b"\r\n\r\n", 2)[2])["body"] == "ok"


@pytest.mark.parametrize("chunked", [False, True])
def test_sized_body_respects_flow_control(chunked: bool) -> None:
    peer = Peer(high_water=CHUNK_SIZE)
    length = 5 * CHUNK_SIZE + 123
    peer.send(get(f"/sized?bytes={length}&chunked={int(chunked)}"))
    assert len(peer.transport.writes) == 2  # head, then one 64 KiB piece hits the high-water mark
    rounds = 0
    while not peer.transport.data.endswith(b"0\r\n\r\n" if chunked else expected_pattern(length - 5, 5)):
        peer.transport.drain()
        rounds += 1
        assert rounds < 20
    assert rounds == 5
    [(status, headers, body)] = parse_responses(peer.transport.data)
    assert status == 200
    assert ("transfer-encoding" in headers) is chunked
    assert body == expected_pattern(0, length)
    assert all(len(w) <= CHUNK_SIZE + 16 for w in peer.transport.writes[1:])


def test_sized_chunked_to_http10_falls_back_to_length() -> None:
    peer = Peer()
    peer.send(get("/sized?bytes=10&chunked=1", version="1.0"))
    [(_, headers, body)] = parse_responses(peer.transport.data)
    assert headers["content-length"] == "10" and "transfer-encoding" not in headers
    assert body == b"0123456789"


def test_pattern_chunks_any_offset() -> None:
    assert b"".join(pattern_chunks(5, 40)) == expected_pattern(5, 40)
    pieces = list(pattern_chunks(3, 2 * CHUNK_SIZE + 7))
    assert [len(p) for p in pieces] == [CHUNK_SIZE, CHUNK_SIZE, 7]
    assert b"".join(pieces) == expected_pattern(3, 2 * CHUNK_SIZE + 7)


def test_drip_chunks_spread_bytes_with_sleeps() -> None:
    items = list(drip_chunks(10, 4, 0.5))
    sleeps = [item for item in items if isinstance(item, Sleep)]
    data = [bytes(item) for item in items if not isinstance(item, Sleep)]
    assert sleeps == [Sleep(0.5)] * 3
    assert [len(piece) for piece in data] == [2, 3, 2, 3]
    assert b"".join(data) == b"0123456789"


def test_drip_uses_timers() -> None:
    peer = Peer()
    peer.send(get("/drip?bytes=8&chunks=4&interval_ms=100"))
    assert parse_responses(peer.transport.data + b"0\r\n\r\n")[0][2] == b"01"
    peer.loop.advance(0.25)
    assert parse_responses(peer.transport.data + b"0\r\n\r\n")[0][2] == b"012345"
    peer.loop.advance(0.1)
    [(_, _, body)] = parse_responses(peer.transport.data)
    assert body == b"01234567"
    assert not peer.loop.pending()


def test_delay_timer_cancelled_when_connection_lost() -> None:
    peer = Peer()
    peer.send(get("/delay?ms=1000"))
    [timer] = peer.loop.pending()
    peer.lose()
    assert timer.cancelled
    assert peer.transport.writes == []
    assert peer.state.connections == set()


def test_status_codes() -> None:
    peer = Peer()
    peer.send(get("/status/204") + get("/status/304") + get("/status/418") + get("/status/42") + get("/status/x"))
    responses = parse_responses(peer.transport.data)
    assert [r[0] for r in responses] == [204, 304, 418, 400, 400]
    assert "content-length" not in responses[0][1] and responses[0][2] == b""
    assert "content-length" not in responses[1][1]
    assert json.loads(responses[2][2]) == {"status": 418}


def test_informational_status_closes() -> None:
    peer = Peer()
    peer.send(get("/status/103"))
    assert peer.transport.data.startswith(b"HTTP/1.1 103 ")
    assert peer.transport.data.endswith(b"\r\n\r\n")
    assert peer.transport.closed


def test_hop_headers_and_keep_alive() -> None:
    peer = Peer()
    peer.send(get("/hop") + get("/api/x"))
    hop, after = parse_responses(peer.transport.data)
    assert hop[1]["connection"] == "keep-alive, X-Hop-Custom"
    assert hop[1]["x-hop-custom"] == "secret"
    assert hop[1]["keep-alive"] == "timeout=5"
    assert hop[1]["proxy-connection"] == "keep-alive"
    assert hop[1]["upgrade"] == "foo/1"
    assert hop[1]["x-end-to-end"] == "yes"
    assert after[2] == API_BODY
    assert not peer.transport.closed


def test_abort_and_reset_mid_body() -> None:
    peer = Peer()
    peer.send(get("/abort"))
    assert peer.transport.aborted and peer.transport.writes == []

    peer = Peer()
    peer.send(get("/reset-mid-body?bytes=1000"))
    head, _, body = peer.transport.data.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert body == expected_pattern(0, 500)
    assert peer.transport.aborted


def test_close_endpoint() -> None:
    peer = Peer()
    peer.send(get("/close"))
    [(_, headers, body)] = parse_responses(peer.transport.data)
    assert headers["connection"] == "close"
    assert body == API_BODY
    assert peer.transport.closed


def test_headers_endpoint_and_injection_guard() -> None:
    peer = Peer()
    peer.send(get("/headers?X-One=1&X-Two=a%20b") + get("/headers?X-Bad=a%0d%0aInjected:%201"))
    good, bad = parse_responses(peer.transport.data)
    assert (good[1]["x-one"], good[1]["x-two"]) == ("1", "a b")
    assert bad[0] == 400 and "injected" not in bad[1]
    peer.send(get("/headers?Content-Length=5"))
    assert parse_responses(peer.transport.data)[2][0] == 400


def test_stats_and_not_found() -> None:
    peer = Peer()
    peer.send(get("/nope") + get("/api") + get("/stats"))
    nope, api, stats = parse_responses(peer.transport.data)
    assert nope[0] == api[0] == 404
    assert json.loads(nope[2]) == {"error": "not found"}
    doc = json.loads(stats[2])
    assert (doc["connections_accepted"], doc["requests"]) == (1, 3)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_request_gets_400_after_earlier_responses(garbage: bytes) -> None:
    peer = Peer()
    peer.send(get("/health") + garbage)
    health, error = parse_responses(peer.transport.data)
    assert health[0] == 200
    assert error[0] == 400
    assert error[1]["connection"] == "close"
    assert peer.transport.closed


def test_oversized_head_gets_431() -> None:
    peer = Peer()
    peer.send(b"GET /api/x HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    [(status, _, _)] = parse_responses(peer.transport.data)
    assert status == 431
    assert peer.transport.closed


def test_upgrade_request_answered_then_closed() -> None:
    peer = Peer()
    peer.send(get("/api/x", "Connection: upgrade\r\nUpgrade: websocket\r\n") + b"\x00binary")
    [(status, headers, _)] = parse_responses(peer.transport.data)
    assert status == 200 and headers["connection"] == "close"
    assert peer.transport.closed


def test_drain_closes_idle_and_finishes_busy() -> None:
    idle, busy = Peer(), Peer()
    busy.send(get("/delay?ms=10"))
    idle.protocol.shutdown()
    assert idle.transport.closed
    busy.state.draining = True
    busy.protocol.shutdown()
    assert not busy.transport.closed
    busy.loop.advance(0.01)
    [(_, headers, body)] = parse_responses(busy.transport.data)
    assert headers["connection"] == "close" and body == API_BODY
    assert busy.transport.closed


def test_keep_alive_timeout_closes_idle_connection() -> None:
    peer = Peer()
    peer.state.keep_alive_timeout = 5.0
    peer.send(get("/api/x"))
    peer.loop.advance(4.9)
    assert not peer.transport.closed
    peer.send(get("/api/x"))  # activity re-arms the timer
    peer.loop.advance(4.9)
    assert not peer.transport.closed
    peer.loop.advance(0.2)
    assert peer.transport.closed


class _Boom:
    def on_body(self, data: bytes) -> None:
        pass

    def respond(self, request: Request, conn: HttpConnection) -> None:
        raise RuntimeError("boom")


class _BoomApp:
    def dispatch(self, request: Request) -> Handler:
        return _Boom()


def test_handler_failure_answers_500_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    loop = MockLoop()
    state = ServerState(loop, server_name="t")  # type: ignore[arg-type]
    transport = MockTransport()
    protocol = HttpConnection(state, _BoomApp())
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(get("/anything"))
    [(status, headers, body)] = parse_responses(transport.data)
    assert (status, headers["connection"], json.loads(body)) == (500, "close", {"error": "internal error"})
    assert transport.closed
    assert "handler failed" in caplog.text


def test_bad_parameter_is_400_and_keeps_connection() -> None:
    peer = Peer()
    peer.send(get("/sized?bytes=abc") + get("/drip?chunks=0") + get("/delay?ms=-1") + get("/api/x"))
    responses = parse_responses(peer.transport.data)
    assert [r[0] for r in responses] == [400, 400, 400, 200]
    assert "bytes" in json.loads(responses[0][2])["error"]
    assert not peer.transport.closed
