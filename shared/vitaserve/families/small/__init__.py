"""The small family: trained models whose weights ship inside packages, answering meaningfully on a CPU.

- vision_encoder: `ImageDescriber` (vision.py): EfficientNet-Lite0 ImageNet labels + RapidOCR text, one
  description line per picture;
- audio_encoder: `SpeechRecognizer` (asr.py): Whisper tiny.en (CTranslate2 int8) -> the user's words;
- llm_decoder: SmolLM2-135M-Instruct (llm.py) through the same continuous-batching `LLMEngine` as VITA
  (batching, prefix reuse, cancellation and seeded sampling work alike), on a text prompt (prompt.py);
- speech_synth: `SpeechSynthesizer` (tts.py): hibari (Kokoro-82M distilled, 24 kHz), one sentence at a time.

Nothing is downloaded: every weight is in a pip package, so the family needs no checkpoint directory. The
LLM ships as GGUF and is converted once to safetensors in a cache directory (`VITASERVE_SMALL_CACHE`, else
`~/.cache/vitaserve/small`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from vitaserve.components.base import Encoding, ImageInput
from vitaserve.errors import InvalidInput
from vitaserve.families.base import (
    EncoderEngine,
    EngineOptions,
    LLMRequest,
    ModelFamily,
    TurnContent,
    other_family,
    text_encoding,
)
from vitaserve.families.small import prompt
from vitaserve.models.prompt import TextSegmenter, Turn

# Reply text is cut for speech at sentence ends, and at commas once a piece is long: hibari reads the
# prosody of a whole sentence. The first piece is cut early for a quick first audio: at its first comma, or
# after FIRST_SEGMENT_MAX_WORDS words (the LLM makes ~16 words a second on one core: a 9-word first clause
# would hold the first audio back ~0.25 s more).
SEGMENT_CUT_CHARS = ".!?;:,\n"
SEGMENT_MIN_CHARS = 40
FIRST_SEGMENT_MIN_CHARS = 12
FIRST_SEGMENT_MAX_WORDS = 5


def cpu_threads(options: EngineOptions) -> int:
    """Threads for one engine's own thread pool (onnxruntime, CTranslate2): the `cpu_threads` parameter,
    else VITASERVE_CPU_THREADS, else 1 (several engines share a small machine)."""
    raw = options.params.get("cpu_threads") or os.environ.get("VITASERVE_CPU_THREADS") or "1"
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"cpu_threads must be an integer, got {raw!r}") from None


class SmallFamily(ModelFamily):
    name = "small"
    description = ("small trained models from packages: Whisper tiny.en, EfficientNet-Lite0 + RapidOCR, "
                   "SmolLM2-135M-Instruct, hibari TTS")
    needs_checkpoint = False

    def system_prompt(self, media_kind: str | None, *, realtime: bool) -> str:
        return prompt.SYSTEM_PROMPTS["realtime" if realtime else "offline"]

    def llm_request(self, history: Sequence[Turn], content: TurnContent, *, system: str,
                    max_chars: int) -> LLMRequest:
        user = prompt.user_message(content)
        if not user:
            raise InvalidInput("the turn has nothing to answer: no words were recognised in the audio and "
                               "there is no text or picture")
        return LLMRequest(prompt.render(history, user, system=system, max_chars=max_chars))

    def next_turn_prefix(self, history: Sequence[Turn], *, system: str, max_chars: int) -> str:
        return prompt.render(history, None, system=system, max_chars=max_chars)

    def history_user_text(self, content: TurnContent) -> str:
        """The user message as the model read it: descriptions and the user's words (the transcript)."""
        return prompt.user_message(content)

    def segmenter(self) -> TextSegmenter:
        return TextSegmenter(cut_chars=SEGMENT_CUT_CHARS, min_chars=SEGMENT_MIN_CHARS,
                             first_min_chars=FIRST_SEGMENT_MIN_CHARS, first_commas_to_stops=False,
                             first_max_words=FIRST_SEGMENT_MAX_WORDS)

    def check_images(self, pictures: Sequence[ImageInput], encodings: Sequence[Encoding]) -> None:
        super().check_images(pictures, encodings)
        for enc in encodings:  # a description is never empty; rows instead come from a VITA-1.5 model
            if not enc.text:
                raise other_family("vision_encoder", "a description")

    def check_audio(self, encoding: Encoding) -> None:
        # An empty transcript is fine (nothing was said: `llm_request` says so); rows are another family's.
        if encoding.embeddings is not None and not encoding.text:
            raise other_family("audio_encoder", "a transcript")

    def engine(self, component: str, options: EngineOptions, *,
               after_step: Callable[[], None] | None = None) -> Any:
        threads = cpu_threads(options)
        if component == "vision_encoder":
            from vitaserve.families.small.vision import ImageDescriber

            return EncoderEngine(ImageDescriber(threads=threads), text_encoding)
        if component == "audio_encoder":
            from vitaserve.families.small.asr import SpeechRecognizer

            return EncoderEngine(SpeechRecognizer(cpu_threads=threads), text_encoding)
        if component == "llm_decoder" and options.params.get("engine", "transformers") == "vllm":
            from vitaserve.families.small.llm import small_vllm_engine

            return small_vllm_engine(options, after_step=after_step)
        if component == "llm_decoder":
            from vitaserve.batching import EngineConfig
            from vitaserve.families.small.llm import small_llm_engine

            return small_llm_engine(None, dtype=options.dtype, device=options.device,
                                    engine_config=EngineConfig.from_parameters(options.params),
                                    after_step=after_step)
        if component == "speech_synth":
            from vitaserve.families.small.tts import SpeechSynthesizer

            return SpeechSynthesizer(threads=threads, stream_capacity=max(options.max_streams, 1))
        raise ValueError(f"unknown component {component!r}")

