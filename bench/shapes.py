"""The request shapes of the scenarios for Locust (bench/locustfile.py), the same bytes as the wrk scripts.

`REALISTIC_HEADERS` are bench/wrk/realistic.lua's header lines and `order_document()` is
bench/wrk/body.lua's 16 KiB body (tests/unit/test_bench_kit.py checks both stay equal).
"""

from __future__ import annotations

__all__ = ["BODY_SIZE", "REALISTIC_HEADERS", "order_document"]

BODY_SIZE = 16 * 1024

REALISTIC_HEADERS: dict[str, str] = {
    "User-Agent": "acme-billing/4.12.3 python-httpx/0.27.0",
    "Accept": "application/json, text/plain;q=0.9, */*;q=0.8",
    "Accept-Encoding": "gzip, deflate, br",
    "Accept-Language": "en-US,en;q=0.9",
    "Content-Type": "application/json",
    "Authorization": "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJzdmMtYmlsbGluZyIsImV4cCI6NDEwMjQ0NDgwMH0.YKYgv4WVfnWsFi0l21uvJaVW8zPBX0crfVviPwIVl4Q",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "acme=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    "X-Request-Id": "7f3c2a9e-1b4d-4c8e-9f21-6a5b3c2d1e0f",
    "Cache-Control": "no-cache",
}


def order_document(size: int = BODY_SIZE) -> bytes:
    """body.lua's POST body: an order of 220 line items, padded with spaces to `size` bytes."""
    items = ",".join(
        f'{{"id":{i},"sku":"SKU-{i * 7:06d}","qty":{i % 9},"note":"ordinary line item"}}' for i in range(1, 221)
    )
    body = ('{"order":"bench","items":[' + items + "]}").encode("ascii")
    return body + b" " * (size - len(body))
