-- wrk script for `python -m bench --request realistic`: the head a real API client sends, about
-- 10 headers and ~600 bytes with the request line and the Host header wrk adds. It is the same for
-- every request, so wrk formats it once. The bench route ignores Authorization (auth = "none" in
-- configs/bench.toml). The JSON report line comes from report.lua, next to this file.
wrk.method = "GET"
wrk.headers["User-Agent"] = "acme-billing/4.12.3 python-httpx/0.27.0"
wrk.headers["Accept"] = "application/json, text/plain;q=0.9, */*;q=0.8"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br"
wrk.headers["Accept-Language"] = "en-US,en;q=0.9"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
  .. "eyJzdWIiOiJzdmMtYmlsbGluZyIsImV4cCI6NDEwMjQ0NDgwMH0.YKYgv4WVfnWsFi0l21uvJaVW8zPBX0crfVviPwIVl4Q"
wrk.headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
wrk.headers["tracestate"] = "acme=t61rcWkgMzE,rojo=00f067aa0ba902b7"
wrk.headers["X-Request-Id"] = "7f3c2a9e-1b4d-4c8e-9f21-6a5b3c2d1e0f"
wrk.headers["Cache-Control"] = "no-cache"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
