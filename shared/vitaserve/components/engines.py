"""The component logic: what each Triton model (and the in-process client) computes, in plain Python.

Each engine is built from a `CheckpointDir` and loads only its own weights, so a Triton deployment of one
component holds only that component's memory:

- `VisionEngine`  image bytes -> tiles -> one batched InternViT forward -> 256 LLM rows per tile
- `AudioEngine`   16 kHz PCM -> fbank -> one padded batch through the whale encoder + adapter
- `LLMEngine`     ChatML prompt + media rows -> streamed `TokenDelta`s (cancellable between tokens); requests
                  of all callers share decode steps in one `vitaserve.batching.BatchEngine`. Built from a
                  checkpoint (VITA-1.5, `LLMEngine.from_checkpoint`) or from any loaded causal LM (a plain
                  Hugging Face one reads text-only prompts)
- `SpeechEngine`  a text segment -> speech codes -> streamed 24 kHz float32 PCM chunks (cancellable); the
                  segments of all callers share decode steps in one `vitaserve.batching.SpeechBatcher`

Batched engines split their work into `preprocess` (per item; a bad item raises `InvalidInput` without
affecting the others) and `forward` (one torch call for many items), so a Triton `execute()` can answer a
bad request with an error and still batch the good ones. Streaming engines validate everything when called
and return a generator; `is_cancelled()` is polled before every token, so a cancelled stream stops after
at most the step in flight.

Engines are thread-safe for concurrent calls: torch modules are only read, and the Hugging Face fast
tokenizer (whose encode mutates its Rust state) is used under a lock.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitaserve.batching import (
    BatchEngine,
    CodeSampling,
    EngineConfig,
    RequestHandle,
    SpeechBatchConfig,
    SpeechBatcher,
    SpeechHandle,
    TokenSink,
    sequence_keys,
)
from vitaserve.components.base import GenerationParams, ImageInput, TokenDelta, check_speech_request
from vitaserve.errors import InvalidInput, VitaserveError
from vitaserve.models.audio import kaldi_fbank, validate_waveform
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.codec import StreamingDecoder
from vitaserve.models.configs import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, SPEECH_SAMPLE_RATE, TOKENS_PER_TILE
from vitaserve.models.image import DEFAULT_MAX_PIXELS, decode_image, dynamic_preprocess, tiles_to_pixel_values
from vitaserve.models.llm import SamplingParams, StreamDetokenizer
from vitaserve.models.prompt import (
    AUDIO_PLACEHOLDER,
    ENDOFTEXT,
    IM_END,
    IMAGE_PLACEHOLDER,
    strip_state_marks,
    tokenize_with_placeholders,
)

IsCancelled = Callable[[], bool]

MAX_IMAGE_TILES = 12
MAX_GENERATION_TOKENS = 8192
MAX_PROMPT_CHARS = 262_144
# Safety bound on speech codes per segment: a trained decoder emits EOS after ~40 codes per second of
# speech, but untrained (tiny random) weights may never emit it. 15 codes per text token is ~0.4 s of
# speech per token, far above natural speech; 1000 codes = 25 s is the reference's own cap.
SPEECH_MAX_CODES = 1000
SPEECH_CODES_BASE = 30
SPEECH_CODES_PER_TEXT_TOKEN = 15
# How often a speech consumer waiting for codes checks its request's cancellation.
SPEECH_CANCEL_POLL_S = 0.02


def _never() -> bool:
    return False


class LockedTokenizer:
    """A Hugging Face tokenizer whose calls are serialised: concurrent `encode` calls on one fast tokenizer
    can fail with 'Already borrowed' because encoding reconfigures the Rust tokenizer's state."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        with self._lock:
            return self._tok.decode(ids, **kwargs)

    def token_id(self, token: str) -> int | None:
        """The id of a single (special) token, or None if the vocabulary lacks it."""
        with self._lock:
            tid = self._tok.convert_tokens_to_ids(token)
            unknown = tid is not None and tid == self._tok.unk_token_id and token != self._tok.unk_token
        return None if tid is None or unknown else int(tid)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise InvalidInput(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Vision


class VisionEngine:
    """Images -> LLM embedding rows: (n_tiles·256, H) float32 per image.

    `max_forward_tiles` bounds one forward's batch (memory): more tiles are run in consecutive chunks of
    that size, which gives the same rows.
    """

    def __init__(self, checkpoint: CheckpointDir, *, dtype: str = "float32", device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_forward_tiles: int = 64) -> None:
        self.model = checkpoint.load_vision(dtype, device)
        self.hidden_size = checkpoint.config.vision.llm_hidden_size
        self.max_pixels = max_pixels
        self.max_forward_tiles = max_forward_tiles

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Decode and tile one image: float32 pixel values (n_tiles, 3, 448, 448). Raises InvalidInput for
        bad bytes, too many pixels or max_tiles outside 1..12."""
        if not isinstance(image, ImageInput):
            raise InvalidInput(f"expected an ImageInput, got {type(image).__name__}")
        max_tiles = _check_int(image.max_tiles, "max_tiles", 1, MAX_IMAGE_TILES)
        if not isinstance(image.data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"image data must be bytes, got {type(image.data).__name__}")
        img = decode_image(bytes(image.data), max_pixels=self.max_pixels)
        return tiles_to_pixel_values(dynamic_preprocess(img, min_num=1, max_num=max_tiles))

    @torch.inference_mode()
    def forward(self, pixel_values: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """All tiles of all images through the encoder together; split back per image."""
        if not pixel_values:
            return []
        tiles = torch.cat(list(pixel_values))
        rows = [self.model(tiles[i:i + self.max_forward_tiles])
                for i in range(0, tiles.shape[0], self.max_forward_tiles)]
        flat = torch.cat(rows).float().cpu().numpy()  # (total_tiles, 256, H)
        out, start = [], 0
        for pv in pixel_values:
            n = pv.shape[0]
            out.append(np.ascontiguousarray(flat[start:start + n].reshape(n * TOKENS_PER_TILE, -1)))
            start += n
        return out

    def encode(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        return self.forward([self.preprocess(image) for image in images])


# ---------------------------------------------------------------------------------------------------
# Audio


class AudioEngine:
    """16 kHz mono PCM -> (n_tokens, H) float32 rows for one `<audio>` placeholder (12.5 per second)."""

    def __init__(self, checkpoint: CheckpointDir, *, dtype: str = "float32", device: str = "cpu",
                 max_seconds: float = 60.0) -> None:
        self.model = checkpoint.load_audio(dtype, device)
        self.device = torch.device(device)
        self.hidden_size = checkpoint.config.audio.llm_hidden_size
        self.max_seconds = max_seconds

    def preprocess(self, pcm: np.ndarray) -> torch.Tensor:
        """Validate one waveform and compute its fbank (T, 80). Raises InvalidInput for a wrong shape or
        dtype, NaN/inf samples, or a duration outside 85 ms .. max_seconds."""
        wave = np.asarray(pcm)
        if not np.issubdtype(wave.dtype, np.floating):
            raise InvalidInput(f"PCM must be floating point in [-1, 1), got dtype {wave.dtype}")
        if wave.ndim != 1:
            raise InvalidInput(f"PCM must be 1-D mono at 16 kHz, got shape {wave.shape}")
        validate_waveform(wave, max_seconds=self.max_seconds)
        return kaldi_fbank(wave.astype(np.float32, copy=False))

    @torch.inference_mode()
    def forward(self, feats: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Pad the fbanks into one batch with lengths, run it once, slice each item's valid rows."""
        if not feats:
            return []
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
        batch = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1], dtype=torch.float32)
        for i, f in enumerate(feats):
            batch[i, :f.shape[0]] = f
        embeds, n_tokens = self.model(batch.to(self.device), lengths.to(self.device))
        embeds = embeds.float().cpu().numpy()
        return [np.ascontiguousarray(embeds[i, :int(n)]) for i, n in enumerate(n_tokens.tolist())]

    def encode(self, pcms: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.forward([self.preprocess(pcm) for pcm in pcms])


# ---------------------------------------------------------------------------------------------------
# LLM


def check_generation_params(params: GenerationParams) -> GenerationParams:
    """Raise InvalidInput unless max_tokens is in 1..8192, temperature >= 0, 0 < top_p <= 1, top_k >= 0
    and seed is None or a 64-bit integer."""
    if not isinstance(params, GenerationParams):
        raise InvalidInput(f"expected GenerationParams, got {type(params).__name__}")
    _check_int(params.max_tokens, "max_tokens", 1, MAX_GENERATION_TOKENS)
    t, p = params.temperature, params.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise InvalidInput(f"temperature must be a finite number >= 0, got {t!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise InvalidInput(f"top_p must be in (0, 1], got {p!r}")
    _check_int(params.top_k, "top_k", 0, 2**31 - 1)
    if params.seed is not None:
        _check_int(params.seed, "seed", -(2**63), 2**63 - 1)
    return params


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated request for the batch engine: spliced prompt rows, their prefix-cache keys, sampling."""

    embeds: torch.Tensor
    keys: np.ndarray
    sampling: SamplingParams


class _QueueSink:
    """A TokenSink that hands the engine's results to the thread iterating `LLMEngine.generate`."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def on_token(self, token_id: int) -> None:
        self.items.put(("token", token_id))

    def on_finish(self, reason: str, error: VitaserveError | None) -> None:
        self.items.put(("finish", (reason, error)))


class PromptBuilder:
    """What every LLM engine does before it generates: check a ChatML prompt, its media rows and sampling,
    tokenise, and turn the prompt into embedding rows: media rows spliced into the `<image>`/`<audio>`
    placeholders (VITA-1.5), or the text's rows alone (a text-only model). Shared by `LLMEngine` (the
    transformers batch engine) and `vitaserve.components.vllm_engine.VllmLLMEngine`, so both engines take
    exactly the same requests and see exactly the same rows.

    `embedder` is the loaded causal LM, or only its embedding side (`vitaserve.models.llm.TextEmbedder` /
    `PromptEmbedder`: the table alone, for an engine that holds the rest of the model itself): it has
    `model.embed_tokens`, `config` (hidden_size), `dtype`, `device`; one with `splice_embeddings` (and
    `_check_embeds`) takes media.
    """

    def __init__(self, embedder: Any, tokenizer: Any, *, raw_config: dict[str, Any] | None = None) -> None:
        self.embedder = embedder
        self.tokenizer = tokenizer if isinstance(tokenizer, LockedTokenizer) else LockedTokenizer(tokenizer)
        self.hidden_size = int(embedder.config.hidden_size)
        # VITA's LLM splices encoder rows into placeholders; any other model reads text only.
        self.takes_media = callable(getattr(embedder, "splice_embeddings", None))
        if raw_config is None:
            raw_config = {"eos_token_id": getattr(embedder.config, "eos_token_id", None)}
        self.stop_ids = self._stop_ids(raw_config)

    def _stop_ids(self, raw_config: dict[str, Any]) -> frozenset[int]:
        """`<|im_end|>` (the end of a ChatML turn), `<|endoftext|>`, and the tokenizer's and config's eos."""
        ids = {self.tokenizer.token_id(IM_END), self.tokenizer.token_id(ENDOFTEXT), self.tokenizer.eos_token_id}
        eos = raw_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
        return frozenset(int(i) for i in ids if i is not None)

    def prepare(self, prompt: str, media: Sequence[np.ndarray], params: GenerationParams) -> PreparedPrompt:
        """Validate and splice (raising InvalidInput): `media[k]` fills the k-th placeholder of `prompt`,
        256 rows for `<image>`, at least one for `<audio>`, each (rows, H). A text-only model (see
        `takes_media`) takes no media and no placeholders."""
        check_generation_params(params)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput("prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"prompt is too long: {len(prompt)} characters, at most {MAX_PROMPT_CHARS}")
        if self.takes_media:
            ids = tokenize_with_placeholders(self.tokenizer, prompt)
            images, audios, arrays = self._check_media(ids, media)
            # _check_embeds: finite rows only
            embeds = self.embedder._check_embeds(self.embedder.splice_embeddings(ids, images, audios))
        else:
            ids, embeds = self._embed_text(prompt, media)
            arrays = []
        sampling = SamplingParams.checked(int(params.max_tokens), float(params.temperature), int(params.top_k),
                                          float(params.top_p), None if params.seed is None else int(params.seed),
                                          self.stop_ids)
        return PreparedPrompt(embeds, sequence_keys(ids, arrays), sampling)

    def _embed_text(self, prompt: str, media: Sequence[np.ndarray]) -> tuple[list[int], torch.Tensor]:
        """A text-only model's prompt rows: the ids of `prompt` (no added BOS; ChatML markers map to their
        special ids) through the model's embedding table."""
        n_media = len(list(media))
        if n_media:
            raise InvalidInput(f"this model takes no media: {n_media} media array(s) were given with a "
                               "text-only prompt (put image descriptions and transcripts into its text)")
        for placeholder in (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER):
            if placeholder in prompt:
                raise InvalidInput(f"this model takes no media: the prompt holds the placeholder "
                                   f"{placeholder!r}")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise InvalidInput("the prompt has no tokens")
        with torch.no_grad():
            rows = torch.tensor(ids, dtype=torch.long, device=self.embedder.device)
            embeds = self.embedder.model.embed_tokens(rows)
        return ids, embeds

    def _check_media(self, ids: list[int], media: Sequence[np.ndarray]
                     ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[np.ndarray]]:
        kinds = ["<image>" if i == IMAGE_TOKEN_ID else "<audio>" for i in ids
                 if i in (IMAGE_TOKEN_ID, AUDIO_TOKEN_ID)]
        media = list(media)
        if len(media) != len(kinds):
            raise InvalidInput(f"the prompt has {len(kinds)} media placeholder(s) ({', '.join(kinds) or 'none'}) "
                               f"but {len(media)} media array(s) were given")
        images, audios, arrays = [], [], []
        for k, (kind, rows) in enumerate(zip(kinds, media)):
            arr = np.asarray(rows)
            if arr.ndim != 2 or arr.shape[1] != self.hidden_size or not np.issubdtype(arr.dtype, np.floating):
                raise InvalidInput(f"media[{k}] (for {kind}) must be a float (rows, {self.hidden_size}) array, "
                                   f"got {arr.dtype} {arr.shape}")
            if kind == "<image>" and arr.shape[0] != TOKENS_PER_TILE:
                raise InvalidInput(f"media[{k}] fills an <image> placeholder and must have {TOKENS_PER_TILE} "
                                   f"rows (one tile), got {arr.shape[0]}")
            if arr.shape[0] == 0:
                raise InvalidInput(f"media[{k}] (for {kind}) has no rows")
            arr = arr.astype(np.float32)
            arrays.append(arr)
            (images if kind == "<image>" else audios).append(torch.from_numpy(arr))
        return (torch.stack(images) if images else None), audios, arrays


class LLMEngine:
    """Streamed generation for ChatML prompts with their media rows spliced into the placeholders.

    Every request goes through one `vitaserve.batching.BatchEngine` (started at the first request), so
    concurrent callers share decode steps. `engine_config` sets its KV budget, batch and queue sizes.

    `LLMEngine.from_checkpoint(checkpoint, ...)` loads VITA-1.5's LLM (`VitaLLM`, which splices media rows
    into the `<image>`/`<audio>` placeholders); `LLMEngine(model, tokenizer)` wraps an already loaded model.
    A model without `splice_embeddings` (a plain Hugging Face causal LM) takes text-only prompts.
    """

    def __init__(self, model: Any, tokenizer: Any, *, raw_config: dict[str, Any] | None = None,
                 engine_config: EngineConfig | None = None,
                 after_step: Callable[[], None] | None = None) -> None:
        """An engine over an already loaded `model` (eval mode, on its device) and its `tokenizer` (a Hugging
        Face tokenizer or a `LockedTokenizer`); `from_checkpoint` loads VITA-1.5's.

        The model must look like a Hugging Face causal LM to the batch engine: `model.model` (the decoder,
        with `embed_tokens`, taking a 4-D boolean `attention_mask`, `position_ids` and a
        `cache=` whose `update()` it calls per layer), `model.lm_head`, `model.config`, `model.dtype` and
        `model.device`. `raw_config` supplies `eos_token_id` for the stop ids (default: `model.config`'s).
        """
        needed = ("model", "lm_head", "config", "dtype", "device")
        missing = [name for name in needed if not hasattr(model, name)]
        if not missing and not hasattr(model.model, "embed_tokens"):
            missing.append("model.embed_tokens")
        if missing:
            raise TypeError(f"{type(model).__name__} is not a causal LM the batch engine can run: it lacks "
                            f"{', '.join(missing)}")
        self.model = model
        self.prompts = PromptBuilder(model, tokenizer, raw_config=raw_config)
        self.tokenizer = self.prompts.tokenizer
        self.hidden_size = self.prompts.hidden_size
        self.takes_media = self.prompts.takes_media
        self._after_step = after_step
        self.engine_config = engine_config or EngineConfig()
        self._batcher: BatchEngine | None = None
        self._batcher_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint: CheckpointDir, *, dtype: str = "float32", device: str = "cpu",
                        engine_config: EngineConfig | None = None,
                        after_step: Callable[[], None] | None = None) -> LLMEngine:
        """VITA-1.5's LLM and tokenizer from a checkpoint in the released layout."""
        return cls(checkpoint.load_llm(dtype, device), checkpoint.tokenizer(),
                   raw_config=checkpoint.raw_config, engine_config=engine_config, after_step=after_step)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.prompts.stop_ids

    @stop_ids.setter
    def stop_ids(self, ids: frozenset[int]) -> None:
        self.prompts.stop_ids = ids

    @property
    def batcher(self) -> BatchEngine:
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = BatchEngine(self.model, self.engine_config, after_step=self._after_step)
            return self._batcher

    def describe(self) -> str:
        """One log line: the engine and its budget (starts the batch engine: a budget that does not fit
        fails here)."""
        pool = self.batcher.pool
        return (f"engine transformers, KV pool {pool.capacity_tokens} tokens ({pool.bytes / 2**20:.1f} MiB), "
                f"{self.engine_config}")

    def close(self) -> None:
        """Stop the batch engine; unfinished requests end with Unavailable."""
        with self._batcher_lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def prepare(self, prompt: str, media: Sequence[np.ndarray], params: GenerationParams) -> PreparedPrompt:
        """`PromptBuilder.prepare`: the checked, spliced request (raises InvalidInput)."""
        return self.prompts.prepare(prompt, media, params)

    def submit(self, prepared: PreparedPrompt, sink: TokenSink, *, session_id: str = "",
               is_cancelled: IsCancelled | None = None) -> RequestHandle:
        """Queue a prepared request on the batch engine (ResourceExhausted when its queue is full)."""
        return self.batcher.submit(prepared.embeds, prepared.keys, prepared.sampling, sink,
                                   session_id=session_id, is_cancelled=is_cancelled)

    def generate(self, prompt: str, media: Sequence[np.ndarray], params: GenerationParams,
                 is_cancelled: IsCancelled = _never, *, session_id: str = "") -> Iterator[TokenDelta]:
        """Validate, prepare and queue (raising InvalidInput / ResourceExhausted at once), then return the
        stream of deltas.

        The last delta has `finish_reason` "stop", "length" or "cancelled" and carries no token;
        `is_cancelled()` is polled before every token (and while waiting), and closing the stream cancels
        the request in the engine. `session_id` lets the session's next turn reuse this one's KV cache.
        """
        sink = _QueueSink()
        handle = self.submit(self.prepare(prompt, media, params), sink, session_id=session_id)
        return self._deltas(sink, handle, is_cancelled)

    def _deltas(self, sink: _QueueSink, handle: RequestHandle, is_cancelled: IsCancelled) -> Iterator[TokenDelta]:
        detok = StreamDetokenizer(self.tokenizer)
        finish = None
        try:
            while True:
                if is_cancelled():
                    finish = "cancelled"
                    break
                try:
                    kind, value = sink.items.get(timeout=0.05)
                except queue.Empty:
                    continue
                if kind == "token":
                    yield TokenDelta(int(value), detok.push(int(value)))
                    continue
                reason, error = value
                if error is not None:
                    raise error
                finish = reason
                break
        finally:
            if not handle.done:
                handle.cancel()  # closed early or cancelled: frees the engine slot at its next step
        yield TokenDelta(None, detok.flush(), finish_reason=finish)


# ---------------------------------------------------------------------------------------------------
# Speech


def speech_code_limit(n_text_tokens: int) -> int:
    """The safety bound on speech codes for a segment of `n_text_tokens` (see SPEECH_MAX_CODES)."""
    return min(SPEECH_MAX_CODES, SPEECH_CODES_BASE + SPEECH_CODES_PER_TEXT_TOKEN * n_text_tokens)


class _CodeChannel:
    """The speech batcher's CodeSink for one segment: codes gather here (engine thread) until the consumer
    takes them (its own thread). The consumer is woken only once `want` codes are in or the segment
    ended, so it wakes about once per codec window, not once per code."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._codes: list[int] = []
        self._end: tuple[str, VitaserveError | None] | None = None
        self._want = 1

    def on_code(self, code: int) -> None:
        with self._cv:
            self._codes.append(code)
            if len(self._codes) >= self._want:
                self._cv.notify()

    def on_finish(self, reason: str, error: VitaserveError | None) -> None:
        with self._cv:
            self._end = (reason, error)
            self._cv.notify()

    def take(self, want: int, timeout: float) -> tuple[list[int], tuple[str, VitaserveError | None] | None]:
        """Wait up to `timeout` s for `want` codes or the end; return the codes so far and the end (once
        set, every code is already in the list)."""
        with self._cv:
            self._want = want
            if len(self._codes) < want and self._end is None:
                self._cv.wait(timeout)
            codes, self._codes = self._codes, []
            return codes, self._end


class SpeechStream:
    """The PCM chunks of one segment (an iterator; `close()` cancels the segment), with its batcher
    handle (None for text with nothing to speak) for stats such as the batch sizes it ran in."""

    def __init__(self, chunks: Iterator[np.ndarray], handle: SpeechHandle | None) -> None:
        self._chunks = chunks
        self.handle = handle

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


class SpeechEngine:
    """A text segment -> streamed 24 kHz float32 PCM chunks (the reference's speech decoder + codec).

    The speech decoder's AR loop runs in one `vitaserve.batching.SpeechBatcher` shared by every caller:
    the segments of all sessions advance together, one code each per batched step. The codec runs on
    the caller's thread (the one iterating `synthesize`), at most `codec_workers` windows at a time over
    all callers, so codec work queues instead of thrashing the cores the batched step needs.
    """

    def __init__(self, checkpoint: CheckpointDir, *, dtype: str = "float32", device: str = "cpu",
                 batch_config: SpeechBatchConfig | None = None, codec_workers: int = 1) -> None:
        if codec_workers < 1:
            raise ValueError(f"codec_workers must be >= 1, got {codec_workers}")
        self.tokenizer = LockedTokenizer(checkpoint.tokenizer())
        self.embeddings = checkpoint.load_embedding_table(dtype, device)
        self.decoder = checkpoint.load_speech_decoder(dtype, device)
        self.codec = checkpoint.load_codec(dtype, device)
        self.device = torch.device(device)
        self.sample_rate = SPEECH_SAMPLE_RATE
        self.samples_per_code = self.codec.cfg.samples_per_token
        self.batch_config = batch_config or SpeechBatchConfig()
        self._codec_slots = threading.BoundedSemaphore(codec_workers)
        self._batcher: SpeechBatcher | None = None
        self._batcher_lock = threading.Lock()

    @property
    def stream_capacity(self) -> int:
        """Segments this engine holds at once (batched + queued): more are RESOURCE_EXHAUSTED."""
        return self.batch_config.max_batch + self.batch_config.max_queue

    @property
    def batcher(self) -> SpeechBatcher:
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = SpeechBatcher(self.decoder, self.batch_config)
            return self._batcher

    def close(self) -> None:
        """Stop the batcher; unfinished segments end with Unavailable."""
        with self._batcher_lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def synthesize(self, text: str, first_sentence: bool = False, seed: int | None = None,
                   is_cancelled: IsCancelled = _never, *, greedy: bool = False) -> SpeechStream:
        """Validate and queue the segment (raising InvalidInput or ResourceExhausted at once), then return
        the stream of PCM chunks.

        The state marks are stripped; text that is empty afterwards yields no chunks. Codes are drawn by
        top-k 2 sampling from a generator seeded with `seed` (or argmax with `greedy`); a segment's codes
        do not depend on the segments it is batched with. The first sentence uses the reference's 20-code
        first chunk, 0.1 join threshold and silence trim; later sentences 40 codes and 0.015.
        `is_cancelled()` is polled by the consumer (the caller's thread) at least every
        SPEECH_CANCEL_POLL_S; a cancelled segment leaves the batch at the next step and its remaining
        audio is dropped.
        """
        check_speech_request(text, seed)
        clean = strip_state_marks(text)[0].strip()
        ids = self.tokenizer.encode(clean, add_special_tokens=False) if clean else []
        if not ids:
            return SpeechStream(iter(()), None)
        hidden = self.decoder.text_to_hidden(self.embeddings[torch.tensor(ids, device=self.embeddings.device)])
        generator = None
        if seed is not None and not greedy:
            # torch.Generator seeds must be non-negative 64-bit values.
            generator = torch.Generator(device=self.device).manual_seed(int(seed) & (2**64 - 1))
        channel = _CodeChannel()
        sampling = CodeSampling(max_tokens=speech_code_limit(len(ids)), top_k=2, greedy=greedy)
        # The batcher is not handed `is_cancelled`: it would ask it for every running segment at every
        # step on its one thread, and under Triton each ask is an IPC round trip. The consumer asks it
        # (at least every SPEECH_CANCEL_POLL_S while it waits) and cancels the handle, which the batcher reads
        # at its next step.
        handle = self.batcher.submit(hidden, sampling, channel, generator=generator)
        if first_sentence:
            stream = StreamingDecoder(self.codec, first_chunk=20, first_threshold=0.1, trim_silence=True)
        else:
            stream = StreamingDecoder(self.codec, first_chunk=40, first_threshold=0.015, trim_silence=False)
        return SpeechStream(self._chunks(channel, handle, stream, is_cancelled), handle)

    def _chunks(self, channel: _CodeChannel, handle: SpeechHandle, stream: StreamingDecoder,
                is_cancelled: IsCancelled) -> Iterator[np.ndarray]:
        try:
            while True:
                if is_cancelled():
                    return  # a cancelled segment's remaining audio is dropped, not flushed
                codes, end = channel.take(stream.codes_until_decode, timeout=SPEECH_CANCEL_POLL_S)
                if codes:
                    with self._codec_slots:
                        pieces = [piece for code in codes for piece in stream.push(code)]
                    yield from pieces
                if end is not None:
                    reason, error = end
                    if error is not None:
                        raise error
                    if reason == "cancelled":
                        return
                    break
        finally:
            if not handle.done:
                handle.cancel()  # closed early or cancelled: frees the batch row at the next step
        with self._codec_slots:
            rest = stream.flush()
        yield from rest
