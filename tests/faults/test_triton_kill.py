"""Triton SIGKILLed mid-reply (issue 14 §2): the server and its Python model stubs die at once (their whole
process group); the client gets an UNAVAILABLE error event within the component deadline while its stream
and session stay open, and the next turn on the same stream succeeds once Triton is back on the same
port. With two Triton servers in a static list, killing the one serving the session moves its next turn
to the other at once, and the session returns to the first once it is healthy again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from fault_servers import Tritons, orchestrator

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation
from vitaserve.cluster.routing import HashRing
from vitaserve.faults import TURN_END, reply_then_kill, turn_until_done
from vitaserve.stack import OrchestratorProcess
from vitaserve.triton.launcher import group_processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A long text reply (2048 tokens take the tiny model ~2 s): the kill lands while the LLM still streams.
LONG = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=2048, temperature=0.8,
                          seed=5)
TOKEN_TIMEOUT_S = 10  # VITASERVE_TOKEN_TIMEOUT_S of these orchestrators: the deadline the error must beat


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=150))


@pytest.fixture(scope="module")
def single(tritons: Tritons, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    tritons.ensure_running()
    proc = orchestrator(tmp_path_factory.mktemp("single"), "single", tritons.llm.grpc_url, tritons.base.grpc_url,
                        VITASERVE_TOKEN_TIMEOUT_S=str(TOKEN_TIMEOUT_S))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pair(tritons: Tritons, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchestratorProcess]:
    tritons.ensure_running()
    proc = orchestrator(tmp_path_factory.mktemp("pair"), "pair", f"{tritons.llm.grpc_url},{tritons.base.grpc_url}",
                        tritons.base.grpc_url, VITASERVE_TOKEN_TIMEOUT_S=str(TOKEN_TIMEOUT_S))
    yield proc
    proc.stop()


async def next_turn_end(conv: Conversation) -> pb.ServerEvent:
    while (event := await conv.next_event()).WhichOneof("event") not in TURN_END:
        pass
    return event


def test_triton_killed_mid_reply_is_unavailable_and_the_session_goes_on_after_restart(
        tritons: Tritons, single: OrchestratorProcess) -> None:
    tritons.ensure_running()

    async def scenario() -> str:
        async with Conversation.open(single.address, settings=LONG) as conv:
            before = await turn_until_done(conv, "Hello.", attempts=1)
            pgid = tritons.llm.server.pid  # type: ignore[union-attr]
            outcome = await reply_then_kill(conv, "Tell me a very long story.", tritons.llm.kill,
                                            deadline_s=TOKEN_TIMEOUT_S + 20)
            assert len(outcome.killed) >= 2, outcome.killed  # the server and its llm_decoder stub
            assert group_processes(pgid) == []
            end = outcome.end
            assert end.WhichOneof("event") == "error", end
            assert end.error.code == "UNAVAILABLE" and end.error.retryable, end.error
            assert "llm_decoder" in end.error.message
            assert end.response_id == outcome.response_id  # the killed turn's own error
            assert outcome.kill_to_end_s < TOKEN_TIMEOUT_S

            # Triton is down: the stream still answers, each turn with UNAVAILABLE.
            await conv.send_text("Are you there?")
            down = await asyncio.wait_for(next_turn_end(conv), TOKEN_TIMEOUT_S + 20)
            assert down.WhichOneof("event") == "error" and down.error.code == "UNAVAILABLE", down

            await asyncio.to_thread(tritons.llm.restart)  # same port, a new process
            after = await turn_until_done(conv, "Where were we?", deadline_s=60)
            assert after.done.session_id == before.done.session_id == conv.session_id
            assert after.seconds < 30, after  # the orchestrator reconnects by itself
            return conv.session_id

    session_id = run(scenario())

    async def history() -> list[str]:  # the completed turns, and only those, are the session's history
        async with Conversation.open(single.address, session_id=session_id) as again:
            assert again.started is not None and again.started.resumed
            return [t.user for t in again.started.history]

    assert run(history()) == ["Hello.", "Where were we?"]


def test_with_two_tritons_the_killed_ones_session_fails_over_and_comes_back(
        tritons: Tritons, pair: OrchestratorProcess) -> None:
    tritons.ensure_running()
    llm, base = tritons.llm, tritons.base
    ring = HashRing([llm.grpc_url, base.grpc_url])  # static mode: the ring's names are host:port

    async def scenario() -> None:
        for _ in range(32):  # a session the ring puts on `llm` (each try: 1/2)
            conv_cm = Conversation.open(pair.address, settings=LONG)
            conv = await conv_cm.__aenter__()
            if ring.lookup(conv.session_id) == llm.grpc_url:
                break
            await conv_cm.__aexit__(None, None, None)
        else:
            raise AssertionError("no session id hashed onto the llm server in 32 tries")
        try:
            first = await turn_until_done(conv, "Hello.", attempts=1)
            await eventually(lambda: llm.served(first.done.response_id))

            outcome = await reply_then_kill(conv, "Tell me a very long story.", llm.kill,
                                            deadline_s=TOKEN_TIMEOUT_S + 20)
            assert outcome.end.WhichOneof("event") == "error", outcome.end
            assert outcome.end.error.code == "UNAVAILABLE", outcome.end.error
            assert outcome.kill_to_end_s < TOKEN_TIMEOUT_S

            # The next turn fails over on its first attempt: the dead endpoint refuses, the other serves.
            moved = await turn_until_done(conv, "Are you still there?", attempts=1)
            await eventually(lambda: base.served(moved.done.response_id))
            assert not llm.served(moved.done.response_id)

            # Back on its port, `llm` is found healthy again and the session returns to it.
            await asyncio.to_thread(llm.restart)
            t0 = time.monotonic()
            for _ in range(60):
                back = await turn_until_done(conv, "And now?", attempts=1)
                await eventually(lambda: base.served(back.done.response_id) or llm.served(back.done.response_id))
                if llm.served(back.done.response_id):
                    break
                await asyncio.sleep(0.25)
            else:
                raise AssertionError("the session never returned to the restarted server")
            assert time.monotonic() - t0 < 30
        finally:
            await conv_cm.__aexit__(None, None, None)

    run(scenario())


async def eventually(check, timeout_s: float = 10.0) -> None:
    """Triton logs a request's line when it ends: wait for it (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not seen in the Triton logs within 10 s")
        await asyncio.sleep(0.05)
