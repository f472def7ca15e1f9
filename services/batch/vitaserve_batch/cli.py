"""`vitaserve batch`: submit, watch, cancel and resume jobs; list schedules.

    vitaserve batch submit --manifest items.jsonl --out /data/out/job1 [--want-audio] [--max-tokens N]
                           [--concurrency N] [--job-id ID] [--watch]
    vitaserve batch submit --folder /data/inbox --prompt "Describe the image." --out /data/out/inbox
    vitaserve batch status [JOB] [--watch] [--json]     # no JOB: the most recent jobs
    vitaserve batch cancel JOB                          # pending items become `cancelled`
    vitaserve batch resume JOB                          # re-send each lane's first unfinished item
    vitaserve batch schedules [--file schedules.toml]   # the beat entries and when they fire next

Redis and the broker come from the batch settings (`VITASERVE_BATCH_REDIS_URL`, ...) or `--redis-url`.
Paths are sent as absolute paths: workers must see the same filesystem (a shared volume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, TextIO

import redis

from vitaserve.errors import InvalidInput
from vitaserve_batch.store import FINAL_STATUSES, JobStore

BAR_WIDTH = 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitaserve batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="Redis of the batch service (default: VITASERVE_BATCH_REDIS_URL)")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="submit a job (a manifest, or every image of a folder)")
    src = submit.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="JSONL manifest, one item per line")
    src.add_argument("--folder", type=Path, help="caption/answer every image in this folder")
    submit.add_argument("--prompt", help="the question for every image of --folder")
    submit.add_argument("--out", type=Path, required=True, help="output folder (results.jsonl, audio/)")
    submit.add_argument("--job-id", help="job id (default: a new random id); resubmitting an id is a no-op")
    submit.add_argument("--want-audio", action="store_true", help="default want_audio for the items")
    submit.add_argument("--max-tokens", type=int, help="default max_tokens for the items")
    submit.add_argument("--concurrency", type=int, help="items of this job in flight at once")
    submit.add_argument("--watch", action="store_true", help="show progress until the job finishes")

    status = sub.add_parser("status", help="progress of a job, or the most recent jobs")
    status.add_argument("job", nargs="?")
    status.add_argument("--watch", action="store_true", help="refresh until the job finishes")
    status.add_argument("--json", action="store_true", help="print the job record and counts as JSON")
    status.add_argument("--interval", type=float, default=1.0, help="--watch refresh interval (s)")

    cancel = sub.add_parser("cancel", help="cancel a job: its pending items are marked cancelled")
    cancel.add_argument("job")

    resume = sub.add_parser("resume", help="re-send the unfinished items of a job (lost messages)")
    resume.add_argument("job")

    schedules = sub.add_parser("schedules", help="list the beat schedule entries")
    schedules.add_argument("--file", type=Path,
                           help="schedules TOML (default: VITASERVE_BATCH_SCHEDULES_FILE)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "schedules":
            return _schedules(args)
        from vitaserve_batch.settings import BatchSettings

        settings = BatchSettings(**({"redis_url": args.redis_url} if args.redis_url else {}))
        store = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)
        if args.command == "submit":
            return _submit(args, settings, store)
        if args.command == "status":
            return _status(args, store)
        if args.command == "cancel":
            return _cancel(args, store)
        if args.command == "resume":
            return _resume(args, settings, store)
    except (InvalidInput, ValueError) as exc:
        print(f"vitaserve batch {args.command}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"vitaserve batch {args.command}: cannot reach Redis: {exc}", file=sys.stderr)
        return 3
    return 2


def _sender(settings: Any) -> Any:
    """A Celery app for sending tasks by name (the tasks and the model library are not imported)."""
    from vitaserve_batch.app import create_app

    return create_app(settings.model_copy(update={"schedules_file": None}))


def _submit(args: argparse.Namespace, settings: Any, store: JobStore) -> int:
    from vitaserve_batch.spec import START_TASK, JobSpec, create_job

    if args.manifest is not None and not args.manifest.is_file():
        raise InvalidInput(f"manifest {args.manifest} does not exist")
    if args.folder is not None and not args.folder.is_dir():
        raise InvalidInput(f"folder {args.folder} does not exist")
    options = {k: v for k, v in {"want_audio": True if args.want_audio else None,
                                 "max_tokens": args.max_tokens}.items() if v is not None}
    spec = JobSpec(out_dir=str(args.out.resolve()),
                   manifest=str(args.manifest.resolve()) if args.manifest else None,
                   folder=str(args.folder.resolve()) if args.folder else None, prompt=args.prompt,
                   options=options, concurrency=args.concurrency, source="cli")
    job_id = args.job_id or f"job-{uuid.uuid4().hex[:12]}"
    created = create_job(store, job_id, spec, default_concurrency=settings.job_concurrency,
                         max_concurrency=settings.max_job_concurrency)
    if not created:
        print(f"job {job_id} exists already; not submitted again (status: vitaserve batch status {job_id})",
              file=sys.stderr)
        return 1
    # The task id is the job id: a redelivered start is recognised as the same job.
    _sender(settings).send_task(START_TASK, args=(job_id, spec.to_dict()), task_id=job_id,
                                queue=settings.queue)
    print(job_id)
    if args.watch:
        return _watch(store, job_id, interval=1.0, stream=sys.stderr)
    return 0


def _status(args: argparse.Namespace, store: JobStore) -> int:
    if args.job is None:
        for job_id in store.recent_jobs():
            job = store.job(job_id)
            if job is not None:
                print(progress_line(job, store.counts(job_id)))
        return 0
    job = store.job(args.job)
    if job is None:
        print(f"vitaserve batch status: no job {args.job!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"job": job, "counts": store.counts(args.job)}, default=str))
        return 0
    if args.watch:
        return _watch(store, args.job, interval=args.interval, stream=sys.stdout)
    print(progress_line(job, store.counts(args.job)))
    return 0


def _watch(store: JobStore, job_id: str, *, interval: float, stream: TextIO) -> int:
    """Redraw one progress line until the job finishes; returns 0 for done, 1 otherwise."""
    tty = stream.isatty()
    while True:
        job = store.job(job_id) or {}
        line = progress_line(job, store.counts(job_id))
        stream.write(("\r" + line + "\033[K") if tty else line + "\n")
        stream.flush()
        if job.get("status") in FINAL_STATUSES:
            if tty:
                stream.write("\n")
            return 0 if job.get("status") == "done" else 1
        time.sleep(interval)


def progress_line(job: dict[str, Any], counts: dict[str, int], *, now: float | None = None) -> str:
    """`job-1 running [#########.........] 12/20 60% ok 10 error 2 cancelled 0 | 4.1 items/min eta 1m57s`"""
    total = int(job.get("total") or 0)
    done = sum(counts.values())
    frac = done / total if total else (1.0 if job.get("status") in FINAL_STATUSES else 0.0)
    fill = round(frac * BAR_WIDTH)
    bar = "#" * fill + "." * (BAR_WIDTH - fill)
    parts = [f"{job.get('id', '?')} {job.get('status', '?')} [{bar}] {done}/{total or '?'} {frac:4.0%}",
             " ".join(f"{k} {counts.get(k, 0)}" for k in ("ok", "error", "cancelled"))]
    started = _float(job.get("started_at"))
    end = _float(job.get("finished_at")) or (now or time.time())
    if started and done:
        rate = done / max(end - started, 1e-3) * 60.0
        eta = (total - done) / (rate / 60.0) if rate and total > done else 0.0
        parts.append(f"| {rate:.1f} items/min" + (f" eta {_duration(eta)}" if total > done else ""))
    if job.get("error"):
        parts.append(f"| error: {job['error']}")
    return " ".join(parts)


def _cancel(args: argparse.Namespace, store: JobStore) -> int:
    if not store.cancel(args.job):
        print(f"vitaserve batch cancel: no job {args.job!r}", file=sys.stderr)
        return 1
    job = store.job(args.job) or {}
    print(f"job {args.job}: cancel requested ({sum(store.counts(args.job).values())}/{job.get('total', '?')} "
          "items finished; items not yet started will be marked cancelled)")
    return 0


def _resume(args: argparse.Namespace, settings: Any, store: JobStore) -> int:
    from vitaserve_batch.jobs import resume_job
    from vitaserve_batch.spec import ITEM_TASK

    sender = _sender(settings)

    def send_item(job_id: str, index: int) -> None:
        sender.send_task(ITEM_TASK, args=(job_id, index), queue=settings.queue)

    job = store.job(args.job)
    if job is None:
        print(f"vitaserve batch resume: no job {args.job!r}", file=sys.stderr)
        return 1
    sent = resume_job(store, args.job, send_item)
    print(f"job {args.job}: {sent} task(s) sent again")
    return 0


def _schedules(args: argparse.Namespace) -> int:
    from vitaserve_batch.schedules import load_schedules, next_run

    path = args.file
    if path is None:
        from vitaserve_batch.settings import BatchSettings

        path = BatchSettings().schedules_file
    if path is None:
        print("vitaserve batch schedules: no schedules file (--file or VITASERVE_BATCH_SCHEDULES_FILE)",
              file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    for entry in load_schedules(path):
        when = entry.cron and f"cron '{entry.cron}'" or f"every {entry.every_s:g} s"
        source = f"folder {entry.folder}" if entry.folder else f"manifest {entry.manifest}"
        nxt = next_run(entry, now).strftime("%Y-%m-%d %H:%M:%S UTC") if entry.enabled else "disabled"
        print(f"{entry.name}: {when}; {source} -> {entry.out}; next: {nxt}")
    return 0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
