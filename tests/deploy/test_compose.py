"""docker-compose.yml is valid (Debian's docker-compose `config -q`) and wires the services the way the code
expects: one Triton service per component loading only its model (profile gpu), or all four in one CPU
container (profile cpu); the orchestrator pointed at each, with settings the code accepts; Redis; the Realtime
gateway in front of the orchestrator of its profile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vitaserve.components.base import COMPONENTS
from vitaserve_gateway.settings import GatewaySettings
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]


def _config(*args: str) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (make test installs Debian's docker-compose)"
    subprocess.run([exe, *args, "config", "-q"], cwd=ROOT, check=True, timeout=60)
    out = subprocess.run([exe, *args, "config"], cwd=ROOT, check=True, timeout=60, capture_output=True, text=True)
    return yaml.safe_load(out.stdout)


def _profile(services: dict, profile: str) -> dict:
    """Services that `--profile <profile> up` starts (docker-compose 1.29 `config` lists every profile)."""
    return {k: v for k, v in services.items() if not v.get("profiles") or profile in v["profiles"]}


def _models(svc: dict) -> list[str]:
    return [a.split("=", 1)[1] for a in svc.get("command", []) if a.startswith("--load-model=")]


def _seconds(value: str) -> float:
    """A compose duration such as "30s"."""
    assert value.endswith("s"), value
    return float(value[:-1])


def _settings(env: dict[str, str]) -> OrchestratorSettings:
    known = {f"VITASERVE_{name.upper()}" for name in OrchestratorSettings.model_fields}
    assert not set(env) - known, f"unknown settings: {set(env) - known}"
    values = {k[len("VITASERVE_"):].lower(): v for k, v in env.items()}
    return OrchestratorSettings.model_validate(values)


def test_gpu_host_layout() -> None:
    services = _profile(_config("--profile", "gpu")["services"], "gpu")
    loaded = {}
    for name, svc in services.items():
        models = _models(svc)
        if models:
            loaded[name] = models
            assert svc["environment"]["VITASERVE_CHECKPOINT_DIR"] == "/models/vita"
            assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
            assert "--model-repository=/opt/vitaserve/repositories/gpu" in svc["command"]
            assert svc["read_only"] is True
    assert sorted(m for ms in loaded.values() for m in ms) == sorted(COMPONENTS)
    assert all(len(ms) == 1 for ms in loaded.values()), "each Triton service scales one component"
    env = services["orchestrator"]["environment"]
    settings = _settings(env)
    for component, url in settings.component_urls().items():
        assert loaded[url.split(":")[0]] == [component]
    assert env["VITASERVE_REDIS_URL"].startswith("redis://redis:") and "redis" in services
    assert "redis" in services["orchestrator"]["depends_on"]


def test_gpu_vllm_profile_swaps_only_the_llm() -> None:
    """Profile gpu-vllm: the gpu stack with llm_decoder on vLLM (its own image and Dockerfile, a larger
    /dev/shm, VITASERVE_VLLM_CACHE on a volume); the orchestrator, gateway and batch worker of that profile
    point at it, and nothing of the transformers LLM's set runs."""
    services = _profile(_config("--profile", "gpu-vllm")["services"], "gpu-vllm")
    assert not {"triton-llm", "orchestrator", "gateway", "batch-worker"} & set(services)
    loaded = {name: _models(svc) for name, svc in services.items() if _models(svc)}
    assert sorted(m for ms in loaded.values() for m in ms) == sorted(COMPONENTS)
    llm = services["triton-llm-vllm"]
    assert loaded["triton-llm-vllm"] == ["llm_decoder"]
    assert llm["image"].startswith("vitaserve/triton-vllm:")
    dockerfile = Path(llm["build"]["context"]) / llm["build"]["dockerfile"]
    assert dockerfile == ROOT / "services" / "triton" / "Dockerfile.vllm" and dockerfile.is_file()
    assert llm["read_only"] is True and llm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    cache = llm["environment"]["VITASERVE_VLLM_CACHE"]
    assert any(v.startswith("vllm-cache:") and v.split(":")[1] == cache for v in llm["volumes"])
    assert llm["shm_size"] in ("8gb", 8 * 1024**3)
    for name in ("triton-vision", "triton-audio", "triton-speech"):
        assert services[name]["image"].startswith("vitaserve/triton:"), name
    settings = _settings(services["orchestrator-vllm"]["environment"])
    for component, url in settings.component_urls().items():
        assert loaded[url.split(":")[0]] == [component]
    assert "triton-llm-vllm" in services["orchestrator-vllm"]["depends_on"]
    assert services["gateway-vllm"]["environment"]["VITASERVE_GATEWAY_ORCHESTRATOR_ADDRESS"] == \
        "orchestrator-vllm:50051"
    assert services["batch-worker-vllm"]["environment"]["VITASERVE_BATCH_LLM_DECODER_URL"] == "triton-llm-vllm:8001"
    assert "batch-beat" in services


def test_the_vllm_image_renders_llm_decoder_with_engine_vllm() -> None:
    """The repository Dockerfile.vllm bakes for compose: the renderer's command, run here."""
    import re
    import shlex
    import tempfile

    from vitaserve.triton.repository import main as render_main

    text = (ROOT / "services" / "triton" / "Dockerfile.vllm").read_text()
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-vllm-python-py3$", text, re.M)
    assert re.search(r"^USER 1000$", text, re.M) and "pip install --no-deps ." in text
    command = re.search(r"python -m vitaserve\.triton\.repository (.*?)(?:\\\n|\n)", text.replace(
        "\\\n      ", " ")).group(1)
    args = shlex.split(command)
    with tempfile.TemporaryDirectory() as out:
        args[args.index("--out") + 1] = out
        args[args.index("--source") + 1] = str(ROOT / "services" / "triton" / "model_repository")
        assert render_main(args) == 0
        config = (Path(out) / "llm_decoder" / "config.pbtxt").read_text()
        assert sorted(p.name for p in Path(out).iterdir()) == ["llm_decoder"]
    assert 'key: "engine" value: { string_value: "vllm" }' in config


def test_cpu_profile() -> None:
    services = _profile(_config("--profile", "cpu")["services"], "cpu")
    assert "deploy" not in services["triton-cpu"]
    assert services["orchestrator-cpu"]["environment"]["VITASERVE_TRITON_URL"] == "triton-cpu:8001"
    assert sorted(_models(services["triton-cpu"])) == sorted(COMPONENTS)
    assert "--model-repository=/opt/vitaserve/repositories/cpu" in services["triton-cpu"]["command"]
    settings = _settings(services["orchestrator-cpu"]["environment"])
    assert set(settings.component_urls().values()) == {"triton-cpu:8001"}
    assert not {"orchestrator", "triton-llm"} & set(services)  # the GPU set stays down


def test_one_model_family_for_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """VITASERVE_MODEL_FAMILY reaches Triton, the orchestrator and the batch worker alike (vita15 unless
    set); the orchestrator's settings accept it."""
    for family in ("vita15", "small"):
        if family == "small":
            monkeypatch.setenv("VITASERVE_MODEL_FAMILY", "small")
        services = _profile(_config("--profile", "cpu")["services"], "cpu")
        for name in ("triton-cpu", "orchestrator-cpu", "batch-worker-cpu"):
            assert services[name]["environment"]["VITASERVE_MODEL_FAMILY"] == family, name
        assert _settings(services["orchestrator-cpu"]["environment"]).model_family == family
        # the small family's LLM cache is on the container's writable /tmp
        assert services["triton-cpu"]["environment"]["VITASERVE_SMALL_CACHE"].startswith("/tmp/")


def test_orchestrators_keep_sessions_in_redis() -> None:
    for args, name in ((("--profile", "gpu"), "orchestrator"), (("--profile", "cpu"), "orchestrator-cpu")):
        services = _config(*args)["services"]
        env = services[name]["environment"]
        assert env["VITASERVE_SESSION_STORE"] == "redis"
        assert env["VITASERVE_REDIS_URL"].startswith("redis://redis:")
        assert "redis" in services[name]["depends_on"] and "redis" in services
        command = services["redis"]["command"]
        assert command[command.index("--appendonly") + 1] == "yes"


def test_grace_periods_cover_the_drain() -> None:
    services = _config("--profile", "gpu")["services"]
    settings = _settings(services["orchestrator"]["environment"])
    assert _seconds(services["orchestrator"]["stop_grace_period"]) > settings.shutdown_grace_s
    for name in ("triton-vision", "triton-llm"):
        timeout = next(int(a.split("=")[1]) for a in services[name]["command"] if a.startswith("--exit-timeout"))
        assert _seconds(services[name]["stop_grace_period"]) > timeout


@pytest.mark.parametrize(("profile", "gateway", "orchestrator", "other"),
                         [("gpu", "gateway", "orchestrator", "gateway-cpu"),
                          ("cpu", "gateway-cpu", "orchestrator-cpu", "gateway")])
def test_gateway_in_front_of_the_orchestrator_of_its_profile(profile: str, gateway: str, orchestrator: str,
                                                             other: str) -> None:
    services = _profile(_config("--profile", profile)["services"], profile)
    assert other not in services  # one gateway per profile, as for the orchestrator
    svc = services[gateway]
    env = svc["environment"]
    known = {f"VITASERVE_GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    assert not set(env) - known, f"unknown settings: {set(env) - known}"
    settings = GatewaySettings.model_validate({k.removeprefix("VITASERVE_GATEWAY_").lower(): v
                                               for k, v in env.items()})
    # the upstream: the orchestrator service of this profile, on the port it listens on, once it is healthy
    host, port = settings.orchestrator_address.rsplit(":", 1)
    assert host == orchestrator
    assert services[orchestrator]["environment"]["VITASERVE_LISTEN_ADDRESS"].rsplit(":", 1)[1] == port
    assert svc["depends_on"][orchestrator] == {"condition": "service_healthy"}
    # published on 8080 (docker-compose 1.29 prints mappings; older formats "host:container" strings)
    ports = [(int(p["published"]), int(p["target"])) if isinstance(p, dict) else tuple(map(int, p.split(":")))
             for p in svc["ports"]]
    assert ports == [(8080, settings.port)]
    # the image, hardened like the others
    assert svc["image"].startswith("vitaserve/gateway:")
    dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
    assert dockerfile == ROOT / "services" / "gateway" / "Dockerfile" and dockerfile.is_file()
    assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"] and svc["restart"] == "unless-stopped"
    test = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.port}/healthz" in test
    assert _seconds(svc["stop_grace_period"]) > 5  # uvicorn's graceful shutdown after SIGTERM


def test_gateway_port_can_move_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITASERVE_GATEWAY_HOST_PORT", "18080")
    (port,) = _config("--profile", "cpu")["services"]["gateway-cpu"]["ports"]
    assert (int(port["published"]), int(port["target"])) == (18080, 8080)
