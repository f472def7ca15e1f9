"""Fixtures of the component tests: the four engines on the tiny golden checkpoint (built once per
session and shared by the unit and integration tests), one real Triton serving the checked-in repository
on the same checkpoint (started on first use, shared by every integration module), golden media, and a
prompt builder. Helpers (`triton_calls.py`) are imported by name: this folder is put on `sys.path` here,
as the suite runs with `--import-mode=importlib`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vitaserve.models.audio import decode_audio, to_mono_16k
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.prompt import build_prompt
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import CHECKED_IN

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Triton with the four checked-in models; they find the checkpoint through VITASERVE_CHECKPOINT_DIR
    (the launcher passes the test process's environment to the server)."""
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"  # kept for debugging failures
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        srv = TritonServer(CHECKED_IN, startup_timeout=120, log_path=log_path).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint: Path) -> CheckpointDir:
    return CheckpointDir(tiny_checkpoint)


@pytest.fixture(scope="session")
def engines(checkpoint: CheckpointDir) -> dict[str, Any]:
    from vitaserve.components.engines import AudioEngine, LLMEngine, SpeechEngine, VisionEngine

    return {
        "vision_encoder": VisionEngine(checkpoint),
        "audio_encoder": AudioEngine(checkpoint),
        "llm_decoder": LLMEngine.from_checkpoint(checkpoint),
        "speech_synth": SpeechEngine(checkpoint),
    }


@pytest.fixture(scope="session")
def family_engines(engines: dict[str, Any]) -> dict[str, Any]:
    """The same engines as the vita15 family builds them (encoders answering in `Encoding`s), for
    `InProcessComponents(engines=...)`."""
    from vitaserve.families.base import EncoderEngine, rows_encoding

    return {**engines, **{name: EncoderEngine(engines[name], rows_encoding)
                          for name in ("vision_encoder", "audio_encoder")}}


@pytest.fixture(scope="session")
def images(golden_dir: Path) -> dict[str, bytes]:
    """Golden PNGs: 'wide' 800x600, 'tall' 300x1200, 'square' 448x448."""
    return {
        "wide": (golden_dir / "image0_800x600.png").read_bytes(),
        "tall": (golden_dir / "image1_300x1200.png").read_bytes(),
        "square": (golden_dir / "image2_448x448.png").read_bytes(),
    }


@pytest.fixture(scope="session")
def speech_pcm(golden_dir: Path) -> np.ndarray:
    """2.3 s of 16 kHz mono speech."""
    samples, rate = decode_audio((golden_dir / "audio_16k_2.3s.wav").read_bytes())
    return to_mono_16k(samples, rate)


@pytest.fixture(scope="session")
def make_prompt() -> Callable[..., str]:
    """make_prompt(n_images=1, has_audio=False, text=...): a one-turn ChatML prompt with that many
    `<image>` placeholders (and `<audio>` if asked)."""

    def make(n_images: int = 1, *, has_audio: bool = False, text: str = "What is in the picture?") -> str:
        return build_prompt([], text, n_images=n_images, has_audio=has_audio,
                            media="image" if n_images else None)

    return make
