"""Fixtures of the orchestrator tests: settings, a runner for async tests, speech fixtures, and the tiny
model's engines shared by the integration tests.

The fakes (`fakes.py`) are imported by name: this folder is put on `sys.path` here (the suite runs with
`--import-mode=importlib`, which adds no test folder to it).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from vitaserve_orchestrator.settings import OrchestratorSettings  # noqa: E402

T = TypeVar("T")
DATA = HERE / "data"


def make_config(**overrides: Any) -> OrchestratorSettings:
    """Orchestrator settings for tests: ignore the environment's VITASERVE_* variables."""
    base: dict[str, Any] = {"backend": "triton", "triton_url": "127.0.0.1:1", "listen_address": "127.0.0.1:0"}
    return OrchestratorSettings.model_validate({**base, **overrides})


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body on a fresh loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture()
def config() -> OrchestratorSettings:
    return make_config()


@pytest.fixture(scope="session")
def arun() -> Callable[..., Any]:
    return run


def read_pcm(name: str) -> np.ndarray:
    pcm, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16000
    return pcm


@pytest.fixture(scope="session")
def question_pcm() -> np.ndarray:
    """2.87 s of synthetic speech (espeak-ng): "What is in this picture? Please describe it." """
    return read_pcm("speech_question.wav")


@pytest.fixture(scope="session")
def short_pcm() -> np.ndarray:
    """0.42 s of synthetic speech: "Hi." """
    return read_pcm("speech_short.wav")


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint: Path) -> dict[str, Any]:
    """The four engines on the tiny golden checkpoint, loaded once; each test wraps them in its own
    `InProcessComponents(engines=...)` (closing one closes its thread pool, not the engines)."""
    from vitaserve.components.base import COMPONENTS
    from vitaserve.families import EngineOptions, get_family

    family, options = get_family("vita15"), EngineOptions(str(tiny_checkpoint))
    return {name: family.engine(name, options) for name in COMPONENTS}
