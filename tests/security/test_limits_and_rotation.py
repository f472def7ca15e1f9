"""Per-tenant rate limits across replicas, API-key rotation without a restart and the size bounds of the
orchestrator's listeners (gRPC, /metrics), against real processes:
two orchestrator processes (`python -m vitaserve_orchestrator`, the tiny VITA-1.5 checkpoint in process, so
no Triton is needed) sharing a real redis-server, both on free loopback ports, stopped by pid; driven by the
real gRPC client (`vitaserve.client.Conversation`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, run_turn
from vitaserve.redis_server import RedisServer, redis_server_binary
from vitaserve.stack import OrchestratorProcess, free_port
from vitaserve_orchestrator.auth import hash_key
from oversize import assert_refused_and_still_serving  # noqa: E402 - this folder's helper (conftest.py)

pytestmark = pytest.mark.integration

SETTINGS = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=4)
TENANTS = {"turns": {"max_turns_per_minute": 3}, "opens": {"max_streams_per_minute": 2}}
KEYS = {"key-turns": "turns", "key-opens": "opens", "key-free": "free", "rot-old": "rot"}


def keys_file(path: Path, keys: dict[str, str]) -> None:
    path.write_text(json.dumps({"tenants": TENANTS,
                                "keys": [{"sha256": hash_key(k), "tenant": t} for k, t in keys.items()]}))


@dataclass
class Replicas:
    addresses: list[str]
    redis_url: str
    keys: Path
    metrics_ports: list[int]


GRPC_MAX_MESSAGE_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    if redis_server_binary() is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (the Makefile does)")
    work = tmp_path_factory.mktemp("security")
    keys = work / "keys.json"
    keys_file(keys, KEYS)
    env = {"VITASERVE_BACKEND": "inprocess", "VITASERVE_CHECKPOINT_DIR": str(tiny_checkpoint),
           "VITASERVE_MODEL_FAMILY": "vita15", "VITASERVE_SESSION_STORE": "redis",
           "VITASERVE_API_KEYS_FILE": str(keys), "VITASERVE_API_KEYS_RELOAD_S": "0.2",
           "VITASERVE_GRPC_MAX_MESSAGE_BYTES": str(GRPC_MAX_MESSAGE_BYTES)}
    metrics_ports = [free_port(), free_port()]
    with RedisServer(work_dir=work / "redis") as redis_server:
        procs = [OrchestratorProcess({**env, "VITASERVE_REDIS_URL": redis_server.url,
                                      "VITASERVE_METRICS_ADDRESS": f"127.0.0.1:{port}"},
                                     log_path=work / f"orchestrator-{i}.log") for i, port in enumerate(metrics_ports)]
        try:
            with ThreadPoolExecutor(2) as pool:  # both load the model at once; start() raises with the log
                list(pool.map(OrchestratorProcess.start, procs))
            yield Replicas([p.address for p in procs], redis_server.url, keys, metrics_ports)
        finally:
            for p in procs:
                p.stop()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


async def turn(conv: Conversation, text: str) -> pb.ServerEvent:
    """The last event of one typed turn: response_done, or the error that refused it."""
    await conv.send_text(text)
    while True:
        event = await conv.next_event()
        if event.WhichOneof("event") in ("response_done", "error"):
            return event


def test_turns_per_minute_are_counted_across_replicas(replicas: Replicas) -> None:
    a, b = replicas.addresses

    async def body() -> None:
        async with Conversation.open(a, settings=SETTINGS, api_key="key-turns") as on_a, \
                Conversation.open(b, settings=SETTINGS, api_key="key-turns") as on_b:
            assert (await turn(on_a, "one")).WhichOneof("event") == "response_done"
            assert (await turn(on_b, "two")).WhichOneof("event") == "response_done"
            done = await turn(on_a, "three")
            assert done.WhichOneof("event") == "response_done"
            refused = await turn(on_b, "four")  # the tenant's 4th within the minute, on the other replica
            assert refused.error.code == "RESOURCE_EXHAUSTED" and refused.error.retryable, refused
            assert "max_turns_per_minute=3" in refused.error.message and "retry in" in refused.error.message
            # the session goes on: it applies events, its history is intact
            await on_a.send(pb.ClientEvent(delete_turn=pb.DeleteTurn(turn_id=done.turn_id)))
            assert (await on_a.next_event()).turn_deleted.turn_id == done.turn_id
            async with Conversation.open(b, settings=SETTINGS, api_key="key-free") as free:  # other tenants
                assert (await turn(free, "hello")).WhichOneof("event") == "response_done"

    run(body())
    client = redis.Redis.from_url(replicas.redis_url)
    key = "vitaserve:t:{turns}:rate:turns"  # redis_keys.py
    assert client.zcard(key) == 3 and 0 < client.pttl(key) <= 60_000  # refused turns are not counted
    client.close()


def test_stream_opens_per_minute_are_counted_across_replicas(replicas: Replicas) -> None:
    a, b = replicas.addresses

    async def body() -> None:
        async with Conversation.open(a, settings=SETTINGS, api_key="key-opens") as first:
            sid = first.session_id
        async with Conversation.open(b, settings=SETTINGS, api_key="key-opens", session_id=sid) as again:
            assert (await turn(again, "resumed")).WhichOneof("event") == "response_done"
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a third open within the minute, either replica
            async with Conversation.open(a, settings=SETTINGS, api_key="key-opens", session_id=sid):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_minute=2" in err.value.details()
        assert 0 < float(dict(err.value.trailing_metadata())["retry-after"]) <= 60

    run(body())


def test_a_rotated_key_file_applies_without_restart_and_open_streams_go_on(replicas: Replicas) -> None:
    """The keys file is rewritten (new key added, old removed) while a stream with the old key is open:
    new streams with the old key are UNAUTHENTICATED, the new key works, the open stream keeps working."""
    address = replicas.addresses[0]

    async def open_status(key: str) -> grpc.StatusCode:
        try:
            async with Conversation.open(address, settings=SETTINGS, api_key=key):
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async def body() -> None:
        async with Conversation.open(address, settings=SETTINGS, api_key="rot-old") as open_stream:
            assert (await turn(open_stream, "before")).WhichOneof("event") == "response_done"
            keys_file(replicas.keys, {**{k: t for k, t in KEYS.items() if k != "rot-old"}, "rot-new": "rot"})
            deadline = time.monotonic() + 15  # reloaded within VITASERVE_API_KEYS_RELOAD_S (0.2 s)
            while await open_status("rot-old") != grpc.StatusCode.UNAUTHENTICATED:
                assert time.monotonic() < deadline, "the removed key still opens streams"
                await asyncio.sleep(0.2)
            assert await open_status("rot-new") == grpc.StatusCode.OK
            assert await open_status("rot-old") == grpc.StatusCode.UNAUTHENTICATED
            _, _, _, events = await run_turn(open_stream, image=None, pcm16=None, text="after", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"  # the open stream goes on
            sid = open_stream.session_id
        async with Conversation.open(address, settings=SETTINGS, api_key="rot-new", session_id=sid) as resumed:
            assert resumed.session_id == sid  # the new key is the same tenant: its sessions are still there

    run(body())


def test_an_event_over_the_grpc_limit_ends_that_stream_only(replicas: Replicas) -> None:
    """VITASERVE_GRPC_MAX_MESSAGE_BYTES bounds every message the gRPC listener reads: one over it ends the
    stream with RESOURCE_EXHAUSTED (gRPC's own status and message); other streams and new ones go on."""
    address = replicas.addresses[0]

    async def body() -> None:
        async with Conversation.open(address, settings=SETTINGS, api_key="key-free") as bystander:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with Conversation.open(address, settings=SETTINGS, api_key="key-free") as conv:
                    await conv.send_text("x" * (GRPC_MAX_MESSAGE_BYTES + 1000))
                    while True:
                        await conv.next_event()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details(), err.value.details()
            assert (await turn(bystander, "still here?")).WhichOneof("event") == "response_done"
        async with Conversation.open(address, settings=SETTINGS, api_key="key-free") as fresh:
            assert (await turn(fresh, "and a new one")).WhichOneof("event") == "response_done"

    run(body())


def test_the_metrics_listener_refuses_oversized_requests_and_goes_on(replicas: Replicas) -> None:
    """/metrics (prometheus_client on the standard library's HTTP server): a request line over 64 kB is 414,
    a header line over 64 kB or more than 100 headers 431; the body of a request is never read."""
    got = assert_refused_and_still_serving(replicas.metrics_ports[0], "/metrics")
    assert got == {"header line": 431, "request line": 414, "header count": 431}
