"""`RedisSessionStore`: sessions in Redis (redis-py asyncio), shared by every orchestrator replica.

Each operation is one Lua script, so it is atomic on the server: a session's record, its fencing epoch and
its tenant's stream leases change together or not at all (keys: `redis_keys.py`; rules: session.py's
docstring). Time inside the scripts is Redis's own clock (`TIME`), one clock for every replica.

- create: refuse if the tenant is at `max_streams` live leases; write the record and epoch 1 with the
  session TTL; add the lease.
- claim: NOT_FOUND without a record; the same limit (a session's own old lease does not count twice);
  `INCR` the epoch (every older holder is now stale); refresh the TTL; set the lease.
- save: write the record only if the stored epoch is the caller's; if the epoch key is gone (the session
  expired, or Redis lost its data) the caller, the newest holder it knows of, writes it back.
- renew: the same epoch check; refresh the TTLs and the lease. release: drop the lease if still ours.
- delete: drop the record and lease, and bump the epoch (a tombstone for the TTL) so a stale holder's
  late save cannot bring the session back.

Failures: a Redis that cannot be reached, is loading or is read-only raises `Unavailable` within
`timeout_s` for the whole operation (connecting included), never a hang. redis-py reconnects by itself: a
pooled connection that died (Redis restarted) is dropped and the operation retried once on a new one, so
the service recovers as soon as Redis is back, without a restart. Redis without persistence loses
sessions when it restarts; production Redis should run with AOF (`appendonly yes`).

Needs Redis >= 5 (scripts read `TIME` before writing, which needs effects replication, the default since
5). The client is a single-endpoint `redis.asyncio.Redis` (a primary, e.g. behind Sentinel or a managed
service); the key layout already keeps each script's keys in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from vitaserve.errors import Unavailable, VitaserveError

from vitaserve_orchestrator.redis_keys import RedisKeys
from vitaserve_orchestrator.session import (
    DEFAULT_TENANT,
    Session,
    SessionSettings,
    SessionStore,
    SessionSuperseded,
    new_session_id,
    not_found,
    session_from_record,
    session_to_record,
    stream_limit_error,
)
from vitaserve_orchestrator.settings import OrchestratorSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Redis errors that mean "not now" rather than "wrong": starting up, a replica, failing over, busy.
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "OOM")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LEASE = """
local function lease(streams, member, now, lease_ms)
  redis.call('ZADD', streams, now + lease_ms, member)
  if redis.call('PTTL', streams) < lease_ms then redis.call('PEXPIRE', streams, lease_ms) end
end
local function over_limit(streams, member, now, max)
  redis.call('ZREMRANGEBYSCORE', streams, '-inf', now)
  if max <= 0 or redis.call('ZSCORE', streams, member) then return false end
  local live = redis.call('ZCARD', streams)
  if live >= max then return live end
  return false
end
"""

# KEYS: record, epoch, streams. ARGV: record json, ttl ms, session id, lease ms, max streams.
# -> {1} created, {-2, live} over the limit, {-3} the id exists (a retried call that had succeeded).
_CREATE = _NOW + _LEASE + """
local live = over_limit(KEYS[3], ARGV[3], now, tonumber(ARGV[5]))
if live then return {-2, live} end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return {-3} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[2])
lease(KEYS[3], ARGV[3], now, tonumber(ARGV[4]))
return {1}
"""

# KEYS: record, epoch, streams. ARGV: ttl ms, session id, lease ms, max streams.
# -> {epoch, record}, {-1} not found, {-2, live} over the limit.
_CLAIM = _NOW + _LEASE + """
local record = redis.call('GET', KEYS[1])
if not record then return {-1} end
local live = over_limit(KEYS[3], ARGV[2], now, tonumber(ARGV[4]))
if live then return {-2, live} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
lease(KEYS[3], ARGV[2], now, tonumber(ARGV[3]))
return {epoch, record}
"""

# KEYS: record, epoch. ARGV: epoch, record json, ttl ms. -> 1 saved, 0 fenced off.
_SAVE = """
local current = redis.call('GET', KEYS[2])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
"""

# KEYS: record, epoch, streams. ARGV: epoch, ttl ms, session id, lease ms. -> 1 renewed, 0 fenced off.
_RENEW = _NOW + _LEASE + """
local current = redis.call('GET', KEYS[2])
if current and current ~= ARGV[1] then return 0 end
if current then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
lease(KEYS[3], ARGV[3], now, tonumber(ARGV[4]))
return 1
"""

# KEYS: epoch, streams. ARGV: epoch, session id. -> 1 released, 0 a newer stream holds it.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: record, epoch, streams. ARGV: session id, ttl ms.
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


def _superseded(session: Session) -> SessionSuperseded:
    return SessionSuperseded(f"session {session.id!r} was taken over by a newer stream")


class RedisSessionStore(SessionStore):
    """Sessions in Redis (see the module docstring). `client` is for tests that bring their own."""

    def __init__(
        self,
        url: str,
        *,
        keys: RedisKeys | None = None,
        ttl_s: float = 3600.0,
        lease_s: float = 15.0,
        timeout_s: float = 2.0,
        frames_kept: int = 16,
        client: aioredis.Redis | None = None,
    ) -> None:
        self._redis = client or aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry on a fresh connection: a pooled connection that died with a restarted
            # Redis fails at once, the retry reconnects. Retries never extend past timeout_s (below).
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, ConnectionResetError, BrokenPipeError],
            health_check_interval=30,
        )
        self.keys = keys or RedisKeys()
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ms = int(lease_s * 1000)
        self._timeout_s = timeout_s
        self._frames_kept = frames_kept
        self._where = _describe(url)
        r = self._redis
        self._create = r.register_script(_CREATE)
        self._claim = r.register_script(_CLAIM)
        self._save = r.register_script(_SAVE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._delete = r.register_script(_DELETE)

    @classmethod
    def from_settings(cls, config: OrchestratorSettings) -> RedisSessionStore:
        assert config.redis_url is not None  # checked by the settings
        return cls(
            config.redis_url,
            keys=RedisKeys(config.redis_key_prefix),
            ttl_s=config.session_idle_ttl_s,
            lease_s=config.stream_lease_s,
            timeout_s=config.redis_timeout_s,
            frames_kept=config.frames_kept,
        )

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    @property
    def timeout_s(self) -> float:
        """The bound on one Redis operation (the rate limiter in the same Redis uses it too)."""
        return self._timeout_s

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation bounded by `timeout_s`; failures become `Unavailable`."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op()
        except TimeoutError as exc:
            raise Unavailable(
                f"session store ({self._where}) did not answer within {self._timeout_s:g} s ({what})"
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise Unavailable(f"session store ({self._where}) is unreachable ({what}): {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith(_TRANSIENT_REPLIES):
                raise Unavailable(f"session store ({self._where}) cannot serve now ({what}): {exc}") from exc
            raise VitaserveError(f"session store error ({what}): {exc}") from exc
        except RedisError as exc:
            raise Unavailable(f"session store ({self._where}) failed ({what}): {exc}") from exc

    async def create(
        self, settings: SessionSettings, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0
    ) -> Session:
        for _ in range(3):  # -3 only if a retried call had created that id: take another one
            session = Session(id=new_session_id(), settings=settings, tenant=tenant,
                              frames_kept=self._frames_kept, epoch=1)
            k = self.keys
            create = functools.partial(
                self._create,
                keys=[k.session(tenant, session.id), k.epoch(tenant, session.id), k.streams(tenant)],
                args=[session_to_record(session), self._ttl_ms, session.id, self._lease_ms, max_streams],
            )
            reply = await self._call("creating a session", create)
            if reply[0] == -2:
                raise stream_limit_error(tenant, int(reply[1]), max_streams)
            if reply[0] == 1:
                return session
        raise VitaserveError("could not create a session: fresh ids kept colliding")

    async def load(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> Session:
        key = self.keys.session(tenant, session_id)
        raw = await self._call("loading a session", lambda: self._redis.get(key))
        if raw is None:
            raise not_found(session_id)
        return self._decode(raw, tenant, session_id, epoch=0)

    async def claim(self, session_id: str, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0) -> Session:
        k = self.keys
        reply = await self._call("resuming a session", lambda: self._claim(
            keys=[k.session(tenant, session_id), k.epoch(tenant, session_id), k.streams(tenant)],
            args=[self._ttl_ms, session_id, self._lease_ms, max_streams],
        ))
        if reply[0] == -1:
            raise not_found(session_id)
        if reply[0] == -2:
            raise stream_limit_error(tenant, int(reply[1]), max_streams)
        return self._decode(reply[1], tenant, session_id, epoch=int(reply[0]))

    def _decode(self, raw: bytes, tenant: str, session_id: str, *, epoch: int) -> Session:
        session = session_from_record(raw, frames_kept=self._frames_kept, epoch=epoch)
        if session.tenant != tenant or session.id != session_id:  # a key written by hand, or a bug
            key = self.keys.session(tenant, session_id)
            raise VitaserveError(f"the session record under {key} names another session")
        return session

    async def save(self, session: Session) -> None:
        k = self.keys
        record = session_to_record(session)  # now: the session may change while we wait for Redis
        saved = await self._call("saving a session", lambda: self._save(
            keys=[k.session(session.tenant, session.id), k.epoch(session.tenant, session.id)],
            args=[session.epoch, record, self._ttl_ms],
        ))
        if not saved:
            raise _superseded(session)

    async def renew(self, session: Session) -> None:
        k = self.keys
        renewed = await self._call("renewing a stream lease", lambda: self._renew(
            keys=[k.session(session.tenant, session.id), k.epoch(session.tenant, session.id),
                  k.streams(session.tenant)],
            args=[session.epoch, self._ttl_ms, session.id, self._lease_ms],
        ))
        if not renewed:
            raise _superseded(session)

    async def release(self, session: Session) -> None:
        k = self.keys
        await self._call("releasing a stream lease", lambda: self._release(
            keys=[k.epoch(session.tenant, session.id), k.streams(session.tenant)],
            args=[session.epoch, session.id],
        ))

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        k = self.keys
        await self._call("deleting a session", lambda: self._delete(
            keys=[k.session(tenant, session_id), k.epoch(tenant, session_id), k.streams(tenant)],
            args=[session_id, self._ttl_ms],
        ))

    async def live_streams(self, tenant: str) -> int:
        """Live stream leases of a tenant (expired ones not counted)."""
        key = self.keys.streams(tenant)

        async def count() -> Any:
            now_s, now_us = await self._redis.time()
            return await self._redis.zcount(key, f"({now_s * 1000 + now_us // 1000}", "+inf")

        return int(await self._call("counting streams", count))

    async def check(self) -> None:
        await self._call("ping", self._redis.ping)

    async def close(self) -> None:
        await self._redis.aclose()


def _describe(url: str) -> str:
    """Where Redis is, for messages: scheme, host and port, never the password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"Redis at {parts.path}"
    return f"Redis at {parts.hostname}:{parts.port or 6379}"
