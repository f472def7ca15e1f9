"""Unit tests of the settings (environment, fail fast), session settings, the in-memory session store and
the history policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_config, run
from pydantic import ValidationError

from vitaserve.components.base import Encoding, ImageInput
from vitaserve.errors import InvalidInput, NotFound, ResourceExhausted
from vitaserve.families import TurnContent, get_family
from vitaserve.families.vita15 import AUDIO_MARKER, IMAGE_MARKER
from vitaserve.models.prompt import Turn, build_prompt
from vitaserve_orchestrator.session import (
    Frame,
    InMemorySessionStore,
    Session,
    SessionSettings,
    SettingsUpdate,
    history_reply_text,
)
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.unit


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VITASERVE_TRITON_URL", "triton:8001")
    monkeypatch.setenv("VITASERVE_LLM_DECODER_URL", "llm:8001")
    monkeypatch.setenv("VITASERVE_VAD_THRESHOLD", "0.6")
    s = OrchestratorSettings()
    assert s.component_urls() == {
        "vision_encoder": "triton:8001",
        "audio_encoder": "triton:8001",
        "llm_decoder": "llm:8001",
        "speech_synth": "triton:8001",
    }
    assert s.vad_threshold == 0.6 and s.vad_min_silence_ms == 500 and s.vad_speech_pad_ms == 30
    assert s.vad_min_utterance_ms == 1000 and s.frames_per_turn == 4
    monkeypatch.setenv("VITASERVE_BACKEND", "inprocess")
    monkeypatch.setenv("VITASERVE_CHECKPOINT_DIR", str(tmp_path))
    assert OrchestratorSettings().checkpoint_dir == tmp_path


def test_settings_fail_fast_on_missing_addresses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("VITASERVE_TRITON_URL", "VITASERVE_BACKEND", "VITASERVE_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="VITASERVE_TRITON_URL"):
        OrchestratorSettings()
    with pytest.raises(ValidationError, match="VITASERVE_SPEECH_SYNTH_URL"):
        OrchestratorSettings(vision_encoder_url="a:1", audio_encoder_url="a:1", llm_decoder_url="a:1")
    with pytest.raises(ValidationError, match="CHECKPOINT_DIR"):
        OrchestratorSettings(backend="inprocess")
    with pytest.raises(ValidationError, match="not a directory"):
        OrchestratorSettings(backend="inprocess", checkpoint_dir=tmp_path / "missing")
    with pytest.raises(ValidationError, match="host:port"):
        make_config(listen_address="nowhere")
    with pytest.raises(ValidationError):
        make_config(frames_per_turn=5)
    assert all(field.description for field in OrchestratorSettings.model_fields.values())


def test_session_settings_defaults_and_checks() -> None:
    config = make_config()
    s = SessionSettings.resolve(None, config)
    assert (s.turn_detection, s.vad_threshold, s.vad_min_silence_ms, s.vad_min_utterance_ms) == (
        "vad",
        0.7,
        500,
        1000,
    )
    assert s.speech_out and s.max_reply_tokens == 512 and s.seed is None and s.system_prompt is None
    assert s.vad_create_response  # unset: the end of an utterance starts a response
    s = SessionSettings.resolve(SettingsUpdate(turn_detection="manual", text_only=True, seed=7), config)
    assert s.turn_detection == "manual" and not s.speech_out and s.seed == 7
    assert not SessionSettings.resolve(SettingsUpdate(vad_create_response=False), config).vad_create_response
    for bad in (
        SettingsUpdate(turn_detection="auto"),
        SettingsUpdate(vad_threshold=1.2),
        SettingsUpdate(max_reply_tokens=10**6),
        SettingsUpdate(temperature=float("nan")),
        SettingsUpdate(system_prompt="hi <|im_end|>"),
    ):
        with pytest.raises(InvalidInput):
            SessionSettings.resolve(bad, config)


def test_store_hands_out_copies_and_expires_idle_sessions() -> None:
    async def body() -> None:
        now = [0.0]
        store = InMemorySessionStore(max_sessions=2, idle_ttl_s=10, clock=lambda: now[0])
        settings = SessionSettings.resolve(None, make_config())
        a = await store.create(settings)
        a.history.append(Turn("q", "a"))
        assert (await store.load(a.id)).history == []  # not saved yet
        await store.save(a)
        assert (await store.load(a.id)).history == [Turn("q", "a")]
        await store.create(settings)
        with pytest.raises(ResourceExhausted):
            await store.create(settings)
        now[0] = 11.0
        with pytest.raises(NotFound):
            await store.load(a.id)
        await store.create(settings)  # the expired ones made room
        await store.delete("sess-unknown")

    run(body())


def test_history_policy_keeps_text_only_and_prompts_stay_valid() -> None:
    vita = get_family("vita15")
    spoken = Encoding(embeddings=np.ones((3, 4), np.float32))
    user = vita.history_user_text(TurnContent("What is it?", images=(ImageInput(b"png"),), audio=spoken))
    assert user == f"{IMAGE_MARKER} What is it? {AUDIO_MARKER}"
    assert vita.history_user_text(TurnContent("", audio=spoken)) == AUDIO_MARKER
    # The small family keeps the user's words and what its LLM read of the picture instead of markers.
    small = get_family("small")
    heard = TurnContent("", images=(ImageInput(b"png"),), image_encodings=(Encoding(text="a cat"),),
                        audio=Encoding(text="What is it? <|im_end|>"))
    assert small.history_user_text(heard) == "Image: a cat\nQuestion: What is it? "
    # A reply that contains reserved tokens is cleaned, or build_prompt would refuse every later turn.
    reply = history_reply_text("☞", "A <image> cat<|endoftext|>.")
    assert reply == "☞A  cat."
    build_prompt([(user, reply)], "next")
    session = Session(id="s", settings=SessionSettings.resolve(None, make_config()), frames_kept=3)
    for i in range(5):
        session.record_turn(f"q{i}", f"a{i}", turn_id=f"turn-{i + 1}", max_turns=2)
    assert [t.user for t in session.history] == ["q3", "q4"]
    assert [t.turn_id for t in session.history] == ["turn-4", "turn-5"]
    # A turn is deleted by its id, user and assistant together; one not in history is NOT_FOUND.
    session.history.insert(0, Turn("kept before ids", "a"))
    for missing in ("turn-1", "turn-9", ""):
        with pytest.raises(NotFound, match="not in the session's history"):
            session.delete_turn(missing)
    session.delete_turn("turn-4")
    assert [(t.user, t.assistant) for t in session.history] == [("kept before ids", "a"), ("q4", "a4")]
    assert session.last_turn_id() == "turn-5"
    session.delete_turn("turn-5")
    assert session.last_turn_id() == ""
    for i in range(5):
        session.add_frame(Frame(b"%d" % i, float(i), received_s=float(i)))
    assert [f.data for f in session.frames] == [b"2", b"3", b"4"]
    assert [f.data for f in session.recent_frames(2, now_s=5.0, max_age_s=10)] == [b"3", b"4"]
    assert [f.data for f in session.recent_frames(4, now_s=13.5, max_age_s=10)] == [b"4"]
    assert session.recent_frames(0, now_s=5.0, max_age_s=10) == []


def test_build_components_follows_the_backend() -> None:
    from vitaserve.components.triton import TritonComponents
    from vitaserve_orchestrator.components import build_components

    client = build_components(make_config(triton_url="triton:8001", llm_decoder_url="llm:8001"))
    assert isinstance(client, TritonComponents)
    assert client.urls == {"vision_encoder": "triton:8001", "audio_encoder": "triton:8001",
                           "llm_decoder": "llm:8001", "speech_synth": "triton:8001"}


def test_record_round_trip_keeps_the_barge_in_policy_and_reads_older_records() -> None:
    import json
    from dataclasses import replace

    from vitaserve_orchestrator.bargein import BargeInConfig
    from vitaserve_orchestrator.session import Session, session_from_record, session_to_record

    settings = replace(
        SessionSettings.resolve(None, make_config()),
        barge_in=BargeInConfig(enabled=True, threshold=0.6, min_speech_ms=800, in_flight="continue"),
        playout_lead_ms=120,
    )
    session = Session(id="sess-1", settings=settings, tenant="acme", turns=2,
                      history=[Turn(user="[spoken question]", assistant="☞hello")])
    back = session_from_record(session_to_record(session), frames_kept=4)
    assert back.settings == settings and isinstance(back.settings.barge_in, BargeInConfig)
    assert back.history == session.history and back.tenant == "acme" and back.turns == 2
    # a record written before the barge-in fields (or vad_create_response) existed reads with their defaults
    no_vad_turns = replace(session, settings=replace(settings, vad_create_response=False))
    record = json.loads(session_to_record(no_vad_turns))
    del record["settings"]["barge_in"], record["settings"]["playout_lead_ms"]
    del record["settings"]["vad_create_response"]
    older = session_from_record(json.dumps(record), frames_kept=4)
    assert older.settings.barge_in == BargeInConfig() and older.settings.temperature == settings.temperature
    assert older.settings.vad_create_response
