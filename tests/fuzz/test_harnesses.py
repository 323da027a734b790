"""The fuzz targets run without atheris over the regression corpus (cut into reads, and whole): they
must hold on every case that is not a known defect (those are run by tests/corpus/test_corpus.py)."""

from __future__ import annotations

import pytest

from tests.corpus.corpus import RequestCase, ResponseCase, request_cases, response_cases
from tests.fuzz.harnesses import encode_request, encode_response, request_target, response_target

REQUESTS = [case for case in request_cases() if not case.defect and len(case.data) < 8000]
RESPONSES = [case for case in response_cases() if not case.defect]


@pytest.mark.parametrize("case", REQUESTS, ids=[case.name for case in REQUESTS])
def test_request_target_holds_on_the_corpus(case: RequestCase) -> None:
    request_target(encode_request(case.data, [len(case.data) // 2, 7]))


@pytest.mark.parametrize("case", RESPONSES, ids=[case.name for case in RESPONSES])
def test_response_target_holds_on_the_corpus(case: ResponseCase) -> None:
    response_target(encode_response(case.upstream, case.method == "HEAD", case.eof))


def test_the_request_target_reports_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy that framed a body one byte short would be caught (here the reference is made to say so)."""
    import tests.framing.invariants as invariants

    real = invariants.parse_requests

    def shorter(data: bytes) -> tuple[list[invariants.Message], str | None]:
        messages, error = real(data)
        for message in messages:
            message.body = message.body[:-1]
        return messages, error

    monkeypatch.setattr(invariants, "parse_requests", shorter)
    with pytest.raises(AssertionError, match="body of"):
        request_target(encode_request(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"))
