"""Run a local Triton server whose Python-backend models use the project's venv.

The `tritonserver` 2.51 binary bundled in the `nvidia-pytriton` wheel runs in place from site-packages.
What it needs to serve Python-backend models (see shared/TRITON.md, where every step was verified):

- a backend directory holding three symlinks into the wheel (the wheel ships the stub apart from the
  backend, so `--backend-directory=<wheel>/backends` alone fails; site-packages is never modified);
- `PATH=<venv>/bin:$PATH`: the stub starts an isolated interpreter named `python3`, looked up in PATH,
  and that executable decides `sys.prefix` (PYTHONPATH/PYTHONHOME are ignored by the stub);
- `LD_LIBRARY_PATH=<interpreter's sysconfig LIBDIR>`: otherwise the stub may load the system's libpython
  of the same minor version and silently run a mismatched interpreter;
- numpy < 2 in that venv, because the stub imports it before `model.py` runs;
- a unique `shm-region-prefix-name`, so concurrent servers never share `/dev/shm` objects.

`TritonServer` does all of that, picks free ports, waits for `/v2/health/ready`, and on `stop()` leaves no
process, shared-memory object or temporary directory behind. Models call `assert_stub_uses_project_venv()`
in `initialize` so a wrong interpreter fails the load loudly instead of misbehaving.

CLI: `python -m vitaserve.triton.launcher --model-repository DIR [--models a,b] [--grpc-port N] ...`
runs in the foreground until SIGINT/SIGTERM and prints the gRPC URL on stdout once the server is ready.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vitaserve.errors import InvalidInput, VitaserveError

# Set in the server's environment (inherited by every stub) and read by assert_stub_uses_project_venv().
ENV_EXPECTED_PREFIX = "VITASERVE_TRITON_PYTHON_PREFIX"
ENV_EXPECTED_VERSION = "VITASERVE_TRITON_PYTHON_VERSION"

LOG_TAIL_LINES = 40
_POLL_INTERVAL_S = 0.05
_SHM_DIR = Path("/dev/shm")
# How long stubs may outlive the server after a clean exit before the process group is killed.
_GROUP_GRACE_S = 5.0
_STUB_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")

_PROBE_SCRIPT = """
import json, platform, sys, sysconfig
try:
    import numpy
    numpy_version, numpy_error = numpy.__version__, None
except Exception as exc:
    numpy_version, numpy_error = None, f"{type(exc).__name__}: {exc}"
print(json.dumps({
    "prefix": sys.prefix, "base_prefix": sys.base_prefix, "version": platform.python_version(),
    "libdir": sysconfig.get_config_var("LIBDIR"), "numpy_version": numpy_version, "numpy_error": numpy_error,
}))
"""


class TritonLaunchError(VitaserveError, RuntimeError):
    """The local Triton server could not be found, configured or started; the message says what is
    missing or quotes the tail of the server log."""

    code = "UNAVAILABLE"


# --------------------------------------------------------------------------------------------------
# Locating the binary and checking the interpreter the stubs will run


def find_tritonserver() -> Path:
    """Return the root of the Triton install bundled in the `nvidia-pytriton` wheel (the directory that
    holds `bin/tritonserver`, `backends/`, `caches/` and `python_backend_stubs/`).

    Looks in the running interpreter's site-packages without importing `pytriton`.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError(
            f"the 'pytriton' package is not installed for {sys.executable}; "
            "install the nvidia-pytriton wheel (pip install nvidia-pytriton), which bundles tritonserver"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonLaunchError(
            f"the installed nvidia-pytriton wheel has no executable {binary}; reinstall nvidia-pytriton"
        )
    return root


@dataclass(frozen=True)
class Interpreter:
    """Facts about the Python interpreter whose environment the model stubs will use."""

    executable: str
    prefix: str
    base_prefix: str
    version: str  # e.g. "3.11.7"
    libdir: str
    numpy_version: str

    @property
    def minor_version(self) -> str:
        """"3.11" for "3.11.7": the name of the matching stub directory in the wheel."""
        return ".".join(self.version.split(".")[:2])

    @property
    def bin_dir(self) -> Path:
        return Path(self.prefix) / "bin"


def probe_interpreter(python_executable: str) -> Interpreter:
    """Run `python_executable` once to learn its prefix, version, LIBDIR and numpy version.

    Raises TritonLaunchError if it cannot run, has no numpy, or has numpy >= 2 (the stub imports the
    interpreter's numpy, and the 2.51 stub is built against numpy 1.x).
    """
    try:
        done = subprocess.run(
            [python_executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=120, check=False
        )
    except OSError as exc:
        raise TritonLaunchError(f"cannot run the model interpreter {python_executable!r}: {exc}") from exc
    if done.returncode != 0:
        raise TritonLaunchError(
            f"the model interpreter {python_executable!r} failed (rc {done.returncode}): "
            f"{done.stderr.strip()}"
        )
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if facts["numpy_version"] is None:
        raise TritonLaunchError(
            f"numpy cannot be imported by {python_executable} ({facts['numpy_error']}); the Triton Python "
            "backend stub imports that interpreter's numpy: install 'numpy<2' into it"
        )
    if int(facts["numpy_version"].split(".")[0]) >= 2:
        raise TritonLaunchError(
            f"{python_executable} has numpy {facts['numpy_version']}, but the Triton Python backend stub "
            "imports that interpreter's numpy and needs numpy < 2: install 'numpy<2' into it"
        )
    return Interpreter(
        executable=python_executable,
        prefix=facts["prefix"],
        base_prefix=facts["base_prefix"],
        version=facts["version"],
        libdir=facts["libdir"] or "",
        numpy_version=facts["numpy_version"],
    )


def assert_stub_uses_project_venv(expected_version: str | None = None) -> None:
    """Raise RuntimeError unless this process runs inside the venv the launcher configured.

    Call first thing in a Python-backend model's `initialize`, so a server started without the
    launcher's environment fails the load with a clear message. Checks that `sys.prefix` is a venv, and,
    when known, that the interpreter version is `expected_version` (default: the version the launcher
    recorded in the environment) and that the prefix is the launcher's venv. A version mismatch means the
    stub loaded a different libpython than the venv's interpreter (LD_LIBRARY_PATH not set).
    """
    expected_version = expected_version or os.environ.get(ENV_EXPECTED_VERSION)
    expected_prefix = os.environ.get(ENV_EXPECTED_PREFIX)
    problems = []
    if sys.prefix == sys.base_prefix:
        problems.append("sys.prefix equals sys.base_prefix (not a venv; PATH does not start with <venv>/bin)")
    if expected_version and platform.python_version() != expected_version:
        problems.append(
            f"version {platform.python_version()} != expected {expected_version} "
            "(LD_LIBRARY_PATH does not point at the interpreter's own libpython)"
        )
    if expected_prefix and os.path.realpath(sys.prefix) != os.path.realpath(expected_prefix):
        problems.append(f"prefix is not the expected {expected_prefix}")
    if problems:
        raise RuntimeError(
            f"stub interpreter is not the project venv: {'; '.join(problems)} "
            f"[prefix={sys.prefix} executable={sys.executable} version={sys.version.split()[0]}]"
        )


# --------------------------------------------------------------------------------------------------
# Process-group and port helpers


def group_processes(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group `pgid`, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _free_ports(address: str, count: int) -> list[int]:
    """`count` distinct ports that are free on `address` right now (all sockets held until chosen)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class _PortInUse(Exception):
    """An automatically chosen port was taken between choosing it and the server binding it."""


# --------------------------------------------------------------------------------------------------
# The server


class TritonServer:
    """A local `tritonserver` process serving `model_repository` (context manager).

    models: load only these models (`--model-control-mode=explicit`); None loads the whole repository.
    work_dir: holds the backend directory and, by default, the log; a temporary directory (removed by
        `stop()`) if None.
    http_port / grpc_port / metrics_port: 0 picks a free port on `address`.
    python_executable: the interpreter whose environment (its venv) the model stubs use.
    log_path: server stdout+stderr; `<work_dir>/tritonserver.log` if None.
    exit_timeout: `--exit-timeout-secs`, how long Triton waits for in-flight requests on SIGTERM.
    extra_args: appended to the tritonserver command line.
    env: extra environment variables for the server and its model stubs (e.g. VITASERVE_CHECKPOINT_DIR).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        models: Sequence[str] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        address: str = "127.0.0.1",
        python_executable: str = sys.executable,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
        exit_timeout: int = 10,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.models = None if models is None else list(models)
        self._validate_models()
        self._requested_ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports = dict(self._requested_ports)
        self.address = address
        self.python_executable = python_executable
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self._given_work_dir = None if work_dir is None else Path(work_dir)
        self._given_log_path = None if log_path is None else Path(log_path)
        self.work_dir: Path | None = None
        self.log_path: Path | None = None
        self.shm_prefix = f"vitaserve{os.getpid()}_{secrets.token_hex(4)}_"
        self._proc: subprocess.Popen[bytes] | None = None
        self._owns_work_dir = False

    def _validate_models(self) -> None:
        if not self.model_repository.is_dir():
            raise InvalidInput(f"model repository {self.model_repository} is not a directory")
        for name in self.models or ():
            if not (self.model_repository / name).is_dir():
                available = sorted(p.name for p in self.model_repository.iterdir() if p.is_dir())
                raise InvalidInput(
                    f"model {name!r} is not in {self.model_repository} (available: {', '.join(available)})"
                )

    # ---- addresses -------------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def grpc_url(self) -> str:
        """`host:port` for `tritonclient.grpc` (no scheme)."""
        return f"{self._client_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        """`http://host:port` of the KServe v2 HTTP endpoint."""
        return f"http://{self._client_host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        """PID of the server process (also its process-group id), None before start()."""
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "" if self.log_path is None else _read_tail(self.log_path, lines)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> TritonServer:
        """Start the server and block until `/v2/health/ready` returns 200 (all loaded models ready).

        Raises TritonLaunchError (a RuntimeError) with the last log lines if the process exits or does
        not become ready within `startup_timeout`; everything started is cleaned up first.
        """
        if self._proc is not None:
            raise TritonLaunchError("this TritonServer was already started")
        root = find_tritonserver()
        interpreter = probe_interpreter(self.python_executable)
        self._prepare_work_dir()
        atexit.register(self.stop)
        try:
            backends = self._make_backend_dir(root, interpreter)
            self._launch(self._command_base(root, backends), self._environment(interpreter))
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server, wait up to `timeout` s (then SIGKILL its whole process group), make sure
        no stub outlives it, and remove its `/dev/shm` objects, backend dir and temporary work dir.
        Safe to call more than once."""
        atexit.unregister(self.stop)
        if self._proc is not None:
            self._terminate(timeout)
        self._remove_shm()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir / "backends", ignore_errors=True)
            if self._owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- start helpers -------------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        if self._given_work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="vitaserve-triton-"))
            self._owns_work_dir = True
        else:
            self.work_dir = self._given_work_dir.resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._given_log_path or self.work_dir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _make_backend_dir(self, root: Path, interpreter: Interpreter) -> Path:
        """`<work_dir>/backends/python/` = the wheel's backend library and utils + the stub built for the
        model interpreter's Python minor version, all as symlinks."""
        stubs = root / "python_backend_stubs"
        stub = stubs / interpreter.minor_version / "triton_python_backend_stub"
        if not stub.is_file():
            available = sorted(p.name for p in stubs.iterdir() if (p / stub.name).is_file())
            raise TritonLaunchError(
                f"the nvidia-pytriton wheel has no Python backend stub for Python "
                f"{interpreter.minor_version} ({interpreter.executable}); "
                f"it has stubs for: {', '.join(available)}"
            )
        if not (interpreter.bin_dir / "python3").exists():
            raise TritonLaunchError(
                f"{interpreter.bin_dir / 'python3'} does not exist; the stub looks up 'python3' in PATH"
            )
        assert self.work_dir is not None
        python_dir = self.work_dir / "backends" / "python"
        shutil.rmtree(python_dir, ignore_errors=True)
        python_dir.mkdir(parents=True)
        for target in [root / "backends" / "python" / name for name in _STUB_FILES] + [stub]:
            (python_dir / target.name).symlink_to(target)
        return python_dir.parent

    def _environment(self, interpreter: Interpreter) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env["PATH"] = os.pathsep.join(p for p in (str(interpreter.bin_dir), env.get("PATH", "")) if p)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (interpreter.libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env[ENV_EXPECTED_PREFIX] = interpreter.prefix
        env[ENV_EXPECTED_VERSION] = interpreter.version
        return env

    def _choose_ports(self) -> None:
        auto = [name for name, port in self._requested_ports.items() if port == 0]
        self.ports = dict(self._requested_ports)
        self.ports.update(zip(auto, _free_ports(self.address, len(auto))))

    def _command_base(self, root: Path, backends: Path) -> list[str]:
        """The command line without the port options (those change when a launch is retried)."""
        cmd = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={root / 'caches'}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--allow-gpu-metrics=false",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.models]
        return cmd + self.extra_args

    def _launch(self, base_cmd: list[str], env: dict[str, str]) -> None:
        """Spawn and wait for readiness; retry with new ports if an automatically chosen one was taken
        by someone else in the meantime."""
        attempts = 3 if any(port == 0 for port in self._requested_ports.values()) else 1
        tail = ""
        for _ in range(attempts):
            self._choose_ports()
            port_args = [
                f"--{kind}-{key}={value}"
                for kind in ("http", "grpc", "metrics")
                for key, value in (("address", self.address), ("port", self.ports[kind]))
            ]
            self._spawn(base_cmd + port_args, env)
            try:
                self._wait_ready()
                return
            except _PortInUse:
                tail = self.log_tail()
                self._terminate(timeout=10)
        raise TritonLaunchError(f"ports kept being taken during {attempts} launches; last log lines:\n{tail}")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        assert self.log_path is not None
        with self.log_path.open("wb") as log:
            # Own session = own process group: the stubs (children of the server) can be found and
            # killed as a group, and a Ctrl-C in the caller's terminal does not reach them directly.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = self.log_tail()
                if "already in use" in tail and any(p == 0 for p in self._requested_ports.values()):
                    raise _PortInUse()
                raise TritonLaunchError(
                    f"tritonserver exited with code {rc} before becoming ready "
                    f"(log {self.log_path}); last log lines:\n{tail}"
                )
            if _is_ready(url):
                return
            if time.monotonic() > deadline:
                raise TritonLaunchError(
                    f"tritonserver was not ready after {self.startup_timeout:.0f} s "
                    f"(log {self.log_path}); last log lines:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    # ---- stop helpers --------------------------------------------------------------------------

    def _terminate(self, timeout: float) -> None:
        """Stop the server gracefully, then make sure its whole process group is gone."""
        proc = self._proc
        assert proc is not None
        pgid = proc.pid  # start_new_session makes the server its group leader
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(pgid)
                proc.wait()
        deadline = time.monotonic() + _GROUP_GRACE_S
        while group_processes(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        if group_processes(pgid):
            _kill_group(pgid)
            while group_processes(pgid) and time.monotonic() < deadline + _GROUP_GRACE_S:
                time.sleep(_POLL_INTERVAL_S)
        self._proc = None

    def _remove_shm(self) -> None:
        # The prefix is unique to this server, so only its own objects match (a SIGKILLed server
        # leaves its regions behind).
        for path in _SHM_DIR.glob(f"{self.shm_prefix}*"):
            path.unlink(missing_ok=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vitaserve.triton.launcher",
        description="Run a local Triton server (from the nvidia-pytriton wheel) in the foreground until "
        "SIGINT/SIGTERM. Prints the gRPC URL (host:port) on stdout once all loaded models are ready.",
    )
    parser.add_argument("--model-repository", required=True, help="Triton model repository directory")
    parser.add_argument("--models", default=None, help="comma-separated models to load (default: all)")
    parser.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--http-port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--metrics-port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose venv the models use")
    parser.add_argument("--work-dir", default=None, help="backend dir and log (default: a temp dir)")
    parser.add_argument("--log-path", default=None, help="server log file (default: in the work dir)")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for ready")
    return parser.parse_args(argv)


class _Interrupted(Exception):
    """SIGINT/SIGTERM arrived while the server was starting."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    # While starting, a signal unwinds start(), which stops what it began (the server runs in its own
    # session, so the default SIGTERM action would orphan it); once ready, it only ends the wait below.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        server = TritonServer(
            args.model_repository, models=models, grpc_port=args.grpc_port, http_port=args.http_port,
            metrics_port=args.metrics_port, address=args.address, python_executable=args.python,
            work_dir=args.work_dir, log_path=args.log_path, startup_timeout=args.startup_timeout,
        )
        server.start()
    except (TritonLaunchError, InvalidInput) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except _Interrupted as exc:
        print(f"interrupted by {exc} while starting", file=sys.stderr, flush=True)
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        print(server.grpc_url, flush=True)
        print(
            f"tritonserver ready: pid={server.pid} grpc={server.grpc_url} http={server.http_url} "
            f"metrics={server.metrics_url} log={server.log_path}",
            file=sys.stderr, flush=True,
        )
        while not stopping.wait(0.5):
            if not server.is_running():
                print(f"error: tritonserver exited unexpectedly; last log lines:\n{server.log_tail()}",
                      file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
