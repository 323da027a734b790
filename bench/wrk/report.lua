-- wrk reporter for bench/: prints one machine-readable line after the run.
-- Latencies are in microseconds, duration in microseconds. Parsed by bench/wrk_runner.py. A script that
-- counts answers with status 429 defines rejected_total() (rejecting.lua); the line then carries
-- `rejected` (those answers are also among wrk's status errors).
done = function(summary, latency, requests)
  local e = summary.errors
  local rejected = ""
  if rejected_total ~= nil then
    rejected = string.format(',"rejected":%d', rejected_total())
  end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"mean":%.1f,"max":%d},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}%s}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, rejected))
end
