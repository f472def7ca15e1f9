"""Integration tests of `TritonComponents` against a real Triton serving the checked-in model repository
(`services/triton/model_repository`) on the tiny golden checkpoint.

One server is shared by the session (`triton_server` in conftest.py); its models find the checkpoint through VITASERVE_CHECKPOINT_DIR (the
launcher passes the test process's environment to the server). Results are compared with the same
engines run in-process: same embeddings, same greedy tokens, same seeded speech.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from vitaserve.components.base import GenerationParams, ImageInput
from vitaserve.components.triton import TritonComponents
from vitaserve.errors import InvalidInput, Unavailable, VitaserveError
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonLaunchError, TritonServer
from vitaserve.triton.repository import CHECKED_IN, render_repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(triton_server: TritonServer) -> TritonServer:
    return triton_server  # shared with the other integration modules (conftest.py)


def run(coro_fn, url: str, **kwargs):  # noqa: ANN001, ANN201
    """Run `coro_fn(client)` with a fresh client on a fresh event loop, closing the client after."""

    async def main():  # noqa: ANN202
        client = TritonComponents(url, **kwargs)
        try:
            return await coro_fn(client)
        finally:
            await client.close()

    return asyncio.run(main())


def log_line(server: TritonServer, model: str, request_id: str, timeout: float = 5.0) -> dict[str, str]:
    """The per-request line a streaming model logs when it closes `request_id`."""
    pattern = re.compile(rf"{model} request_id='{re.escape(request_id)}' responses=(\d+) outcome=(\S+)")
    deadline = time.monotonic() + timeout
    while True:
        match = pattern.search(server.log_path.read_text(errors="replace"))
        if match:
            return {"responses": int(match.group(1)), "outcome": match.group(2)}
        assert time.monotonic() < deadline, f"no log line for {model} {request_id}:\n{server.log_tail()}"
        time.sleep(0.02)


def test_health(server: TritonServer) -> None:
    health = run(lambda c: c.health(), server.grpc_url)
    assert health.all_ready and len(health.ready) == 4


def test_embeddings_equal_in_process(server, engines, images, speech_pcm) -> None:
    inputs = [ImageInput(images["wide"], 1), ImageInput(images["tall"], 4), ImageInput(images["square"], 12)]

    async def calls(client: TritonComponents):  # noqa: ANN202
        return await client.encode_images(inputs, request_id="img"), await client.encode_audio(speech_pcm)

    remote_images, remote_audio = run(calls, server.grpc_url)
    local_images = engines["vision_encoder"].encode(inputs)
    assert [r.embeddings.shape for r in remote_images] == [(256, 64), (5 * 256, 64), (256, 64)]
    assert [r.text for r in (*remote_images, remote_audio)] == ["", "", "", ""]  # vita15: rows only
    for remote, local in zip(remote_images, local_images):
        np.testing.assert_allclose(remote.embeddings, local, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(remote_audio.embeddings, engines["audio_encoder"].encode([speech_pcm])[0],
                               rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_in_process(server, engines, images, speech_pcm, make_prompt) -> None:
    media = [engines["vision_encoder"].encode([ImageInput(images["wide"])])[0],
             engines["audio_encoder"].encode([speech_pcm])[0]]
    prompt = make_prompt(1, has_audio=True)
    params = GenerationParams(max_tokens=16)

    async def stream(client: TritonComponents):  # noqa: ANN202
        return [d async for d in client.generate(prompt, media, params, request_id="greedy", session_id="s1")]

    remote = run(stream, server.grpc_url)
    local = list(engines["llm_decoder"].generate(prompt, media, params))
    assert remote == local
    assert remote[-1].finish_reason == "length" and remote[-1].token_id is None
    line = log_line(server, "llm_decoder", "greedy")
    # a lone stream gets one token per response, the last one with the end (16); a sender thread
    # descheduled by a busy machine may coalesce a few
    assert line["outcome"] == "done" and 12 <= line["responses"] <= 16, line


def test_seeded_speech_equals_in_process(server, engines) -> None:
    text = "☞ Hello there, how are you?"

    async def stream(client: TritonComponents):  # noqa: ANN202
        return [c async for c in client.synthesize(text, first_sentence=True, seed=42)]

    chunks = run(stream, server.grpc_url)
    local = list(engines["speech_synth"].synthesize(text, True, 42))
    assert len(chunks) == len(local) > 1
    assert all(c.sample_rate == 24000 and c.pcm.dtype == np.float32 for c in chunks)
    for remote, expected in zip(chunks, local):
        np.testing.assert_allclose(remote.pcm, expected, rtol=0, atol=1e-5)
    assert run(lambda c: _collect(c.synthesize("☞ ")), server.grpc_url) == []


async def _collect(stream) -> list:  # noqa: ANN001
    return [item async for item in stream]


def test_llm_cancellation_reaches_the_model(server, make_prompt) -> None:
    max_tokens = 8192  # ~15 s of tiny-model decoding if never cancelled

    async def cancel_after_three(client: TritonComponents) -> float:
        stream = client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=max_tokens),
                                 request_id="cancel-aclose")
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        return time.monotonic()

    closed_at = run(cancel_after_three, server.grpc_url)
    line = log_line(server, "llm_decoder", "cancel-aclose")
    assert line["outcome"] == "cancelled" and 3 <= line["responses"] < 200, line
    assert time.monotonic() - closed_at < 5

    async def cancel_task(client: TritonComponents) -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=max_tokens),
                                           request_id="cancel-task"):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_task, server.grpc_url)
    line = log_line(server, "llm_decoder", "cancel-task")
    assert line["outcome"] == "cancelled" and line["responses"] < 200, line


def test_speech_cancellation_reaches_the_model(server) -> None:
    # ~900 speech codes (the tiny decoder never emits EOS): seconds of work if never cancelled.
    text = "one two three four five six seven eight nine ten " * 6

    async def cancel_early(client: TritonComponents) -> float:
        stream = aiter(client.synthesize(text, seed=3, request_id="speech-cancel"))
        pending = asyncio.ensure_future(anext(stream, None))
        await asyncio.sleep(0.3)  # mid-sentence: the first chunk may not even be final yet
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
        return time.monotonic()

    started = time.monotonic()
    closed_at = run(cancel_early, server.grpc_url)
    line = log_line(server, "speech_synth", "speech-cancel")
    assert line["outcome"] == "cancelled", line
    # The model stopped within a few polls of the cancel, not at the end of the sentence.
    seconds = float(re.search(r"speech_synth request_id='speech-cancel' .* seconds=([0-9.]+)",
                              server.log_path.read_text(errors="replace")).group(1))
    assert seconds < (closed_at - started) + 0.5, seconds


def test_invalid_input_through_triton(server, images, make_prompt) -> None:
    async def calls(client: TritonComponents) -> list[VitaserveError]:
        errors = []
        for call in (
            lambda: client.encode_images([ImageInput(images["wide"][:500])]),
            lambda: client.encode_images([ImageInput(images["wide"], 13)]),
            lambda: client.encode_audio(np.zeros(100, np.float32)),
            lambda: _collect(client.generate(make_prompt(1), [], GenerationParams(max_tokens=4))),
            lambda: _collect(client.generate(make_prompt(0, text="hi"), [], GenerationParams(top_p=2.0))),
            lambda: _collect(client.synthesize("x" * 5000)),
        ):
            with pytest.raises(VitaserveError) as caught:
                await call()
            errors.append(caught.value)
        # A bad request does not disturb the next good one.
        assert (await client.encode_images([ImageInput(images["square"])]))[0].embeddings.shape == (256, 64)
        return errors

    errors = run(calls, server.grpc_url)
    assert all(isinstance(e, InvalidInput) for e in errors), errors
    messages = [e.message for e in errors]
    assert "corrupt or truncated image data" in messages[0]
    assert "max_tiles must be an integer in [1, 12], got 13" == messages[1]
    assert "too short" in messages[2]
    assert "1 media placeholder(s) (<image>) but 0 media array(s)" in messages[3]
    assert "top_p" in messages[4] and "too long" in messages[5]


def test_dynamic_batching_groups_concurrent_callers(server, images) -> None:
    async def stats() -> tuple[int, int]:
        async with aioclient.InferenceServerClient(server.grpc_url) as admin:
            s = (await admin.get_inference_statistics("vision_encoder", as_json=True))["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    async def callers() -> tuple[tuple[int, int], tuple[int, int]]:
        before = await stats()
        clients = [TritonComponents(server.grpc_url) for _ in range(8)]  # 8 callers, 8 channels
        try:
            results = await asyncio.gather(*(c.encode_images([ImageInput(images["square"])], request_id=f"b{i}")
                                             for i, c in enumerate(clients)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        assert all(r[0].embeddings.shape == (256, 64) for r in results)
        # Triton records the statistics after execute() returns, which may be after the responses arrived.
        deadline = time.monotonic() + 5
        while (after := await stats())[0] - before[0] < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return before, after

    (inferences0, executions0), (inferences1, executions1) = asyncio.run(callers())
    assert inferences1 - inferences0 == 8
    assert executions1 - executions0 < 8, "no execute() received more than one request"


def test_closed_port_is_unavailable_fast(make_prompt) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"  # closed once the block ends

    async def calls(client: TritonComponents) -> list[float]:
        times = []
        for call in (lambda: client.encode_audio(np.zeros(16000, np.float32)),
                     lambda: _collect(client.generate(make_prompt(0, text="hi"), [], GenerationParams())),
                     lambda: _collect(client.synthesize("hello"))):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await call()
            times.append(time.monotonic() - started)
        started = time.monotonic()
        health = await client.health()
        times.append(time.monotonic() - started)
        assert health.ready == dict.fromkeys(health.ready, False) and not health.all_ready
        return times

    times = run(calls, url, timeout_s=2.0, health_timeout_s=1.0)
    assert max(times) < 2.5, times


def test_per_component_urls(server) -> None:
    urls = {"vision_encoder": server.grpc_url, "audio_encoder": server.grpc_url}
    health = run(lambda c: c.health(), urls, components=["vision_encoder", "audio_encoder"])
    assert health.ready == {"vision_encoder": True, "audio_encoder": True}

    async def missing(client: TritonComponents) -> None:
        with pytest.raises(Unavailable, match="not configured"):
            await _collect(client.synthesize("hello"))

    run(missing, urls, components=["vision_encoder", "audio_encoder"])
    with pytest.raises(ValueError, match="no URL for"):
        TritonComponents({"vision_encoder": server.grpc_url})


def test_finished_streams_let_the_model_unload(tiny_checkpoint: Path, make_prompt) -> None:
    """Regression: a client that cancels the gRPC stream of a request the model already finished makes
    Triton 2.51 keep that request, and the model then never unloads (SIGTERM waits for the exit timeout).
    `TritonComponents` reads a finished stream to its end instead."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        srv = TritonServer(CHECKED_IN, models=["llm_decoder"], startup_timeout=120, exit_timeout=8).start()
    try:
        async def streams(client: TritonComponents) -> None:
            for _ in range(2):
                async for delta in client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=4)):
                    if delta.finish_reason:
                        break  # stop at the last delta, as callers do
            with pytest.raises(InvalidInput):
                await _collect(client.generate(make_prompt(0, text="hi"), [], GenerationParams(top_p=3.0)))

        run(streams, srv.grpc_url)
    finally:
        started = time.monotonic()
        srv.stop()
        elapsed = time.monotonic() - started
    assert elapsed < 6, f"stopping took {elapsed:.1f} s: the model waited for a leaked request"


def test_a_config_that_differs_from_the_spec_fails_the_load(tmp_path: Path) -> None:
    repo = render_repository(tmp_path / "repo", models=["llm_decoder"])
    config = repo / "llm_decoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("model_transaction_policy { decoupled: true }\n", ""))
    srv = TritonServer(repo, startup_timeout=60)
    with pytest.raises(TritonLaunchError, match="decoupled is False, expected True"):
        srv.start()
    assert srv.pid is None
