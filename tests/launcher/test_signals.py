"""Programs that start others stop them on SIGTERM and SIGINT, mid-conversation, within seconds, leaving no
process behind (`vitaserve.lifecycle`): the demo, which starts Triton (and its model stubs) and the
orchestrator, both of which run in sessions of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (the demo passes its environment on to
    Triton, the stubs and the orchestrator)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_demo_stops_everything_it_started_mid_conversation(signum: int, tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    marker = f"VITASERVE_SIGNAL_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "vitaserve.demo", "--family", "vita15", "--checkpoint", str(tiny_checkpoint),
         "--out", str(tmp_path / "reply.wav")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 180
        for line in demo.stdout:  # until the first turn's events stream: the conversation is under way
            output.append(line)
            if "turn_started" in line or time.monotonic() > deadline:
                break
        assert any("turn_started" in line for line in output), "".join(output)[-3000:]
        assert len(marked_processes(marker)) >= 3  # the demo's children: Triton, its stubs, the orchestrator
        sent = time.monotonic()
        demo.send_signal(signum)
        rest, _ = demo.communicate(timeout=30)
        stopped_s = time.monotonic() - sent
        output.append(rest)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 128 + signum, "".join(output)[-3000:]
    assert stopped_s < 15, f"took {stopped_s:.1f} s to stop"
    assert "turn 2" not in "".join(output)  # it did not finish the conversation first
    leftover = marked_processes(marker)
    assert not leftover, f"processes left behind: {leftover}"


def test_make_web_stops_the_stack_and_the_gateway_on_sigterm(tiny_checkpoint: Path) -> None:
    """`python -m vitaserve.web` (make web): Triton, the orchestrator and the gateway, stopped by SIGTERM."""
    from vitaserve.stack import free_port

    marker = f"VITASERVE_SIGNAL_TEST={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "PYTHONUNBUFFERED": "1"}
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "vitaserve.web", "--family", "vita15", "--checkpoint", str(tiny_checkpoint),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        assert web.stdout is not None
        for line in web.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(output)
        assert f"http://127.0.0.1:{port}/" in text, text[-3000:]
        assert len(marked_processes(marker)) >= 4  # Triton, its stubs, the orchestrator, the gateway
        sent = time.monotonic()
        web.send_signal(signal.SIGTERM)
        rest, _ = web.communicate(timeout=30)
        stopped_s = time.monotonic() - sent
        output.append(rest)
    finally:
        if web.poll() is None:
            web.kill()
    assert web.returncode == 128 + signal.SIGTERM, "".join(output)[-3000:]
    assert stopped_s < 15, f"took {stopped_s:.1f} s to stop"
    leftover = marked_processes(marker)
    assert not leftover, f"processes left behind: {leftover}"
