"""Faults, each run once, and their figures: recovery times and losses (issue 14 §2).

    python bench/faults.py [--json] [--quick]

The real stack on the tiny VITA-1.5 checkpoint: a Triton with the four models (`base`), a second Triton
with llm_decoder alone (`llm`, the one that is killed), orchestrator processes, redis-server, Celery
workers, the real gRPC client. The scenarios are the fault tests' (`tests/faults/`, `vitaserve.faults`):

- Triton SIGKILL (server and model stubs, by process group) during a reply: seconds from the kill to the
  client's UNAVAILABLE error event; seconds from the restarted Triton being ready (same port) to the next
  completed turn on the same stream; with two Tritons in a static list, seconds from the kill of the
  session's server to the next completed turn (served by the other).
- Orchestrator replica SIGKILL: bench/replica_kill.py's scenario (lost history turns; target 0).
- Redis restart (SIGTERM, start again at once; AOF on, as in docker-compose.yml) and Redis down for 30 s
  (SIGKILL; `--quick`: 10 s): an open stream keeps doing turns throughout. Recovery: from Redis back to
  the first new stream that opens, and to the first save that lands (the stored history holds every
  completed turn); lost turns: turns the client saw completed that are missing from the stored history
  after that.
- Celery worker SIGKILL mid-job: bench/batch.py's kill-and-resume (duplicates, missing; targets 0).
- A slow client that never reads: orchestrator RSS growth while it stalls, and seconds from its turn to
  the server closing the stream (RESOURCE_EXHAUSTED after VITASERVE_CLIENT_WRITE_TIMEOUT_S).

SIGINT/SIGTERM stop everything it started (vitaserve.lifecycle.run_main). Figures on a shared CPU include
whatever else runs there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).parent))  # the other benchmarks' functions
import batch as batch_bench  # noqa: E402
import replica_kill as replica_bench  # noqa: E402

from vitaserve.api.v1 import orchestrator_pb2 as pb  # noqa: E402
from vitaserve.client import Conversation  # noqa: E402
from vitaserve.cluster.routing import HashRing  # noqa: E402
from vitaserve.faults import (  # noqa: E402
    KillableTriton,
    RssSampler,
    StalledClient,
    reply_then_kill,
    rss_kib,
    turn_until_done,
)
from vitaserve.lifecycle import run_main  # noqa: E402
from vitaserve.models.tiny import write_tiny_checkpoint  # noqa: E402
from vitaserve.redis_server import RedisServer  # noqa: E402
from vitaserve.replicas import ReplicaSet  # noqa: E402
from vitaserve.stack import MODEL_REPOSITORY, REPO_ROOT, OrchestratorProcess, free_port  # noqa: E402
from vitaserve_orchestrator.redis_store import RedisSessionStore  # noqa: E402
from vitaserve_orchestrator.session import DEFAULT_TENANT, history_reply_text  # noqa: E402

LONG = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=2048, temperature=0.8,
                          seed=5)
SHORT = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=8, seed=3)
SPOKEN = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=2048, temperature=0.8,
                            seed=5, playout_lead_ms=3_600_000)
DEADLINE_S = 60.0


def orchestrator(work: Path, name: str, llm: str, base: str, **env: str) -> OrchestratorProcess:
    return OrchestratorProcess({"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": base,
                                "VITASERVE_LLM_DECODER_URL": llm, "VITASERVE_HEALTH_POLL_S": "0.5", **env},
                               log_path=work / f"orchestrator-{name}.log").start()


# ---- Triton --------------------------------------------------------------------------------------------


async def _triton_single(address: str, llm: KillableTriton) -> dict[str, Any]:
    async with Conversation.open(address, settings=LONG) as conv:
        await turn_until_done(conv, "Hello.", attempts=1)
        outcome = await reply_then_kill(conv, "Tell me a very long story.", llm.kill, deadline_s=DEADLINE_S)
        t0 = time.monotonic()
        await asyncio.to_thread(llm.restart)
        restart_s = time.monotonic() - t0
        after = await turn_until_done(conv, "Where were we?", deadline_s=DEADLINE_S)
    return {"triton_kill_to_error_s": round(outcome.kill_to_end_s, 3),
            "triton_kill_error": f"{outcome.end.error.code}" if outcome.end.HasField("error") else "none",
            "triton_restart_s": round(restart_s, 1),
            "triton_ready_to_turn_s": round(after.seconds, 2), "triton_retries_after_restart": after.attempts - 1}


async def _triton_pair(address: str, llm: KillableTriton, base: KillableTriton) -> dict[str, Any]:
    ring = HashRing([llm.grpc_url, base.grpc_url])
    async with AsyncExitStack() as stack:
        for _ in range(32):  # a session the ring puts on the server that is killed
            conv = await stack.enter_async_context(Conversation.open(address, settings=LONG))
            if ring.lookup(conv.session_id) == llm.grpc_url:
                break
        await turn_until_done(conv, "Hello.", attempts=1)
        t_kill = time.monotonic()
        outcome = await reply_then_kill(conv, "Tell me a very long story.", llm.kill, deadline_s=DEADLINE_S)
        moved = await turn_until_done(conv, "Are you still there?", deadline_s=DEADLINE_S)
        failover_s = time.monotonic() - t_kill
        await asyncio.sleep(1.0)  # Triton logs a request when it ends
        served_by_other = base.served(moved.done.response_id)
    await asyncio.to_thread(llm.restart)
    return {"failover_kill_to_turn_s": round(failover_s, 2), "failover_attempts": moved.attempts,
            "failover_error": outcome.end.error.code, "failover_served_by_other": served_by_other}


# ---- Redis ---------------------------------------------------------------------------------------------


async def _stored(redis_url: str, session_id: str) -> list[tuple[str, str]] | None:
    store = RedisSessionStore(redis_url)
    try:
        return [(t.user, t.assistant) for t in (await store.load(session_id, tenant=DEFAULT_TENANT)).history]
    except Exception:  # noqa: BLE001 - unreachable or missing: not there (yet)
        return None
    finally:
        await store.close()


async def _completed_turn(conv: Conversation, text: str) -> tuple[str, str] | None:
    """One turn; its history entry if it completed (a save error reported after it does not undo it)."""
    await conv.send_text(text)
    async with asyncio.timeout(DEADLINE_S):
        while True:
            event = await conv.next_event()
            kind = event.WhichOneof("event")
            if kind == "response_done":
                done = event.response_done
                return text, history_reply_text(done.state_mark, done.text)
            if kind in ("error", "interrupted") and event.response_id:
                return None


async def _redis_outage(redis: RedisServer, address: str, *, down_s: float, crash: bool) -> dict[str, Any]:
    completed: list[tuple[str, str]] = []
    async with Conversation.open(address, settings=SHORT) as live:
        first = await _completed_turn(live, "Before the outage.")
        assert first is not None, "the turn before the outage failed"
        completed.append(first)
        if crash:
            redis.kill()
        else:
            redis.stop()  # SIGTERM: Redis writes its AOF and exits; started again at once below
        t_down, n = time.monotonic(), 0
        while time.monotonic() - t_down < down_s:  # turns go on while Redis is away
            n += 1
            entry = await _completed_turn(live, f"During the outage, turn {n}.")
            if entry is not None:
                completed.append(entry)
            await asyncio.sleep(1.0)
        redis.start()
        t_back = time.monotonic()
        open_s = None
        for _ in range(600):  # a new stream opens again
            try:
                async with Conversation.open(address, settings=SHORT):
                    open_s = time.monotonic() - t_back
                    break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        save_s, k = None, 0
        while save_s is None and k < 100 and time.monotonic() - t_back < DEADLINE_S:  # a save lands
            k += 1
            entry = await _completed_turn(live, f"After the outage, turn {k}.")
            if entry is not None:
                completed.append(entry)
            stored = await _stored(redis.url, live.session_id) or []
            if all(t in stored for t in completed):
                save_s = time.monotonic() - t_back
        session_id = live.session_id
    stored = await _stored(redis.url, session_id) or []  # after the stream's final save too
    return {"down_s": round(t_back - t_down, 1),
            "recovery_open_s": None if open_s is None else round(open_s, 2),
            "recovery_save_s": None if save_s is None else round(save_s, 2),
            "turns_completed_during_outage": sum(1 for u, _ in completed if u.startswith("During")),
            "completed_turns": len(completed),
            "lost_turns": sum(1 for t in completed if t not in stored)}


def redis_faults(base_url: str, work: Path, down_s: float) -> dict[str, Any]:
    # History long enough to hold every turn of the run: a turn that the history policy drops (the oldest,
    # beyond VITASERVE_MAX_HISTORY_TURNS) must not count as lost.
    env = {"VITASERVE_REDIS_TIMEOUT_S": "1", "VITASERVE_STREAM_LEASE_S": "3", "VITASERVE_HEALTH_POLL_S": "0.5",
           "VITASERVE_MAX_HISTORY_TURNS": "1000"}
    with RedisServer(work_dir=work / "redis", extra_args=("--appendonly", "yes")) as redis, \
            ReplicaSet(base_url, redis_url=redis.url, work_dir=work / "redis-replicas", replicas=1,
                       env=env) as replicas:
        restart = asyncio.run(_redis_outage(redis, replicas.address(0), down_s=0.0, crash=False))
        outage = asyncio.run(_redis_outage(redis, replicas.address(0), down_s=down_s, crash=True))
    return {**{f"redis_restart_{k}": v for k, v in restart.items() if k != "turns_completed_during_outage"},
            **{f"redis_down_{k}": v for k, v in outage.items()}}


# ---- slow client ---------------------------------------------------------------------------------------


def _gauge(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as reply:
        match = re.search(rf"^{re.escape(name)} (\S+)$", reply.read().decode(), re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


async def _slow_client(proc: OrchestratorProcess, metrics_url: str) -> dict[str, Any]:
    baseline = rss_kib(proc.pid)
    stalled = StalledClient(proc.address, SPOKEN)
    try:
        with RssSampler(proc.pid) as rss:
            t0 = time.monotonic()
            await stalled.start("Tell me a very long story.")
            closed_s = None
            while time.monotonic() - t0 < DEADLINE_S * 2:  # the server closes it; the client never read
                if await asyncio.to_thread(_gauge, metrics_url, "vitaserve_active_sessions") == 0:
                    closed_s = time.monotonic() - t0
                    break
                await asyncio.sleep(0.1)
        events, code, details = await stalled.drain(DEADLINE_S)
    finally:
        await stalled.close()
    return {"slow_client_rss_growth_mib": round((rss.peak_kib - baseline) / 1024, 1),
            "slow_client_closed_after_s": None if closed_s is None else round(closed_s, 2),
            "slow_client_status": code.name, "slow_client_events_held_by_transport": len(events),
            "slow_client_details": details}


# ---- the run -------------------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"quick": quick}
    with tempfile.TemporaryDirectory(prefix="vitaserve-bench-faults-") as tmp, ExitStack() as cleanup:
        work = Path(tmp)
        checkpoint = write_tiny_checkpoint(work / "ckpt", golden=REPO_ROOT / "tests" / "golden" / "vita15-tiny")
        env = {"VITASERVE_CHECKPOINT_DIR": str(checkpoint), "VITASERVE_CPU_THREADS": "1"}
        base = KillableTriton(MODEL_REPOSITORY, models=None, work_dir=work, name="base", env=env)
        llm = KillableTriton(MODEL_REPOSITORY, models=["llm_decoder"], work_dir=work, name="llm", env=env)
        for triton in (base, llm):
            cleanup.callback(triton.stop)
            triton.start()
        write_timeout = "5" if quick else "10"
        metrics = f"127.0.0.1:{free_port()}"
        procs = {
            "single": orchestrator(work, "single", llm.grpc_url, base.grpc_url, VITASERVE_TOKEN_TIMEOUT_S="10"),
            "pair": orchestrator(work, "pair", f"{llm.grpc_url},{base.grpc_url}", base.grpc_url),
            "slow": orchestrator(work, "slow", base.grpc_url, base.grpc_url, VITASERVE_METRICS_ADDRESS=metrics,
                                 VITASERVE_CLIENT_WRITE_TIMEOUT_S=write_timeout),
        }
        for proc in procs.values():
            cleanup.callback(proc.stop)
        report.update(asyncio.run(_triton_single(procs["single"].address, llm)))
        report.update(asyncio.run(_triton_pair(procs["pair"].address, llm, base)))
        report["slow_client_write_timeout_s"] = float(write_timeout)
        report.update(asyncio.run(_slow_client(procs["slow"], f"http://{metrics}/metrics")))
        for proc in procs.values():
            proc.stop()

        replica = replica_bench.replica_kill(turns=6 if quick else 12, kills=2 if quick else 3,
                                             work_dir=work / "replica-kill", triton_url=base.grpc_url)
        report.update(replica_lost_turns=replica["lost_history_turns"], replica_kills=replica["kills"],
                      replica_completed_turns=replica["completed_turns"])
        report.update(redis_faults(base.grpc_url, work, down_s=10.0 if quick else 30.0))
        report.update(celery_kill(base.grpc_url, work / "celery", items=24 if quick else 60))
    return report


def celery_kill(triton_url: str, work: Path, items: int) -> dict[str, Any]:
    from vitaserve_batch.harness import RedisServer as BatchRedis
    from vitaserve_batch.harness import batch_env, write_manifest
    from vitaserve_batch.store import JobStore

    work.mkdir(parents=True)
    ids = [f"item-{k:04d}" for k in range(items)]
    audio_ids = {i for k, i in enumerate(ids) if k % 6 == 0}
    camera = REPO_ROOT / "examples" / "media" / "camera.png"
    manifest = write_manifest(work / "items.jsonl", [
        {"id": i, "images": [str(camera)], "prompt": f"Question {k}: what do you see?", "max_tokens": 16,
         "max_tiles": 1, "want_audio": i in audio_ids} for k, i in enumerate(ids)])
    with BatchRedis(work / "redis") as redis:
        store = JobStore.from_url(redis.url)
        env = batch_env(redis.url, triton_url, queue="faults", **batch_bench.SETTINGS)
        crash = batch_bench.kill_and_resume(store, env, work, manifest, ids, audio_ids)
    return {"celery_items": items, "celery_duplicates": crash["duplicates"], "celery_missing": crash["missing"],
            "celery_after_kill_s": crash["after_kill_s"]}


TARGETS = {"replica_lost_turns": 0, "redis_restart_lost_turns": 0, "redis_down_lost_turns": 0,
           "celery_duplicates": 0, "celery_missing": 0, "triton_kill_error": "UNAVAILABLE",
           "failover_served_by_other": True, "slow_client_status": "RESOURCE_EXHAUSTED"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--quick", action="store_true", help="shorter runs: Redis down 10 s, fewer turns/items")
    args = parser.parse_args(argv)
    report = run(args.quick)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:40s} {value}")
    missed = {k: report.get(k) for k, want in TARGETS.items() if report.get(k) != want}
    if missed:
        print(f"targets missed: {missed}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
