"""The seam between the platform and a model family: `ModelFamily`.

The four components (vision_encoder, audio_encoder, llm_decoder, speech_synth) keep their Triton names,
tensors and roles whatever model fills them; what flows between them is the family's choice. A family says,
on the orchestrator's side (pure logic, no torch):

- what its encoders' `Encoding`s must hold (`check_images`, `check_audio`): LLM rows (VITA-1.5) or text
  (the small family);
- how a committed turn becomes the LLM's request (`llm_request`): the prompt, rendered with the family's
  chat template and system prompt, and the media rows that fill its placeholders;
- how the start of the session's next prompt reads (`next_turn_prefix`, the KV warm-up);
- what a turn leaves in history (`history_user_text`) and how the reply is cut for speech (`segmenter`);

and on the model's side (`engine`), which engine each component runs; the Triton adapters and
`InProcessComponents` build their engines only through it. Engines import torch; the registry
(`vitaserve.families.get_family`) does not, so the orchestrator stays light.

Engine shapes the adapters rely on:
    vision_encoder  `preprocess(ImageInput) -> item` (InvalidInput for a bad image), `forward(items) ->
                    list[Encoding]` (one batched call)
    audio_encoder   `preprocess(pcm) -> item`, `forward(items) -> list[Encoding]`
    llm_decoder     `vitaserve.components.engines.LLMEngine`
    speech_synth    `synthesize(text, first_sentence, seed, is_cancelled) -> iterator of float32 chunks`,
                    `sample_rate`, `close()`
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from vitaserve.components.base import Encoding, ImageInput
from vitaserve.errors import VitaserveError
from vitaserve.models.prompt import TextSegmenter, Turn

# Text a model may produce that no later prompt may contain (media placeholders, ChatML control tokens).
RESERVED = re.compile(r"<image>|<audio>|<video>|<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class EngineOptions:
    """How one component's engine is built: the `parameters` of its Triton model (or the in-process
    client's arguments). `checkpoint_dir`: the family's weights, for families that need them
    (`ModelFamily.needs_checkpoint`; VITA-1.5: the checkpoint in the released layout)."""

    checkpoint_dir: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    max_streams: int = 1
    params: dict[str, str] = field(default_factory=dict)  # every parameter, as strings


@dataclass(frozen=True)
class TurnContent:
    """A committed user turn as the encoders saw it: typed `text`, one `Encoding` per still image and per
    camera frame (oldest first, with the still images' `ImageInput`s for their tile counts), and the
    spoken question's `Encoding`."""

    text: str = ""
    images: tuple[ImageInput, ...] = ()
    image_encodings: tuple[Encoding, ...] = ()
    frame_encodings: tuple[Encoding, ...] = ()
    audio: Encoding | None = None

    @property
    def media_kind(self) -> str | None:
        """'image' for still images, 'video' for camera frames only, None without pictures."""
        return "image" if self.images else ("video" if self.frame_encodings else None)

    @property
    def transcript(self) -> str:
        return self.audio.text if self.audio is not None else ""

    @property
    def descriptions(self) -> tuple[str, ...]:
        return tuple(e.text for e in (*self.image_encodings, *self.frame_encodings) if e.text)


@dataclass(frozen=True)
class LLMRequest:
    """The LLM's input for one turn: the rendered `prompt` and the media rows its placeholders take."""

    prompt: str
    media: tuple[np.ndarray, ...] = ()


class ModelFamily(ABC):
    """One way of filling the four components (see the module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Whether the Triton models need `checkpoint_dir` (VITASERVE_CHECKPOINT_DIR) to load.
    needs_checkpoint: ClassVar[bool] = True

    # ---- the orchestrator's side -------------------------------------------------------------------

    @abstractmethod
    def system_prompt(self, media_kind: str | None, *, realtime: bool) -> str:
        """The default system prompt for a turn with `media_kind` ('image', 'video' or None); `realtime`:
        a live conversation (the orchestrator) rather than an offline batch item."""

    @abstractmethod
    def llm_request(self, history: Sequence[Turn], content: TurnContent, *, system: str,
                    max_chars: int) -> LLMRequest:
        """The prompt and media for `content` after `history`. Raises InvalidInput for text the template
        refuses (reserved tokens, more than `max_chars` per text)."""

    @abstractmethod
    def next_turn_prefix(self, history: Sequence[Turn], *, system: str, max_chars: int) -> str:
        """The start of the next turn's prompt, up to and including the next user message's header: what
        `llm_request` will render for any next turn after `history` with this `system` prompt."""

    @abstractmethod
    def history_user_text(self, content: TurnContent) -> str:
        """What `content` leaves in the session's history as the user's message (text only)."""

    @abstractmethod
    def segmenter(self) -> TextSegmenter:
        """A fresh segmenter cutting one streamed reply into pieces for speech synthesis."""

    def turn_content(self, text: str, images: Sequence[ImageInput], frames: Sequence[ImageInput],
                     encodings: Sequence[Encoding], audio: Encoding | None) -> TurnContent:
        """What the encoders made of a turn: `encodings` answer `[*images, *frames]` in order, `audio` the
        spoken question. Raises VitaserveError if they do not fit this family (`check_images`,
        `check_audio`)."""
        self.check_images([*images, *frames], encodings)
        if audio is not None:
            self.check_audio(audio)
        n = len(images)
        return TurnContent(text=text, images=tuple(images), image_encodings=tuple(encodings[:n]),
                           frame_encodings=tuple(encodings[n:]), audio=audio)

    def check_images(self, pictures: Sequence[ImageInput], encodings: Sequence[Encoding]) -> None:
        """Raise VitaserveError if the vision encoder's answer does not fit this family."""
        if len(encodings) != len(pictures):
            raise VitaserveError(f"vision_encoder returned {len(encodings)} encodings for "
                                 f"{len(pictures)} images")

    def check_audio(self, encoding: Encoding) -> None:
        """Raise VitaserveError if the audio encoder's answer does not fit this family."""

    # ---- the model's side --------------------------------------------------------------------------

    @abstractmethod
    def engine(self, component: str, options: EngineOptions, *,
               after_step: Callable[[], None] | None = None) -> Any:
        """Build `component`'s engine (imports torch and loads weights). `after_step`: llm_decoder only,
        called on the engine thread after every batched step."""


def other_family(component: str, expected: str) -> VitaserveError:
    """The error for an encoder answer of the wrong kind: the Triton models were loaded for another family
    than the caller's (VITASERVE_MODEL_FAMILY differs between them)."""
    return VitaserveError(f"{component} answered without {expected}: the Triton models serve another model "
                          "family than this service (set the same VITASERVE_MODEL_FAMILY on both)")


def clean_history_text(text: str) -> str:
    """`text` without what `RESERVED` matches: a model's or recogniser's output that later prompts repeat."""
    return RESERVED.sub("", text)


class EncoderEngine:
    """An encoder engine (`preprocess` per item, `forward` per batch) answering in `Encoding`s:
    `to_encoding` wraps each of the engine's results (LLM rows or text)."""

    def __init__(self, engine: Any, to_encoding: Callable[[Any], Encoding]) -> None:
        self.engine = engine
        self.preprocess = engine.preprocess
        self._to_encoding = to_encoding

    def forward(self, items: Sequence[Any]) -> list[Encoding]:
        return [self._to_encoding(result) for result in self.engine.forward(items)]

    def encode(self, inputs: Sequence[Any]) -> list[Encoding]:
        return self.forward([self.preprocess(x) for x in inputs])


def rows_encoding(rows: np.ndarray) -> Encoding:
    return Encoding(embeddings=rows)


def text_encoding(text: str) -> Encoding:
    return Encoding(text=text)
