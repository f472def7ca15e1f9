"""The small family's prompts: SmolLM2's ChatML chat template over text the encoders produced.

The LLM never sees pixels or audio: the vision encoder describes each picture in one line and the audio
encoder transcribes the spoken question, so a user message reads

    Image: a photo of a tabby cat; the text "PIZZA" is written in it.
    Question: What animal is in this picture, and what word is written on it?

(`Camera:` for camera frames; typed text and the transcript both go under `Question:`). The rendering is
SmolLM2-135M-Instruct's own chat template (`<|im_start|>role\\ncontent<|im_end|>\\n`, then the open
assistant header), which a test compares with the tokenizer's `apply_chat_template`. Pure logic: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitaserve.families.base import TurnContent, clean_history_text
from vitaserve.models.prompt import IM_START, Message, Turn, check_text, render_chatml

SYSTEM_PROMPT = (
    "You are a helpful voice assistant. You cannot see; instead you are given a description of the "
    "user's image and the words the user said. Answer the question in one or two short sentences, "
    "using the description."
)
# Live and offline turns share the prompt: the small LLM has one way of answering.
SYSTEM_PROMPTS = {"realtime": SYSTEM_PROMPT, "offline": SYSTEM_PROMPT}


def user_message(content: TurnContent) -> str:
    """The user message for a turn (see the module docstring); the raw parts are checked by the caller."""
    lines = [f"Image: {e.text}" for e in content.image_encodings if e.text]
    lines += [f"Camera: {e.text}" for e in content.frame_encodings if e.text]
    question = " ".join(part.strip() for part in (content.text, content.transcript) if part.strip())
    if question:
        lines.append(f"Question: {question}")
    return "\n".join(clean_history_text(line) for line in lines)


def render(history: Sequence[Turn], user: str | None, *, system: str, max_chars: int) -> str:
    """The whole prompt: system, earlier turns, the new `user` message (None: stop after the next user
    header, for the KV warm-up). Raises InvalidInput for reserved tokens or over-long texts."""
    check_text(system, what="system prompt", max_chars=max_chars)
    messages = [Message("system", system)]
    for i, turn in enumerate(history):
        check_text(turn.user, what=f"history[{i}] user text", max_chars=max_chars)
        check_text(turn.assistant, what=f"history[{i}] reply", max_chars=max_chars)
        messages += [Message("user", turn.user), Message("assistant", turn.assistant)]
    if user is None:
        body = render_chatml(messages).removesuffix(f"{IM_START}assistant\n")
        return f"{body}{IM_START}user\n"
    check_text(user, what="user text", max_chars=max_chars)
    return render_chatml([*messages, Message("user", user)])
