"""Pure HTTP/1.1 framing helpers: status lines, hop-by-hop rules, head rewriting, chunk encoding.

Nothing here touches a transport; every function maps bytes to bytes and is unit-tested alone.
The response head is never split into per-header Python objects on the hot path: one compiled
regex removes the hop-by-hop lines (and a stale request-id line) from the upstream head in C.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

import orjson

from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, BodyKind

# Headers that describe one connection, never forwarded (RFC 9110 7.6.1 plus the de-facto ones).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode() for s in HTTPStatus}
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s" % (code, REASONS.get(code, b"Unknown")) for code in range(100, 600)
}


def connection_tokens(value: bytes) -> set[bytes]:
    """Lower-cased tokens of a Connection header value."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


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


class ResponseHeadRewriter:
    """Removes hop-by-hop lines and `drop` headers from an upstream response head, in one C pass.

    `scan` finds, in one pass too, every line the proxy must look at (framing, hop-by-hop, `drop`),
    so the common response needs no rewriting at all.
    """

    __slots__ = ("_pattern", "scan")

    def __init__(self, drop: tuple[bytes, ...] = ()) -> None:
        drop = tuple(name.lower() for name in drop)
        self._pattern = _hop_regex(drop)
        alternatives = _alternation(HOP_BY_HOP | set(drop) | {b"content-length"})
        # Applied to the lower-cased head: a case-sensitive pattern is several times cheaper.
        self.scan = re.compile(rb"\r\n(" + alternatives + rb")[ \t]*:[ \t]*([^\r\n]*)")

    def inspect(self, head: bytes, status: int, head_request: bool) -> tuple[BodyKind, bytes]:
        """Body framing of an upstream response (RFC 9112 6.3) and its head made ready for the client.

        The parser has validated the head already (and rejected Content-Length with Transfer-Encoding).
        One regex scan finds every line of interest; the usual response (Content-Length only) is
        returned as it is.
        """
        kind = BODY_UNTIL_CLOSE
        rewrite = False
        for name, value in self.scan.findall(head.lower()):
            if name == b"content-length":
                kind = BODY_LENGTH
            elif name == b"transfer-encoding":
                rewrite = True
                last = value.rsplit(b",", 1)[-1].strip()
                kind = BODY_CHUNKED if last == b"chunked" else BODY_UNTIL_CLOSE
            else:
                rewrite = True
        if head_request or status < 200 or status == 204 or status == 304:
            kind = BODY_NONE
        if rewrite:
            return kind, self.clean(head)
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
            extra -= {b"close", b"keep-alive"}
            if extra:
                head = _hop_regex(tuple(extra)).sub(b"", head)
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1 " + head.partition(b" ")[2]
        return head


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"


def error_response(status: int, code: str, request_id: bytes, *, close: bool, extra: bytes = b"") -> bytes:
    """A complete JSON error response: `{"error": code, "request_id": id}`."""
    body = orjson.dumps({"error": code, "request_id": request_id.decode("latin-1")})
    return b"".join(
        (
            STATUS_LINES[status],
            b"\r\ncontent-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nx-request-id: ",
            request_id,
            extra,
            b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n",
            body,
        )
    )


_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")


def valid_request_id(value: bytes) -> bool:
    """A client-supplied request id we are willing to forward and echo (visible ASCII, bounded)."""
    return _REQUEST_ID.fullmatch(value) is not None
