"""Render the Triton model repository of a deployment from the tensor specs.

Every `config.pbtxt` is generated from `vitaserve.components.tensors` (names, dtypes, dims, batching,
decoupled) plus the deployment's choices: instance kind (KIND_CPU here, KIND_GPU on GPU pods), instances
per model, model family, checkpoint directory and dtype. The `1/model.py` adapters are copied from the
checked-in repository (`services/triton/model_repository`), which is itself `render_repository` with the
defaults (a test keeps the two identical).

    python -m vitaserve.triton.repository --out DIR [--kind gpu] [--instances 2] [--family small] \\
        [--checkpoint-dir /models/VITA-1.5] [--dtype bfloat16] [--models llm_decoder,speech_synth] \\
        [--llm-engine kv_cache_bytes=8589934592 --llm-engine max_batch=64]

Re-render the checked-in repository after changing a spec:
    python -m vitaserve.triton.repository --out services/triton/model_repository
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from vitaserve.components.tensors import MODELS, ModelSpec, TensorSpec
from vitaserve.families import FAMILIES

CHECKED_IN = Path(__file__).resolve().parents[3] / "services" / "triton" / "model_repository"
KINDS = {"cpu": ("KIND_CPU", "cpu"), "gpu": ("KIND_GPU", "cuda")}
DTYPES = ("float32", "bfloat16", "float16")
# speech_synth: segments one instance decodes together (its SpeechBatcher's batch size).
DEFAULT_MAX_STREAMS = 32
# llm_decoder's continuous-batching engine (`vitaserve.batching.EngineConfig`; a test keeps them equal).
LLM_ENGINE_DEFAULTS = {
    "kv_cache_tokens": "65536",
    "kv_cache_bytes": "0",
    "kv_block_size": "16",
    "max_batch": "32",
    "max_queue": "64",
    "prefill_chunk": "512",
    "prefix_cache": "true",
}
# speech_synth's batcher (`vitaserve.batching.SpeechBatchConfig`, its batch size is `max_streams`) and codec
# concurrency (`SpeechEngine(codec_workers=)`); a test keeps them equal to the code's defaults.
SPEECH_ENGINE_DEFAULTS = {
    "max_queue": "64",
    "kv_positions": "131072",
    "prompts_per_step": "4",
    "codec_workers": "1",
}
# llm_decoder's engine: "transformers" (the continuous-batching engine above) or "vllm"
# (`vitaserve.components.vllm_engine`, whose options are the vllm_* parameters; a test keeps them equal to
# `VllmOptions`' defaults). vLLM runs in its own Python environment: services/triton/README.md.
LLM_ENGINE_CHOICE = {
    "engine": "transformers",
    "vllm_tensor_parallel_size": "1",
    "vllm_dtype": "auto",
    "vllm_gpu_memory_utilization": "0.9",
    "vllm_kv_cache_bytes": "0",
    "vllm_max_num_seqs": "64",
    "vllm_max_model_len": "8192",
    "vllm_enforce_eager": "false",
    "vllm_max_queue": "256",
}
LLM_ENGINES = ("transformers", "vllm")
# llm_decoder's response stream (`vitaserve.triton.backend.TokenStream`): tokens per coalesced response,
# 0 = unbounded (a response carries every token produced since the stream's previous one).
LLM_STREAM_DEFAULTS = {"max_tokens_per_response": "0"}


def render_config(spec: ModelSpec, *, family: str = "", checkpoint_dir: str = "", dtype: str = "float32",
                  kind: str = "cpu",
                  instances: int = 1, max_streams: int = DEFAULT_MAX_STREAMS,
                  llm_engine: dict[str, str] | None = None, speech_engine: dict[str, str] | None = None) -> str:
    """The config.pbtxt text of one model. `llm_engine` overrides LLM_ENGINE_DEFAULTS (llm_decoder),
    `speech_engine` SPEECH_ENGINE_DEFAULTS (speech_synth). `family`: the model family (empty = the
    VITASERVE_MODEL_FAMILY environment variable of the server, else vita15)."""
    if family and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    kind_name, device = KINDS[kind]
    lines = [
        f"# Rendered by vitaserve.triton.repository from vitaserve.components.tensors ({spec.name}).",
        "# Change the spec or the deployment options and re-render; do not edit by hand.",
        f'name: "{spec.name}"',
        'backend: "python"',
        f"max_batch_size: {spec.max_batch_size}",
        "input [",
        ",\n".join(_tensor(t, is_input=True) for t in spec.inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t, is_input=False) for t in spec.outputs),
        "]",
    ]
    if spec.decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    if spec.batched:
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {', '.join(str(n) for n in spec.preferred_batch_sizes)} ]",
            f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}",
            "}",
        ]
    lines.append(f"instance_group [ {{ kind: {kind_name}, count: {instances} }} ]")
    params = {"family": family, "checkpoint_dir": checkpoint_dir, "dtype": dtype, "device": device}
    if spec.name == "llm_decoder":  # one engine thread batches every stream: no worker threads to size
        known = {**LLM_ENGINE_DEFAULTS, **LLM_ENGINE_CHOICE, **LLM_STREAM_DEFAULTS}
        unknown = sorted(set(llm_engine or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown llm_decoder engine parameter(s) {unknown}; known: {sorted(known)}")
        engine = (llm_engine or {}).get("engine", "transformers")
        if engine not in LLM_ENGINES:
            raise ValueError(f"llm_decoder engine must be one of {LLM_ENGINES}, got {engine!r}")
        params.update({**known, **{k: str(v) for k, v in (llm_engine or {}).items()}})
    elif spec.name == "speech_synth":
        unknown = sorted(set(speech_engine or {}) - set(SPEECH_ENGINE_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown speech_synth engine parameter(s) {unknown}; known: "
                             f"{sorted(SPEECH_ENGINE_DEFAULTS)} (the batch size is max_streams)")
        params["max_streams"] = str(max_streams)
        params.update({**SPEECH_ENGINE_DEFAULTS, **{k: str(v) for k, v in (speech_engine or {}).items()}})
    lines += [f'parameters {{ key: "{key}" value: {{ string_value: "{_escape(value)}" }} }}'
              for key, value in params.items()]
    return "\n".join(lines) + "\n"


def _tensor(t: TensorSpec, *, is_input: bool) -> str:
    fields = [f'name: "{t.name}"', f"data_type: {t.config_type}", f"dims: [ {', '.join(map(str, t.dims))} ]"]
    if is_input and t.optional:
        fields.append("optional: true")
    if is_input and t.ragged:
        fields.append("allow_ragged_batch: true")
    return f"  {{ {', '.join(fields)} }}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def render_repository(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "",
    checkpoint_dir: str = "",
    dtype: str = "float32",
    kind: str = "cpu",
    instances: int = 1,
    models: Iterable[str] | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    source: str | os.PathLike[str] | None = None,
    llm_engine: dict[str, str] | None = None,
    speech_engine: dict[str, str] | None = None,
) -> Path:
    """Write `<out_dir>/<model>/config.pbtxt` and `<out_dir>/<model>/1/model.py` for `models` (default:
    all four) and return `out_dir`.

    family: the model family baked into every config (`vitaserve.families`); empty = read
        VITASERVE_MODEL_FAMILY when the model loads, else vita15.
    checkpoint_dir: baked into every config; empty = read VITASERVE_CHECKPOINT_DIR when the model loads.
    kind: 'cpu' (KIND_CPU, device cpu) or 'gpu' (KIND_GPU, each instance on its GPU).
    instances: instances per model (per GPU under KIND_GPU).
    max_streams: segments one instance of speech_synth decodes together (its batch size).
    llm_engine: llm_decoder parameters overriding LLM_ENGINE_DEFAULTS (kv_cache_tokens, max_batch, ...) and
        LLM_STREAM_DEFAULTS (max_tokens_per_response).
    speech_engine: speech_synth parameters overriding SPEECH_ENGINE_DEFAULTS (max_queue, kv_positions, ...).
    source: repository to copy the model.py adapters from (default: the checked-in one).
    """
    names = list(MODELS) if models is None else list(models)
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        raise ValueError(f"unknown or no models {unknown or names}; known: {', '.join(MODELS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if instances < 1 or max_streams < 1:
        raise ValueError(f"instances and max_streams must be >= 1, got {instances} and {max_streams}")
    src = Path(source) if source is not None else CHECKED_IN
    out = Path(out_dir)
    for name in names:
        adapter = src / name / "1" / "model.py"
        if not adapter.is_file():
            raise FileNotFoundError(f"{adapter}: the model adapter to copy is missing")
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        config = render_config(MODELS[name], family=family, checkpoint_dir=checkpoint_dir, dtype=dtype,
                               kind=kind,
                               instances=instances, max_streams=max_streams, llm_engine=llm_engine,
                               speech_engine=speech_engine)
        (out / name / "config.pbtxt").write_text(config)
        target = out / name / "1" / "model.py"
        if not (target.exists() and target.samefile(adapter)):
            shutil.copyfile(adapter, target)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitaserve.triton.repository",
                                     description="Render the vitaserve Triton model repository for a deployment.")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--family", default="", choices=["", *FAMILIES],
                        help="model family, baked in; empty = $VITASERVE_MODEL_FAMILY, else vita15")
    parser.add_argument("--checkpoint-dir", default="", help="baked in; empty = $VITASERVE_CHECKPOINT_DIR")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--kind", default="cpu", choices=sorted(KINDS))
    parser.add_argument("--instances", type=int, default=1, help="instances per model (per GPU for gpu)")
    parser.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                        help="segments one instance of speech_synth decodes together (its batch size)")
    parser.add_argument("--llm-engine", action="append", default=[], metavar="KEY=VALUE",
                        help="llm_decoder engine/stream parameter, repeatable: "
                        + ", ".join([*LLM_ENGINE_DEFAULTS, *LLM_ENGINE_CHOICE, *LLM_STREAM_DEFAULTS]))
    parser.add_argument("--speech-engine", action="append", default=[], metavar="KEY=VALUE",
                        help="speech_synth engine parameter, repeatable: " + ", ".join(SPEECH_ENGINE_DEFAULTS))
    parser.add_argument("--models", default=None, help="comma-separated subset (default: all four)")
    parser.add_argument("--source", default=None,
                        help="repository to copy the model.py adapters from (default: the checked-in one; "
                             "images where the package is installed, not run from the source tree, pass it)")
    args = parser.parse_args(argv)
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        pairs = [item.split("=", 1) for item in args.llm_engine]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--llm-engine takes KEY=VALUE, got {args.llm_engine}")
        speech_pairs = [item.split("=", 1) for item in args.speech_engine]
        if any(len(p) != 2 for p in speech_pairs):
            raise ValueError(f"--speech-engine takes KEY=VALUE, got {args.speech_engine}")
        out = render_repository(args.out, family=args.family, checkpoint_dir=args.checkpoint_dir,
                                dtype=args.dtype, kind=args.kind,
                                instances=args.instances, models=models, max_streams=args.max_streams,
                                llm_engine=dict(pairs), speech_engine=dict(speech_pairs), source=args.source)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
