"""Differential oracle: the same bytes through the proxy (in-process) and through h11, message by message.

Theory of operation: h11 is strict, pure Python and shares no code with llhttp. Both read the same
request stream (or upstream response); for each message in turn each side either accepts it (with
its body: where the next message starts), rejects it, or is still waiting for bytes. The walk stops
at the first message on which they disagree, or where either side ends the connection. A
disagreement is a finding unless one of `REQUEST_RULES` / `RESPONSE_RULES` explains it: each rule is
a deliberate difference (listed with its reason in tests/corpus/README.md), names which side rejects,
and matches only messages that have the shape it is about (a bare LF in the head, a second Host, ...).
Framing differences (both accept, different bodies) have no rule: every one is a finding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from tests.framing.harness import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    Message,
    RequestRun,
    ResponseRun,
    is_proxy_answer,
    parse_client_response,
    parse_requests,
)
from tests.framing.invariants import PROXY_REJECTIONS
from tests.framing.known_defects import known

ACCEPTED = "accepted"
REJECTED = "rejected"
PENDING = "pending"


@dataclass
class Verdict:
    """What one side made of message `index`."""

    outcome: str  # ACCEPTED, REJECTED or PENDING
    body: bytes = b""
    detail: str = ""  # the rejection's status or error text
    closes: bool = False  # the side ends the connection after it (a close-delimited stream ends here)


@dataclass
class Difference:
    """The first message on which the proxy and h11 disagree."""

    index: int
    ours: Verdict
    theirs: Verdict
    head: bytes  # the message's bytes from its start to the end of the stream
    rule: str | None = None  # the deliberate difference that explains it, None: a finding

    def describe(self) -> str:
        return (
            f"message {self.index}: proxy {self.ours.outcome} {self.ours.detail} ({len(self.ours.body)} body bytes), "
            f"h11 {self.theirs.outcome} {self.theirs.detail} ({len(self.theirs.body)} body bytes); "
            f"bytes {self.head[:300]!r}"
        )


# ---------------------------------------------------------------------------------------------- h11's reading


@dataclass
class _H11Reading:
    verdicts: list[Verdict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each message starts in the stream


def h11_requests(data: bytes) -> _H11Reading:
    """h11 as the server: each request answered (200, empty) as soon as it is complete."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    conn.receive_data(data)
    reading = _H11Reading(starts=[0])
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            reading.verdicts.append(Verdict(REJECTED, body, f"{exc.error_status_hint} {exc}"))
            return reading
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            reading.verdicts.append(Verdict(PENDING, body))
            return reading
        if isinstance(event, h11.Request):
            body = b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            try:
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:  # a 2xx to CONNECT switched protocols: the HTTP stream ends
                reading.verdicts.append(Verdict(ACCEPTED, body, closes=True))
                return reading
            closes = conn.our_state is not h11.DONE or conn.their_state is not h11.DONE
            reading.verdicts.append(Verdict(ACCEPTED, body, closes=closes))
            if closes:
                return reading
            reading.starts.append(len(data) - len(conn.trailing_data[0]))
            conn.start_next_cycle()


def proxy_requests(data: bytes, run: RequestRun) -> list[Verdict]:
    """The proxy's verdict on each message, from the answers the client got (in order, one per request)."""
    reference, _ = parse_requests(data)
    responses, _ = run.responses()
    forwarded = iter(run.forwarded)
    verdicts = []
    for index, response in enumerate(responses):
        message = reference[index] if index < len(reference) else Message()
        if is_proxy_answer(response) and response.status in PROXY_REJECTIONS:
            verdicts.append(Verdict(REJECTED, b"", f"{response.status} {response.body[:80]!r}", closes=True))
            return verdicts
        last = index == len(responses) - 1
        sent = None if is_proxy_answer(response) else next(forwarded, None)
        body = message.body if sent is None else sent.body  # what the proxy framed and forwarded
        verdicts.append(Verdict(ACCEPTED, body, str(response.status), closes=last and run.closed))
    verdicts.append(Verdict(PENDING))
    return verdicts


# ---------------------------------------------------------------------------------------------- rules

Predicate = Callable[[bytes], bool]


@dataclass(frozen=True)
class Rule:
    """A deliberate difference: `rejecter` ("proxy" or "h11") rejects a message whose head matches `applies`,
    which the other side accepts (or is still reading)."""

    name: str
    rejecter: str
    applies: Predicate
    statuses: tuple[int, ...] = (400,)  # the rejecter's status (h11: its error_status_hint)


def _head(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


def _lines(message: bytes) -> list[bytes]:
    return _head(message).split(b"\n")


def chunk_framing(message: bytes) -> tuple[list[bytes], list[bytes]]:
    """The chunk-size lines and trailer lines of a chunked message, read leniently (up to the first
    line that is neither); both empty when the message is not chunked."""
    head = _head(message)
    if not _values(head, b"transfer-encoding"):
        return [], []
    rest = message[len(head) :]
    sizes: list[bytes] = []
    while True:
        line, sep, after = rest.partition(b"\n")
        if not sep:
            return sizes, []
        sizes.append(line + sep)
        try:
            size = int(line.split(b";", 1)[0].strip(b" \t\r"), 16)
        except ValueError:
            return sizes, []
        if size == 0:
            trailers = []
            while True:
                line, sep, after = after.partition(b"\n")
                trailers.append(line + sep)  # (the empty line that ends them included)
                if not sep or line in (b"", b"\r"):
                    return sizes, trailers
        rest = after[size:]
        if not rest.startswith(b"\r\n") and not rest.startswith(b"\n"):
            return sizes, []
        rest = rest[2:] if rest.startswith(b"\r\n") else rest[1:]


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, value) of each header line, as loosely as the head allows."""
    out = []
    for line in _lines(head)[1:]:
        name, sep, value = line.rstrip(b"\r").partition(b":")
        if sep:
            out.append((name.strip().lower(), value.strip(b" \t")))
    return out


def _values(head: bytes, name: bytes) -> list[bytes]:
    return [value for key, value in _fields(head) if key == name]


def _request_line(head: bytes) -> list[bytes]:
    return _lines(head)[0].rstrip(b"\r").split(b" ")


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def bare_lf(message: bytes) -> bool:
    """A bare LF ending a head line, a chunk-size line or a trailer line."""
    sizes, trailers = chunk_framing(message)
    return re.search(rb"(?<!\r)\n", b"".join([_head(message), *sizes, *trailers])) is not None


def obs_fold(message: bytes) -> bool:
    """A folded line (starting with SP or HTAB) in the head or the trailers."""
    _, trailers = chunk_framing(message)
    return re.search(rb"\n[ \t]", b"".join([_head(message), *trailers])) is not None


def control_chars(message: bytes) -> bool:
    """A control character (other than HTAB, CR, LF) or DEL in the head or the trailers, or a CR not before LF."""
    _, trailers = chunk_framing(message)
    text = b"".join([_head(message), *trailers]).replace(b"\r\n", b"")
    return re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", text) is not None


def cl_and_te(message: bytes) -> bool:
    """Content-Length with Transfer-Encoding (RFC 9112 6.3: ought to be an error; h11 lets TE win)."""
    return bool(_values(message, b"content-length")) and bool(_values(message, b"transfer-encoding"))


def framing_field_in_trailers(message: bytes) -> bool:
    """A Content-Length or Transfer-Encoding trailer field (RFC 9110 6.5.1: never allowed there); llhttp
    takes it for the message's own and rejects the message, h11 drops trailers it does not need."""
    _, trailers = chunk_framing(message)
    names = {line.partition(b":")[0].strip().lower() for line in trailers}
    return bool(names & {b"content-length", b"transfer-encoding"})


def te_whitespace(message: bytes) -> bool:
    """Whitespace after the Transfer-Encoding value, or anything but one SP before it (the adversarial
    probe's `chunked<TAB>`): the proxy rejects it, h11 trims it."""
    pattern = rb"\ntransfer-encoding:(?: ?[^ \t\r\n][^\r\n]*[ \t]\r?\n|(?! )[ \t]*|  )"
    return re.search(pattern, _head(message).lower()) is not None


def chunk_line_syntax(message: bytes) -> bool:
    """A chunk-size line other than 1-16 hex digits with token[=token|quoted] extensions, e.g. a size
    with whitespace, a sign or too many digits, or an odd byte in an extension: h11 is lenient there."""
    sizes, _ = chunk_framing(message)
    valid = re.compile(
        rb'[0-9A-Fa-f]{1,16}(?:;[!#$%&\'*+\-.^_`|~0-9A-Za-z]+(?:=(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"[^"\r\n]*"))?)*\r\n'
    )
    return any(valid.fullmatch(line) is None for line in sizes) or (bool(sizes) and not sizes[-1].endswith(b"\n"))


def te_in_http10(head: bytes) -> bool:
    return _lines(head)[0].find(b"HTTP/1.0") >= 0 and bool(_values(head, b"transfer-encoding"))


def unknown_method(head: bytes) -> bool:
    methods = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"PROPFIND", b"CONNECT"}
    return _request_line(head)[0] not in methods


def connect_method(head: bytes) -> bool:
    return _request_line(head)[0] == b"CONNECT"


def other_version(head: bytes) -> bool:
    parts = _request_line(head)
    return len(parts) >= 3 and parts[-1] not in (b"HTTP/1.0", b"HTTP/1.1")


def second_host(head: bytes) -> bool:
    return len(_values(head, b"host")) > 1


def dot_segments(head: bytes) -> bool:
    target = [*_request_line(head), b""][1].partition(b"?")[0].lower()
    return any(s in (b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e.") for s in target.split(b"/"))


def invalid_host(head: bytes) -> bool:
    hosts = _values(head, b"host")
    target = [*_request_line(head), b""][1]
    authority = b""
    if target[:8].lower().startswith((b"http://", b"https://")):
        authority = re.split(rb"[/?#]", target.split(b"//", 1)[1])[0]
    return (
        any(_HOST.fullmatch(h) is None for h in hosts)
        or b"@" in authority
        or (target.startswith(b"http") and not authority)
    )


def not_origin_or_absolute(head: bytes) -> bool:
    """A target neither `/...`, absolute-form nor `*` (asterisk only with OPTIONS)."""
    parts = _request_line(head)
    target = parts[1] if len(parts) > 1 else b""
    if target.startswith(b"/"):
        return False
    if target == b"*":
        return parts[0] != b"OPTIONS"
    return not target[:8].lower().startswith((b"http://", b"https://"))


def missing_host_absolute(head: bytes) -> bool:
    """HTTP/1.1 absolute-form without Host: RFC 9112 3.2 wants Host all the same; h11 takes the target's."""
    return not _values(head, b"host") and b"HTTP/1.1" in _lines(head)[0]


def transfer_coding_not_chunked(head: bytes) -> bool:
    """Transfer-Encoding other than exactly `chunked`: the proxy answers 501 (or 400 when chunked is not
    last); h11 takes any list whose last coding is chunked... and some it should not."""
    values = _values(head, b"transfer-encoding")
    return bool(values) and b", ".join(values).lower() != b"chunked"


def unknown_expectation(head: bytes) -> bool:
    return any(value.lower() != b"100-continue" for value in _values(head, b"expect"))


def upgrade_with_body(head: bytes) -> bool:
    return bool(_values(head, b"upgrade")) and bool(
        _values(head, b"content-length") or _values(head, b"transfer-encoding")
    )


def size_limits(head: bytes) -> bool:
    """Near or over the proxy's limits: 431 for the head (bytes or count), 413 for the body; h11's own
    head limit counts differently (the whole buffered head, trailers included)."""
    lengths = [v for v in _values(head, b"content-length") if v.isdigit()]
    return (
        len(_head(head)) > MAX_HEADER_BYTES - 200
        or len(_fields(head)) >= 40
        or any(int(v) > MAX_BODY_BYTES for v in lengths)
        or bool(_values(head, b"transfer-encoding"))  # a chunked body over max_body_bytes, or long trailers
    )


def request_line_whitespace(head: bytes) -> bool:
    """More than one SP between the parts of the request line: llhttp reads it, the proxy forwards the
    line rebuilt with single spaces."""
    return b"  " in _lines(head)[0]


def content_length_list(head: bytes) -> bool:
    """Content-Length as a list (`5, 5`) or given twice: RFC 9112 6.3 lets a recipient take identical
    values as one (h11 does); the proxy rejects every list."""
    values = _values(head, b"content-length")
    return len(values) > 1 or any(b"," in value for value in values)


def stray_line_break(head: bytes) -> bool:
    """Empty lines before a request line: llhttp skips them (RFC 9112 2.2 allows it), h11 rejects a lone LF."""
    return head.startswith((b"\n", b"\r\n", b"\r"))


REQUEST_RULES: tuple[Rule, ...] = (
    Rule("bare-lf", "proxy", bare_lf),
    Rule("obs-fold", "proxy", obs_fold),
    Rule("control-characters", "proxy", control_chars),
    Rule("te-in-http10", "proxy", te_in_http10),
    Rule("unknown-method-501", "proxy", unknown_method, (501,)),
    Rule("connect-501", "proxy", connect_method, (501,)),
    Rule("version-505", "proxy", other_version, (505,)),
    Rule("second-host", "proxy", second_host),
    Rule("dot-segments", "proxy", dot_segments),
    Rule("invalid-host", "proxy", invalid_host),
    Rule("target-form", "proxy", not_origin_or_absolute),
    Rule("absolute-form-without-host", "proxy", missing_host_absolute),
    Rule("transfer-coding-501", "proxy", transfer_coding_not_chunked, (400, 501)),
    Rule("expectation-417", "proxy", unknown_expectation, (417,)),
    Rule("upgrade-with-body", "proxy", upgrade_with_body),
    Rule("content-length-list", "proxy", content_length_list),
    Rule("cl-and-te", "proxy", cl_and_te),
    Rule("framing-field-in-trailers", "proxy", framing_field_in_trailers),
    Rule("te-whitespace", "proxy", te_whitespace),
    Rule("chunk-line-syntax", "proxy", chunk_line_syntax),
    Rule("request-line-whitespace", "h11", request_line_whitespace),
    Rule("stray-line-break", "h11", stray_line_break),
    Rule("size-limits", "proxy", size_limits, (413, 431)),
    Rule("size-limits", "h11", size_limits, (431,)),
)


def stray_line_break_after_head(message: bytes) -> bool:
    """An empty line after a response head that ends its message (a 1xx): llhttp skips it (or waits for the
    LF of a lone CR at the end), h11 rejects it."""
    return re.search(rb"\r\n\r\n(?:\r?\n|\r$)", message) is not None


def _in_any_response(predicate: Predicate) -> Predicate:
    """`predicate` applied to each response in an upstream's bytes (1xx ones come first)."""
    return lambda message: any(predicate(message[m.start() :]) for m in re.finditer(rb"HTTP/\d", message))


framing_field_in_response_trailers = _in_any_response(framing_field_in_trailers)
response_chunk_line_syntax = _in_any_response(chunk_line_syntax)


def response_chunk_line(message: bytes) -> bool:
    """A chunk-size line h11 refuses that llhttp reads (whitespace before an extension): the proxy re-chunks."""
    return re.search(rb"\r\n[0-9A-Fa-f]+[ \t]+;", message) is not None


def transfer_coding_besides_chunked(message: bytes) -> bool:
    return any(
        b", ".join(_values(head, b"transfer-encoding")).lower() != b"chunked"
        for head in _heads(message)
        if _values(head, b"transfer-encoding")
    )


def informational_with_body(message: bytes) -> bool:
    return any(
        re.match(rb"HTTP/1\.[01] 1(?!00|01)[0-9][0-9]", head) is not None
        and bool(_values(head, b"content-length") or _values(head, b"transfer-encoding"))
        for head in _heads(message)
    )


def _heads(message: bytes) -> list[bytes]:
    """Every head in an upstream's bytes (each starting with a status line)."""
    return [_head(message[m.start() :]) for m in re.finditer(rb"HTTP/\d", message)]


def response_version(message: bytes) -> bool:
    """A status line of a version other than HTTP/1.0 and HTTP/1.1 (llhttp, hence the proxy, refuses it)."""
    return any(not head.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")) for head in _heads(message))


RESPONSE_RULES: tuple[Rule, ...] = (
    Rule("version", "proxy", response_version, (502,)),
    Rule("content-length-list", "proxy", _in_any_response(content_length_list), (502,)),
    Rule("cl-and-te", "proxy", _in_any_response(cl_and_te), (502,)),
    Rule("bare-lf", "proxy", _in_any_response(bare_lf), (502,)),
    Rule("control-characters", "proxy", _in_any_response(control_chars), (502,)),
    Rule("obs-fold", "proxy", _in_any_response(obs_fold), (502,)),
    Rule("chunk-line-syntax", "proxy", response_chunk_line_syntax, (502,)),
    Rule("framing-field-in-trailers", "proxy", framing_field_in_response_trailers, (502,)),
    Rule("transfer-coding-502", "proxy", transfer_coding_besides_chunked, (502,)),
    Rule("informational-with-body", "proxy", informational_with_body, (502,)),
    Rule("te-whitespace", "proxy", lambda message: any(te_whitespace(head) for head in _heads(message)), (502,)),
    Rule("stray-line-break", "h11", stray_line_break_after_head),
    # A response without a body (to HEAD, 204, 304) with a coding h11 does not know: nothing to decode, the
    # proxy passes it on without the hop-by-hop header; h11 refuses the header itself.
    Rule("transfer-coding-no-body", "h11", transfer_coding_besides_chunked, (501,)),
    Rule("framing-field-in-trailers", "h11", framing_field_in_response_trailers, (400, 501)),
    Rule("chunk-line-syntax", "h11", response_chunk_line),
)
# Known defects (tests/framing/known_defects.py) that make the two disagree, whichever side rejects;
# each is active only while the defect is listed (none today).
DEFECT_RULES: tuple[Rule, ...] = ()


# ---------------------------------------------------------------------------------------------- comparing


def compare_requests(data: bytes, run: RequestRun) -> Difference | None:
    """The first message the proxy (outcome `run`) and h11 read differently, explained or not; None if none."""
    ours = proxy_requests(data, run)
    theirs = h11_requests(data)
    for index, (mine, other) in enumerate(zip(ours, theirs.verdicts, strict=False)):
        if mine.outcome == other.outcome == ACCEPTED and mine.body == other.body:
            if mine.closes or other.closes:
                return None
            continue
        if mine.outcome == other.outcome and mine.outcome != ACCEPTED:
            return None
        if mine.outcome == REJECTED and other.outcome == PENDING and _h11_rejects_completed(data, index):
            return None  # the proxy rejected an unfinished head early; h11 does once the head is complete
        start = theirs.starts[index] if index < len(theirs.starts) else len(data)
        difference = Difference(index, mine, other, data[start:])
        difference.rule = explain(difference, REQUEST_RULES)
        return difference
    return None


def _h11_rejects_completed(data: bytes, index: int) -> bool:
    """h11 rejects message `index` once its head is complete (the stream ended inside it)."""
    verdicts = h11_requests(data + b"\r\n\r\n").verdicts
    return len(verdicts) > index and verdicts[index].outcome == REJECTED


def explain(difference: Difference, rules: tuple[Rule, ...], defects: tuple[Rule, ...] = ()) -> str | None:
    """The name of the rule that explains `difference`: the side that rejects must be the rule's rejecter;
    `defects` explain whatever they match while they are listed as known defects."""
    for rule in defects:
        if known(rule.name) and rule.applies(difference.head):
            return f"known defect: {rule.name}"
    ours, theirs = difference.ours.outcome, difference.theirs.outcome
    if ours == REJECTED and theirs != REJECTED:
        rejecter = "proxy"
    elif theirs == REJECTED and ours != REJECTED:
        rejecter = "h11"
    else:
        return None  # both accepted, different framing: never deliberate
    detail = difference.ours.detail if rejecter == "proxy" else difference.theirs.detail
    status = int(detail.split(" ", 1)[0]) if detail[:3].isdigit() else 0
    for rule in rules:
        if rule.rejecter == rejecter and status in rule.statuses and rule.applies(difference.head):
            return rule.name
    return None


def h11_response(upstream: bytes, method: bytes, eof: bool) -> Verdict:
    """h11 as the proxy's client reading `upstream` (the answer to one `method` request)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/r", headers=[("host", "h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(upstream)
    if eof:
        conn.receive_data(b"")
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return Verdict(PENDING, body)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Verdict(ACCEPTED, body)
    except h11.RemoteProtocolError as exc:
        return Verdict(REJECTED, body, f"{exc.error_status_hint} {exc}")


def compare_response(upstream: bytes, eof: bool, run: ResponseRun) -> Difference | None:
    """The proxy's delivery of an upstream response against h11's reading of it (as the proxy's client)."""
    theirs = h11_response(upstream, run.method, eof)
    ours = _proxy_response(run)
    if ours.outcome == theirs.outcome and (ours.outcome != ACCEPTED or ours.body == theirs.body):
        return None
    completed = b"\r\n\r\n"
    if ours.outcome == REJECTED and theirs.outcome == PENDING and not eof:  # noqa: SIM102
        if h11_response(upstream + completed, run.method, eof).outcome == REJECTED:
            return None  # the proxy rejected an unfinished head early; h11 does once it is complete
    difference = Difference(0, ours, theirs, upstream)
    difference.rule = explain(difference, RESPONSE_RULES, DEFECT_RULES)
    return difference


def _proxy_response(run: ResponseRun) -> Verdict:
    try:
        parsed = parse_client_response(run.output, run.method == b"HEAD", run.closed)
    except ValueError:
        parsed = None
    if run.aborted or (parsed is not None and is_proxy_answer(parsed[0]) and parsed[0].status == 502):
        return Verdict(REJECTED, b"", "502")
    if parsed is None:
        return Verdict(PENDING)
    return Verdict(ACCEPTED, parsed[0].body, str(parsed[0].status))
