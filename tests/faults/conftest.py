"""Servers for the fault tests, started once for this folder and stopped by pid: two real Triton servers on
the tiny checkpoint — `base` with the four models, `llm` with llm_decoder alone (the one the tests
SIGKILL: it restarts in seconds) — and real orchestrator processes in front of them (fault_servers.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vitaserve.faults import KillableTriton
from vitaserve.stack import MODEL_REPOSITORY

sys.path.insert(0, str(Path(__file__).parent))  # fault_servers.py is imported by name
from fault_servers import Tritons  # noqa: E402


@pytest.fixture(scope="package")
def tritons(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tritons]:
    work = tmp_path_factory.mktemp("faults")
    env = {"VITASERVE_MODEL_FAMILY": "vita15", "VITASERVE_CHECKPOINT_DIR": str(tiny_checkpoint),
           "VITASERVE_CPU_THREADS": "1"}
    found = Tritons(KillableTriton(MODEL_REPOSITORY, models=None, work_dir=work, name="base", env=env),
                    KillableTriton(MODEL_REPOSITORY, models=["llm_decoder"], work_dir=work, name="llm", env=env))
    errors: list[BaseException] = []

    def start(triton: KillableTriton) -> None:
        try:
            triton.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(t,)) for t in (found.base, found.llm)]  # boot at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        yield found
    finally:
        stoppers = [threading.Thread(target=t.stop) for t in (found.base, found.llm)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


