"""Every Redis key the orchestrator uses, in one place.

    {prefix}:t:{<tenant>}:session:<id>         STRING  the session record (session.py, versioned JSON), TTL
    {prefix}:t:{<tenant>}:session:<id>:epoch   STRING  fencing epoch of the stream holding the session, TTL
    {prefix}:t:{<tenant>}:streams              ZSET    live stream leases: member = session id, score =
                                                       lease expiry (ms, Redis clock); the key's own TTL
                                                       is the longest lease
    {prefix}:t:{<tenant>}:rate:<kind>            ZSET    rate limit window (ratelimit.py): member = one
                                                       event, score = its time (ms); TTL one window

`prefix` is `VITASERVE_REDIS_KEY_PREFIX` ("vitaserve"). The tenant is a Redis Cluster hash tag (the
literal braces): all of one tenant's keys are in one slot, which the Lua scripts of `redis_store.py` need
(a script touches a session, its epoch and the tenant's leases atomically). Tenant names are checked by
`auth.check_tenant_name` and session ids are generated (`session.new_session_id`), so neither can hold
`{`, `}` or `:`; client-supplied ids are checked here before they reach a key.
"""

from __future__ import annotations

import re

from vitaserve.errors import NotFound

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class RedisKeys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "vitaserve") -> None:
        if not _SAFE.match(prefix):
            raise ValueError(f"bad Redis key prefix {prefix!r}")
        self.prefix = prefix

    def _tenant(self, tenant: str) -> str:
        if not _SAFE.match(tenant):
            raise ValueError(f"bad tenant name {tenant!r}")
        return f"{self.prefix}:t:{{{tenant}}}"

    def session(self, tenant: str, session_id: str) -> str:
        """The session record. A malformed id cannot name any session: NOT_FOUND, like a missing one."""
        if not _SAFE.match(session_id):
            raise NotFound(f"session {session_id!r} does not exist or has expired")
        return f"{self._tenant(tenant)}:session:{session_id}"

    def epoch(self, tenant: str, session_id: str) -> str:
        return f"{self.session(tenant, session_id)}:epoch"

    def streams(self, tenant: str) -> str:
        return f"{self._tenant(tenant)}:streams"

    def rate(self, tenant: str, kind: str) -> str:
        """The sliding window of one rate limit (`kind`: turns, streams) of a tenant."""
        if not _SAFE.match(kind):
            raise ValueError(f"bad rate limit kind {kind!r}")
        return f"{self._tenant(tenant)}:rate:{kind}"

    def tenant_pattern(self, tenant: str) -> str:
        """SCAN pattern of every key of one tenant (operations: export, erase a tenant)."""
        return f"{self._tenant(tenant)}:*"  # braces are not glob characters in Redis
