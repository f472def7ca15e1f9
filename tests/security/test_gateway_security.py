"""The Realtime gateway's security edges against real processes: an orchestrator process with API keys and
per-tenant rate limits (the tiny VITA-1.5 checkpoint in process: no Triton), and two gateway processes in
front of it, one plain and one serving TLS (`VITASERVE_GATEWAY_TLS_CERT_FILE`/`KEY_FILE`, a certificate made
here by a CA made here). Checked: a rate-limited turn reaches a Realtime client as a clear `error` event and
the session goes on; a rate-limited open is HTTP 429 naming the limit; the TLS gateway serves wss to a client
that trusts the CA, and refuses plain ws and clients that do not trust it; oversized HTTP requests are
refused and the gateway goes on."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from vitaserve.stack import GatewayProcess, OrchestratorProcess
from vitaserve_orchestrator.auth import hash_key

# the suite's Realtime client helpers; appended: tests/gateway's conftest must not shadow another `conftest`
sys.path.append(str(Path(__file__).parents[1] / "gateway"))
from oversize import assert_refused_and_still_serving  # noqa: E402 - this folder's helper (conftest.py)
from realtime_events import realtime  # noqa: E402

pytestmark = pytest.mark.integration

TENANTS = {"limited": {"max_turns_per_minute": 1}, "opens": {"max_streams_per_minute": 1}}
KEYS = {"key-limited": "limited", "key-opens": "opens", "key-free": "free"}
TEXT_ONLY = {"type": "realtime", "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("vitaserve test CA")).issuer_name(name("vitaserve test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.crt", "cert": directory / "tls.crt", "key": directory / "tls.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


class TlsGatewayProcess(GatewayProcess):
    """A gateway serving TLS: `url` is https://, its readiness is polled over TLS with `ca`."""

    def __init__(self, orchestrator_address: str, *, ca: Path, **kwargs: object) -> None:
        super().__init__(orchestrator_address, **kwargs)  # type: ignore[arg-type]
        self.url = self.url.replace("http://", "https://")
        self.context = ssl.create_default_context(cafile=str(ca))

    def _wait(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, "the TLS gateway exited"
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=self.context) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not answering after {self._timeout:.0f} s")
            time.sleep(0.1)


@dataclass
class Edge:
    plain: GatewayProcess
    tls: TlsGatewayProcess
    pki: dict[str, Path]


@pytest.fixture(scope="module")
def edge(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("gateway-security")
    keys = work / "keys.json"
    keys.write_text(json.dumps({"tenants": TENANTS,
                                "keys": [{"sha256": hash_key(k), "tenant": t} for k, t in KEYS.items()]}))
    pki = make_pki(work)
    orchestrator = OrchestratorProcess({
        "VITASERVE_BACKEND": "inprocess", "VITASERVE_CHECKPOINT_DIR": str(tiny_checkpoint),
        "VITASERVE_MODEL_FAMILY": "vita15", "VITASERVE_API_KEYS_FILE": str(keys),
    }, log_path=work / "orchestrator.log")
    plain = GatewayProcess(orchestrator.address, log_path=work / "gateway.log")
    tls = TlsGatewayProcess(orchestrator.address, ca=pki["ca"], log_path=work / "gateway-tls.log",
                            env={"VITASERVE_GATEWAY_TLS_CERT_FILE": str(pki["cert"]),
                                 "VITASERVE_GATEWAY_TLS_KEY_FILE": str(pki["key"])})
    try:
        with ThreadPoolExecutor(3) as pool:  # the gateways serve /healthz without the orchestrator
            list(pool.map(lambda p: p.start(), (orchestrator, plain, tls)))
        yield Edge(plain, tls, pki)
    finally:
        for proc in (tls, plain, orchestrator):
            proc.stop()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 90))


def test_a_rate_limited_turn_is_a_clear_realtime_error_and_the_session_goes_on(edge: Edge) -> None:
    async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
        async with realtime(edge.plain.url, api_key="key-limited") as events:
            await events.conn.session.update(session=TEXT_ONLY)
            await events.until("session.updated")
            replies = []
            for text in ("Hello.", "Hello again."):
                await events.conn.conversation.item.create(item={
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
                await events.conn.response.create()
                replies.append(await events.until("response.done", "error"))
            await events.conn.session.update(session={**TEXT_ONLY, "instructions": "Be brief."})
            after = await events.until("session.updated")  # the session still answers
            return replies[0], replies[1], after

    first, second, after = run(scenario())
    assert first[-1]["type"] == "response.done" and first[-1]["response"]["status"] == "completed", first[-1]
    error = second[-1]
    assert error["type"] == "error", second
    assert error["error"]["code"] == "resource_exhausted"
    assert error["error"]["type"] == "invalid_request_error"  # the client's own limit, not a server fault
    assert "max_turns_per_minute=1" in error["error"]["message"] and "retry in" in error["error"]["message"]
    assert "response.created" not in [e["type"] for e in second]  # no response was started
    assert after[-1]["session"]["instructions"] == "Be brief."


def test_a_rate_limited_open_is_http_429_naming_the_limit(edge: Edge) -> None:
    url = edge.plain.url.replace("http://", "ws://") + "/v1/realtime?model=vitaserve"
    headers = {"Authorization": "Bearer key-opens"}

    async def scenario() -> websockets.InvalidStatus:
        async with websockets.connect(url, additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers=headers):
                pass
        return refused.value

    refused = run(scenario())
    assert refused.response.status_code == 429
    body = json.loads(refused.response.body)
    assert body["error"]["code"] == "resource_exhausted"
    assert "max_streams_per_minute=1" in body["error"]["message"], body


def test_the_tls_gateway_serves_wss_with_the_ca_and_refuses_plain_or_untrusted(edge: Edge) -> None:
    wss = edge.tls.url.replace("https://", "wss://") + "/v1/realtime?model=vitaserve"
    headers = {"Authorization": "Bearer key-free"}
    trusting = ssl.create_default_context(cafile=str(edge.pki["ca"]))

    async def scenario() -> None:
        async with websockets.connect(wss, ssl=trusting, additional_headers=headers) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created" and created["session"]["id"].startswith("sess-")
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
            async with websockets.connect(wss, ssl=ssl.create_default_context(), additional_headers=headers):
                pass
        with pytest.raises((websockets.InvalidMessage, websockets.InvalidHandshake, ConnectionError, EOFError)):
            async with websockets.connect(wss.replace("wss://", "ws://"), additional_headers=headers,
                                          open_timeout=10):
                pass  # plain WebSocket to the TLS port: no handshake
        # and the gateway goes on serving TLS after those
        async with websockets.connect(wss, ssl=trusting, additional_headers=headers) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"

    run(scenario())
    with urllib.request.urlopen(f"{edge.tls.url}/healthz", context=trusting, timeout=5) as reply:
        assert reply.status == 200


def test_the_gateway_refuses_oversized_http_requests_and_goes_on(edge: Edge) -> None:
    """The HTTP listener (the upgrade, the page, the probes, /metrics) bounds the request head at
    VITASERVE_GATEWAY_MAX_HEADER_BYTES (64 KiB): a bigger one is 400 and the connection closed; WebSocket
    messages are bounded by VITASERVE_GATEWAY_MAX_MESSAGE_BYTES (1009: tests/gateway/test_bad_input.py)."""
    got = assert_refused_and_still_serving(edge.plain.port, "/healthz")
    assert set(got.values()) == {400}, got
    with urllib.request.urlopen(f"{edge.plain.url}/metrics", timeout=10) as reply:
        assert b"vitaserve_gateway_sessions" in reply.read()
