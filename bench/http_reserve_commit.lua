-- wrk: redemptions as the API sees them: reservations, and the commit of each
-- reservation made (queued per thread, sent before the next reservation).
-- Args: API key, number of users. Each request counts once.
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
  counter = 0
  pending = {}
  errors = 0
end

local function headers()
  counter = counter + 1
  return {
    ["Authorization"] = "Bearer " .. api_key,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = "r" .. id .. "-" .. counter .. "-" .. math.random(1, 1000000000),
  }
end

function request()
  local hold = table.remove(pending, 1)
  if hold then
    local path = "/v1/accounts/" .. hold.user .. "/reservations/" .. hold.id .. "/commit"
    return wrk.format("POST", path, headers(), '{"amount": 1}')
  end
  return wrk.format("POST", "/v1/accounts/bench-" .. math.random(1, users) .. "/reservations", headers(),
    '{"amount": 2, "ttl_seconds": 300, "reason": "bench reserve"}')
end

function response(status, headers, body)
  if status == 201 then
    local rid = string.match(body, '"reservation_id":(%d+)')
    local user = string.match(body, '"user_id":"([^"]+)"')
    table.insert(pending, {user = user, id = rid})
  elseif status ~= 200 then
    errors = errors + 1
  end
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
