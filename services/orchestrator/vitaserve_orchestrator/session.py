"""Session state and where it is kept: `Session`, `SessionSettings` and the `SessionStore` interface.

A session outlives a Converse stream: a client that reconnects with its session id resumes the same
history and settings. The store is the seam for where sessions live: `InMemorySessionStore` (this process,
the embedded default) and, later, a Redis store shared by every orchestrator replica. Stores hand out
copies (`load` returns a snapshot, `save` writes one back), as a networked store would, so code that
forgets to `save` fails in tests already.

History policy (what later turns see):
- only text is kept: media bytes are never stored in history. A turn's user content is its typed text,
  preceded by `IMAGE_MARKER` per still image and followed by `AUDIO_MARKER` if the question was spoken
  (the spoken words themselves are not known: there is no speech recognition in VITA's path);
- the assistant content is the reply as generated, state mark included (what `build_prompt` expects);
  an interrupted reply is cut to the text the user heard;
- noise turns (reply mark ☟) are not kept; at most `max_history_turns` recent turns are kept.
Camera frames and media waiting for the next turn are session state too, but are working state of the
live stream: they are bounded (`frames_kept`, `max_pending_images`, `max_turn_audio_s`).
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vitaserve.components.base import ImageInput
from vitaserve.errors import InvalidInput, NotFound, ResourceExhausted
from vitaserve.models.prompt import Turn, check_text
from vitaserve_orchestrator.bargein import BargeInConfig, BargeInUpdate
from vitaserve_orchestrator.settings import OrchestratorSettings

IMAGE_MARKER = "[image]"
AUDIO_MARKER = "[spoken question]"
TURN_DETECTION_MODES = ("vad", "manual")
# Text that build_prompt refuses in history (media placeholders, ChatML control tokens). A model may
# generate such text; it is removed before the reply is kept, or every later turn would fail.
_RESERVED = re.compile(r"<image>|<audio>|<video>|<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class SettingsUpdate:
    """Settings as a client sends them: zero / empty values mean "the server default"."""

    turn_detection: str = ""
    vad_threshold: float = 0.0
    vad_min_silence_ms: int = 0
    vad_min_utterance_ms: int = 0
    want_audio: bool = False
    max_reply_tokens: int = 0
    temperature: float = 0.0
    seed: int = 0
    system_prompt: str = ""
    text_only: bool = False
    barge_in: BargeInUpdate | None = None
    playout_lead_ms: int | None = None  # None = the server default


@dataclass(frozen=True)
class SessionSettings:
    """The resolved settings of one session.

    speech_out: synthesise spoken replies. Only `text_only` turns it off: the API's `want_audio` is a
      proto3 bool, so "false" cannot be told apart from "unset", and speech is the default.
    seed: None = a fresh random seed per reply. system_prompt: None = the model's default for the media.
    barge_in: the interruption policy (bargein.py). playout_lead_ms: how far ahead of real time reply audio
      is sent (pacing.py).
    """

    turn_detection: str
    vad_threshold: float
    vad_min_silence_ms: int
    vad_min_utterance_ms: int
    speech_out: bool
    max_reply_tokens: int
    temperature: float
    seed: int | None
    system_prompt: str | None
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)
    playout_lead_ms: int = 300

    def __post_init__(self) -> None:
        # A store that keeps settings as plain data (e.g. JSON) hands the policy back as a dict.
        if isinstance(self.barge_in, dict):
            object.__setattr__(self, "barge_in", BargeInConfig(**self.barge_in))

    @classmethod
    def resolve(cls, update: SettingsUpdate | None, config: OrchestratorSettings) -> SessionSettings:
        """Fill defaults from the service config and check every value; raises `InvalidInput`."""
        u = update or SettingsUpdate()
        mode = u.turn_detection or config.default_turn_detection
        if mode not in TURN_DETECTION_MODES:
            raise InvalidInput(f"turn_detection must be one of {TURN_DETECTION_MODES}, got {mode!r}")
        threshold = u.vad_threshold or config.vad_threshold
        if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
            raise InvalidInput(f"vad_threshold must be in (0, 1), got {threshold}")
        max_tokens = u.max_reply_tokens or config.max_reply_tokens
        if max_tokens > config.max_reply_tokens_limit:
            raise InvalidInput(
                f"max_reply_tokens must be <= {config.max_reply_tokens_limit}, got {max_tokens}"
            )
        if not (math.isfinite(u.temperature) and 0.0 <= u.temperature <= 2.0):
            raise InvalidInput(f"temperature must be in [0, 2], got {u.temperature}")
        if u.system_prompt:
            check_text(u.system_prompt, what="system_prompt", max_chars=config.max_text_chars)
        for name in ("vad_min_silence_ms", "vad_min_utterance_ms"):
            if getattr(u, name) > 60_000:
                raise InvalidInput(f"{name} must be <= 60000")
        lead = config.playout_lead_ms if u.playout_lead_ms is None else u.playout_lead_ms
        if not 0 <= lead <= 3_600_000:
            raise InvalidInput(f"playout_lead_ms must be in 0..3600000, got {lead}")
        return cls(
            turn_detection=mode,
            vad_threshold=threshold,
            vad_min_silence_ms=u.vad_min_silence_ms or config.vad_min_silence_ms,
            vad_min_utterance_ms=u.vad_min_utterance_ms or config.vad_min_utterance_ms,
            speech_out=not u.text_only,
            max_reply_tokens=max_tokens,
            temperature=u.temperature,
            seed=u.seed or None,
            system_prompt=u.system_prompt or None,
            barge_in=BargeInConfig.resolve(u.barge_in, config),
            playout_lead_ms=lead,
        )


@dataclass(frozen=True)
class Frame:
    """A camera frame: encoded image bytes, the client's timestamp and the server time it arrived."""

    data: bytes
    timestamp_s: float
    received_s: float


@dataclass
class PendingInput:
    """What the client sent for the next turn and has not committed yet."""

    texts: list[str] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)  # 16 kHz int16 LE (push-to-talk)

    @property
    def text(self) -> str:
        return " ".join(t.strip() for t in self.texts if t.strip())

    @property
    def text_chars(self) -> int:
        return sum(len(t) for t in self.texts)

    def empty(self) -> bool:
        return not self.text and not self.images and not self.audio

    def clear(self) -> None:
        self.texts.clear()
        self.images.clear()
        self.audio.clear()


@dataclass
class Session:
    """One conversation. `turns` counts committed turns (turn ids are derived from it)."""

    id: str
    settings: SessionSettings
    frames_kept: int = 16
    tenant: str = ""
    history: list[Turn] = field(default_factory=list)
    turns: int = 0
    frames: deque[Frame] = field(default_factory=deque)
    pending: PendingInput = field(default_factory=PendingInput)

    def __post_init__(self) -> None:
        self.frames = deque(self.frames, maxlen=self.frames_kept)

    def turn_id(self, n: int | None = None) -> str:
        """Id of turn `n` (default: the turn being prepared, i.e. the next one)."""
        return f"turn-{self.turns + 1 if n is None else n}"

    def add_frame(self, frame: Frame) -> None:
        self.frames.append(frame)  # the deque drops the oldest beyond frames_kept

    def recent_frames(self, n: int, *, now_s: float, max_age_s: float) -> list[Frame]:
        """Up to `n` most recent frames received within `max_age_s`, oldest first."""
        if n <= 0:
            return []
        fresh = [f for f in self.frames if now_s - f.received_s <= max_age_s]
        return fresh[-n:]

    def record_turn(self, user: str, assistant: str, *, max_turns: int) -> None:
        self.history.append(Turn(user=user, assistant=assistant))
        if len(self.history) > max_turns:
            del self.history[: len(self.history) - max_turns]


def history_user_text(text: str, *, images: int, spoken: bool) -> str:
    """The user content kept in history for a turn (see the module docstring)."""
    parts = [IMAGE_MARKER] * images + ([text] if text else []) + ([AUDIO_MARKER] if spoken else [])
    return " ".join(parts)


def history_reply_text(state_mark: str, text: str) -> str:
    """The assistant content kept in history: the state mark and the (possibly cut) reply text."""
    return _RESERVED.sub("", f"{state_mark}{text}")


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex}"


class SessionStore(ABC):
    """Where sessions live between streams (and, with a shared store, between replicas)."""

    @abstractmethod
    async def create(self, settings: SessionSettings, *, tenant: str = "") -> Session:
        """A new empty session with a fresh id, already saved."""

    @abstractmethod
    async def load(self, session_id: str) -> Session:
        """A copy of the stored session; raises `NotFound`."""

    @abstractmethod
    async def save(self, session: Session) -> None:
        """Store (a copy of) `session`, replacing the stored one."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget a session (no error if it does not exist)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class InMemorySessionStore(SessionStore):
    """Sessions in this process: bounded by `max_sessions`, idle ones expire after `idle_ttl_s`."""

    def __init__(
        self,
        *,
        max_sessions: int = 10_000,
        idle_ttl_s: float = 3600.0,
        frames_kept: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_sessions
        self._ttl = idle_ttl_s
        self._frames_kept = frames_kept
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[float, Session]] = OrderedDict()  # oldest touch first
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, config: OrchestratorSettings) -> InMemorySessionStore:
        return cls(
            max_sessions=config.max_sessions,
            idle_ttl_s=config.session_idle_ttl_s,
            frames_kept=config.frames_kept,
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            sid, (touched, _) = next(iter(self._sessions.items()))
            if now - touched <= self._ttl:
                break
            del self._sessions[sid]

    def _put(self, session: Session) -> None:
        self._sessions[session.id] = (self._clock(), copy.deepcopy(session))
        self._sessions.move_to_end(session.id)

    async def create(self, settings: SessionSettings, *, tenant: str = "") -> Session:
        async with self._lock:
            self._expire()
            if len(self._sessions) >= self._max:
                raise ResourceExhausted(f"session limit reached ({self._max} sessions)")
            session = Session(
                id=new_session_id(), settings=settings, tenant=tenant, frames_kept=self._frames_kept
            )
            self._put(session)
            return copy.deepcopy(session)

    async def load(self, session_id: str) -> Session:
        async with self._lock:
            self._expire()
            entry = self._sessions.get(session_id)
            if entry is None:
                raise NotFound(f"session {session_id!r} does not exist or has expired")
            return copy.deepcopy(entry[1])

    async def save(self, session: Session) -> None:
        async with self._lock:
            self._put(session)

    async def delete(self, session_id: str) -> None:
        async with self._lock:
            self._sessions.pop(session_id, None)
