"""Recurring jobs for celery beat, read from a TOML file (`VITASERVE_BATCH_SCHEDULES_FILE`).

    # one [[job]] table per recurring job
    [[job]]
    name = "caption-inbox"          # unique; job ids are "<name>-<12 hex>", one per firing
    cron = "0 2 * * *"              # minute hour day-of-month month day-of-week (celery crontab, UTC)
    # every_s = 30                  # ... or a fixed interval in seconds instead of cron
    folder = "/data/inbox"          # every image in the folder with `prompt` ...
    prompt = "Describe the image."
    # manifest = "/data/nightly.jsonl"   # ... or a manifest file
    out = "/data/out/caption-inbox" # each firing writes <out>/<job id>/results.jsonl (+ audio/)
    concurrency = 1                 # items of one firing in flight at once (default: the worker setting)
    enabled = true
    [job.options]                   # defaults for every item (an item's own fields win)
    want_audio = false
    max_tokens = 64

Unknown keys are errors, so a typo fails beat at start instead of silently changing a job. Each firing sends
the task `vitaserve_batch.scheduled_job` with the entry's job spec; the worker derives the job id from the
message id, so a redelivered firing resumes the same job instead of starting a second one.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

from celery.schedules import crontab, schedule
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vitaserve_batch.spec import JOB_OPTIONS, JobSpec
from vitaserve_batch.manifest import ID_PATTERN, ItemOptions

SCHEDULED_TASK = "vitaserve_batch.scheduled_job"


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ID_PATTERN.pattern, max_length=64)
    cron: str | None = None
    every_s: float | None = Field(None, ge=1.0)
    folder: str | None = None
    manifest: str | None = None
    prompt: str | None = None
    out: str
    concurrency: int | None = Field(None, ge=1)
    enabled: bool = True
    options: ItemOptions = ItemOptions()

    @model_validator(mode="after")
    def _check(self) -> ScheduleEntry:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give exactly one of cron or every_s")
        if (self.folder is None) == (self.manifest is None):
            raise ValueError("give exactly one of folder or manifest")
        if self.folder is not None and not (self.prompt or "").strip():
            raise ValueError("a folder job needs a prompt")
        if self.cron is not None:
            cron_schedule(self.cron)  # raises ValueError for a bad expression
        return self

    def spec(self) -> JobSpec:
        options = {k: v for k, v in self.options.model_dump().items() if v is not None and k in JOB_OPTIONS}
        return JobSpec(out_dir=self.out, manifest=self.manifest, folder=self.folder, prompt=self.prompt,
                       options=options, concurrency=self.concurrency, source=f"schedule:{self.name}")

    def celery_schedule(self) -> schedule:
        if self.cron is not None:
            return cron_schedule(self.cron)
        return schedule(timedelta(seconds=self.every_s or 0))


class ScheduleError(ValueError):
    """A schedules file that cannot be used; the message names the file and the entry."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def cron_schedule(expr: str) -> crontab:
    """A 5-field cron expression (minute hour day-of-month month day-of-week) as a celery crontab."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expr!r} must have 5 fields: minute hour day-of-month month day-of-week")
    minute, hour, dom, month, dow = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
    except Exception as exc:  # noqa: BLE001 - celery raises ValueError or its own ParseException
        raise ValueError(f"cron {expr!r}: {exc}") from None


def load_schedules(path: Path) -> list[ScheduleEntry]:
    """Parse and validate a schedules file; raises `ScheduleError` naming the file and the entry."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ScheduleError(str(path), f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScheduleError(str(path), f"bad TOML: {exc}") from None
    unknown = sorted(set(data) - {"job"})
    if unknown:
        raise ScheduleError(str(path), f"unknown top-level key(s) {unknown}; expected [[job]] tables")
    entries: list[ScheduleEntry] = []
    for k, raw in enumerate(data.get("job", [])):
        try:
            entries.append(ScheduleEntry.model_validate(raw))
        except ValidationError as exc:
            what = raw.get("name", f"#{k + 1}") if isinstance(raw, dict) else f"#{k + 1}"
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors())
            raise ScheduleError(str(path), f"job {what}: {errors}") from None
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScheduleError(str(path), f"duplicate job name(s) {dupes}")
    return entries


def beat_schedule(entries: list[ScheduleEntry], *, queue: str) -> dict[str, dict[str, Any]]:
    """`app.conf.beat_schedule` for the enabled entries."""
    return {
        e.name: {"task": SCHEDULED_TASK, "schedule": e.celery_schedule(),
                 "args": (e.name, e.spec().to_dict()), "options": {"queue": queue}}
        for e in entries if e.enabled
    }


def next_run(entry: ScheduleEntry, now: datetime | None = None) -> datetime:
    """When the entry fires next after `now` (UTC); for intervals: one interval after now (beat counts
    from its own last run)."""
    now = now or datetime.now(UTC)
    if entry.every_s is not None:
        return now + timedelta(seconds=entry.every_s)
    cron = cron_schedule(entry.cron or "")
    # Walk minute by minute from the next whole minute: exact for crontab and at most a year of steps.
    t = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(366 * 24 * 60):
        if (t.minute in cron.minute and t.hour in cron.hour and t.day in cron.day_of_month
                and t.month in cron.month_of_year and (t.isoweekday() % 7) in cron.day_of_week):
            return t
        t += timedelta(minutes=1)
    raise ValueError(f"cron {entry.cron!r} never fires")
