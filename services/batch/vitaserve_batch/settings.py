"""The batch worker's configuration: one pydantic-settings object, read from `VITASERVE_BATCH_*` variables.

This module is the one place that lists the batch service's environment variables: every field of
`BatchSettings` is read from `VITASERVE_BATCH_<FIELD NAME IN UPPER CASE>` (e.g. `VITASERVE_BATCH_REDIS_URL`).
The Triton addresses may also come from the orchestrator's names (`VITASERVE_TRITON_URL`,
`VITASERVE_VISION_ENCODER_URL`, ...), so one environment can configure both services; the `BATCH_` name
wins, which is how batch workers are pointed at a Triton deployment of their own (see the README, "Batch
jobs"). Construction fails fast when an address the chosen backend needs is missing.

The same object configures the Celery app (broker, result backend, visibility timeout), the tasks (item
lease, retries, concurrency per job, timeouts, defaults of job options), beat (the schedules file) and the
CLI (Redis URL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vitaserve.components.base import COMPONENTS
from vitaserve.families import DEFAULT_FAMILY, FAMILIES, get_family

ENV_PREFIX = "VITASERVE_BATCH_"
MiB = 1024 * 1024


def _url_field(component: str | None) -> object:
    name = f"{component}_url" if component else "triton_url"
    what = f"Triton URL of {component} (overrides triton_url)" if component else (
        "host:port of the Triton gRPC endpoint serving every component (backend=triton)")
    return Field(
        None,
        description=f"{what}; also read from VITASERVE_{name.upper()}.",
        validation_alias=AliasChoices(name, f"{ENV_PREFIX}{name.upper()}", f"VITASERVE_{name.upper()}"),
    )


class BatchSettings(BaseSettings):
    """Everything a batch worker, beat or the batch CLI needs to know."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True,
                                      populate_by_name=True)

    # --- Redis: broker, result backend, job state -----------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the job state (items, results, claims, counters); also the broker and "
        "result backend unless broker_url / result_backend are set.",
    )
    broker_url: str | None = Field(None, description="Celery broker URL (default: redis_url).")
    result_backend: str | None = Field(None, description="Celery result backend URL (default: redis_url).")
    queue: str = Field("vitaserve-batch", description="Celery queue the batch tasks are sent to.")
    visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Redis broker: an unacknowledged task (its worker died) is delivered again after this "
        "long. Must exceed the longest single item (tasks are one item each) and every retry countdown.",
    )
    redelivery_check_s: int = Field(
        10, ge=1, description="How often a worker looks for messages of dead workers past the visibility "
        "timeout (kombu's unacked_restore_interval)."
    )
    results_flush_s: float = Field(
        5.0, ge=0.001, description="While a job runs, results.jsonl is rewritten at most this often (it is "
        "always written when the job finishes)."
    )
    sweep_interval_s: float = Field(
        60.0, gt=0, description="beat runs the sweep for stalled jobs (lost messages) this often."
    )
    stall_after_s: float | None = Field(
        None, gt=0, description="A lane whose next item had no result, claim or send for this long is sent "
        "again (default: visibility_timeout_s + item_lease_s + 60)."
    )
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long a job's state is kept in Redis.")

    # --- exactly-once bookkeeping and retries ---------------------------------------------------------
    item_lease_s: float = Field(
        600.0,
        gt=0,
        description="A worker's claim on an item expires after this long; a redelivered task waits for the "
        "claim of a dead worker to expire. Must exceed the longest single item.",
    )
    max_retries: int = Field(
        6, ge=0, description="Retries of an item whose component is UNAVAILABLE before it is an error."
    )
    retry_backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubled on each retry.")
    retry_backoff_max_s: float = Field(60.0, gt=0, description="Longest retry delay.")
    job_concurrency: int = Field(
        2, ge=1, description="Items of one job in flight at once (jobs may ask for fewer or more, up to "
        "max_job_concurrency)."
    )
    max_job_concurrency: int = Field(16, ge=1, description="Largest concurrency a job may ask for.")

    # --- components ------------------------------------------------------------------------------------
    model_family: str = Field(
        DEFAULT_FAMILY, description="The model family the components serve (vitaserve.families: "
        + ", ".join(FAMILIES) + "); also read from VITASERVE_MODEL_FAMILY, which the Triton models read too.",
        validation_alias=AliasChoices("model_family", f"{ENV_PREFIX}MODEL_FAMILY", "VITASERVE_MODEL_FAMILY"),
    )
    backend: Literal["triton", "inprocess"] = Field(
        "triton", description="Where the four models run: a Triton deployment, or in the worker process."
    )
    triton_url: str | None = _url_field(None)  # type: ignore[assignment]
    vision_encoder_url: str | None = _url_field("vision_encoder")  # type: ignore[assignment]
    audio_encoder_url: str | None = _url_field("audio_encoder")  # type: ignore[assignment]
    llm_decoder_url: str | None = _url_field("llm_decoder")  # type: ignore[assignment]
    speech_synth_url: str | None = _url_field("speech_synth")  # type: ignore[assignment]
    checkpoint_dir: Path | None = Field(
        None, description="Checkpoint directory in the released layout (backend=inprocess; the small family "
        "needs none)."
    )

    # --- bounded waits on components (a stuck component is UNAVAILABLE: retried, never a hang) ----------
    encode_timeout_s: float = Field(60.0, gt=0, description="Vision + audio encoding of one item.")
    first_token_timeout_s: float = Field(120.0, gt=0, description="Prompt sent -> first LLM token.")
    item_timeout_s: float = Field(
        300.0, gt=0, description="Whole item (encode, generate, speech); must be below item_lease_s."
    )

    # --- job defaults and input limits -------------------------------------------------------------------
    default_max_tokens: int = Field(128, ge=1, description="Reply length of an item that does not choose.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens an item may ask for.")
    max_manifest_items: int = Field(100_000, ge=1, description="Items one manifest may hold.")
    max_image_bytes: int = Field(32 * MiB, ge=1, description="Largest image file read for an item.")
    max_audio_s: float = Field(60.0, gt=0, description="Longest audio file of an item.")
    max_video_frames: int = Field(16, ge=1, le=16, description="Frames sampled from a video (1 per second).")

    # --- scheduling -------------------------------------------------------------------------------------
    schedules_file: Path | None = Field(
        None, description="TOML file of recurring jobs for celery beat (see vitaserve_batch.schedules)."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    # --- metrics (vitaserve_batch.metrics) -------------------------------------------------------------
    metrics_address: str | None = Field(
        None, description="host:port of the worker's Prometheus /metrics endpoint, served by the main "
        "process for all pool processes (unset = no endpoint)."
    )
    metrics_dir: Path | None = Field(
        None, description="Directory of prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR), "
        "emptied when the worker starts; default: <tmp>/vitaserve-batch-metrics-<port>. One per worker."
    )

    @model_validator(mode="after")
    def _check(self) -> BatchSettings:
        family = get_family(self.model_family)  # ValueError naming the known families
        if self.backend == "inprocess" and self.checkpoint_dir is None and family.needs_checkpoint:
            raise ValueError(f"backend=inprocess needs {ENV_PREFIX}CHECKPOINT_DIR")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        if self.job_concurrency > self.max_job_concurrency:
            raise ValueError("job_concurrency must be <= max_job_concurrency")
        if self.item_timeout_s >= self.item_lease_s:
            raise ValueError("item_timeout_s must be below item_lease_s (a claim must outlive its item)")
        return self

    def component_urls(self) -> dict[str, str]:
        """Triton URL of each component; raises ValueError naming the variables that are missing.
        Checked when a worker starts its components, not at construction: the CLI and beat need no
        Triton address."""
        urls = {name: getattr(self, f"{name}_url") or self.triton_url for name in COMPONENTS}
        missing = [name for name, url in urls.items() if not url]
        if missing:
            raise ValueError(
                f"backend=triton needs {ENV_PREFIX}TRITON_URL (or VITASERVE_TRITON_URL) or a URL for every "
                "component; missing: " + ", ".join(f"{ENV_PREFIX}{n.upper()}_URL" for n in missing)
            )
        return {name: str(url) for name, url in urls.items()}

    @property
    def stall_after(self) -> float:
        return self.stall_after_s or (self.visibility_timeout_s + self.item_lease_s + 60.0)

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.redis_url
