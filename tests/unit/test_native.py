"""`header_lines` in C (proxy/_native.c) gives what its Python reference (`lines_of`) gives."""

from __future__ import annotations

import os
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import native
from proxy.native import block_of, find_of, lines_of, visible_of

try:
    from proxy._native import find as c_find
    from proxy._native import header_block as c_header_block
    from proxy._native import header_lines as c_header_lines
    from proxy._native import visible as c_visible
except ImportError:  # pragma: no cover - pure-Python builds have no C twin
    c_header_lines = c_header_block = c_find = c_visible = None

PURE = os.environ.get("UVGATE_PURE_PYTHON", "") not in ("", "0")
# Only a pure-Python build goes without the C twin (the test below fails a compiled build without it).
needs_c = pytest.mark.skipif(c_header_lines is None and PURE, reason="pure-Python build: no C extension")

NAMES = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"x-request-id")


def test_the_compiled_build_uses_the_c_scanner() -> None:
    if PURE:
        assert native.header_lines is lines_of
        assert native.header_block is block_of
        assert native.find is find_of
        assert native.visible is visible_of
        return
    assert c_header_lines is not None, "the C extension proxy._native is not built"
    assert native.header_lines is c_header_lines
    assert native.header_block is c_header_block
    assert native.find is c_find
    assert native.visible is c_visible


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
    for _ in range(6000):
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
    assert compared == 6000


@needs_c
@settings(max_examples=3000, deadline=None)
@given(head=st.binary(max_size=200), names=st.lists(st.sampled_from(NAMES), unique=True).map(tuple))
def test_c_matches_the_reference_on_any_bytes(head: bytes, names: tuple[bytes, ...]) -> None:
    assert _c(head, names) == lines_of(head, names)


def test_block_reference() -> None:
    assert block_of([]) == b""
    assert block_of([(b"Accept", b"*/*"), (b"x", b"")]) == b"Accept: */*\r\nx: \r\n"


@needs_c
def test_c_block_rejects_what_is_no_list_of_pairs() -> None:
    assert c_header_block is not None
    for wrong in ((), [(b"a",)], [(b"a", b"b", b"c")], [(b"a", "b")], [[b"a", b"b"]], [("a", b"b")]):
        with pytest.raises(TypeError):
            c_header_block(wrong)  # type: ignore[arg-type]


@needs_c
@settings(max_examples=2000, deadline=None)
@given(pairs=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=300)), max_size=60))
def test_c_block_matches_the_reference(pairs: list[tuple[bytes, bytes]]) -> None:
    assert c_header_block is not None
    assert c_header_block(pairs) == block_of(pairs)


@needs_c
def test_c_find_and_visible_reject_wrong_arguments() -> None:
    assert c_find is not None and c_visible is not None
    for args in ((b"a", b"a"), (b"a", b"a", 0, 1), ("a", b"a", 0), (b"a", "a", 0), (b"a", b"a", 0.0)):
        with pytest.raises(TypeError):
            c_find(*args)  # type: ignore[arg-type]
    # Starts out of any range are clamped, as bytes.find does.
    for start in (2**70, -(2**70), 2**63, -(2**63) - 1, sys.maxsize, -sys.maxsize - 1):
        assert c_find(b"abca", b"a", start) == b"abca".find(b"a", start)
        assert c_find(b"abca", b"", start) == b"abca".find(b"", start)
    with pytest.raises(TypeError):
        c_visible("a")  # type: ignore[arg-type]


@needs_c
@settings(max_examples=3000, deadline=None)
@given(
    data=st.binary(max_size=60) | st.sampled_from([b"GET /a/./b HTTP/1.1", b"%2e%2E/..", b"\r\n\r\n\r\n"]),
    needle=st.binary(max_size=4) | st.sampled_from([b"/.", b"%2", b"\r\n\r\n"]),
    start=st.integers(min_value=-80, max_value=80),
)
def test_c_find_matches_the_reference(data: bytes, needle: bytes, start: int) -> None:
    assert c_find is not None
    assert c_find(data, needle, start) == find_of(data, needle, start) == data.find(needle, start)


@needs_c
@settings(max_examples=2000, deadline=None)
@given(value=st.binary(max_size=40))
def test_c_visible_matches_the_reference(value: bytes) -> None:
    assert c_visible is not None
    assert c_visible(value) is visible_of(value)
    assert visible_of(value) is all(0x21 <= byte <= 0x7E for byte in value)


class Bytes(bytes):
    pass


@needs_c
def test_c_takes_subclasses_as_the_reference_does() -> None:
    """A step may add a header whose name or value is a bytes subclass: forwarded the same either way."""
    assert c_header_block is not None and c_header_lines is not None and c_find is not None and c_visible is not None
    pairs = [(Bytes(b"x-a"), Bytes(b"1"))]
    assert c_header_block(pairs) == block_of(pairs) == b"x-a: 1\r\n"
    head = Bytes(b"HTTP/1.1 200 OK\r\nTE: x")
    assert c_header_lines(head, (Bytes(b"te"),)) == lines_of(head, (b"te",)) == (0, 15, 19, 22)
    assert c_find(Bytes(b"abc"), Bytes(b"c"), True) == 2 and c_visible(Bytes(b"ab"))


def test_equal_names_match_the_first() -> None:
    head = b"HTTP/1.1 200 OK\r\nTE: x"
    assert lines_of(head, (b"te", b"te")) == (0, 15, 19, 22)
    if c_header_lines is not None:
        assert c_header_lines(head, (b"te", b"te")) == (0, 15, 19, 22)
