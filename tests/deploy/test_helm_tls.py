"""TLS wiring of the chart (`orchestrator.tls`, `gateway.tls`, `gateway.orchestratorTLS`), rendered by Helm's
Go SDK as `test_helm.py` does and validated strictly: every TLS file a setting names is mounted from the
Secret key it should come from; the orchestrator's settings accept the pod's environment once those files
exist; its probes become the exec probe `vitaserve_orchestrator.healthcheck` (kubelet's gRPC probes cannot
speak TLS; the probe itself runs against a real TLS server in tests/orchestrator/test_server_security.py);
the chart's gateway trusts the orchestrator's CA and checks the name the probes check; mTLS, which the
gateway cannot do, is refused with a clear message unless the gateway is off."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from vitaserve_orchestrator.settings import OrchestratorSettings

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: by name
from test_helm import CHART, KUBE_VERSION, one, render_with  # noqa: E402

pytestmark = pytest.mark.unit

ORCHESTRATOR = "vs-vitaserve-orchestrator"
GATEWAY = "vs-vitaserve-gateway"


def pod(docs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(pod spec, its one container, its environment: ConfigMap + plain env values)."""
    spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {**one(docs, "ConfigMap", name)["data"],
           **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    return spec, container, env


def secret_of(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at `path` in the container comes from; the mount is read-only."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(path).parent))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == Path(path).name]
    return volume["secret"]["secretName"], item["key"]


def test_orchestrator_tls_mounts_settings_probes_and_the_gateway_follows(tmp_path: Path) -> None:
    docs = render_with({"orchestrator": {"tls": {"secretName": "orch-tls"}}})["docs"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec, container, env = pod(docs, ORCHESTRATOR)
    assert secret_of(spec, container, env["VITASERVE_TLS_CERT_FILE"]) == ("orch-tls", "tls.crt")
    assert secret_of(spec, container, env["VITASERVE_TLS_KEY_FILE"]) == ("orch-tls", "tls.key")
    assert secret_of(spec, container, env["VITASERVE_TLS_PROBE_CA_FILE"]) == ("orch-tls", "ca.crt")
    assert env["VITASERVE_TLS_PROBE_SERVER_NAME"] == ORCHESTRATOR  # the Service's name, by default
    # the settings accept the pod's variables once the mounted files exist (here: under tmp_path)
    values = {}
    for name, value in env.items():
        field = name.removeprefix("VITASERVE_").lower()
        if field in OrchestratorSettings.model_fields:
            if value.startswith("/etc/vitaserve/"):
                value = str(tmp_path / value.lstrip("/"))
                Path(value).parent.mkdir(parents=True, exist_ok=True)
                Path(value).write_text("PEM")
            values[field] = value
    values["redis_url"] = "redis://redis-from-secret:6379/0"
    settings = OrchestratorSettings.model_validate({**values, "kubernetes_namespace": "ml"})
    assert settings.tls_cert_file is not None and settings.tls_probe_ca_file is not None
    assert settings.tls_client_ca_file is None
    # kubelet's gRPC probes cannot speak TLS: the same health services through the exec probe
    for probe, service in (("startupProbe", "liveness"), ("readinessProbe", ""), ("livenessProbe", "liveness")):
        assert "grpc" not in container[probe]
        assert container[probe]["exec"]["command"] == [
            "python", "-m", "vitaserve_orchestrator.healthcheck", "--service", service]
        assert container[probe]["timeoutSeconds"] > 3  # the check's own timeout
    # the chart's gateway trusts that CA and checks the name on the certificate the probes check
    gspec, gcontainer, genv = pod(docs, GATEWAY)
    assert secret_of(gspec, gcontainer, genv["VITASERVE_GATEWAY_ORCHESTRATOR_TLS_CA_FILE"]) == ("orch-tls", "ca.crt")
    assert genv["VITASERVE_GATEWAY_ORCHESTRATOR_SERVER_NAME"] == env["VITASERVE_TLS_PROBE_SERVER_NAME"]


def test_plaintext_by_default_with_native_grpc_probes() -> None:
    docs = render_with({})["docs"]
    _, container, env = pod(docs, ORCHESTRATOR)
    assert not [k for k in env if k.startswith("VITASERVE_TLS_")]
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    _, _, genv = pod(docs, GATEWAY)
    assert "VITASERVE_GATEWAY_ORCHESTRATOR_TLS_CA_FILE" not in genv


def test_mtls_and_explicit_names() -> None:
    values = {"orchestrator": {"tls": {"secretName": "orch-tls", "caKey": "", "serverName": "grpc.example.com",
                                       "clientCASecret": "clients-ca", "clientCAKey": "clients.pem"}},
              "gateway": {"enabled": False}}
    docs = render_with(values)["docs"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec, container, env = pod(docs, ORCHESTRATOR)
    assert secret_of(spec, container, env["VITASERVE_TLS_CLIENT_CA_FILE"]) == ("clients-ca", "clients.pem")
    assert "VITASERVE_TLS_PROBE_CA_FILE" not in env  # caKey "": the probe trusts tls.crt itself
    assert env["VITASERVE_TLS_PROBE_SERVER_NAME"] == "grpc.example.com"
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match="the gateway has no client certificate"):
        chart.render({**values, "gateway": {"enabled": True}}, name="vs", namespace="ml")
    with pytest.raises(helm.HelmError, match="clientCASecret .mTLS. needs orchestrator.tls.secretName"):
        chart.render({"orchestrator": {"tls": {"clientCASecret": "clients-ca"}}}, name="vs", namespace="ml")
    # an explicit gateway.orchestratorTLS wins over the orchestrator's own Secret
    docs = render_with({"orchestrator": {"tls": {"secretName": "orch-tls"}},
                        "gateway": {"orchestratorTLS": {"caSecret": "corp-ca", "caKey": "root.pem"}}})["docs"]
    gspec, gcontainer, genv = pod(docs, GATEWAY)
    assert secret_of(gspec, gcontainer, genv["VITASERVE_GATEWAY_ORCHESTRATOR_TLS_CA_FILE"]) == ("corp-ca", "root.pem")
