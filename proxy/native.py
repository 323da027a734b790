"""The few byte operations of the request path that Python makes expensive: finding header lines by
name (`header_lines`), writing them from pairs (`header_block`), and two bytes methods without the
cost of their argument parsing (`find`, `visible`).

The C extension `_native` (proxy/_native.c, built with the compiled hot path, see setup.py) is used
when it is installed; `lines_of`, `block_of`, `find_of` and `visible_of` here are its reference, run
by pure-Python installs and held to the same output by tests/unit/test_native.py.

`header_lines(head, names)`: a line is what lies between two CRLFs after the first one (the status or
request line is never a header line). Its name is what precedes its first colon, less trailing
blanks (SP, HT); it matches `names[i]` (lower-case) when equal to it ignoring ASCII case. For each
matching line, in head order, the result holds four offsets: `i, start, colon, end`, where
`head[start:end]` is the line with the CRLF before it and `head[colon + 1:end]` its value.
"""

from __future__ import annotations

from typing import Final

# forwarding.ASCII_LOWER's table, made here: forwarding imports this module (the compiled modules keep
# using theirs, a Final constant of a compiled module).
_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def lines_of(head: bytes, names: tuple[bytes, ...]) -> tuple[int, ...]:
    """`(i, start, colon, end, ...)` for each header line of `head` named `names[i]` (see the module)."""
    found: list[int] = []
    index: dict[bytes, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)  # the first of equal names, as the C one
    start = head.find(b"\r\n")
    while start >= 0:
        end = head.find(b"\r\n", start + 2)
        stop = len(head) if end < 0 else end
        colon = head.find(b":", start + 2, stop)
        if colon >= 0:
            name = head[start + 2 : colon].rstrip(b" \t").translate(_LOWER)
            i = index.get(name, -1) if name else -1
            if i >= 0:
                found += (i, start, colon, stop)
        start = end
    return tuple(found)


def block_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines of `pairs`, each `name: value` and CRLF."""
    return b"".join([b"%s: %s\r\n" % pair for pair in pairs])


def find_of(data: bytes, needle: bytes, start: int) -> int:
    """`data.find(needle, start)`."""
    return data.find(needle, start)


_IDENTITY: Final = bytes(range(256))
_VISIBLE_ASCII: Final = bytes(range(0x21, 0x7F))


def visible_of(value: bytes) -> bool:
    """Every byte of `value` is visible ASCII (0x21 to 0x7e)."""
    return not value.translate(_IDENTITY, _VISIBLE_ASCII)


try:
    from proxy._native import find as find
    from proxy._native import header_block as header_block
    from proxy._native import header_lines as header_lines
    from proxy._native import visible as visible
except ImportError:  # a pure-Python install (UVGATE_PURE_PYTHON=1): the reference (same signatures as the C stubs)
    header_lines = lines_of
    header_block = block_of
    find = find_of
    visible = visible_of
