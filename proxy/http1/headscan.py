"""Finding the header lines of a head by name: `header_lines(head, names)`.

The C extension `_headscan` (built with the compiled hot path, see setup.py) is used when it is
installed; `lines_of` here is its reference, run by pure-Python installs and held to the same output
by tests/unit/test_headscan.py.

A line is what lies between two CRLFs after the first one (the status or request line is never a
header line). Its name is what precedes its first colon, less trailing blanks (SP, HT); it matches
`names[i]` (lower-case) when equal to it ignoring ASCII case. For each matching line, in head order,
the result holds four offsets: `i, start, colon, end`, where `head[start:end]` is the line with the
CRLF before it and `head[colon + 1:end]` its value.
"""

from __future__ import annotations

from proxy.forwarding import ASCII_LOWER


def lines_of(head: bytes, names: tuple[bytes, ...]) -> tuple[int, ...]:
    """`(i, start, colon, end, ...)` for each header line of `head` named `names[i]` (see the module)."""
    found: list[int] = []
    index = {name: i for i, name in enumerate(names)}
    start = head.find(b"\r\n")
    while start >= 0:
        end = head.find(b"\r\n", start + 2)
        stop = len(head) if end < 0 else end
        colon = head.find(b":", start + 2, stop)
        if colon >= 0:
            name = head[start + 2 : colon].rstrip(b" \t").translate(ASCII_LOWER)
            i = index.get(name, -1) if name else -1
            if i >= 0:
                found += (i, start, colon, stop)
        start = end
    return tuple(found)


try:
    from proxy.http1._headscan import header_lines as header_lines
except ImportError:  # a pure-Python install (UVGATE_PURE_PYTHON=1): the reference
    header_lines = lines_of  # (same signature as the stub of the C one)
