"""One Realtime WebSocket bridged to one orchestrator Converse stream.

The orchestrator owns the session (history, turn detection, barge-in, tenants, Redis); this class only
translates, and keeps what the Realtime protocol needs that the orchestrator does not name:

- conversation *items* (`item_...` ids) and the orchestrator turn each belongs to. A turn is a user message
  (one or more items: typed text, images, the spoken question) and the assistant's reply (one item);
  `conversation.item.delete` of either removes the whole turn from the orchestrator's history.
- *pending* user items: committed by the client (`input_audio_buffer.commit`, `conversation.item.create`)
  but not yet part of a turn, which starts at `response.create` (or at the end of speech with
  `server_vad`). The orchestrator holds their content; the gateway keeps a copy so that after an
  `input_audio_buffer.clear` or the deletion of one pending item (both a `ClearInput` upstream) it can
  send the others again.
- the running *response*: its assistant item, transcript, audio length (for `conversation.item.truncate`)
  and output resampler.

Client event -> orchestrator event:
  session.update -> SessionUpdate (the whole resolved settings; the reply SessionStarted -> session.updated)
  input_audio_buffer.append -> AudioChunk (24 kHz -> 16 kHz)   .commit (manual turns) -> the item is pending
  input_audio_buffer.clear -> ClearInput (+ the pending items again)
  conversation.item.create (user: input_text, input_image data URL, input_audio) -> TextInput(defer_commit),
      Image, AudioChunk   .truncate -> PlaybackPosition (history cut: HistoryTruncated)   .delete -> DeleteTurn
  response.create -> Commit     response.cancel -> Interrupt
Orchestrator event -> server events:
  SpeechStarted/SpeechStopped -> input_audio_buffer.speech_started/speech_stopped; TurnStarted ->
  input_audio_buffer.committed + conversation.item.added/done (user) + response.created + output_item.added +
  content_part.added; InputTranscript -> conversation.item.input_audio_transcription.completed; TextDelta ->
  response.output_audio_transcript.delta (response.output_text.delta for text output); AudioOut ->
  response.output_audio.delta (-> 24 kHz); ResponseDone / Interrupted -> the .done events and response.done
  (completed / cancelled); ErrorEvent -> error (and response.done failed for a failed response).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve_gateway.audio import (
    MODEL_INPUT_RATE,
    WIRE_RATE,
    AudioFormatError,
    Resampler,
    decode_pcm16_base64,
    duration_ms,
)
from vitaserve_gateway.protocol import EventWriter, ProtocolError, new_id

log = logging.getLogger(__name__)

_END = object()
UPSTREAM_CHUNK_BYTES = 32_000  # 1 s of 16 kHz PCM16 per AudioChunk (the orchestrator takes up to 10 s)
MAX_BUFFER_S = 120.0  # input audio the gateway keeps a copy of for one turn
MAX_EVENT_IDS = 1024  # client event ids remembered for the orchestrator's error reports
MAX_OUTPUT_TOKENS = 4096  # the Realtime protocol's range of max_output_tokens (or "inf")
MAX_DURATION_MS = 3_600_000  # turn_detection durations (silence, padding, idle): at most an hour
IMAGE_TILES = {None: 1, "auto": 1, "low": 1, "high": 6}

# grpc status name -> Realtime error type
_SERVER_ERRORS = {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS", "ABORTED"}


def error_type(code: str) -> str:
    return "server_error" if code in _SERVER_ERRORS else "invalid_request_error"


@dataclass
class Item:
    id: str
    role: str  # "user" | "assistant"
    content: list[dict[str, Any]]
    status: str = "completed"
    turn_id: str = ""  # the orchestrator turn, once the item is part of one
    replay: list[pb.ClientEvent] = field(default_factory=list)  # a pending item's content, to send again
    response_id: str = ""  # assistant items
    audio_ms: float = 0.0  # assistant items: reply audio sent

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": self.content}


@dataclass
class ResponseState:
    id: str
    item: Item
    modality: str  # "audio" | "text"
    transcript: list[str] = field(default_factory=list)
    resampler: Resampler | None = None
    truncate_ms: int | None = None  # a truncate that arrived while the response ran


@dataclass
class RealtimeConfig:
    """The Realtime session as the client configured it (what session.created/updated report)."""

    output_modalities: tuple[str, ...] = ("audio",)
    instructions: str = ""
    max_output_tokens: int | str = "inf"
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: {"type": "server_vad"})
    voice: str = "default"
    transcription: dict[str, Any] | None = None

    @property
    def modality(self) -> str:
        return self.output_modalities[0]

    def to_settings(self, *, playout_lead_ms: int | None) -> pb.SessionSettings:
        td = self.turn_detection
        settings = pb.SessionSettings(
            turn_detection="vad" if td else "manual",
            want_audio=self.modality == "audio",
            text_only=self.modality == "text",
            system_prompt=self.instructions,
            max_reply_tokens=0 if self.max_output_tokens == "inf" else int(self.max_output_tokens),
        )
        if playout_lead_ms is not None:
            settings.playout_lead_ms = playout_lead_ms
        if td:
            settings.vad_threshold = td.get("threshold") or 0.0
            settings.vad_min_silence_ms = td.get("silence_duration_ms") or 0
            if td.get("interrupt_response") is not None:
                settings.barge_in.enabled = bool(td["interrupt_response"])
            if td.get("create_response") is not None:
                settings.vad_create_response = bool(td["create_response"])
        return settings

    def wire(self, resolved: pb.SessionSettings, *, session_id: str, model: str) -> dict[str, Any]:
        fmt = {"type": "audio/pcm", "rate": WIRE_RATE}
        td = None
        if self.turn_detection:
            td = {
                "type": "server_vad",
                "threshold": round(resolved.vad_threshold, 3),
                "silence_duration_ms": resolved.vad_min_silence_ms,
                "prefix_padding_ms": self.turn_detection.get("prefix_padding_ms", 300),
                "create_response": self.turn_detection.get("create_response", True) is not False,
                "interrupt_response": resolved.barge_in.enabled if resolved.barge_in.HasField("enabled")
                else True,
                "idle_timeout_ms": None,
            }
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": model,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "tools": [],
            "tool_choice": "auto",
            "audio": {
                "input": {"format": fmt, "turn_detection": td, "transcription": self.transcription,
                          "noise_reduction": None},
                "output": {"format": fmt, "voice": self.voice, "speed": 1.0},
            },
        }


class RealtimeSession:
    """See the module docstring. `open()` starts the orchestrator session (raises `grpc.aio.AioRpcError`
    for a refused one: the caller turns it into an HTTP status); `run()` bridges until either side ends."""

    def __init__(
        self,
        *,
        stub: Any,
        metadata: tuple[tuple[str, str], ...],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        model: str,
        beta_names: bool = False,
        playout_lead_ms: int | None = None,
        connect_timeout_s: float = 10.0,
        on_forwarded: Callable[[str, float], None] | None = None,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._send_json = send
        self._w = EventWriter(beta_names=beta_names)
        self.model = model
        self._playout_lead_ms = playout_lead_ms
        self._connect_timeout_s = connect_timeout_s
        self._on_forwarded = on_forwarded  # (orchestrator event kind, seconds to translate and send it)
        self._upstream: asyncio.Queue[object] = asyncio.Queue()
        self._call: Any = None
        self.session_id = ""
        self._config = RealtimeConfig()
        self._resolved = pb.SessionSettings()
        self._updates: list[tuple[RealtimeConfig, str | None]] = []  # session.updates awaiting SessionStarted
        self._items: dict[str, Item] = {}  # every item of the conversation, in order
        self._pending: list[Item] = []  # committed user items that are not yet part of a turn
        self._buffer = bytearray()  # manual turns: 16 kHz audio appended since the last commit / clear
        self._in_resampler = Resampler(WIRE_RATE, MODEL_INPUT_RATE)
        self._speech_item: Item | None = None  # the utterance the VAD is hearing
        self._response: ResponseState | None = None
        self._requested: str | None = None  # the upstream event id of a response.create not yet started
        self._pending_events: dict[str, Item] = {}  # upstream event id -> the pending item it carried
        # upstream event id -> the client's event_id, for the errors the orchestrator reports (the latest
        # MAX_EVENT_IDS: a client that names every audio chunk must not grow this without bound)
        self._client_event_ids: OrderedDict[str, str] = OrderedDict()
        self._send_lock = asyncio.Lock()
        self.closed_status: tuple[str, str] | None = None  # (grpc code name, details) when upstream ended

    # ---- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        self._call = self._stub.Converse(self._requests(), metadata=self._metadata)
        self._put(pb.ClientEvent(session_update=pb.SessionUpdate(
            settings=self._config.to_settings(playout_lead_ms=self._playout_lead_ms))))
        first = await asyncio.wait_for(self._call.read(), self._connect_timeout_s)
        if first is grpc.aio.EOF:
            code = await self._call.code()
            raise RuntimeError(f"the orchestrator ended the stream at once ({code})")
        if first.WhichOneof("event") != "session_started":
            raise RuntimeError(f"the orchestrator answered {first.WhichOneof('event')} before session_started")
        self.session_id = first.session_id
        self._resolved = first.session_started.settings

    async def announce(self) -> None:
        """The first server event, once the WebSocket is accepted."""
        await self._send("session.created", session=self._session_wire())

    async def _requests(self) -> AsyncIterator[pb.ClientEvent]:
        while True:
            item = await self._upstream.get()
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def _put(self, event: pb.ClientEvent) -> None:
        self._upstream.put_nowait(event)

    async def pump_upstream(self) -> None:
        """Orchestrator events -> Realtime events, until the stream ends. Records the closing status."""
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                started = time.perf_counter()
                kind = message.WhichOneof("event") or ""
                if kind == "audio" and self._response is not None and self._response.item.audio_ms == 0:
                    kind = "first_audio"  # the latency the gateway adds to a reply's time to first audio
                await self._on_server_event(message)
                if self._on_forwarded is not None:
                    self._on_forwarded(kind, time.perf_counter() - started)
            self.closed_status = ("OK", "")
        except asyncio.CancelledError:
            self.closed_status = self.closed_status or ("CANCELLED", "the gateway ended the stream")
            raise
        except grpc.aio.AioRpcError as exc:
            self.closed_status = (exc.code().name, exc.details() or "")
            if exc.code() != grpc.StatusCode.CANCELLED:
                await self._send_error(exc.details() or exc.code().name, code=exc.code().name,
                                       type=error_type(exc.code().name))

    def end_upstream(self, *, end_session: bool = True) -> None:
        """No more client events: end the orchestrator session (it interrupts a running response and deletes
        the session, since a Realtime session cannot be resumed) and half-close the stream. `pump_upstream`
        returns once the orchestrator has closed it; `cancel()` if it does not in time."""
        if end_session:
            self._put(pb.ClientEvent(end_session=pb.EndSession()))
        self._put(_END)  # type: ignore[arg-type]

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    # ---- sending --------------------------------------------------------------------------------

    async def _send(self, type: str, **fields: Any) -> None:
        event = self._w.event(type, **fields)
        async with self._send_lock:
            await self._send_json(event)

    async def _send_error(self, message: str, *, code: str | None, type: str = "invalid_request_error",
                          param: str | None = None, event_id: str | None = None) -> None:
        event = self._w.error(message, code=code, type=type, param=param, event_id=event_id)
        async with self._send_lock:
            await self._send_json(event)

    def _session_wire(self) -> dict[str, Any]:
        return self._config.wire(self._resolved, session_id=self.session_id, model=self.model)

    def _upstream_id(self, client_event_id: str | None) -> str:
        upstream = new_id("gw")
        if client_event_id:
            self._client_event_ids[upstream] = client_event_id
            if len(self._client_event_ids) > MAX_EVENT_IDS:
                self._client_event_ids.popitem(last=False)
        return upstream

    # ---- client events --------------------------------------------------------------------------

    async def report(self, exc: ProtocolError) -> None:
        await self._send_error(exc.message, code=exc.code, param=exc.param, event_id=exc.event_id)

    async def on_client_event(self, kind: str, event: Any, event_id: str | None) -> None:
        """Apply one parsed client event; a refused one becomes an `error` event."""
        handler = getattr(self, "_on_" + kind.replace(".", "_"), None)
        try:
            if handler is None:
                raise ProtocolError(f"{kind} is not supported by this server", code="unsupported_event")
            await handler(event, event_id)
        except ProtocolError as exc:
            await self._send_error(exc.message, code=exc.code, param=exc.param, event_id=event_id)
        except Exception as exc:  # noqa: BLE001 - a bug must cost this event, never the connection
            log.exception("%s: handling %s failed", self.session_id, kind)
            await self._send_error(f"the server could not handle this {kind}: {type(exc).__name__}",
                                   code="internal_error", type="server_error", event_id=event_id)

    async def _on_session_update(self, event: Any, event_id: str | None) -> None:
        session = event.session
        if getattr(session, "type", None) != "realtime":
            raise ProtocolError("only realtime sessions (session.type 'realtime') are served here",
                                code="invalid_value", param="session.type")
        config = RealtimeConfig(**vars(self._config))
        given = session.model_fields_set
        if "output_modalities" in given and session.output_modalities is not None:
            modalities = tuple(session.output_modalities)
            if len(modalities) != 1:
                raise ProtocolError("output_modalities is ['audio'] (speech and its transcript) or ['text']",
                                    code="invalid_value", param="session.output_modalities")
            config.output_modalities = modalities
        if "instructions" in given:
            config.instructions = session.instructions or ""
        if "max_output_tokens" in given and session.max_output_tokens is not None:
            tokens = session.max_output_tokens
            if tokens != "inf" and not (isinstance(tokens, int) and 1 <= tokens <= MAX_OUTPUT_TOKENS):
                raise ProtocolError(
                    f"max_output_tokens is an integer in 1..{MAX_OUTPUT_TOKENS} or 'inf', got {tokens!r}",
                    code="invalid_value", param="session.max_output_tokens")
            config.max_output_tokens = tokens
        if session.tools:
            raise ProtocolError("tools are not supported by this server", code="invalid_value",
                                param="session.tools")
        audio = session.audio
        if audio is not None and audio.input is not None:
            given_in = audio.input.model_fields_set
            if "format" in given_in:
                _check_format(audio.input.format, "session.audio.input.format")
            if "turn_detection" in given_in:
                td = audio.input.turn_detection
                if td is None:
                    config.turn_detection = None
                elif td.type != "server_vad":
                    raise ProtocolError(f"turn_detection {td.type!r} is not supported: use 'server_vad' or null",
                                        code="invalid_value", param="session.audio.input.turn_detection.type")
                else:
                    for name in ("silence_duration_ms", "prefix_padding_ms", "idle_timeout_ms"):
                        value = getattr(td, name, None)
                        if value is not None and not 0 <= value <= MAX_DURATION_MS:
                            raise ProtocolError(
                                f"turn_detection.{name} must be in 0..{MAX_DURATION_MS}, got {value}",
                                code="invalid_value", param=f"session.audio.input.turn_detection.{name}")
                    config.turn_detection = {k: v for k, v in td.model_dump().items() if v is not None}
            if "transcription" in given_in:
                config.transcription = (audio.input.transcription.model_dump(exclude_none=True)
                                        if audio.input.transcription is not None else None)
        if audio is not None and audio.output is not None:
            if "format" in audio.output.model_fields_set:
                _check_format(audio.output.format, "session.audio.output.format")
            if audio.output.voice:
                config.voice = audio.output.voice
        upstream = self._upstream_id(event_id)
        self._updates.append((config, upstream))
        self._put(pb.ClientEvent(event_id=upstream, session_update=pb.SessionUpdate(
            settings=config.to_settings(playout_lead_ms=self._playout_lead_ms))))

    async def _on_input_audio_buffer_append(self, event: Any, event_id: str | None) -> None:
        try:
            pcm = decode_pcm16_base64(event.audio, max_bytes=UPSTREAM_CHUNK_BYTES * 48)
        except AudioFormatError as exc:
            raise ProtocolError(str(exc), code="invalid_value", param="audio") from None
        pcm16k = self._in_resampler.push(pcm)
        if self._config.turn_detection is None:
            if len(self._buffer) + len(pcm16k) > MAX_BUFFER_S * MODEL_INPUT_RATE * 2:
                raise ProtocolError(f"the input audio buffer would exceed {MAX_BUFFER_S:g} s: commit it first",
                                    code="input_audio_buffer_full")
            self._buffer.extend(pcm16k)
        self._send_audio(pcm16k, event_id)

    def _send_audio(self, pcm16k: bytes, event_id: str | None) -> None:
        upstream = self._upstream_id(event_id) if event_id else ""
        for start in range(0, len(pcm16k), UPSTREAM_CHUNK_BYTES):
            chunk = pcm16k[start:start + UPSTREAM_CHUNK_BYTES]
            self._put(pb.ClientEvent(event_id=upstream, audio=pb.AudioChunk(pcm16=chunk,
                                                                           sample_rate=MODEL_INPUT_RATE)))

    def _flush_input_resampler(self) -> bytes:
        tail = self._in_resampler.push(b"", last=True)
        self._in_resampler = Resampler(WIRE_RATE, MODEL_INPUT_RATE)
        return tail

    async def _on_input_audio_buffer_commit(self, event: Any, event_id: str | None) -> None:
        if self._config.turn_detection is not None:
            raise ProtocolError("with server_vad the server commits the audio at the end of speech; set "
                                "turn_detection to null to commit by hand", code="invalid_request")
        tail = self._flush_input_resampler()
        if tail:
            self._buffer.extend(tail)
            self._send_audio(tail, None)
        if not self._buffer:
            raise ProtocolError("the input audio buffer is empty: append audio before committing",
                                code="input_audio_buffer_commit_empty")
        audio = bytes(self._buffer)
        self._buffer.clear()
        item = Item(new_id("item"), "user", [{"type": "input_audio", "transcript": None}],
                    replay=_audio_events(audio))
        await self._add_pending(item, committed=True)

    async def _on_input_audio_buffer_clear(self, event: Any, event_id: str | None) -> None:
        self._buffer.clear()
        self._in_resampler = Resampler(WIRE_RATE, MODEL_INPUT_RATE)
        self._speech_item = None
        self._clear_upstream(event_id)
        await self._send("input_audio_buffer.cleared")

    def _clear_upstream(self, event_id: str | None) -> None:
        """ClearInput upstream, then the pending items' content and the uncommitted audio again."""
        self._put(pb.ClientEvent(event_id=self._upstream_id(event_id), clear_input=pb.ClearInput()))
        for item in self._pending:
            for replay in item.replay:
                self._put(replay)
        if self._buffer:
            self._send_audio(bytes(self._buffer), None)

    async def _on_conversation_item_create(self, event: Any, event_id: str | None) -> None:
        item = event.item
        if getattr(item, "type", None) != "message" or getattr(item, "role", None) != "user":
            raise ProtocolError("only user messages can be created (assistant, system and function items are "
                                "not supported)", code="invalid_value", param="item")
        if event.previous_item_id and self._items and event.previous_item_id != list(self._items)[-1]:
            raise ProtocolError("items are appended at the end of the conversation: previous_item_id must be "
                                "the last item's id or unset", code="invalid_value", param="previous_item_id")
        if item.id and item.id in self._items:
            raise ProtocolError(f"item {item.id!r} already exists", code="invalid_value", param="item.id")
        upstream = self._upstream_id(event_id)
        replay: list[pb.ClientEvent] = []
        content: list[dict[str, Any]] = []
        for i, part in enumerate(item.content):
            where = f"item.content[{i}]"
            if part.type == "input_text":
                if not part.text:
                    raise ProtocolError("input_text needs text", code="invalid_value", param=where + ".text")
                replay.append(pb.ClientEvent(event_id=upstream,
                                             text=pb.TextInput(text=part.text, defer_commit=True)))
                content.append({"type": "input_text", "text": part.text})
            elif part.type == "input_image":
                data = _data_url_bytes(part.image_url, where + ".image_url")
                replay.append(pb.ClientEvent(event_id=upstream, image=pb.Image(
                    data=data, max_tiles=IMAGE_TILES.get(part.detail, 1))))
                content.append({"type": "input_image", "image_url": None, "detail": part.detail or "auto"})
            elif part.type == "input_audio":
                if self._config.turn_detection is not None:
                    raise ProtocolError("input_audio items need manual turns (turn_detection null); with "
                                        "server_vad stream audio with input_audio_buffer.append",
                                        code="invalid_value", param=where)
                try:
                    pcm = decode_pcm16_base64(part.audio or "", max_bytes=int(MAX_BUFFER_S * WIRE_RATE * 2))
                except AudioFormatError as exc:
                    raise ProtocolError(str(exc), code="invalid_value", param=where + ".audio") from None
                resampler = Resampler(WIRE_RATE, MODEL_INPUT_RATE)
                pcm16k = resampler.push(pcm) + resampler.push(b"", last=True)
                replay.extend(_audio_events(pcm16k, upstream))
                content.append({"type": "input_audio", "transcript": part.transcript})
            else:
                raise ProtocolError(f"content type {part.type!r} is not supported in a user message",
                                    code="invalid_value", param=where + ".type")
        if not replay:
            raise ProtocolError("the message has no content", code="invalid_value", param="item.content")
        new = Item(item.id or new_id("item"), "user", content, replay=replay)
        self._pending_events[upstream] = new
        for message in replay:
            self._put(message)
        await self._add_pending(new, committed=False)

    async def _add_pending(self, item: Item, *, committed: bool) -> None:
        previous = list(self._items)[-1] if self._items else None
        self._items[item.id] = item
        self._pending.append(item)
        if committed:
            await self._send("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)
        await self._announce(item, previous)

    async def _announce(self, item: Item, previous: str | None) -> None:
        await self._send("conversation.item.added", previous_item_id=previous, item=item.wire())
        if self._w.beta_names:
            await self._send("conversation.item.created", previous_item_id=previous, item=item.wire())
        await self._send("conversation.item.done", previous_item_id=previous, item=item.wire())

    async def _on_conversation_item_retrieve(self, event: Any, event_id: str | None) -> None:
        item = self._item(event.item_id)
        await self._send("conversation.item.retrieved", item=item.wire())

    def _item(self, item_id: str) -> Item:
        item = self._items.get(item_id)
        if item is None:
            raise ProtocolError(f"item {item_id!r} does not exist", code="item_not_found", param="item_id")
        return item

    async def _on_conversation_item_truncate(self, event: Any, event_id: str | None) -> None:
        item = self._item(event.item_id)
        if item.role != "assistant" or not item.response_id:
            raise ProtocolError("only assistant audio items can be truncated", code="invalid_value",
                                param="item_id")
        if event.content_index != 0:
            raise ProtocolError("an assistant item has one content part: content_index must be 0",
                                code="invalid_value", param="content_index")
        if event.audio_end_ms < 0 or event.audio_end_ms > item.audio_ms + 1:
            raise ProtocolError(f"Audio content of {item.audio_ms:.0f}ms is already shorter than "
                                f"{event.audio_end_ms}ms", code="invalid_value", param="audio_end_ms")
        if self._response is not None and self._response.item is item:
            self._response.truncate_ms = event.audio_end_ms  # applied again once the response has ended
        self._put(pb.ClientEvent(event_id=self._upstream_id(event_id), playback=pb.PlaybackPosition(
            response_id=item.response_id, played_ms=event.audio_end_ms)))

    async def _on_conversation_item_delete(self, event: Any, event_id: str | None) -> None:
        item = self._item(event.item_id)
        if self._response is not None and self._response.item is item:
            raise ProtocolError("the item's response is running: response.cancel first", code="invalid_value",
                                param="item_id")
        if item.turn_id:
            self._put(pb.ClientEvent(event_id=self._upstream_id(event_id),
                                     delete_turn=pb.DeleteTurn(turn_id=item.turn_id)))
            return  # TurnDeleted -> conversation.item.deleted for each of the turn's items
        del self._items[item.id]
        if item in self._pending:
            self._pending.remove(item)
            self._clear_upstream(event_id)
        await self._send("conversation.item.deleted", item_id=item.id)

    async def _on_response_create(self, event: Any, event_id: str | None) -> None:
        if self._response is not None or self._requested is not None:
            raise ProtocolError("Conversation already has an active response in progress",
                                code="conversation_already_has_active_response")
        self._requested = self._upstream_id(event_id)
        self._put(pb.ClientEvent(event_id=self._requested, commit=pb.Commit()))

    async def _on_response_cancel(self, event: Any, event_id: str | None) -> None:
        response = self._response
        if response is None and self._requested is None:
            raise ProtocolError("Cancellation failed: no active response found", code="response_cancel_not_active")
        if event.response_id and (response is None or event.response_id != response.id):
            raise ProtocolError(f"response {event.response_id!r} is not the active response",
                                code="response_cancel_not_active", param="response_id")
        self._put(pb.ClientEvent(event_id=self._upstream_id(event_id),
                                 interrupt=pb.Interrupt(response_id=response.id if response else "")))

    # ---- orchestrator events --------------------------------------------------------------------

    async def _on_server_event(self, message: pb.ServerEvent) -> None:
        kind = message.WhichOneof("event")
        handler = getattr(self, "_up_" + kind, None) if kind else None
        if handler is None:
            log.debug("session %s: orchestrator event %s not translated", self.session_id, kind)
            return
        await handler(message, getattr(message, kind))

    async def _up_session_started(self, message: pb.ServerEvent, started: pb.SessionStarted) -> None:
        self._resolved = started.settings
        if self._updates:
            self._config, _ = self._updates.pop(0)
        await self._send("session.updated", session=self._session_wire())

    async def _up_speech_started(self, message: pb.ServerEvent, speech: pb.SpeechStarted) -> None:
        self._speech_item = Item(new_id("item"), "user", [{"type": "input_audio", "transcript": None}])
        await self._send("input_audio_buffer.speech_started", audio_start_ms=speech.audio_start_ms,
                         item_id=self._speech_item.id)

    async def _up_speech_stopped(self, message: pb.ServerEvent, speech: pb.SpeechStopped) -> None:
        item = self._speech_item
        if item is None:
            return
        await self._send("input_audio_buffer.speech_stopped", audio_end_ms=speech.audio_end_ms, item_id=item.id)
        td = self._config.turn_detection
        if td is not None and td.get("create_response") is False:
            # The utterance is pending upstream until response.create (it cannot be sent again after a clear).
            self._speech_item = None
            await self._add_pending(item, committed=True)

    async def _up_turn_started(self, message: pb.ServerEvent, started: pb.TurnStarted) -> None:
        self._requested = None
        user_items = list(self._pending)
        self._pending.clear()
        self._pending_events.clear()
        if started.modality == "audio" and self._speech_item is not None:
            speech, self._speech_item = self._speech_item, None
            previous = list(self._items)[-1] if self._items else None
            self._items[speech.id] = speech
            await self._send("input_audio_buffer.committed", previous_item_id=previous, item_id=speech.id)
            await self._announce(speech, previous)
            user_items.append(speech)
        for item in user_items:
            item.turn_id = message.turn_id
            item.replay = []
        modality = self._config.modality
        assistant = Item(new_id("item"), "assistant", [], status="in_progress", turn_id=message.turn_id,
                         response_id=message.response_id)
        previous = list(self._items)[-1] if self._items else None
        self._items[assistant.id] = assistant
        self._response = ResponseState(message.response_id, assistant, modality)
        await self._send("response.created", response=self._response_wire("in_progress"))
        await self._send("response.output_item.added", response_id=message.response_id, output_index=0,
                         item=assistant.wire())
        await self._send("conversation.item.added", previous_item_id=previous, item=assistant.wire())
        part = {"type": "audio", "transcript": ""} if modality == "audio" else {"type": "text", "text": ""}
        await self._send("response.content_part.added", response_id=message.response_id, item_id=assistant.id,
                         output_index=0, content_index=0, part=part)

    def _response_wire(self, status: str, *, details: dict[str, Any] | None = None,
                       usage: dict[str, Any] | None = None,
                       metadata: dict[str, str] | None = None) -> dict[str, Any]:
        response = self._response
        assert response is not None
        fmt = {"type": "audio/pcm", "rate": WIRE_RATE}
        return {
            "id": response.id, "object": "realtime.response", "status": status, "status_details": details,
            "output": [response.item.wire()] if status != "in_progress" else [],
            "conversation_id": self.session_id, "output_modalities": [response.modality],
            "audio": {"output": {"format": fmt, "voice": self._config.voice}},
            "max_output_tokens": self._config.max_output_tokens, "usage": usage, "metadata": metadata,
        }

    async def _up_input_transcript(self, message: pb.ServerEvent, transcript: pb.InputTranscript) -> None:
        if not transcript.text:
            return
        for item in self._items.values():
            if item.turn_id == message.turn_id and item.role == "user" and item.content[0]["type"] == "input_audio":
                item.content[0]["transcript"] = transcript.text
                await self._send("conversation.item.input_audio_transcription.completed", item_id=item.id,
                                 content_index=0, transcript=transcript.text,
                                 usage={"type": "duration", "seconds": 0.0})
                return

    async def _up_text_delta(self, message: pb.ServerEvent, delta: pb.TextDelta) -> None:
        response = self._current(message)
        if response is None or not delta.text:
            return
        response.transcript.append(delta.text)
        kind = "response.output_audio_transcript.delta" if response.modality == "audio" else \
            "response.output_text.delta"
        await self._send(kind, response_id=response.id, item_id=response.item.id, output_index=0,
                         content_index=0, delta=delta.text)

    async def _up_audio(self, message: pb.ServerEvent, audio: pb.AudioOut) -> None:
        response = self._current(message)
        if response is None or response.modality != "audio":
            return
        if response.resampler is None or response.resampler.in_rate != audio.sample_rate:
            response.resampler = Resampler(audio.sample_rate, WIRE_RATE)
        await self._send_audio_delta(response, response.resampler.push(audio.pcm16))

    async def _send_audio_delta(self, response: ResponseState, pcm24k: bytes) -> None:
        if not pcm24k:
            return
        response.item.audio_ms += duration_ms(pcm24k, WIRE_RATE)
        await self._send("response.output_audio.delta", response_id=response.id, item_id=response.item.id,
                         output_index=0, content_index=0, delta=base64.b64encode(pcm24k).decode("ascii"))

    def _current(self, message: pb.ServerEvent) -> ResponseState | None:
        response = self._response
        if response is None or (message.response_id and message.response_id != response.id):
            return None
        return response

    async def _up_response_done(self, message: pb.ServerEvent, done: pb.ResponseDone) -> None:
        response = self._current(message)
        if response is None:
            return
        if response.resampler is not None:
            await self._send_audio_delta(response, response.resampler.push(b"", last=True))
        t = done.timings
        usage = {"total_tokens": t.tokens, "input_tokens": 0, "output_tokens": t.tokens}
        # The orchestrator's own timings of the turn (ms from the commit), as the response's metadata.
        timings = {f"vitaserve.{name}": f"{getattr(t, name):.1f}"
                   for name in ("encode_ms", "first_token_ms", "first_audio_ms", "total_ms", "held_ms")}
        await self._finish(response, done.text, "completed", None, usage, timings)

    async def _up_interrupted(self, message: pb.ServerEvent, interrupted: pb.Interrupted) -> None:
        response = self._current(message)
        if response is None:
            return
        reason = "turn_detected" if interrupted.reason == "barge_in" else "client_cancelled"
        await self._finish(response, interrupted.heard_text, "cancelled", {"type": "cancelled", "reason": reason},
                           None)

    async def _finish(self, response: ResponseState, text: str, status: str, details: dict[str, Any] | None,
                      usage: dict[str, Any] | None, metadata: dict[str, str] | None = None) -> None:
        item = response.item
        ids = {"response_id": response.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        item.status = "completed" if status == "completed" else "incomplete"
        if response.modality == "audio":
            item.content = [{"type": "output_audio", "transcript": text}]
            if status != "failed":
                await self._send("response.output_audio.done", **ids)
                await self._send("response.output_audio_transcript.done", transcript=text, **ids)
            part = {"type": "audio", "transcript": text}
        else:
            item.content = [{"type": "output_text", "text": text}]
            if status != "failed":
                await self._send("response.output_text.done", text=text, **ids)
            part = {"type": "text", "text": text}
        await self._send("response.content_part.done", part=part, **ids)
        await self._send("response.output_item.done", response_id=response.id, output_index=0, item=item.wire())
        await self._send("conversation.item.done", item=item.wire())
        await self._send("response.done", response=self._response_wire(status, details=details, usage=usage,
                                                                       metadata=metadata))
        self._response = None
        if response.truncate_ms is not None and status != "failed":
            # The truncate arrived while the response ran; now that it has ended, the history can be cut.
            self._put(pb.ClientEvent(playback=pb.PlaybackPosition(response_id=response.id,
                                                                  played_ms=response.truncate_ms)))

    async def _up_history_truncated(self, message: pb.ServerEvent, truncated: pb.HistoryTruncated) -> None:
        for item in self._items.values():
            if item.role == "assistant" and item.response_id == message.response_id:
                if item.content:
                    item.content[0]["transcript"] = truncated.heard_text
                await self._send("conversation.item.truncated", item_id=item.id, content_index=0,
                                 audio_end_ms=truncated.played_ms)
                return

    async def _up_turn_deleted(self, message: pb.ServerEvent, deleted: pb.TurnDeleted) -> None:
        for item in [i for i in self._items.values() if i.turn_id == deleted.turn_id]:
            del self._items[item.id]
            await self._send("conversation.item.deleted", item_id=item.id)

    async def _up_error(self, message: pb.ServerEvent, error: pb.ErrorEvent) -> None:
        client_event_id = self._client_event_ids.get(error.event_id) if error.event_id else None
        await self._send_error(error.message, code=error.code.lower(), type=error_type(error.code),
                               event_id=client_event_id)
        if error.event_id and error.event_id == self._requested:
            self._requested = None  # the commit was refused: no response
        if error.event_id and error.event_id in self._updates_ids():
            self._updates = [(c, u) for c, u in self._updates if u != error.event_id]  # setting refused
        item = self._pending_events.pop(error.event_id, None) if error.event_id else None
        if item is not None and item in self._pending:
            # A pending item the orchestrator refused (a corrupt image, ...): it is not part of the turn.
            self._pending.remove(item)
            self._items.pop(item.id, None)
            self._clear_upstream(None)
            await self._send("conversation.item.deleted", item_id=item.id)
        response = self._current(message) if message.response_id else None
        if response is not None:
            details = {"type": "failed", "error": {"type": error_type(error.code), "code": error.code.lower(),
                                                   "message": error.message}}
            await self._finish(response, "".join(response.transcript), "failed", details, None)

    def _updates_ids(self) -> set[str]:
        return {u for _, u in self._updates if u}


def _check_format(fmt: Any, param: str) -> None:
    if fmt is None:
        return
    kind = getattr(fmt, "type", None)
    rate = getattr(fmt, "rate", None)
    if kind not in (None, "audio/pcm") or rate not in (None, WIRE_RATE):
        raise ProtocolError(f"only audio/pcm at {WIRE_RATE} Hz is supported, got {kind or 'audio/pcm'}"
                            + (f" at {rate} Hz" if rate else ""), code="invalid_value", param=param)


def _audio_events(pcm16k: bytes, event_id: str = "") -> list[pb.ClientEvent]:
    return [pb.ClientEvent(event_id=event_id, audio=pb.AudioChunk(pcm16=pcm16k[i:i + UPSTREAM_CHUNK_BYTES],
                                                                  sample_rate=MODEL_INPUT_RATE))
            for i in range(0, len(pcm16k), UPSTREAM_CHUNK_BYTES)]


def _data_url_bytes(url: str | None, param: str) -> bytes:
    """`data:image/png;base64,...` -> the image bytes (the gateway fetches no URLs)."""
    if not url or not url.startswith("data:"):
        raise ProtocolError("image_url must be a data: URL (data:image/png;base64,...); the server fetches "
                            "no URLs", code="invalid_value", param=param)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ProtocolError("image_url must be base64-encoded (data:image/...;base64,...)", code="invalid_value",
                            param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("image_url's data is not valid base64", code="invalid_value", param=param) from None
