"""The whole stack as a fixture: real Triton with the four models on the tiny checkpoint, and a real
orchestrator process in front of it, started once per test session and stopped by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vitaserve.stack import LocalStack


@pytest.fixture(scope="session")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tiny_checkpoint, work_dir=tmp_path_factory.mktemp("stack")) as running:
        yield running
