"""Several orchestrator replicas sharing one Redis session store, in front of one Triton: the deployment
shape behind a load balancer, as processes on loopback ports (tests and benchmarks).

    with RedisServer() as redis, ReplicaSet(triton_url, redis_url=redis.url, work_dir=d) as replicas:
        replicas.address(0), replicas.address(1)
        replicas.kill(0)        # SIGKILL, as a node failure
        replicas.restart(0)     # a fresh process (new port)

Every replica runs `python -m vitaserve_orchestrator` (vitaserve.stack.OrchestratorProcess) with
`VITASERVE_SESSION_STORE=redis` and the given extra environment; each is stopped by its pid.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from vitaserve.stack import OrchestratorProcess


class ReplicaSet:
    """N orchestrator processes sharing `redis_url` (see the module docstring)."""

    def __init__(self, triton_url: str, *, redis_url: str, work_dir: str | Path, replicas: int = 2,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 90.0) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            "VITASERVE_BACKEND": "triton",
            "VITASERVE_TRITON_URL": triton_url,
            "VITASERVE_SESSION_STORE": "redis",
            "VITASERVE_REDIS_URL": redis_url,
            **(env or {}),
        }
        self._timeout = startup_timeout_s
        self._count = replicas
        self._started = 0
        self.procs: list[OrchestratorProcess] = []

    def _new(self) -> OrchestratorProcess:
        self._started += 1
        return OrchestratorProcess(self.env, log_path=self.work_dir / f"orchestrator-{self._started}.log",
                                   startup_timeout_s=self._timeout)

    def start(self) -> ReplicaSet:
        try:
            for _ in range(self._count):
                self.procs.append(self._new().start())
        except Exception:
            self.stop()
            raise
        return self

    def address(self, i: int) -> str:
        return self.procs[i].address

    def alive(self, i: int) -> bool:
        proc = self.procs[i].proc
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL replica `i`: no drain, no final save, its stream leases left behind."""
        proc = self.procs[i].proc
        assert proc is not None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, i: int) -> None:
        """Replace replica `i` (killed or not) with a fresh process."""
        self.procs[i].stop()
        self.procs[i] = self._new().start()

    def ensure_running(self) -> None:
        for i in range(len(self.procs)):
            if not self.alive(i):
                self.restart(i)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
