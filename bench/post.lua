-- wrk script: POST one chat request, same body and headers on every call.
-- Inputs come from the environment (set by bench/run.py):
--   BENCH_BODY  the JSON body;  BENCH_AUTH  the Authorization header value;
--   BENCH_USER  the x-wattfare-user header value (empty: not sent).
-- At the end it prints one line "BENCH_JSON {...}" that run.py parses, with
-- latency percentiles in microseconds straight from wrk's histogram.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH") or ""
if auth ~= "" then wrk.headers["Authorization"] = auth end
local user = os.getenv("BENCH_USER") or ""
if user ~= "" then wrk.headers["x-wattfare-user"] = user end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
