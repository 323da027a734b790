"""The framing invariants, checked on the outcome of an in-process run against a reference parse.

A request stream, whatever the bytes: no exception escapes the shell; every request the upstream
receives is a request of the stream, in order, re-serialized to the same method, target, end-to-end
headers and body (the only changes being the ones the proxy makes on purpose, listed in
`_STRIPPED`/`_ADDED`); the client gets exactly one answer per request, in order, the upstream's for
each forwarded one, and at most one answer of the proxy's own, the last before it closes; every body
length agrees with its message's framing headers. An upstream response: the client gets the same
status, end-to-end headers and body, framed consistently, or the proxy's 502 for one llhttp rejects,
or a cut-off response (reset) when the upstream broke it mid-body. Each check returns the list of its
problems (empty: holds), so the property tests, the oracle, the corpus and the fuzzers share them.
"""

from __future__ import annotations

from devstack.rawhttp import RawResponse
from proxy.forwarding import FRAMING, HOP_BY_HOP
from tests.framing.harness import (
    MAX_BODY_BYTES,
    REQUEST_ID_HEADER,
    Forwarded,
    Message,
    RequestRun,
    ResponseRun,
    is_proxy_answer,
    mask_ids,
    parse_client_response,
    parse_requests,
    parse_upstream_response,
)
from tests.framing.known_defects import NOT_IN_QUEUE, known

_INFO_BODY = "an informational response with a body"
_REFUSED_FRAMING = "a transfer coding the proxy refuses"
# Request headers the proxy does not forward as received: hop-by-hop, framing (re-made), Host (sent
# first, from the request), Expect (answered by the proxy), and the forwarding headers it sets itself.
_STRIPPED = HOP_BY_HOP | FRAMING | {b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
_ADDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", REQUEST_ID_HEADER)
# What the proxy answers itself when it rejects a request stream (it closes after each).
PROXY_REJECTIONS = frozenset({400, 413, 417, 431, 501, 505})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def _lower(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in headers]


def _nominated(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names a Connection header makes hop-by-hop (framing headers and options excepted)."""
    names = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names |= {token.strip().lower() for token in value.split(b",") if token.strip()}
    return names - FRAMING - {b"close", b"keep-alive"}


def _valid_request_id(value: bytes) -> bool:
    return 1 <= len(value) <= 128 and all(0x21 <= byte <= 0x7E for byte in value)


def _origin_form(message: Message) -> tuple[bytes, bytes | None]:
    """(target as forwarded, host from the target or None): absolute-form becomes origin-form."""
    target = message.target
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        end = min([i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0], default=len(rest))
        path = rest[end:]
        return (path if path.startswith(b"/") else b"/" + path), rest[:end]
    return target, None


def check_forwarded(message: Message, forwarded: Forwarded) -> list[str]:
    """`forwarded` is `message` re-serialized: same method, target, end-to-end headers and body."""
    problems = []
    target, authority = _origin_form(message)
    if forwarded.method != message.method:
        problems.append(f"method {message.method!r} forwarded as {forwarded.method!r}")
    if forwarded.target != target:
        problems.append(f"target {message.target!r} forwarded as {forwarded.target!r}")
    if forwarded.body != message.body:
        problems.append(
            f"body of {len(message.body)} bytes forwarded as {len(forwarded.body)}: {forwarded.body[:80]!r}"
        )
    headers = _lower(message.headers)
    dropped = _STRIPPED | _nominated(message.headers) | {REQUEST_ID_HEADER}
    kept = [(name, value) for name, value in headers if name not in dropped]
    sent = _lower(forwarded.headers)
    host_values = [value.strip(b" \t") for name, value in headers if name == b"host"]
    host = authority if authority is not None else (host_values[0] if host_values else b"")
    if sent[:1] != [(b"host", host)]:
        problems.append(f"upstream Host {sent[:1]!r}, expected {host!r}")
    framing = [pair for pair in sent if pair[0] in FRAMING]
    added = [pair for pair in sent if pair[0] in _ADDED]
    end_to_end = [pair for pair in sent[1:] if pair[0] not in FRAMING and pair[0] not in _ADDED]
    if end_to_end != kept:
        problems.append(f"end-to-end headers {kept!r} forwarded as {end_to_end!r}")
    if [name for name, _ in added] != list(_ADDED):
        problems.append(f"proxy headers {added!r}")
    else:
        client_xff = [value.strip(b" \t") for name, value in headers if name == b"x-forwarded-for"]
        xff = b", ".join([*client_xff, b"10.1.2.3"])
        if added[0][1] != xff or added[2][1] != host:
            problems.append(f"forwarding headers {added!r} (X-Forwarded-For {xff!r}, host {host!r})")
        client_ids = [value.strip(b" \t") for name, value in headers if name == REQUEST_ID_HEADER]
        if client_ids and _valid_request_id(client_ids[0]) and added[3][1] != client_ids[0]:
            problems.append(f"request id {client_ids[0]!r} forwarded as {added[3][1]!r}")
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    if chunked:
        expected = [(b"transfer-encoding", b"chunked")]
    elif message.body or message.method in _BODY_METHODS:
        expected = [(b"content-length", b"%d" % len(message.body))]
    else:
        expected = []
    if framing != expected:
        problems.append(f"upstream framing {framing!r}, expected {expected!r}")
    if len(message.body) > MAX_BODY_BYTES:
        problems.append(f"a body of {len(message.body)} bytes (limit {MAX_BODY_BYTES}) was forwarded")
    return problems


def _closes(message: Message) -> bool:
    """The client asked to close after this request."""
    tokens = {t.strip().lower() for v in message.header(b"connection") for t in v.split(b",")}
    if message.version == "1.0":
        return b"keep-alive" not in tokens
    return b"close" in tokens


def check_request_run(data: bytes, run: RequestRun) -> list[str]:
    """The request-stream invariants (see the module docstring) for `run`, the outcome of `data`.

    The client's responses answer the stream's requests in order: response i is the upstream's answer
    to request i (then request i was forwarded, as it was sent) or the proxy's own: a 404 (no route,
    for `*`), or a rejection, which is the last answer before the close.
    """
    problems = []
    if run.exception is not None:
        if known("early-answer-then-broken-body") and NOT_IN_QUEUE in run.exception:
            return []  # (after an exception nothing else can be said of the run)
        problems.append(f"exception escaped data_received: {run.exception}")
    problems += [f"the upstream cannot parse what the proxy sent: {error}" for error in run.upstream_errors]
    reference, _ = parse_requests(data)
    responses, rest = run.responses()
    if rest:
        problems.append(f"client bytes that are no response: {rest[:200]!r}")
    forwarded = iter(run.forwarded)
    for index, response in enumerate(responses):
        message = reference[index] if index < len(reference) else None
        if not is_proxy_answer(response):
            sent = next(forwarded, None)
            if sent is None or message is None or not message.complete:
                problems.append(f"answer {index} is the upstream's, but request {index} was not forwarded")
                break
            problems += [f"request {index}: {problem}" for problem in check_forwarded(message, sent)]
            expected = b"" if sent.method == b"HEAD" else b"r" + sent.target[-40:]
            if response.status != 200 or response.body != expected:
                problems.append(f"answer {index}: {response.status} {response.body!r} for {sent.target!r}")
            problems += _check_version_framing(index, message, response, reference)
        elif (
            response.status == 404 and message is not None and (message.target == b"*" or _no_route(response, message))
        ):
            continue  # no route (`OPTIONS *`, or a target outside the routes): answered, the connection stays
        else:
            if response.status not in PROXY_REJECTIONS:
                problems.append(f"answer {index}: the proxy answered {response.status}")
            if index != len(responses) - 1:
                problems.append(f"answer {index}: {response.status} is followed by more answers")
            if not run.closed:
                problems.append(f"answer {index}: the proxy answered {response.status} and kept the connection open")
    extra = list(forwarded)
    if extra:
        problems.append(f"{len(extra)} forwarded requests got no answer: {[f.target for f in extra]}")
    unanswered = [m for m in reference[len(responses) :] if m.complete]
    if unanswered and not run.closed:
        problems.append(f"request {len(responses)} was complete, but neither forwarded nor answered")
    elif unanswered and responses and not is_proxy_answer(responses[-1]):
        last = responses[-1]
        if not _closes(reference[len(responses) - 1]) and last.header("content-length") is not None:
            problems.append(f"closed with request {len(responses)} unanswered, though nothing asked to close")
    return problems


def _no_route(response: RawResponse, message: Message) -> bool:
    """The proxy's 404 for a target no route takes (`OPTIONS *`, or outside the routes of a case): its body
    is the JSON error (none for HEAD)."""
    if message.target == b"*":
        return True
    return response.body == b"" if message.method == b"HEAD" else b'"no_route"' in response.body


def mixed_versions(reference: list[Message]) -> bool:
    """HTTP/1.0 and HTTP/1.1 requests in one stream (the shape of "pipelined-version-leak")."""
    return len({message.version for message in reference if message.head_done}) > 1


def _check_version_framing(index: int, message: Message, response: RawResponse, reference: list[Message]) -> list[str]:
    """An HTTP/1.0 client gets no chunked body; an HTTP/1.1 client no `connection: keep-alive`."""
    if known("pipelined-version-leak") and mixed_versions(reference):
        return []
    chunked = (response.header("transfer-encoding") or "").lower() == "chunked"
    if message.version == "1.0" and chunked:
        return [f"answer {index}: a chunked response to an HTTP/1.0 request"]
    if message.version == "1.1" and (response.header("connection") or "").lower() == "keep-alive":
        return [f"answer {index}: `connection: keep-alive` on a response to an HTTP/1.1 request"]
    return []


def _answered_early(one: RequestRun, other: RequestRun) -> bool:
    """`one` answered its last request (a 404) before the body was all read and closed; `other` read on
    and found the body malformed (a rejection). Which comes first depends on the reads: both are right."""
    mine, theirs = one.responses()[0], other.responses()[0]
    return (
        one.closed
        and other.closed
        and len(mine) == len(theirs) > 0
        and [f.target for f in one.forwarded] == [f.target for f in other.forwarded]
        and [mask_ids(r.raw) for r in mine[:-1]] == [mask_ids(r.raw) for r in theirs[:-1]]
        and mine[-1].status == 404
        and theirs[-1].status in PROXY_REJECTIONS
    )


def same_request_outcome(data: bytes, one: RequestRun, other: RequestRun) -> bool:
    """Two runs of the same bytes, split differently, had the same outcome. While "pipelined-version-leak"
    stands, a stream mixing HTTP versions may end early (a response framed for HTTP/1.0 closes the
    connection): then the shorter run must be a prefix of the longer, body for body."""
    if known("early-answer-then-broken-body") and any(NOT_IN_QUEUE in (r.exception or "") for r in (one, other)):
        return True
    if one.summary() == other.summary() or _answered_early(one, other) or _answered_early(other, one):
        return True
    if not (known("pipelined-version-leak") and mixed_versions(parse_requests(data)[0])):
        return False
    short, long = sorted((one, other), key=lambda run: len(run.forwarded))
    bodies = [[(r.status, mask_ids(r.body)) for r in run.responses()[0]] for run in (short, long)]
    sent = [[(f.method, f.target, f.body) for f in run.forwarded] for run in (short, long)]
    return sent[0] == sent[1][: len(sent[0])] and bodies[0][:-1] == bodies[1][: len(bodies[0]) - 1]


# ---------------------------------------------------------------------------------------------- responses


def same_response_outcome(upstream: bytes, one: ResponseRun, other: ResponseRun) -> bool:
    """Two runs of the same upstream bytes, split differently, had the same outcome (how a failure shows
    aside: see `ResponseRun.summary`)."""
    if one.summary() == other.summary():
        return True
    return known("informational-with-body") and final_response(upstream, one.method == b"HEAD", True)[1] == _INFO_BODY


def _response_end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    dropped = HOP_BY_HOP | FRAMING | _nominated(headers) | {REQUEST_ID_HEADER}
    return [(name, value.strip(b" \t")) for name, value in _lower(headers) if name not in dropped]


def _client_end_to_end(response: RawResponse) -> list[tuple[bytes, bytes]]:
    dropped = FRAMING | {REQUEST_ID_HEADER, b"connection"}
    pairs = [(name.encode("latin-1").lower(), value.encode("latin-1")) for name, value in response.headers]
    return [(name, value) for name, value in pairs if name not in dropped]


def final_response(upstream: bytes, head_request: bool, eof: bool) -> tuple[Message | None, str | None]:
    """The upstream's final response as llhttp reads it (None while incomplete), or why it is invalid."""
    messages, error = parse_upstream_response(upstream, head_request, eof)
    for message in messages:
        if 100 < message.status < 200 and (message.header(b"content-length") or message.header(b"transfer-encoding")):
            return None, _INFO_BODY  # (it has none: what follows is no response)
        if message.status == 101:
            return None, "101 Switching Protocols"
        if message.status >= 200 or not message.head_done:
            if message.head_done and _framing_refused(message, head_request):
                return None, _REFUSED_FRAMING
            if message.complete:
                return message, None
            return None, error
        if not message.complete:
            return None, error
    return None, error


def _framing_refused(message: Message, head_request: bool) -> bool:
    """A final response with a body whose framing the proxy refuses (502): a Transfer-Encoding other than
    exactly one `chunked` (the proxy could not undo another coding; llhttp reads `chunked<TAB>` otherwise),
    or one with a Content-Length."""
    if head_request or message.status in (204, 304):
        return False
    codings = message.header(b"transfer-encoding")
    if not codings:
        return False
    exact = len(codings) == 1 and codings[0].lower().strip(b" ") == b"chunked" and b"\t" not in codings[0]
    return not exact or bool(message.header(b"content-length"))


def check_response_run(upstream: bytes, eof: bool, run: ResponseRun) -> list[str]:
    """The response invariants (see the module docstring) for `run`, the outcome of `upstream`."""
    problems = []
    if run.exception is not None:
        problems.append(f"exception escaped the upstream connection: {run.exception}")
    head_request = run.method == b"HEAD"
    final, error = final_response(upstream, head_request, eof)
    try:
        parsed = parse_client_response(run.output, head_request, run.closed)
    except ValueError as exc:
        parsed = None
        if not run.aborted:
            problems.append(f"the client cannot parse its response: {exc}: {run.output[:200]!r}")
    if parsed is None:
        if final is not None and not run.aborted:
            problems.append(f"a complete {final.status} response never reached the client: {run.output[:200]!r}")
        return problems
    response, consumed = parsed
    if run.output[consumed:]:
        problems.append(f"bytes after the client's response: {run.output[consumed:][:200]!r}")
    own = is_proxy_answer(response) and response.status == 502
    if final is None:
        if error is not None and not own:
            problems.append(f"an upstream response llhttp rejects ({error}) reached the client as {response.status}")
        elif error is None and not own and not run.aborted:
            problems.append(f"an incomplete upstream response was completed for the client: {run.output[:200]!r}")
        return problems
    if own:
        problems.append(f"a complete upstream {final.status} response was answered 502: {run.output[:200]!r}")
        return problems
    if response.status != final.status:
        problems.append(f"status {final.status} reached the client as {response.status}")
    bodiless = head_request or final.status in (204, 304)
    if response.body != (b"" if bodiless else final.body):
        problems.append(f"body of {len(final.body)} bytes reached the client as {len(response.body)}")
    if _client_end_to_end(response) != _response_end_to_end(final.headers):
        upstream_headers = _response_end_to_end(final.headers)
        problems.append(f"headers {upstream_headers!r} reached the client as {_client_end_to_end(response)!r}")
    if head_request:
        length = final.header(b"content-length")
        if length and response.header("content-length") != length[0].strip().decode("latin-1"):
            problems.append(f"HEAD Content-Length {length!r} reached the client as {response.header('content-length')}")
    return problems
