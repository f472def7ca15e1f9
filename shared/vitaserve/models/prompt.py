"""Prompts of VITA-1.5: the ChatML template, media placeholders, state marks and text segmentation for TTS.

Implements `tests/golden/vita15_architecture.md` §5.1 and the prompt format data in
`assets/prompt_format.json` (a copy of `tests/golden/vita15_prompt_format.json`). Pure logic: no torch.

- `build_prompt` renders a conversation as the model was trained on it (ChatML, Qwen2.5):
  system block, earlier turns, the new user turn, then the open assistant header.
- `tokenize_with_placeholders` turns a prompt into ids, with `<image>` → −200 and `<audio>` → −500.
- `strip_state_marks` removes the leading ☞/☜/☟ state mark (and the junk tokens) from a reply.
- `TextSegmenter` cuts a streamed reply into sentences for speech synthesis.

User message layout (spec §5.1 and the reference HF demo): `<image>` × n_images, then one "\n", then the
text, then `<audio>` if the query is spoken. The placeholders are not separated by newlines: the
reference writes `"<image>" * n_tiles + "\n" + question`, so one image (all its tiles, or all frames of
a video) forms one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, Protocol

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID

IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"
VIDEO_PLACEHOLDER = "<video>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
UNK = "<unk>"

MARK_AUDIO_QUERY = "☞"
MARK_TEXT_QUERY = "☜"
MARK_NOISE = "☟"
STATE_MARKS = (MARK_AUDIO_QUERY, MARK_TEXT_QUERY, MARK_NOISE)

DEFAULT_MAX_USER_CHARS = 8000

Media = Literal["image", "video"]
Role = Literal["system", "user", "assistant"]

# Text that would be tokenized as a placeholder or a special token if a user could send it: the media
# placeholders and every `<|...|>` control token of the Qwen2 vocabulary.
_FORBIDDEN = re.compile(r"<image>|<audio>|<video>|<\|[A-Za-z0-9_]+\|>")
_PLACEHOLDER_SPLIT = re.compile(f"({IMAGE_PLACEHOLDER}|{AUDIO_PLACEHOLDER})")


@cache
def prompt_format() -> dict[str, Any]:
    """The prompt format data (template, system prompts, segmentation rule) shipped with the package."""
    text = resources.files("vitaserve.models").joinpath("assets/prompt_format.json").read_text("utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class Message:
    """One ChatML message."""

    role: Role
    content: str


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of a conversation. `turn_id`: the id its session gave the turn (the
    orchestrator's history; empty elsewhere), never part of a prompt."""

    user: str
    assistant: str
    turn_id: str = ""


def system_prompt(media: Media | None, *, realtime: bool = False) -> str:
    """The system prompt the reference uses for a conversation with `media`.

    Default (conversation.py): image → `image`, video → `video`, otherwise `lang`.
    `realtime=True` (web_demo/server.py, names the model "Vita"): `video` for any visual input, else `audio`.
    """
    fmt = prompt_format()
    if media not in (None, "image", "video"):
        raise InvalidInput(f"media must be 'image', 'video' or None, got {media!r}")
    if not realtime:
        return fmt["system_prompts"][media or "lang"]
    block = fmt["realtime_server_system_prompts"]["video" if media else "audio"]
    # The realtime copies are stored as whole ChatML blocks; return only the content.
    return block.removeprefix(f"{IM_START}system\n").removesuffix(f"{IM_END}\n")


def render_chatml(messages: Sequence[Message]) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then the open assistant header."""
    body = "".join(f"{IM_START}{m.role}\n{m.content}{IM_END}\n" for m in messages)
    return f"{body}{IM_START}assistant\n"


def check_text(text: str, *, what: str, max_chars: int = DEFAULT_MAX_USER_CHARS) -> None:
    """Raise `InvalidInput` if `text` is not a string, longer than `max_chars`, or contains a media
    placeholder or a ChatML/control token (it would be tokenized as that special token)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InvalidInput(f"{what} is too long: {len(text)} characters, at most {max_chars} allowed")
    found = _FORBIDDEN.search(text)
    if found:
        raise InvalidInput(f"{what} contains the reserved token {found.group()!r}")


def user_content(text: str, *, n_images: int = 0, has_audio: bool = False) -> str:
    """The user message body: `<image>` × n_images + "\\n" (if any), the text, `<audio>` if spoken."""
    images = IMAGE_PLACEHOLDER * n_images + "\n" if n_images else ""
    return images + text + (AUDIO_PLACEHOLDER if has_audio else "")


def _normalize_history_reply(reply: str) -> str:
    # server.py removes the space after the ☞/☟ marks of earlier replies when building the prompt.
    return reply.replace(f"{MARK_AUDIO_QUERY} ", MARK_AUDIO_QUERY).replace(f"{MARK_NOISE} ", MARK_NOISE)


def build_prompt(
    history: Iterable[tuple[str, str] | Turn],
    user_text: str,
    *,
    n_images: int = 0,
    has_audio: bool = False,
    media: Media | None = None,
    system: str | None = None,
    max_chars: int = DEFAULT_MAX_USER_CHARS,
) -> str:
    """Render a conversation as the ChatML prompt of VITA-1.5.

    history: earlier (user, assistant) texts, oldest first, without placeholders (earlier media stay in
      the KV cache or are dropped, as server.py does). Replies should be passed as generated, state
      mark included.
    n_images: number of `<image>` placeholders of the new turn, one per tile (image) or frame (video).
    media: 'image' or 'video' when the conversation has visual input; selects the system prompt and is
      required when n_images > 0.
    system: overrides the system prompt chosen from `media`.
    Raises `InvalidInput` for a too long or empty query, reserved tokens in any text, or inconsistent
    media arguments.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise InvalidInput(f"n_images must be a non-negative integer, got {n_images!r}")
    if n_images > 0 and media is None:
        raise InvalidInput("n_images > 0 needs media='image' or media='video' to choose the system prompt")
    check_text(user_text, what="user text", max_chars=max_chars)
    if not user_text.strip() and not has_audio and n_images == 0:
        raise InvalidInput("the query is empty: give text, audio or images")
    if system is None:
        system = system_prompt(media)
    else:
        check_text(system, what="system prompt", max_chars=max_chars)

    messages = [Message("system", system)]
    for i, turn in enumerate(history):
        user, reply = (turn.user, turn.assistant) if isinstance(turn, Turn) else turn
        check_text(user, what=f"history[{i}] user text", max_chars=max_chars)
        check_text(reply, what=f"history[{i}] reply", max_chars=max_chars)
        messages += [Message("user", user), Message("assistant", _normalize_history_reply(reply))]
    messages.append(Message("user", user_content(user_text, n_images=n_images, has_audio=has_audio)))
    return render_chatml(messages)


class TextTokenizer(Protocol):
    """The part of a `transformers` tokenizer used here."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def tokenize_with_placeholders(tokenizer: TextTokenizer, prompt: str) -> list[int]:
    """Tokenize `prompt` chunk by chunk between `<image>`/`<audio>` (spec §5.1).

    Each text chunk is tokenized separately, with no added BOS/EOS (the ChatML markers in the text map
    to their special ids); `<image>` becomes −200 and `<audio>` −500. Chunk-wise tokenization can differ
    from tokenizing the whole string at chunk boundaries; this is what the reference does.
    """
    ids: list[int] = []
    for chunk in _PLACEHOLDER_SPLIT.split(prompt):
        if chunk == IMAGE_PLACEHOLDER:
            ids.append(IMAGE_TOKEN_ID)
        elif chunk == AUDIO_PLACEHOLDER:
            ids.append(AUDIO_TOKEN_ID)
        elif chunk:
            ids.extend(int(i) for i in tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def strip_state_marks(text: str) -> tuple[str, str | None]:
    """Remove the leading state mark (☞ audio query, ☜ text query, ☟ noise) and the space after it,
    plus any other state mark, `<unk>` and `<|im_end|>`. Returns (clean text, leading mark or None)."""
    body = text.lstrip()
    mark = body[0] if body and body[0] in STATE_MARKS else None
    if mark is not None:
        body = body[1:]
        body = body[1:] if body.startswith(" ") else body
    else:
        body = text
    for junk in (*STATE_MARKS, UNK, IM_END):
        body = body.replace(junk, "")
    return body, mark


@dataclass(frozen=True)
class Segment:
    """A piece of a reply to synthesise.

    text: the text for TTS (the first-sentence comma rule applied; same length as the span).
    start, end: the span [start, end) in the concatenation of all text pushed into the segmenter.
    first: whether this is the first segment of the reply (the TTS uses shorter codec chunks for it).
    """

    text: str
    start: int
    end: int
    first: bool


class TextSegmenter:
    """Cut a streamed reply into segments for speech synthesis (`tts_segmentation` of the prompt format).

    Rule (web_demo/server.py, as stated in the prompt format):
    - characters are buffered one at a time; after a character in `cut_after_chars`, the buffer is cut
      (the cut character ends the segment) if it holds at least `min_chars` (5) characters;
    - the first segment has no minimum length: the reference prefixes the reply with a 23-character
      first-sentence marker that counts towards the 5, so its first segment ends at the first cut
      character (`first_min_chars` = 1);
    - in the first segment '，' and ',' are replaced by '。' (one character for one, so spans hold), unless
      `first_commas_to_stops` is False (a TTS that reads English prosody from the commas);
    - `first_max_words` (default: none): the first segment is also cut at the space that follows its
      `first_max_words`-th word, if no cut character came sooner, so the first audio does not wait for
      a long first clause (the space ends the segment);
    - a buffer holding only whitespace is never cut (the reference skips blank segments), so blank
      text is carried into the next segment's span;
    - `flush()` returns the remaining text at the end of the reply. The reference drops a tail without
      a cut character; speaking it is the intended behaviour.
    """

    def __init__(
        self,
        *,
        cut_chars: Iterable[str] | None = None,
        min_chars: int | None = None,
        first_min_chars: int = 1,
        first_commas_to_stops: bool = True,
        first_max_words: int | None = None,
    ) -> None:
        rule = prompt_format()["tts_segmentation"]
        self.cut_chars = frozenset(rule["cut_after_chars"] if cut_chars is None else cut_chars)
        self.min_chars = int(rule["min_chars"] if min_chars is None else min_chars)
        self.first_min_chars = int(first_min_chars)
        self.first_commas_to_stops = first_commas_to_stops
        self.first_max_words = first_max_words
        if min(self.min_chars, self.first_min_chars, 1 if first_max_words is None else first_max_words) < 1:
            raise InvalidInput("min_chars, first_min_chars and first_max_words must be >= 1")
        self._words = 0  # words completed in the buffer (counted for the first segment only)
        self._buffer: list[str] = []
        self._has_text = False  # the buffer holds a non-whitespace character
        self._start = 0
        self._emitted = 0

    def push(self, delta: str) -> list[Segment]:
        """Add streamed text; return the segments completed by it (possibly none)."""
        out: list[Segment] = []
        for ch in delta:
            self._buffer.append(ch)
            self._has_text = self._has_text or not ch.isspace()
            first = self._emitted == 0
            minimum = self.first_min_chars if first else self.min_chars
            if ch in self.cut_chars and self._has_text and len(self._buffer) >= minimum:
                out.append(self._cut())
            elif first and self.first_max_words is not None and ch.isspace() and len(self._buffer) > 1 \
                    and not self._buffer[-2].isspace():
                self._words += 1  # a space right after a word ends that word
                if self._words >= self.first_max_words:
                    out.append(self._cut())
        return out

    def flush(self) -> Segment | None:
        """End of the reply: the buffered tail as a last segment, or None if it is empty or blank."""
        if self._has_text:
            return self._cut()
        self._start += len(self._buffer)
        self._buffer.clear()
        return None

    def _cut(self) -> Segment:
        raw = "".join(self._buffer)
        first = self._emitted == 0
        text = raw.replace("，", "。").replace(",", "。") if first and self.first_commas_to_stops else raw
        seg = Segment(text=text, start=self._start, end=self._start + len(raw), first=first)
        self._start = seg.end
        self._buffer.clear()
        self._has_text = False
        self._emitted += 1
        return seg
