"""Configurations of the VITA-1.5 components, parsed from the reference's own config formats.

Each config is a frozen dataclass with a `from_reference(dict)` constructor that reads the dict the
reference code uses (InternVisionConfig kwargs, the whale train.yaml dict, the TTS decoder `model.json`,
the codec `model.json`) and a `REAL_*` constant with the real checkpoint's values
(`tests/golden/vita15_manifest.json`). The LLM uses `transformers.Qwen2Config` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Placeholder ids spliced into LLM input ids (vita/constants.py).
IMAGE_TOKEN_ID = -200
AUDIO_TOKEN_ID = -500
IMAGE_SIZE = 448
TOKENS_PER_TILE = 256
AUDIO_SAMPLE_RATE = 16000
SPEECH_SAMPLE_RATE = 24000
CODEC_SAMPLES_PER_TOKEN = 600


@dataclass(frozen=True)
class VisionConfig:
    """InternViT-300M-448px (`InternVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    # mm_projector output width = the LLM hidden size.
    llm_hidden_size: int = 3584

    @classmethod
    def from_reference(cls, d: dict[str, Any], llm_hidden_size: int) -> "VisionConfig":
        if d.get("norm_type", "layer_norm") != "layer_norm" or d.get("qk_normalization", False):
            raise ValueError("only InternViT-300M (layer_norm, no qk normalisation) is supported")
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            image_size=int(d.get("image_size", 448)),
            patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)),
            qkv_bias=bool(d.get("qkv_bias", True)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            llm_hidden_size=int(llm_hidden_size),
        )

    @property
    def mm_hidden_size(self) -> int:
        """Width after pixel shuffle 0.5: 4 patches' channels per token."""
        return 4 * self.hidden_size


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whale encoder ("subsampling-transformer") + CNNSubsampling adapter."""

    input_dim: int = 80
    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    num_blocks: int = 24
    adapter_kernel_size: int = 5
    llm_hidden_size: int = 3584
    # fbank settings (dataset_conf.fbank_conf); dither is forced to 0 at inference.
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    sample_rate: int = AUDIO_SAMPLE_RATE

    @classmethod
    def from_reference(cls, d: dict[str, Any]) -> "AudioEncoderConfig":
        enc = d["encoder_conf"]
        overview = enc["overview_conf"]
        if overview.get("encoder-layer-config") != "subsampling-transformer":
            raise ValueError(f"unsupported whale layer config {overview.get('encoder-layer-config')!r}")
        sub = enc["para_conf"]["subsampling"]
        tr = enc["para_conf"]["transformer"]
        if int(sub.get("subsampling-rate", 4)) != 4:
            raise ValueError("only Conv2dSubsampling4 is supported")
        if tr.get("transformer-input-layer") != "linear" or tr.get("transformer-pos-enc-class") != "rel-enc":
            raise ValueError("only input layer 'linear' with 'rel-enc' positions is supported")
        if not tr.get("transformer-normalize-before", True) or tr.get("transformer-concat-after", False):
            raise ValueError("only pre-norm transformer blocks without concat_after are supported")
        model = d["model_conf"]
        if model.get("adpter_type", "subsampling") != "subsampling":
            raise ValueError(f"unsupported adapter type {model.get('adpter_type')!r}")
        fb = d.get("dataset_conf", {}).get("fbank_conf", {})
        return cls(
            input_dim=int(d.get("input_dim", 80)),
            hidden_size=int(tr["transformer-attention-dim"]),
            num_attention_heads=int(tr["transformer-attention-heads"]),
            intermediate_size=int(tr["transformer-linear-units"]),
            num_blocks=int(tr["transformer-num-blocks"]),
            adapter_kernel_size=int(model.get("kernel_size", 5)),
            llm_hidden_size=int(model["llm_embed_dim"]),
            num_mel_bins=int(fb.get("num_mel_bins", 80)),
            frame_length_ms=float(fb.get("frame_length", 25)),
            frame_shift_ms=float(fb.get("frame_shift", 10)),
        )


@dataclass(frozen=True)
class TTSDecoderConfig:
    """LLM2TTSCodecAR (`vita_tts_ckpt/decoder/model.json`)."""

    idim: int = 896
    odim: int = 1024
    encoder_output_dim: int = 896
    attention_dim: int = 896
    attention_heads: int = 14
    linear_units: int = 4864
    num_blocks: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    top_k: int = 2

    @classmethod
    def from_reference(cls, d: dict[str, Any]) -> "TTSDecoderConfig":
        if int(d.get("kv_cache_prefix_finetune", 0)) != 0:
            raise ValueError("kv_cache_prefix_finetune != 0 is not supported")
        return cls(
            idim=int(d["idim"]),
            odim=int(d["odim"]),
            encoder_output_dim=int(d["encoder_output_dim"]),
            attention_dim=int(d["transformer_attention_dim"]),
            attention_heads=int(d["transformer_attention_heads"]),
            linear_units=int(d["transformer_linear_units"]),
            num_blocks=int(d["transformer_num_blocks"]),
        )

    @property
    def bos_id(self) -> int:
        return self.odim

    @property
    def sos_id(self) -> int:
        return self.odim + 1

    @property
    def eos_id(self) -> int:
        return self.odim + 2

    @property
    def pad_id(self) -> int:
        return self.odim + 3


@dataclass(frozen=True)
class CodecConfig:
    """TiCodec VQ-VAE decoder (`vita_tts_ckpt/codec/model.json`)."""

    resblock: str = "1"
    upsample_rates: tuple[int, ...] = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    n_code_groups: int = 1
    residual_layers: int = 1
    n_codes: int = 1024
    global_code_num: int = 8
    global_tokens: tuple[int, ...] = (473, 975, 419, 219, 565, 121, 550, 616)
    sampling_rate: int = SPEECH_SAMPLE_RATE
    # Hard-coded in ticodec/models.py.
    latent_dim: int = 512
    global_dim: int = 128

    @classmethod
    def from_reference(cls, d: dict[str, Any]) -> "CodecConfig":
        if str(d.get("resblock", "1")) != "1":
            raise ValueError("only resblock '1' is supported")
        return cls(
            resblock="1",
            upsample_rates=tuple(int(x) for x in d["upsample_rates"]),
            upsample_kernel_sizes=tuple(int(x) for x in d["upsample_kernel_sizes"]),
            upsample_initial_channel=int(d["upsample_initial_channel"]),
            resblock_kernel_sizes=tuple(int(x) for x in d["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tuple(int(y) for y in x) for x in d["resblock_dilation_sizes"]),
            n_code_groups=int(d.get("n_code_groups", 1)),
            residual_layers=int(d.get("residul_layer", 1)),
            n_codes=int(d.get("n_codes", 1024)),
            global_code_num=int(d.get("global_code_num", 8)),
            global_tokens=tuple(int(x) for x in d["global_tokens"]),
            sampling_rate=int(d.get("sampling_rate", SPEECH_SAMPLE_RATE)),
        )

    @property
    def samples_per_token(self) -> int:
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass(frozen=True)
class VitaConfig:
    """All component configs of one checkpoint directory."""

    llm: Any  # transformers.Qwen2Config
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    tts: TTSDecoderConfig = field(default_factory=TTSDecoderConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
