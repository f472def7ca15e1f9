"""Builds the `ComponentClient` the settings ask for (Triton URLs, or the models in this process)."""

from __future__ import annotations

from vitaserve.components.base import ComponentClient
from vitaserve_orchestrator.settings import OrchestratorSettings


def build_components(config: OrchestratorSettings) -> ComponentClient:
    """`TritonComponents` over the per-component URLs, or `InProcessComponents` loading the checkpoint
    (blocking: loads every model). Imported lazily so each deployment needs only its backend's deps."""
    if config.backend == "triton":
        from vitaserve.components.triton import TritonComponents

        return TritonComponents(
            config.component_urls(),
            timeout_s=config.encode_timeout_s,
            first_response_timeout_s=config.first_token_timeout_s,
        )
    from vitaserve.components.inprocess import InProcessComponents

    assert config.checkpoint_dir is not None  # checked by the settings
    return InProcessComponents(config.checkpoint_dir)
