"""Per-tenant rate limits: how many turns (responses started) and Converse opens a tenant may make per minute.

Each limit is a sliding window log: the times of the tenant's last events of that kind within the window
(60 s). An event when the window already holds `limit` of them is refused with `RateLimited`
(RESOURCE_EXHAUSTED), naming the limit and when the oldest one leaves the window (retry after that); a refused
event is not recorded, so a client that keeps retrying does not push its own retry time back.

Two implementations of one contract (`RateLimiter.hit`):
- `MemoryRateLimiter`: one process's counts (the memory session store: one replica).
- `RedisRateLimiter`: counted across replicas in Redis, one sorted set per tenant and kind
  (`redis_keys.RedisKeys.rate`), trimmed, counted and appended atomically in one Lua script. Times come
  from the orchestrator's clock (`time.time`: replicas' clocks agree to NTP's few ms, far below a 60 s
  window), which also lets tests inject one. If Redis cannot be reached the event is allowed (and logged): a rate
  limit protects capacity, and an outage of the store must not stop the open streams' turns (their saves
  already report UNAVAILABLE).

`limits_of(tenant)` turns a `Tenant` into its `(kind, limit)` pairs; 0 = unlimited, and no call is made.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vitaserve.errors import RateLimited

if TYPE_CHECKING:
    from vitaserve_orchestrator.redis_keys import RedisKeys
    from vitaserve_orchestrator.session import SessionStore

log = logging.getLogger(__name__)

WINDOW_S = 60.0
TURNS = "turns"  # a response started (a commit, typed or VAD)
STREAMS = "streams"  # a Converse stream opened (new or resumed session)
_LIMIT_NAMES = {TURNS: "max_turns_per_minute", STREAMS: "max_streams_per_minute"}
_WHAT = {TURNS: "turns started", STREAMS: "streams opened"}


def rate_limited(tenant: str, kind: str, limit: int, retry_after_s: float) -> RateLimited:
    retry = max(0.1, math.ceil(retry_after_s * 10) / 10)  # never "retry in 0 s"
    return RateLimited(
        f"tenant {tenant!r} has {limit} {_WHAT[kind]} in the last {WINDOW_S:g} s, its limit "
        f"{_LIMIT_NAMES[kind]}={limit}: retry in {retry:g} s",
        retry_after_s=retry,
    )


class RateLimiter(ABC):
    """Counts one tenant's events of one kind in a sliding window of `WINDOW_S`."""

    @abstractmethod
    async def hit(self, tenant: str, kind: str, limit: int) -> None:
        """Record one event of `kind` for `tenant`, or raise `RateLimited` if `limit` (> 0) of them already
        happened within the window."""

    async def check(self, tenant: str, kind: str, limit: int) -> None:
        """`hit`, skipped for limit 0 (unlimited)."""
        if limit > 0:
            await self.hit(tenant, kind, limit)


class MemoryRateLimiter(RateLimiter):
    """In this process (see the module docstring). `clock` returns seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._window_s = window_s
        self._log: dict[tuple[str, str], deque[float]] = {}

    async def hit(self, tenant: str, kind: str, limit: int) -> None:
        now = self._clock()
        times = self._log.setdefault((tenant, kind), deque())
        while times and times[0] <= now - self._window_s:
            times.popleft()
        if len(times) >= limit:
            raise rate_limited(tenant, kind, limit, times[-limit] + self._window_s - now)
        times.append(now)

    def __len__(self) -> int:
        """Events remembered (bounded by the limits: trimmed on every hit)."""
        return sum(len(t) for t in self._log.values())


# KEYS[1] the tenant's sorted set of this kind; ARGV: now (ms), window (ms), limit, a unique member.
# Returns {1} when recorded, {0, retry_after_ms} when refused. The key expires one window after its newest
# event, so idle tenants leave nothing behind.
_HIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {1}
"""


class RedisRateLimiter(RateLimiter):
    """Across replicas, in Redis (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        keys: RedisKeys,
        *,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        window_s: float = WINDOW_S,
    ) -> None:
        self._keys = keys
        self._timeout_s = timeout_s
        self._clock = clock
        self._window_ms = int(window_s * 1000)
        self._script = client.register_script(_HIT)

    async def hit(self, tenant: str, kind: str, limit: int) -> None:
        now_ms = int(self._clock() * 1000)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(
                    keys=[self._keys.rate(tenant, kind)],
                    args=[now_ms, self._window_ms, limit, f"{now_ms}-{uuid.uuid4().hex[:12]}"],
                )
        except Exception as exc:  # noqa: BLE001 - a timeout or any redis-py error: fail open (docstring)
            log.warning("rate limit %s of tenant %r not checked (Redis: %r); allowed", kind, tenant, exc)
            return
        if int(reply[0]) == 0:
            raise rate_limited(tenant, kind, limit, int(reply[1]) / 1000)


def for_store(store: SessionStore, *, clock: Callable[[], float] | None = None) -> RateLimiter:
    """In Redis when the sessions are (so every replica counts the same events), else in memory."""
    redis_store = sys.modules.get("vitaserve_orchestrator.redis_store")  # not imported: not a Redis store
    if redis_store is not None and isinstance(store, redis_store.RedisSessionStore):
        return RedisRateLimiter(store.client, store.keys, timeout_s=store.timeout_s,
                                clock=clock or time.time)
    return MemoryRateLimiter(clock or time.monotonic)
