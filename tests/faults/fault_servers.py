"""Helpers of the fault tests (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitaserve.faults import KillableTriton
from vitaserve.stack import OrchestratorProcess


@dataclass
class Tritons:
    base: KillableTriton  # the four models
    llm: KillableTriton  # llm_decoder only

    def ensure_running(self) -> None:
        """Bring back whatever an earlier test killed (same ports)."""
        for triton in (self.base, self.llm):
            if not triton.running():
                triton.restart()


def orchestrator(work: Path, name: str, llm_urls: str, base_url: str, **env: str) -> OrchestratorProcess:
    """An orchestrator whose LLM calls go to `llm_urls` (one `host:port` or a static list) and the other
    components to `base_url`; a 0.5 s component health poll, so recovery is seen quickly."""
    return OrchestratorProcess({"VITASERVE_BACKEND": "triton", "VITASERVE_MODEL_FAMILY": "vita15",
                                "VITASERVE_TRITON_URL": base_url, "VITASERVE_LLM_DECODER_URL": llm_urls,
                                "VITASERVE_HEALTH_POLL_S": "0.5", **env},
                               log_path=work / f"orchestrator-{name}.log").start()
