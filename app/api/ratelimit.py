"""Token buckets per user (earning and redeeming apart), per API key and global,
shared by every API process through Redis.

Written here rather than taken from a library: the ones at hand count requests
in fixed or sliding windows, one limit per call; these buckets need all three
tiers taken or refused together in one atomic round trip, which one Lua script
does. When Redis does not answer, each process keeps serving from buckets of
its own (the same algorithm, in memory), says so once in the log and in a
metric, and goes back to Redis by itself.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as redis
from litestar.connection import ASGIConnection

from app.api import metrics
from app.api.problems import problem
from app.ledger.results import ApiKey
from app.settings import Settings, Tier

log = logging.getLogger("rewards.ratelimit")

# KEYS: the buckets. ARGV: the cost, rate and burst of each bucket in turn.
# Takes each bucket's cost from it, or nothing from any when one is short;
# answers {allowed, retry_after_ms, remaining, burst, ms_until_full} for the
# tightest bucket.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local levels = {}
local wait, tight = 0, 1
for i = 1, #KEYS do
  local cost, rate, burst = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  level = math.min(burst, level + math.max(0, now - at) * rate / 1000)
  levels[i] = level
  local short = (cost - level) * 1000 / rate
  if short > wait then wait, tight = short, i end
end
if wait > 0 then
  return {0, math.ceil(wait), math.floor(levels[tight]), tonumber(ARGV[3 * tight]), 0}
end
local least = 1
for i = 1, #KEYS do
  local cost, rate, burst = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  levels[i] = levels[i] - cost
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'at', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst * 1000 / rate) + 1000)
  if levels[i] / burst < levels[least] / tonumber(ARGV[3 * least]) then least = i end
end
local rate, burst = tonumber(ARGV[3 * least - 1]), tonumber(ARGV[3 * least])
return {1, 0, math.floor(levels[least]), burst, math.ceil((burst - levels[least]) * 1000 / rate)}
"""

# A bucket to take from: its Redis key, its tier, and how many tokens.
Bucket = tuple[str, Tier, int]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_ms: int
    remaining: int
    limit: int
    reset_ms: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(self.remaining, 0)),
            "RateLimit-Reset": str(math.ceil((self.retry_after_ms or self.reset_ms) / 1000)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_ms / 1000)))
        return headers


class _LocalBuckets:
    """The same buckets in this process's memory, for while Redis is away."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, buckets: list[Bucket]) -> Decision:
        now = time.monotonic() * 1000
        levels = []
        wait, tight = 0.0, 0
        for i, (key, tier, cost) in enumerate(buckets):
            level, at = self._buckets.get(key, (tier.burst, now))
            level = min(tier.burst, level + max(0.0, now - at) * tier.rate / 1000)
            levels.append(level)
            short = (cost - level) * 1000 / tier.rate
            if short > wait:
                wait, tight = short, i
        if wait > 0:
            return Decision(False, math.ceil(wait), math.floor(levels[tight]), buckets[tight][1].burst, 0)
        for i, (key, _, cost) in enumerate(buckets):
            levels[i] -= cost
            self._buckets[key] = (levels[i], now)
        least = min(range(len(buckets)), key=lambda i: levels[i] / buckets[i][1].burst)
        tier = buckets[least][1]
        return Decision(True, 0, math.floor(levels[least]), tier.burst,
                        math.ceil((tier.burst - levels[least]) * 1000 / tier.rate))


class RateLimiter:
    RETRY_REDIS_AFTER = 5.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis = redis.from_url(settings.redis_url, socket_timeout=0.1, socket_connect_timeout=0.1)
        self._take = self._redis.register_script(_TAKE)
        self._local = _LocalBuckets()
        self._redis_down_until = 0.0

    async def close(self) -> None:
        await self._redis.aclose()

    def buckets(self, kind: str, items_by_user: dict[str, int], items: int, key: ApiKey) -> list[Bucket]:
        """A token an item: `items` from the global and API-key buckets (the
        key's rate tier's size when REWARDS_RATE_TIERS names it), and from each
        user's bucket (earning and redeeming only) the count of its items."""
        s, prefix = self.settings, self.settings.redis_prefix
        key_tier = s.rate_tiers.get(key.rate_tier, s.rate_api_key) if key.rate_tier else s.rate_api_key
        chosen = [(f"{prefix}:rl:global", s.rate_global, items), (f"{prefix}:rl:key:{key.key_id}", key_tier, items)]
        if kind in ("earn", "redeem"):
            tier = s.rate_user_earn if kind == "earn" else s.rate_user_redeem
            chosen += [(f"{prefix}:rl:user:{kind}:{user_id}", tier, count) for user_id, count in items_by_user.items()]
        return chosen

    def callback_buckets(self, source: str, user_id: str) -> list[Bucket]:
        """A signed callback's: the global bucket, its source's (the size of an
        API key's) and the user's earning bucket, a token from each."""
        s, prefix = self.settings, self.settings.redis_prefix
        return [(f"{prefix}:rl:global", s.rate_global, 1), (f"{prefix}:rl:source:{source}", s.rate_api_key, 1),
                (f"{prefix}:rl:user:earn:{user_id}", s.rate_user_earn, 1)]

    async def take(self, buckets: list[Bucket]) -> Decision:
        if time.monotonic() >= self._redis_down_until:
            args: list[float] = []
            for _, tier, cost in buckets:
                args += [cost, tier.rate, tier.burst]
            try:
                answer = await self._take(keys=[key for key, _, _ in buckets], args=args)
            except (redis.RedisError, OSError) as exc:
                if self._redis_down_until == 0.0:
                    log.warning("redis unreachable, rate limiting per process until it answers: %s", exc)
                    metrics.RATELIMIT_FALLBACK.set(1)
                self._redis_down_until = time.monotonic() + self.RETRY_REDIS_AFTER
            else:
                if self._redis_down_until:
                    log.warning("redis answers again, rate limits are shared again")
                    metrics.RATELIMIT_FALLBACK.set(0)
                    self._redis_down_until = 0.0
                return Decision(bool(answer[0]), *(int(v) for v in answer[1:]))
        return self._local.take(buckets)


async def take_lookup_token(connection: ASGIConnection) -> None:
    """Before a key this process does not know is looked up: a token from the
    client address's bucket, or 429."""
    limiter: RateLimiter = connection.app.state.rate_limiter
    address = connection.client.host if connection.client else "unknown"
    decision = await limiter.take(
        [(f"{limiter.settings.redis_prefix}:rl:lookup:{address}", limiter.settings.rate_key_lookup, 1)])
    if not decision.allowed:
        metrics.RATE_LIMITED.labels("key_lookup").inc()
        raise problem("rate-limited", "too many lookups of unknown API keys from this address; retry after the "
                      "given delay", headers=decision.headers())


async def take_token(connection: ASGIConnection, kind: str, user_id: str | None = None) -> Decision:
    """Take a token from each of the request's buckets, or refuse with 429. `kind`
    is "earn", "redeem" or "read" (reads share only the key and global buckets);
    the user is the path's unless given (an action names it in its body).
    The decision stays on the connection for the response's RateLimit headers."""
    user_id = user_id or connection.path_params.get("user_id")
    return await take_tokens(connection, kind, {user_id: 1} if user_id is not None else {}, 1)


async def take_tokens(connection: ASGIConnection, kind: str, items_by_user: dict[str, int], items: int) -> Decision:
    """A token for each of a request's `items`, all or none (take_token's, for a
    request of many items such as a bulk grant), or 429."""
    limiter: RateLimiter = connection.app.state.rate_limiter
    decision = await limiter.take(limiter.buckets(kind, items_by_user, items, connection.user))
    connection.state.rate_limit = decision
    if not decision.allowed:
        metrics.RATE_LIMITED.labels(kind).inc()
        raise problem("rate-limited", "a rate limit is exhausted; retry after the given delay",
                      headers=decision.headers())
    return decision


async def take_callback_token(connection: ASGIConnection, source: str, user_id: str) -> Decision:
    """take_token for a signed callback, which has a source and no API key."""
    limiter: RateLimiter = connection.app.state.rate_limiter
    decision = await limiter.take(limiter.callback_buckets(source, user_id))
    if not decision.allowed:
        metrics.RATE_LIMITED.labels("earn").inc()
        raise problem("rate-limited", "a rate limit is exhausted; retry after the given delay",
                      headers=decision.headers())
    return decision
