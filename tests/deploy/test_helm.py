"""The Helm chart (`helm/vitaserve`): Helm v4 lint in strict mode and template (through `helm-python-sdk`,
which binds Helm's Go SDK in a bundled shared library: no helm binary, nothing downloaded) with the default
values and every values file in `ci/`; every rendered manifest passes `kubernetes-validate` in strict mode
for Kubernetes 1.37 (the newest schemas it bundles); and the manifests wire what the code expects."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from vitaserve.components.base import COMPONENTS
from vitaserve_gateway.settings import GatewaySettings
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.unit

CHART = Path(__file__).parents[2] / "helm" / "vitaserve"
KUBE_VERSION = "1.37.0"
VALUES_FILES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
CASES = ["default", *VALUES_FILES]


def values_of(case: str) -> dict[str, Any]:
    return {} if case == "default" else helm.values_from_yaml((CHART / "ci" / case).read_text())


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(case: str) -> list[dict[str, Any]]:
    if case not in _rendered:
        out = helm.Chart.load(CHART).render(values_of(case), name="vs", namespace="ml", is_install=True)
        docs = [doc for path, text in sorted(out.items()) if path.endswith(".yaml")
                for doc in yaml.safe_load_all(text) if doc]
        _rendered[case] = docs
    return _rendered[case]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def triton_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model name -> its Triton Deployment"""
    return {d["metadata"]["labels"]["vitaserve.io/model"]: d for d in find(docs, "Deployment")
            if "vitaserve.io/model" in d["metadata"]["labels"]}


def test_ci_values_files_exist() -> None:
    assert {"gpu-cluster.yaml", "external-redis.yaml", "gpu-vllm.yaml"} <= set(VALUES_FILES)


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str) -> None:
    report = helm.lint(CHART, values_of(case), strict=True, kube_version=f"v{KUBE_VERSION}", namespace="ml")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not problems and not report["errors"], json.dumps(report, indent=1)
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_passes_strict_schema_validation(case: str) -> None:
    docs = render(case)
    assert len(docs) >= 15
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises on any unknown or bad field


def test_strict_validation_is_not_vacuous() -> None:
    deployment = find(render("default"), "Deployment")[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 1}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_bad_values_fail_with_a_clear_message() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="kind must be gpu or cpu"):
        chart.render({"triton": {"defaults": {"kind": "tpu"}}}, name="vs", namespace="ml")
    with pytest.raises(helm.HelmError, match="apiKeys.enabled needs"):
        chart.render({"apiKeys": {"enabled": True}}, name="vs", namespace="ml")


@pytest.mark.parametrize("case", ["default", "small-cpu.yaml"])
def test_the_model_family_reaches_every_component(case: str) -> None:
    """One value, `modelFamily`, sets VITASERVE_MODEL_FAMILY of the Triton pods, the orchestrator and the
    batch worker; only vita15 mounts the checkpoint (the small family's weights are in the image)."""
    family = "small" if case == "small-cpu.yaml" else "vita15"
    docs = render(case)
    for name, spec in pod_specs(docs):
        for container in spec["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if container["name"] in ("triton", "orchestrator", "worker", "beat"):
                assert env.get("VITASERVE_MODEL_FAMILY") == family, (name, container["name"])
    for model, deployment in triton_deployments(docs).items():
        spec = deployment["spec"]["template"]["spec"]
        (triton,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in triton["env"]}
        mounts = {m["name"] for m in triton["volumeMounts"]}
        volumes = {v["name"] for v in spec["volumes"]}
        if family == "vita15":
            assert env["VITASERVE_CHECKPOINT_DIR"] == "/models/vita" and "checkpoint" in mounts & volumes
        else:
            assert "VITASERVE_CHECKPOINT_DIR" not in env and "checkpoint" not in mounts | volumes, model
    with pytest.raises(helm.HelmError, match='modelFamily must be vita15 or small, got "vita2"'):
        helm.Chart.load(CHART).render({"modelFamily": "vita2"}, name="vs", namespace="ml")


@pytest.mark.parametrize("case", CASES)
def test_one_triton_deployment_per_component_loading_only_its_model(case: str) -> None:
    docs = render(case)
    deployments = triton_deployments(docs)
    assert sorted(deployments) == sorted(COMPONENTS)
    gpu = case not in ("cpu-only.yaml", "small-cpu.yaml")
    for model, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        (triton,) = spec["containers"]
        loads = [a for a in triton["args"] if a.startswith("--load-model=")]
        assert loads == [f"--load-model={model}"] and "--model-control-mode=explicit" in triton["args"]
        (render_init,) = spec["initContainers"]
        assert f"--models={model}" in render_init["args"]
        assert f"--kind={'gpu' if gpu else 'cpu'}" in render_init["args"]
        assert render_init["command"] == ["python", "-m", "vitaserve.triton.repository"]
        assert ("nvidia.com/gpu" in triton["resources"]["limits"]) == gpu
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        timeout = int(next(a for a in triton["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
        assert spec["terminationGracePeriodSeconds"] >= timeout + triton["lifecycle"]["preStop"]["sleep"]["seconds"]
        service = one(docs, "Service", deployment["metadata"]["name"])
        assert service["spec"]["clusterIP"] == "None"  # headless: the orchestrator balances itself
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 8001
        assert service["spec"]["selector"].items() <= spec.get("labels", deployment["spec"]["template"][
            "metadata"]["labels"]).items()


@pytest.mark.parametrize("case", CASES)
def test_the_init_containers_render_a_repository_the_models_accept(case: str, tmp_path: Path) -> None:
    """Run each Triton pod's init container command (the repository renderer) here, with --out and
    --source pointed at local paths, and read the rendered parameters back with the models' own parsers."""
    from vitaserve.batching import EngineConfig, SpeechBatchConfig
    from vitaserve.triton.repository import CHECKED_IN
    from vitaserve.triton.repository import main as render_main

    for model, deployment in triton_deployments(render(case)).items():
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        args = [a for a in init["args"] if not a.startswith(("--out=", "--source="))]
        out = tmp_path / model
        assert render_main([*args, f"--out={out}", f"--source={CHECKED_IN}"]) == 0, args
        text = (out / model / "config.pbtxt").read_text()
        params = dict(re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text))
        engine = values_of(case).get("triton", {}).get("components", {}).get(model, {}).get("engine", {})
        for key, value in engine.items():
            assert params[key] == str(value), (model, key)
        if model == "llm_decoder":
            EngineConfig.from_parameters(params)
        elif model == "speech_synth":
            SpeechBatchConfig.from_parameters(params)


def test_engine_parameters_are_refused_where_no_engine_takes_them() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="only llm_decoder and speech_synth take engine parameters"):
        chart.render({"triton": {"components": {"vision_encoder": {"name": "vision", "engine": {"x": 1}}}}},
                     name="vs", namespace="ml")



def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_llm_decoder_on_vllm_runs_its_own_image_with_a_writable_cache() -> None:
    """ci/gpu-vllm.yaml: llm_decoder (init container and server) runs the vLLM image with engine=vllm and
    the vllm_* parameters rendered into its config, VITASERVE_VLLM_CACHE on a writable emptyDir, and a larger
    /dev/shm; the other components keep the Triton image and get none of it."""
    from vitaserve.triton.repository import LLM_ENGINE_CHOICE

    docs = render("gpu-vllm.yaml")
    engine = values_of("gpu-vllm.yaml")["triton"]["components"]["llm_decoder"]["engine"]
    assert engine["engine"] == "vllm" and set(engine) - {"engine"} <= set(LLM_ENGINE_CHOICE)
    for model, deployment in triton_deployments(docs).items():
        spec = deployment["spec"]["template"]["spec"]
        (triton,) = spec["containers"]
        (init,) = spec["initContainers"]
        mounts = {m["name"]: m for m in triton["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        if model == "llm_decoder":
            assert triton["image"] == init["image"] == "registry.example.com/vitaserve/triton-vllm:0.1.0"
            assert {f"--llm-engine={k}={v}" for k, v in engine.items()} <= set(init["args"])
            path = _env(triton)["VITASERVE_VLLM_CACHE"]
            assert mounts["vllm-cache"]["mountPath"] == path and not mounts["vllm-cache"].get("readOnly")
            assert volumes["vllm-cache"] == {"name": "vllm-cache", "emptyDir": {"sizeLimit": "24Gi"}}
            assert volumes["shm"]["emptyDir"]["sizeLimit"] == "8Gi"
        else:
            assert triton["image"] == init["image"] == "registry.example.com/vitaserve/triton:0.1.0"
            assert not [a for a in init["args"] if a.startswith("--llm-engine")]
            assert "VITASERVE_VLLM_CACHE" not in _env(triton) and "vllm-cache" not in mounts | volumes
            assert volumes["shm"]["emptyDir"]["sizeLimit"] == "2Gi"


@pytest.mark.parametrize("case", [c for c in CASES if c != "gpu-vllm.yaml"])
def test_no_vllm_unless_the_llm_engine_is_vllm(case: str) -> None:
    for model, deployment in triton_deployments(render(case)).items():
        spec = deployment["spec"]["template"]["spec"]
        assert "vllm" not in json.dumps(spec), (case, model)


def test_a_component_image_overrides_key_by_key_and_the_cache_may_be_a_volume() -> None:
    values = {"triton": {"image": {"repository": "r/triton", "tag": "1.2", "pullPolicy": "Always"},
                         "vllmCache": {"path": "/cache/vllm",
                                       "volume": {"persistentVolumeClaim": {"claimName": "vllm-cache"}}},
                         "components": {"llm_decoder": {"name": "llm", "image": {"repository": "r/triton-vllm"},
                                                        "engine": {"engine": "vllm"}}}}}
    docs = render_with(values)["docs"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    deployments = triton_deployments(docs)
    spec = deployments["llm_decoder"]["spec"]["template"]["spec"]
    (triton,) = spec["containers"]
    assert (triton["image"], triton["imagePullPolicy"]) == ("r/triton-vllm:1.2", "Always")
    assert _env(triton)["VITASERVE_VLLM_CACHE"] == "/cache/vllm"
    (cache,) = [v for v in spec["volumes"] if v["name"] == "vllm-cache"]
    assert cache == {"name": "vllm-cache", "persistentVolumeClaim": {"claimName": "vllm-cache"}}
    assert deployments["vision_encoder"]["spec"]["template"]["spec"]["containers"][0]["image"] == "r/triton:1.2"
    # an image alone does not make the engine vllm: no cache volume
    plain = render_with({"triton": {"components": {"llm_decoder": {"name": "llm", "image": {"tag": "x"}}}}})
    llm = triton_deployments(plain["docs"])["llm_decoder"]["spec"]["template"]["spec"]
    assert llm["containers"][0]["image"] == "vitaserve/triton:x" and "vllm" not in json.dumps(llm)


def test_gpu_cluster_placement_autoscaling_and_disruption_budgets() -> None:
    docs = render("gpu-cluster.yaml")
    llm = triton_deployments(docs)["llm_decoder"]
    spec = llm["spec"]["template"]["spec"]
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in spec["affinity"]
    assert "replicas" not in llm["spec"]  # the HPA owns the replica count
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    for deployment in triton_deployments(docs).values():
        hpa = hpas[deployment["metadata"]["name"]]
        assert hpa["spec"]["metrics"][0]["type"] == "Pods"  # Triton's queue time, not CPU
    assert hpas[llm["metadata"]["name"]]["spec"]["minReplicas"] == 2
    assert any(name.endswith("-orchestrator") for name in hpas) and any(n.endswith("-batch-worker") for n in hpas)
    pdbs = {p["metadata"]["name"] for p in find(docs, "PodDisruptionBudget")}
    assert {d["metadata"]["name"] for d in triton_deployments(docs).values()} <= pdbs


@pytest.mark.parametrize("case", CASES)
def test_every_container_is_non_root_and_read_only(case: str) -> None:
    for name, spec in pod_specs(render(case)):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        mounts_tmp = False
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, name
            assert isinstance(ctx["runAsUser"], int) and ctx["runAsUser"] > 0, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            mounts_tmp = mounts_tmp or any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", []))
        assert mounts_tmp, f"{name}: no writable /tmp"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"], name
        if "triton" in name:
            assert volumes["shm"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("case", CASES)
def test_orchestrator_wiring_matches_the_code(case: str) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment", "vs-vitaserve-orchestrator")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config = one(docs, "ConfigMap", "vs-vitaserve-orchestrator")["data"]
    env = {e["name"]: e for e in container["env"]}
    # every variable is one settings.py reads
    known = {f"VITASERVE_{name.upper()}" for name in OrchestratorSettings.model_fields}
    assert not (set(config) | set(env)) - known - {"HOME"}
    # and the settings accept them: kubernetes discovery with a Service per component that exists
    values = {k[len("VITASERVE_"):].lower(): v for k, v in config.items()
              if k[len("VITASERVE_"):].lower() in OrchestratorSettings.model_fields}
    if "VITASERVE_REDIS_URL" in env:  # from the Redis Secret (it may hold a password)
        assert "secretKeyRef" in env["VITASERVE_REDIS_URL"]["valueFrom"]
        values["redis_url"] = "redis://redis-from-secret:6379/0"
    settings = OrchestratorSettings.model_validate({**values, "kubernetes_namespace": "ml"})
    triton_services = {d["metadata"]["name"] for d in find(docs, "Service") if d["spec"].get("clusterIP") == "None"
                       and d["metadata"]["labels"]["app.kubernetes.io/component"] != "orchestrator"}
    if settings.discovery == "kubernetes":
        assert set(settings.component_services().values()) == triton_services
        assert one(docs, "RoleBinding", "vs-vitaserve-endpointslice-reader")["subjects"][0]["name"] == \
            spec["serviceAccountName"]
        (rule,) = one(docs, "Role", "vs-vitaserve-endpointslice-reader")["rules"]
        assert rule["resources"] == ["endpointslices"] and {"list", "watch"} <= set(rule["verbs"])
        assert env["VITASERVE_KUBERNETES_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    else:
        assert {u.split(":")[0] for u in settings.component_urls().values()} == triton_services
    # probes on grpc.health.v1 and a grace period covering the drain
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    drain = settings.shutdown_grace_s + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= drain
    # Redis URL from a Secret; API keys file mounted when enabled
    redis_ref = env["VITASERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    if case != "gpu-cluster.yaml":  # there: an existing Secret of the cluster
        secret = one(docs, "Secret", redis_ref["name"])
        assert secret["stringData"][redis_ref["key"]].startswith("redis://")
    if "VITASERVE_API_KEYS_FILE" in env:
        path = Path(env["VITASERVE_API_KEYS_FILE"]["value"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["items"] == [{"key": path.name, "path": path.name}]


def test_redis_bundled_or_external() -> None:
    bundled = render("default")
    (redis,) = find(bundled, "StatefulSet")
    assert redis["spec"]["replicas"] == 1
    assert one(bundled, "Secret", "vs-vitaserve-redis-url")["stringData"]["url"] == "redis://vs-vitaserve-redis:6379/0"
    external = render("external-redis.yaml")
    assert not find(external, "StatefulSet")
    assert one(external, "Secret", "vs-vitaserve-redis-url")["stringData"]["url"].endswith("svc.cluster.local:6379/2")
    keys = one(external, "Secret", "vs-vitaserve-api-keys")["stringData"]["api-keys.json"]
    assert json.loads(keys)["keys"][0]["tenant"] == "acme"


def test_batch_worker_and_beat() -> None:
    assert not [d for d in render("default") if "batch" in d["metadata"]["name"]]  # batch.enabled=false
    docs = render("gpu-cluster.yaml")
    worker = one(docs, "Deployment", "vs-vitaserve-batch-worker")["spec"]["template"]["spec"]["containers"][0]
    beat_deployment = one(docs, "Deployment", "vs-vitaserve-batch-beat")
    beat = beat_deployment["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:4] == ["celery", "-A", "vitaserve_batch.app", "worker"]
    assert beat["command"][:4] == ["celery", "-A", "vitaserve_batch.app", "beat"]
    assert beat_deployment["spec"]["replicas"] == 1 and beat_deployment["spec"]["strategy"]["type"] == "Recreate"
    assert worker["image"] == "registry.example.com/vitaserve/batch:0.1.0"
    assert {e["name"] for e in worker["env"]} >= {"VITASERVE_REDIS_URL"}


DASHBOARD = CHART / "dashboards" / "vitaserve.json"
TRITON_GPU_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}  # only on GPU nodes


def dashboard_metrics() -> set[str]:
    """Metric names the dashboard's queries use (histogram series reduced to the metric)."""
    import re

    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b((?:vitaserve|nv)_[a-z_]+)", " ".join(exprs)))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("vitaserve_") else n for n in names}


def test_grafana_dashboard_configmap_and_the_metrics_it_queries() -> None:
    from vitaserve_orchestrator.telemetry import Metrics

    (configmap,) = [d for d in render("default") if d["metadata"]["name"] == "vs-vitaserve-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["vitaserve.json"]) == json.loads(DASHBOARD.read_text())
    from vitaserve_batch import metrics as batch_metrics
    from vitaserve_gateway.app import Metrics as GatewayMetrics

    instruments = [*Metrics().registry.collect(), *GatewayMetrics().registry.collect(),
                   *(m for instrument in (batch_metrics.ITEMS, batch_metrics.ITEM_DURATION, batch_metrics.IN_FLIGHT)
                     for m in instrument.collect())]
    registered = {m.name.removesuffix("_total") if m.type == "counter" else m.name for m in instruments}
    wanted = {n.removesuffix("_total") for n in dashboard_metrics() if n.startswith("vitaserve_")}
    assert wanted and wanted <= registered, wanted - registered
    assert {n for n in wanted if n.startswith("vitaserve_gateway_")}, "no gateway panel"
    off = helm.Chart.load(CHART).render({"grafana": {"dashboard": {"enabled": False}}}, name="vs", namespace="ml")
    assert "vs-vitaserve-dashboard" not in "".join(off.values())


def test_api_keys_secret_is_a_keys_file_the_orchestrator_accepts() -> None:
    import hashlib

    from vitaserve_orchestrator.auth import KeyTable

    docs = render("external-redis.yaml")
    deployment = one(docs, "Deployment", "vs-vitaserve-orchestrator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    path = next(e["value"] for e in container["env"] if e["name"] == "VITASERVE_API_KEYS_FILE")
    secrets = [d for d in find(docs, "Secret") if Path(path).name in d.get("stringData", {})]
    assert len(secrets) == 1
    table = KeyTable.parse(json.loads(secrets[0]["stringData"][Path(path).name]), max_streams=1, max_message_bytes=0)
    tenant = table.find("vs-example-key-change-me")
    assert tenant is not None and tenant.name == "acme" and tenant.max_streams == 20
    assert table.find("wrong-key") is None
    assert "vs-example-key-change-me" not in json.dumps(secrets[0])  # only the hash is stored
    assert hashlib.sha256(b"vs-example-key-change-me").hexdigest() in json.dumps(secrets[0])


@pytest.mark.parametrize("case", CASES)
def test_metrics_ports_annotations_and_settings(case: str) -> None:
    from vitaserve_batch.settings import BatchSettings

    docs = render(case)
    deployment = one(docs, "Deployment", "vs-vitaserve-orchestrator")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    config = one(docs, "ConfigMap", "vs-vitaserve-orchestrator")["data"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert config["VITASERVE_METRICS_ADDRESS"] == f"0.0.0.0:{port}"
    assert OrchestratorSettings.model_validate({"triton_url": "t:8001",
                                                "metrics_address": config["VITASERVE_METRICS_ADDRESS"]})
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
    service = one(docs, "Service", "vs-vitaserve-orchestrator")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["metrics"] == "metrics"
    assert not find(docs, "ServiceMonitor")  # off by default: needs the Prometheus Operator's CRDs
    workers = find(docs, "Deployment", "vs-vitaserve-batch-worker")
    for worker in workers:
        (wc,) = worker["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in wc["env"]}
        wport = {p["name"]: p["containerPort"] for p in wc["ports"]}["metrics"]
        assert env["VITASERVE_BATCH_METRICS_ADDRESS"] == f"0.0.0.0:{wport}"
        assert env["VITASERVE_BATCH_METRICS_DIR"].startswith("/tmp/")  # the writable emptyDir
        settings = BatchSettings.model_validate({k[len("VITASERVE_BATCH_"):].lower(): v for k, v in env.items()
                                                 if k.startswith("VITASERVE_BATCH_")})
        assert settings.metrics_address == f"0.0.0.0:{wport}"
        assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(wport)
    beat = find(docs, "Deployment", "vs-vitaserve-batch-beat")
    assert all("ports" not in b["spec"]["template"]["spec"]["containers"][0] for b in beat)


def test_service_monitor_and_metrics_off() -> None:
    chart = helm.Chart.load(CHART)
    monitor_on = {"serviceMonitor": {"enabled": True, "labels": {"release": "kp"}}}
    out = chart.render({"orchestrator": {"metrics": monitor_on}}, name="vs", namespace="ml")
    docs = [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kp"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    service = one(docs, "Service", "vs-vitaserve-orchestrator")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    off = chart.render({"orchestrator": {"metrics": {"enabled": False}}}, name="vs", namespace="ml")
    off_docs = [d for path, text in off.items() if path.endswith(".yaml")
                for d in yaml.safe_load_all(text) if d]
    assert "VITASERVE_METRICS_ADDRESS" not in one(off_docs, "ConfigMap", "vs-vitaserve-orchestrator")["data"]
    assert "prometheus.io/scrape" not in one(off_docs, "Deployment", "vs-vitaserve-orchestrator")[
        "spec"]["template"]["metadata"]["annotations"]


# ---- the Realtime gateway -------------------------------------------------------------------------------
GATEWAY = "vs-vitaserve-gateway"


def render_with(values: dict[str, Any]) -> dict[str, Any]:
    """Render `values` (not cached): {"docs": manifests, "notes": NOTES.txt}."""
    out = helm.Chart.load(CHART).render(values, name="vs", namespace="ml", is_install=True)
    docs = [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]
    return {"docs": docs, "notes": next(text for path, text in out.items() if path.endswith("NOTES.txt"))}


def gateway_run(docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `python -m vitaserve_gateway`'s main() with the pod's environment (ConfigMap + env) and return
    what it passes to uvicorn.run: the settings the gateway really starts with."""
    import vitaserve_gateway.__main__ as gateway_main

    (container,) = one(docs, "Deployment", GATEWAY)["spec"]["template"]["spec"]["containers"]
    env = {**one(docs, "ConfigMap", GATEWAY)["data"], **{e["name"]: e["value"] for e in container["env"]}}
    for name in [n for n in os.environ if n.startswith("VITASERVE_GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gateway_main.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    assert gateway_main.main() == 0
    (kwargs,) = calls
    return kwargs


@pytest.mark.parametrize("case", CASES)
def test_gateway_wiring_matches_the_code(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment", GATEWAY)
    template = deployment["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    config = one(docs, "ConfigMap", GATEWAY)["data"]
    assert container["envFrom"] == [{"configMapRef": {"name": GATEWAY}}]
    # every variable is one settings.py reads (it ignores unknown ones silently), and it accepts them
    known = {f"VITASERVE_GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    env = {e["name"]: e for e in container["env"]}
    assert not (set(config) | set(env)) - known - {"HOME"}
    settings = GatewaySettings.model_validate({k.removeprefix("VITASERVE_GATEWAY_").lower(): v
                                               for k, v in config.items()})
    # the upstream is every orchestrator replica: the headless Service's DNS on its gRPC port, round-robin
    assert settings.orchestrator_address.startswith("dns:///") and settings.orchestrator_lb_policy == "round_robin"
    host, port = settings.orchestrator_address.removeprefix("dns:///").rsplit(":", 1)
    orchestrator = one(docs, "Service", host)
    assert orchestrator["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"
    assert orchestrator["spec"]["clusterIP"] == "None"
    assert orchestrator["spec"]["selector"] == one(docs, "Service", host.removesuffix("-headless"))["spec"]["selector"]
    assert {p["name"]: p["port"] for p in orchestrator["spec"]["ports"]}["grpc"] == int(port)
    # what the process binds, and the ports and probes that reach it
    run = gateway_run(docs, monkeypatch)
    assert (run["host"], run["port"]) == ("0.0.0.0", settings.port)
    assert run["ws_ping_interval"] == settings.ws_ping_interval_s
    assert run["ws_max_size"] == settings.max_message_bytes
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": run["port"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTP"}
    assert container["readinessProbe"]["timeoutSeconds"] > 2  # /readyz waits up to 2 s for the orchestrator
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", "scheme": "HTTP"}
    assert "startupProbe" not in container
    # the drain: open sockets get the preStop sleep, then uvicorn's graceful shutdown, inside the grace period
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + run["timeout_graceful_shutdown"]
    assert spec["terminationGracePeriodSeconds"] > drain >= 30
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    # the Service: port 8080 named http onto the pods, no affinity (the gateway keeps no state)
    service = one(docs, "Service", GATEWAY)
    (service_port,) = service["spec"]["ports"]
    assert service_port == {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP",
                            "appProtocol": "http"}
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert "sessionAffinity" not in service["spec"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(run["port"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_gateway_autoscaling_disruption_budget_and_ingress() -> None:
    docs = render("gpu-cluster.yaml")
    values = values_of("gpu-cluster.yaml")["gateway"]
    deployment = one(docs, "Deployment", GATEWAY)
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/vitaserve/gateway:0.1.0"
    hpa = one(docs, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 12)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 900
    pdb = one(docs, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    # the Ingress: long WebSocket timeouts, only the WebSocket and the page routed to the Service's http port
    ingress = one(docs, "Ingress", GATEWAY)
    annotations = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == values["ingress"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "realtime.example.com"
    paths = rule["http"]["paths"]
    assert {p["backend"]["service"]["name"] for p in paths} == {GATEWAY}
    assert {p["backend"]["service"]["port"]["name"] for p in paths} == {"http"}

    def routed(url: str) -> bool:
        return any(url == p["path"] if p["pathType"] == "Exact" else
                   url == p["path"] or url.startswith(p["path"].rstrip("/") + "/") for p in paths)

    assert routed("/") and routed("/v1/realtime") and routed("/static/app.js")
    assert not any(routed(url) for url in ("/metrics", "/healthz", "/readyz"))
    # off by default; on, the CPU target comes from values
    default = render("default")
    assert not find(default, "Ingress") and not find(default, "HorizontalPodAutoscaler", GATEWAY)
    assert one(default, "Deployment", GATEWAY)["spec"]["replicas"] == 2
    assert one(default, "PodDisruptionBudget", GATEWAY)["spec"]["maxUnavailable"] == 1
    on = render_with({"gateway": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 55},
                                  "ingress": {"enabled": True, "annotations": {
                                      "nginx.ingress.kubernetes.io/proxy-http-version": None}}}})["docs"]
    hpa = one(on, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 55
    (rule,) = one(on, "Ingress", GATEWAY)["spec"]["rules"]
    assert "host" not in rule  # no hosts: any host
    # null deletes a default annotation (another controller's Ingress needs none of them)
    assert "nginx.ingress.kubernetes.io/proxy-http-version" not in \
        one(on, "Ingress", GATEWAY)["metadata"]["annotations"]
    for doc in on:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_gateway_tls_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway.tls: the pod serves HTTPS/WSS from a kubernetes.io/tls Secret (probes follow); orchestratorTLS:
    it verifies the orchestrator's certificate with a CA from a Secret."""
    values = {"gateway": {"tls": {"secretName": "realtime-tls"}, "playoutLeadMs": 200,
                          "orchestratorTLS": {"caSecret": "orchestrator-ca", "caKey": "ca.pem",
                                              "serverName": "orchestrator.vitaserve"}}}
    docs = render_with(values)["docs"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec = one(docs, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    run = gateway_run(docs, monkeypatch)
    settings = GatewaySettings()  # the environment gateway_run left
    assert settings.playout_lead_ms == 200 and settings.orchestrator_server_name == "orchestrator.vitaserve"

    def secret_of(path: str) -> tuple[str, str]:
        """(Secret name, key) that the file at `path` in the container comes from."""
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(path).parent))
        assert mount["readOnly"] is True
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        (item,) = [i for i in volume["secret"]["items"] if i["path"] == Path(path).name]
        return volume["secret"]["secretName"], item["key"]

    assert secret_of(run["ssl_certfile"]) == ("realtime-tls", "tls.crt")
    assert secret_of(run["ssl_keyfile"]) == ("realtime-tls", "tls.key")
    assert secret_of(str(settings.orchestrator_tls_ca_file)) == ("orchestrator-ca", "ca.pem")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert one(docs, "Service", GATEWAY)["spec"]["ports"][0]["appProtocol"] == "https"


def test_gateway_disabled_renders_nothing() -> None:
    off = render_with({"gateway": {"enabled": False, "ingress": {"enabled": True},
                                   "autoscaling": {"enabled": True}}})
    assert not [d for d in off["docs"] if "gateway" in d["metadata"]["name"]
                or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway"]
    assert "gateway" not in off["notes"].lower()
    assert find(off["docs"], "Deployment", "vs-vitaserve-orchestrator")  # the rest is unchanged
    assert len(off["docs"]) == len(render("default")) - 5  # ConfigMap, Deployment, Service, PDB, NetworkPolicy


def test_gateway_notes_say_how_to_reach_the_page() -> None:
    notes = render_with({})["notes"]
    assert "kubectl -n ml port-forward svc/vs-vitaserve-gateway 8080" in notes
    assert "http://127.0.0.1:8080/" in notes and 'base_url="http://127.0.0.1:8080/v1"' in notes
    with_ingress = render_with(values_of("gpu-cluster.yaml"))["notes"]
    assert "https://realtime.example.com/" in with_ingress
    assert "wss://realtime.example.com/v1/realtime" in with_ingress
