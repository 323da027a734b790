"""`header_lines` in C (proxy/http1/_headscan.c) gives what its Python reference (`lines_of`) gives."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http1 import headscan
from proxy.http1.headscan import lines_of

try:
    from proxy.http1._headscan import header_lines as c_header_lines
except ImportError:  # pragma: no cover - pure-Python builds have no C twin
    c_header_lines = None

PURE = os.environ.get("UVGATE_PURE_PYTHON", "") not in ("", "0")
# Only a pure-Python build goes without the C twin (the test below fails a compiled build without it).
needs_c = pytest.mark.skipif(c_header_lines is None and PURE, reason="pure-Python build: no C extension")

NAMES = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"x-request-id")


def test_the_compiled_build_uses_the_c_scanner() -> None:
    if PURE:
        assert headscan.header_lines is lines_of
        return
    assert c_header_lines is not None, "the C extension proxy.http1._headscan is not built"
    assert headscan.header_lines is c_header_lines


def test_reference_offsets() -> None:
    head = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\nConnection \t: keep-alive\r\nTE:"
    found = lines_of(head, NAMES)
    assert found == (0, 26, 42, 45, 2, 45, 59, 71, 4, 71, 75, 76)
    _, start, colon, end = found[4:8]
    assert head[start:end] == b"\r\nConnection \t: keep-alive"
    assert head[colon + 1 : end] == b" keep-alive"
    # The first line is never a header line; no colon, an empty name or a leading blank is no name.
    assert lines_of(b"content-length: 1\r\ncontent-length\r\n: 1\r\n connection: x", NAMES) == ()
    assert lines_of(b"", NAMES) == () and lines_of(b"\r\n", NAMES) == ()


def _c(head: bytes, names: tuple[bytes, ...]) -> tuple[int, ...]:
    assert c_header_lines is not None
    return c_header_lines(head, names)


@needs_c
def test_c_rejects_wrong_arguments() -> None:
    assert c_header_lines is not None
    with pytest.raises(TypeError):
        c_header_lines(b"x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        c_header_lines("x", NAMES)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c_header_lines(b"x", list(NAMES))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c_header_lines(b"x", ("te",))  # type: ignore[arg-type]


@needs_c
def test_c_matches_the_reference_on_random_heads() -> None:
    """Mixes of names in any case, blanks before the colon, lines without a colon, lone CR and LF,
    empty lines, and heads with hundreds of matching lines (past the C side's stack buffer)."""
    rng = random.Random(20261202)
    names = [*NAMES, b"Content-Length", b"CONNECTION", b"Te", b"tea", b"x-te", b"server", b"", b"connection:x"]
    blanks = [b"", b" ", b"\t", b" \t ", b"\r", b"\n"]
    values = [b"", b" 5", b"keep-alive", b"a:b", b"\r", b"\n", b"\r\r\n", b" chunked\t"]
    compared = 0
    for _ in range(20000):
        parts = [rng.choice((b"HTTP/1.1 200 OK", b"", b"te: 1", b"GET / HTTP/1.1"))]
        for _ in range(rng.choice((0, 1, 3, 8, 40, 300))):
            line = rng.choice(names) + rng.choice(blanks)
            if rng.random() < 0.9:
                line += b":" + rng.choice(values)
            parts.append(line)
        head = rng.choice((b"\r\n", b"\n", b"\r")).join(parts) if rng.random() < 0.1 else b"\r\n".join(parts)
        if rng.random() < 0.1:
            head += rng.choice((b"\r", b"\r\n", b":"))
        assert _c(head, NAMES) == lines_of(head, NAMES), head
        compared += 1
    assert compared == 20000


@needs_c
@settings(max_examples=3000, deadline=None)
@given(head=st.binary(max_size=200), names=st.lists(st.sampled_from(NAMES), unique=True).map(tuple))
def test_c_matches_the_reference_on_any_bytes(head: bytes, names: tuple[bytes, ...]) -> None:
    assert _c(head, names) == lines_of(head, names)
