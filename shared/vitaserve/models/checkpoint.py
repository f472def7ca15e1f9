"""Loading a VITA-1.5 checkpoint directory in the released layout.

Layout (as published in `VITA-MLLM/VITA-1.5`; the tiny writer in `vitaserve.models.tiny` produces the same):

    config.json                          VITAQwen2 config (Qwen2 fields + mm_*); optional `vision_config`
                                         and `audio_encoder_config` (the real-size values are the defaults)
    model.safetensors.index.json         {"weight_map": {key: shard}}  (or a single model.safetensors)
    model-0000i-of-0000n.safetensors     LLM + vision tower + projector + audio encoder/adapter
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, ...
    vita_tts_ckpt/decoder/model.json     speech decoder args (a dict, or the [idim, odim, args] list form)
    vita_tts_ckpt/decoder/final.pt       its state dict (possibly under "model"); model.safetensors also read
    vita_tts_ckpt/codec/model.json       codec settings
    vita_tts_ckpt/codec/final.pt         {"generator": sd, "quantizer": sd, "encoder": sd}; or
                                         model.safetensors with generator.* / quantizer.* keys

Each component is loaded on its own (a Triton model for the vision encoder reads only the vision tensors),
strictly: a missing, unexpected or mis-shaped tensor is a `CheckpointError` naming the file and the key.
Modules are built under the requested device and dtype with weight initialisation skipped, then filled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vitaserve.errors import CheckpointError
from vitaserve.models.configs import (
    AudioEncoderConfig,
    CodecConfig,
    TTSDecoderConfig,
    VisionConfig,
    VitaConfig,
)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

SUPPORTED_MODEL_TYPES = ("vita-Qwen2",)
TTS_DIR = Path("vita_tts_ckpt")

# Checkpoint key prefix -> module key prefix, per component of the main checkpoint.
VISION_PREFIXES = {"model.vision_tower.vision_tower.": "vision_tower.", "model.mm_projector.": "mm_projector."}
AUDIO_PREFIXES = {"model.audio_encoder.": ""}
_NON_LLM_PREFIXES = tuple(VISION_PREFIXES) + tuple(AUDIO_PREFIXES)
EMBED_KEY = "model.embed_tokens.weight"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


@contextmanager
def _construction(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly on `device` in `dtype`, skipping random initialisation (weights are loaded
    right after). Derived float tables (rope, sinusoids) are computed in float32 by the modules themselves."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `state` has exactly the module's persistent keys with the same shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {list(got)}, expected {list(shape)}")


def fill_module(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    check_state_dict(module, state, source)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _qwen2_config(cfg: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _VITA_ONLY_KEYS}
    fields.pop("model_type", None)
    fields.pop("architectures", None)
    return Qwen2Config(**fields)


_VITA_ONLY_KEYS = {
    "vision_config",
    "audio_encoder_config",
    "freeze_audio_encoder",
    "freeze_audio_encoder_adapter",
    "image_aspect_ratio",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "transformers_version",
}


def _tts_args(raw: Any, path: Path) -> dict[str, Any]:
    """model.json of the speech decoder: a dict of args, or the reference's [idim, odim, args] list."""
    if isinstance(raw, list) and len(raw) == 3 and isinstance(raw[2], dict):
        args = dict(raw[2])
        args.setdefault("idim", raw[0])
        args.setdefault("odim", raw[1])
        return args
    if isinstance(raw, dict):
        return raw
    raise CheckpointError(f"{path}: expected a dict or [idim, odim, args], got {type(raw).__name__}")


@dataclass
class _Shard:
    path: Path
    keys: list[str]


class CheckpointDir:
    """A checkpoint directory. Opening it reads only the JSON files and the safetensors headers."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        raw = _read_json(self.path / "config.json")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{self.path / 'config.json'}: unknown checkpoint type model_type={model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.raw_config = raw
        self.config = self._read_configs(raw)
        self._key_to_shard = self._index_shards()

    # ----------------------------------------------------------------------------------------- configs
    def _read_configs(self, raw: dict[str, Any]) -> VitaConfig:
        try:
            llm = _qwen2_config(raw)
            vision = (
                VisionConfig.from_reference(raw["vision_config"], llm.hidden_size)
                if "vision_config" in raw
                else VisionConfig(llm_hidden_size=llm.hidden_size)
            )
            audio = (
                AudioEncoderConfig.from_reference(raw["audio_encoder_config"])
                if "audio_encoder_config" in raw
                else AudioEncoderConfig(llm_hidden_size=llm.hidden_size)
            )
            tts_json = self.path / TTS_DIR / "decoder" / "model.json"
            codec_json = self.path / TTS_DIR / "codec" / "model.json"
            tts = TTSDecoderConfig.from_reference(_tts_args(_read_json(tts_json), tts_json)) if tts_json.exists() else None
            codec = CodecConfig.from_reference(_read_json(codec_json)) if codec_json.exists() else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: invalid configuration: {exc}") from None
        return VitaConfig(llm=llm, vision=vision, audio=audio, tts=tts, codec=codec)  # type: ignore[arg-type]

    def _index_shards(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").exists():
            weight_map, shards = None, ["model.safetensors"]
        else:
            raise CheckpointError(f"{self.path}: neither model.safetensors.index.json nor model.safetensors found")
        key_to_shard: dict[str, Path] = {}
        for shard in shards:
            shard_path = self.path / shard
            for key in self._shard_keys(shard_path):
                key_to_shard[key] = shard_path
        if weight_map is not None:
            for key, shard in weight_map.items():
                if key_to_shard.get(key) != self.path / shard:
                    raise CheckpointError(f"{self.path / shard}: index lists tensor {key!r} but the shard lacks it")
            for key, shard_path in key_to_shard.items():
                if key not in weight_map:
                    raise CheckpointError(f"{shard_path}: tensor {key!r} is not in the index")
        return key_to_shard

    @staticmethod
    def _shard_keys(path: Path) -> list[str]:
        if not path.exists():
            raise CheckpointError(f"{path}: shard file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None

    # ------------------------------------------------------------------------------------------ tensors
    def tensor_names(self) -> list[str]:
        return sorted(self._key_to_shard)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors of the main checkpoint from their shards."""
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._key_to_shard:
                raise CheckpointError(f"{self.path}: missing tensor {name!r}")
            by_shard.setdefault(self._key_to_shard[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for key in keys:
                        out[key] = f.get_tensor(key)
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{shard}: cannot read tensor data ({exc}); is the file truncated?") from None
        return out

    def read_prefixes(self, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
        """Tensors whose names start with one of `prefixes`, renamed to the module's key names."""
        names = [n for n in self._key_to_shard if n.startswith(tuple(prefixes))]
        renamed = {}
        for name, tensor in self.read(names).items():
            prefix = next(p for p in prefixes if name.startswith(p))
            renamed[prefixes[prefix] + name[len(prefix):]] = tensor
        return renamed

    def shards_for(self, prefixes: tuple[str, ...]) -> str:
        files = sorted({self._key_to_shard[n].name for n in self._key_to_shard if n.startswith(prefixes)})
        return f"{self.path}/{{{','.join(files)}}}" if files else str(self.path)

    # ------------------------------------------------------------------------------------- components
    def load_vision(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.nn.Module:
        from vitaserve.models.vision import VisionEncoder

        state = self.read_prefixes(VISION_PREFIXES)
        return self._build(lambda: VisionEncoder(self.config.vision), state, dtype, device,
                           self.shards_for(tuple(VISION_PREFIXES)))

    def load_audio(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.nn.Module:
        from vitaserve.models.audio import AudioEncoder

        state = self.read_prefixes(AUDIO_PREFIXES)
        return self._build(lambda: AudioEncoder(self.config.audio), state, dtype, device,
                           self.shards_for(tuple(AUDIO_PREFIXES)))

    def load_llm(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.nn.Module:
        from vitaserve.models.llm import VitaLLM

        names = [n for n in self._key_to_shard if not n.startswith(_NON_LLM_PREFIXES)]
        state = self.read(names)
        return self._build(lambda: VitaLLM(self.config.llm), state, dtype, device,
                           self.shards_for(("model.", "lm_head.")))

    def load_embedding_table(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.Tensor:
        """The LLM's input embedding table alone (the speech decoder's text input)."""
        table = self.read([EMBED_KEY])[EMBED_KEY]
        expected = (self.config.llm.vocab_size, self.config.llm.hidden_size)
        if tuple(table.shape) != expected:
            raise CheckpointError(f"{self.shards_for((EMBED_KEY,))}: tensor {EMBED_KEY!r} has shape "
                                  f"{list(table.shape)}, expected {list(expected)}")
        return table.to(device=device, dtype=resolve_dtype(dtype))

    def load_speech_decoder(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.nn.Module:
        from vitaserve.models.tts import SpeechDecoder

        cfg = self._require(self.config.tts, "decoder")
        folder = self.path / TTS_DIR / "decoder"
        state, source = _read_torch_or_safetensors(folder)
        if isinstance(state.get("model"), dict):
            state = state["model"]
        return self._build(lambda: SpeechDecoder(cfg), state, dtype, device, source)

    def load_codec(self, dtype: str | torch.dtype = "float32", device: str = "cpu") -> torch.nn.Module:
        from vitaserve.models.codec import CodecDecoder

        cfg = self._require(self.config.codec, "codec")
        folder = self.path / TTS_DIR / "codec"
        raw, source = _read_torch_or_safetensors(folder)
        state = _flatten_codec_state(raw, source)
        dt = resolve_dtype(dtype)
        with _construction(device, dt):
            codec = CodecDecoder(cfg)
        return codec.load_checkpoint_state(state, source).to(device=device, dtype=dt).eval().requires_grad_(False)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot load the tokenizer ({exc})") from None

    def _require(self, cfg: Any, name: str) -> Any:
        if cfg is None:
            raise CheckpointError(f"{self.path / TTS_DIR / name / 'model.json'}: file not found")
        return cfg

    @staticmethod
    def _build(factory: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor],
               dtype: str | torch.dtype, device: str, source: str) -> torch.nn.Module:
        with _construction(device, resolve_dtype(dtype)):
            module = factory()
        return fill_module(module, state, source)

    def verify(self) -> None:
        """Check every tensor of the main checkpoint belongs to a component, with the right shape, by
        building each component on the meta device (only safetensors headers are read)."""
        expected = main_tensor_shapes(self.config)
        present = set(self._key_to_shard)
        for key in sorted(present - set(expected)):
            raise CheckpointError(f"{self._key_to_shard[key]}: unexpected tensor {key!r}")
        for key in sorted(set(expected) - present):
            raise CheckpointError(f"{self.path}: missing tensor {key!r}")
        for shard in sorted(set(self._key_to_shard.values())):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise CheckpointError(f"{shard}: tensor {key!r} has shape {list(shape)}, "
                                              f"expected {list(expected[key])}")


def main_tensor_shapes(config: VitaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the main checkpoint's tensors for `config`, from modules built on the meta
    device (no memory is allocated, so this works for the real 8.3B-parameter model)."""
    from vitaserve.models.audio import AudioEncoder
    from vitaserve.models.llm import VitaLLM
    from vitaserve.models.vision import VisionEncoder

    with torch.device("meta"):
        parts = [
            (VisionEncoder(config.vision), VISION_PREFIXES),
            (AudioEncoder(config.audio), AUDIO_PREFIXES),
            (VitaLLM(config.llm), {"": ""}),
        ]
    expected: dict[str, tuple[int, ...]] = {}
    for module, prefixes in parts:
        named = to_checkpoint_keys(module.state_dict(), prefixes)
        expected.update({key: tuple(tensor.shape) for key, tensor in named.items()})
    return expected


def to_checkpoint_keys(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """A module's state dict renamed to the checkpoint's key names: the inverse of `read_prefixes`
    (`prefixes` maps checkpoint prefix -> module prefix; the longest matching module prefix wins)."""
    inverse = {module_prefix: ckpt_prefix for ckpt_prefix, module_prefix in prefixes.items()}
    renamed = {}
    for key, tensor in state.items():
        module_prefix = max((p for p in inverse if key.startswith(p)), key=len)
        renamed[inverse[module_prefix] + key[len(module_prefix):]] = tensor
    return renamed


def _read_torch_or_safetensors(folder: Path) -> tuple[dict[str, Any], str]:
    st, pt = folder / "model.safetensors", folder / "final.pt"
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), str(st)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{st}: unreadable safetensors file ({exc})") from None
    if pt.exists():
        try:
            return torch.load(str(pt), map_location="cpu", weights_only=True), str(pt)
        except Exception as exc:  # torch.load raises many unrelated types for corrupt files
            raise CheckpointError(f"{pt}: unreadable torch checkpoint ({type(exc).__name__}: {exc})") from None
    raise CheckpointError(f"{folder}: neither model.safetensors nor final.pt found")


def _flatten_codec_state(raw: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """final.pt holds {'generator': sd, 'quantizer': sd, 'encoder': sd}; safetensors holds prefixed keys.
    The encoder is not used for decoding and is dropped."""
    if isinstance(raw.get("generator"), dict):
        state = {}
        for part in ("generator", "quantizer"):
            if not isinstance(raw.get(part), dict):
                raise CheckpointError(f"{source}: missing the {part!r} state dict")
            state.update({f"{part}.{k}": v for k, v in raw[part].items()})
        return state
    return {k: v for k, v in raw.items() if not k.startswith("encoder.")}
