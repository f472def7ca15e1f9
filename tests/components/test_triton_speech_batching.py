"""Batched speech synthesis through real Triton's speech_synth (`TritonComponents.synthesize`, gRPC
streaming).

Uses a speech_synth-only Triton at one torch thread for concurrency and cancellation (its audio is compared
with the in-process engine's at the same thread count), and one small speech_synth-only Triton rendered
with a 1-segment batch, a 1-segment queue and a small KV budget for back-pressure and the budget check.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import triton_calls

from vitaserve.components.triton import TritonComponents
from vitaserve.errors import InvalidInput, ResourceExhausted
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR, ENV_CPU_THREADS
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import render_repository

pytestmark = pytest.mark.integration

TEXTS = [
    f"Sentence number {i} is about {w}."
    for i, w in enumerate(
        [
            "rain",
            "the sea and its many waves",
            "cats",
            "a long road home",
            "bread",
            "music",
            "winter light",
            "trains",
        ]
    )
]


def run(coro_fn, url: str):  # noqa: ANN001, ANN201
    return triton_calls.run(coro_fn, url, "speech_synth")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The codec's conv reductions differ in the last bits with the thread count, which can move a
    minimum-energy join point by one code: compare at the thread count the server uses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def log_line(server: TritonServer, request_id: str, timeout: float = 10.0) -> str:
    return triton_calls.request_log_line(server, "speech_synth", request_id, timeout)


async def _collect(stream) -> list:  # noqa: ANN001
    return [item async for item in stream]


@pytest.fixture(scope="module")
def one_thread_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """speech_synth alone, at one torch thread (VITASERVE_CPU_THREADS=1, as LocalStack runs it), so that
    the in-process reference can be computed at the same thread count (`one_torch_thread`)."""
    tmp = tmp_path_factory.mktemp("speech-one-thread")
    # two codec workers: at one thread each, one would keep cancelled segments' consumers waiting for it
    # (they poll their cancellation between codec windows) while their codes pile up
    repo = render_repository(tmp / "repo", models=["speech_synth"], speech_engine={"codec_workers": "2"})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        env.setenv(ENV_CPU_THREADS, "1")
        srv = TritonServer(repo, startup_timeout=120, log_path=tmp / "tritonserver.log").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_concurrent_segments_share_steps_and_equal_in_process(one_thread_server, engines) -> None:
    cancelled = {2, 5}
    long_text = "one two three four five six seven eight nine ten " * 6  # ~900 codes: seconds of work

    async def one(client: TritonComponents, i: int) -> list[np.ndarray]:
        text = long_text if i in cancelled else TEXTS[i]
        stream = client.synthesize(
            text, first_sentence=i % 2 == 0, seed=100 + i, request_id=f"speech-batch-{i}"
        )
        chunks = []
        if i in cancelled:
            pending = asyncio.ensure_future(anext(aiter(stream), None))
            await asyncio.sleep(0.5)
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        else:
            chunks = [c.pcm async for c in stream]
        await stream.aclose()
        return chunks

    async def all_segments(client: TritonComponents) -> list[list[np.ndarray]]:
        return await asyncio.gather(*(one(client, i) for i in range(len(TEXTS))))

    results = run(all_segments, one_thread_server.grpc_url)
    peaks = []
    for i, chunks in enumerate(results):
        line = log_line(one_thread_server, f"speech-batch-{i}")
        peaks.append(int(re.search(r"batch_peak=(\d+)", line).group(1)))
        if i in cancelled:
            assert "outcome=cancelled" in line, line
            assert int(re.search(r"codes=(\d+)", line).group(1)) < 900, line
            continue
        with one_torch_thread():  # as the server runs its codec (VITASERVE_CPU_THREADS=1)
            local = list(engines["speech_synth"].synthesize(TEXTS[i], i % 2 == 0, 100 + i))
        assert "outcome=done" in line and len(chunks) == len(local), (i, line)
        for remote, expected in zip(chunks, local):
            np.testing.assert_allclose(remote, expected, rtol=0, atol=1e-5)
    assert max(peaks) >= 4, f"the segments were not decoded together: batch peaks {peaks}"


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("small-speech")
    repo = render_repository(
        tmp / "repo",
        models=["speech_synth"],
        max_streams=1,
        speech_engine={"max_queue": "1", "kv_positions": "2048"},
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        srv = TritonServer(repo, startup_timeout=120, log_path=tmp / "tritonserver.log").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_full_queue_is_resource_exhausted_and_an_oversized_segment_invalid(small_server) -> None:
    long_text = "one two three four five six seven eight nine ten " * 6

    async def calls(client: TritonComponents) -> list:
        first_chunk = asyncio.Event()

        async def long_stream(rid: str, seed: int) -> int:
            n = 0
            async for _ in client.synthesize(long_text, first_sentence=True, seed=seed, request_id=rid):
                n += 1
                first_chunk.set()
            return n

        running = asyncio.create_task(long_stream("speech-running", 1))  # holds the only batch row
        await asyncio.wait_for(first_chunk.wait(), 60)
        waiting = asyncio.create_task(long_stream("speech-waiting", 2))  # fills the queue
        await asyncio.sleep(0.3)
        errors = []
        for text in ("Hello there.", "word " * 600):  # the queue is full; 600 words never fit 2048 positions
            with pytest.raises(Exception) as caught:
                await _collect(client.synthesize(text, seed=3))
            errors.append(caught.value)
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        # once the cancellations reach the model (asynchronously), the instance serves again
        deadline = time.monotonic() + 15
        while True:
            try:
                after = await _collect(client.synthesize("Hello there.", seed=3))
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline, "the cancelled segments never left the queue"
                await asyncio.sleep(0.1)
        return [*errors, after]

    full, oversized, after = run(calls, small_server.grpc_url)
    assert isinstance(full, ResourceExhausted) and "max_queue 1" in full.message, full
    assert isinstance(oversized, InvalidInput) and "KV budget is 2048 positions" in oversized.message, (
        oversized
    )
    assert after, "no audio after the back-pressure errors"
