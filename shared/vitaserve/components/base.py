"""The seam between the orchestrator (and batch worker) and the models: one async interface.

Two implementations: `TritonComponents` (production and integration tests: each component is a Triton
model, possibly on its own pods) and `InProcessComponents` (the same engines in this process).

Streaming calls return async iterators. Cancellation is closing the iterator (`aclose()`) or cancelling the
task that iterates it: the implementation must then stop the work at the next token or chunk boundary
(Triton: cancel the gRPC stream so the model's `is_cancelled()` turns true). Errors are `VitaserveError`s:
`InvalidInput` for bad media or parameters, `Unavailable` when a component cannot be reached,
`ResourceExhausted` when it is overloaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from vitaserve.errors import InvalidInput

COMPONENTS = ("vision_encoder", "audio_encoder", "llm_decoder", "speech_synth")


@dataclass(frozen=True)
class ImageInput:
    """Encoded image bytes (PNG/JPEG/...). `max_tiles` = 1 for the real-time path (the whole image as one
    448² tile) and up to 12 for detailed images (tiles + thumbnail)."""

    data: bytes
    max_tiles: int = 1


@dataclass(frozen=True)
class Encoding:
    """What an encoder made of one input, as the model family defines it (`vitaserve.families`):
    `embeddings`, (rows, H) float32 LLM rows for families that splice media into the prompt (VITA-1.5: 256
    rows per image tile, 12.5 per second of audio), and/or `text`, for families whose LLM reads text (a
    transcript of the spoken question, a description of the image). Empty fields are what the family does
    not produce."""

    embeddings: np.ndarray | None = None
    text: str = ""

    @property
    def rows(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])


MAX_SPEECH_TEXT_CHARS = 4000  # one speech_synth segment (a sentence, or a few)


def check_speech_request(text: object, seed: object) -> None:
    """Raise InvalidInput unless `text` is a string of at most MAX_SPEECH_TEXT_CHARS characters and `seed`
    is None or a 64-bit integer: what every family's speech synthesis accepts."""
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, got {type(text).__name__}")
    if len(text) > MAX_SPEECH_TEXT_CHARS:
        raise InvalidInput(f"text is too long for one segment: {len(text)} characters, "
                           f"at most {MAX_SPEECH_TEXT_CHARS}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not -(2**63) <= int(seed) <= 2**63 - 1):
        raise InvalidInput(f"seed must be None or a 64-bit integer, got {seed!r}")


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class TokenDelta:
    """One generated token and the text it completes (empty while a multi-byte character is incomplete).
    The last item of a stream has `finish_reason` set ("stop", "length") and may carry no token."""

    token_id: int | None
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class SpeechChunk:
    """Reply audio: float32 mono PCM in [-1, 1]."""

    pcm: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class Health:
    ready: dict[str, bool] = field(default_factory=dict)

    @property
    def all_ready(self) -> bool:
        return bool(self.ready) and all(self.ready.values())


class ComponentClient(ABC):
    """The four components behind one async interface."""

    @abstractmethod
    async def encode_images(self, images: Sequence[ImageInput], *, request_id: str = "") -> list[Encoding]:
        """One `Encoding` per image (VITA-1.5: (n_tiles·256, H) rows, each 256-row block fills one `<image>`
        placeholder; the small family: a one-line description)."""

    @abstractmethod
    async def encode_audio(self, pcm: np.ndarray, *, request_id: str = "") -> Encoding:
        """16 kHz mono float32 PCM -> its `Encoding` (VITA-1.5: (n_tokens, H) rows for one `<audio>`
        placeholder; the small family: the transcript)."""

    @abstractmethod
    def generate(
        self,
        prompt: str,
        media: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        request_id: str = "",
        session_id: str = "",
    ) -> AsyncIterator[TokenDelta]:
        """Stream the reply to `prompt` (rendered by the model family: `ModelFamily.llm_request`). For
        VITA-1.5 its `<image>`/`<audio>` placeholders are filled, in order, by the `media` arrays (256 rows
        per image placeholder) and the raw text includes the state mark; a text-only family takes no
        media."""

    async def warm_prefix(self, prompt: str, *, session_id: str, request_id: str = "") -> int:
        """Prefill a text-only `prompt` (the start of the session's next prompt) into the LLM's KV cache
        under `session_id`, so the session's next turn prefills only what follows it (prefix reuse needs
        identical rows: the history the next prompt repeats is text, not the media the model saw). One
        greedy token is generated and dropped; returns the tokens received (1 unless it stopped at once)."""
        received = 0
        stream = self.generate(prompt, [], GenerationParams(max_tokens=1), request_id=request_id,
                               session_id=session_id)
        try:
            async for delta in stream:
                received += delta.token_id is not None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return received

    @abstractmethod
    def synthesize(
        self, text: str, *, first_sentence: bool = False, seed: int | None = None, request_id: str = ""
    ) -> AsyncIterator[SpeechChunk]:
        """Stream 24 kHz speech for one text segment. `first_sentence` selects the reference's faster first
        chunk (20 codes) and silence trim."""

    @abstractmethod
    async def health(self) -> Health:
        """Readiness of each component (never raises; an unreachable component is not ready)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""
