"""Fuzz targets for the HTTP/1.1 framing: one input is bytes plus a few read boundaries.

Theory of operation: an input is decoded as [n] [n x 2-byte offsets] [payload] (request harness) or
[flags] [n] [offsets] [upstream bytes] (response harness; flags: HEAD request, upstream closes after),
so the fuzzer mutates the byte stream and where it is cut into reads together. Each target runs the
in-process proxy (tests/framing/harness.py) twice, cut and whole, and asserts the framing invariants
(tests/framing/invariants.py): an AssertionError is a finding, with the input saved by the fuzzer.
The same functions run without atheris in tests/fuzz/test_harnesses.py, over the regression corpus.
"""

from __future__ import annotations

from tests.framing.harness import run_requests, run_response
from tests.framing.invariants import check_request_run, check_response_run, same_request_outcome, same_response_outcome


def _cuts(data: bytes, start: int) -> tuple[list[int], int]:
    """The read boundaries encoded at `start` (at most 3), and where the payload begins."""
    count = data[start] % 4 if len(data) > start else 0
    offsets = [int.from_bytes(data[start + 1 + 2 * i : start + 3 + 2 * i], "big") for i in range(count)]
    return offsets, start + 1 + 2 * count


def encode_request(stream: bytes, cuts: list[int] = ()) -> bytes:  # type: ignore[assignment]
    """An input of the request target (for seeds)."""
    return bytes([len(cuts)]) + b"".join(cut.to_bytes(2, "big") for cut in cuts) + stream


def encode_response(upstream: bytes, head: bool = False, eof: bool = True) -> bytes:
    """An input of the response target (for seeds)."""
    return bytes([head | eof << 1, 0]) + upstream


def request_target(data: bytes) -> None:
    cuts, start = _cuts(data, 0)
    stream = data[start:]
    run = run_requests(stream, cuts)
    problems = check_request_run(stream, run)
    if not same_request_outcome(stream, run, run_requests(stream)):
        problems.append(f"the outcome depends on the reads {cuts}")
    assert not problems, (problems, stream)


def response_target(data: bytes) -> None:
    flags = data[0] if data else 0
    cuts, start = _cuts(data, 1)
    upstream, method, eof = data[start:], b"HEAD" if flags & 1 else b"GET", bool(flags & 2)
    run = run_response(upstream, cuts, method=method, eof=eof)
    problems = check_response_run(upstream, eof, run)
    if not same_response_outcome(upstream, run, run_response(upstream, method=method, eof=eof)):
        problems.append(f"the outcome depends on the reads {cuts}")
    assert not problems, (problems, upstream)


TARGETS = {"requests": request_target, "responses": response_target}
