"""The conformance runner: every stage of the model on a golden folder's weights and inputs.

    python -m vitaserve.models.golden --golden DIR --out FILE.safetensors

DIR is laid out like `tests/golden/vita15-tiny` (tiny_*.safetensors weights with the real key names,
tiny_configs.json, image*.png, one audio_*.wav, golden_outputs.safetensors for the input tensors
`llm_input_ids`, `tts_text_ids` and `codec_codes`). The weights are first written as a checkpoint directory
in the released layout and loaded back through `CheckpointDir`, so the run exercises the production loader.
FILE receives every output under the names of `golden_outputs.safetensors`; tile hashes go into its
metadata as `tiles_sha256` (JSON: {"image{i}_max{m}": [sha256 per tile]}).

How inputs combine (the golden README's recipe):
- images in name order; tiling with max_num 12 and 1; the vision stages run on the max_num=1 tiles;
- the k image placeholders of `llm_input_ids` take the LAST k max_num=1 tiles, in order;
- the audio placeholder takes the adapter output of the WAV (fbank at 16 kHz, dither 0);
- the LLM generates as many greedy tokens as `llm_generated_ids` has (no stop ids), or 16;
- the speech decoder speaks `tts_text_ids` (embedding rows of the LLM) with argmax decoding for as many
  steps as `tts_ar_tokens_argmax` has, or 20;
- the codec decodes `codec_codes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vitaserve.models.audio import apply_cmvn, decode_audio, kaldi_fbank, to_mono_16k
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.image import decode_image, dynamic_preprocess, tiles_to_pixel_values
from vitaserve.models.tiny import write_tiny_checkpoint
from vitaserve.models.vision import pixel_shuffle_features

MAX_NUMS = (12, 1)


def _inputs(golden: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(golden / "golden_outputs.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        return {k: f.get_tensor(k) for k in keys}


@torch.no_grad()
def run_images(golden: Path, ckpt: CheckpointDir, out: dict[str, torch.Tensor], hashes: dict) -> torch.Tensor:
    tiles_max1 = []
    for i, path in enumerate(sorted(golden.glob("image*.png"))):
        img = decode_image(path.read_bytes())
        for m in MAX_NUMS:
            tiles = dynamic_preprocess(img, min_num=1, max_num=m, image_size=448, use_thumbnail=True)
            hashes[f"image{i}_max{m}"] = [hashlib.sha256(np.asarray(t).tobytes()).hexdigest() for t in tiles]
            pv = tiles_to_pixel_values(tiles)
            out[f"pixel_values_image{i}_max{m}_sum_per_tile_channel"] = pv.double().sum(dim=(2, 3)).float()
            out[f"pixel_values_image{i}_max{m}_tile0_rows0to7"] = pv[0, :, :8, :].clone()
            if m == 1:
                tiles_max1.append(pv)
    pixel_values = torch.cat(tiles_max1)
    vision = ckpt.load_vision()
    hidden = vision.vision_tower(pixel_values)
    out["vision_last_hidden_state_tile0"] = hidden[0]
    shuffled = pixel_shuffle_features(hidden)
    out["vision_tower_out_pixelshuffled"] = shuffled
    out["projector_out"] = vision.mm_projector(shuffled)
    return out["projector_out"]


@torch.no_grad()
def run_audio(golden: Path, ckpt: CheckpointDir, out: dict[str, torch.Tensor]) -> torch.Tensor:
    (wav_path,) = sorted(golden.glob("audio_*.wav"))
    samples, rate = decode_audio(wav_path.read_bytes())
    wave = to_mono_16k(samples, rate)
    feats = kaldi_fbank(wave)
    out["fbank"] = feats
    audio = ckpt.load_audio()
    out["fbank_cmvn"] = apply_cmvn(feats, audio.encoder.global_cmvn.mean, audio.encoder.global_cmvn.istd)
    lengths = torch.tensor([feats.shape[0]])
    enc, _ = audio.encode(feats[None], lengths)
    out["audio_encoder_out"] = enc[0]
    embeds, n_tokens = audio(feats[None], lengths)
    out["audio_adapter_out"] = embeds[0, : int(n_tokens[0])]
    out["audio_num_llm_tokens"] = n_tokens.to(torch.int64)
    return out["audio_adapter_out"]


@torch.no_grad()
def run_llm(ckpt: CheckpointDir, inputs: dict, projector_out: torch.Tensor, audio_out: torch.Tensor,
            out: dict[str, torch.Tensor]) -> None:
    from vitaserve.models.configs import IMAGE_TOKEN_ID

    ids = inputs["llm_input_ids"][0]
    n_images = int((ids == IMAGE_TOKEN_ID).sum())
    image_features = projector_out[projector_out.shape[0] - n_images:] if n_images else None
    llm = ckpt.load_llm()
    embeds = llm.splice_embeddings(ids, image_features=image_features, audio_features=[audio_out])
    out["llm_inputs_embeds"] = embeds
    out["llm_first_forward_logits"] = llm.logits(embeds)
    n_new = int(inputs["llm_generated_ids"].numel()) if "llm_generated_ids" in inputs else 16
    steps = list(llm.generate_stream(embeds, max_new_tokens=n_new, return_logits=True))
    out["llm_generated_ids"] = torch.tensor([t for t, _ in steps], dtype=torch.int64)
    step_logits = torch.stack([lg.float().reshape(-1) for _, lg in steps])
    out["llm_generation_step_logits"] = step_logits
    top2 = step_logits.topk(2, dim=-1).values
    out["llm_generation_top1_minus_top2"] = top2[:, 0] - top2[:, 1]


@torch.no_grad()
def run_tts(ckpt: CheckpointDir, inputs: dict, out: dict[str, torch.Tensor]) -> None:
    table = ckpt.load_embedding_table()
    decoder = ckpt.load_speech_decoder()
    ids = inputs["tts_text_ids"].reshape(-1)
    hidden = decoder.text_to_hidden(table[ids])
    out["tts_hidden_in"] = hidden[0]
    out["tts_prenet_out"] = decoder.prenet(hidden)[0]
    n_steps = int(inputs["tts_ar_tokens_argmax"].numel()) if "tts_ar_tokens_argmax" in inputs else 20
    steps = list(decoder.generate(hidden, max_tokens=n_steps, greedy=True, return_logits=True))
    out["tts_ar_tokens_argmax"] = torch.tensor([t for t, _ in steps], dtype=torch.int64)
    out["tts_ar_step_logits"] = torch.stack([lg.float().reshape(-1) for _, lg in steps])


@torch.no_grad()
def run_codec(ckpt: CheckpointDir, inputs: dict, out: dict[str, torch.Tensor]) -> None:
    codec = ckpt.load_codec()
    codes = inputs["codec_codes"]
    out["codec_codes"] = codes
    out["codec_quant_emb"] = codec.quantizer.embed(codes)[0]
    out["codec_gst_emb"] = codec.gst()
    out["codec_wave"] = codec.decode(codes)[0]


def run(golden: str | Path, out_file: str | Path) -> dict[str, torch.Tensor]:
    """Run every stage and write `out_file`; returns the outputs."""
    golden = Path(golden)
    inputs = _inputs(golden)
    out: dict[str, torch.Tensor] = {}
    hashes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="vitaserve-golden-") as tmp:
        ckpt = CheckpointDir(write_tiny_checkpoint(Path(tmp) / "ckpt", golden=golden))
        projector_out = run_images(golden, ckpt, out, hashes)
        audio_out = run_audio(golden, ckpt, out)
        out["llm_input_ids"] = inputs["llm_input_ids"]
        run_llm(ckpt, inputs, projector_out, audio_out, out)
        out["tts_text_ids"] = inputs["tts_text_ids"]
        run_tts(ckpt, inputs, out)
        run_codec(ckpt, inputs, out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    save_file(tensors, str(out_file), metadata={"tiles_sha256": json.dumps(hashes)})
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every VITA-1.5 stage on a golden folder.")
    parser.add_argument("--golden", required=True, help="folder laid out like tests/golden/vita15-tiny")
    parser.add_argument("--out", required=True, help="safetensors file to write")
    args = parser.parse_args(argv)
    tensors = run(args.golden, args.out)
    print(f"wrote {len(tensors)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
