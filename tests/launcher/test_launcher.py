"""Integration tests of the local Triton launcher against the real `tritonserver` from the wheel.

The fixture repository (tests/launcher/fixtures/) holds a dynamically batched model (`double`), a decoupled
streaming model (`stream`) that records what it did into a trace file, and, in a repository of its own,
a model that fails in `initialize` (`broken`). One server is shared by the session; tests that need their
own server (model subset, stop, broken model, CLI) start one each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from vitaserve.errors import InvalidInput
from vitaserve.triton import launcher
from vitaserve.triton.launcher import (
    TritonLaunchError,
    TritonServer,
    assert_stub_uses_project_venv,
    find_tritonserver,
    group_processes,
)

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures"
REPOSITORY = FIXTURES / "model_repository"
BROKEN_REPOSITORY = FIXTURES / "broken_repository"


@pytest.fixture(scope="session")
def server() -> Iterator[TritonServer]:
    with TritonServer(REPOSITORY, startup_timeout=60) as srv:
        yield srv


@pytest.fixture()
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as cli:
        yield cli


def _double_inputs(x: np.ndarray, module=grpcclient) -> list:
    tensor = module.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _stream_request(n: int, delay_ms: int, trace_dir: Path | None = None, trace_id: str = "") -> dict:
    values = {"N": np.array([n], np.int32), "DELAY_MS": np.array([delay_ms], np.int32)}
    if trace_dir is not None:
        values["TRACE_DIR"] = np.array([str(trace_dir).encode()], np.object_)
        values["TRACE_ID"] = np.array([trace_id.encode()], np.object_)
    inputs = []
    for name, value in values.items():
        dtype = "BYTES" if value.dtype == np.object_ else "INT32"
        tensor = aioclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return {"model_name": "stream", "inputs": inputs}


async def _one(request: dict) -> AsyncIterator[dict]:
    yield request


def _wait_for_file(path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written within {timeout} s"
        time.sleep(0.01)
    return json.loads(path.read_text())


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the server's and stubs' carry the shm prefix)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _shm_objects(prefix: str) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"{prefix}*"))


# --- the shared server ---------------------------------------------------------------------------


def test_ready_on_free_loopback_ports(server: TritonServer, client) -> None:
    ports = [server.ports["http"], server.ports["grpc"], server.ports["metrics"]]
    assert all(port > 0 for port in ports) and len(set(ports)) == 3
    assert server.grpc_url == f"127.0.0.1:{server.ports['grpc']}"
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    assert client.is_server_ready()
    assert client.is_model_ready("double") and client.is_model_ready("stream")
    assert server.pid in group_processes(server.pid)


def test_sync_infer(client) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client.infer("double", _double_inputs(x))
    np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)


def test_dynamic_batching_groups_concurrent_requests(server: TritonServer) -> None:
    async def run() -> list:
        async with aioclient.InferenceServerClient(server.grpc_url) as cli:
            xs = [np.full((1, 4), i, np.float32) for i in range(8)]
            results = await asyncio.gather(*(cli.infer("double", _double_inputs(x, aioclient)) for x in xs))
            return [(x, r.as_numpy("Y"), int(r.as_numpy("BATCH_REQUESTS")[0, 0]))
                    for x, r in zip(xs, results)]

    outcomes = asyncio.run(run())
    for x, y, _ in outcomes:
        np.testing.assert_array_equal(y, 2 * x)
    assert max(batch for _, _, batch in outcomes) > 1, "execute() never received more than one request"


def test_aio_stream_receives_all_responses(server: TritonServer, tmp_path: Path) -> None:
    async def run() -> list[int]:
        async with aioclient.InferenceServerClient(server.grpc_url) as cli:
            tokens = []
            async for result, error in cli.stream_infer(_one(_stream_request(5, 10, tmp_path, "full"))):
                assert error is None, error
                tokens.append(int(result.as_numpy("TOK")[0]))
            return tokens

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]
    trace = _wait_for_file(tmp_path / "full.json", timeout=5)
    assert trace["sent"] == 5 and trace["cancelled_at"] is None


def test_aio_stream_cancel_reaches_model(server: TritonServer, tmp_path: Path) -> None:
    n, delay_ms = 100, 50  # 5 s if never cancelled

    async def run() -> float:
        async with aioclient.InferenceServerClient(server.grpc_url) as cli:
            responses = cli.stream_infer(_one(_stream_request(n, delay_ms, tmp_path, "cancel")))
            received = 0
            async for result, error in responses:
                assert error is None, error
                received += 1
                if received == 3:
                    cancelled_at = time.time()
                    responses.cancel()
                    break
            return cancelled_at

    cancelled_at = asyncio.run(run())
    trace = _wait_for_file(tmp_path / "cancel.json", timeout=3)
    assert trace["cancelled_at"] is not None, trace
    assert 3 <= trace["sent"] < n
    assert trace["cancelled_at"] - cancelled_at < 0.25, "the model saw the cancellation late"

    # The instance is free again: a new stream completes.
    async def again() -> int:
        async with aioclient.InferenceServerClient(server.grpc_url) as cli:
            return len([r async for r, _ in cli.stream_infer(_one(_stream_request(2, 1)))])

    assert asyncio.run(again()) == 2


# --- servers of their own ------------------------------------------------------------------------


def test_models_subset_loads_only_named_and_stop_cleans_up(tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    srv = TritonServer(REPOSITORY, models=["double"], work_dir=work_dir, startup_timeout=60).start()
    pid, prefix = srv.pid, srv.shm_prefix
    assert pid is not None
    try:
        with grpcclient.InferenceServerClient(srv.grpc_url) as cli:
            assert cli.is_model_ready("double")
            assert not cli.is_model_ready("stream")
            index = {m.name: m.state for m in cli.get_model_repository_index().models}
            assert index.get("double") == "READY" and index.get("stream", "") != "READY"
        assert len(group_processes(pid)) >= 2, "expected the server and its stub in one process group"
        assert _shm_objects(prefix), "a running Python backend holds shared-memory regions"
    finally:
        started = time.monotonic()
        srv.stop()
        elapsed = time.monotonic() - started
    assert elapsed < 10
    assert group_processes(pid) == []
    assert _processes_mentioning(prefix) == []
    assert _shm_objects(prefix) == []
    assert not (work_dir / "backends").exists()
    assert (work_dir / "tritonserver.log").is_file(), "a given work_dir keeps the log"
    srv.stop()  # idempotent


def test_broken_model_fails_start_with_log_tail() -> None:
    # The model's failure ends the start at once; the bound only matters on a busy machine.
    srv = TritonServer(BROKEN_REPOSITORY, startup_timeout=300)
    with pytest.raises(TritonLaunchError) as caught:
        srv.start()
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "fixture model 'broken' fails in initialize on purpose" in message
    assert "last log lines" in message
    assert srv.pid is None
    assert _processes_mentioning(srv.shm_prefix) == []
    assert _shm_objects(srv.shm_prefix) == []
    assert srv.work_dir is not None and not srv.work_dir.exists(), "the temporary work dir is removed"


def test_cli_serves_until_sigterm() -> None:
    cmd = [sys.executable, "-m", "vitaserve.triton.launcher", "--model-repository", str(REPOSITORY),
           "--models", "stream"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line: list[str] = []
        reader = threading.Thread(target=lambda: first_line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert first_line and first_line[0].strip(), f"no gRPC URL printed; stderr:\n{proc.stderr.read()}"
        url = first_line[0].strip()
        assert url.startswith("127.0.0.1:")
        with grpcclient.InferenceServerClient(url) as cli:
            assert cli.is_model_ready("stream") and not cli.is_model_ready("double")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- checks that need no server ------------------------------------------------------------------


def test_find_tritonserver() -> None:
    root = find_tritonserver()
    assert os.access(root / "bin" / "tritonserver", os.X_OK)
    assert (root / "backends" / "python" / "libtriton_python.so").is_file()


def test_find_tritonserver_names_missing_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "pytriton" else real_find_spec(name, *args)

    monkeypatch.setattr(launcher.importlib.util, "find_spec", find_spec)
    with pytest.raises(TritonLaunchError, match="nvidia-pytriton"):
        find_tritonserver()


def test_numpy_2_in_model_venv_is_rejected(tmp_path: Path) -> None:
    # An interpreter that sees numpy 2.x: the real one with a fake numpy first on its path.
    (tmp_path / "site" / "numpy").mkdir(parents=True)
    (tmp_path / "site" / "numpy" / "__init__.py").write_text('__version__ = "2.1.0"\n')
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    srv = TritonServer(REPOSITORY, python_executable=str(python))
    with pytest.raises(TritonLaunchError, match=r"numpy 2\.1\.0.*numpy < 2"):
        srv.start()
    assert srv.pid is None


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="'nope' is not in"):
        TritonServer(REPOSITORY, models=["double", "nope"])


def test_stub_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launcher.ENV_EXPECTED_PREFIX, raising=False)
    monkeypatch.delenv(launcher.ENV_EXPECTED_VERSION, raising=False)
    assert_stub_uses_project_venv(platform.python_version())  # the test runs in the project venv
    with pytest.raises(RuntimeError, match="version .* != expected 0.0.1"):
        assert_stub_uses_project_venv("0.0.1")
    monkeypatch.setenv(launcher.ENV_EXPECTED_PREFIX, "/elsewhere")
    with pytest.raises(RuntimeError, match="prefix is not the expected /elsewhere"):
        assert_stub_uses_project_venv()
    monkeypatch.delenv(launcher.ENV_EXPECTED_PREFIX)
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    with pytest.raises(RuntimeError, match="not a venv"):
        assert_stub_uses_project_venv()
