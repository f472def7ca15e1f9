"""The VITA-1.5 language model: Qwen2 with multimodal embedding splicing and streamed generation.

Implements `tests/golden/vita15_architecture.md` §5.2–§5.4:
- `VitaLLM` is `transformers.Qwen2ForCausalLM`; its state_dict keys (`model.embed_tokens.weight`,
  `model.layers.N.*`, `model.norm.weight`, `lm_head.weight`) are the checkpoint's keys (prefix "").
- `VitaLLM.splice_embeddings` replaces the k-th −200 by the k-th image tile's 256 feature rows and the
  m-th −500 by the m-th audio's feature rows; text ids are embedded in one lookup. Unlike the HF
  reference, no dummy image/audio is needed for rows without media.
- `VitaLLM.generate_stream` prefills the spliced embeddings into a KV cache, then feeds one token per
  step at positions continuing after the cache; greedy (ties → lowest id) or seeded sampling.
- `StreamDetokenizer` / `detokenize_stream` turn ids into text deltas without broken UTF-8.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID

AttnImplementation = Literal["eager", "sdpa"]
FinishReason = Literal["stop", "length", "cancelled"]

# Keys of the reference config that are not Qwen2Config fields but are still understood by it
# (transformers moves them into `rope_parameters`).
_LEGACY_QWEN2_KEYS = frozenset({"rope_theta", "rope_scaling"})


def llm_config_from_reference(d: dict[str, Any], *, attn_implementation: AttnImplementation = "sdpa"
                              ) -> Qwen2Config:
    """Build the Qwen2Config of the LLM from the reference's `config.json` dict (VITAQwen2Config).

    Keys that are not Qwen2Config fields (mm_*, audio encoder settings, generation defaults of the old
    PretrainedConfig) are dropped. Only plain RoPE without scaling and no sliding window are supported.
    Eager and sdpa attention both match the reference (eager) golden to < 1e-6; sdpa is the default
    because it never materialises the (heads, L, L) score matrix.
    """
    fields = {f.name for f in dataclasses.fields(Qwen2Config)} | _LEGACY_QWEN2_KEYS
    kwargs = {k: v for k, v in d.items() if k in fields}
    if kwargs.get("rope_scaling") or kwargs.get("use_sliding_window"):
        raise ValueError("rope scaling and sliding-window attention are not supported "
                         "(VITA-1.5 uses neither)")
    cfg = Qwen2Config(**kwargs)
    cfg._attn_implementation = attn_implementation
    return cfg


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class VitaLLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM plus splicing (§5.2) and streamed generation with a KV cache (§5.4).

    Builds on the meta device. The rotary table (`model.rotary_emb.inv_freq`, non-persistent) is
    rebuilt right after `load_state_dict(..., assign=True)` (or at the first forward) if it is still on
    meta; after `to_empty()` it holds garbage, so call `reset_derived_buffers()` explicitly.
    """

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model.rotary_emb.register_forward_pre_hook(self._rope_pre_hook)
        self.register_load_state_dict_post_hook(self._rope_post_load_hook)

    # ---- derived buffers -------------------------------------------------------------------------
    def reset_derived_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent RoPE tables (on `device`, default: the embedding's device)."""
        rot = self.model.rotary_emb
        device = torch.device(device) if device is not None else self.model.embed_tokens.weight.device
        inv_freq, scaling = rot.compute_default_rope_parameters(self.config)
        rot.inv_freq = inv_freq.to(device)
        rot.original_inv_freq = inv_freq.clone().to(device)
        rot.attention_scaling = scaling

    def _rope_post_load_hook(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        if self.model.rotary_emb.inv_freq.is_meta and not self.model.embed_tokens.weight.is_meta:
            self.reset_derived_buffers()

    def _rope_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if module.inv_freq.is_meta and not x.is_meta:
            self.reset_derived_buffers(x.device)

    # ---- splicing --------------------------------------------------------------------------------
    def splice_embeddings(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        image_features: torch.Tensor | None = None,
        audio_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embed `input_ids` (L,) with media spliced in; returns (L', H) in the embedding dtype.

        image_features: (N_tiles, T, H) — the k-th −200 takes image_features[k] (T = 256 rows).
        audio_features: one (n_m, H) tensor per audio — the m-th −500 takes audio_features[m].
        Raises `InvalidInput` if the placeholder counts differ from the media given, an id is outside
        the vocabulary, or a feature tensor has the wrong shape.
        """
        ids = self._check_ids(input_ids)
        is_img, is_aud = ids == IMAGE_TOKEN_ID, ids == AUDIO_TOKEN_ID
        n_img, n_aud = int(is_img.sum()), int(is_aud.sum())
        hidden = self.config.hidden_size
        images = self._check_images(image_features, n_img, hidden)
        audios = self._check_audios(audio_features, n_aud, hidden)

        text_mask = ~(is_img | is_aud)
        text_emb = self._embed(ids[text_mask])  # one lookup for all text ids
        dtype, device = text_emb.dtype, text_emb.device

        pieces: list[torch.Tensor] = []
        text_pos = img_k = aud_m = 0
        run_start = 0
        for pos in torch.nonzero(~text_mask).flatten().tolist():
            run = pos - run_start
            pieces.append(text_emb[text_pos:text_pos + run])
            text_pos += run
            if is_img[pos]:
                pieces.append(images[img_k].to(device=device, dtype=dtype))
                img_k += 1
            else:
                pieces.append(audios[aud_m].to(device=device, dtype=dtype))
                aud_m += 1
            run_start = pos + 1
        pieces.append(text_emb[text_pos:])
        return torch.cat(pieces, dim=0)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight
        with torch.no_grad():
            return self.model.embed_tokens(ids.to(weight.device))

    def _check_ids(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidInput(f"input_ids must be a sequence of integers: {e}") from None
        if ids.dim() != 1 or ids.numel() == 0:
            raise InvalidInput(f"input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise InvalidInput(f"input_ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.long).cpu()
        placeholder = (ids == IMAGE_TOKEN_ID) | (ids == AUDIO_TOKEN_ID)
        bad = ~placeholder & ((ids < 0) | (ids >= self.config.vocab_size))
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0])
            raise InvalidInput(f"input id {int(ids[pos])} at position {pos} is outside the vocabulary "
                               f"[0, {self.config.vocab_size}) and is not a placeholder (-200/-500)")
        return ids

    @staticmethod
    def _check_images(feats: torch.Tensor | None, n_placeholders: int, hidden: int) -> torch.Tensor | None:
        if feats is not None and not (isinstance(feats, torch.Tensor) and feats.dim() == 3
                                      and feats.shape[2] == hidden and feats.is_floating_point()):
            raise InvalidInput(f"image_features must be a float (N_tiles, T, {hidden}) tensor, "
                               f"got {_describe(feats)}")
        n_given = 0 if feats is None else feats.shape[0]
        if n_given != n_placeholders:
            raise InvalidInput(f"the ids hold {n_placeholders} image placeholder(s) (-200) but {n_given} "
                               "image tile feature block(s) were given")
        return feats

    @staticmethod
    def _check_audios(feats: Sequence[torch.Tensor] | None, n_placeholders: int, hidden: int
                      ) -> Sequence[torch.Tensor]:
        feats = [] if feats is None else list(feats)
        for i, f in enumerate(feats):
            if not (isinstance(f, torch.Tensor) and f.dim() == 2 and f.shape[1] == hidden
                    and f.is_floating_point()):
                raise InvalidInput(f"audio_features[{i}] must be a float (n, {hidden}) tensor, "
                                   f"got {_describe(f)}")
        if len(feats) != n_placeholders:
            raise InvalidInput(f"the ids hold {n_placeholders} audio placeholder(s) (-500) but {len(feats)} "
                               "audio feature tensor(s) were given")
        return feats

    # ---- forward ---------------------------------------------------------------------------------
    def _check_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.config.hidden_size
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 2 \
                or inputs_embeds.shape[1] != hidden or inputs_embeds.shape[0] == 0:
            shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else None
            raise InvalidInput(f"inputs_embeds must be a non-empty (L, {hidden}) tensor, got {shape}")
        if not inputs_embeds.is_floating_point() or not bool(torch.isfinite(inputs_embeds).all()):
            raise InvalidInput("inputs_embeds must be finite floating-point values")
        return inputs_embeds.to(device=self.device, dtype=self.dtype)

    def logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """One full causal forward pass without a cache: (L, H) embeddings → (L, V) logits."""
        x = self._check_embeds(inputs_embeds)
        with torch.no_grad():
            return self(inputs_embeds=x[None], use_cache=False).logits[0]

    def _next_logits(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Run (n, H) new embeddings at the positions after `cache`; return the last row's logits (V,)."""
        with torch.no_grad():
            out = self(inputs_embeds=x[None], cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    # ---- generation ------------------------------------------------------------------------------
    def generate_stream(
        self,
        inputs_embeds: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Iterable[int] = (),
        past: Cache | None = None,
        return_logits: bool = False,
    ) -> TokenStream:
        """Stream generated token ids for `inputs_embeds` (L, H) (spec §5.4).

        The embeddings are prefilled at the positions following `past` (a cache from an earlier
        `TokenStream.state.cache`, extended in place; fresh if None). Then one token is sampled per
        step: greedy argmax if temperature == 0 (ties → lowest id), else softmax(logits/temperature)
        restricted to the top_k ids (0 = all) and the top_p nucleus, drawn with a torch.Generator
        seeded by `seed` (reproducible) or the global RNG if seed is None.
        Stops before yielding a stop id, or after max_new_tokens ids. Each id is yielded before the
        next step is computed, so closing the stream between ids cancels at once.
        With return_logits, yields (id, logits (V,) float32) pairs instead of ids.
        """
        x = self._check_embeds(inputs_embeds)
        params = SamplingParams.checked(max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
        cache = past if past is not None else DynamicCache(config=self.config)
        total = cache.get_seq_length() + x.shape[0] + params.max_new_tokens
        if total > self.config.max_position_embeddings:
            raise InvalidInput(f"context too long: {total} positions (cache + input + max_new_tokens) exceed "
                               f"the model's {self.config.max_position_embeddings}")
        state = GenerationState(cache=cache)
        return TokenStream(self._generate(x, params, state, return_logits), state)

    def _generate(self, x: torch.Tensor, params: SamplingParams, state: GenerationState,
                  return_logits: bool) -> Iterator[int | tuple[int, torch.Tensor]]:
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        try:
            if params.max_new_tokens == 0:
                self._next_logits(x, state.cache)
                state.finish_reason = "length"
                return
            logits = self._next_logits(x, state.cache)
            while True:
                token = sample_token(logits, params, generator)
                state.pending_ids = [token]
                if token in params.stop_ids:
                    state.finish_reason = "stop"
                    return
                state.generated.append(token)
                yield (token, logits.float()) if return_logits else token
                if len(state.generated) >= params.max_new_tokens:
                    state.finish_reason = "length"
                    return
                logits = self._next_logits(self._embed(torch.tensor([token])), state.cache)
                state.pending_ids = []
        except GeneratorExit:
            state.finish_reason = "cancelled"
            raise


class TextEmbedder:
    """An LLM's embedding side alone: its input table, for an engine that holds the rest of the model itself
    (vLLM takes the prompt as embedding rows). Quacks like the loaded LLM where `PromptBuilder` looks:
    `model.embed_tokens`, `config`, `dtype`, `device`."""

    def __init__(self, config: Any, table: torch.Tensor) -> None:
        if table.dim() != 2 or table.shape[1] != config.hidden_size:
            raise ValueError(f"embedding table of shape {tuple(table.shape)} does not match hidden_size "
                             f"{config.hidden_size}")
        self.config = config
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=True)
        self.dtype = table.dtype
        self.device = table.device


class PromptEmbedder(TextEmbedder):
    """VITA-1.5's embedding side alone: the table plus `VitaLLM`'s own splicing and checks (the same
    functions, so both engines get bit-identical prompt rows)."""

    splice_embeddings = VitaLLM.splice_embeddings
    _embed = VitaLLM._embed
    _check_ids = VitaLLM._check_ids
    _check_images = VitaLLM.__dict__["_check_images"]
    _check_audios = VitaLLM.__dict__["_check_audios"]
    _check_embeds = VitaLLM._check_embeds


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_ids: frozenset[int]

    @classmethod
    def checked(cls, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                stop_ids: Iterable[int]) -> SamplingParams:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidInput(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidInput(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise InvalidInput(f"top_k must be an integer >= 0, got {top_k!r}")
        if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and not isinstance(seed, int):
            raise InvalidInput(f"seed must be an integer or None, got {seed!r}")
        try:
            stops = frozenset(int(i) for i in stop_ids)
        except (TypeError, ValueError):
            raise InvalidInput("stop_ids must be integers") from None
        return cls(max_new_tokens, float(temperature), top_k, float(top_p), seed, stops)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next id from (V,) logits: argmax if temperature == 0, else top-k/top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))  # first maximal index: ties → lowest id
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose probability reaches top_p (the first id is always kept).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class GenerationState:
    """What a generation left behind, for reuse by the next turn.

    cache: the KV cache (shared with, and extended in place by, any later stream it is passed to).
      It holds the prompt and every yielded id except those in `pending_ids`.
    generated: the yielded ids.
    pending_ids: ids sampled but not yet fed into the cache — the stop id when generation stopped on
      one, the last yielded id after max_new_tokens or cancellation. A next turn that continues from
      `cache` must feed them first.
    finish_reason: 'stop', 'length', 'cancelled', or None while running.
    """

    cache: Cache
    generated: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def cached_len(self) -> int:
        return self.cache.get_seq_length()


class TokenStream:
    """Iterator of generated ids (a generator underneath); `close()` cancels; `state` is live."""

    def __init__(self, gen: Iterator[int | tuple[int, torch.Tensor]], state: GenerationState) -> None:
        self._gen = gen
        self.state = state

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int | tuple[int, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        if self.state.finish_reason is None:  # closed before the first id was requested
            self.state.finish_reason = "cancelled"


class StreamDetokenizer:
    """Incremental detokenization: `push(id)` returns the new text, holding back incomplete UTF-8.

    Byte-level BPE can split one character over several tokens; a decode that ends in U+FFFD is held
    until the following ids complete it (a genuine U+FFFD at the very end is released by `flush`).
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids decoded for context
        self._read = 0    # ids before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The text of any held-back ids (broken bytes become U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


def detokenize_stream(tokenizer: Any, ids: Iterable[int], *, skip_special_tokens: bool = False
                      ) -> Iterator[str]:
    """Yield non-empty text deltas for a stream of ids; their concatenation is `decode(all ids)`."""
    det = StreamDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    for token_id in ids:
        delta = det.push(token_id)
        if delta:
            yield delta
    tail = det.flush()
    if tail:
        yield tail
