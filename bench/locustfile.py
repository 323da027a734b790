"""Locust version of the bench scenarios; needs the `bench` extra (`pip install -e '.[bench]'`).

`python -m bench --tool locust` runs it headless with `--csv` against every target and folds its
numbers into the same table and JSON as wrk's (bench/locust_runner.py). By hand:

    BENCH_SCENARIO=realistic locust -f bench/locustfile.py --headless -u 50 -r 50 -t 30s \\
        --host http://127.0.0.1:PORT --csv /tmp/run

Environment: BENCH_SCENARIO (plain, realistic, jwt, body, workers; default plain), BENCH_PATH
(default /api/resource), BENCH_TOKENS (a token file, one a line, as for bench/wrk/jwt.lua: required by
jwt), BENCH_HOST (a Host value, e.g. jwt.bench for uvgate's JWT route). Answers with status 429 are
recorded under the name `429` as successes, so they are counted apart from errors.

Locust spends far more CPU per request than wrk: its figures show the proxies below saturation.
"""

from __future__ import annotations

import os
import random
from itertools import cycle
from typing import Any

from locust import FastHttpUser, constant, task

from bench.shapes import REALISTIC_HEADERS, order_document

SCENARIO = os.environ.get("BENCH_SCENARIO", "plain")
PATH = os.environ.get("BENCH_PATH", "/api/resource")
HOST = os.environ.get("BENCH_HOST")
REJECTED_NAME = "429"  # bench.locust_runner.REJECTED_NAME (not imported: this file runs under locust only)


def _tokens() -> list[str]:
    path = os.environ.get("BENCH_TOKENS")
    if not path:
        if SCENARIO == "jwt":
            raise SystemExit("BENCH_SCENARIO=jwt needs BENCH_TOKENS=<token file>")
        return []
    with open(path, encoding="ascii") as file:
        return [line.strip() for line in file if line.strip()]


TOKENS = _tokens()
BODY = order_document()


class ScenarioUser(FastHttpUser):
    """Back-to-back requests of the scenario on one keep-alive connection per user."""

    wait_time = constant(0)

    def on_start(self) -> None:
        """Each user cycles through the tokens from its own random place, as jwt.lua's connections do."""
        start = random.randrange(len(TOKENS)) if TOKENS else 0
        self.tokens = cycle(TOKENS[start:] + TOKENS[:start]) if TOKENS else None

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if SCENARIO == "realistic":
            headers.update(REALISTIC_HEADERS)
        if self.tokens is not None:
            headers["Authorization"] = f"Bearer {next(self.tokens)}"
        if HOST:
            headers["Host"] = HOST
        return headers

    @task
    def request(self) -> None:
        """The scenario's request; a 429 is recorded under its own name and not as a failure."""
        kwargs: dict[str, Any] = {"headers": self._headers(), "catch_response": True, "name": SCENARIO}
        if SCENARIO == "body":
            kwargs["headers"]["Content-Type"] = "application/json"
            call = self.client.post(PATH, data=BODY, **kwargs)
        else:
            call = self.client.get(PATH, **kwargs)
        with call as response:
            if response.status_code == 429:
                response.request_meta["name"] = REJECTED_NAME
                response.success()
