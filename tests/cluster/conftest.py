"""Fixtures of the cluster tests: the Kubernetes API emulator (`kube_emulator.py`, imported by name: this
folder is put on `sys.path`, as the suite runs with `--import-mode=importlib`) and a polling helper."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kube_emulator import KubeEmulator  # noqa: E402

T = TypeVar("T")


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        yield emulator


def eventually(check: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy (watch events arrive on another thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {result!r}"
        time.sleep(0.02)
