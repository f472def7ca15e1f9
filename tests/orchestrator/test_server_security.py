"""Integration tests of the gRPC edge: TLS and mTLS with certificates made here (`cryptography`), API keys
in metadata through `vitaserve.client.Conversation`, the per-tenant message limit, and readiness that
follows the Redis session store. Real grpc.aio server on a free port, the tiny model in process, a real
redis-server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_config, run
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2
from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, run_turn
from vitaserve.components.inprocess import InProcessComponents
from vitaserve.redis_server import RedisServer
from vitaserve_orchestrator.auth import hash_key
from vitaserve_orchestrator.server import OrchestratorServer, create_server
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration

SETTINGS = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=4)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, issuer: tuple[Any, x509.Certificate] | None, *, ca: bool = False,
              server: bool = False) -> tuple[bytes, bytes, Any, x509.Certificate]:
    """(key PEM, cert PEM, key, cert): self-signed when `issuer` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    _, ca_pem, ca_key, ca_cert = make_cert("vitaserve test CA", None, ca=True)
    server_key, server_pem, _, _ = make_cert("localhost", (ca_key, ca_cert), server=True)
    client_key, client_pem, _, _ = make_cert("client", (ca_key, ca_cert))
    _, other_ca_pem, _, _ = make_cert("another CA", None, ca=True)
    files = {"ca": ca_pem, "server_key": server_key, "server_cert": server_pem}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    return {"dir": d, "ca": ca_pem, "client_key": client_key, "client_cert": client_pem,
            "other_ca": other_ca_pem}


@pytest.fixture()
def components(tiny_engines: dict[str, Any]) -> InProcessComponents:
    return InProcessComponents(engines=tiny_engines)


@asynccontextmanager
async def serving(components: InProcessComponents, config: OrchestratorSettings
                  ) -> AsyncIterator[tuple[OrchestratorServer, str]]:
    server, port = create_server(config, components, "127.0.0.1:0")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0.5)
        await components.close()


async def one_turn(address: str, **kwargs: Any) -> str:
    async with Conversation.open(address, settings=SETTINGS, **kwargs) as conv:
        _, _, _, events = await run_turn(conv, image=None, pcm16=None, text="Hi", echo=False)
        assert events[-1].WhichOneof("event") == "response_done", events
        return conv.session_id


def test_tls_and_mtls(tiny_engines: dict[str, Any], pki: dict[str, Any]) -> None:
    d: Path = pki["dir"]
    tls = {"tls_cert_file": d / "server_cert.pem", "tls_key_file": d / "server_key.pem"}

    async def body() -> None:
        async with serving(InProcessComponents(engines=tiny_engines), make_config(**tls)) as (_, address):
            assert (await one_turn(address, root_certificates=pki["ca"])).startswith("sess-")
            for kwargs in ({}, {"root_certificates": pki["other_ca"]}):  # plaintext; an untrusted server
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(one_turn(address, **kwargs), 10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        mtls = make_config(**tls, tls_client_ca_file=d / "ca.pem")
        async with serving(InProcessComponents(engines=tiny_engines), mtls) as (_, address):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(one_turn(address, root_certificates=pki["ca"]), 10)  # no client cert
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await one_turn(address, root_certificates=pki["ca"], private_key=pki["client_key"],
                           certificate_chain=pki["client_cert"])

    run(body(), timeout=60)


def test_api_keys_tenants_and_message_limit(components: InProcessComponents, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({
        "tenants": {"small": {"max_message_bytes": 2000, "max_streams": 1}},
        "keys": [{"sha256": hash_key("key-acme"), "tenant": "acme"},
                 {"sha256": hash_key("key-small"), "tenant": "small"}],
    }))

    async def body() -> None:
        async with serving(components, make_config(api_keys_file=keys)) as (_, address):
            sid = await one_turn(address, api_key="key-acme")
            for kwargs, code in (({}, grpc.StatusCode.UNAUTHENTICATED),
                                 ({"api_key": "wrong"}, grpc.StatusCode.UNAUTHENTICATED),
                                 ({"api_key": "key-small", "session_id": sid}, grpc.StatusCode.NOT_FOUND)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(one_turn(address, **kwargs), 10)
                assert err.value.code() == code, err.value
            small_key = (("x-api-key", "key-small"),)
            async with Conversation.open(address, settings=SETTINGS, metadata=small_key) as conv:
                await conv.send_text("x" * 3000)  # over this tenant's 2000 bytes
                error = await conv.next_event()
                assert error.error.code == "RESOURCE_EXHAUSTED"
                assert "max_message_bytes=2000" in error.error.message
                with pytest.raises(grpc.aio.AioRpcError) as err:  # the tenant's one stream is in use
                    await asyncio.wait_for(one_turn(address, api_key="key-small"), 10)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_streams=1" in err.value.details()
                _, _, _, events = await run_turn(conv, image=None, pcm16=None, text="still here?", echo=False)
                assert events[-1].WhichOneof("event") == "response_done"
            await one_turn(address, api_key="key-small")  # the stream ended: its lease was given back
            await one_turn(address, api_key="key-acme", session_id=sid)

    run(body(), timeout=60)


def test_readiness_follows_the_redis_store(components: InProcessComponents, tmp_path: Path) -> None:
    async def body() -> None:
        with RedisServer(work_dir=tmp_path) as redis:
            config = make_config(session_store="redis", redis_url=redis.url, redis_timeout_s=0.5)
            async with serving(components, config) as (server, address):
                assert await server.check_readiness()
                await one_turn(address)
                redis.kill()
                assert not await server.check_readiness()
                status = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(one_turn(address), 5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "session store" in err.value.details()
                redis.start()
                assert await server.check_readiness()
                await one_turn(address)

    run(body(), timeout=60)


def test_turn_and_stream_rate_limits_with_the_memory_store(components: InProcessComponents, tmp_path: Path) -> None:
    """max_turns_per_minute: a commit over it is a RESOURCE_EXHAUSTED error event naming the limit and when to
    retry, and the stream goes on; max_streams_per_minute: an open over it is RESOURCE_EXHAUSTED with a
    retry-after trailer. Counted in this process (the memory store); the Redis store: tests/security."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({
        "tenants": {"rated": {"max_turns_per_minute": 2, "max_streams_per_minute": 2}},
        "keys": [{"sha256": hash_key("key-rated"), "tenant": "rated"},
                 {"sha256": hash_key("key-free"), "tenant": "free"}],
    }))

    async def body() -> None:
        async with serving(components, make_config(api_keys_file=keys)) as (_, address):
            async with Conversation.open(address, settings=SETTINGS, api_key="key-rated") as conv:  # open 1
                for text in ("one", "two"):
                    _, _, _, events = await run_turn(conv, image=None, pcm16=None, text=text, echo=False)
                    assert events[-1].WhichOneof("event") == "response_done"
                first_turn = events[0].turn_id
                await conv.send_text("three")
                error = (await conv.next_event()).error
                assert error.code == "RESOURCE_EXHAUSTED" and error.retryable
                assert "max_turns_per_minute=2" in error.message and "retry in" in error.message
                # the stream goes on: it still applies events, the history is intact
                await conv.send(pb.ClientEvent(delete_turn=pb.DeleteTurn(turn_id=first_turn)))
                assert (await conv.next_event()).turn_deleted.turn_id == first_turn
                await one_turn(address, api_key="key-free")  # another tenant is not limited
                async with Conversation.open(address, settings=SETTINGS, api_key="key-rated") as second:
                    sid = second.session_id  # open 2 is accepted (a turn there would be refused)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # open 3 within the minute
                await asyncio.wait_for(one_turn(address, api_key="key-rated", session_id=sid), 10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_minute=2" in err.value.details() and "retry in" in err.value.details()
            retry_after = dict(err.value.trailing_metadata() or ())["retry-after"]
            assert 0 < float(retry_after) <= 60

    run(body(), timeout=60)


def test_the_exec_probe_checks_health_over_tls_and_mtls(tiny_engines: dict[str, Any],
                                                        pki: dict[str, Any]) -> None:
    """`python -m vitaserve_orchestrator.healthcheck` (the chart's probe when the orchestrator serves TLS:
    kubelet's gRPC probes cannot) with the server's own environment: exit 0 while SERVING, under TLS and mTLS;
    1 with a message when the name on the certificate is wrong or nothing listens."""
    import os
    import sys

    d: Path = pki["dir"]
    tls = {"tls_cert_file": d / "server_cert.pem", "tls_key_file": d / "server_key.pem"}

    async def probe(port: int, service: str, **env: str) -> tuple[int, str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_")}
        full.update({"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": "127.0.0.1:1",
                     "VITASERVE_LISTEN_ADDRESS": f"0.0.0.0:{port}",
                     "VITASERVE_TLS_CERT_FILE": str(d / "server_cert.pem"),
                     "VITASERVE_TLS_KEY_FILE": str(d / "server_key.pem"),
                     "VITASERVE_TLS_PROBE_CA_FILE": str(d / "ca.pem"), **env})
        proc = await asyncio.create_subprocess_exec(  # async: this loop serves the server meanwhile
            sys.executable, "-m", "vitaserve_orchestrator.healthcheck", "--service", service, env=full,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode, err.decode()

    async def body() -> None:
        mtls = ({"tls_client_ca_file": d / "ca.pem"}, {"VITASERVE_TLS_CLIENT_CA_FILE": str(d / "ca.pem")})
        for extra, env in (({}, {}), mtls):
            config = make_config(**tls, **extra)
            async with serving(InProcessComponents(engines=tiny_engines), config) as (server, address):
                port = int(address.rpartition(":")[2])
                assert await probe(port, "liveness", **env) == (0, "")
                assert (await server.check_readiness()) and (await probe(port, "", **env))[0] == 0
                code, err = await probe(port, "liveness", VITASERVE_TLS_PROBE_SERVER_NAME="not-on-the-cert", **env)
                assert code == 1 and "UNAVAILABLE" in err, err
        code, err = await probe(port, "liveness")  # the server is gone
        assert code == 1 and "orchestrator health 'liveness': UNAVAILABLE" in err, err

    run(body(), timeout=120)
