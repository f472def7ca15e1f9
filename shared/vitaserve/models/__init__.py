"""The VITA-1.5 model library: every inference stage of the reference, written from the operation-level
specification (`tests/golden/vita15_architecture.md`) and proven against the reference's outputs.

- `image`      tiling, the CLIP-style tile processor, video frame sampling, safe image decoding
- `vision`     InternViT tower, pixel shuffle, mlp2x_gelu projector
- `audio`      audio decoding/resampling, Kaldi fbank, CMVN, whale encoder, adapter
- `prompt`     ChatML prompts, placeholders, state marks, text segmentation for speech
- `llm`        Qwen2 (transformers) with embedding splicing and streamed generation
- `tts`        the speech decoder (text embeddings -> speech codes)
- `codec`      the TiCodec decoder (speech codes -> 24 kHz PCM), streaming and one-shot
- `checkpoint` loading a checkpoint directory in the released layout
- `tiny`       writing a tiny checkpoint directory in that layout
- `golden`     the conformance runner
"""
