"""Batch throughput and crash safety: real Redis, real Triton (tiny checkpoint), real Celery workers.

    python bench/batch.py [--json] [--items 200] [--audio-every 10] [--max-tokens 16]

One manifest of `--items` items (the example camera image and a question each; every `--audio-every`-th
item also asks for speech), run three times through the same Triton:

- `items_per_min_1`: one worker with one pool process (job concurrency 2: one item at a time runs);
- `items_per_min_2`: one worker with two pool processes (two items of the job in flight);
  both timed from the submission to the job's `done` (workers already up, wall clock);
- kill-and-resume: two pool processes and beat (for the sweep); once a third of the items are finished the
  worker and its children get SIGKILL, a new worker starts, and the job finishes. `duplicates` counts extra
  lines of an item in results.jsonl (and extra WAV files), `missing` the items without a line (or a WAV
  they should have). Targets: both 0. `after_kill_s`: from the kill to the job's end (includes the
  redelivery wait: the visibility timeout; a message the transport lost waits for the sweep).

Numbers on a shared CPU are distorted by whatever else runs; report them as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from vitaserve.lifecycle import run_main
from vitaserve.models.tiny import write_tiny_checkpoint
from vitaserve.stack import MODEL_REPOSITORY, REPO_ROOT
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonServer
from vitaserve_batch.harness import CeleryBeat, CeleryWorker, RedisServer, batch_env, wait_for, write_manifest
from vitaserve_batch.results import read_results
from vitaserve_batch.spec import JobSpec, create_job
from vitaserve_batch.store import JobStore

EXAMPLES = REPO_ROOT / "examples" / "media"
SETTINGS = {"visibility_timeout_s": 5, "redelivery_check_s": 1, "item_lease_s": 15, "item_timeout_s": 12,
            "encode_timeout_s": 10, "first_token_timeout_s": 10, "sweep_interval_s": 5, "stall_after_s": 30}


def submit(store: JobStore, env: dict[str, str], job_id: str, manifest: Path, out: Path) -> None:
    """What `vitaserve batch submit` does, from this process (the app is configured from `env`)."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("VITASERVE_BATCH_")})
    from vitaserve_batch.tasks import start_job  # reads the settings now

    spec = JobSpec(out_dir=str(out), manifest=str(manifest), concurrency=2)
    create_job(store, job_id, spec, default_concurrency=2, max_concurrency=16)
    start_job.apply_async(args=(job_id, spec.to_dict()), task_id=job_id, queue=env["VITASERVE_BATCH_QUEUE"])


def finished(store: JobStore, job_id: str) -> bool:
    return (store.job(job_id) or {}).get("status") in ("done", "cancelled", "failed")


def timed_run(store: JobStore, env: dict[str, str], work: Path, name: str, manifest: Path, processes: int,
              n: int) -> float:
    with CeleryWorker(env, log_path=work / f"{name}.log", concurrency=processes) as worker:
        worker.wait_ready()
        t0 = time.monotonic()
        submit(store, env, name, manifest, work / name)
        wait_for(lambda: finished(store, name), 3600, name, on_timeout=worker.log_tail, interval_s=0.1)
        elapsed = time.monotonic() - t0
    rows = read_results(work / name)
    bad = [r for r in rows if r["status"] != "ok"]
    if len(rows) != n or bad:
        raise SystemExit(f"{name}: {len(rows)} results, {len(bad)} not ok: {bad[:3]}")
    return n / elapsed * 60.0


def kill_and_resume(store: JobStore, env: dict[str, str], work: Path, manifest: Path, ids: list[str],
                    audio_ids: set[str]) -> dict[str, float | int]:
    name = "kill-resume"
    (work / "beat").mkdir(exist_ok=True)
    # beat runs the sweep that re-sends messages the Redis transport lost with the killed worker.
    beat = CeleryBeat(env, work_dir=work / "beat").start()
    first = CeleryWorker(env, log_path=work / f"{name}-1.log", concurrency=2).start().wait_ready()
    try:
        submit(store, env, name, manifest, work / name)
        wait_for(lambda: store.done_count(name) >= len(ids) // 3, 3600, "a third of the items",
                 on_timeout=first.log_tail, interval_s=0.05)
        first.kill()
        killed_at, done_at_kill = time.monotonic(), store.done_count(name)
    finally:
        first.kill()
    with CeleryWorker(env, log_path=work / f"{name}-2.log", concurrency=2) as second:
        second.wait_ready()
        wait_for(lambda: finished(store, name), 3600, name, on_timeout=second.log_tail, interval_s=0.1)
        after_kill = time.monotonic() - killed_at
    beat.stop()
    rows = read_results(work / name)
    lines = Counter(r["id"] for r in rows)
    wavs = Counter(p.name for p in (work / name / "audio").iterdir()) if (work / name / "audio").exists() \
        else Counter()
    want_wavs = {f"{i}.wav" for i in audio_ids if any(r["id"] == i and r.get("audio") for r in rows)}
    duplicates = sum(c - 1 for c in lines.values() if c > 1) + sum(1 for w in wavs if w not in want_wavs)
    missing = sum(1 for i in ids if i not in lines) + sum(1 for w in want_wavs if w not in wavs)
    return {"duplicates": duplicates, "missing": missing, "not_ok": sum(r["status"] != "ok" for r in rows),
            "done_at_kill": done_at_kill, "after_kill_s": round(after_kill, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--audio-every", type=int, default=10,
                        help="every Nth item asks for speech (0: none)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vitaserve-bench-batch-") as tmp:
        work = Path(tmp)
        checkpoint = write_tiny_checkpoint(work / "ckpt", seed=0)
        ids = [f"item-{k:04d}" for k in range(args.items)]
        audio_ids = {i for k, i in enumerate(ids) if args.audio_every and k % args.audio_every == 0}
        manifest = write_manifest(work / "items.jsonl", [
            {"id": i, "images": [str(EXAMPLES / "camera.png")], "prompt": f"Question {k}: what do you see?",
             "max_tokens": args.max_tokens, "max_tiles": 1, "want_audio": i in audio_ids}
            for k, i in enumerate(ids)])
        os.environ[ENV_CHECKPOINT_DIR] = str(checkpoint)
        with RedisServer(work / "redis") as redis_srv, \
                TritonServer(MODEL_REPOSITORY, startup_timeout=300, log_path=work / "triton.log") as triton:
            store = JobStore.from_url(redis_srv.url)
            env = batch_env(redis_srv.url, triton.grpc_url, queue="bench", **SETTINGS)
            rate_1 = timed_run(store, env, work, "one-process", manifest, 1, args.items)
            rate_2 = timed_run(store, env, work, "two-processes", manifest, 2, args.items)
            crash = kill_and_resume(store, env, work, manifest, ids, audio_ids)
    report = {"items": args.items, "audio_items": len(audio_ids), "max_tokens": args.max_tokens,
              "items_per_min_1": round(rate_1, 1), "items_per_min_2": round(rate_2, 1),
              "speedup_2": round(rate_2 / rate_1, 2), **crash}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")
    return 0 if crash["duplicates"] == 0 and crash["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
