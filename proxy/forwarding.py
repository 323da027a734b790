"""What the proxy adds to and strips from a request on its way upstream, independent of the downstream protocol.

Pure functions of (method, target, host, header pairs, client address, scheme): an HTTP/1.1 connection,
an HTTP/2 stream or a TLS connection hand the same inputs here and get the same upstream request.
`HeadScan` sorts a request's header pairs into the ones forwarded as they are and the ones the
proxy handles itself (framing, hop-by-hop, forwarding, request id, the identity headers it sets from
verified claims), and keeps the Authorization value for the auth steps; `forward_lines` encodes the
header lines the proxy adds. The upstream side is always HTTP/1.1, so the additions are pre-encoded
once per request as HTTP/1.1 header lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from proxy.errors import BadRequest
from proxy.native import visible as _visible

# (Final: compiled code keeps the function in a C static, where an imported name costs a dict lookup per call.)
visible: Final[Callable[[bytes], bool]] = _visible

# Headers that describe one connection, never forwarded in either direction (RFC 9110 7.6.1, plus the
# de-facto ones). The one list of the project: the HTTP/1.1 shell, the response rewriter and the
# config check derive theirs from it.
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
# Headers that frame a message: never removed because a `Connection` header nominates them (a
# response that lost its Content-Length could not be delimited by the client).
FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
# Headers the proxy sets itself on every forwarded request; client copies are dropped or rewritten.
FORWARDING: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"})

# ASCII lower-casing as a translation table: `value.translate(ASCII_LOWER)` is what `value.lower()` returns
# (both change A-Z only), but compiled code calls `translate` natively where `lower` is a Python method call.
ASCII_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")

# How `HeadScan` treats a request header (by lower-cased name); anything else is forwarded as is.
KIND_FORWARD: Final = 0
KIND_HOST: Final = 1
KIND_LENGTH: Final = 2
KIND_TE: Final = 3
KIND_CONNECTION: Final = 4
KIND_HOP: Final = 5  # hop-by-hop: dropped
KIND_EXPECT: Final = 6
KIND_XFF: Final = 7  # appended to
KIND_DROP: Final = 8  # set by the proxy: the client's copy is dropped
KIND_REQUEST_ID: Final = 9
KIND_UPGRADE: Final = 10
KIND_AUTHORIZATION: Final = 11  # forwarded, and its value kept for the auth steps


def header_kinds(request_id_header: bytes, identity: frozenset[bytes] = frozenset()) -> dict[bytes, int]:
    """The classification table for `HeadScan`, for the configured request-id header name. `identity`:
    the headers carrying verified claims (lower-cased); a client's copies are dropped from every request,
    whatever its route, so that no client can claim an identity."""
    kinds = dict.fromkeys(identity, KIND_DROP)
    kinds.update(dict.fromkeys(HOP_BY_HOP, KIND_HOP))
    kinds.update(
        {
            b"host": KIND_HOST,
            b"content-length": KIND_LENGTH,
            b"transfer-encoding": KIND_TE,
            b"connection": KIND_CONNECTION,
            b"upgrade": KIND_UPGRADE,
            b"expect": KIND_EXPECT,
            b"x-forwarded-for": KIND_XFF,
            b"x-forwarded-proto": KIND_DROP,
            b"x-forwarded-host": KIND_DROP,
            b"authorization": KIND_AUTHORIZATION,
            request_id_header.lower(): KIND_REQUEST_ID,
        }
    )
    return kinds


_SLOTS: Final = 64 * 32


def _slot(size: int, first: int) -> int:
    """`HeadScan.maybe`'s index for a name of `size` bytes starting with byte `first`: both cases of a
    letter share one (as do some other bytes: the table only rules names out)."""
    return (size if size < 64 else 63) * 32 + (first & 31)


class HeadKinds:
    """The classification tables of `HeadScan`, made once per worker from `header_kinds`' table."""

    __slots__ = ("host_kind", "kinds", "maybe", "spelled")

    def __init__(self, kinds: dict[bytes, int]) -> None:
        self.kinds = kinds
        # A name whose (length, first letter) no name of `kinds` has is forwarded without a lookup.
        maybe = bytearray(_SLOTS)
        for name in kinds:
            if name:
                maybe[_slot(len(name), name[0])] = 1
        self.maybe = bytes(maybe)
        self.host_kind = kinds.get(b"host", KIND_FORWARD)
        # The names of `kinds` as clients usually spell them (lower case, and capitalised as in
        # `X-Request-Id`): looked up as they are, they need no lower-cased copy.
        spelled = dict(kinds)
        for name, kind in kinds.items():
            spelled[b"-".join([part[:1].upper() + part[1:] for part in name.split(b"-")])] = kind
        self.spelled = spelled


class HeadScan:
    """The header pairs of one request, sorted as they come (`add`), reused from request to request.
    `table` is the worker's classification (`ForwardPolicy.table`)."""

    __slots__ = (
        "authorization",
        "connection",
        "expect",
        "forward",
        "host",
        "host_kind",
        "kinds",
        "length",
        "maybe",
        "request_id",
        "spelled",
        "te",
        "upgrade",
        "xff",
    )

    def __init__(self, table: HeadKinds) -> None:
        # The worker's tables, shared by every connection (references, not copies).
        self.kinds = table.kinds
        self.maybe = table.maybe
        self.host_kind = table.host_kind
        self.spelled = table.spelled
        self.forward: list[tuple[bytes, bytes]] = []  # end-to-end headers, forwarded as they are
        self.host: bytes | None = None
        self.length: bytes | None = None  # Content-Length (the parser rejected duplicates and lists)
        self.te: bytes | None = None  # Transfer-Encoding values, joined with ", "
        self.connection: bytes | None = None  # Connection values, joined with ","
        self.expect: bytes | None = None
        self.xff: bytes | None = None  # X-Forwarded-For values, joined with ", "
        self.request_id: bytes | None = None  # the first one
        self.authorization: bytes | None = None  # Authorization values (forwarded too), joined with ", "
        self.upgrade = False

    def reset(self) -> None:
        """Ready for the next request's headers."""
        self.forward = []
        self.host = self.length = self.te = self.connection = self.expect = self.xff = self.request_id = None
        self.authorization = None
        self.upgrade = False

    def add(self, name: bytes, value: bytes) -> None:
        """Sort one header (name and value as received). Raises BadRequest for a second Host.

        Values the proxy interprets are trimmed of surrounding whitespace (optional whitespace is not part
        of a field value); forwarded values are passed on as received.
        """
        size = len(name)
        # (`_slot` written out: a call costs more than the arithmetic, once per header)
        if size == 0 or not self.maybe[(size if size < 64 else 63) * 32 + (name[0] & 31)]:
            self.forward.append((name, value))
            return
        if size == 4 and (name == b"Host" or name == b"host"):
            kind = self.host_kind  # (every request has one: no lower-casing, hashing and lookup)
        else:
            kind = self.spelled.get(name, -1)
            if kind < 0:
                kind = self.kinds.get(name.translate(ASCII_LOWER), KIND_FORWARD)
        if kind == KIND_FORWARD:
            self.forward.append((name, value))
            return
        if kind == KIND_AUTHORIZATION:
            self.forward.append((name, value))
        if value:
            last = value[-1]
            if last == 0x20 or last == 0x09:  # (the parser drops leading whitespace, never trailing)
                value = value.strip(b" \t")
        if kind == KIND_AUTHORIZATION:
            # A second one makes the value unusable as a credential (a list is no bearer token).
            self.authorization = value if self.authorization is None else self.authorization + b", " + value
            return
        if kind == KIND_HOST:
            if self.host is not None:
                raise BadRequest("duplicate_host")
            self.host = value
        elif kind == KIND_LENGTH:
            self.length = value
        elif kind == KIND_TE:
            self.te = value if self.te is None else self.te + b", " + value
        elif kind == KIND_CONNECTION:
            self.connection = value if self.connection is None else self.connection + b"," + value
        elif kind == KIND_XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == KIND_REQUEST_ID:
            if self.request_id is None:
                self.request_id = value
        elif kind == KIND_EXPECT:
            self.expect = value
        elif kind == KIND_UPGRADE:
            self.upgrade = True
        # KIND_HOP, KIND_DROP: not forwarded


def scan_headers(pairs: list[tuple[bytes, bytes]], into: HeadScan) -> None:
    """Sort a request's header pairs into `into` (what a protocol that gets all of them at once does)."""
    into.reset()
    for name, value in pairs:
        into.add(name, value)


_OPTIONS: Final = FRAMING | {b"close", b"keep-alive"}


def connection_tokens(value: bytes) -> set[bytes]:
    """Lower-cased tokens of a Connection header value."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


_NOTHING: Final[frozenset[bytes]] = frozenset()


def nominated(connection: bytes | None) -> frozenset[bytes]:
    """Headers a `Connection` value makes hop-by-hop, to remove before forwarding.

    `close` and `keep-alive` are options, not header names; framing headers are never removed this way.
    """
    if connection is None:
        return _NOTHING
    # The usual values: as sent (no lower-cased copy), then in any case.
    if connection == b"keep-alive" or connection == b"close" or connection == b"Keep-Alive":
        return _NOTHING
    if len(connection) <= 10:
        option = connection.translate(ASCII_LOWER)
        if option == b"keep-alive" or option == b"close":
            return _NOTHING
    return frozenset(connection_tokens(connection) - _OPTIONS)


def strip_nominated(headers: list[tuple[bytes, bytes]], connection: bytes | None) -> list[tuple[bytes, bytes]]:
    """`headers` without those the `Connection` value nominates."""
    names = nominated(connection)
    if not names:
        return headers
    return [pair for pair in headers if pair[0].lower() not in names]


# RFC 3986 authority as RFC 9112 3.2 allows it in Host: reg-name (unreserved, pct-encoded, sub-delims),
# IPv4 or an IP literal in brackets, then an optional port. No userinfo, no whitespace, no '/'.
_HOST: Final = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)


def valid_host(host: bytes) -> bool:
    """`host` is a syntactically valid Host value (may be empty, RFC 9112 3.2)."""
    return _HOST.fullmatch(host) is not None


def valid_request_id(value: bytes) -> bool:
    """A client-supplied request id we are willing to forward and echo (visible ASCII, 1 to 128 bytes)."""
    return 0 < len(value) <= 128 and visible(value)


def upstream_headers(
    policy: ForwardPolicy,
    scan: HeadScan,
    *,
    origin: bytes,
    host: bytes,
    client: bytes,
    scheme: bytes,
    ids: RequestIds,
) -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
    """What goes upstream for a scanned request, whatever protocol it came in on: (the headers to forward
    as they are, the request id, the header lines the proxy adds). `origin` is `policy.origin(client,
    scheme)`, made once per connection; `ids` makes a request id when the client sent no valid one."""
    headers = scan.forward if scan.connection is None else strip_nominated(scan.forward, scan.connection)
    request_id = scan.request_id
    if request_id is None or not valid_request_id(request_id):
        request_id = ids.next()
    xff = scan.xff
    if xff is None:
        # (printf-style bytes of bytes operands: one allocation in compiled code, where a join takes a tuple)
        lines = b"%s%s%s%s\r\n" % (origin, host, policy.tail, request_id)
    else:
        lines = policy.forward_lines(client=client, scheme=scheme, host=host, xff=xff, request_id=request_id)
    return headers, request_id, lines


class RequestIds:
    """The request ids a worker makes: `<prefix><counter>`, the prefix random per worker (and restart),
    so ids are unique across workers and restarts."""

    __slots__ = ("count", "prefix")

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return b"%s%d" % (self.prefix, self.count)


class ForwardPolicy:
    """The per-worker constants of what the proxy adds to forwarded requests (from the config, once)."""

    __slots__ = ("request_id_line", "table", "tail", "via_line")

    def __init__(self, request_id_header: str, via: str, identity: frozenset[bytes] = frozenset()) -> None:
        name = request_id_header.lower().encode()
        self.table = HeadKinds(header_kinds(name, identity))
        self.request_id_line = b"%s: " % name
        self.via_line = b"via: %s\r\n" % via.encode() if via else b""
        self.tail = b"\r\n" + self.via_line + self.request_id_line  # after the forwarded host

    def origin(self, client: bytes, scheme: bytes) -> bytes:
        """The start of `forward_lines` for a client without X-Forwarded-For (one per connection)."""
        return b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: " % (client, scheme)

    def forward_lines(
        self, *, client: bytes, scheme: bytes, host: bytes, xff: bytes | None, request_id: bytes
    ) -> bytes:
        """The header lines the proxy adds to an upstream request (HTTP/1.1 encoding, each ending CRLF):
        X-Forwarded-For (appended to the client's), X-Forwarded-Proto (the real scheme),
        X-Forwarded-Host, Via (when configured) and the request id."""
        forwarded_for = client if xff is None else b"%s, %s" % (xff, client)
        return b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n%s%s%s\r\n" % (
            forwarded_for,
            scheme,
            host,
            self.via_line,
            self.request_id_line,
            request_id,
        )
