"""Write a tiny VITA-1.5 checkpoint directory in the released layout.

    python -m vitaserve.models.tiny --out DIR [--seed 0]            # fresh random weights
    python -m vitaserve.models.tiny --out DIR --from-golden GOLDEN  # the weights of a golden folder

The configs are those of the golden tiny model (`assets/tiny_configs.json`); the tokenizer is the small
byte-level BPE shipped in `assets/tiny_tokenizer/`. The result loads through `CheckpointDir`, the same code
that loads the real checkpoint, so tests and the demo exercise the production loading path. Random weights
produce noise: the tiny model is for plumbing and conformance, not for answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitaserve.models.checkpoint import AUDIO_PREFIXES, TTS_DIR, VISION_PREFIXES, to_checkpoint_keys
from vitaserve.models.configs import AudioEncoderConfig, CodecConfig, TTSDecoderConfig, VisionConfig

ASSETS = resources.files("vitaserve.models") / "assets"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def tiny_configs() -> dict[str, Any]:
    return json.loads((ASSETS / "tiny_configs.json").read_text())


def _main_config(cfgs: dict[str, Any], tokenizer_dir: Path) -> dict[str, Any]:
    main = dict(cfgs["main_config"])
    special = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    ids = {tok["content"]: int(i) for i, tok in special.items()}
    main.update(
        model_type="vita-Qwen2",
        architectures=["VITAQwen2ForCausalLM"],
        torch_dtype="float32",
        bos_token_id=ids.get("<|endoftext|>"),
        eos_token_id=ids.get("<|im_end|>"),
        vision_config=cfgs["vision_config"],
        audio_encoder_config=cfgs["audio_encoder_config"],
    )
    return main


def _random_state(cfgs: dict[str, Any], seed: int) -> tuple[dict, dict, dict]:
    """Main, speech-decoder and codec state dicts with fresh weights, in the checkpoints' key names."""
    from vitaserve.models.audio import AudioEncoder, load_cmvn_json
    from vitaserve.models.checkpoint import _qwen2_config
    from vitaserve.models.codec import CodecDecoder
    from vitaserve.models.llm import VitaLLM
    from vitaserve.models.tts import SpeechDecoder
    from vitaserve.models.vision import VisionEncoder

    llm_cfg = _qwen2_config(cfgs["main_config"])
    torch.manual_seed(seed)
    main: dict[str, torch.Tensor] = dict(VitaLLM(llm_cfg).state_dict())
    # HF post_init draws N(0, initializer_range) for every Linear and Embedding, as the golden tiny model did.
    std = float(cfgs["main_config"].get("initializer_range", 0.02))
    for key, value in main.items():
        if value.dim() == 2:
            main[key] = torch.randn_like(value) * std
    vision = VisionEncoder(VisionConfig.from_reference(cfgs["vision_config"], llm_cfg.hidden_size))
    main.update(to_checkpoint_keys(vision.state_dict(), VISION_PREFIXES))
    audio = AudioEncoder(AudioEncoderConfig.from_reference(cfgs["audio_encoder_config"]))
    audio_state = dict(audio.state_dict())
    mean, istd = load_cmvn_json(json.loads((ASSETS / "global_cmvn.json").read_text()))
    audio_state["encoder.global_cmvn.mean"] = torch.as_tensor(mean, dtype=torch.float32)
    audio_state["encoder.global_cmvn.istd"] = torch.as_tensor(istd, dtype=torch.float32)
    main.update(to_checkpoint_keys(audio_state, AUDIO_PREFIXES))
    decoder = SpeechDecoder(TTSDecoderConfig.from_reference(cfgs["tts_decoder_args"])).state_dict()
    codec = CodecDecoder(CodecConfig.from_reference(cfgs["codec_model_json"])).state_dict()
    return main, dict(decoder), dict(codec)


def _golden_state(golden: Path) -> tuple[dict, dict, dict]:
    return (
        load_file(str(golden / "tiny_main.safetensors")),
        load_file(str(golden / "tiny_tts_decoder.safetensors")),
        load_file(str(golden / "tiny_codec.safetensors")),
    )


def write_tiny_checkpoint(out: str | Path, *, seed: int = 0, golden: str | Path | None = None,
                          llm_overrides: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint directory to `out` and return its path. `llm_overrides` changes the LLM's
    config (random weights only), e.g. `{"num_attention_heads": 2, "num_key_value_heads": 1}` for head_dim
    32, which vLLM's CPU attention needs."""
    out = Path(out)
    cfgs = json.loads((Path(golden) / "tiny_configs.json").read_text()) if golden else tiny_configs()
    if llm_overrides:
        if golden:
            raise ValueError("llm_overrides need random weights: the golden weights have the golden shapes")
        cfgs["main_config"] = {**cfgs["main_config"], **llm_overrides}
    main, decoder, codec = _golden_state(Path(golden)) if golden else _random_state(cfgs, seed)
    out.mkdir(parents=True, exist_ok=True)

    tok_dir = Path(str(ASSETS / "tiny_tokenizer"))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, out / name)
    (out / "config.json").write_text(json.dumps(_main_config(cfgs, tok_dir), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 512}))

    # Two shards, split as in the release (LLM weights first, encoders last), with an index.
    is_encoder = lambda k: k.startswith(tuple(VISION_PREFIXES) + tuple(AUDIO_PREFIXES))  # noqa: E731
    shards = {
        "model-00001-of-00002.safetensors": {k: v.contiguous() for k, v in main.items() if not is_encoder(k)},
        "model-00002-of-00002.safetensors": {k: v.contiguous() for k, v in main.items() if is_encoder(k)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    total = sum(v.numel() * v.element_size() for v in main.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))

    dec_dir, codec_dir = out / TTS_DIR / "decoder", out / TTS_DIR / "codec"
    dec_dir.mkdir(parents=True, exist_ok=True)
    codec_dir.mkdir(parents=True, exist_ok=True)
    args = cfgs["tts_decoder_args"]
    (dec_dir / "model.json").write_text(json.dumps([args["idim"], args["odim"], args], indent=1))
    torch.save({k: v.contiguous() for k, v in decoder.items()}, dec_dir / "final.pt")
    (codec_dir / "model.json").write_text(json.dumps(cfgs["codec_model_json"], indent=1))
    nested: dict[str, dict[str, torch.Tensor]] = {"generator": {}, "quantizer": {}}
    for key, value in codec.items():
        part, _, rest = key.partition(".")
        nested[part][rest] = value.contiguous()
    torch.save(nested, codec_dir / "final.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument("--from-golden", dest="golden", help="take the weights of a golden folder instead")
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.out, seed=args.seed, golden=args.golden)
    print(f"wrote tiny checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
