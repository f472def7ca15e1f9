"""docker-compose.yml runs the batch worker and beat the way `vitaserve_batch` expects: the worker reaches
each component's Triton service, both share the data volume, beat reads the schedules file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vitaserve.components.base import COMPONENTS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def _services(profile: str = "gpu") -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (make test installs Debian's docker-compose)"
    out = subprocess.run([exe, "--profile", profile, "config"], cwd=ROOT, check=True, timeout=60, capture_output=True, text=True)
    return yaml.safe_load(out.stdout)["services"]


def test_batch_worker_and_beat() -> None:
    services = _services()
    worker, beat = services["batch-worker"], services["batch-beat"]
    env = worker["environment"]
    for component in COMPONENTS:
        host = env[f"VITASERVE_BATCH_{component.upper()}_URL"].split(":")[0]
        assert f"--load-model={component}" in services[host]["command"]
        assert host in worker["depends_on"]
    assert worker["command"][0] == "worker" and "--pool=prefork" in worker["command"]
    assert beat["command"][0] == "beat"
    assert env["VITASERVE_BATCH_REDIS_URL"] == beat["environment"]["VITASERVE_BATCH_REDIS_URL"]
    assert beat["environment"]["VITASERVE_BATCH_SCHEDULES_FILE"].startswith("/data/")
    def data(svc: dict) -> list:
        # docker-compose 1.29 prints "host:container:mode" strings; Compose v2 prints mappings.
        targets = [(v["target"] if isinstance(v, dict) else v.split(":")[1], v) for v in svc["volumes"]]
        return [v for target, v in targets if target == "/data"]

    assert data(worker) and data(worker) == data(beat)


def test_cpu_profile_batch_worker_uses_the_cpu_triton() -> None:
    services = _services("cpu")
    worker = services["batch-worker-cpu"]
    assert worker["environment"]["VITASERVE_BATCH_TRITON_URL"] == "triton-cpu:8001"
    assert "triton-cpu" in worker["depends_on"] and "batch-beat" in services
    assert services["batch-worker"]["profiles"] == ["gpu"]  # the GPU worker stays down
