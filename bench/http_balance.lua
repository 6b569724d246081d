-- wrk: GET the balance of a random one of `users` accounts. Args: API key,
-- number of users.
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("id", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end

function init(args)
  api_key = args[1]
  users = tonumber(args[2])
  math.randomseed(os.time() * 1000 + id)
  errors = 0
end

function request()
  local user = math.random(1, users)
  return wrk.format("GET", "/v1/accounts/bench-" .. user .. "/balance", {
    ["Authorization"] = "Bearer " .. api_key,
  })
end

function response(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end

function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("errors") end
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "non_2xx": %d, "socket_errors": %d, "mean_ms": %.2f, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, failed,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, latency.mean / 1000,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
