"""docker-compose.yml is valid (Debian's docker-compose `config -q`) and wires the services the way the code
expects: one Triton service per component loading only its model, the orchestrator pointed at each."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vitaserve.components.base import COMPONENTS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def _config(*args: str) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (make test installs Debian's docker-compose)"
    subprocess.run([exe, *args, "config", "-q"], cwd=ROOT, check=True, timeout=60)
    out = subprocess.run([exe, *args, "config"], cwd=ROOT, check=True, timeout=60, capture_output=True, text=True)
    return yaml.safe_load(out.stdout)


def test_gpu_host_layout() -> None:
    services = {k: v for k, v in _config()["services"].items() if not v.get("profiles")}
    loaded = {}
    for name, svc in services.items():
        models = [a.split("=", 1)[1] for a in svc.get("command", []) if a.startswith("--load-model=")]
        if models:
            loaded[name] = models
            assert svc["environment"]["VITASERVE_CHECKPOINT_DIR"] == "/models/vita"
            assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert sorted(m for ms in loaded.values() for m in ms) == sorted(COMPONENTS)
    assert all(len(ms) == 1 for ms in loaded.values()), "each Triton service scales one component"
    env = services["orchestrator"]["environment"]
    for component in COMPONENTS:
        host = env[f"VITASERVE_{component.upper()}_URL"].split(":")[0]
        assert loaded[host] == [component]


def test_cpu_profile() -> None:
    services = _config("--profile", "cpu")["services"]
    assert "deploy" not in services["triton-cpu"]
    assert services["orchestrator-cpu"]["environment"]["VITASERVE_TRITON_URL"] == "triton-cpu:8001"


def test_orchestrators_keep_sessions_in_redis() -> None:
    for args, name in (((), "orchestrator"), (("--profile", "cpu"), "orchestrator-cpu")):
        services = _config(*args)["services"]
        env = services[name]["environment"]
        assert env["VITASERVE_SESSION_STORE"] == "redis"
        assert env["VITASERVE_REDIS_URL"].startswith("redis://redis:")
        assert "redis" in services[name]["depends_on"] and "redis" in services
        assert "--appendonly" in services["redis"]["command"]
