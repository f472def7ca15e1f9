"""Continuous batching through real Triton's llm_decoder (`TritonComponents.generate`, gRPC streaming).

Uses the session's shared Triton (`triton_server`) for concurrency, cancellation and prefix reuse, and one
small llm_decoder-only Triton rendered with a 1-slot batch and a 1-request queue for back-pressure.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import triton_calls

from vitaserve.components.base import GenerationParams
from vitaserve.components.triton import TritonComponents
from vitaserve.errors import InvalidInput, ResourceExhausted
from vitaserve.models.prompt import Turn, build_prompt
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import render_repository

pytestmark = pytest.mark.integration


def run(coro_fn, url: str):  # noqa: ANN001, ANN201
    return triton_calls.run(coro_fn, url, "llm_decoder")


def log_line(server: TritonServer, request_id: str, timeout: float = 10.0) -> str:
    return triton_calls.request_log_line(server, "llm_decoder", request_id, timeout)


def prompts(n: int) -> list[str]:
    return [build_prompt([], f"Question {i}: what about item {i * 31}?", n_images=0) for i in range(n)]


def test_concurrent_streams_equal_in_process_while_some_are_cancelled(triton_server, engines) -> None:
    texts = prompts(12)
    params = GenerationParams(max_tokens=24)
    cancelled = {1, 4, 7, 10}

    async def one(client: TritonComponents, i: int) -> list[int]:
        ids = []
        stream = client.generate(texts[i], [], GenerationParams(max_tokens=2000) if i in cancelled else params,
                                 request_id=f"batch-{i}")
        async for delta in stream:
            if delta.token_id is not None:
                ids.append(delta.token_id)
            if i in cancelled and len(ids) == 3:
                break
        await stream.aclose()
        return ids

    async def all_streams(client: TritonComponents) -> list[list[int]]:
        return await asyncio.gather(*(one(client, i) for i in range(len(texts))))

    results = run(all_streams, triton_server.grpc_url)
    for i, ids in enumerate(results):
        line = log_line(triton_server, f"batch-{i}")
        if i in cancelled:
            assert len(ids) == 3 and "outcome=cancelled" in line, line
            assert int(re.search(r"responses=(\d+)", line).group(1)) < 200, line
        else:
            expected = [d.token_id for d in engines["llm_decoder"].generate(texts[i], [], params) if d.token_id is not None]
            assert ids == expected and "outcome=done" in line, (i, line)


def test_a_sessions_second_turn_reuses_its_cache(triton_server, engines) -> None:
    first = build_prompt([], "Tell me a story.", n_images=0)
    params = GenerationParams(max_tokens=12)

    async def turns(client: TritonComponents) -> tuple[str, list, list]:
        reply = "".join([d.text async for d in client.generate(first, [], params, request_id="turn-1",
                                                                 session_id="sess-A")])
        second = build_prompt([Turn("Tell me a story.", reply)], "And then?",
                              n_images=0)
        reused = [d async for d in client.generate(second, [], params, request_id="turn-2", session_id="sess-A")]
        fresh = [d async for d in client.generate(second, [], params, request_id="turn-2-fresh")]
        return second, reused, fresh

    second, reused, fresh = run(turns, triton_server.grpc_url)
    assert reused == fresh == list(engines["llm_decoder"].generate(second, [], params))
    assert "kv_reused=0" in log_line(triton_server, "turn-1")
    n_reused = int(re.search(r"kv_reused=(\d+)", log_line(triton_server, "turn-2")).group(1))
    n_first = len(engines["llm_decoder"].prepare(first, [], params).keys)
    assert n_reused >= n_first - 1, (n_reused, n_first)  # at least the first turn's prompt was not recomputed
    assert "kv_reused=0" in log_line(triton_server, "turn-2-fresh")


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("small-llm")
    repo = render_repository(tmp / "repo", models=["llm_decoder"],
                             llm_engine={"max_batch": "1", "max_queue": "1", "kv_cache_tokens": "4096"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        srv = TritonServer(repo, startup_timeout=120, log_path=tmp / "tritonserver.log").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_full_queue_is_resource_exhausted_and_an_oversized_request_invalid(small_server) -> None:
    text = prompts(1)[0]

    async def calls(client: TritonComponents) -> list:
        first_token = asyncio.Event()

        async def long_stream(rid: str) -> int:
            n = 0
            async for _ in client.generate(text, [], GenerationParams(max_tokens=3000), request_id=rid):
                n += 1
                first_token.set()
            return n

        running = asyncio.create_task(long_stream("long-running"))
        await asyncio.wait_for(first_token.wait(), 30)   # holds the only batch slot
        waiting = asyncio.create_task(long_stream("long-waiting"))  # fills the queue
        await asyncio.sleep(0.3)
        errors = []
        for call in (lambda: _collect(client.generate(text, [], GenerationParams(max_tokens=8))),
                     lambda: _collect(client.generate(text, [], GenerationParams(max_tokens=8000)))):
            with pytest.raises(Exception) as caught:
                await call()
            errors.append(caught.value)
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        # the error is retryable: once the engine has seen the cancellations, requests are served again
        for _ in range(100):
            try:
                errors.append(len(await _collect(client.generate(text, [], GenerationParams(max_tokens=4)))))
                break
            except ResourceExhausted:
                await asyncio.sleep(0.05)
        return errors

    full, oversized, served = run(calls, small_server.grpc_url)
    assert isinstance(full, ResourceExhausted) and full.retryable, full
    assert "max_queue 1" in full.message and "retry" in full.message
    assert isinstance(oversized, InvalidInput) and "budget is 4096 tokens" in oversized.message
    assert served == 5  # 4 tokens + the last delta
    assert "outcome=cancelled" in log_line(small_server, "long-running")
    assert "outcome=cancelled" in log_line(small_server, "long-waiting")


async def _collect(stream) -> list:  # noqa: ANN001
    return [item async for item in stream]


def test_coalesced_responses_of_many_streams_equal_in_process_and_a_lone_stream_gets_one_token_each(
        triton_server, engines) -> None:
    """16 streams at once: the model coalesces each stream's tokens while its senders are behind (several
    tokens per response), yet every stream's deltas (ids, text, finish) equal the in-process engine's.
    A lone stream afterwards gets (nearly) one token per response (first-token rule: test_token_stream)."""
    texts = prompts(16)
    params = GenerationParams(max_tokens=40)

    async def all_streams(client: TritonComponents) -> tuple[list[list], list]:
        async def one(i: int) -> list:
            return [d async for d in client.generate(texts[i], [], params, request_id=f"coalesce-{i}")]

        many = await asyncio.gather(*(one(i) for i in range(len(texts))))
        lone = [d async for d in client.generate(texts[0], [], params, request_id="coalesce-lone")]
        return many, lone

    many, lone = run(all_streams, triton_server.grpc_url)
    expected = [list(engines["llm_decoder"].generate(t, [], params)) for t in texts]
    assert many == expected
    assert lone == expected[0]
    lines = [log_line(triton_server, f"coalesce-{i}") for i in range(len(texts))]
    sizes = [tuple(int(re.search(rf"{k}=(\d+)", line).group(1)) for k in ("tokens", "responses")) for line in lines]
    assert [t for t, _ in sizes] == [sum(d.token_id is not None for d in e) for e in expected]
    per_response = sum(t for t, _ in sizes) / sum(r for _, r in sizes)
    assert per_response > 1.2, sizes  # 16 streams' senders are behind: their tokens share responses
    line = log_line(triton_server, "coalesce-lone")
    tokens, responses = (int(re.search(rf"{k}=(\d+)", line).group(1)) for k in ("tokens", "responses"))
    # one token per response, but a sender thread descheduled by a busy machine may coalesce a few
    assert tokens == sum(d.token_id is not None for d in expected[0]) and responses >= 0.75 * tokens, line
