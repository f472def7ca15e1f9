"""The whale audio encoder and its CNN adapter (spec §4), as one `AudioEncoder` module.

State-dict keys equal the real checkpoint's after stripping `model.audio_encoder.`:
`encoder.global_cmvn.{mean,istd}` (persistent buffers), `encoder.enc.0.core.*` (Conv2dSubsampling4),
`encoder.enc.1.{embed,encoders.N,after_norm}.*` (transformer) and `adpter.{conv1d2,bn2,project}.*`
(the `adpter` spelling and the `bn2` name of a LayerNorm are the checkpoint's).

Inference semantics (deterministic reference configuration):
- Global CMVN is applied inside the encoder, before the subsampling.
- Attention is full over the valid frames (no dynamic chunks, spec §8.6); padded keys get −65504 before
  the softmax and exactly 0 after it.
- Padding masks are built from integer lengths (spec §8.10), never from fp16 lengths.
- The sinusoid position table is derived (never loaded): its first T2 rows are computed in float32 per
  call, which equals slicing the reference's 5000-row table; nothing is allocated at construction, so the
  module builds on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import AudioEncoderConfig

# Two stride-2 3x3 convolutions need at least 7 fbank frames (85 ms at 16 kHz) to produce one frame.
MIN_FBANK_FRAMES = 7
# Rows of the reference's sinusoid table: the longest encoder sequence (T2) it can position.
MAX_ENCODER_POSITIONS = 5000
# The reference masks scores with float16's minimum even when computing in float32.
_MASKED_SCORE = -65504.0
_ENCODER_LN_EPS = 1e-5
_ADAPTER_LN_EPS = 1e-3


def encoder_frame_count(n_frames: int) -> int:
    """Frames after Conv2dSubsampling4: T1 = (T−1)//2, T2 = (T1−1)//2 (0 when T < 7)."""
    if n_frames < MIN_FBANK_FRAMES:
        return 0
    return ((n_frames - 1) // 2 - 1) // 2


def sinusoid_positions(n: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows 0..n−1 of the absolute sinusoid table, float32 (n, dim): [2i] = sin(t·div_i), [2i+1] = cos."""
    position = torch.arange(n, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim)
    )
    angles = position * div
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n, dim)


class GlobalCMVN(nn.Module):
    """x ← (x − mean) · istd per mel bin, in float32. Both are checkpoint buffers.

    The buffers are float32 whatever the construction default dtype: log-mel values are around 10–20,
    where bf16 steps are 0.06, so normalising in the model's compute dtype would lose most of the
    features' precision. The caller casts the result to the compute dtype.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float32), persistent=True)
        self.register_buffer("istd", torch.ones(dim, dtype=torch.float32), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.float()) * self.istd.float()


class Conv2dSubsampling4(nn.Module):
    """Two 3×3 stride-2 Conv2d+ReLU, channel-major flatten, Linear(D·F2 → D). No positional encoding."""

    def __init__(self, idim: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, dim, 3, 2), nn.ReLU(), nn.Conv2d(dim, dim, 3, 2), nn.ReLU()
        )
        freq_out = ((idim - 1) // 2 - 1) // 2
        self.out = nn.Sequential(nn.Linear(dim * freq_out, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # (B, D, T2, F2)
        b, d, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, d * f))


class _Subsampling(nn.Module):
    """Holder giving the checkpoint's `enc.0.core.*` key level."""

    def __init__(self, idim: int, dim: int) -> None:
        super().__init__()
        self.core = Conv2dSubsampling4(idim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)


class RelPositionAttention(nn.Module):
    """Multi-head attention with learned u/v biases against absolute sinusoid keys, without rel_shift:

    scores[i, j] = ((q_i + u)·k_j + (q_i + v)·p_j) / sqrt(d_k), with p = linear_pos(pos_emb) (no bias).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.d_k = dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, h, d_k), head-major channel split."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_k)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pos_emb (1, T, D), key_valid (B, T) bool."""
        b, t, _ = x.shape
        q = self._split(self.linear_q(x))
        k = self._split(self.linear_k(x)).transpose(1, 2)
        v = self._split(self.linear_v(x)).transpose(1, 2)
        p = self._split(self.linear_pos(pos_emb)).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))
        position = torch.matmul(q_v, p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.d_k)
        masked = ~key_valid[:, None, None, :]
        scores = scores.masked_fill(masked, _MASKED_SCORE)
        attn = torch.softmax(scores, dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.heads * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """w_2(ReLU(w_1(x)))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(LN1(x)), then x + ffn(LN2(x)); LayerNorm eps 1e-5."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ffn)
        self.norm1 = nn.LayerNorm(dim, eps=_ENCODER_LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=_ENCODER_LN_EPS)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), pos_emb, key_valid)
        return x + self.feed_forward(self.norm2(x))


class WhaleTransformer(nn.Module):
    """Input layer Linear → LN → ReLU, ×sqrt(D), N rel-position blocks, final LayerNorm."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.dim = dim
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim, eps=_ENCODER_LN_EPS), nn.ReLU())
        self.encoders = nn.ModuleList(
            TransformerLayer(dim, cfg.num_attention_heads, cfg.intermediate_size)
            for _ in range(cfg.num_blocks)
        )
        self.after_norm = nn.LayerNorm(dim, eps=_ENCODER_LN_EPS)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) * math.sqrt(self.dim)
        pos_emb = sinusoid_positions(x.shape[1], self.dim, x.device).to(x.dtype).unsqueeze(0)
        for layer in self.encoders:
            x = layer(x, pos_emb, key_valid)
        return self.after_norm(x)


class WhaleEncoder(nn.Module):
    """CMVN → Conv2dSubsampling4 (enc.0) → transformer (enc.1)."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.global_cmvn = GlobalCMVN(cfg.input_dim)
        self.enc = nn.ModuleList([_Subsampling(cfg.input_dim, cfg.hidden_size), WhaleTransformer(cfg)])

    def forward(self, feats: torch.Tensor, frame_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, idim), frame_valid (B, T) bool → (x (B, T2, D), valid (B, T2) bool)."""
        subsampling = self.enc[0]
        x = subsampling(self.global_cmvn(feats).to(subsampling.core.out[0].weight.dtype))
        valid = frame_valid[:, 2::2][:, 2::2]
        return self.enc[1](x, valid), valid


class CNNSubsampling(nn.Module):
    """Adapter: zero padded steps, right-pad k−1 zeros, Conv1d(D → 2D, k, stride 2), LayerNorm(eps 1e-3),
    exact GELU, Linear(2D → LLM hidden). Output length ceil(T2 / 2)."""

    def __init__(self, dim: int, llm_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1d2 = nn.Conv1d(dim, 2 * dim, kernel_size, stride=2)
        self.bn2 = nn.LayerNorm(2 * dim, eps=_ADAPTER_LN_EPS)
        self.project = nn.Linear(2 * dim, llm_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T2, D), valid (B, T2) bool → (y (B, ceil(T2/2), H), valid (B, ceil(T2/2)) bool)."""
        x = x.masked_fill(~valid.unsqueeze(-1), 0.0).transpose(1, 2)
        x = self.conv1d2(F.pad(x, (0, self.kernel_size - 1))).transpose(1, 2)
        y = self.project(F.gelu(self.bn2(x)))
        return y, valid[:, 0::2]


class AudioEncoder(nn.Module):
    """Whale encoder + adapter: fbank features → LLM-width audio embeddings.

    Submodule names follow the checkpoint (`encoder`, `adpter`), so `state_dict()` keys equal the real
    keys after stripping `model.audio_encoder.`.
    """

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads"
            )
        self.cfg = cfg
        self.encoder = WhaleEncoder(cfg)
        self.adpter = CNNSubsampling(cfg.hidden_size, cfg.llm_hidden_size, cfg.adapter_kernel_size)

    def _check_inputs(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or feats.shape[-1] != self.cfg.input_dim:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise InvalidInput(f"audio features must be a (B, T, {self.cfg.input_dim}) tensor, got {shape}")
        if not feats.dtype.is_floating_point:
            raise InvalidInput(f"audio features must be floating point, got {feats.dtype}")
        batch, frames = feats.shape[0], feats.shape[1]
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,):
            shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise InvalidInput(f"audio lengths must be a ({batch},) integer tensor, got {shape}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise InvalidInput(f"audio lengths must be integers, got {lengths.dtype}")
        if batch == 0:
            raise InvalidInput("audio batch is empty")
        lengths = lengths.to(device=feats.device, dtype=torch.int64)
        if int(lengths.min()) < MIN_FBANK_FRAMES:
            raise InvalidInput(
                f"audio too short: {int(lengths.min())} fbank frames; the encoder needs at least "
                f"{MIN_FBANK_FRAMES} (85 ms at 16 kHz)"
            )
        if int(lengths.max()) > frames:
            raise InvalidInput(f"audio length {int(lengths.max())} exceeds the padded frame count {frames}")
        if encoder_frame_count(frames) > MAX_ENCODER_POSITIONS:
            raise InvalidInput(
                f"audio too long: {frames} fbank frames give {encoder_frame_count(frames)} encoder frames; "
                f"the limit is {MAX_ENCODER_POSITIONS} (about 200 s)"
            )
        if not torch.isfinite(feats).all():
            raise InvalidInput("audio features contain NaN or infinite values")
        return feats, lengths

    def _encode(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, lengths = self._check_inputs(feats, lengths)
        frame_valid = torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]
        return self.encoder(feats, frame_valid)

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whale encoder only: feats (B, T, 80), lengths (B,) → (x (B, T2_max, D), enc_lengths (B,) int64)."""
        x, valid = self._encode(feats, lengths)
        return x, valid.sum(dim=1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, 80) raw fbank (CMVN is applied here), lengths (B,) integer frame counts.

        Returns (embeds (B, n_max, H_llm), n_tokens (B,) int64). Rows at or after n_tokens[b] are padding
        and are set to 0. n_tokens[b] equals `audio_token_count(lengths[b])`.
        """
        x, valid = self._encode(feats, lengths)
        y, out_valid = self.adpter(x, valid)
        return y.masked_fill(~out_valid.unsqueeze(-1), 0.0), out_valid.sum(dim=1)
