"""Replica kill: how many turns a client saw completed are missing from history after a failover.

    python bench/replica_kill.py [--json] [--turns 12] [--kills 3] [--seed 0] [--checkpoint DIR]

The real stack: a redis-server, one Triton with the four models (tiny checkpoint unless --checkpoint), two
orchestrator processes sharing the Redis session store, and the real gRPC client. The client talks spoken
text turns (short replies with audio) to one replica; at a random point (after a random number of
completed turns, a random delay into the next one: before, during or just after its reply) the replica
serving it is killed with SIGKILL. The client reconnects to the other replica with its session id and
carries on; the killed replica is restarted, and the next kill hits the other one.

A turn counts as completed when the client received its response_done before the kill. After each
failover the session's history is read (SessionStarted.history_turns, and the stored record itself);
`lost_history_turns` counts completed turns whose user + assistant entry is missing or different. Target 0:
the orchestrator sends response_done only once that turn's history is saved.

`lost_history_turns(checkpoint_dir, ...) -> int` is the function other benchmarks call (bench/bargein.py);
`replica_kill(...)` returns the whole report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation
from vitaserve.lifecycle import run_main
from vitaserve.redis_server import RedisServer
from vitaserve.replicas import ReplicaSet
from vitaserve.stack import LocalStack
from vitaserve_orchestrator.redis_store import RedisSessionStore
from vitaserve_orchestrator.session import DEFAULT_TENANT, history_reply_text

SETTINGS = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=24, temperature=0.8,
                              seed=7)


async def _history(redis_url: str, session_id: str) -> list[tuple[str, str]]:
    store = RedisSessionStore(redis_url)
    try:
        return [(t.user, t.assistant) for t in (await store.load(session_id, tenant=DEFAULT_TENANT)).history]
    finally:
        await store.close()


async def _turn(conv: Conversation, text: str) -> tuple[str, str] | None:
    """One turn; its (user, assistant) history entry once response_done arrived, None if the stream died
    first (raised by the caller's next read) or the turn ended otherwise."""
    await conv.send_text(text)
    async for event in conv.events():
        kind = event.WhichOneof("event")
        if kind == "response_done":
            done = event.response_done
            return text, history_reply_text(done.state_mark, done.text)
        if kind in ("error", "interrupted"):
            return None
    raise EOFError("the stream ended during a turn")


async def _scenario(replicas: ReplicaSet, redis_url: str, *, turns: int, kills: int, rng: random.Random,
                    turn_s: float) -> dict[str, Any]:
    completed: list[tuple[str, str]] = []
    lost = 0
    kill_points: list[dict[str, Any]] = []
    # Kill after these many completed turns (spread over the conversation, each at least one turn apart).
    kill_after = sorted(rng.sample(range(1, turns), min(kills, turns - 1)))
    serving, session_id, n = 0, "", 0
    restarting: asyncio.Task[None] | None = None
    while True:
        address = replicas.address(serving)
        async with Conversation.open(address, session_id=session_id, settings=SETTINGS) as conv:
            started = conv.started
            assert started is not None
            if session_id:  # a failover: compare with what the client saw completed
                stored = await _history(redis_url, session_id)
                missing = [t for t in completed if t not in stored]
                lost += len(missing)
                kill_points[-1].update(history_turns=started.history_turns, completed=len(completed),
                                       missing=len(missing))
            session_id = conv.session_id
            if n >= turns:
                break
            try:
                while n < turns:
                    killer = None
                    if kill_after and n == kill_after[0]:
                        kill_after.pop(0)
                        if restarting is not None:  # the next failover needs the other replica back
                            await restarting
                        delay = rng.uniform(0.0, turn_s * 1.5)
                        kill_points.append(
                            {"after_turns": n, "delay_ms": round(delay * 1000), "replica": serving})
                        killer = asyncio.get_running_loop().create_task(_kill_later(replicas, serving, delay))
                    try:
                        entry = await _turn(conv, f"Turn {n}: tell me one short thing.")
                    finally:
                        if killer is not None:
                            await killer  # the kill always happens, even if the turn finished first
                    if entry is not None:
                        completed.append(entry)
                    n += 1
                    if killer is not None:
                        # The turn may have finished before the kill: the next read must fail.
                        await conv.send_text("ping")
                        async for _ in conv.events():
                            pass
                        raise EOFError("the stream outlived its replica")
            except (grpc.aio.AioRpcError, EOFError):
                pass
        if replicas.alive(serving):
            break  # every turn done, no kill pending
        dead, serving = serving, 1 - serving
        # Restart the killed replica in the background (a new process, a new port) while the client
        # reconnects to the other one at once.
        restarting = asyncio.get_running_loop().create_task(asyncio.to_thread(replicas.restart, dead))
    if restarting is not None:
        await restarting
    final = await _history(redis_url, session_id)
    lost_at_end = [t for t in completed if t not in final]
    return {
        "lost_history_turns": lost + len(lost_at_end),
        "completed_turns": len(completed),
        "turns": turns,
        "kills": len(kill_points),
        "kill_points": kill_points,
        "history_turns_at_end": len(final),
    }


async def _kill_later(replicas: ReplicaSet, i: int, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(replicas.kill, i)


async def _measure_turn(address: str) -> float:
    async with Conversation.open(address, settings=SETTINGS) as conv:
        t0 = time.perf_counter()
        await _turn(conv, "Warm up: say something short.")
        return time.perf_counter() - t0


def replica_kill(checkpoint_dir: str | Path | None = None, *, turns: int = 12, kills: int = 3, seed: int = 0,
                 work_dir: str | Path | None = None, triton_url: str | None = None) -> dict[str, Any]:
    """Run the scenario (module docstring) and return its report. `triton_url`: use a running Triton
    instead of starting one on `checkpoint_dir` (a tiny checkpoint is written when neither is given)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="vitaserve-replica-kill-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        stack = None
        if triton_url is None:
            if checkpoint_dir is None:
                from vitaserve.models.tiny import write_tiny_checkpoint

                checkpoint_dir = write_tiny_checkpoint(work / "ckpt", seed=0)
            stack = LocalStack(checkpoint_dir, orchestrator=False, work_dir=work / "stack").start()
            triton_url = stack.triton_url
        try:
            with RedisServer(work_dir=work / "redis") as redis, \
                    ReplicaSet(triton_url, redis_url=redis.url, work_dir=work / "replicas",
                               env={"VITASERVE_STREAM_LEASE_S": "3"}) as replicas:
                turn_s = asyncio.run(_measure_turn(replicas.address(0)))
                report = asyncio.run(_scenario(replicas, redis.url, turns=turns, kills=kills, rng=rng,
                                               turn_s=turn_s))
                report["turn_ms"] = round(turn_s * 1000)
                return report
        finally:
            if stack is not None:
                stack.stop()


def lost_history_turns(checkpoint_dir: str | Path | None = None, turns: int = 12, kills: int = 3,
                       seed: int = 0, **kwargs: Any) -> int:
    """Completed turns missing from history after replica kills (target 0); see the module docstring."""
    report = replica_kill(checkpoint_dir, turns=turns, kills=kills, seed=seed, **kwargs)
    return int(report["lost_history_turns"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny one, random weights)")
    parser.add_argument("--triton-url", help="use this running Triton instead of starting one")
    args = parser.parse_args(argv)
    report = replica_kill(args.checkpoint, turns=args.turns, kills=args.kills, seed=args.seed,
                          triton_url=args.triton_url)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:22s} {value}")
    return 0 if report["lost_history_turns"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
