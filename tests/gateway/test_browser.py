"""The browser page at `/`, driven by headless Chromium (Playwright) against the whole small-family stack.

Chromium's fake media devices stand in for the user: `--use-file-for-fake-audio-capture` loops a WAV as the
microphone (the question, then silence, so the server's VAD ends the utterance) and
`--use-file-for-fake-video-capture` loops a Y4M of the example scene as the camera. The page's microphone
path (AudioWorklet, 24 kHz PCM16, input_audio_buffer.append), Web Audio playback, barge-in and transcript
are the real ones; the tests wait on the page's own state (`window.vitaserveState`), never on sleeps.

Because the microphone file loops, the tests use the page's Mute button as the user's "stop talking":
muted, the page streams silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from realtime_events import SCENE_PNG, wav_pcm16_24k  # the folder's helpers, on sys.path (conftest.py)

from vitaserve.stack import GatewayProcess, OrchestratorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "out"  # gitignored: screenshots kept for people to look at
WAIT_MS = 120_000  # a turn on a slow CPU runner; the waits end as soon as the state is there

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install the Debian package `chromium` (make sysdeps)",
                allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


# ---- media for the fake devices ---------------------------------------------------------------

def write_wav(path: Path, pcm16_24k: bytes) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm16_24k)
    return path


def write_y4m(path: Path, image: Path, *, frames: int = 2) -> Path:
    """A still image as a YUV4MPEG2 (4:2:0) file, the format Chromium's fake camera reads."""
    rgb = Image.open(image).convert("RGB")
    rgb = rgb.crop((0, 0, rgb.width // 2 * 2, rgb.height // 2 * 2))  # 4:2:0 needs even sides
    ycc = np.asarray(rgb.convert("YCbCr"), dtype=np.float32)
    h, w = ycc.shape[:2]

    def half(plane: np.ndarray) -> bytes:
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8).tobytes()

    frame = b"FRAME\n" + ycc[..., 0].round().astype(np.uint8).tobytes() + half(ycc[..., 1]) + half(ycc[..., 2])
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        f.write(frame * frames)
    return path


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * 24000) * 2)


# ---- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        yield p


@contextlib.contextmanager
def open_page(playwright: Any, url: str, *, mic_wav: Path, camera_y4m: Path) -> Iterator[tuple[Any, list[str]]]:
    """A fresh Chromium on the page (one per test: the fake devices are per browser); yields the page and the
    uncaught script errors it reports. The default autoplay policy applies: audio starts from a click."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--use-fake-ui-for-media-stream",  # grant the microphone and camera without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
        f"--use-file-for-fake-video-capture={camera_y4m}",
    ])
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        yield page, errors
    finally:
        browser.close()


def wait_state(page: Any, condition: str, *, what: str) -> dict[str, Any]:
    """Wait until `condition` (JS over `s`, the page's vitaserveState) holds; returns the state."""
    try:
        page.wait_for_function(f"() => {{ const s = window.vitaserveState; return s && ({condition}); }}",
                               timeout=WAIT_MS, polling=100)
    except sync_api.TimeoutError:
        state = page.evaluate("window.vitaserveState")
        pytest.fail(f"timed out waiting for {what}: {condition}\nstate: {summary(state)}")
    return page.evaluate("window.vitaserveState")


def summary(state: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "audioChunksSent", "speechStarted", "speechStopped", "audioDeltas", "audioChunksPlayed",
            "responses", "transcript", "truncatesSent", "truncated", "errors")
    return {k: state.get(k) for k in keys}


# A reply is over once the response is done and every chunk it received has been played.
PLAYED_OUT = "s.audioChunksPlayed > 0 && s.audioMsPlayed >= s.audioMsReceived - 1"


def start_camera(page: Any) -> None:
    page.get_by_role("button", name="Start camera").click()
    page.wait_for_function("document.getElementById('preview').videoWidth > 0", timeout=30_000)


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 20_000, "the screenshot is (nearly) blank"
    with Image.open(path) as image:
        assert image.width >= 1000 and image.height >= 600
        grey = np.asarray(image.convert("L").resize((64, 64)))
        assert len(np.unique(grey)) > 16, "the screenshot has no content"
    OUT_DIR.mkdir(exist_ok=True)
    kept = OUT_DIR / f"gateway-{name}"
    shutil.copyfile(path, kept)
    print(f"screenshot: {path} (copy: {kept})")
    return path


def entries(state: dict[str, Any], role: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in state["transcript"] if e["role"] == role and (kind is None or e["kind"] == kind)]


# ---- tests ------------------------------------------------------------------------------------

def test_spoken_question_with_snapshot_gets_a_spoken_answer(gateway_stack, playwright, tmp_path):
    # 1 s of silence, the question, 4 s of silence: the VAD ends the utterance well before the file loops.
    mic = write_wav(tmp_path / "question.wav", silence(1.0) + wav_pcm16_24k(pad_s=4.0))
    camera = write_y4m(tmp_path / "scene.y4m", SCENE_PNG)
    with open_page(playwright, gateway_stack.gateway_url, mic_wav=mic, camera_y4m=camera) as (page, errors):
        start_camera(page)
        page.get_by_label("Attach a snapshot when I start speaking").check()
        page.get_by_role("button", name="Connect", exact=True).click()

        wait_state(page, "s.speechStopped >= 1", what="the end of the spoken question")
        # The file loops: mute before it asks again, so this reply plays to its end.
        page.get_by_role("button", name="Mute microphone").click()
        state = wait_state(
            page, f"s.responsesDone >= 1 && {PLAYED_OUT} && s.transcript.some("
                  "e => e.role === 'user' && e.kind === 'audio' && e.status === 'done' && e.text)",
            what="the spoken reply and the question's transcript")

        question = entries(state, "user", "audio")[0]["text"]
        assert "animal" in question.lower() and "picture" in question.lower(), question
        assert len(entries(state, "user", "image")) == 1 and state["snapshotsSent"] == 1
        response = state["responses"][0]
        assert response["status"] == "completed", response
        answer = entries(state, "assistant")[0]
        assert answer["status"] == "completed" and answer["text"].strip(), answer
        # The snapshot reached the model: the example scene is a cat with a sign.
        assert any(word in answer["text"].lower() for word in ("cat", "pizza")), answer["text"]
        assert state["audioDeltas"] > 0 and state["audioChunksPlayed"] > 0
        assert state["audioChunksSent"] > 50  # 40 ms chunks through the worklet, for several seconds
        assert 0 < state["lastLatencyMs"] < WAIT_MS and response["latencyMs"] == state["lastLatencyMs"]
        assert state["errors"] == [] and errors == []
        print(f"question: {question!r}; answer: {answer['text']!r}; "
              f"speech end -> first audio played: {state['lastLatencyMs']} ms")
        # What a user sees: the transcript, the latency readout, the status.
        assert page.get_by_role("log").get_by_text(answer["text"]).is_visible()
        assert page.get_by_role("status").inner_text().strip() == "Listening"
        screenshot(page, tmp_path, "page.png")


def test_typed_question_then_barge_in(gateway_stack, playwright, tmp_path):
    # The question looped with short pauses: unmuting the page is the user starting to talk.
    mic = write_wav(tmp_path / "talk.wav", wav_pcm16_24k(pad_s=0.6))
    camera = write_y4m(tmp_path / "scene.y4m", SCENE_PNG)
    with open_page(playwright, gateway_stack.gateway_url, mic_wav=mic, camera_y4m=camera) as (page, errors):
        ask = page.get_by_label("Type a question")
        start_camera(page)
        page.get_by_role("button", name="Mute microphone").click()  # quiet until the barge-in
        page.get_by_role("button", name="Connect", exact=True).click()
        wait_state(page, "s.events['session.updated'] >= 1 && s.audioChunksSent > 0", what="the session")

        # A typed question about a snapshot, answered in speech.
        page.get_by_role("button", name="Send snapshot").click()
        ask.fill("What animal is in this picture?")
        ask.press("Enter")
        state = wait_state(page, f"s.responsesDone >= 1 && {PLAYED_OUT}", what="the reply to the typed question")
        first = state["responses"][0]
        assert first["status"] == "completed", first
        assert entries(state, "user", "text")[0]["text"] == "What animal is in this picture?"
        answer = entries(state, "assistant")[0]
        assert answer["text"].strip() and answer["status"] == "completed", answer
        assert 0 < first["latencyMs"] < WAIT_MS  # response.create -> first audio played
        assert state["speechStarted"] == 0 and state["truncatesSent"] == []

        # Barge-in: a second reply starts playing, the user talks over it.
        ask.fill("Describe the picture in detail.")
        ask.press("Enter")
        played = state["audioChunksPlayed"]
        wait_state(page, f"s.responses.length >= 2 && s.audioChunksPlayed >= {played + 2}",
                   what="the second reply playing")
        page.get_by_role("button", name="Unmute microphone").click()
        state = wait_state(page, "s.truncatesSent.length >= 1 && s.truncated.length >= 1 && "
                                 "s.responses[1].status !== 'in_progress'", what="the barge-in")

        second = state["responses"][1]
        assert second["status"] == "cancelled" and second["reason"] == "turn_detected", second
        (sent,) = state["truncatesSent"]
        assert sent["item_id"] == second["itemId"]
        assert 0 < sent["audio_end_ms"] <= sent["received_ms"], sent
        assert state["truncated"][0] == {"item_id": sent["item_id"], "audio_end_ms": sent["audio_end_ms"]}
        cut = next(e for e in state["transcript"] if e["itemId"] == second["itemId"])
        assert cut["status"] == "cancelled" and cut["truncatedMs"] == sent["audio_end_ms"], cut
        assert state["errors"] == [] and errors == []
        print(f"typed turn: first audio after {first['latencyMs']} ms; barge-in cut the second reply at "
              f"{sent['audio_end_ms']} ms of {sent['received_ms']} ms received")
        screenshot(page, tmp_path, "page-barge-in.png")


def test_refused_question_shows_the_error(gateway_stack, playwright, tmp_path):
    mic = write_wav(tmp_path / "quiet.wav", silence(1.0))
    camera = write_y4m(tmp_path / "scene.y4m", SCENE_PNG)
    with open_page(playwright, gateway_stack.gateway_url, mic_wav=mic, camera_y4m=camera) as (page, errors):
        page.get_by_role("button", name="Connect", exact=True).click()
        wait_state(page, "s.events['session.updated'] >= 1", what="the session")
        ask = page.get_by_label("Type a question")
        ask.fill("What is <image> here?")  # a reserved token: the orchestrator refuses the text
        ask.press("Enter")
        state = wait_state(page, "s.errors.length >= 1 && s.transcript.some(e => e.status === 'removed')",
                           what="the refusal")
        assert "reserved token" in state["errors"][0]["message"], state["errors"]
        assert page.get_by_role("alert").get_by_text("reserved token").is_visible()
        assert state["responses"] == [] and errors == []
        page.get_by_role("button", name=f"Dismiss: {state['errors'][0]['message']}").click()
        assert page.get_by_role("alert").get_by_text("reserved token").count() == 0


def test_api_key_travels_as_a_subprotocol(gateway_stack, playwright, tmp_path):
    """With keys on, the page sends the key field as the subprotocol `openai-insecure-api-key.KEY`; a
    refused upgrade (HTTP 401, which a browser only sees as a failed socket) is explained on the page."""
    key = "vs-browser-test-key"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": {}},
                                "keys": [{"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": "acme"}]}))
    orchestrator = OrchestratorProcess({
        "VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": gateway_stack.triton_url,
        "VITASERVE_MODEL_FAMILY": "small", "VITASERVE_API_KEYS_FILE": str(keys),
    }, log_path=tmp_path / "orchestrator.log").start()
    try:
        gateway = GatewayProcess(orchestrator.address, log_path=tmp_path / "gateway.log").start()
        try:
            mic = write_wav(tmp_path / "quiet.wav", silence(1.0))
            camera = write_y4m(tmp_path / "scene.y4m", SCENE_PNG)
            with open_page(playwright, gateway.url, mic_wav=mic, camera_y4m=camera) as (page, errors):
                page.get_by_role("button", name="Connect", exact=True).click()  # no key
                page.get_by_role("alert").get_by_text("check the API key").wait_for(timeout=30_000)
                assert page.get_by_role("button", name="Connect", exact=True).is_enabled()
                assert page.get_by_role("status").inner_text().strip() == "Disconnected"

                page.get_by_role("textbox", name="API key").fill(key)
                page.get_by_role("button", name="Connect", exact=True).click()
                state = wait_state(page, "s.events['session.updated'] >= 1 && s.audioChunksSent > 0",
                                   what="the keyed session")
                assert state["connected"] and state["sessionId"] and state["errors"] == []
                page.get_by_role("button", name="Disconnect", exact=True).click()
                wait_state(page, "!s.connected", what="the disconnect")
                assert errors == []
        finally:
            gateway.stop()
    finally:
        orchestrator.stop()
