"""VITA-1.5, the production family: encoders return LLM rows spliced into the prompt's placeholders.

- vision_encoder: InternViT + projector, 256 rows per 448² tile (`VisionEngine`); camera frames one tile
  each;
- audio_encoder: fbank + whale encoder + adapter, 12.5 rows per second (`AudioEngine`); VITA's path has no
  speech recognition, so history keeps `AUDIO_MARKER` instead of the user's words;
- llm_decoder: Qwen2 with media splicing (`LLMEngine` over `CheckpointDir`), ChatML with `<image>` per tile
  and `<audio>` (`vitaserve.models.prompt.build_prompt`), replies that begin with a state mark;
- speech_synth: the end-to-end speech decoder + codec (`SpeechEngine`), segments cut by the reference's
  rule (`TextSegmenter` with the prompt format's defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitaserve.components.base import Encoding, ImageInput
from vitaserve.errors import VitaserveError
from vitaserve.families.base import (
    EncoderEngine,
    EngineOptions,
    LLMRequest,
    ModelFamily,
    TurnContent,
    clean_history_text,
    other_family,
    rows_encoding,
)
from vitaserve.models.configs import TOKENS_PER_TILE
from vitaserve.models.prompt import IM_START, TextSegmenter, Turn, build_prompt, system_prompt

IMAGE_MARKER = "[image]"
AUDIO_MARKER = "[spoken question]"


class Vita15Family(ModelFamily):
    name = "vita15"
    description = "VITA-1.5: InternViT + whale audio encoder + Qwen2 + end-to-end speech decoder"
    needs_checkpoint = True

    def system_prompt(self, media_kind: str | None, *, realtime: bool) -> str:
        return system_prompt(media_kind, realtime=realtime)  # type: ignore[arg-type]

    def llm_request(self, history: Sequence[Turn], content: TurnContent, *, system: str,
                    max_chars: int) -> LLMRequest:
        # One <image> placeholder per tile: each picture's rows split into 256-row tiles (thumbnail last).
        tiles = [block for e in (*content.image_encodings, *content.frame_encodings)
                 for block in np.split(e.embeddings, e.rows // TOKENS_PER_TILE)]
        audio = content.audio.embeddings if content.audio is not None else None
        prompt = build_prompt(history, content.text, n_images=len(tiles), has_audio=audio is not None,
                              media=content.media_kind, system=system, max_chars=max_chars)
        return LLMRequest(prompt, (*tiles, *(() if audio is None else (audio,))))

    def next_turn_prefix(self, history: Sequence[Turn], *, system: str, max_chars: int) -> str:
        full = build_prompt(history, "x", system=system, max_chars=max_chars)
        header = f"{IM_START}user\n"
        return full[: full.rindex(header) + len(header)]

    def history_user_text(self, content: TurnContent) -> str:
        """`IMAGE_MARKER` per still image, the typed text, `AUDIO_MARKER` if the question was spoken (the
        spoken words are not known: VITA's path has no speech recognition)."""
        typed = [clean_history_text(content.text)] if content.text else []
        parts = [IMAGE_MARKER] * len(content.images) + typed
        return " ".join(parts + ([AUDIO_MARKER] if content.audio is not None else []))

    def segmenter(self) -> TextSegmenter:
        return TextSegmenter()

    def check_images(self, pictures: Sequence[ImageInput], encodings: Sequence[Encoding]) -> None:
        super().check_images(pictures, encodings)
        for k, (pic, enc) in enumerate(zip(pictures, encodings, strict=True)):
            arr = enc.embeddings
            if arr is None and enc.text:
                raise other_family("vision_encoder", "LLM rows")
            rows = arr.shape[0] if arr is not None and arr.ndim == 2 else -1
            if rows <= 0 or rows % TOKENS_PER_TILE or rows // TOKENS_PER_TILE > max(pic.max_tiles, 1) + 1:
                shape = None if arr is None else arr.shape
                raise VitaserveError(f"vision_encoder returned embeddings of shape {shape} for image {k}")

    def check_audio(self, encoding: Encoding) -> None:
        arr = encoding.embeddings
        if arr is None and encoding.text:
            raise other_family("audio_encoder", "LLM rows")
        if arr is None or arr.ndim != 2 or arr.shape[0] == 0:
            shape = None if arr is None else arr.shape
            raise VitaserveError(f"audio_encoder returned embeddings of shape {shape}")

    def engine(self, component: str, options: EngineOptions, *,
               after_step: Callable[[], None] | None = None) -> Any:
        # torch and the checkpoint are imported here: the orchestrator never builds engines.
        from vitaserve.components import engines
        from vitaserve.models.checkpoint import CheckpointDir

        if not options.checkpoint_dir:
            raise ValueError("the vita15 family needs a checkpoint directory (checkpoint_dir)")
        checkpoint = CheckpointDir(options.checkpoint_dir)
        common = {"dtype": options.dtype, "device": options.device}
        if component == "vision_encoder":
            return EncoderEngine(engines.VisionEngine(checkpoint, **common), rows_encoding)
        if component == "audio_encoder":
            return EncoderEngine(engines.AudioEngine(checkpoint, **common), rows_encoding)
        if component == "llm_decoder" and options.params.get("engine", "transformers") == "vllm":
            from vitaserve.components.vllm_engine import VllmLLMEngine, VllmOptions, vita_llm_dir
            from vitaserve.models.llm import PromptEmbedder

            prompts = engines.PromptBuilder(
                PromptEmbedder(checkpoint.config.llm, checkpoint.load_embedding_table(**common)),
                checkpoint.tokenizer(), raw_config=checkpoint.raw_config)
            return VllmLLMEngine(vita_llm_dir(checkpoint), prompts, VllmOptions.from_parameters(options.params),
                                 after_step=after_step)
        if component == "llm_decoder":
            from vitaserve.batching import EngineConfig

            config = EngineConfig.from_parameters(options.params)
            return engines.LLMEngine.from_checkpoint(checkpoint, engine_config=config, after_step=after_step,
                                                     **common)
        if component == "speech_synth":
            from vitaserve.batching import SpeechBatchConfig
            from vitaserve.triton.backend import int_parameter

            config = SpeechBatchConfig.from_parameters(options.params)
            if "max_streams" in options.params:  # the batch size of a Triton instance
                config = dataclasses.replace(config, max_batch=options.max_streams)
            codec_workers = int_parameter(options.params, "codec_workers", 1, minimum=1)
            speech = engines.SpeechEngine(checkpoint, batch_config=config, codec_workers=codec_workers,
                                          **common)
            # The batcher (its KV buffers and engine thread) starts now, on the loading thread: a budget
            # that cannot fit fails the load, and the first segments do not race to create it.
            speech.batcher  # noqa: B018
            return speech
        raise ValueError(f"unknown component {component!r}")

