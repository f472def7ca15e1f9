"""The VITA-1.5 speech decoder `LLM2TTSCodecAR` (spec §6): text embedding rows -> speech codec ids.

The decoder is a small Llama stack written out here rather than taken from transformers, because the
attention pattern matters and must not depend on the attention backend (spec §8.15): the pre-net and the
prompt pass attend **bidirectionally** (the reference runs eager attention with no mask), and the AR steps
use a KV cache where the single query sees every cached key. No pass ever needs a mask, so none exists here.

`state_dict()` keys equal the reference checkpoint's (`tts_decoder.tensors` in the manifest, empty prefix).
The RoPE inverse-frequency table is a non-persistent buffer built lazily on first use, so the module
builds on the meta device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import TTSDecoderConfig

__all__ = ["SpeechDecoder"]

GenerateItem = Union[int, tuple[int, Tensor]]


class _RMSNorm(nn.Module):
    """Llama RMSNorm: the normalisation runs in float32, the weight multiplies in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class _RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables. `inv_freq` is derived, hence non-persistent, and built on first use on the
    device of the positions (a meta-built module has nothing to compute until it runs)."""

    inv_freq: Tensor | None

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", None, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (T, head_dim), float32, for integer positions (T,)."""
        if self.inv_freq is None or self.inv_freq.device != positions.device:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
            self.inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, head_dim); cos/sin (T, head_dim)."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class _KVCache:
    """Keys (after RoPE) and values of one layer, preallocated for the whole generation."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v (B, heads, T, head_dim); return everything stored so far."""
        if self.k is None or self.v is None:
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.capacity, d)
            self.v = v.new_empty(b, h, self.capacity, d)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class _Attention(nn.Module):
    """Multi-head self-attention without biases, without GQA and without a mask (see module docstring)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: _KVCache | None) -> Tensor:
        b, t, dim = x.shape
        q = _apply_rope(self._split(self.q_proj(x)), cos, sin)
        k = _apply_rope(self._split(self.k_proj(x)), cos, sin)
        v = self._split(self.v_proj(x))
        if cache is not None:
            k, v = cache.append(k, v)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, dim)
        return self.o_proj(out)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer (names as transformers' LlamaDecoderLayer)."""

    def __init__(self, cfg: TTSDecoderConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg.attention_dim, cfg.attention_heads)
        self.mlp = _MLP(cfg.attention_dim, cfg.linear_units)
        self.input_layernorm = _RMSNorm(cfg.attention_dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.attention_dim, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: _KVCache | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class SpeechDecoder(nn.Module):
    """`LLM2TTSCodecAR`: a bidirectional pre-net over the text vectors, then an AR Llama stack that
    emits codec ids (0..odim-1) until EOS."""

    def __init__(self, cfg: TTSDecoderConfig) -> None:
        super().__init__()
        if cfg.idim != cfg.attention_dim or cfg.encoder_output_dim != cfg.attention_dim:
            raise ValueError(
                f"idim ({cfg.idim}), encoder_output_dim ({cfg.encoder_output_dim}) and attention_dim "
                f"({cfg.attention_dim}) must be equal: the reference has no projection between them"
            )
        self.cfg = cfg
        vocab = cfg.odim + 4  # codes + BOS, SOS, EOS, PAD
        self.embedding = nn.Embedding(vocab, cfg.idim)
        self.layers_pre_nn = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.num_blocks // 2))
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.num_blocks))
        self.norm = _RMSNorm(cfg.attention_dim, cfg.rms_norm_eps)
        self.out_fnn = nn.Linear(cfg.encoder_output_dim, vocab, bias=True)
        self.rotary_emb = _RotaryEmbedding(cfg.attention_dim // cfg.attention_heads, cfg.rope_theta)

    # ------------------------------------------------------------------ input construction (§6.1)

    def text_to_hidden(self, embed_rows: Tensor) -> Tensor:
        """LLM input-embedding rows (n, H) -> decoder input (1, n*H/idim, idim): a plain row-major reshape,
        so each token becomes H/idim consecutive sub-vectors (spec §6.1, §8.16)."""
        idim = self.cfg.idim
        if not isinstance(embed_rows, Tensor) or embed_rows.dim() != 2:
            raise InvalidInput(f"embedding rows must be a 2-D tensor (n, H), got {_describe(embed_rows)}")
        n, width = embed_rows.shape
        if n == 0:
            raise InvalidInput("no text to speak: the embedding rows are empty")
        if width % idim != 0:
            raise InvalidInput(f"embedding width {width} is not a multiple of the decoder width {idim}")
        return embed_rows.reshape(1, n * width // idim, idim)

    # ------------------------------------------------------------------ pre-net (§6.3)

    def _run(self, layers: nn.ModuleList, h: Tensor, start: int, caches: list[_KVCache] | None) -> Tensor:
        positions = torch.arange(start, start + h.shape[1], device=h.device)
        cos, sin = self.rotary_emb(positions)
        for i, layer in enumerate(layers):
            h = layer(h, cos, sin, None if caches is None else caches[i])
        return h

    def _check_hidden(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.cfg.idim:
            raise InvalidInput(f"decoder input must be (B, N, {self.cfg.idim}), got {_describe(x)}")
        if x.shape[1] == 0:
            raise InvalidInput("decoder input has no time steps")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise InvalidInput("decoder input must be finite floating-point values")
        return x.to(self.embedding.weight.dtype)

    def prenet(self, x: Tensor) -> Tensor:
        """The NAR pre-net: bidirectional over positions 0..N-1, no final norm. (B, N, idim) -> same."""
        return self._run(self.layers_pre_nn, self._check_hidden(x), 0, None)

    # ------------------------------------------------------------------ AR generation (§6.4-6.5)

    def generate(
        self,
        hidden: Tensor,
        *,
        max_tokens: int = 1000,
        top_k: int = 2,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        penalty_window: int = -1,
        penalty: float = 1.1,
        return_logits: bool = False,
    ) -> Iterator[GenerateItem]:
        """Yield speech codec ids one at a time, so the caller can stop early between tokens.

        `hidden` is `text_to_hidden(...)`, shape (1, N, idim). The prompt [BOS, prenet(hidden)] runs through
        `layers` bidirectionally; then SOS is fed at position P = N+1 and every sampled id after it.
        Generation stops at EOS (not yielded) or after `max_tokens` steps.

        Sampling is top-k over softmax(logits), renormalised, drawn with torch.multinomial from the full
        distribution vector (so a seeded `generator` reproduces the reference's draws); `greedy` takes the
        argmax instead. `penalty_window > 0` divides the logits of the distinct ids among the last
        `penalty_window` history entries (history starts with SOS) by `penalty`, regardless of sign.

        Deliberate guard (spec §8.17): the reference can sample BOS/SOS/PAD, which index past the codec
        codebook. Their logits are set to -inf before choosing, so every yielded id is < odim. This does not
        change the argmax on the golden data.

        With `return_logits`, yields (id, logits) where logits is the raw `out_fnn` row (odim+4,) in float32
        before the penalty and the guard.
        """
        cfg = self.cfg
        hidden = self._check_hidden(hidden)
        if hidden.shape[0] != 1:
            raise InvalidInput(f"generate takes one utterance (batch 1), got batch {hidden.shape[0]}")
        if max_tokens < 0:
            raise InvalidInput(f"max_tokens must be >= 0, got {max_tokens}")
        if not 1 <= top_k <= cfg.odim + 1:
            raise InvalidInput(f"top_k must be in [1, {cfg.odim + 1}], got {top_k}")
        if penalty_window > 0 and not penalty > 0:
            raise InvalidInput(f"penalty must be > 0, got {penalty}")
        return self._generate(
            hidden, max_tokens, top_k, greedy, generator, penalty_window, penalty, return_logits
        )

    @torch.no_grad()
    def _generate(
        self,
        hidden: Tensor,
        max_tokens: int,
        top_k: int,
        greedy: bool,
        generator: torch.Generator | None,
        penalty_window: int,
        penalty: float,
        return_logits: bool,
    ) -> Iterator[GenerateItem]:
        cfg = self.cfg
        device = hidden.device
        prompt = self._prompt(hidden)
        caches = [_KVCache(prompt.shape[1] + max_tokens) for _ in self.layers]
        self._run(self.layers, prompt, 0, caches)  # fills the caches; its hidden output is unused

        history = [cfg.sos_id]
        cur = cfg.sos_id
        for _ in range(max_tokens):
            x = self.embedding(torch.tensor([[cur]], device=device))
            h = self._run(self.layers, x, caches[0].length, caches)
            logits = self.out_fnn(self.norm(h))[0, -1].float()
            token = self.choose_code(logits, history, top_k=top_k, greedy=greedy, generator=generator,
                                     penalty_window=penalty_window, penalty=penalty)
            if token == cfg.eos_id:
                return
            history.append(token)
            cur = token
            yield (token, logits) if return_logits else token


    def _prompt(self, hidden: Tensor) -> Tensor:
        """[BOS, prenet(hidden)]: the prompt of the AR layers (hidden already checked)."""
        bos = self.embedding(torch.tensor([[self.cfg.bos_id]], device=hidden.device))
        return torch.cat([bos, self.prenet(hidden)], dim=1)

    def _blocked(self, device: torch.device) -> Tensor:
        """The ids never chosen (BOS, SOS, PAD: spec §8.17), as a mask over the logits; built once."""
        blocked = self.__dict__.get("_blocked_ids")
        if blocked is None or blocked.device != device:
            blocked = torch.zeros(self.cfg.odim + 4, dtype=torch.bool, device=device)
            blocked[[self.cfg.bos_id, self.cfg.sos_id, self.cfg.pad_id]] = True
            self.__dict__["_blocked_ids"] = blocked
        return blocked

    def choose_code(self, logits: Tensor, history: list[int], *, top_k: int = 2, greedy: bool = False,
                    generator: torch.Generator | None = None, penalty_window: int = -1,
                    penalty: float = 1.1) -> int:
        """The next id from one step's float32 logits (odim+4,): the penalty over the last
        `penalty_window` entries of `history`, the BOS/SOS/PAD guard, then argmax or top-k sampling
        (see `generate`). May return EOS."""
        scores = logits.clone()
        if penalty_window > 0:
            recent = torch.tensor(sorted(set(history[-penalty_window:])), device=logits.device)
            scores[recent] = scores[recent] / penalty
        scores[self._blocked(logits.device)] = float("-inf")
        if greedy:
            return int(torch.argmax(scores))
        return _sample_top_k(scores, top_k, generator)

    # ------------------------------------------------------------------ batched AR steps

    @torch.no_grad()
    def prompt_kv(self, hidden: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run one utterance's prompt [BOS, prenet(hidden)] through `layers` (bidirectional, as `generate`
        does) and return each layer's keys (after RoPE) and values, (1, heads, P, head_dim). `hidden` is
        (1, N, idim); P = N + 1. The first AR step is then at position P."""
        hidden = self._check_hidden(hidden)
        if hidden.shape[0] != 1:
            raise InvalidInput(f"prompt_kv takes one utterance (batch 1), got batch {hidden.shape[0]}")
        prompt = self._prompt(hidden)
        caches = [_KVCache(prompt.shape[1]) for _ in self.layers]
        self._run(self.layers, prompt, 0, caches)
        return [(c.k, c.v) for c in caches]  # type: ignore[misc]

    @torch.no_grad()
    def decode_batch(self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor]
                     ) -> Tensor:
        """One AR step of B utterances at once; returns float32 logits (B, odim+4).

        Row b feeds id `tokens[b]` at position `positions[b]`; its cache is row b of every layer's
        `keys[l]` / `values[l]` (R >= B rows, heads, capacity, head_dim), holding positions
        0..positions[b]-1. The step writes its key/value at `positions[b]` and attends over positions
        0..positions[b] of its own row only (a mask hides the padding up to the batch's widest row), so a
        row computes what `generate` computes for it alone, up to float rounding of other matrix shapes.
        """
        b = tokens.shape[0]
        width = int(positions.max()) + 1
        rows = torch.arange(b, device=tokens.device)
        mask = None
        if int(positions.min()) + 1 != width:  # rows of different lengths: hide each row's padding
            mask = torch.arange(width, device=tokens.device)[None, :] > positions[:, None]  # (B, W)
            mask = mask[:, None, None, :]
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # (B, 1, 1, head_dim) per-row positions
        h = self.embedding(tokens)[:, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = _apply_rope(attn._split(attn.q_proj(x)), cos, sin)
            k = _apply_rope(attn._split(attn.k_proj(x)), cos, sin)
            v = attn._split(attn.v_proj(x))
            keys[i][rows, :, positions] = k[:, :, 0]
            values[i][rows, :, positions] = v[:, :, 0]
            k_all, v_all = keys[i][:b, :, :width], values[i][:b, :, :width]
            scores = torch.matmul(q, k_all.transpose(2, 3)) / math.sqrt(attn.head_dim)
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v_all).transpose(1, 2).reshape(b, 1, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.out_fnn(self.norm(h))[:, -1].float()


def top_k_distribution(scores: Tensor, k: int) -> Tensor:
    """softmax over all entries of the last dimension, keep the k largest, renormalise: the full-length
    vector (or rows of vectors) that a top-k draw samples from."""
    probs = F.softmax(scores, dim=-1)
    top_p, top_i = torch.topk(probs, k, dim=-1)
    kept = torch.zeros_like(probs).scatter_(-1, top_i, top_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _sample_top_k(scores: Tensor, k: int, generator: torch.Generator | None) -> int:
    """One draw over the full top-k vector of `scores` (1-D), so a seeded generator reproduces the
    reference's draws."""
    return int(torch.multinomial(top_k_distribution(scores, k), 1, generator=generator))


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
