"""The gateway image (services/gateway/Dockerfile) agrees with the chart and the code: it runs as the chart's
numeric user, exposes the settings' port and starts `python -m vitaserve_gateway`; and its HEALTHCHECK and the
compose healthcheck, run against the real gateway process (plain and TLS), pass while it serves and fail once
SIGTERM has stopped it, which it does cleanly and promptly with no session open."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from vitaserve.stack import free_port
from vitaserve_gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "services" / "gateway" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", "", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def runtime_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def healthcheck_command() -> list[str]:
    (args,) = [a for op, a in runtime_stage() if op == "HEALTHCHECK"]
    return json.loads(args.split(" CMD ", 1)[1])


def compose_healthcheck(port: int) -> list[str]:
    """The compose file's gateway healthcheck (its x-gateway anchor), moved to `port`."""
    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-gateway"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [arg.replace(":8080/", f":{port}/") for arg in test[1:]]


def run_check(command: list[str], env: dict[str, str]) -> int:
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30, capture_output=True,
                          check=False).returncode


def test_image_matches_the_chart_and_the_settings() -> None:
    stage = dict(runtime_stage())
    values = yaml.safe_load((ROOT / "helm" / "vitaserve" / "values.yaml").read_text())
    assert int(stage["USER"]) == values["uids"]["gateway"] > 0
    env = dict(kv.split("=", 1) for kv in stage["ENV"].split())
    port = GatewaySettings.model_fields["port"].default
    assert int(stage["EXPOSE"]) == int(env["VITASERVE_GATEWAY_PORT"]) == port == values["gateway"]["port"]
    assert env["HOME"] == "/tmp"  # the only writable path under the chart's read-only root filesystem
    assert json.loads(stage["CMD"]) == ["python", "-m", "vitaserve_gateway"]
    installs = " ".join(a for op, a in runtime_stage() if op == "RUN")
    assert "[gateway]" in installs and "download.pytorch.org/whl/cpu" in installs and "'numpy<2'" in installs
    assert "/healthz" in " ".join(healthcheck_command())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for realtime.example.com (not 127.0.0.1: the healthcheck must not verify it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "realtime.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("realtime.example.com")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _environment(port: int, **extra: str) -> dict[str, str]:
    """This process's environment without VITASERVE_* (as a fresh container), plus the gateway's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_")}
    # no orchestrator listens there: the gateway is alive but not ready
    return {**env, "VITASERVE_GATEWAY_PORT": str(port), "VITASERVE_GATEWAY_HOST": "127.0.0.1",
            "VITASERVE_GATEWAY_ORCHESTRATOR_ADDRESS": f"127.0.0.1:{free_port()}", **extra}


def _wait_until(check: Callable[[], bool], proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"the gateway exited with code {proc.returncode}"
        assert time.monotonic() < deadline, f"not healthy after {timeout_s:.0f} s"
        time.sleep(0.1)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_healthchecks_against_the_real_gateway(tls: bool, tmp_path: Path) -> None:
    port = free_port()
    extra = {}
    if tls:
        cert_file, key_file = _self_signed(tmp_path)
        extra = {"VITASERVE_GATEWAY_TLS_CERT_FILE": str(cert_file),
                 "VITASERVE_GATEWAY_TLS_KEY_FILE": str(key_file)}
    env = _environment(port, **extra)
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vitaserve_gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: run_check(healthcheck_command(), env) == 0, proc)
        if not tls:
            assert run_check(compose_healthcheck(port), env) == 0
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert refused.value.code == 503  # readiness follows the orchestrator; liveness does not
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_tail = (tmp_path / "gateway.log").read_text(errors="replace")[-2000:]
    # a clean shutdown, well within compose's stop_grace_period (10 s); uvicorn re-raises the SIGTERM it
    # handled, so the exit status is the signal's (143 in a container): a stop to Kubernetes and Docker
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in log_tail, (code, log_tail)
    assert stopped_in < 8, stopped_in
    assert run_check(healthcheck_command(), env) != 0
