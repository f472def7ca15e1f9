"""The domain event vocabulary of a conversation, independent of protobuf.

Client events (`ClientEvent`) are what a client sends, already parsed from the wire; server events
(`ServerEvent`) are what the orchestrator emits, wrapped in an `Envelope` with the session, turn and
response ids and the time. The servicer translates both to and from protobuf; nothing else sees protobuf.

The event class decides delivery (as in pipecat's frame kinds):
- data events (`DATA_EVENTS`: text deltas, audio, the done event) and errors carrying a response id belong
  to one response; once that response is interrupted they are dropped, queued or not (`GATED_EVENTS`, the
  response id gate of `outbox.Outbox`);
- every other event (speech started/stopped, interrupted, history changes, errors about a client event,
  ...) is always delivered, in order, and never waits behind a response's paced audio (outbox.py,
  pacing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from vitaserve.models.prompt import Turn
from vitaserve_orchestrator.session import SessionSettings, SettingsUpdate

# ------------------------------------------------------------------------------------------------
# Client -> orchestrator. `event_id` is chosen by the client and echoed by errors the event causes.


@dataclass(frozen=True, kw_only=True)
class UpdateSession:
    """Create (empty `session_id`) or resume a session; later ones change the settings."""

    session_id: str = ""
    settings: SettingsUpdate | None = None  # None = keep the current settings
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class AudioIn:
    """16-bit little-endian mono PCM."""

    pcm16: bytes
    sample_rate: int
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class ImageIn:
    data: bytes
    max_tiles: int = 0  # 0 = 1 tile (the real-time path)
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class VideoFrameIn:
    data: bytes
    timestamp_s: float = 0.0
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class TextIn:
    text: str
    defer_commit: bool = False
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class CommitIn:
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class InterruptIn:
    response_id: str = ""  # empty = whatever response is running
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class PlaybackIn:
    """The client's playback position in a response's audio: while it runs, what was played so far; once
    it finished (the stream's last response, its turn last in history), where the client stopped: the
    history turn is cut to what was heard there (`HistoryTruncated`)."""

    response_id: str
    played_ms: int
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class EndSessionIn:
    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class ClearInputIn:
    """Drop what waits for the next turn (text, images, push-to-talk audio) and the utterance in progress
    (VAD); not a running response, the history or the camera frames."""

    event_id: str = ""


@dataclass(frozen=True, kw_only=True)
class DeleteTurnIn:
    """Remove the history turn `turn_id` (answered by `TurnDeleted`)."""

    turn_id: str
    event_id: str = ""


ClientEvent = (
    UpdateSession
    | AudioIn
    | ImageIn
    | VideoFrameIn
    | TextIn
    | CommitIn
    | InterruptIn
    | PlaybackIn
    | EndSessionIn
    | ClearInputIn
    | DeleteTurnIn
)

# ------------------------------------------------------------------------------------------------
# Orchestrator -> client.


@dataclass(frozen=True)
class SessionStarted:
    resumed: bool
    settings: SessionSettings
    history_turns: int
    history: tuple[Turn, ...] = ()  # what the next turn's prompt holds, oldest first
    model_family: str = ""  # the deployment's model family (`vitaserve.families`)


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int  # offset in the session's streamed input audio


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True)
class TurnStarted:
    modality: str  # "audio" | "text"
    images: int
    frames: int


@dataclass(frozen=True)
class InputTranscript:
    """What the model family's encoders understood of the user's turn, for families that produce text:
    the transcript of the spoken question and one description per picture (still images, then frames)."""

    text: str
    image_descriptions: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    offset: int  # in Unicode code points of the reply text


@dataclass(frozen=True)
class AudioOut:
    """A chunk of reply speech, int16 LE mono, and the span [text_start, text_end) of the reply text that
    its segment speaks. `segment` (index of that segment) and `duration_ms` are for the server's own
    playout accounting and are not sent."""

    pcm16: bytes
    sample_rate: int
    text_start: int
    text_end: int
    seq: int
    start_ms: int
    duration_ms: float
    segment: int


@dataclass(frozen=True)
class Timings:
    encode_ms: float = 0.0
    first_token_ms: float = 0.0
    first_audio_ms: float = 0.0
    total_ms: float = 0.0
    tokens: int = 0
    audio_ms: int = 0
    holds: int = 0  # times the barge-in policy held the reply audio (speech too short to interrupt)
    held_ms: float = 0.0  # how long it was held, in all


@dataclass(frozen=True)
class ResponseDone:
    text: str
    state_mark: str  # "☞", "☜", "☟" or ""
    timings: Timings


@dataclass(frozen=True)
class Interrupted:
    """`trigger_audio_ms` / `policy_met_ms` (barge_in only): the input audio offset at which the user's
    speech met the policy, and the stream time (`Envelope.t_ms` clock) the server acted on it."""

    played_ms: int
    heard_text: str
    reason: str  # "client" | "barge_in" | "new_turn"
    trigger_audio_ms: int = 0
    policy_met_ms: float = 0.0


@dataclass(frozen=True)
class HistoryTruncated:
    """The history turn `turn_id` now keeps `heard_text`, the reply heard by `played_ms` of its audio (the
    position the kept text reflects: the reported one, at most what the response sent)."""

    turn_id: str
    played_ms: int
    heard_text: str


@dataclass(frozen=True)
class TurnDeleted:
    turn_id: str


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # a grpc.StatusCode name
    message: str
    event_id: str = ""
    retryable: bool = False


ServerEvent = (
    SessionStarted
    | SpeechStarted
    | SpeechStopped
    | TurnStarted
    | InputTranscript
    | TextDelta
    | AudioOut
    | ResponseDone
    | Interrupted
    | HistoryTruncated
    | TurnDeleted
    | ErrorEvent
)

DATA_EVENTS = (TextDelta, AudioOut, ResponseDone)
# What the response id gate drops once a response is interrupted: its data, and its own error (a response
# ends with exactly one of done / interrupted / error).
GATED_EVENTS = (*DATA_EVENTS, ErrorEvent)


@dataclass(frozen=True)
class Envelope:
    """A server event with its routing ids. `t_ms`: milliseconds since the stream opened, when it was put
    in the outbox (and, once sent, when it was handed to the transport)."""

    event: ServerEvent
    session_id: str
    turn_id: str = ""
    response_id: str = ""
    t_ms: float = 0.0
