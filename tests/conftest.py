"""Shared fixtures: paths of the golden data copied into the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN_ROOT = Path(__file__).parent / "golden"
TINY_GOLDEN = GOLDEN_ROOT / "vita15-tiny"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return TINY_GOLDEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory in the released layout holding the golden tiny weights."""
    from vitaserve.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", golden=TINY_GOLDEN)
