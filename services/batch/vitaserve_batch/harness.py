"""Real processes for tests and benchmarks: a Redis server, Celery workers and celery beat, on free ports.

Each is a subprocess in its own process group, started from this interpreter and stopped by its pid:
`stop()` sends SIGTERM to the group and waits, `kill()` sends SIGKILL to the group (a worker and its
prefork children die at once, as on a node loss).

    with RedisServer() as redis_srv:
        env = batch_env(redis_srv.url, triton_url, queue="q1", visibility_timeout_s=4)
        with CeleryWorker(env, concurrency=1) as worker:
            ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from collections.abc import Callable
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A subprocess in its own session (process group = its pid), logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.cmd, self.env, self.log_path = cmd, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Any:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child, closed after spawning
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the group (warm shutdown), then SIGKILL after `timeout_s`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole group (the process and every child), and reap."""
        if self.proc is None:
            return
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class RedisServer(_Process):
    """`redis-server` in the foreground on a free loopback port, no persistence."""

    def __init__(self, work_dir: Path | None = None, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port or free_port()
        self.work_dir = work_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"vitaserve-redis-{self.port}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.work_dir)]
        super().__init__(cmd, dict(os.environ), self.work_dir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        super().start()
        deadline = time.monotonic() + 20
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                pass
            if not self.running() or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)


def batch_env(redis_url: str, triton_url: str | None, *, queue: str | None = None,
              **settings: Any) -> dict[str, str]:
    """The environment of a batch worker/beat/CLI: this process's environment, no inherited
    VITASERVE_BATCH_* variables, and the given settings as VITASERVE_BATCH_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_BATCH_")}
    env["VITASERVE_BATCH_REDIS_URL"] = redis_url
    env["VITASERVE_BATCH_QUEUE"] = queue or f"batch-{uuid.uuid4().hex[:8]}"
    if triton_url:
        env["VITASERVE_BATCH_TRITON_URL"] = triton_url
    for name, value in settings.items():
        env[f"VITASERVE_BATCH_{name.upper()}"] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class CeleryWorker(_Process):
    """`celery -A vitaserve_batch.app worker` (prefork, `concurrency` processes) on the env's queue."""

    def __init__(self, env: dict[str, str], *, log_path: Path, concurrency: int = 1, pool: str = "prefork",
                 name: str | None = None) -> None:
        self.name = name or f"w{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "celery", "-A", "vitaserve_batch.app", "worker", f"--pool={pool}",
               f"--concurrency={concurrency}", "-Q", env["VITASERVE_BATCH_QUEUE"], "-n", f"{self.name}@%h",
               "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        super().__init__(cmd, env, log_path)

    def pool_pids(self) -> list[int]:
        """PIDs of the worker's prefork pool processes (its children), read from /proc."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:  # fields after the command: state, ppid, ...
                children.append(int(stat.parent.name))
        return sorted(children)

    def wait_ready(self, timeout_s: float = 60.0) -> CeleryWorker:
        """Wait for the worker's 'ready' log line."""
        deadline = time.monotonic() + timeout_s
        while "ready." not in self.log_tail(200):
            if not self.running():
                raise RuntimeError(f"celery worker exited (rc {self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"celery worker not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        return self


class CeleryBeat(_Process):
    """`celery -A vitaserve_batch.app beat` with its schedule state in `work_dir`."""

    def __init__(self, env: dict[str, str], *, work_dir: Path, max_interval_s: float = 1.0) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "vitaserve_batch.app", "beat", "--loglevel=INFO",
               "-s", str(work_dir / "celerybeat-schedule"), f"--max-interval={max_interval_s:g}",
               "--pidfile", str(work_dir / "beat.pid")]
        super().__init__(cmd, env, work_dir / "beat.log")


def write_manifest(path: Path, lines: list[Any]) -> Path:
    """Manifest lines: dicts are dumped as JSON, strings written as they are (for bad lines)."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, *,
             on_timeout: Callable[[], str] = str, interval_s: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(interval_s)
