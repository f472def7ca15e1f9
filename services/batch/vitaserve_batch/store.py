"""Job state in Redis: every key the batch service uses, and the atomic steps that make results exactly-once.

Keys (prefix `vitaserve:batch:`; all of a job's keys expire `job_ttl_s` after its last change):

| key | type | what |
| --- | --- | --- |
| `jobs` | sorted set | job ids by creation time (for `vitaserve batch status`) |
| `job:<job>` | hash | the job record: status, manifest, out_dir, total, concurrency, options, times |
| `job:<job>:items` | list | the parsed manifest, one JSON per item, in order (tasks address items by index) |
| `job:<job>:results` | hash | item id -> result JSON: **the idempotency record** (job + item), written once |
| `job:<job>:counts` | hash | status -> number of results (counted by the write that created the result) |
| `job:<job>:claim:<item>` | string | the token of the attempt running the item, leased (`item_lease_s`) |
| `job:<job>:sent` | hash | item index -> when its task was sent (stops duplicate chains; the sweep's clock) |
| `job:<job>:lock` | lock | serialises the rewrites of results.jsonl |
| `job:<job>:flush` | string | set for `results_flush_s` after a rewrite of results.jsonl while the job runs |

Exactly-once rests on two scripts: `record` writes a result only if none exists (HSETNX) and only if no
other attempt holds a live claim on the item (a fencing token), and counts it in the same step; `claim`
takes the item for one attempt with a lease. A worker killed mid-item leaves its claim to expire; the
redelivered task then claims and runs the item again. Results written by an attempt whose claim was taken
over are discarded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

PREFIX = "vitaserve:batch:"
FINAL_STATUSES = ("done", "cancelled", "failed")

# KEYS: results, counts, claim. ARGV: item id, result JSON, status, token ('' = no claim involved).
# Returns 1 = recorded, 0 = a result already existed, -1 = another attempt holds the item's claim.
_RECORD = """
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[4] then return -1 end
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""
# KEYS: claim. ARGV: old token, new token, lease ms. Takes over a claim only if it is still the old one.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS: claim. ARGV: token. Deletes the claim only if it is still this attempt's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobStore:
    """Typed access to the keys above. `client` must decode responses (`decode_responses=True`)."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._record = client.register_script(_RECORD)
        self._release = client.register_script(_RELEASE)
        self._take_over = client.register_script(_TAKE_OVER)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=30,
                                        socket_connect_timeout=10, health_check_interval=30), ttl_s=ttl_s)

    # ---- keys -----------------------------------------------------------------------------------------

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")

    def _touch(self, pipe: Any, job_id: str) -> None:
        for part in ("", "items", "results", "counts", "sent"):
            pipe.expire(self.key(job_id, part), self.ttl_s)

    # ---- the job record -------------------------------------------------------------------------------

    def create_job(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Create the job record if it does not exist (True if created). Existing records are kept as
        they are: a redelivered or repeated submission never resets a job."""
        key = self.key(job_id)
        created = bool(self.r.hsetnx(key, "id", job_id))
        if created:
            with self.r.pipeline() as pipe:
                pipe.hset(key, mapping={k: _enc(v) for k, v in fields.items()})
                pipe.hsetnx(key, "created_at", time.time())
                pipe.hsetnx(key, "status", "queued")
                pipe.zadd(f"{PREFIX}jobs", {job_id: time.time()})
                # The listing forgets jobs whose state has expired.
                pipe.zremrangebyscore(f"{PREFIX}jobs", "-inf", time.time() - self.ttl_s)
                self._touch(pipe, job_id)
                pipe.execute()
        return created

    def job(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self.key(job_id))
        return {k: _dec(v) for k, v in raw.items()} if raw else None

    def update_job(self, job_id: str, **fields: Any) -> None:
        self.r.hset(self.key(job_id), mapping={k: _enc(v) for k, v in fields.items()})

    def set_status_once(self, job_id: str, field: str, value: Any) -> None:
        self.r.hsetnx(self.key(job_id), field, _enc(value))

    def recent_jobs(self, limit: int = 20) -> list[str]:
        return list(self.r.zrevrange(f"{PREFIX}jobs", 0, limit - 1))

    # ---- the parsed manifest --------------------------------------------------------------------------

    def store_items(self, job_id: str, items: Iterable[dict[str, Any]], *, total_field: str = "total") -> int:
        """Store the parsed manifest once (atomically with the job's total); returns the total. A job
        whose items are stored already keeps them."""
        existing = self.r.hget(self.key(job_id), total_field)
        if existing is not None:
            return int(existing)
        rows = [json.dumps(item, separators=(",", ":")) for item in items]
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(job_id, "items"))
            if rows:
                pipe.rpush(self.key(job_id, "items"), *rows)
            pipe.hset(self.key(job_id), total_field, len(rows))
            self._touch(pipe, job_id)
            pipe.execute()
        return len(rows)

    def item(self, job_id: str, index: int) -> dict[str, Any] | None:
        raw = self.r.lindex(self.key(job_id, "items"), index)
        return json.loads(raw) if raw is not None else None

    def items(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.r.lrange(self.key(job_id, "items"), 0, -1)]

    def item_ids(self, job_id: str) -> list[str]:
        """Item ids in manifest order (read in pages: a manifest may hold 100 000 items)."""
        ids: list[str] = []
        key, page = self.key(job_id, "items"), 1000
        for start in range(0, int(self.r.llen(key)), page):
            ids += [json.loads(raw)["id"] for raw in self.r.lrange(key, start, start + page - 1)]
        return ids

    # ---- claims and results ---------------------------------------------------------------------------

    def claim(self, job_id: str, item_id: str, token: str, lease_s: float) -> bool:
        return bool(self.r.set(self.key(job_id, f"claim:{item_id}"), token, nx=True, px=int(lease_s * 1000)))

    def claim_holder(self, job_id: str, item_id: str) -> str | None:
        return self.r.get(self.key(job_id, f"claim:{item_id}"))

    def take_over(self, job_id: str, item_id: str, old: str, new: str, lease_s: float) -> bool:
        """Replace the claim `old` (an attempt known to be dead) by `new`, atomically."""
        keys = [self.key(job_id, f"claim:{item_id}")]
        return bool(self._take_over(keys=keys, args=[old, new, int(lease_s * 1000)]))

    def claim_ttl_s(self, job_id: str, item_id: str) -> float:
        """Seconds until the current claim expires (0 if there is none)."""
        ms = self.r.pttl(self.key(job_id, f"claim:{item_id}"))
        return max(ms, 0) / 1000.0

    def release(self, job_id: str, item_id: str, token: str) -> None:
        self._release(keys=[self.key(job_id, f"claim:{item_id}")], args=[token])

    def record(self, job_id: str, item_id: str, result: dict[str, Any], *, token: str = "") -> int:
        """Write an item's result once: 1 = recorded, 0 = it had one already, -1 = another attempt holds
        the claim (this attempt's result is discarded)."""
        value = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
        keys = [self.key(job_id, "results"), self.key(job_id, "counts"), self.key(job_id, f"claim:{item_id}")]
        return int(self._record(keys=keys, args=[item_id, value, result["status"], token]))

    def result(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.key(job_id, "results"), item_id)
        return json.loads(raw) if raw is not None else None

    def results(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.key(job_id, "results")).items()}

    def counts(self, job_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self.key(job_id, "counts")).items()}

    def done_count(self, job_id: str) -> int:
        return int(self.r.hlen(self.key(job_id, "results")))

    # ---- lanes and cancellation -----------------------------------------------------------------------

    def was_sent(self, job_id: str, index: int) -> bool:
        return bool(self.r.hexists(self.key(job_id, "sent"), index))

    def mark_sent(self, job_id: str, index: int, *, at: float | None = None) -> None:
        self.r.hset(self.key(job_id, "sent"), index, time.time() if at is None else at)

    def sent_at(self, job_id: str) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.r.hgetall(self.key(job_id, "sent")).items()}

    def active_jobs(self) -> list[str]:
        """Ids of listed jobs that are not finished (queued or running)."""
        out = []
        for job_id in self.r.zrange(f"{PREFIX}jobs", 0, -1):
            status = self.r.hget(self.key(job_id), "status")
            if status is not None and status not in FINAL_STATUSES:
                out.append(job_id)
        return out

    def cancel(self, job_id: str) -> bool:
        """Set the job's cancelled flag (checked before each item). False if the job does not exist."""
        if not self.r.exists(self.key(job_id)):
            return False
        self.r.hset(self.key(job_id), mapping={"cancelled": 1, "cancel_requested_at": time.time()})
        return True

    def cancelled(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancelled") == "1"

    def take_flush_slot(self, job_id: str, interval_s: float) -> bool:
        """True for the first caller in each `interval_s` window (who then rewrites results.jsonl)."""
        return bool(self.r.set(self.key(job_id, "flush"), 1, nx=True, px=max(1, int(interval_s * 1000))))

    def lock(self, job_id: str, timeout_s: float = 60.0) -> Any:
        return self.r.lock(self.key(job_id, "lock"), timeout=timeout_s, blocking_timeout=timeout_s)

    def expire_job(self, job_id: str) -> None:
        with self.r.pipeline() as pipe:
            self._touch(pipe, job_id)
            pipe.execute()


def _enc(value: Any) -> str | int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return "json:" + json.dumps(value, separators=(",", ":"))


def _dec(value: str) -> Any:
    if value.startswith("json:"):
        return json.loads(value[5:])
    return value
