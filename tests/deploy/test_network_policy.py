"""The chart's NetworkPolicies (`helm/vitaserve/templates/networkpolicy.yaml`), rendered by Helm's Go SDK
(`helm-python-sdk`, as `test_helm.py`) with the default values and every `ci/*.yaml`, validated strictly by
`kubernetes-validate`, and then *evaluated*: a small implementation of the NetworkPolicy semantics
(isolation by podSelector, peers by pod/namespace selectors and ipBlocks, named ports resolved on the
destination's containers) answers "may A connect to B on port P" between the pods the chart renders and a few
outsiders. So the policies are checked against the labels and port names of the real pod templates: a renamed
label or port breaks these tests."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Any

import kubernetes_validate
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))  # --import-mode=importlib: by name
from test_helm import CASES, KUBE_VERSION, find, render, render_with, values_of  # noqa: E402

pytestmark = pytest.mark.unit

NAMESPACE = "ml"  # what test_helm renders into


@dataclass(frozen=True)
class Peer:
    """A connection's source or destination: a pod (namespace + labels + named ports) or a bare IP."""

    name: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> number
    ip: str | None = None


def chart_pods(docs: list[dict[str, Any]]) -> dict[str, Peer]:
    """component label -> a pod of that workload (from its pod template)."""
    pods = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = d["spec"]["template"]
        labels = template["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                 if "name" in p}
        pods[labels["app.kubernetes.io/component"]] = Peer(d["metadata"]["name"], NAMESPACE, labels, ports,
                                                            ip=f"10.1.0.{len(pods) + 1}")
    return pods


PROMETHEUS = Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, ip="10.2.0.1")
STRANGER = Peer("stranger", NAMESPACE, {"app": "something-else"}, ip="10.1.9.9")  # another app, same namespace
OUTSIDER = Peer("outsider", "other", {"app.kubernetes.io/component": "orchestrator"}, ip="10.3.0.1")
INTERNET = Peer("internet", ip="203.0.113.7")
APP = Peer("app", "apps", {"app": "caller"}, ip="10.4.0.1")  # ci/gpu-cluster.yaml lets namespace apps call it
ROGUE_PROMETHEUS = Peer("prometheus-elsewhere", "tools", {"app.kubernetes.io/name": "prometheus"}, ip="10.4.0.2")
KUBE_DNS = Peer("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53, "dns-tcp": 53}, ip="10.0.0.10")


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # the label every namespace carries


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions (empty = everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], who: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if who.ip is None:
            return False
        ip = ipaddress.ip_address(who.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if who.namespace is None:  # a bare IP is matched by ipBlocks only
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(who.namespace)):
            return False
    elif who.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], who.labels)


def port_matches(rule_ports: list[dict[str, Any]] | None, target: Peer, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        wanted = p.get("port")
        if wanted is None or (isinstance(wanted, int) and wanted == port) or \
                (isinstance(wanted, str) and target.ports.get(wanted) == port):
            return True
    return False


def isolating(policies: list[dict[str, Any]], pod: Peer, direction: str) -> list[dict[str, Any]]:
    return [p for p in policies if pod.namespace == NAMESPACE and selects(p["spec"]["podSelector"], pod.labels)
            and direction in p["spec"].get("policyTypes", ["Ingress"])]


def allowed(policies: list[dict[str, Any]], src: Peer, dst: Peer, port: int | str,
            protocol: str = "TCP") -> bool:
    """May `src` open a connection to `dst` on `port` (a number, or the name of one of dst's ports)?
    Both ends' policies must allow it: dst's ingress and src's egress (NetworkPolicy semantics)."""
    if isinstance(port, str):
        assert port in dst.ports, f"{dst.name} has no port named {port!r}: {dst.ports}"
        port = dst.ports[port]

    def ok(direction: str, pod: Peer, other: Peer, key: str) -> bool:
        chosen = isolating(policies, pod, direction)
        if not chosen:
            return True  # a pod no policy selects is not isolated
        return any(
            (not rule.get(key) or any(peer_matches(peer, other, NAMESPACE) for peer in rule[key]))
            and port_matches(rule.get("ports"), dst, port, protocol)
            for policy in chosen for rule in policy["spec"].get(direction.lower(), []))

    return ok("Ingress", dst, src, "from") and ok("Egress", src, dst, "to")


def policies_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(docs, "NetworkPolicy")


# ---- the tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_policies_pass_strict_validation_and_cover_every_pod_once(case: str) -> None:
    docs = render(case)
    policies = policies_of(docs)
    assert policies, "networkPolicy.enabled is the default"
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    pods = chart_pods(docs)
    for component, pod in pods.items():
        chosen = [p["metadata"]["name"] for p in isolating(policies, pod, "Ingress")]
        assert len(chosen) == 1, f"{component}: selected by {chosen} (every pod exactly once: default deny)"
    for policy in policies:
        selected = [pod for pod in pods.values() if selects(policy["spec"]["podSelector"], pod.labels)]
        assert selected, f"{policy['metadata']['name']} selects no pod the chart renders"
        for rule in policy["spec"].get("ingress", []):  # every named port exists on the pods it opens
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    assert all(port["port"] in pod.ports for pod in selected), (policy["metadata"]["name"], port)


@pytest.mark.parametrize("case", CASES)
def test_who_may_talk_to_whom(case: str) -> None:
    docs = render(case)
    policies = policies_of(docs)
    pods = chart_pods(docs)
    orchestrator, gateway = pods["orchestrator"], pods["gateway"]
    tritons = [pod for c, pod in pods.items() if c.startswith("triton-")]
    assert len(tritons) == 4
    batch = [pods[c] for c in ("batch-worker", "batch-beat") if c in pods]
    assert bool(batch) == bool(values_of(case).get("batch", {}).get("enabled"))
    everyone = [*pods.values(), PROMETHEUS, STRANGER, OUTSIDER, INTERNET, APP, ROGUE_PROMETHEUS]
    np = values_of(case).get("networkPolicy", {})
    # the scrapers: Prometheus pods anywhere by default, only the monitoring namespace's where values say so
    scrapers = {PROMETHEUS.name} | ({ROGUE_PROMETHEUS.name} if "metrics" not in np else set())

    for triton in tritons:
        callers = {p.name for p in everyone if allowed(policies, p, triton, "grpc")}
        assert callers == {orchestrator.name, *(p.name for p in batch if "worker" in p.name)}, triton.name
        assert {p.name for p in everyone if allowed(policies, p, triton, "http")} == callers
        assert {p.name for p in everyone if allowed(policies, p, triton, "metrics")} == scrapers
        # egress: DNS only (a compromised model process reaches nothing else)
        assert allowed(policies, triton, KUBE_DNS, 53, "UDP") and allowed(policies, triton, KUBE_DNS, 53, "TCP")
        assert not allowed(policies, triton, orchestrator, "grpc")
        assert not allowed(policies, triton, INTERNET, 443)

    if "redis" in pods:
        redis = pods["redis"]
        assert {p.name for p in everyone if allowed(policies, p, redis, "redis")} == \
            {orchestrator.name, *(p.name for p in batch)}
        assert not allowed(policies, redis, KUBE_DNS, 53, "UDP") and not allowed(policies, redis, INTERNET, 443)
    else:
        assert not find(docs, "StatefulSet") and not find(docs, "NetworkPolicy", "vs-vitaserve-redis")  # external

    clients = {APP.name} if np.get("orchestrator", {}).get("from") else set()  # networkPolicy.orchestrator.from
    assert {p.name for p in everyone if allowed(policies, p, orchestrator, "grpc")} == {gateway.name, *clients}
    assert {p.name for p in everyone if allowed(policies, p, orchestrator, "metrics")} == scrapers
    # the gateway is the public endpoint: anyone may connect to its http port, nothing else is open
    # (except the pods whose own egress is closed: Triton and Redis)
    closed = {*(t.name for t in tritons), *(p.name for c, p in pods.items() if c == "redis")}
    assert {p.name for p in everyone if allowed(policies, p, gateway, "http")} == \
        {p.name for p in everyone} - closed
    assert not allowed(policies, INTERNET, gateway, 9999)
    for pod in batch:
        got = {p.name for p in everyone if pod.ports and allowed(policies, p, pod, "metrics")}
        assert got == (scrapers if "worker" in pod.name else set())
        assert not any(allowed(policies, p, pod, 8080) for p in everyone)
    # the calls the platform makes go out unrestricted from its callers (the Kubernetes API, OTLP, ...)
    assert allowed(policies, orchestrator, INTERNET, 443) and allowed(policies, gateway, orchestrator, "grpc")


def test_client_selectors_and_cidrs_of_the_orchestrator_and_the_metrics_scrapers() -> None:
    docs = render_with({"networkPolicy": {
        "orchestrator": {"from": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}},
                                  {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}},
                                   "podSelector": {"matchExpressions": [
                                       {"key": "app.kubernetes.io/component", "operator": "In",
                                        "values": ["orchestrator"]}]}}]},
        "metrics": {"from": []},
    }})["docs"]
    policies = policies_of(docs)
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    pods = chart_pods(docs)
    orchestrator = pods["orchestrator"]
    assert allowed(policies, INTERNET, orchestrator, "grpc")
    assert not allowed(policies, Peer("far", ip="203.0.113.200"), orchestrator, "grpc")  # the except
    assert allowed(policies, OUTSIDER, orchestrator, "grpc")
    assert allowed(policies, pods["gateway"], orchestrator, "grpc")  # still: the chart's own gateway
    assert not allowed(policies, STRANGER, orchestrator, "grpc")
    # metrics.from: [] -> no one scrapes: the metrics ports are closed
    for component, pod in pods.items():
        if "metrics" in pod.ports:
            assert not allowed(policies, PROMETHEUS, pod, "metrics"), component


def test_the_evaluator_is_not_vacuous() -> None:
    """A label the policies do not expect (as a renamed component label would be) is refused."""
    docs = render("default")
    policies = policies_of(docs)
    pods = chart_pods(docs)
    renamed = Peer("renamed", NAMESPACE, {**pods["orchestrator"].labels, "app.kubernetes.io/component": "orch"})
    assert allowed(policies, pods["orchestrator"], pods["triton-llm"], "grpc")
    assert not allowed(policies, renamed, pods["triton-llm"], "grpc")
    assert not allowed(policies, pods["orchestrator"], pods["triton-llm"], 8003)


def test_disabled_renders_no_policy_and_the_gateway_policy_follows_the_gateway() -> None:
    assert not policies_of(render_with({"networkPolicy": {"enabled": False}})["docs"])
    no_gateway = policies_of(render_with({"gateway": {"enabled": False}})["docs"])
    assert "vs-vitaserve-gateway" not in {p["metadata"]["name"] for p in no_gateway}
    assert "vs-vitaserve-orchestrator" in {p["metadata"]["name"] for p in no_gateway}
