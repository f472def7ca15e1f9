"""Fixtures of the cluster tests: the Kubernetes API emulator (`kube_emulator.py`, imported by name: this
folder is put on `sys.path`, as the suite runs with `--import-mode=importlib`; helpers live there too, never
in a `conftest` module, whose name other test folders share)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kube_emulator import KubeEmulator  # noqa: E402


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        yield emulator
