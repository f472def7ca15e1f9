"""Builds the `ComponentClient` the settings ask for (Triton URLs or Kubernetes discovery, or the models in
this process)."""

from __future__ import annotations

from vitaserve.components.base import ComponentClient
from vitaserve_orchestrator.settings import OrchestratorSettings


def build_components(config: OrchestratorSettings) -> ComponentClient:
    """`TritonComponents` over the per-component URLs, or `InProcessComponents` loading the checkpoint
    (blocking: loads every model). Imported lazily so each deployment needs only its backend's deps."""
    if config.backend == "triton":
        from vitaserve.cluster.routing import Router
        from vitaserve.components.triton import TritonComponents

        if config.discovery == "kubernetes":
            from vitaserve.cluster.discovery import KubernetesDiscovery, pod_namespace

            discovery = KubernetesDiscovery(
                config.component_services(),
                namespace=config.kubernetes_namespace or pod_namespace(),
                port_name=config.triton_port_name,
                watch_timeout_s=config.discovery_watch_timeout_s,
            )
            discovery.start()  # watcher threads; stopped by TritonComponents.close()
        else:
            from vitaserve.cluster.discovery import StaticDiscovery

            discovery = StaticDiscovery(config.component_urls())
        return TritonComponents(
            router=Router(discovery, vnodes=config.routing_vnodes),
            timeout_s=config.encode_timeout_s,
            first_response_timeout_s=config.first_token_timeout_s,
        )
    from vitaserve.components.inprocess import InProcessComponents

    # the settings checked that the family has the checkpoint it needs
    return InProcessComponents(config.checkpoint_dir, family=config.model_family)
