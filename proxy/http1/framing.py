"""Pure HTTP/1.1 framing helpers: status lines, request body framing, response head rewriting, chunks.

Nothing here touches a transport; every function maps bytes to bytes and is unit-tested alone.
The response head is never split into per-header Python objects on the hot path: one walk over it
(`native.header_lines`, in C when built) finds the offsets of its framing and hop-by-hop lines (and
of a stale request-id line); those to leave out are cut out between slices;
`head_pairs` splits it for a downstream that needs (name, value) pairs (HTTP/2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Final

import orjson

from proxy.errors import BadGateway, BadRequest, NotImplementedByProxy, PayloadTooLarge
from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, BodyKind
from proxy.forwarding import ASCII_LOWER, FRAMING, HOP_BY_HOP, connection_tokens
from proxy.native import header_lines as _header_lines

# (Final: compiled code keeps the function in a C static, where an imported name costs a dict lookup per call.)
header_lines: Final[Callable[[bytes, tuple[bytes, ...]], tuple[int, ...]]] = _header_lines
REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode() for s in HTTPStatus}
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s" % (code, REASONS.get(code, b"Unknown")) for code in range(100, 600)
}


def _alternation(names: frozenset[bytes]) -> bytes:
    """A regex alternation of lower-case `names`, factored by first letter: the regex engine tries
    the branches one by one at every line start, and most lines then fail on one letter."""
    by_first: dict[bytes, list[bytes]] = {}
    for name in names:
        by_first.setdefault(name[:1], []).append(name[1:])
    branches = [
        re.escape(first) + b"(?:" + b"|".join([re.escape(rest) for rest in sorted(rests, key=len, reverse=True)]) + b")"
        for first, rests in sorted(by_first.items())
    ]
    return b"(?:" + b"|".join(branches) + b")"


def _hop_regex(extra: tuple[bytes, ...]) -> re.Pattern[bytes]:
    alternatives = _alternation(HOP_BY_HOP | {name.lower() for name in extra})
    return re.compile(rb"\r\n" + alternatives + rb"[ \t]*:[^\r\n]*", re.IGNORECASE)


_CONNECTION_VALUE: Final = re.compile(rb"\r\nconnection[ \t]*:([^\r\n]*)", re.IGNORECASE)
_OPTIONS: Final = frozenset((b"close", b"keep-alive"))  # Connection options that name no header
# Indexes into ResponseHeadRewriter.names.
_CONTENT_LENGTH: Final = 0
_TRANSFER_ENCODING: Final = 1
_CONNECTION: Final = 2


class ResponseHeadRewriter:
    """Removes hop-by-hop lines and `drop` headers from an upstream response head.

    `inspect` finds, in one walk over the head (`header_lines`, in C when built), the lines the proxy
    must look at (framing, hop-by-hop, `drop`), so the common response (Content-Length only) needs
    nothing more; one with other such lines is rebuilt from the slices between them. `clean` (one
    case-insensitive regex pass) also removes what a Connection header nominates beyond close and
    keep-alive.
    """

    __slots__ = ("_pattern", "names")

    def __init__(self, drop: tuple[bytes, ...] = ()) -> None:
        drop = tuple(name.lower() for name in drop)
        self._pattern = _hop_regex(drop)
        # The lower-case names of the lines `inspect` looks at; the first three at fixed indexes.
        rest = (HOP_BY_HOP | set(drop)) - {b"content-length", b"transfer-encoding", b"connection"}
        self.names: tuple[bytes, ...] = (b"content-length", b"transfer-encoding", b"connection", *sorted(rest))

    def inspect(self, head: bytes, status: int, head_request: bool) -> tuple[BodyKind, bytes]:
        """Body framing of an upstream response (RFC 9112 6.3) and its head made ready for the client.

        The usual response (Content-Length only) is returned as it is. The framing must be one llhttp
        reads the same way and the client can be given: a Transfer-Encoding other than exactly `chunked`
        (a coding the proxy would strip with the header, or a value llhttp reads differently, such as
        `chunked<TAB>`), two of them, or one with a Content-Length is answered 502 (BadGateway raised).
        """
        bodiless = head_request or status < 200 or status == 204 or status == 304
        found = header_lines(head, self.names)
        count = len(found)
        if count == 0 or (count == 4 and found[0] == _CONTENT_LENGTH):
            # The usual response: nothing to remove, framed by Content-Length or by the close.
            if bodiless:
                kind = BODY_NONE
            elif count:
                kind = BODY_LENGTH
            else:
                kind = BODY_UNTIL_CLOSE
            if not head.startswith(b"HTTP/1.1 "):
                head = b"HTTP/1.1 " + head.partition(b" ")[2]
            return kind, head
        # Lines to leave out (say NGINX's `Connection: keep-alive`): the slices between them, joined once.
        kept: list[bytes] = []
        done = 0  # head[:done] is decided
        kind = BODY_UNTIL_CLOSE
        length = False
        nominates = False  # a Connection value names more than close / keep-alive: `clean` removes those too
        for at in range(0, count, 4):
            which = found[at]
            if which == _CONTENT_LENGTH:
                length = True
                if kind != BODY_CHUNKED:
                    kind = BODY_LENGTH
                continue  # kept
            start = found[at + 1]
            if which == _TRANSFER_ENCODING:
                # Trailing blanks but a tab: llhttp reads `chunked<TAB>` otherwise.
                value = head[found[at + 2] + 1 : found[at + 3]].translate(ASCII_LOWER).lstrip(b" \t").rstrip(b" ")
                if not bodiless and (kind == BODY_CHUNKED or value != b"chunked"):
                    raise BadGateway("unsupported_upstream_transfer_encoding")
                kind = BODY_CHUNKED
            elif which == _CONNECTION:
                value = head[found[at + 2] + 1 : found[at + 3]]
                if value != b" keep-alive" and value != b" close":  # (the usual spellings: nothing to look at)
                    value = value.translate(ASCII_LOWER).strip(b" \t")
                    if value != b"keep-alive" and value != b"close" and connection_tokens(value) - _OPTIONS:
                        nominates = True
            kept.append(head[done:start])
            done = found[at + 3]
        if bodiless:
            kind = BODY_NONE
        elif kind == BODY_CHUNKED and length:
            raise BadGateway("ambiguous_upstream_framing")
        if nominates:
            return kind, self.clean(head)
        if done < len(head):
            kept.append(head[done:])
        head = b"".join(kept)
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1 " + head.partition(b" ")[2]
        return kind, head

    def clean(self, head: bytes) -> bytes:
        """`head` is the status line and header lines without the final CRLF CRLF."""
        nominated = _CONNECTION_VALUE.findall(head)
        head = self._pattern.sub(b"", head)
        if nominated:
            extra = set()
            for value in nominated:
                extra |= connection_tokens(value)
            extra -= FRAMING | {b"close", b"keep-alive"}  # the response must stay framed
            if extra:
                head = _hop_regex(tuple(extra)).sub(b"", head)
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1 " + head.partition(b" ")[2]
        return head


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"


def error_response(
    status: int,
    code: str,
    request_id: bytes,
    *,
    close: bool,
    extra: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    more_headers: list[tuple[bytes, bytes]] | None = None,
    fields: dict[str, object] | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete JSON answer of the proxy: `{"error": code, **fields, "request_id": id}`.

    `extra` is pre-encoded header lines (each starting with CRLF); `headers` and `more_headers` are
    (name, value) pairs (an error's own, and those the steps added to the exchange). `head_only`: the
    answer to a HEAD request, its head alone (the Content-Length the body would have).
    """
    payload: dict[str, object] = {"error": code}
    if fields:
        payload.update(fields)
    payload["request_id"] = request_id.decode("latin-1")
    body = orjson.dumps(payload)
    lines = [b"\r\n%s: %s" % pair for pair in headers]
    if more_headers:
        lines.extend([b"\r\n%s: %s" % pair for pair in more_headers])
    return b"".join(
        (
            STATUS_LINES[status],
            b"\r\ncontent-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nx-request-id: ",
            request_id,
            b"".join(lines),
            extra,
            b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n",
            b"" if head_only else body,
        )
    )


def head_pairs(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header lines of a response head (as passed to `Downstream.response_head`) as (lower-cased
    name, value) pairs, for a downstream that encodes headers itself (HTTP/2). The status line is skipped."""
    pairs: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        pairs.append((name.strip().lower(), value.strip(b" \t")))
    return pairs


def request_framing(te: bytes | None, length: bytes | None, http11: bool, max_body: int) -> tuple[BodyKind, int]:
    """How a request body is framed (RFC 9112 6.3): (kind, content length or -1).

    llhttp has already rejected Content-Length with Transfer-Encoding, duplicate or malformed lengths
    and chunked not last; this adds the proxy's own rules: Transfer-Encoding exactly `chunked`, none in
    HTTP/1.0, and the body size limit. `te`, `length`: the header values, trimmed (None when absent).
    """
    if te is not None:
        if not http11:
            raise BadRequest("transfer_encoding_in_http10")
        codings = te.lower()
        if codings.rsplit(b",", 1)[-1].strip() != b"chunked":
            raise BadRequest("invalid_transfer_encoding")  # the body length cannot be known
        if codings.strip() != b"chunked":
            raise NotImplementedByProxy("unsupported_transfer_encoding")
        return BODY_CHUNKED, -1
    if length is not None:
        size = int(length)
        if size > max_body:
            raise PayloadTooLarge()
        return (BODY_LENGTH if size else BODY_NONE), size
    return BODY_NONE, -1
