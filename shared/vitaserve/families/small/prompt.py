"""The small family's prompts: SmolLM2's ChatML chat template over text the encoders produced.

The LLM never sees pixels or audio: the vision encoder describes each picture in one line and the audio
encoder transcribes the spoken question, so a user message reads

    Image: a picture of a cat (an Egyptian Mau or a tabby cat). The word "PIZZA" is written in the picture.
    Question: What animal is in this picture, and what word is written on it?

(`Camera:` for camera frames; typed text and the transcript both go under `Question:`). The rendering is
SmolLM2-135M-Instruct's own chat template (`<|im_start|>role\\ncontent<|im_end|>\\n`, then the open
assistant header), which a test compares with the tokenizer's `apply_chat_template`. Pure logic: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitaserve.errors import InvalidInput
from vitaserve.families.base import TurnContent, clean_history_text
from vitaserve.models.prompt import IM_START, Message, Turn, check_text, render_chatml

# Kept short and concrete: a 135M model follows a few plain instructions better than many. Tuned on the
# user message above (tests/families/test_small_llm.py checks the demo's answer names the cat and the word).
SYSTEM_PROMPT = (
    "You are a voice assistant. Each user message has an image description and a question. Answer the "
    "question in one or two short sentences. Use the facts in the image description, including any "
    "written text."
)
# Live and offline turns share the prompt: the small LLM has one way of answering.
SYSTEM_PROMPTS = {"realtime": SYSTEM_PROMPT, "offline": SYSTEM_PROMPT}
# SmolLM2's special tokens beyond ChatML's (`check_text` refuses those and every `<|...|>`): text holding
# one would be tokenized as that control token.
SPECIAL_TOKENS = ("<repo_name>", "<reponame>", "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>",
                  "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                  "<jupyter_output>", "<jupyter_script>", "<empty_output>")


def _check(text: str, *, what: str, max_chars: int) -> None:
    check_text(text, what=what, max_chars=max_chars)
    for token in SPECIAL_TOKENS:
        if token in text:
            raise InvalidInput(f"{what} contains the reserved token {token!r}")


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
    header, for the KV warm-up). Raises InvalidInput for ChatML or SmolLM2 control tokens (`SPECIAL_TOKENS`)
    in any text, or texts over `max_chars`."""
    _check(system, what="system prompt", max_chars=max_chars)
    messages = [Message("system", system)]
    for i, turn in enumerate(history):
        _check(turn.user, what=f"history[{i}] user text", max_chars=max_chars)
        _check(turn.assistant, what=f"history[{i}] reply", max_chars=max_chars)
        messages += [Message("user", turn.user), Message("assistant", turn.assistant)]
    if user is None:
        body = render_chatml(messages).removesuffix(f"{IM_START}assistant\n")
        return f"{body}{IM_START}user\n"
    _check(user, what="user text", max_chars=max_chars)
    return render_chatml([*messages, Message("user", user)])
