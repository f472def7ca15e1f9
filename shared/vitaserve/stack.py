"""A whole local stack in one object: Triton with the model repository, and the orchestrator process.

Used by the embedded default (`python -m vitaserve.demo`), the end-to-end tests and the benchmarks, so all
three run the platform exactly as deployed: real Triton models, a real orchestrator process, real gRPC.

    with LocalStack(checkpoint_dir) as stack:              # VITA-1.5 (tiny or real checkpoint)
        stack.orchestrator_address   # "127.0.0.1:PORT" for vitaserve.client
        stack.triton_url             # "127.0.0.1:PORT" for tritonclient / TritonComponents

    with LocalStack(None, family="small", gateway=True) as stack:
        stack.gateway_url            # "http://127.0.0.1:PORT": the Realtime WebSocket and the browser page

    with LocalStack(None, family="small") as stack: ...    # the small family (weights from packages)

The family is one environment variable, VITASERVE_MODEL_FAMILY, read by the Triton models and the
orchestrator alike, so both sides always serve the same family.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.triton.launcher import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "services" / "triton" / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, *, timeout_s: float, proc: subprocess.Popen | None = None,
                 require_serving: bool = True) -> None:
    """Poll grpc.health.v1 until the server reports SERVING (or answers at all, without `require_serving`);
    raises on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with code {proc.returncode} before serving on {address}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING or not require_serving:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.05)


class ServiceProcess:
    """`python -m <module>` in a session of its own, its output in `log_path`, started by `start()` (which
    returns once `_wait()` says it serves, else stops it and raises with the log's tail) and stopped by pid
    (SIGTERM, then SIGKILL of its group after `stop_timeout_s`)."""

    module = ""
    stop_timeout_s = 20.0

    def __init__(self, env: dict[str, str], *, log_path: Path, startup_timeout_s: float) -> None:
        self._env = env
        self._log_path = log_path
        self._timeout = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def _wait(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self._env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait()
        except BaseException as exc:  # a signal (vitaserve.lifecycle) too: nothing is left running
            self.stop()
            if not isinstance(exc, Exception):
                raise
            tail = self._log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.module} did not start: {exc}\n--- log tail ---\n{tail}") from exc
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float | None = None) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class OrchestratorProcess(ServiceProcess):
    """`python -m vitaserve_orchestrator` on a free loopback port, configured through its environment.
    `wait_ready=False` returns once the server answers health checks, ready or not (its components may be
    down on purpose)."""

    module = "vitaserve_orchestrator"

    def __init__(self, env: dict[str, str], *, log_path: Path, startup_timeout_s: float = 180.0,
                 wait_ready: bool = True) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        super().__init__({**os.environ, **env, "VITASERVE_LISTEN_ADDRESS": self.address}, log_path=log_path,
                         startup_timeout_s=startup_timeout_s)
        self._wait_ready = wait_ready

    def _wait(self) -> None:
        wait_serving(self.address, timeout_s=self._timeout, proc=self.proc, require_serving=self._wait_ready)


def wait_http(url: str, *, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; raises on timeout or if `proc` exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering after {timeout_s:.0f} s")
        time.sleep(0.05)


class GatewayProcess(ServiceProcess):
    """`python -m vitaserve_gateway` (the Realtime WebSocket gateway) on a free loopback port, in front of
    the orchestrator at `orchestrator_address`. `url` is its http://host:port."""

    module = "vitaserve_gateway"
    stop_timeout_s = 10.0

    def __init__(self, orchestrator_address: str, *, log_path: Path, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 90.0, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        super().__init__({**os.environ, **(env or {}), "VITASERVE_GATEWAY_HOST": host,
                          "VITASERVE_GATEWAY_PORT": str(self.port),
                          "VITASERVE_GATEWAY_ORCHESTRATOR_ADDRESS": orchestrator_address},
                         log_path=log_path, startup_timeout_s=startup_timeout_s)

    def _wait(self) -> None:
        wait_http(f"{self.url}/healthz", timeout_s=self._timeout, proc=self.proc)


class LocalStack:
    """Triton (the four models, or `models`) + the orchestrator, for one model family and its checkpoint
    directory (None: the family needs none, e.g. small, whose LLM cache is then the default one)."""

    def __init__(self, checkpoint_dir: str | Path | None, *, family: str = "vita15",
                 models: list[str] | None = None, orchestrator: bool = True,
                 work_dir: str | Path | None = None, orchestrator_env: dict[str, str] | None = None,
                 gateway: bool = False, gateway_env: dict[str, str] | None = None,
                 gateway_port: int | None = None, gateway_host: str = "127.0.0.1") -> None:
        self.family = family
        self.checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None
        self._own_tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="vitaserve-stack-")
        self.work_dir = Path(work_dir) if work_dir else Path(self._own_tmp.name)  # type: ignore[union-attr]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.triton = TritonServer(MODEL_REPOSITORY, models=models, work_dir=self.work_dir / "triton",
                                   log_path=self.work_dir / "triton.log",
                                   env={"VITASERVE_MODEL_FAMILY": family,
                                        "VITASERVE_CHECKPOINT_DIR": str(self.checkpoint_dir or ""),
                                        # four model processes share this host's cores: one torch
                                        # thread each avoids OpenMP pools spinning against each other
                                        "VITASERVE_CPU_THREADS": os.environ.get("VITASERVE_CPU_THREADS", "1")})
        self._with_orchestrator = orchestrator
        self._orchestrator_env = orchestrator_env or {}
        self.orchestrator: OrchestratorProcess | None = None
        self._gateway_args = (gateway_env or {}, gateway_port, gateway_host) if gateway else None
        self.gateway: GatewayProcess | None = None

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None, "started without the gateway"
        return self.gateway.url

    @property
    def triton_url(self) -> str:
        return self.triton.grpc_url

    @property
    def orchestrator_address(self) -> str:
        assert self.orchestrator is not None, "started without the orchestrator"
        return self.orchestrator.address

    def start(self) -> "LocalStack":
        self.triton.start()
        if self._with_orchestrator:
            try:
                env = {"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": self.triton_url,
                       "VITASERVE_MODEL_FAMILY": self.family, **self._orchestrator_env}
                self.orchestrator = OrchestratorProcess(env, log_path=self.work_dir / "orchestrator.log").start()
                if self._gateway_args is not None:
                    gw_env, gw_port, gw_host = self._gateway_args
                    self.gateway = GatewayProcess(self.orchestrator.address, env=gw_env, port=gw_port,
                                                  host=gw_host, log_path=self.work_dir / "gateway.log").start()
            except BaseException:  # a signal (vitaserve.lifecycle) too: nothing is left running
                if self.orchestrator is not None:
                    self.orchestrator.stop()
                self.triton.stop()
                raise
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.orchestrator is not None:
            self.orchestrator.stop()
        self.triton.stop()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
