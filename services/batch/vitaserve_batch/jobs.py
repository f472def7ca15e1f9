"""Job logic, free of Celery: starting a job, running one item exactly once, finishing the job.

A job runs as `concurrency` lanes. Lane k runs items k, k+C, k+2C, ... one after the other: each item's
task sends the task of the next item of its lane when it is over (`Successor`). This bounds the items of one
job in flight to C without any polling semaphore, so a big job never takes more than C worker slots and live
traffic and other jobs keep the rest. A lane survives crashes because the successor is sent by every run of
an item's task, including a redelivered one that finds the item done (the `sent` set keeps it from sending
twice in the normal case; a rare duplicate message is harmless, see below).

`run_item` is idempotent per (job id, item id):
1. an item that has a result is not run again (its WAV rename is completed if a crash interrupted it);
2. a cancelled job records `cancelled` for the item instead of running it;
3. otherwise the attempt claims the item with a lease; if another attempt holds the claim, the task is
   retried after the lease ends (that attempt may have died with its worker), unless the holder is known
   dead (a process of this host that no longer exists): then the claim is taken over at once;
4. the media are read and checked (bad media -> the item's error), the pipeline runs; a retryable error
   (component UNAVAILABLE, overloaded, too slow) releases the claim and retries with exponential backoff up
   to `max_retries`, then becomes the item's error;
5. the result is recorded once (fenced by the claim), the WAV renamed into place, results.jsonl rewritten.

Lost messages: the Redis transport pops a message (BRPOP) before it records it as unacknowledged, so a
worker killed in that instant loses it, and a broker without persistence loses everything on restart. The
lanes then stop. `sweep` (a beat task every `sweep_interval_s`) finds lanes whose next item has had no
result, no claim and no new send for `stall_after_s`, and jobs still `queued` that long, and sends their
task again; a duplicate is harmless, so the sweep errs on the side of sending.

`RetryLater` tells the Celery task to retry (the task module turns it into `Task.retry`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitaserve.errors import InvalidInput, VitaserveError
from vitaserve_batch import results as out
from vitaserve_batch.manifest import Entry, Item, LineError, folder_manifest, read_manifest
from vitaserve_batch.media import load_media
from vitaserve_batch.pipeline import PipelineConfig, answer_item
from vitaserve_batch.runtime import WorkerRuntime
from vitaserve_batch.spec import JOB_OPTIONS, JobSpec, create_job  # noqa: F401 - re-exported
from vitaserve_batch.store import FINAL_STATUSES, JobStore

log = logging.getLogger(__name__)

class RetryLater(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Run this item's task again after `countdown_s`; `retries` is the new count of retryable failures."""

    def __init__(self, countdown_s: float, retries: int, reason: str) -> None:
        super().__init__(reason)
        self.countdown_s = countdown_s
        self.retries = retries
        self.reason = reason


Send = Callable[[str, int], None]  # send the task of item `index` of job `job_id`


def start_job(runtime: WorkerRuntime, job_id: str, spec: JobSpec, send: Send) -> dict[str, Any]:
    """Parse the manifest once, store its items and send the head task of every lane (idempotent: a
    redelivered start finds the items stored and only re-sends lane heads that were not sent)."""
    settings, store = runtime.settings, runtime.store
    create_job(store, job_id, spec, default_concurrency=settings.job_concurrency,
               max_concurrency=settings.max_job_concurrency)
    job = store.job(job_id) or {}
    out_dir = Path(job["out_dir"])
    if job.get("total") is None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            manifest = _manifest_path(spec, out_dir)
            parsed = read_manifest(manifest, max_tokens_limit=settings.max_tokens_limit,
                                   max_items=settings.max_manifest_items)
        except (OSError, ValueError, InvalidInput) as exc:
            message = exc.message if isinstance(exc, VitaserveError) else f"{type(exc).__name__}: {exc}"
            store.update_job(job_id, status="failed", error=message, total=0, finished_at=time.time())
            log.warning("job %s failed to start: %s", job_id, message)
            return store.job(job_id) or {}
        store.store_items(job_id, [_item_row(p) for p in parsed])
        store.set_status_once(job_id, "started_at", time.time())
        if store.job(job_id).get("status") == "queued":
            store.update_job(job_id, status="running")
    job = store.job(job_id) or {}
    total, lanes = int(job["total"]), int(job["concurrency"])
    for index in range(min(lanes, total)):
        _send_once(store, job_id, index, send, force=False)
    finish_if_complete(runtime, job_id)
    return store.job(job_id) or {}


def resume_job(store: JobStore, job_id: str, send: Send) -> int:
    """Send again the first unfinished item of every lane (for a job whose messages were lost, e.g. a
    broker restarted without persistence). Harmless on a running job; returns the tasks sent."""
    job = store.job(job_id)
    if job is None or job.get("total") is None:
        return 0
    total, lanes = int(job["total"]), int(job["concurrency"])
    finished = store.results(job_id)
    items = store.items(job_id)
    sent = 0
    for lane in range(min(lanes, total)):
        for index in range(lane, total, lanes):
            if items[index]["id"] not in finished:
                send(job_id, index)
                sent += 1
                break
    return sent


def sweep(store: JobStore, send: Send, send_start: Callable[[str, dict[str, Any]], None], *,
          stall_after_s: float, now: float | None = None) -> dict[str, int]:
    """Re-send the tasks of stalled lanes and of jobs stuck in `queued` (see the module docstring)."""
    now = time.time() if now is None else now
    resent = {"lanes": 0, "starts": 0}
    for job_id in store.active_jobs():
        job = store.job(job_id) or {}
        if job.get("total") is None:
            since = float(job.get("start_sent_at") or job.get("created_at") or now)
            if job.get("status") == "queued" and now - since >= stall_after_s and job.get("spec"):
                send_start(job_id, job["spec"])
                store.update_job(job_id, start_sent_at=now)
                resent["starts"] += 1
            continue
        total, lanes = int(job["total"]), int(job["concurrency"])
        finished = store.results(job_id)
        ids = store.item_ids(job_id)
        sent_at = store.sent_at(job_id)
        started = float(job.get("started_at") or now)
        for lane in range(min(lanes, total)):
            index = next((i for i in range(lane, total, lanes) if ids[i] not in finished), None)
            if index is None or store.claim_holder(job_id, ids[index]) is not None:
                continue  # lane finished, or its item is being run
            if now - sent_at.get(index, started) >= stall_after_s:
                log.warning("job %s: lane %d stalled at item %s; sending it again", job_id, lane, ids[index])
                send(job_id, index)
                store.mark_sent(job_id, index, at=now)
                resent["lanes"] += 1
    return resent


def run_item(runtime: WorkerRuntime, job_id: str, index: int, send: Send, *, retries: int = 0,
             attempt_id: str = "") -> str:
    """Run item `index` of a job at most once (see the module docstring); returns what happened."""
    store = runtime.store
    job = store.job(job_id)
    if job is None or job.get("total") is None:
        log.warning("job %s: item %d: the job is unknown or expired; nothing to do", job_id, index)
        return "unknown-job"
    row = store.item(job_id, index)
    if row is None:
        log.warning("job %s: no item %d", job_id, index)
        return "unknown-item"
    out_dir = Path(job["out_dir"])
    item_id = row["id"]
    outcome = _run_item(runtime, job, out_dir, row, retries=retries, attempt_id=attempt_id)
    # Every run sends the lane's next item, so a crash between recording and sending loses nothing.
    nxt = index + int(job["concurrency"])
    if nxt < int(job["total"]):
        _send_once(store, job_id, nxt, send, force=False)
    finish_if_complete(runtime, job_id)
    log.info("job %s: item %s (%d): %s", job_id, item_id, index, outcome)
    return outcome


def _run_item(runtime: WorkerRuntime, job: dict[str, Any], out_dir: Path, row: dict[str, Any], *,
              retries: int, attempt_id: str) -> str:
    settings, store = runtime.settings, runtime.store
    job_id, item_id = job["id"], row["id"]
    base = {"id": item_id, "line": row["line"]}
    existing = store.result(job_id, item_id)
    if existing is not None:
        if not out.commit_audio(out_dir, existing):
            log.error("job %s: item %s: recorded audio %s is missing", job_id, item_id, existing.get("audio"))
        return "already-done"
    if store.cancelled(job_id):
        store.record(job_id, item_id, {**base, "status": "cancelled", "error": "the job was cancelled"})
        return "cancelled"
    if "error" in row:
        store.record(job_id, item_id, {**base, "status": "error", "error_code": "INVALID_ARGUMENT",
                                       "error": row["error"]})
        return "bad-line"
    # Unique per attempt (a redelivered message has the same task id): host, process, task, random.
    token = f"{socket.gethostname()}|{os.getpid()}|{attempt_id}|{uuid.uuid4().hex[:8]}"
    if not store.claim(job_id, item_id, token, settings.item_lease_s):
        holder = store.claim_holder(job_id, item_id)
        if holder and _holder_is_dead(holder) and store.take_over(job_id, item_id, holder, token,
                                                                  settings.item_lease_s):
            log.warning("job %s: item %s: took over the claim of dead attempt %s", job_id, item_id, holder)
        else:
            wait = store.claim_ttl_s(job_id, item_id) + 0.5
            raise RetryLater(min(wait, settings.item_lease_s + 1.0), retries, "claimed by another attempt")
    tmp_audio: str | None = None
    try:
        if store.result(job_id, item_id) is not None:  # finished while this attempt waited for its claim
            return "already-done"
        item = Item.model_validate(row["item"])
        config = _pipeline_config(settings, job, item)
        started = time.monotonic()
        try:
            media = load_media(item, max_image_bytes=settings.max_image_bytes,
                               max_audio_s=settings.max_audio_s, max_video_frames=settings.max_video_frames)
            answer = runtime.run(answer_item(runtime.components, media, item.prompt, config,
                                             request_id=f"{job_id}/{item_id}"))
        except VitaserveError as exc:
            if exc.retryable and retries < settings.max_retries:
                delay = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**retries)
                delay *= random.uniform(0.8, 1.2)  # jitter: retries of many items do not arrive together
                log.info("job %s: item %s: %s %s; retry %d in %.1f s", job_id, item_id, exc.code, exc.message,
                         retries + 1, delay)
                raise RetryLater(delay, retries + 1, exc.message) from None
            note = f" (after {retries} retries)" if exc.retryable else ""
            result = {**base, "status": "error", "error_code": exc.code, "error": exc.message + note,
                      "retries": retries}
        except Exception as exc:  # noqa: BLE001 - one item's failure never stops the job
            log.exception("job %s: item %s failed", job_id, item_id)
            result = {**base, "status": "error", "error_code": "INTERNAL",
                      "error": f"{type(exc).__name__}: {exc}", "retries": retries}
        else:
            audio_ms = round(answer.pcm.size * 1000.0 / answer.sample_rate, 1) if answer.pcm.size else 0.0
            if answer.pcm.size:
                tmp_audio = out.write_audio_tmp(out_dir, item_id, token, answer.pcm, answer.sample_rate)
            answer.timings["wall_ms"] = round((time.monotonic() - started) * 1000.0, 1)
            result = {**base, "status": "ok", "text": answer.text, "state_mark": answer.state_mark,
                      "tokens": answer.tokens, "transcript": answer.transcript,
                      "audio": out.audio_name(item_id) if tmp_audio else None,
                      "audio_tmp": tmp_audio, "audio_ms": audio_ms, "sample_rate": answer.sample_rate,
                      "timings": answer.timings, "retries": retries}
        recorded = store.record(job_id, item_id, result, token=token)
        if recorded == 1:
            out.commit_audio(out_dir, result)
            tmp_audio = None
            return result["status"]
        return "duplicate-discarded" if recorded == 0 else "claim-lost"
    finally:
        out.discard(out_dir, tmp_audio)
        store.release(job_id, item_id, token)


def finish_if_complete(runtime: WorkerRuntime, job_id: str) -> bool:
    """Rewrite results.jsonl (atomically, under the job's lock) at most every `results_flush_s` while the
    job runs, and always once every item has a result; then complete the WAV renames, remove stray
    temporaries and mark the job done or cancelled. True if the job is complete."""
    store = runtime.store
    job = store.job(job_id)
    if job is None or job.get("total") is None:
        return False
    total = int(job["total"])
    complete = store.done_count(job_id) >= total
    if complete and job.get("status") in FINAL_STATUSES:
        return True
    # Rewriting reads every result: throttled, so a long job costs O(items) per flush, not per item.
    if not complete and not store.take_flush_slot(job_id, runtime.settings.results_flush_s):
        return False
    out_dir = Path(job["out_dir"])
    with store.lock(job_id):
        finished = store.results(job_id)
        out.write_results(out_dir, store.item_ids(job_id), finished)
        complete = len(finished) >= total
        if complete and (store.job(job_id) or {}).get("status") not in FINAL_STATUSES:
            for result in finished.values():
                out.commit_audio(out_dir, result)
            out.remove_stale_temporaries(out_dir)
            counts = store.counts(job_id)
            status = "cancelled" if counts.get("cancelled") else "done"
            store.update_job(job_id, status=status, finished_at=time.time())
            store.expire_job(job_id)
    return complete


def _holder_is_dead(token: str) -> bool:
    """Whether the attempt holding a claim is known to be gone: it ran on this host in a process that no
    longer exists (a pool process killed by the OOM killer, say) or in this very process (which runs one
    item at a time, so the claim is a leftover). Claims of other hosts wait for their lease. Should two
    hosts share a name but not a process table (containers with host networking), a live attempt could be
    taken over: the item is then computed twice but still recorded once (`record` is fenced by the claim)."""
    host, _, rest = token.partition("|")
    pid_text = rest.partition("|")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return False


def _send_once(store: JobStore, job_id: str, index: int, send: Send, *, force: bool) -> None:
    # Send, then mark: a crash in between sends the task twice (harmless: the item runs once); marking
    # first could lose the lane.
    if force or not store.was_sent(job_id, index):
        send(job_id, index)
        store.mark_sent(job_id, index)


def _manifest_path(spec: JobSpec, out_dir: Path) -> Path:
    if spec.manifest is not None:
        return Path(spec.manifest)
    folder = Path(spec.folder or "")
    if not folder.is_dir():
        raise InvalidInput(f"folder {folder} does not exist or is not a folder")
    path = out_dir / "manifest.jsonl"
    lines = list(folder_manifest(folder, prompt=spec.prompt or ""))
    out.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
    return path


def _item_row(entry: Entry) -> dict[str, Any]:
    parsed = entry.parsed
    if isinstance(parsed, LineError):
        return {"id": parsed.id, "line": entry.line, "error": parsed.message}
    return {"id": parsed.id, "line": entry.line, "item": parsed.model_dump(mode="json")}


def _pipeline_config(settings: Any, job: dict[str, Any], item: Item) -> PipelineConfig:
    defaults = (job.get("spec") or {}).get("options") or {}

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(item, name)
        if value is not None:
            return value
        return defaults.get(name, fallback) if defaults.get(name) is not None else fallback

    return PipelineConfig(
        max_tokens=min(int(pick("max_tokens", settings.default_max_tokens)), settings.max_tokens_limit),
        temperature=float(pick("temperature", 0.0)),
        seed=pick("seed", None),
        want_audio=bool(pick("want_audio", False)),
        system_prompt=pick("system_prompt", None),
        family=settings.model_family,
        encode_timeout_s=settings.encode_timeout_s,
        first_token_timeout_s=settings.first_token_timeout_s,
        item_timeout_s=settings.item_timeout_s,
    )
