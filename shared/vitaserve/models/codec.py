"""The TiCodec VQ-VAE decoder (spec §7): speech codec ids -> 24 kHz PCM, one-shot and streamed.

- `CodecDecoder` holds the `generator` and `quantizer` sub-modules of the reference `final.pt`; their
  `state_dict()` keys equal the checkpoint's sub-dicts (prefixes `generator.` / `quantizer.`), with the
  convolutions in weight-norm form (`weight_g`, `weight_v`) as stored. `fold_weight_norm()` replaces every
  (g, v) pair by W = g·v/‖v‖ once, as the deployed reference does; `load_checkpoint_state` (in place) and
  `CodecDecoder.from_state_dict` (new module) accept either form and leave the module folded.
- `StreamingDecoder` reproduces the reference's windowed streaming (`llm2TTS.run`, §7.4): windows with
  left context and look-ahead, quiet-point joining (`find_min_sum_index`), optional first-sentence
  silence trim. `pcm_to_int16` is the server's float -> int16 conversion.

Only one code group and one residual layer are supported (the released configuration); the reference's
ordering of codes for several groups/layers is not specified.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitaserve.errors import CheckpointError, InvalidInput
from vitaserve.models.configs import CodecConfig

__all__ = [
    "CodecDecoder",
    "StreamingDecoder",
    "find_min_sum_index",
    "generator_receptive_radius",
    "pcm_to_int16",
]

LEAKY_SLOPE = 0.1  # every LeakyReLU of the generator, including the last one (spec §8.20)
SILENCE_LEVEL = 0.03  # first-sentence trim: drop samples before the first |x| > this


def _fold(g: Tensor, v: Tensor) -> Tensor:
    """W = g · v / ‖v‖, the norm over every axis but 0 (per output channel of a Conv1d weight, per input
    channel of a ConvTranspose1d weight; spec §8.19)."""
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return v * (g / norm)


class _WNConv1d(nn.Module):
    """Conv1d or ConvTranspose1d whose weight is held as weight norm (`weight_g`, `weight_v`) until
    `fold()` turns it into a plain `weight`. Parameters are registered bias first, as in the checkpoint."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.transposed = stride, padding, dilation, transposed
        io = (in_channels, out_channels) if transposed else (out_channels, in_channels)
        shape = (*io, kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(shape))
        nn.init.normal_(self.weight_v, 0.0, 0.01)

    @property
    def folded(self) -> bool:
        return "weight" in self._parameters

    def fold(self) -> None:
        if self.folded:
            return
        weight = _fold(self.weight_g.detach(), self.weight_v.detach())
        del self.weight_g
        del self.weight_v
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.folded else _fold(self.weight_g, self.weight_v)
        if self.transposed:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class _ResBlock1(nn.Module):
    """HiFi-GAN ResBlock1: per dilation d, x += conv2(lrelu(conv1_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            _WNConv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _WNConv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            t = conv1(F.leaky_relu(x, LEAKY_SLOPE))
            x = x + conv2(F.leaky_relu(t, LEAKY_SLOPE))
        return x


class Generator(nn.Module):
    """Latents (B, 512, T) + global style (B, 128) -> waveform (B, 1, prod(rates)·T) (spec §7.3)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        width = cfg.upsample_initial_channel
        stages = len(cfg.upsample_rates)
        if width % (2**stages) != 0:
            raise ValueError(f"upsample_initial_channel {width} is not divisible by 2^{stages}")
        for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True):
            if (k - u) % 2 != 0 or k < u:
                raise ValueError(f"upsample kernel {k} with rate {u}: the output would not be {u}x the input")
        if any(k % 2 == 0 for k in cfg.resblock_kernel_sizes):
            raise ValueError(f"resblock kernel sizes must be odd, got {cfg.resblock_kernel_sizes}")
        self.global_dim = cfg.global_dim
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.conv_pre = _WNConv1d(cfg.latent_dim, width, 7, padding=3)
        self.ups = nn.ModuleList(
            _WNConv1d(width >> i, width >> (i + 1), k, stride=u, padding=(k - u) // 2, transposed=True)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            _ResBlock1(width >> (i + 1), k, d)
            for i in range(stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = _WNConv1d(width >> stages, 1, 7, padding=3)

    def forward(self, z: Tensor, gst: Tensor) -> Tensor:
        x = self.conv_pre(z)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LEAKY_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
            # A shape test in the reference: inject wherever the width equals the style width (§8.20).
            if x.shape[1] == self.global_dim:
                x = x + gst[:, :, None]
        x = self.conv_post(F.leaky_relu(x, LEAKY_SLOPE))
        return torch.tanh(x)


class _Codebook(nn.Module):
    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)


class Quantizer(nn.Module):
    """Codebook lookups (spec §7.1) and the fixed global style vector (§7.2)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        if cfg.global_dim % cfg.global_code_num != 0 or len(cfg.global_tokens) != cfg.global_code_num:
            raise ValueError(
                f"{len(cfg.global_tokens)} global tokens / global_code_num {cfg.global_code_num} do not "
                f"split the global width {cfg.global_dim}"
            )
        self.quantizer_modules = nn.ModuleList([_Codebook(cfg.n_codes, cfg.latent_dim)])
        self.quantizer_modules_globaltokens = nn.ModuleList(
            _Codebook(cfg.n_codes, cfg.global_dim // cfg.global_code_num) for _ in range(cfg.global_code_num)
        )

    def embed(self, codes: Tensor) -> Tensor:
        """(B, T) ids -> (B, latent_dim, T)."""
        return self.quantizer_modules[0].embedding(codes).transpose(1, 2)

    def embed_gst(self, tokens: tuple[int, ...]) -> Tensor:
        """Concatenation of the per-position global codebook rows, (global_dim,)."""
        rows = [book.embedding.weight[t] for book, t in zip(self.quantizer_modules_globaltokens, tokens)]
        return torch.cat(rows)


class CodecDecoder(nn.Module):
    """TiCodec decoder: codes (B, T) -> PCM (B, samples_per_token·T) in [-1, 1] at 24 kHz."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        if cfg.n_code_groups != 1 or cfg.residual_layers != 1:
            raise ValueError(
                f"only 1 code group and 1 residual layer are supported, got {cfg.n_code_groups} groups and "
                f"{cfg.residual_layers} residual layers"
            )
        for t in cfg.global_tokens:
            if not 0 <= t < cfg.n_codes:
                raise ValueError(f"global token {t} is outside [0, {cfg.n_codes})")
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.quantizer = Quantizer(cfg)

    @classmethod
    def from_state_dict(cls, cfg: CodecConfig, state_dict: Mapping[str, Tensor]) -> "CodecDecoder":
        """Build a float32 CPU module from `generator.*` + `quantizer.*` tensors in either form (see
        `load_checkpoint_state`). The returned module is folded and in eval mode."""
        return cls(cfg).load_checkpoint_state(state_dict, "codec state dict").eval()

    def load_checkpoint_state(self, state_dict: Mapping[str, Tensor], source: str) -> "CodecDecoder":
        """Load `generator.*` + `quantizer.*` tensors in place, in either form: weight norm
        (`weight_g`/`weight_v`, as in the checkpoint) or folded (`weight`, as `remove_weight_norm` leaves
        it). Folds the weight norm and returns self. Raises CheckpointError naming `source` and the
        first offending key unless the keys and shapes match exactly."""
        if not any(k.endswith(".weight_g") for k in state_dict):
            self.fold_weight_norm()
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
            raise CheckpointError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
        for key, shape in expected.items():
            got = tuple(state_dict[key].shape)
            if got != shape:
                raise CheckpointError(
                    f"{source}: tensor {key!r} has shape {list(got)}, expected {list(shape)}"
                )
        self.load_state_dict(dict(state_dict), strict=True)
        return self.fold_weight_norm()

    def fold_weight_norm(self) -> "CodecDecoder":
        """Replace every weight_g/weight_v pair by the plain weight g·v/‖v‖ (idempotent)."""
        for module in self.modules():
            if isinstance(module, _WNConv1d):
                module.fold()
        return self

    def gst(self) -> Tensor:
        """The fixed global style vector (global_dim,), from `cfg.global_tokens`."""
        return self.quantizer.embed_gst(self.cfg.global_tokens)

    def _check_codes(self, codes: Tensor) -> Tensor:
        """Validate (B, T) integer codes in [0, n_codes); returns them as int64 on the model's device."""
        if not isinstance(codes, Tensor) or codes.dim() != 2:
            raise InvalidInput(f"codec input must be a 2-D tensor (B, T) of ids, got {_describe(codes)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise InvalidInput(f"codec ids must be integers, got dtype {codes.dtype}")
        if codes.numel() == 0:
            raise InvalidInput(f"codec input is empty (shape {tuple(codes.shape)})")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.cfg.n_codes:
            raise InvalidInput(f"codec ids must be in [0, {self.cfg.n_codes}), got values in [{lo}, {hi}]")
        return codes.to(device=self.quantizer.quantizer_modules[0].embedding.weight.device, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """One-shot decode: (B, T) ids -> (B, samples_per_token·T) waveform."""
        codes = self._check_codes(codes)
        z = self.quantizer.embed(codes)
        gst = self.gst()[None, :].expand(codes.shape[0], -1)
        return self.generator(z, gst)[:, 0, :]


def generator_receptive_radius(cfg: CodecConfig) -> int:
    """An upper bound, in output samples, on how far (either side) a waveform sample can depend on the
    codes: the one-sided reach of every layer, converted to output samples and summed. Samples farther
    than this from both edges of a decoded window equal the one-shot decode of the whole stream."""
    total = cfg.samples_per_token
    scale = total  # output samples per sample at the current layer's rate
    radius = 3 * scale  # conv_pre, kernel 7
    block_reach = max(
        sum(d * (k - 1) // 2 + (k - 1) // 2 for d in dils)
        for k, dils in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
    )
    for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
        scale //= u
        pad = (k - u) // 2
        radius += (max(pad, k - 1 - pad) + u) * scale  # transposed conv, +u for the input-grid rounding
        radius += block_reach * scale
    return radius + 3  # conv_post, kernel 7


def find_min_sum_index(
    buf: np.ndarray, s: np.ndarray, window: int, threshold: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Join a newly decoded piece `s` to the held-back `buf` at a quiet point (spec §7.4).

    Among the windows of `window` samples starting at m >= len(s)//2 - window//2, take the first with the
    smallest sum of |s|. If its mean is below `threshold`, split at the quietest sample q inside it:
    return (s[q:], buf + s[:q]). Otherwise hold everything back: return (buf + s, None).
    """
    length = len(s)
    start = length // 2 - window // 2
    if start < 0 or length - window < start:
        raise ValueError(f"a piece of {length} samples is too short for a join window of {window}")
    # Moving sums as differences of a float64 prefix sum: O(L) and accurate to ~1e-12 for a few seconds
    # of audio, so the argmin only differs from a direct window sum on exact ties of silent audio.
    mag = np.abs(s.astype(np.float64))
    csum = np.concatenate(([0.0], np.cumsum(mag)))
    wsum = csum[window:] - csum[:-window]  # wsum[m] = sum(mag[m:m+window]), m = 0..length-window
    m = start + int(np.argmin(wsum[start:]))
    if wsum[m] / window < threshold:
        lo, hi = max(0, m), min(length, m + window)
        q = lo + int(np.argmin(mag[lo:hi]))
        return s[q:].copy(), np.concatenate([buf, s[:q]])
    return np.concatenate([buf, s]), None


def pcm_to_int16(x: np.ndarray) -> np.ndarray:
    """The server's conversion: int16(x·32768), truncating toward zero, clipped to the int16 range."""
    scaled = np.clip(np.asarray(x, dtype=np.float32) * 32768.0, -32768.0, 32767.0)
    return scaled.astype(np.int16)


class StreamingDecoder:
    """Incremental codec decoding of one reply, as the reference server does it (spec §7.4).

    Feed ids with `push`; each call returns the PCM pieces (float32, 1-D) that became final. Call `flush`
    at the end of each sentence: it returns the rest of that sentence's audio and resets the window state.
    The first sentence uses chunk C = `first_chunk` and `first_threshold`; later sentences use
    `later_chunk` and `later_threshold` (the server's 20/0.1 and 40/0.015).

    Within a sentence, a window is decoded when left + C + overlap ids are buffered (left = 0 for the
    first window, `overlap` afterwards); its C middle tokens of audio are kept, the last 2·overlap ids
    are carried over as context, and the kept audio is joined to the held-back audio with
    `find_min_sum_index(…, window, threshold)`. With `trim_silence`, every piece of the first sentence
    loses the samples before its first |x| > 0.03 (this changes the total length).
    """

    def __init__(
        self,
        codec: CodecDecoder,
        *,
        first_chunk: int = 20,
        later_chunk: int = 40,
        overlap: int = 10,
        window: int = 2401,
        first_threshold: float = 0.1,
        later_threshold: float = 0.015,
        trim_silence: bool = False,
    ) -> None:
        spt = codec.cfg.samples_per_token
        if overlap < 0 or window < 1:
            raise InvalidInput(f"overlap must be >= 0 and window >= 1, got {overlap} and {window}")
        for chunk in (first_chunk, later_chunk):
            # find_min_sum_index needs the second half of the kept piece to hold a whole join window.
            if chunk < 1 or chunk * spt < window:
                raise InvalidInput(
                    f"chunk of {chunk} tokens is too short for a join window of {window} samples"
                )
        self.codec = codec
        self.spt = spt
        self.chunks = (first_chunk, later_chunk)
        self.thresholds = (first_threshold, later_threshold)
        self.overlap = overlap
        self.window = window
        self.trim_silence = trim_silence
        self.sentence = 0
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[int] = []
        self._left = 0
        self._buf = np.zeros(0, dtype=np.float32)

    @property
    def chunk(self) -> int:
        return self.chunks[min(self.sentence, 1)]

    @property
    def threshold(self) -> float:
        return self.thresholds[min(self.sentence, 1)]

    def _decode(self) -> np.ndarray:
        codes = torch.tensor([self._tokens], dtype=torch.long)
        return self.codec.decode(codes)[0].float().cpu().numpy()

    def _finish(self, piece: np.ndarray) -> list[np.ndarray]:
        if piece.size == 0:
            return []
        if self.trim_silence and self.sentence == 0:
            loud = np.flatnonzero(np.abs(piece) > SILENCE_LEVEL)
            if loud.size:
                piece = piece[loud[0]:]
        return [piece.astype(np.float32, copy=False)]

    @property
    def codes_until_decode(self) -> int:
        """How many more ids `push` needs before it decodes the next window (at least 1)."""
        return max(1, self._left + self.chunk + self.overlap - len(self._tokens))

    def push(self, token: int) -> list[np.ndarray]:
        """Add one codec id; return the audio pieces that became final (zero or one)."""
        try:
            tok = operator.index(token)
        except TypeError:
            raise InvalidInput(f"codec id must be an integer, got {type(token).__name__}") from None
        if isinstance(token, bool) or not 0 <= tok < self.codec.cfg.n_codes:
            raise InvalidInput(f"codec id {token!r} is outside [0, {self.codec.cfg.n_codes})")
        self._tokens.append(tok)
        if len(self._tokens) < self._left + self.chunk + self.overlap:
            return []
        audio = self._decode()
        kept = audio[self._left * self.spt:len(audio) - self.overlap * self.spt]
        self._left = self.overlap
        self._tokens = self._tokens[len(self._tokens) - 2 * self.overlap:]
        self._buf, out = find_min_sum_index(self._buf, kept, self.window, self.threshold)
        return [] if out is None else self._finish(out)

    def flush(self) -> list[np.ndarray]:
        """End the current sentence: return its remaining audio (held-back + undecoded look-ahead) and
        get ready for the next sentence."""
        # With overlap 0 no tokens are carried over, yet held-back audio may remain: it is emitted too.
        rest = self._buf
        if self._tokens:
            rest = np.concatenate([rest, self._decode()[self._left * self.spt:]])
        out = self._finish(rest)
        self.sentence += 1
        self._reset()
        return out


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
