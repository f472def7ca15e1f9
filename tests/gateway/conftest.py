"""The Realtime gateway in front of the whole small-family stack (real Triton, the orchestrator process, the
gateway process), started once for this folder's tests, stopped by pid; and the media the clients speak and show."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vitaserve.stack import LocalStack

sys.path.insert(0, str(Path(__file__).parent))  # helpers (realtime_events.py) are imported by name
from realtime_events import QUESTION_WAV, SCENE_PNG, wav_pcm16_24k  # noqa: F401 - media for the tests


@pytest.fixture(scope="package")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Small family (answers meaningfully), orchestrator defaults, gateway on a free loopback port."""
    with LocalStack(None, family="small", gateway=True,
                    work_dir=tmp_path_factory.mktemp("gateway-stack")) as running:
        yield running
