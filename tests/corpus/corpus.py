"""The regression corpus: every input that ever broke the framing, with the outcome it must have.

requests.json: client byte streams. `writes` are sent one after the other (a string, or
{"repeat", "times"}); after write i the client waits for `wait[i]` answers before the next. Expected:
`answers` (the statuses, in order), `forwarded` (how many requests reach the upstream), `closed`.
Options: `routes: "echo"` (only /echo is routed: anything else is a 404), `server` (settings),
`head` (which answers are to HEAD requests), `keep_alive` (which answers must say `connection:
keep-alive`). responses.json: an upstream's bytes (`upstream`, then its close if `eof`) answering one
`method` request; expected: the client's `status` and `body`. `defect` names an entry of
tests/framing/known_defects.py: the case fails until that defect is fixed (a strict xfail).
Strings are bytes as latin-1 (JSON escapes: \\r, \\n, \\t, \\u0000).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.framing.harness import proxy_config
from tests.framing.known_defects import KNOWN_DEFECTS, known

HERE = Path(__file__).resolve().parent


@dataclass
class RequestCase:
    name: str
    writes: list[bytes]
    answers: list[int]
    forwarded: int
    closed: bool
    note: str
    wait: list[int] = field(default_factory=list)
    routes: str = ""
    server: dict[str, Any] = field(default_factory=dict)
    head: list[bool] = field(default_factory=list)
    keep_alive: list[bool] = field(default_factory=list)
    defect: str = ""

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def config(self) -> dict[str, Any]:
        config = proxy_config(self.server)
        if self.routes == "echo":
            config["routes"] = [{"prefix": "/echo", "upstream": "b"}]
        return config


@dataclass
class ResponseCase:
    name: str
    upstream: bytes
    eof: bool
    status: int
    note: str
    method: str = "GET"
    body: str | None = None
    defect: str = ""


def _bytes(value: str | dict[str, Any]) -> bytes:
    if isinstance(value, dict):
        return value["repeat"].encode("latin-1") * int(value["times"])
    return value.encode("latin-1")


def request_cases() -> list[RequestCase]:
    raw = json.loads((HERE / "requests.json").read_text())
    return [RequestCase(**{**case, "writes": [_bytes(w) for w in case["writes"]]}) for case in raw]


def response_cases() -> list[ResponseCase]:
    raw = json.loads((HERE / "responses.json").read_text())
    return [ResponseCase(**{**case, "upstream": _bytes(case["upstream"])}) for case in raw]


def params(cases: list[Any]) -> list[Any]:
    """pytest params, one per case; a case whose defect is still known is a strict xfail naming it."""
    out = []
    for case in cases:
        marks = []
        if case.defect:
            assert case.defect in KNOWN_DEFECTS or not known(case.defect), case.defect
            if known(case.defect):
                marks.append(pytest.mark.xfail(strict=True, reason=f"known defect: {KNOWN_DEFECTS[case.defect]}"))
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out
