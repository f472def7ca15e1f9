"""Fixtures of the batch tests: a real Redis, a real Triton serving the four models on the tiny checkpoint
(one each per test session), Celery worker/beat processes per test, and test media.

Workers are configured through the environment exactly as in production (`VITASERVE_BATCH_*`), with short
timeouts so crash recovery takes seconds: visibility timeout 4 s (redelivery of a dead worker's messages),
checked every second, item lease 12 s, the sweep for lost messages every 2 s (stalled after 20 s)."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import CHECKED_IN
from vitaserve_batch.harness import CeleryBeat, CeleryWorker, RedisServer, batch_env
from vitaserve_batch.store import JobStore

FAST = {
    "visibility_timeout_s": 4,
    "redelivery_check_s": 1,
    "item_lease_s": 12,
    "item_timeout_s": 10,
    "encode_timeout_s": 8,
    "first_token_timeout_s": 8,
    "retry_backoff_s": 0.2,
    "retry_backoff_max_s": 1.0,
    "default_max_tokens": 8,
    "sweep_interval_s": 2,
    "stall_after_s": 20,
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="session")
def triton(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log_path = tmp_path_factory.mktemp("triton-batch") / "tritonserver.log"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        srv = TritonServer(CHECKED_IN, startup_timeout=180, log_path=log_path).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_server.url)
    yield s
    s.r.close()


@pytest.fixture
def env_factory(redis_server: RedisServer) -> Callable[..., dict[str, str]]:
    """env_factory(triton_url, **settings): a worker environment on a queue of its own."""
    queue = f"batch-{uuid.uuid4().hex[:8]}"

    def make(triton_url: str | None, **settings: Any) -> dict[str, str]:
        return batch_env(redis_server.url, triton_url, queue=queue, **{**FAST, **settings})

    return make


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """start(kind, env, **kw): a CeleryWorker ('worker') or CeleryBeat ('beat'), stopped after the test."""
    started: list[Any] = []

    def start(kind: str, env: dict[str, str], **kw: Any) -> Any:
        n = len(started)
        if kind == "worker":
            proc = CeleryWorker(env, log_path=tmp_path / f"worker{n}.log", **kw).start().wait_ready()
        else:
            work = tmp_path / f"beat{n}"
            work.mkdir()
            proc = CeleryBeat(env, work_dir=work, **kw).start()
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def media(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad media files: a 448² image, a spoken question, a video folder of 4 frames, an animated
    GIF, a corrupt PNG, a corrupt WAV."""
    root = tmp_path_factory.mktemp("media")
    square = root / "square.png"
    shutil.copy(golden_dir / "image2_448x448.png", square)
    shutil.copy(golden_dir / "image0_800x600.png", root / "wide.png")
    shutil.copy(golden_dir / "audio_16k_2.3s.wav", root / "question.wav")
    frames = root / "video"
    frames.mkdir()
    img = Image.open(square).convert("RGB").resize((224, 224))
    for k in range(4):
        img.rotate(90 * k).save(frames / f"frame{k:03d}.png")
    gif = io.BytesIO()
    img.save(gif, format="GIF", save_all=True, append_images=[img.rotate(90), img.rotate(180)], duration=1000)
    (root / "clip.gif").write_bytes(gif.getvalue())
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()}
