"""A batch item through the small model family (`answer_item` over the real models, in this process): the
item's spoken question is transcribed and kept in the result, its picture described, the answer names
what the picture shows, and the reply is spoken by the family's TTS. The worker passes its model family to
every item (`VITASERVE_MODEL_FAMILY`, like the Triton models and the orchestrator)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import soundfile

from vitaserve.components.base import ImageInput
from vitaserve.components.inprocess import InProcessComponents
from vitaserve_batch.jobs import _pipeline_config
from vitaserve_batch.manifest import Item
from vitaserve_batch.media import ItemMedia
from vitaserve_batch.pipeline import PipelineConfig, answer_item
from vitaserve_batch.settings import BatchSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).parents[2] / "examples" / "media"


def test_a_small_family_item_is_heard_seen_answered_and_spoken() -> None:
    components = InProcessComponents(family="small")
    pcm, rate = soundfile.read(EXAMPLES / "small_question.wav", dtype="float32")
    assert rate == 16000
    media = ItemMedia(images=(ImageInput((EXAMPLES / "scene.png").read_bytes()),), audio=pcm)
    config = PipelineConfig(family="small", want_audio=True, max_tokens=48)
    try:
        answer = asyncio.run(answer_item(components, media, "", config, request_id="job/item"))
    finally:
        asyncio.run(components.close())
    assert answer.transcript.lower().startswith("what animal is in this picture")
    assert "cat" in answer.text.lower() or "pizza" in answer.text.lower(), answer.text
    assert answer.state_mark == "" and answer.tokens > 0
    assert answer.sample_rate == 24000 and answer.pcm.size > answer.sample_rate // 2


def test_the_worker_passes_its_model_family_to_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITASERVE_MODEL_FAMILY", "small")
    settings = BatchSettings(redis_url="redis://127.0.0.1:1/0", backend="inprocess")  # no checkpoint needed
    assert settings.model_family == "small"
    item = Item.model_validate({"id": "a", "prompt": "hi"})
    assert _pipeline_config(settings, {"spec": {}}, item).family == "small"
    monkeypatch.setenv("VITASERVE_MODEL_FAMILY", "vita2")
    with pytest.raises(ValueError, match="unknown model family 'vita2'"):
        BatchSettings(redis_url="redis://127.0.0.1:1/0")
