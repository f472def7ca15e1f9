"""The OpenAI Realtime (GA) wire format: parsing client events, building server events.

Client events are validated by the official SDK's own pydantic models (`openai.types.realtime`), through one
`TypeAdapter` over their discriminated union, so the gateway accepts exactly what the SDK sends. Server events
are built here as plain dicts (one `json.dumps` per event on the audio path); the tests validate every event
the gateway sends against the SDK's server-event union, field by field.

Beta names (`response.audio.delta`, `response.text.delta`, `conversation.item.created`, ...) are sent in
place of, or beside, the GA names when the session asks for them (`GatewaySettings.beta_event_names`, or the
query parameter `?event_names=beta`): see `BETA_NAMES`.
"""

from __future__ import annotations

import json
import typing
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic
from openai.types.realtime import RealtimeClientEvent


def _client_event_models() -> dict[str, type[pydantic.BaseModel]]:
    """type -> the SDK's model of that client event (the union is discriminated by `type` for the SDK, but
    not for pydantic, which would report a mismatch against every member)."""
    union = typing.get_args(RealtimeClientEvent)[0]  # Annotated[Union[...], PropertyInfo]
    models = {}
    for model in typing.get_args(union):
        (kind,) = typing.get_args(model.model_fields["type"].annotation)
        models[kind] = model
    return models


CLIENT_EVENTS = _client_event_models()

# GA name -> beta name, for clients written against the beta API.
BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ProtocolError(Exception):
    """A client event the gateway refuses: becomes an `error` server event; the connection goes on."""

    def __init__(self, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error",
                 event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.message = message
        self.code = code
        self.param = param
        self.type = type


@dataclass(frozen=True)
class ParsedEvent:
    type: str
    event_id: str | None
    model: Any  # the SDK's pydantic model of the event


def parse_client_event(raw: str | bytes) -> ParsedEvent:
    """One WebSocket message -> the SDK's model of a client event. Raises `ProtocolError` with the event's
    own `event_id` when it has one (so the error names it)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ProtocolError("a client event is a JSON object", code="invalid_json")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("the event has no 'type'", code="missing_required_parameter", param="type",
                            event_id=event_id)
    model_class = CLIENT_EVENTS.get(kind)
    if model_class is None:
        raise ProtocolError(f"unknown event type {kind!r}", code="invalid_value", param="type",
                            event_id=event_id)
    try:
        model = model_class.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        # pydantic names union members in the path (RealtimeSessionCreateRequest, AudioPCM): not wire names
        where = ".".join(str(p) for p in first["loc"] if not str(p)[:1].isupper())
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise ProtocolError(f"invalid {kind} event: {where}: {first['msg']}", code=code, param=where,
                            event_id=event_id) from None
    return ParsedEvent(type=kind, event_id=event_id, model=model)


class EventWriter:
    """Builds server events: every event gets an `event_id`; GA names, or beta names on request."""

    def __init__(self, *, beta_names: bool = False) -> None:
        self.beta_names = beta_names

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        if self.beta_names:
            type = BETA_NAMES.get(type, type)
        return {"type": type, "event_id": new_id("event"), **fields}

    def error(self, message: str, *, code: str | None, type: str = "invalid_request_error",
              param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
        return self.event("error", error={"type": type, "code": code, "message": message, "param": param,
                                          "event_id": event_id})


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
