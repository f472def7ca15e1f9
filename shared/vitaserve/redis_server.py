"""A local `redis-server` process on a free loopback port, for tests, benchmarks and local stacks.

    with RedisServer() as redis:
        redis.url          # "redis://127.0.0.1:PORT/0"
        redis.kill()       # SIGKILL: an outage
        redis.start()      # the same port again (a restart; no persistence: the data is gone)

The server runs in the foreground of its own process group and is stopped by its pid, never by name.
No persistence (`--save ''`, no AOF): state lives as long as the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One redis-server process (see the module docstring)."""

    def __init__(self, port: int | None = None, *, work_dir: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), startup_timeout_s: float = 10.0) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed: `make sysdeps` installs it (Debian: apt-get install -y redis-server)"
            )
        self._binary = binary
        self.port = port or _free_port()
        self._own_tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="vitaserve-redis-")
        self.work_dir = Path(work_dir) if work_dir else Path(self._own_tmp.name)  # type: ignore[union-attr]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._extra = extra_args
        self._timeout = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        log_path = self.work_dir / "redis.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in _reap
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.work_dir), "--daemonize", "no", *self._extra]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self._timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n"
                                   + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.02)
        return self

    def ping(self, timeout_s: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: Redis disappears at once, as in a crash."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
