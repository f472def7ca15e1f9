"""Batch jobs end to end: a real Redis, a real Triton with the four models on the tiny checkpoint, real
Celery worker processes, jobs submitted through the CLI.

- a 20-item manifest mixing good items (image, video folder, GIF, audio, text; some with audio out) and bad
  ones (bad JSON, missing fields, unknown options, duplicate id, missing and corrupt files) finishes with
  the right status for every line, one WAV per item that asked for audio, nothing else;
- a worker killed with SIGKILL in the middle of a job, replaced by another: every item appears exactly once
  in results.jsonl and every WAV exists once;
- a component that cannot be reached is retried with backoff, then the item's error is UNAVAILABLE;
- cancel marks the items not yet run as cancelled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import soundfile

from vitaserve_batch import cli
from vitaserve_batch.harness import free_port, wait_for, write_manifest
from vitaserve_batch.results import read_results

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def submit(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """`vitaserve batch submit ...` in this process with the worker's environment; returns the job id."""
    for key, value in env.items():
        if key.startswith("VITASERVE_BATCH_"):
            monkeypatch.setenv(key, value)
    proc = subprocess.run([sys.executable, "-m", "vitaserve.cli", "batch", "submit", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def finished(store, job_id: str) -> bool:  # noqa: ANN001
    job = store.job(job_id) or {}
    return job.get("status") in ("done", "cancelled", "failed")


def test_mixed_manifest_completes_with_the_right_statuses(
    triton, store, env_factory, processes, media, tmp_path, monkeypatch, capsys
) -> None:
    sq, wide = str(media["square"]), str(media["wide"])
    lines = [
        {"id": "img-1", "images": [sq], "prompt": "What is in the picture?", "want_audio": True},
        {"id": "img-2", "image": sq, "prompt": "Describe it.", "max_tiles": 1},
        {"id": "img-3", "images": [wide], "prompt": "Describe it.", "max_tiles": 2, "seed": 3},
        {"id": "img-4", "images": [sq, sq], "prompt": "Compare the two pictures."},
        {"id": "video-1", "video": str(media["video"]), "prompt": "What happens?"},
        {"id": "gif-1", "video": str(media["clip"]), "prompt": "What happens?"},
        {"id": "speech-1", "audio": str(media["question"]), "want_audio": True},
        {"id": "speech-img", "audio": str(media["question"]), "images": [sq]},
        {"id": "text-1", "text": "Say hello.", "want_audio": True, "max_tokens": 6},
        {"id": "text-2", "prompt": "Count to three.", "temperature": 0.7, "seed": 1},
        '{"id": "broken", "prompt": ',                                        # bad JSON
        '["not", "an", "object"]',                                           # not an object
        {"prompt": "no id"},                                                  # missing id
        {"id": "typo", "prompt": "x", "want_audoi": True},                    # unknown option
        {"id": "img-1", "prompt": "again"},                                   # duplicate id
        {"id": "missing-img", "images": ["does/not/exist.png"], "prompt": "x"},
        {"id": "corrupt-img", "images": [str(media["corrupt"])], "prompt": "x"},
        {"id": "corrupt-wav", "audio": str(tmp_path / "none.wav")},
        {"id": "empty"},                                                      # no query
        {"id": "too-long", "prompt": "x", "max_tokens": 100000},
    ]
    manifest = write_manifest(tmp_path / "items.jsonl", lines)
    out = tmp_path / "out"
    env = env_factory(triton.grpc_url)
    processes("worker", env, concurrency=2)
    job_id = submit(env, monkeypatch, "--manifest", str(manifest), "--out", str(out), "--concurrency", "3")
    wait_for(lambda: finished(store, job_id), 240, "the job to finish",
             on_timeout=lambda: json.dumps(store.job(job_id), default=str))

    rows = read_results(out)
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert [r["line"] for r in rows] == list(range(1, 21)), "results.jsonl is in manifest order"
    by_id = {r["id"]: r for r in rows}
    good = ["img-1", "img-2", "img-3", "img-4", "video-1", "gif-1", "speech-1", "speech-img", "text-1",
            "text-2"]
    for item_id in good:
        assert by_id[item_id]["status"] == "ok", by_id[item_id]
        assert by_id[item_id]["tokens"] >= 1 and "total_ms" in by_id[item_id]["timings"]
    errors = {r["id"]: r for r in rows if r["status"] == "error"}
    assert set(errors) == {"line-11", "line-12", "line-13", "typo", "line-15", "missing-img", "corrupt-img",
                           "corrupt-wav", "empty", "too-long"}
    assert "bad JSON" in errors["line-11"]["error"]
    assert "expected a JSON object" in errors["line-12"]["error"]
    assert "missing field 'id'" in errors["line-13"]["error"]
    assert "unknown field 'want_audoi'" in errors["typo"]["error"]
    assert "duplicate id 'img-1'" in errors["line-15"]["error"]
    assert "no such file" in errors["missing-img"]["error"] and "exist.png" in errors["missing-img"]["error"]
    assert "corrupt" in errors["corrupt-img"]["error"] or "unrecognised" in errors["corrupt-img"]["error"]
    assert errors["corrupt-img"]["error_code"] == "INVALID_ARGUMENT"
    assert "no such file" in errors["corrupt-wav"]["error"]
    assert "no query" in errors["empty"]["error"]
    assert "above the limit" in errors["too-long"]["error"]
    # Audio: one 24 kHz WAV per item that asked for it and got text; nothing else in audio/.
    wavs = sorted(p.name for p in (out / "audio").iterdir()) if (out / "audio").exists() else []
    expected = sorted(f"{i}.wav" for i in ("img-1", "speech-1", "text-1") if by_id[i]["text"].strip())
    assert wavs == expected
    for name in wavs:
        info = soundfile.info(out / "audio" / name)
        assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0
        assert by_id[name[:-4]]["audio"] == f"audio/{name}"
    job = store.job(job_id)
    assert job["status"] == "done" and int(job["total"]) == 20
    assert store.counts(job_id) == {"ok": 10, "error": 10}
    # The CLI's view of it: the progress line, the JSON record, the listing.
    watch = subprocess.run([sys.executable, "-m", "vitaserve.cli", "batch", "status", job_id, "--watch"],
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    assert watch.returncode == 0, watch.stderr
    assert f"{job_id} done [{'#' * 30}] 20/20 100% ok 10 error 10 cancelled 0" in watch.stdout
    shown = subprocess.run([sys.executable, "-m", "vitaserve.cli", "batch", "status", job_id, "--json"],
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    record = json.loads(shown.stdout)
    assert record["counts"] == {"ok": 10, "error": 10} and record["job"]["concurrency"] == "3"
    assert cli.main(["resume", job_id]) == 0  # nothing is unfinished: nothing is sent
    assert "0 task(s) sent again" in capsys.readouterr().out
    assert cli.main(["status", "no-such-job"]) == 1


@pytest.mark.parametrize("victim", ["worker", "pool-process"])
def test_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(
    victim, triton, store, env_factory, processes, media, tmp_path, monkeypatch
) -> None:
    """worker: SIGKILL to the worker and its pool (node loss): its messages come back after the visibility
    timeout, to a new worker. pool-process: SIGKILL to the pool process running an item: the worker
    rejects the message back to the queue at once (task_reject_on_worker_lost) and forks a new process."""
    sq = str(media["square"])
    n = 16
    lines = [{"id": f"item-{k:02d}", "images": [sq], "prompt": f"Question {k}?", "max_tokens": 6,
              "want_audio": k % 4 == 0} for k in range(n)]
    manifest = write_manifest(tmp_path / "items.jsonl", lines)
    out = tmp_path / "out"
    env = env_factory(triton.grpc_url)
    first = processes("worker", env, concurrency=1)
    # beat runs the sweep: the Redis transport loses a message popped by a worker killed before recording it.
    processes("beat", env)
    job_id = submit(env, monkeypatch, "--manifest", str(manifest), "--out", str(out), "--concurrency", "2")
    wait_for(lambda: store.done_count(job_id) >= 3, 120, "3 finished items", on_timeout=first.log_tail)
    if victim == "worker":
        first.kill()  # SIGKILL to the worker and its pool process, mid-job
        assert not first.running()
        assert store.done_count(job_id) < n, "the job finished before the kill; the test needs more items"
        # The dead worker's in-flight messages are still unacknowledged in the broker.
        assert store.r.hlen("unacked") >= 1
        survivor = processes("worker", env, concurrency=1)
    else:
        [pool] = first.pool_pids()
        claims = wait_for(lambda: list(store.r.scan_iter(store.key(job_id, "claim:*"))), 60,
                          "an item running", interval_s=0.01)
        os.kill(pool, signal.SIGKILL)
        assert store.done_count(job_id) < n, "the job finished before the kill; the test needs more items"
        survivor = first
        wait_for(lambda: "WorkerLostError" in first.log_tail(400), 60, "the worker to notice",
                 on_timeout=first.log_tail)
        holder = store.r.get(claims[0])
        if holder is not None and f"|{pool}|" in holder:
            # The requeued item's claim belongs to a dead process of this host: taken over, no lease wait.
            wait_for(lambda: "took over the claim of dead attempt" in first.log_tail(400), 60,
                     "the take-over", on_timeout=first.log_tail)
    wait_for(lambda: finished(store, job_id), 240, "the job to finish after the kill",
             on_timeout=survivor.log_tail)

    rows = read_results(out)
    ids = [r["id"] for r in rows]
    assert Counter(ids) == Counter(line["id"] for line in lines), "every item exactly once"
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    audio_dir = out / "audio"
    files = sorted(p.name for p in audio_dir.iterdir())
    want = sorted(f"{r['id']}.wav" for r in rows if r["audio"])
    assert files == want, "one WAV per item that has audio, no temporaries left"
    assert store.job(job_id)["status"] == "done"


def test_unreachable_component_is_retried_then_an_unavailable_error(
    store, env_factory, processes, media, tmp_path, monkeypatch
) -> None:
    manifest = write_manifest(tmp_path / "items.jsonl", [
        {"id": "a", "prompt": "hello"},
        {"id": "bad", "images": [str(media["corrupt"])], "prompt": "x"},
    ])
    out = tmp_path / "out"
    env = env_factory(f"127.0.0.1:{free_port()}", max_retries=2)  # nothing listens there
    processes("worker", env, concurrency=1)
    job_id = submit(env, monkeypatch, "--manifest", str(manifest), "--out", str(out))
    wait_for(lambda: finished(store, job_id), 120, "the job to finish")
    by_id = {r["id"]: r for r in read_results(out)}
    assert by_id["a"]["status"] == "error" and by_id["a"]["error_code"] == "UNAVAILABLE"
    assert by_id["a"]["retries"] == 2 and "after 2 retries" in by_id["a"]["error"]
    assert by_id["bad"]["error_code"] == "INVALID_ARGUMENT" and by_id["bad"]["retries"] == 0


def test_cancel_marks_pending_items_cancelled(triton, store, env_factory, processes, media, tmp_path,
                                              monkeypatch, capsys) -> None:
    env = env_factory(triton.grpc_url)
    # A job cancelled before any worker runs it: every item is cancelled, none is run.
    early = write_manifest(tmp_path / "early.jsonl", [{"id": f"e{k}", "prompt": "hi"} for k in range(5)])
    early_id = submit(env, monkeypatch, "--manifest", str(early), "--out", str(tmp_path / "early"))
    assert cli.main(["cancel", early_id]) == 0
    assert "cancel requested" in capsys.readouterr().out
    # A running job: the items after the cancel are cancelled, those before are kept.
    sq = str(media["square"])
    lines = [{"id": f"t{k}", "images": [sq], "prompt": f"Question {k}?", "max_tokens": 16} for k in range(40)]
    manifest = write_manifest(tmp_path / "items.jsonl", lines)
    out = tmp_path / "out"
    processes("worker", env, concurrency=1)
    wait_for(lambda: finished(store, early_id), 120, "the early job to finish")
    assert Counter(r["status"] for r in read_results(tmp_path / "early")) == {"cancelled": 5}
    assert store.job(early_id)["status"] == "cancelled"

    job_id = submit(env, monkeypatch, "--manifest", str(manifest), "--out", str(out), "--concurrency", "1")
    wait_for(lambda: store.done_count(job_id) >= 1, 120, "a first item", interval_s=0.05)
    assert cli.main(["cancel", job_id]) == 0
    wait_for(lambda: finished(store, job_id), 120, "the job to finish")
    rows = read_results(out)
    statuses = Counter(r["status"] for r in rows)
    assert len(rows) == 40 and statuses["cancelled"] >= 1 and statuses["ok"] >= 1, statuses
    assert set(statuses) <= {"ok", "cancelled"}
    first_cancelled = next(k for k, r in enumerate(rows) if r["status"] == "cancelled")
    assert all(r["status"] == "cancelled" for r in rows[first_cancelled:]), "one lane: cancelled from there"
    assert store.job(job_id)["status"] == "cancelled"
    capsys.readouterr()
    assert cli.main(["status", job_id]) == 0
    assert "cancelled" in capsys.readouterr().out
