-- wrk script for every configuration: tokens are read from a file (one per line) and used
-- round-robin, one per request; a 1-line file means one token reused. Same script, same
-- per-request Lua cost in every configuration.
-- RG_OFFSET: where this run starts in the file, so consecutive runs against the same Envoy
-- (warm-up, measurement, 1-connection run) continue the round-robin instead of replaying
-- tokens still in a cache.
-- env: RG_TOKENS (file), RG_METHOD (GET|PUT), RG_PATH, RG_SCHEME (Bearer, or Basic for the
-- token service, whose "tokens" are then base64 user:secret).
local tokens = {}
local n = 0
local i = tonumber(os.getenv("RG_OFFSET") or "0")
local method = os.getenv("RG_METHOD") or "GET"
local path = os.getenv("RG_PATH") or "/"
local scheme = os.getenv("RG_SCHEME") or "Bearer"

for line in io.lines(os.getenv("RG_TOKENS")) do
  if #line > 0 then
    n = n + 1
    tokens[n] = scheme .. " " .. line
  end
end

local headers = { ["Host"] = "registry.bench", ["Authorization"] = "" }
-- RG_USER_AGENT_BYTES (diagnostic 1u): a User-Agent of that many bytes, as long as the one
-- the filter writes towards the registry, to show what the longer header costs Envoy itself.
local ua_bytes = tonumber(os.getenv("RG_USER_AGENT_BYTES") or "0")
if ua_bytes > 0 then
  headers["User-Agent"] = string.rep("a", ua_bytes)
end

request = function()
  i = i % n + 1
  headers["Authorization"] = tokens[i]
  return wrk.format(method, path, headers)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RGJSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d, "tokens": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout, n))
end
