"""`vitaserve cluster status`: each component's ready Triton pods and whether each pod's model is ready.

    vitaserve cluster status                       # discovery configured as the orchestrator's (VITASERVE_*)
    vitaserve cluster status --namespace ml --triton-service vitaserve-triton
    vitaserve cluster status --service llm_decoder=vitaserve-triton-llm --service ...   [--kubeconfig F]
    vitaserve cluster status --url llm_decoder=10.0.0.5:8001,10.0.0.6:8001              # static list
    vitaserve cluster status --json

Without flags it reads the orchestrator's own settings (`VITASERVE_DISCOVERY`, `VITASERVE_*_SERVICE`,
`VITASERVE_*_URL`), so `kubectl exec deploy/<release>-orchestrator -- vitaserve cluster status` shows what
that orchestrator routes to. Exit code 0 when every component has a pod whose model is ready, 1 otherwise,
2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from vitaserve.cluster.discovery import (
    Discovery,
    KubernetesDiscovery,
    StaticDiscovery,
    default_api_client,
    pod_namespace,
)
from vitaserve.cluster.routing import Router
from vitaserve.components.base import COMPONENTS


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        component, sep, target = value.partition("=")
        if not sep or component not in COMPONENTS or not target:
            raise ValueError(f"{flag} wants COMPONENT=VALUE with COMPONENT one of {', '.join(COMPONENTS)}, "
                             f"got {value!r}")
        pairs[component] = target
    return pairs


def build_discovery(args: argparse.Namespace) -> Discovery:
    """Discovery from the flags, else from the orchestrator's settings."""
    services = _pairs(args.service, "--service")
    urls = _pairs(args.url, "--url")
    if args.triton_service:
        services = {name: services.get(name, args.triton_service) for name in COMPONENTS}
    if services and urls:
        raise ValueError("use --service/--triton-service or --url, not both")
    if urls:
        return StaticDiscovery(urls)
    if not services:
        from vitaserve_orchestrator.settings import OrchestratorSettings

        settings = OrchestratorSettings()
        if settings.discovery == "static":
            return StaticDiscovery(settings.component_urls())
        services = settings.component_services()
        args.namespace = args.namespace or settings.kubernetes_namespace
    api_client = default_api_client(args.kubeconfig, args.context) if args.api_client is None else args.api_client
    return KubernetesDiscovery(services, namespace=args.namespace or pod_namespace(), api_client=api_client)


async def collect(discovery: Discovery, timeout_s: float) -> dict[str, Any]:
    """{component: {"source": ..., "pods": [{"pod", "endpoint", "model_ready"}], "ready": bool}}."""
    from vitaserve.components.triton import TritonComponents

    client = TritonComponents(router=Router(discovery), components=discovery.components,
                              health_timeout_s=timeout_s)
    try:
        checks = await client.endpoint_health()
    finally:
        await client.close()
    report = {}
    for component in discovery.components:
        pods = [{"pod": e.name, "endpoint": e.url, "model_ready": checks[component].get(e.url, False)}
                for e in discovery.endpoints(component)]
        report[component] = {"source": discovery.describe(component), "pods": pods,
                             "ready": any(p["model_ready"] for p in pods)}
    return report


def render(report: dict[str, Any]) -> str:
    lines = []
    for component, info in report.items():
        lines.append(f"{component}: {'READY' if info['ready'] else 'NOT READY'} ({info['source']})")
        if not info["pods"]:
            lines.append("  no ready pod")
            continue
        width = max(len(p["pod"]) for p in info["pods"])
        for pod in info["pods"]:
            state = "model ready" if pod["model_ready"] else "model NOT ready"
            lines.append(f"  {pod['pod']:<{width}}  {pod['endpoint']:<22}  {state}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, api_client: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="vitaserve cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="ready pods per component and their model readiness")
    status.add_argument("--namespace", default=None, help="namespace of the Triton Services")
    status.add_argument("--triton-service", default=None, help="one Service serving every component")
    status.add_argument("--service", action="append", default=[], metavar="COMPONENT=SERVICE")
    status.add_argument("--url", action="append", default=[], metavar="COMPONENT=HOST:PORT[,HOST:PORT]",
                        help="a static list instead of Kubernetes discovery")
    status.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster or ~/.kube)")
    status.add_argument("--context", default=None, help="kubeconfig context")
    status.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the endpoint lists")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds per model readiness check")
    status.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    args.api_client = api_client  # tests point the real client at an emulator
    try:
        discovery = build_discovery(args)
    except Exception as exc:  # noqa: BLE001 - configuration errors of every kind end here with code 2
        print(f"vitaserve cluster: {exc}", file=sys.stderr)
        return 2
    discovery.start()
    try:
        if not discovery.wait_synced(args.wait):
            print(f"vitaserve cluster: endpoint lists not read within {args.wait:g} s", file=sys.stderr)
            return 1
        report = asyncio.run(collect(discovery, args.timeout))
    finally:
        discovery.stop()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if all(info["ready"] for info in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
