"""The wire contract of the four Triton models, declared once as data.

Both sides read these specs: each `model.py` validates its loaded `config.pbtxt` against its spec in
`initialize` (a mismatch fails the load) and reads/writes tensors by these names; `TritonComponents` builds
requests from them; `vitaserve.triton.repository` renders every `config.pbtxt` from them.

Models (dims exclude the batch dimension when `max_batch_size > 0`):

    vision_encoder  batched (dynamic batching)   one image per request
        IMAGE BYTES [1]          encoded PNG/JPEG/... bytes
        MAX_TILES INT32 [1]      1..12: 1 = the whole image as one 448² tile (real-time path)
        -> EMBEDDINGS FP32 [-1, -1]   vita15: (n_tiles·256, H), 256 rows per `<image>` placeholder, tiles
                                      in order; (0, 0) for a family whose LLM reads text
           TEXT BYTES [1]        small: the image's one-line description (UTF-8); empty for vita15
    audio_encoder   batched (dynamic, ragged: requests of different lengths share one execute)
        PCM FP32 [-1]            16 kHz mono in [-1, 1)
        -> EMBEDDINGS FP32 [-1, -1]   vita15: (n_tokens, H) for one `<audio>` placeholder; else (0, 0)
           TEXT BYTES [1]        small: the transcript of the spoken question; empty for vita15

The model family (`vitaserve.families`, parameter `family` of every config.pbtxt) decides which outputs
carry something: one wire contract serves every family, so clients and configs do not change with it.
    llm_decoder     decoupled (responses of one or more tokens each; continuous batching across requests)
        PROMPT BYTES [1]         ChatML prompt (UTF-8) with `<image>`/`<audio>` placeholders
        MEDIA_EMBEDS FP32 [-1, -1]  optional: the rows of all placeholders, concatenated in prompt order
        MEDIA_ROWS INT32 [-1]    optional: rows per placeholder (sums to MEDIA_EMBEDS' row count)
        MAX_TOKENS INT32 [1], TEMPERATURE FP32 [1], TOP_P FP32 [1], TOP_K INT32 [1]
        SEED INT64 [1]           optional: reproducible sampling
        SESSION_ID BYTES [1]     optional: the caller's session; its next request reuses the KV cache of
                                 this one where the prompt extends it exactly (`vitaserve.batching`)
        -> TOKEN_ID INT64 [-1]   the tokens produced since the stream's previous response, in order (one
                                 while the model's sender keeps up; several when it coalesces them); the
                                 last response ends with the entry -1 (no token: the detokeniser's rest)
           TEXT BYTES [-1]       one entry per TOKEN_ID entry: the text that token completes (UTF-8; may
                                 be empty), as the model's streaming detokeniser produced it
           FINISH_REASON BYTES [1]  empty until the last response: "stop" | "length" (of its last entry)
    speech_synth    decoupled (one response per audio chunk)
        TEXT BYTES [1]           one text segment (a sentence) of the reply
        FIRST_SENTENCE BOOL [1]  the reply's first segment: shorter first chunk, silence trim
        SEED INT64 [1]           optional: reproducible top-k sampling
        -> PCM FP32 [-1]         float32 mono chunk in [-1, 1]
           SAMPLE_RATE INT32 [1] 24000

Errors: a model answers a bad request with a Triton error whose message is `format_error(exc)`, i.e.
`"[<grpc status name>] <message>"`. Triton forwards the status code of a unary call but not of an error
sent in a gRPC stream (the stream carries only the message), so the code travels in the message and
`parse_error` restores the `VitaserveError` subclass on the client for both kinds of call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitaserve.components.base import Encoding
from vitaserve.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VitaserveError,
)

# Triton dtype name -> (config.pbtxt data_type, numpy dtype used on both sides).
TRITON_DTYPES: dict[str, tuple[str, Any]] = {
    "BYTES": ("TYPE_STRING", np.object_),
    "BOOL": ("TYPE_BOOL", np.bool_),
    "INT32": ("TYPE_INT32", np.int32),
    "INT64": ("TYPE_INT64", np.int64),
    "FP32": ("TYPE_FP32", np.float32),
}

NO_TOKEN = -1  # the TOKEN_ID entry ending a last llm_decoder response: it carries no token


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor. `dims` exclude the batch dimension of a batched model; -1 = any size.
    `ragged`: requests with different sizes of this input may share one execute (`allow_ragged_batch`)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unknown Triton dtype {self.dtype!r}")

    @property
    def config_type(self) -> str:
        """The `data_type` of config.pbtxt, e.g. TYPE_FP32."""
        return TRITON_DTYPES[self.dtype][0]

    @property
    def numpy_dtype(self) -> Any:
        return TRITON_DTYPES[self.dtype][1]


@dataclass(frozen=True)
class ModelSpec:
    """One Triton model: its tensors and scheduling. `max_batch_size` 0 = no batch dimension.
    `preferred_batch_sizes` / `max_queue_delay_us` configure the dynamic batcher of batched models (the
    delay is short because these calls sit on the time-to-first-audio path)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    decoupled: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, f"{self.name} input")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, f"{self.name} output")

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise RuntimeError naming every difference between a loaded model config (the JSON Triton
        passes to `initialize` as `args["model_config"]`) and this spec: name, tensor names, dtypes, dims,
        optional/ragged flags, batching on/off and the decoupled transaction policy."""
        problems: list[str] = []
        if config.get("name") != self.name:
            problems.append(f"name is {config.get('name')!r}, expected {self.name!r}")
        batch = int(config.get("max_batch_size", 0))
        if (batch > 0) != self.batched:
            want = f"> 0 (up to {self.max_batch_size})" if self.batched else "0 (no batching)"
            problems.append(f"max_batch_size is {batch}, expected {want}")
        decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        if decoupled != self.decoupled:
            problems.append(f"decoupled is {decoupled}, expected {self.decoupled}")
        for kind, specs, entries in (("input", self.inputs, config.get("input", [])),
                                     ("output", self.outputs, config.get("output", []))):
            problems += _check_tensors(kind, specs, entries)
        if problems:
            raise RuntimeError(f"config.pbtxt of model {self.name!r} does not match "
                               f"vitaserve.components.tensors: {'; '.join(problems)}")


def _by_name(specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no {what} named {name!r}")


def _check_tensors(kind: str, specs: tuple[TensorSpec, ...], entries: list[Mapping[str, Any]]) -> list[str]:
    problems = []
    got = {e.get("name"): e for e in entries}
    for spec in specs:
        entry = got.pop(spec.name, None)
        if entry is None:
            problems.append(f"{kind} {spec.name} is missing")
            continue
        dims = tuple(int(d) for d in entry.get("dims", []))
        if entry.get("data_type") != spec.config_type:
            problems.append(f"{kind} {spec.name} is {entry.get('data_type')}, expected {spec.config_type}")
        if dims != spec.dims:
            problems.append(f"{kind} {spec.name} has dims {list(dims)}, expected {list(spec.dims)}")
        if kind == "input" and bool(entry.get("optional", False)) != spec.optional:
            problems.append(f"input {spec.name} optional is {entry.get('optional', False)}, "
                            f"expected {spec.optional}")
        if kind == "input" and bool(entry.get("allow_ragged_batch", False)) != spec.ragged:
            problems.append(f"input {spec.name} allow_ragged_batch is {entry.get('allow_ragged_batch', False)}, "
                            f"expected {spec.ragged}")
    problems += [f"unexpected {kind} {name}" for name in got]
    return problems


VISION_ENCODER = ModelSpec(
    name="vision_encoder",
    inputs=(TensorSpec("IMAGE", "BYTES", (1,)), TensorSpec("MAX_TILES", "INT32", (1,))),
    outputs=(TensorSpec("EMBEDDINGS", "FP32", (-1, -1)), TensorSpec("TEXT", "BYTES", (1,))),
    max_batch_size=8,
    preferred_batch_sizes=(4, 8),
    max_queue_delay_us=2000,
)

AUDIO_ENCODER = ModelSpec(
    name="audio_encoder",
    inputs=(TensorSpec("PCM", "FP32", (-1,), ragged=True),),
    outputs=(TensorSpec("EMBEDDINGS", "FP32", (-1, -1)), TensorSpec("TEXT", "BYTES", (1,))),
    max_batch_size=8,
    preferred_batch_sizes=(4, 8),
    max_queue_delay_us=2000,
)

LLM_DECODER = ModelSpec(
    name="llm_decoder",
    inputs=(
        TensorSpec("PROMPT", "BYTES", (1,)),
        TensorSpec("MEDIA_EMBEDS", "FP32", (-1, -1), optional=True),
        TensorSpec("MEDIA_ROWS", "INT32", (-1,), optional=True),
        TensorSpec("MAX_TOKENS", "INT32", (1,)),
        TensorSpec("TEMPERATURE", "FP32", (1,)),
        TensorSpec("TOP_P", "FP32", (1,)),
        TensorSpec("TOP_K", "INT32", (1,)),
        TensorSpec("SEED", "INT64", (1,), optional=True),
        TensorSpec("SESSION_ID", "BYTES", (1,), optional=True),
    ),
    outputs=(
        TensorSpec("TOKEN_ID", "INT64", (-1,)),
        TensorSpec("TEXT", "BYTES", (-1,)),
        TensorSpec("FINISH_REASON", "BYTES", (1,)),
    ),
    decoupled=True,
)

SPEECH_SYNTH = ModelSpec(
    name="speech_synth",
    inputs=(
        TensorSpec("TEXT", "BYTES", (1,)),
        TensorSpec("FIRST_SENTENCE", "BOOL", (1,)),
        TensorSpec("SEED", "INT64", (1,), optional=True),
    ),
    outputs=(TensorSpec("PCM", "FP32", (-1,)), TensorSpec("SAMPLE_RATE", "INT32", (1,))),
    decoupled=True,
)

MODELS: dict[str, ModelSpec] = {s.name: s for s in (VISION_ENCODER, AUDIO_ENCODER, LLM_DECODER, SPEECH_SYNTH)}


# ---------------------------------------------------------------------------------------------------
# Media of llm_decoder: one array per placeholder <-> MEDIA_EMBEDS + MEDIA_ROWS


def pack_media(media: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The MEDIA_EMBEDS (all rows, in placeholder order) and MEDIA_ROWS (rows per placeholder) inputs for
    `media`, or no inputs at all when there is no media. Raises InvalidInput unless every array is a 2-D
    float array of one width."""
    arrays = [np.asarray(m) for m in media]
    if not arrays:
        return {}
    widths = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if None in widths or len(widths) != 1 or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
        raise InvalidInput("media must be 2-D float arrays (rows, H) of one width, got "
                           + ", ".join(f"{a.dtype} {a.shape}" for a in arrays))
    return {
        "MEDIA_EMBEDS": np.concatenate(arrays).astype(np.float32, copy=False),
        "MEDIA_ROWS": np.array([a.shape[0] for a in arrays], dtype=np.int32),
    }


def unpack_media(embeds: np.ndarray | None, rows: np.ndarray | None) -> list[np.ndarray]:
    """The inverse of `pack_media`. Raises InvalidInput if only one of the two inputs is given or the row
    counts do not add up to the rows of MEDIA_EMBEDS."""
    if embeds is None and rows is None:
        return []
    if embeds is None or rows is None:
        raise InvalidInput("MEDIA_EMBEDS and MEDIA_ROWS must be given together")
    counts = np.asarray(rows).reshape(-1).astype(np.int64)
    if embeds.ndim != 2 or (counts < 0).any() or int(counts.sum()) != embeds.shape[0]:
        raise InvalidInput(f"MEDIA_ROWS {counts.tolist()} do not split MEDIA_EMBEDS of shape {list(embeds.shape)}")
    return np.split(embeds, np.cumsum(counts)[:-1]) if counts.size else []


# ---------------------------------------------------------------------------------------------------
# Encoder outputs: Encoding <-> EMBEDDINGS + TEXT

_NO_ROWS = np.zeros((0, 0), dtype=np.float32)


def encoding_outputs(encoding: Encoding) -> dict[str, np.ndarray]:
    """The EMBEDDINGS and TEXT outputs of one encoder request (no batch dimension)."""
    rows = _NO_ROWS if encoding.embeddings is None else np.asarray(encoding.embeddings, dtype=np.float32)
    return {"EMBEDDINGS": rows, "TEXT": np.array([encoding.text.encode("utf-8")], dtype=np.object_)}


def encoding_from_outputs(embeddings: np.ndarray | None, text: np.ndarray | None) -> Encoding:
    """The inverse of `encoding_outputs` (a leading batch dimension of one is dropped); no rows or an empty
    text become None / ""."""
    rows = None
    if embeddings is not None:
        rows = embeddings[0] if embeddings.ndim == 3 else embeddings
        rows = None if rows.size == 0 else rows
    value = b""
    if text is not None and text.size:
        value = text.reshape(-1)[0]
    return Encoding(embeddings=rows, text=value.decode("utf-8") if isinstance(value, bytes) else str(value))


# ---------------------------------------------------------------------------------------------------
# Errors on the wire

_ERROR_CLASSES: dict[str, type[VitaserveError]] = {
    cls.code: cls
    for cls in (InvalidInput, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, Cancelled,
                Unauthenticated)
}
_ERROR_PATTERN = re.compile(r"^\[([A-Z_]+)\] (.*)$", re.DOTALL)


def format_error(exc: VitaserveError) -> str:
    """The message a model puts in its Triton error: `[INVALID_ARGUMENT] image data is empty`."""
    return f"[{exc.code}] {exc.message}"


def parse_error(message: str) -> VitaserveError | None:
    """The `VitaserveError` a `format_error` message stands for, or None if it has no code prefix
    (an error raised by Triton itself rather than by a vitaserve model)."""
    match = _ERROR_PATTERN.match(message or "")
    if match is None:
        return None
    code, text = match.groups()
    cls = _ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(text)
    err = VitaserveError(text)
    err.code = code
    return err
