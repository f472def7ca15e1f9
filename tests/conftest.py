"""Shared fixtures: paths of the golden data copied into the repository; and, under `make test`
(VITASERVE_FAIL_ON_SKIP=1), a skipped test counts as failed: `make test` installs everything the suite
needs (redis-server, chromium, the vLLM venv), so a skip there means a missing piece, never a pass.
A SIGTERM to the test run is a KeyboardInterrupt (as SIGINT is), so pytest still tears down its fixtures
and every server a fixture started (Triton, Redis, orchestrators, workers) is stopped by pid."""

from __future__ import annotations

import os
import signal
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


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("VITASERVE_FAIL_ON_SKIP") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped under VITASERVE_FAIL_ON_SKIP=1 (make test installs what tests need): "
                           f"{reason}")
