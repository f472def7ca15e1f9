"""Sessions that survive replicas, tenants that stay apart, Redis outages: two real orchestrator processes
sharing a real redis-server (started here on a free port), in front of the suite's one real Triton, driven
by the real gRPC client (issue 4 §1, §5, §6)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, run_turn
from vitaserve.redis_server import RedisServer
from vitaserve.replicas import ReplicaSet
from vitaserve.stack import LocalStack
from vitaserve_orchestrator.auth import hash_key
from vitaserve_orchestrator.redis_store import RedisSessionStore
from vitaserve_orchestrator.session import history_reply_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
]

SHORT = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=8, seed=3)
LONG = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=300, temperature=0.8,
                          seed=5)
KEYS = {"key-acme": "acme", "key-globex": "globex", "key-small": "small"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@dataclass
class Cluster:
    redis: RedisServer
    replicas: ReplicaSet


@pytest.fixture(scope="module")
def cluster(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("replicas")
    keys = work / "api-keys.json"
    keys.write_text(json.dumps({
        "tenants": {"small": {"max_streams": 1, "max_message_bytes": 4096}},
        "keys": [{"sha256": hash_key(k), "tenant": t} for k, t in KEYS.items()],
    }))
    env = {"VITASERVE_API_KEYS_FILE": str(keys), "VITASERVE_STREAM_LEASE_S": "3",
           "VITASERVE_REDIS_TIMEOUT_S": "1", "VITASERVE_HEALTH_POLL_S": "0.5"}
    with RedisServer(work_dir=work / "redis") as redis, \
            ReplicaSet(stack.triton_url, redis_url=redis.url, work_dir=work, env=env) as replicas:
        yield Cluster(redis, replicas)


@pytest.fixture()
def replicas(cluster: Cluster) -> ReplicaSet:
    cluster.redis.start()  # a previous test may have stopped it
    cluster.replicas.ensure_running()  # ... or killed a replica
    return cluster.replicas


async def stored_history(redis_url: str, session_id: str, tenant: str) -> list[tuple[str, str]]:
    store = RedisSessionStore(redis_url)
    try:
        return [(t.user, t.assistant) for t in (await store.load(session_id, tenant=tenant)).history]
    finally:
        await store.close()


async def expect_status(code: grpc.StatusCode, address: str, **kwargs: object) -> str:
    """Open a stream that must end with `code`; returns the status details."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with Conversation.open(address, settings=SHORT, **kwargs) as conv:  # type: ignore[arg-type]
            await run_turn(conv, image=None, pcm16=None, text="hello?", echo=False)
    assert err.value.code() == code, err.value
    return err.value.details() or ""


def test_replica_killed_mid_response_the_other_resumes_with_history_intact(
        cluster: Cluster, replicas: ReplicaSet) -> None:
    async def scenario() -> None:
        completed: list[tuple[str, str]] = []  # (user, assistant) as the client saw them done
        conv_cm = Conversation.open(replicas.address(0), settings=SHORT, api_key="key-acme")
        conv = await conv_cm.__aenter__()
        session_id = conv.session_id
        for i in range(3):
            question = f"Question number {i}, please answer briefly."
            _, _, _, events = await run_turn(conv, image=None, pcm16=None, text=question, echo=False)
            done = events[-1].response_done
            assert events[-1].WhichOneof("event") == "response_done"
            completed.append((question, history_reply_text(done.state_mark, done.text)))
        # A long spoken reply is running on replica 0 when it dies.
        await conv.send(pb.ClientEvent(session_update=pb.SessionUpdate(settings=LONG)))
        assert (await conv.next_event()).WhichOneof("event") == "session_started"
        story = "Now tell me a very long story."
        await conv.send_text(story)
        async for event in conv.events():
            if event.WhichOneof("event") == "audio":
                break
        replicas.kill(0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for event in conv.events():  # what was already in flight, if anything
                if event.WhichOneof("event") == "response_done":  # the reply beat the kill: it counts
                    done = event.response_done
                    completed.append((story, history_reply_text(done.state_mark, done.text)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await conv_cm._channel.close()

        # Replica 0's lease has not expired, yet the reconnect wins at once.
        t0 = time.perf_counter()
        async with Conversation.open(replicas.address(1), session_id=session_id, settings=SHORT,
                                     api_key="key-acme") as again:
            assert time.perf_counter() - t0 < 5
            assert again.started is not None and again.started.resumed
            assert again.started.history_turns == len(completed) >= 3
            assert await stored_history(cluster.redis.url, session_id, "acme") == completed
            _, _, _, events = await run_turn(again, image=None, pcm16=None, text="Where were we?", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"
            assert {e.session_id for e in events} == {session_id}
            # The turn counter continues from the last saved turn (a turn cut by the kill was never saved).
            assert events[0].turn_id == f"turn-{len(completed) + 1}"
            done = events[-1].response_done
        history = await stored_history(cluster.redis.url, session_id, "acme")
        assert history == [*completed, ("Where were we?", history_reply_text(done.state_mark, done.text))]

    run(scenario())


def test_a_second_stream_on_the_session_wins_and_the_first_ends_aborted(cluster: Cluster,
                                                                          replicas: ReplicaSet) -> None:
    async def scenario() -> None:
        async with Conversation.open(replicas.address(0), settings=SHORT, api_key="key-acme") as old:
            await run_turn(old, image=None, pcm16=None, text="First, on replica 0.", echo=False)
            # The client reconnects to replica 1 while its first stream is still open on replica 0.
            async with Conversation.open(replicas.address(1), session_id=old.session_id,
                                         api_key="key-acme") as new:
                assert new.started is not None and new.started.history_turns == 1
                with pytest.raises(grpc.aio.AioRpcError) as err:  # within a lease renewal (1 s here)
                    await asyncio.wait_for(old.next_event(), 5)
                assert err.value.code() == grpc.StatusCode.ABORTED
                assert "newer stream" in (err.value.details() or "")
                await run_turn(new, image=None, pcm16=None, text="Second, on replica 1.", echo=False)
        history = await stored_history(cluster.redis.url, old.session_id, "acme")
        assert [u for u, _ in history] == ["First, on replica 0.", "Second, on replica 1."]

    run(scenario())


def test_tenants_keys_and_limits_across_replicas(replicas: ReplicaSet) -> None:
    a, b = replicas.address(0), replicas.address(1)

    async def scenario() -> None:
        async with Conversation.open(a, settings=SHORT, api_key="key-acme") as acme:
            await run_turn(acme, image=None, pcm16=None, text="Hello from acme.", echo=False)
            # Another tenant cannot see it, on any replica: exactly the answer a missing session gets.
            foreign = await expect_status(grpc.StatusCode.NOT_FOUND, b, session_id=acme.session_id,
                                          api_key="key-globex")
            missing = await expect_status(grpc.StatusCode.NOT_FOUND, b, session_id="sess-0123456789abcdef",
                                          api_key="key-globex")
            assert foreign.replace(acme.session_id, "ID") == missing.replace("sess-0123456789abcdef", "ID")
            assert "unauthenticated" not in foreign.lower()
            for kwargs in ({}, {"api_key": "key-wrong"}, {"metadata": (("x-api-key", "nope"),)}):
                details = await expect_status(grpc.StatusCode.UNAUTHENTICATED, b, **kwargs)
                assert "API key" in details
            # "small" may hold one stream: the limit holds across replicas.
            async with Conversation.open(a, settings=SHORT, api_key="key-small") as small:
                details = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, b, api_key="key-small")
                assert "max_streams=1" in details and "'small'" in details
                await small.send_text("x" * 5000)
                error = await small.next_event()
                assert error.error.code == "RESOURCE_EXHAUSTED"
                assert "max_message_bytes=4096" in error.error.message
                _, _, _, events = await run_turn(small, image=None, pcm16=None, text="ok?", echo=False)
                assert events[-1].WhichOneof("event") == "response_done"
            # Meanwhile acme's session kept working; and "small" has its stream back once it ended.
            _, _, _, events = await run_turn(acme, image=None, pcm16=None, text="Still there?", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"
            async with Conversation.open(b, settings=SHORT, api_key="key-small") as small:
                await run_turn(small, image=None, pcm16=None, text="my turn", echo=False)
        # acme resumes from the other replica with both turns.
        async with Conversation.open(b, session_id=acme.session_id, api_key="key-acme") as again:
            assert again.started is not None and again.started.history_turns == 2

    run(scenario())


def test_redis_outage_is_unavailable_and_the_service_recovers(cluster: Cluster, replicas: ReplicaSet) -> None:
    a, b = replicas.address(0), replicas.address(1)

    async def scenario() -> None:
        async with Conversation.open(a, settings=SHORT, api_key="key-acme") as live:
            cluster.redis.kill()
            t0 = time.perf_counter()
            details = await expect_status(grpc.StatusCode.UNAVAILABLE, b, api_key="key-acme")
            assert time.perf_counter() - t0 < 5, "bounded by VITASERVE_REDIS_TIMEOUT_S, never a hang"
            assert "session store" in details
            # The open stream still answers; its turn's save is reported, the stream goes on.
            _, _, _, events = await run_turn(live, image=None, pcm16=None, text="Are you there?", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"
            error = await asyncio.wait_for(live.next_event(), 5)
            assert error.error.code == "UNAVAILABLE" and error.error.retryable
            cluster.redis.start()  # same port; no orchestrator restart
            _, _, _, events = await run_turn(live, image=None, pcm16=None, text="And now?", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"
            session_id = live.session_id
        assert [u for u, _ in await stored_history(cluster.redis.url, session_id, "acme")] == [
            "Are you there?", "And now?"]
        for address in (a, b):
            async with Conversation.open(address, settings=SHORT, api_key="key-acme") as fresh:
                _, _, _, events = await run_turn(fresh, image=None, pcm16=None, text="Back?", echo=False)
                assert events[-1].WhichOneof("event") == "response_done"

    run(scenario())
