"""The differential oracle (tests/framing/oracle.py) over seeded generated inputs, and each of its rules.

`UVGATE_ORACLE_COUNT` sets how many request streams and how many upstream responses run (default 1500
each, a few seconds; `make oracle` runs 100,000 of each). Case N uses `random.Random(N)`: a reported
seed reproduces its input alone. Every difference must be explained by a rule or a listed known defect.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest

from tests.framing import generate
from tests.framing.harness import run_requests, run_response
from tests.framing.oracle import Difference, compare_requests, compare_response

COUNT = int(os.environ.get("UVGATE_ORACLE_COUNT", "1500"))


def _report(kind: str, rules: Counter[str], unexplained: list[tuple[int, Difference]], seconds: float) -> str:
    lines = [f"oracle: {COUNT} {kind} in {seconds:.1f} s; explained differences: {dict(rules.most_common())}"]
    lines += [f"  seed {seed}: {difference.describe()}" for seed, difference in unexplained[:10]]
    return "\n".join(lines)


def test_request_streams_agree_with_h11() -> None:
    rules: Counter[str] = Counter()
    unexplained: list[tuple[int, Difference]] = []
    start = time.monotonic()
    for seed in range(COUNT):
        data = generate.request_stream(random.Random(seed))
        difference = compare_requests(data, run_requests(data))
        if difference is not None:
            if difference.rule is None:
                unexplained.append((seed, difference))
            else:
                rules[difference.rule] += 1
    report = _report("request streams", rules, unexplained, time.monotonic() - start)
    print(report)
    assert not unexplained, report


def test_upstream_responses_agree_with_h11() -> None:
    rules: Counter[str] = Counter()
    unexplained: list[tuple[int, Difference]] = []
    start = time.monotonic()
    for seed in range(COUNT):
        case = generate.upstream_case(random.Random(1_000_000 + seed))
        difference = compare_response(
            case.response, case.eof, run_response(case.response, method=case.method, eof=case.eof)
        )
        if difference is not None:
            if difference.rule is None:
                unexplained.append((1_000_000 + seed, difference))
            else:
                rules[difference.rule] += 1
    report = _report("upstream responses", rules, unexplained, time.monotonic() - start)
    print(report)
    assert not unexplained, report


# One input per rule: the rule must be what explains it (a rule that never applies is dead weight, and
# one that applies to a different shape is too broad).
REQUEST_RULE_CASES = {
    "bare-lf": b"GET / HTTP/1.1\nHost: h\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
    "control-characters": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",
    "te-in-http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "unknown-method-501": b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n",
    "connect-501": b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    "version-505": b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
    "dot-segments": b"GET /a/../b HTTP/1.1\r\nHost: h\r\n\r\n",
    "invalid-host": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "target-form": b"GET h/p HTTP/1.1\r\nHost: h\r\n\r\n",
    "expectation-417": b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx",
    "upgrade-with-body": (
        b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nx"
    ),
    "content-length-list": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\nx",
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "framing-field-in-trailers": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n"
    ),
    "te-whitespace": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
    "chunk-line-syntax": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\nx\r\n0\r\n\r\n",
    "request-line-whitespace": b"GET  /  HTTP/1.1\r\nHost: h\r\n\r\n",
    "stray-line-break": b"GET / HTTP/1.1\r\nHost: h\r\n\r\n\n",
    "size-limits": b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(45)) + b"\r\n",
}
RESPONSE_RULE_CASES = {
    "version": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "control-characters": b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 1,1\r\n\r\nx",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk-line-syntax": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;a=\x80\r\nx\r\n0\r\n\r\n",
    "framing-field-in-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
    "stray-line-break": b"HTTP/1.1 103 Early\r\n\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("rule", list(REQUEST_RULE_CASES))
def test_each_request_rule_explains_its_shape(rule: str) -> None:
    data = REQUEST_RULE_CASES[rule]
    difference = compare_requests(data, run_requests(data))
    assert difference is not None and difference.rule == rule, difference and difference.describe()


@pytest.mark.parametrize("rule", list(RESPONSE_RULE_CASES))
def test_each_response_rule_explains_its_shape(rule: str) -> None:
    upstream = RESPONSE_RULE_CASES[rule]
    difference = compare_response(upstream, True, run_response(upstream))
    assert difference is not None and difference.rule == rule, difference and difference.describe()


def test_a_framing_difference_is_never_explained() -> None:
    """Both accept, different bodies: no rule may cover it (here h11 is made to read another body)."""
    data = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    run = run_requests(data)
    run.forwarded[0].body = b"ab"  # as if the proxy had framed two bytes
    difference = compare_requests(data, run)
    assert difference is not None and difference.rule is None
