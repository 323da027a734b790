"""The regression corpus (tests/corpus/*.json) through the in-process shell: fast, every case, every run.

The same cases run against a live proxy in tests/integration/test_corpus_live.py.
"""

from __future__ import annotations

import itertools

import pytest

from proxy.config import build
from tests.corpus.corpus import RequestCase, ResponseCase, params, request_cases, response_cases
from tests.framing.harness import parse_client_response, run_requests, run_response
from tests.framing.invariants import check_request_run, check_response_run


@pytest.mark.parametrize("case", params(request_cases()))
def test_request_case(case: RequestCase) -> None:
    cuts = list(itertools.accumulate(len(write) for write in case.writes))
    run = run_requests(case.data, cuts, config=build(case.config()))
    responses, rest = run.responses()
    assert run.exception is None
    assert [r.status for r in responses] == case.answers, run.output[-600:]
    assert rest == b""
    assert len(run.forwarded) == case.forwarded
    assert run.closed == case.closed
    for response, head in zip(responses, case.head, strict=False):
        assert (response.body == b"") == head, response.raw
    for response, keep in zip(responses, case.keep_alive, strict=False):
        assert (response.header("connection") == "keep-alive") == keep, response.raw
    assert check_request_run(case.data, run) == []


@pytest.mark.parametrize("case", params(response_cases()))
def test_response_case(case: ResponseCase) -> None:
    method = case.method.encode()
    run = run_response(case.upstream, method=method, eof=case.eof)
    assert run.exception is None
    parsed = parse_client_response(run.output, method == b"HEAD", run.closed)
    assert parsed is not None, run.output
    response, consumed = parsed
    assert response.status == case.status, run.output
    assert run.output[consumed:] == b""
    if case.body is not None:
        assert response.body == case.body.encode("latin-1")
    assert check_response_run(case.upstream, case.eof, run) == []
