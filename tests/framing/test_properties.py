"""Property tests of the framing core (hypothesis): generated request streams and upstream responses,
split into reads at generated offsets, through the in-process proxy; the invariants of
tests/framing/invariants.py must hold, and the outcome must not depend on how the bytes were split.

A fixed profile keeps `make test` short and reproducible: bounded examples, no deadline (a loaded CI
machine), derandomized (the same examples every run; the fuzzers and the oracle explore further).
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.framing import generate
from tests.framing.harness import run_requests, run_response
from tests.framing.invariants import check_request_run, check_response_run, same_request_outcome, same_response_outcome

PROFILE = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
RANDOMS = st.randoms(use_true_random=False)


@PROFILE
@given(RANDOMS)
def test_request_streams_keep_their_framing_whatever_the_reads(rng: random.Random) -> None:
    data = generate.request_stream(rng)
    cuts = generate.cuts(rng, len(data))
    run = run_requests(data, cuts)
    assert check_request_run(data, run) == [], data
    assert same_request_outcome(data, run, run_requests(data)), (data, cuts)


@PROFILE
@given(RANDOMS)
def test_valid_request_streams_are_forwarded_whole(rng: random.Random) -> None:
    """Without near-valid variants every request is forwarded, re-serialized as it was sent."""
    data = generate.request_stream(rng, generate.Options(odd=0.0))
    run = run_requests(data, generate.cuts(rng, len(data)))
    assert check_request_run(data, run) == [], data
    responses, rest = run.responses()
    assert rest == b"" and all(response.status in (200, 404) for response in responses), run.output[-300:]


@PROFILE
@given(RANDOMS)
def test_upstream_responses_reach_the_client_framed_as_sent(rng: random.Random) -> None:
    case = generate.upstream_case(rng)
    cuts = generate.cuts(rng, len(case.response))
    run = run_response(case.response, cuts, method=case.method, eof=case.eof)
    assert check_response_run(case.response, case.eof, run) == [], case
    whole = run_response(case.response, method=case.method, eof=case.eof)
    assert same_response_outcome(case.response, run, whole), (case, cuts)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 299), max_size=4))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    """Not HTTP at all, or HTTP with garbage in it: answered or waited for, never an exception."""
    run = run_requests(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" + data, cuts)
    assert check_request_run(run.data, run) == [], run.data
    response = run_response(b"HTTP/1.1 200 OK\r\n" + data, cuts)
    assert response.exception is None
