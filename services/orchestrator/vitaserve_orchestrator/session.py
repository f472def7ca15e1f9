"""Session state and where it is kept: `Session`, `SessionSettings` and the `SessionStore` interface.

A session outlives a Converse stream: a client that reconnects with its session id resumes the same
history and settings, on any replica when the store is shared. Two stores implement the interface:
`InMemorySessionStore` (this process: the embedded default and unit tests) and `redis_store.RedisSessionStore`
(shared by every orchestrator replica; key names in `redis_keys.py`). Stores hand out copies (`load`
returns a snapshot, `save` writes one back), as a networked store would, so code that forgets to `save`
fails in tests already. Both stores keep exactly the persisted record (`session_to_record`), so a test on
the in-memory store sees what a reconnect to another replica would see.

What is persisted (the versioned JSON record, `RECORD_VERSION`): id, tenant, turn counter, settings and
history (the (user, assistant) pairs, and the turn ids in a list of their own beside them, so a replica of
an earlier release still reads the record). Nothing else: large media are never stored. Fields added later
read with their defaults from older records: settings fields, and turn ids (empty).

History policy (what later turns see):
- only text is kept: media bytes are never stored in history. A turn's user content is what the model
  family makes of it (`ModelFamily.history_user_text`): VITA-1.5 keeps the typed text between `[image]`
  markers and a `[spoken question]` marker (its path has no speech recognition); the small family keeps
  the user message as its LLM read it (image descriptions and the transcript);
- the assistant content is the reply as generated, state mark included (what `build_prompt` expects);
  an interrupted reply is cut to the text the user heard;
- noise turns (reply mark ☟) are not kept; at most `max_history_turns` recent turns are kept;
- each kept turn has the id its events carried (`Turn.turn_id`), by which a client deletes it
  (`delete_turn`) and a finished reply is cut to what the client played (conversation.py).
Camera frames and media waiting for the next turn (images, push-to-talk audio, deferred text) are working
state of the live stream, bounded (`frames_kept`, `max_pending_images`, `max_turn_audio_s`) and kept in
that replica's memory only: a stream that reconnects starts with no pending media and no frames.

Streams and fencing (one live stream per session, the newest wins):
- `create` and `claim` (resume) give the calling stream the session's lease and a new `epoch`, a fencing
  token larger than any before it; `claim` succeeds even while an older stream still holds a lease (its
  replica may not have noticed the client left).
- `save` writes only if the stored epoch is still the caller's: a stale stream's late save is refused with
  `SessionSuperseded` and cannot overwrite newer history. `renew` (the stream's heartbeat) fails the same
  way, which is how the older stream learns it lost the session, and ends.
- `create`/`claim` take the tenant's `max_streams`: live leases per tenant are counted (across replicas
  in Redis, where a lease not renewed for `stream_lease_s` expires) and one more is RESOURCE_EXHAUSTED.
- every operation names the tenant: another tenant's session id is `NotFound`, like a missing one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vitaserve.components.base import ImageInput
from vitaserve.errors import Aborted, InvalidInput, NotFound, ResourceExhausted, VitaserveError
from vitaserve.families.base import clean_history_text
from vitaserve.models.prompt import Turn, check_text
from vitaserve_orchestrator.bargein import BargeInConfig, BargeInUpdate
from vitaserve_orchestrator.settings import OrchestratorSettings

TURN_DETECTION_MODES = ("vad", "manual")
DEFAULT_TENANT = "default"  # the one tenant when auth is off
RECORD_VERSION = 1  # of the persisted JSON record; readers accept every version up to theirs

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
    vad_create_response: bool | None = None  # None = True


@dataclass(frozen=True)
class SessionSettings:
    """The resolved settings of one session.

    speech_out: synthesise spoken replies. Only `text_only` turns it off: the API's `want_audio` is a
      proto3 bool, so "false" cannot be told apart from "unset", and speech is the default.
    seed: None = a fresh random seed per reply. system_prompt: None = the model's default for the media.
    barge_in: the interruption policy (bargein.py). playout_lead_ms: how far ahead of real time reply audio
      is sent (pacing.py).
    vad_create_response: in "vad" mode, the end of an utterance starts a response (True) or its audio waits
      for the next commit as pending push-to-talk audio (False).
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
    vad_create_response: bool = True

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
            vad_create_response=True if u.vad_create_response is None else u.vad_create_response,
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
    """One conversation. `turns` counts committed turns (turn ids are derived from it); `epoch` is the
    fencing token of the stream holding it (0: held by none, a snapshot from `load`)."""

    id: str
    settings: SessionSettings
    frames_kept: int = 16
    tenant: str = DEFAULT_TENANT
    history: list[Turn] = field(default_factory=list)
    turns: int = 0
    epoch: int = 0
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

    def record_turn(self, user: str, assistant: str, *, turn_id: str = "", max_turns: int) -> None:
        self.history.append(Turn(user=user, assistant=assistant, turn_id=turn_id))
        if len(self.history) > max_turns:
            del self.history[: len(self.history) - max_turns]

    def delete_turn(self, turn_id: str) -> None:
        """Remove the history turn `turn_id` (user and assistant together); `NotFound` if the history has
        none (never kept, trimmed, deleted, or an empty id: turns kept before turns had ids)."""
        for i, turn in enumerate(self.history):
            if turn_id and turn.turn_id == turn_id:
                del self.history[i]
                return
        raise NotFound(f"turn {turn_id!r} is not in the session's history")

    def last_turn_id(self) -> str | None:
        """The id of the newest history turn (None: empty history)."""
        return self.history[-1].turn_id if self.history else None


def history_reply_text(state_mark: str, text: str) -> str:
    """The assistant content kept in history: the state mark and the (possibly cut) reply text."""
    return clean_history_text(f"{state_mark}{text}")  # a model may generate reserved tokens


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex}"


class SessionSuperseded(Aborted):
    """A newer stream holds this session (its epoch is newer): this stream's writes are refused."""


def stream_limit_error(tenant: str, live: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"tenant {tenant!r} has {live} live streams, its limit max_streams={limit}: end one or retry later"
    )


def not_found(session_id: str) -> NotFound:
    # The same words for a missing session and another tenant's: nothing tells them apart.
    return NotFound(f"session {session_id!r} does not exist or has expired")


def session_to_record(session: Session) -> str:
    """The persisted form of a session (module docstring): versioned JSON, text only."""
    record = {
        "v": RECORD_VERSION,
        "id": session.id,
        "tenant": session.tenant,
        "turns": session.turns,
        "settings": asdict(session.settings),
        "history": [[t.user, t.assistant] for t in session.history],
        "turn_ids": [t.turn_id for t in session.history],  # apart: earlier releases read "history" as pairs
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


_SETTINGS_FIELDS = tuple(f.name for f in fields(SessionSettings))


def session_from_record(raw: str | bytes, *, frames_kept: int, epoch: int = 0) -> Session:
    """A `Session` from `session_to_record`'s output. A record this replica cannot read (corrupt, or
    written by a newer release) is an INTERNAL error naming the problem, never a silent reset."""
    try:
        record: dict[str, Any] = json.loads(raw)
        version = record["v"]
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise VitaserveError(
                f"session record version {version!r} is newer than this replica reads ({RECORD_VERSION})"
            )
        values = record["settings"]
        # A record written before a settings field existed reads with that field's default.
        settings = SessionSettings(**{name: values[name] for name in _SETTINGS_FIELDS if name in values})
        pairs = record["history"]
        # Records written before turns had ids (or by such a replica since) have none: empty ids.
        turn_ids = record.get("turn_ids") or [""] * len(pairs)
        if len(turn_ids) != len(pairs):
            raise ValueError(f"{len(turn_ids)} turn ids for {len(pairs)} history turns")
        return Session(
            id=str(record["id"]),
            settings=settings,
            frames_kept=frames_kept,
            tenant=str(record["tenant"]),
            history=[
                Turn(user=str(u), assistant=str(a), turn_id=str(t))
                for (u, a), t in zip(pairs, turn_ids, strict=True)
            ],
            turns=int(record["turns"]),
            epoch=epoch,
        )
    except VitaserveError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise VitaserveError(f"unreadable session record: {type(exc).__name__}: {exc}") from exc


class SessionStore(ABC):
    """Where sessions live between streams (and, with a shared store, between replicas). The fencing and
    lease rules are in the module docstring. Failures to reach the store raise `Unavailable`."""

    @abstractmethod
    async def create(
        self, settings: SessionSettings, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0
    ) -> Session:
        """A new empty session with a fresh id, already saved, leased by the caller (`epoch` set).
        Raises `ResourceExhausted` when the tenant already has `max_streams` live streams (0 = no limit)."""

    @abstractmethod
    async def load(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> Session:
        """A snapshot of the stored session (no lease; `epoch` 0); raises `NotFound`."""

    @abstractmethod
    async def claim(self, session_id: str, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0) -> Session:
        """Resume: the stored session, leased by the caller with a new epoch (older holders are fenced
        off). Raises `NotFound`, or `ResourceExhausted` as `create` (resuming a session whose old stream
        still holds a lease does not count twice)."""

    @abstractmethod
    async def save(self, session: Session) -> None:
        """Store `session` (its record) if `session.epoch` still holds it, else `SessionSuperseded`.
        Refreshes the idle TTL."""

    @abstractmethod
    async def renew(self, session: Session) -> None:
        """The stream's heartbeat: extend its lease and the session's TTL; `SessionSuperseded` if a newer
        stream claimed the session."""

    @abstractmethod
    async def release(self, session: Session) -> None:
        """The stream ended: give its lease back (no-op if a newer stream holds the session)."""

    @abstractmethod
    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Forget a session (no error if it does not exist); older streams on it are fenced off."""

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Raise `Unavailable` if the store cannot be reached (readiness)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


@dataclass
class _Stored:
    touched: float
    record: str
    epoch: int


class InMemorySessionStore(SessionStore):
    """Sessions in this process: bounded by `max_sessions`, idle ones expire after `idle_ttl_s`. Leases
    live as long as their stream (this process is the only one serving these sessions)."""

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
        # (tenant, session id) -> stored record, oldest touch first
        self._sessions: OrderedDict[tuple[str, str], _Stored] = OrderedDict()
        self._leases: dict[str, dict[str, int]] = {}  # tenant -> session id -> epoch of the live stream
        self._epochs = 0  # one counter for every session: epochs only need to grow
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
            key, stored = next(iter(self._sessions.items()))
            if now - stored.touched <= self._ttl:
                break
            del self._sessions[key]

    def _put(self, session: Session, epoch: int) -> None:
        key = (session.tenant, session.id)
        self._sessions[key] = _Stored(self._clock(), session_to_record(session), epoch)
        self._sessions.move_to_end(key)

    def _lease(self, tenant: str, session_id: str, max_streams: int) -> int:
        leases = self._leases.setdefault(tenant, {})
        if max_streams and session_id not in leases and len(leases) >= max_streams:
            raise stream_limit_error(tenant, len(leases), max_streams)
        self._epochs += 1
        leases[session_id] = self._epochs
        return self._epochs

    def _holds(self, session: Session) -> bool:
        stored = self._sessions.get((session.tenant, session.id))
        if stored is None:  # expired under a live stream: its holder may write it back; deleted: no one
            return self._leases.get(session.tenant, {}).get(session.id) == session.epoch
        return stored.epoch == session.epoch

    async def create(
        self, settings: SessionSettings, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0
    ) -> Session:
        async with self._lock:
            self._expire()
            if len(self._sessions) >= self._max:
                raise ResourceExhausted(f"session limit reached ({self._max} sessions)")
            session = Session(
                id=new_session_id(), settings=settings, tenant=tenant, frames_kept=self._frames_kept
            )
            session.epoch = self._lease(tenant, session.id, max_streams)
            self._put(session, session.epoch)
            return copy.deepcopy(session)

    async def load(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> Session:
        async with self._lock:
            self._expire()
            stored = self._sessions.get((tenant, session_id))
            if stored is None:
                raise not_found(session_id)
            return session_from_record(stored.record, frames_kept=self._frames_kept)

    async def claim(self, session_id: str, *, tenant: str = DEFAULT_TENANT, max_streams: int = 0) -> Session:
        async with self._lock:
            self._expire()
            stored = self._sessions.get((tenant, session_id))
            if stored is None:
                raise not_found(session_id)
            stored.epoch = self._lease(tenant, session_id, max_streams)
            stored.touched = self._clock()
            self._sessions.move_to_end((tenant, session_id))
            return session_from_record(stored.record, frames_kept=self._frames_kept, epoch=stored.epoch)

    async def save(self, session: Session) -> None:
        async with self._lock:
            if not self._holds(session):
                raise SessionSuperseded(f"session {session.id!r} was taken over by a newer stream")
            self._put(session, session.epoch)

    async def renew(self, session: Session) -> None:
        async with self._lock:
            if not self._holds(session):
                raise SessionSuperseded(f"session {session.id!r} was taken over by a newer stream")
            stored = self._sessions.get((session.tenant, session.id))
            if stored is not None:
                stored.touched = self._clock()
                self._sessions.move_to_end((session.tenant, session.id))

    async def release(self, session: Session) -> None:
        async with self._lock:
            leases = self._leases.get(session.tenant, {})
            if leases.get(session.id) == session.epoch:
                del leases[session.id]

    async def delete(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        async with self._lock:
            self._sessions.pop((tenant, session_id), None)
            self._leases.get(tenant, {}).pop(session_id, None)
