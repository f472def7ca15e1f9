"""Per-stage CPU time of the tiny VITA-1.5 model, and real-size parameter counts per component.

    python bench/models.py [--json] [--repeats 5]

Times are medians over `--repeats` runs, in milliseconds of wall time on this machine's CPU (torch threads
as configured by the environment). Parameter counts come from modules built on the meta device with the
real configs, so nothing real-size is allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "vita15-tiny"
MANIFEST = ROOT / "tests" / "golden" / "vita15_manifest.json"


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


@torch.no_grad()
def stage_times(repeats: int) -> dict[str, float]:
    from vitaserve.models.audio import decode_audio, kaldi_fbank, to_mono_16k
    from vitaserve.models.checkpoint import CheckpointDir
    from vitaserve.models.codec import StreamingDecoder
    from vitaserve.models.image import decode_image, preprocess_image
    from vitaserve.models.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = CheckpointDir(write_tiny_checkpoint(Path(tmp) / "ckpt", golden=GOLDEN))
        vision, audio, llm = ckpt.load_vision(), ckpt.load_audio(), ckpt.load_llm()
        decoder, codec, table = ckpt.load_speech_decoder(), ckpt.load_codec(), ckpt.load_embedding_table()

    png = (GOLDEN / "image0_800x600.png").read_bytes()
    wav = (GOLDEN / "audio_16k_2.3s.wav").read_bytes()
    img = decode_image(png)
    pv1 = preprocess_image(img, max_num=1)
    samples, rate = decode_audio(wav)
    wave = to_mono_16k(samples, rate)
    feats = kaldi_fbank(wave)
    lengths = torch.tensor([feats.shape[0]])
    audio_emb, n = audio(feats[None], lengths)
    ids = list(range(1, 40)) + [-200] + list(range(40, 60)) + [-500] + list(range(60, 80))
    image_emb = vision(pv1)
    embeds = llm.splice_embeddings(ids, image_features=image_emb, audio_features=[audio_emb[0, : int(n[0])]])
    tts_hidden = decoder.text_to_hidden(table[torch.arange(1, 25)])
    codes = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(0))

    def llm_tokens() -> None:
        for _ in llm.generate_stream(embeds, max_new_tokens=32):
            pass

    def tts_tokens() -> None:
        for _ in decoder.generate(tts_hidden, max_tokens=40, greedy=True):
            pass

    def stream_codec() -> None:
        s = StreamingDecoder(codec)
        for c in codes[0].tolist() * 3:
            s.push(c)
        s.flush()

    out = {
        "image_decode_tile12_ms": _median_ms(lambda: preprocess_image(decode_image(png), max_num=12), repeats),
        "image_decode_tile1_ms": _median_ms(lambda: preprocess_image(decode_image(png), max_num=1), repeats),
        "vision_encoder_1tile_ms": _median_ms(lambda: vision(pv1), repeats),
        "fbank_2.3s_ms": _median_ms(lambda: kaldi_fbank(wave), repeats),
        "audio_encoder_2.3s_ms": _median_ms(lambda: audio(feats[None], lengths), repeats),
        "llm_prefill_%d_ms" % embeds.shape[0]: _median_ms(lambda: llm.logits(embeds), repeats),
        "llm_32_tokens_ms": _median_ms(llm_tokens, repeats),
        "tts_40_tokens_ms": _median_ms(tts_tokens, repeats),
        "codec_1s_oneshot_ms": _median_ms(lambda: codec.decode(codes), repeats),
        "codec_3s_streaming_ms": _median_ms(stream_codec, repeats),
    }
    return out


def real_parameter_counts() -> dict[str, int]:
    from vitaserve.models.audio import AudioEncoder
    from vitaserve.models.checkpoint import _qwen2_config
    from vitaserve.models.codec import CodecDecoder
    from vitaserve.models.configs import AudioEncoderConfig, CodecConfig, TTSDecoderConfig, VisionConfig
    from vitaserve.models.llm import VitaLLM
    from vitaserve.models.tts import SpeechDecoder
    from vitaserve.models.vision import VisionEncoder

    manifest = json.loads(MANIFEST.read_text())
    llm_cfg = _qwen2_config(manifest["main_model"]["config"])
    count = lambda m: sum(p.numel() for p in m.state_dict().values())  # noqa: E731
    with torch.device("meta"):
        vision = VisionEncoder(VisionConfig(llm_hidden_size=llm_cfg.hidden_size))
        return {
            "vision_tower": count(vision.vision_tower),
            "mm_projector": count(vision.mm_projector),
            "audio_encoder+adapter": count(AudioEncoder(AudioEncoderConfig())),
            "llm": count(VitaLLM(llm_cfg)),
            "speech_decoder": count(SpeechDecoder(TTSDecoderConfig())),
            "codec_decoder": count(CodecDecoder(CodecConfig())),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = {"torch_threads": torch.get_num_threads(), "tiny_stage_ms": stage_times(args.repeats),
              "real_parameters": real_parameter_counts()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"tiny model, median of {args.repeats} runs, {result['torch_threads']} torch threads")
        for k, v in result["tiny_stage_ms"].items():
            print(f"  {k:32s} {v:10.2f} ms")
        print("real-size parameters (meta device)")
        for k, v in result["real_parameters"].items():
            print(f"  {k:32s} {v:>14,d}")
        print(f"  {'total':32s} {sum(result['real_parameters'].values()):>14,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
