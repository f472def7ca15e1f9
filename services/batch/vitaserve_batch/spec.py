"""What a job is before it runs: `JobSpec` (manifest or folder, output folder, default options) and the
creation of its record. Kept free of the model library, so submitting from the CLI is quick."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitaserve.errors import InvalidInput
from vitaserve_batch.store import JobStore

# Job-level defaults an item may override with its own field of the same name.
JOB_OPTIONS = ("want_audio", "max_tokens", "temperature", "seed", "max_tiles", "system_prompt")
START_TASK = "vitaserve_batch.start_job"
ITEM_TASK = "vitaserve_batch.run_item"
SWEEP_TASK = "vitaserve_batch.sweep"


@dataclass(frozen=True)
class JobSpec:
    """What to run: a manifest or a folder of images (with one prompt), the output folder and defaults."""

    out_dir: str
    manifest: str | None = None
    folder: str | None = None
    prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None
    source: str = "cli"

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.folder is None):
            raise InvalidInput("a job needs exactly one of manifest or folder")
        if self.folder is not None and not (self.prompt or "").strip():
            raise InvalidInput("a folder job needs a prompt")
        unknown = sorted(set(self.options) - set(JOB_OPTIONS))
        if unknown:
            raise InvalidInput(f"unknown job option(s) {unknown}; known: {', '.join(JOB_OPTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "manifest": self.manifest, "folder": self.folder,
                "prompt": self.prompt, "options": dict(self.options), "concurrency": self.concurrency,
                "source": self.source}


def create_job(store: JobStore, job_id: str, spec: JobSpec, *, default_concurrency: int,
               max_concurrency: int) -> bool:
    """Record a submitted job (status `queued`); False if a job with this id exists (kept as it is)."""
    concurrency = min(max(1, spec.concurrency or default_concurrency), max_concurrency)
    return store.create_job(job_id, {
        "out_dir": str(Path(spec.out_dir).resolve()), "manifest": spec.manifest or "",
        "folder": spec.folder or "",
        "spec": spec.to_dict(), "concurrency": concurrency, "source": spec.source,
    })


