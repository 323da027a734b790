"""Locust version of the `proxy` scenario (GET /api/resource); needs the `bench` extra.

    pip install -e '.[bench]'
    python -m devstack run --config configs/bench.toml --no-auth --no-redis    # note the proxy URL
    locust -f bench/locustfile.py --headless -u 50 -r 50 -t 30s --host http://127.0.0.1:PORT

Locust spends far more CPU per request than wrk, so use it for scripted, mixed or authenticated
traffic, not for the throughput ceiling (that is `make bench`).
"""

from __future__ import annotations

from locust import FastHttpUser, constant, task


class ResourceUser(FastHttpUser):
    """Each user sends back-to-back GET /api/resource on a keep-alive connection."""

    wait_time = constant(0)

    @task
    def resource(self) -> None:
        """The same request as the wrk scenarios."""
        self.client.get("/api/resource")
