"""The per-tenant rate limiter (`vitaserve_orchestrator/ratelimit.py`) with an injected clock: the sliding
window, the retry time it names, tenants and kinds kept apart, limits that change; the same contract for the
in-memory limiter and the Redis one (a real redis-server on a free port), and the Redis one failing open when
Redis is gone. Plus the keys file's new tenant fields."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from vitaserve.errors import RateLimited, ResourceExhausted
from vitaserve.redis_server import RedisServer, redis_server_binary
from vitaserve_orchestrator.auth import KeyTable, hash_key
from vitaserve_orchestrator.ratelimit import STREAMS, TURNS, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from vitaserve_orchestrator.redis_keys import RedisKeys

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (the Makefile does)")
    with RedisServer(work_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def refused(limiter: RateLimiter, tenant: str, kind: str, limit: int) -> RateLimited | None:
    try:
        await limiter.check(tenant, kind, limit)
    except RateLimited as exc:
        return exc
    return None


async def contract(limiter: RateLimiter, clock: Clock) -> None:
    """What both implementations must do (clock in seconds)."""
    for i in range(3):  # 3 per minute: t = 0, 10, 20
        assert await refused(limiter, "acme", TURNS, 3) is None, i
        clock.t += 10
    exc = await refused(limiter, "acme", TURNS, 3)  # t = 30: the oldest (t = 0) leaves at 60
    assert isinstance(exc, ResourceExhausted) and exc.code == "RESOURCE_EXHAUSTED" and exc.retryable
    assert exc.retry_after_s == pytest.approx(30.0, abs=0.2)
    assert "tenant 'acme'" in exc.message and "max_turns_per_minute=3" in exc.message
    assert "retry in 30 s" in exc.message
    # other tenants, other kinds and "unlimited" are untouched
    assert await refused(limiter, "globex", TURNS, 3) is None
    assert await refused(limiter, "acme", STREAMS, 3) is None
    for _ in range(10):
        assert await refused(limiter, "acme", TURNS, 0) is None  # 0 = unlimited: nothing counted
    clock.t += 29.5  # t = 59.5: still refused, and a refused hit is not recorded (no moving target)
    exc = await refused(limiter, "acme", TURNS, 3)
    assert exc is not None and exc.retry_after_s == pytest.approx(0.5, abs=0.15)
    clock.t += 0.6  # t = 60.1: the first turn left the window: one more fits, then the next waits for t = 10
    assert await refused(limiter, "acme", TURNS, 3) is None
    exc = await refused(limiter, "acme", TURNS, 3)
    assert exc is not None and exc.retry_after_s == pytest.approx(9.9, abs=0.15)
    # a lower limit (a reloaded keys file) counts the same window: 3 in it, limit 2 -> wait for the 2nd oldest
    exc = await refused(limiter, "acme", TURNS, 2)
    assert exc is not None and exc.retry_after_s == pytest.approx(19.9, abs=0.15)
    assert "max_turns_per_minute=2" in exc.message
    # a higher one lets more in at once
    assert await refused(limiter, "acme", TURNS, 4) is None
    assert "max_streams_per_minute=1" in (await refused(limiter, "acme", STREAMS, 1)).message


def test_memory_limiter_sliding_window() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    run(contract(limiter, clock))
    clock.t += 3600
    run(limiter.check("acme", TURNS, 3))
    assert len(limiter) <= 3  # old events are trimmed, memory stays bounded by the limits


def test_redis_limiter_sliding_window_and_key_expiry(redis_url: str) -> None:
    clock = Clock(1_700_000_000.0)

    async def body() -> None:
        client = aioredis.Redis.from_url(redis_url)
        keys = RedisKeys("ratetest")
        try:
            await contract(RedisRateLimiter(client, keys, clock=clock), clock)
            key = keys.rate("acme", TURNS)
            assert key == "ratetest:t:{acme}:rate:turns"  # in the tenant's hash slot (redis_keys.py)
            assert 0 < await client.pttl(key) <= 60_000  # an idle tenant's window expires by itself
            assert await client.zcard(key) <= 4
            # two limiters (two replicas) share one count
            other = RedisRateLimiter(client, keys, clock=clock)
            mine = RedisRateLimiter(client, keys, clock=clock)
            assert await refused(mine, "initech", STREAMS, 2) is None
            assert await refused(other, "initech", STREAMS, 2) is None
            assert await refused(mine, "initech", STREAMS, 2) is not None
        finally:
            await client.aclose()

    run(body())


def test_redis_limiter_fails_open_when_redis_is_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if redis_server_binary() is None:
        pytest.fail("redis-server is not installed")

    async def body() -> None:
        with RedisServer(work_dir=tmp_path) as server:
            client = aioredis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            limiter = RedisRateLimiter(client, RedisKeys(), timeout_s=0.5)
            await limiter.check("acme", TURNS, 1)
            assert await refused(limiter, "acme", TURNS, 1) is not None
            server.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await refused(limiter, "acme", TURNS, 1) is None  # allowed, bounded by the timeout
            assert loop.time() - started < 5
            await client.aclose()

    with caplog.at_level("WARNING", logger="vitaserve_orchestrator.ratelimit"):
        run(body())
    assert "not checked" in caplog.text


def test_keys_file_rate_limit_fields_and_defaults() -> None:
    data = {"tenants": {"acme": {"max_turns_per_minute": 30, "max_streams_per_minute": 5}, "plain": {}},
            "keys": [{"sha256": hash_key("a"), "tenant": "acme"}, {"sha256": hash_key("p"), "tenant": "plain"},
                     {"sha256": hash_key("n"), "tenant": "unlisted"}]}
    table = KeyTable.parse(data, max_streams=10, max_turns_per_minute=100)
    acme, plain, unlisted = (table.find(k) for k in "apn")
    assert (acme.max_turns_per_minute, acme.max_streams_per_minute, acme.max_streams) == (30, 5, 10)
    assert (plain.max_turns_per_minute, plain.max_streams_per_minute) == (100, 0)
    assert unlisted.max_turns_per_minute == 100
    for bad, message in (({"max_turns_per_minute": -1}, "max_turns_per_minute must be an integer >= 0"),
                         ({"max_turns_per_minut": 1}, "unknown settings"),
                         ({"max_streams_per_minute": "5"}, "must be an integer")):
        with pytest.raises(ValueError, match=message):
            KeyTable.parse({"tenants": {"acme": bad}, "keys": []})
