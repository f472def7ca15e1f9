"""`SpeechBatcher`: continuous batching of the speech decoder's AR loop (spec §6.4) across segments.

Every reply sentence of every session is one request: its text vectors in, speech codec ids out, one
per step, until EOS or its code limit. One engine thread runs steps. A step:

1. drops cancelled requests (their handle's `cancel()` or their `is_cancelled()` poll) and frees their
   slot at once;
2. admits waiting requests in FIFO order while fewer than `max_batch` run and the KV buffers stay within
   `kv_positions`; at most `prompts_per_step` prompt passes run per step (the pre-net and the prompt pass
   are bidirectional over the whole segment, so a prompt cannot be chunked), so running streams keep
   their pace while a burst of new sentences arrives;
3. runs one `SpeechDecoder.decode_batch` forward for every running request together, then chooses each
   row's code with that request's own settings and its own seeded generator (so a request's codes do not
   depend on its batch mates; greedy ids equal `SpeechDecoder.generate`'s).

KV memory: each layer holds keys and values of shape (rows, heads, capacity, head_dim). Running requests
hold rows 0..B-1 (a finishing request's row is refilled with the last row), so a step reads views and
never gathers. Rows and capacity grow by doubling when an admission needs them and are freed when the
batch empties; rows x capacity never exceeds `kv_positions`, and a request that could never fit is
refused at `submit` with InvalidInput. The batch is padded to its longest row: one long segment makes
the step attend over its width for every row (a mask hides the padding).

Back-pressure: `submit` raises `ResourceExhausted` (retryable) once `max_queue` requests wait. Results go
to the request's `CodeSink` on the engine thread (`on_code` per id, then exactly one `on_finish`); a sink
must hand them on quickly (the codec runs on the consumer's thread, not here).
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vitaserve.batching.engine_loop import EngineLoop, Handle, config_from_parameters
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable, VitaserveError
from vitaserve.models.tts import top_k_distribution

_WAITING, _RUNNING, _DONE = "waiting", "running", "done"
_MIN_CAPACITY = 256


@dataclass(frozen=True)
class SpeechBatchConfig:
    """Settings of one speech batcher (Triton: the speech_synth config.pbtxt `parameters`).

    max_batch: segments decoded together in one step; more wait in the queue.
    max_queue: segments waiting for admission; beyond it `submit` raises ResourceExhausted.
    kv_positions: the KV budget, in positions over all rows (rows x capacity of the padded buffers).
    prompts_per_step: new segments' prompt passes run per step.
    """

    max_batch: int = 32
    max_queue: int = 64
    kv_positions: int = 131072
    prompts_per_step: int = 4

    def __post_init__(self) -> None:
        for name in ("max_batch", "prompts_per_step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_positions < _MIN_CAPACITY:
            raise ValueError(f"kv_positions must be >= {_MIN_CAPACITY} (one row), got {self.kv_positions}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> SpeechBatchConfig:
        """Read the fields from string parameters (config.pbtxt); empty or missing = the default.
        Raises ValueError naming the bad parameter."""
        return config_from_parameters(cls, params)


@dataclass(frozen=True)
class CodeSampling:
    """How one segment chooses its codes (see `SpeechDecoder.generate`)."""

    max_tokens: int
    top_k: int = 2
    greedy: bool = False
    penalty_window: int = -1
    penalty: float = 1.1


class CodeSink(Protocol):
    """Where a request's codes go; called on the engine thread."""

    def on_code(self, code: int) -> None: ...

    def on_finish(self, reason: str, error: VitaserveError | None) -> None:
        """Exactly once: reason 'stop' (EOS) | 'length' | 'cancelled' | 'error' (then `error` is set)."""


class SpeechHandle(Handle):
    """What `submit` returns (see `Handle`), with the segment's code count and its largest batch."""

    def __init__(self, batcher: SpeechBatcher, request_id: int) -> None:
        super().__init__(batcher, request_id)
        self.peak_batch = 0  # the most segments decoded together in one of this one's steps
        self.codes = 0


@dataclass(eq=False)
class _Request:
    id: int
    hidden: torch.Tensor  # (1, N, idim)
    sampling: CodeSampling
    generator: torch.Generator | None
    sink: CodeSink
    is_cancelled: Callable[[], bool] | None
    handle: SpeechHandle
    state: str = _WAITING
    row: int = -1
    length: int = 0  # positions in the cache
    history: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        """Prompt positions + codes: what the request can ever hold in the cache."""
        return int(self.hidden.shape[1]) + 1 + self.sampling.max_tokens


class SpeechBatcher(EngineLoop):
    """Continuous batching over `decoder` (a `vitaserve.models.tts.SpeechDecoder`); see the module
    docstring. start=False: the caller drives `step()` (unit tests)."""

    def __init__(
        self,
        decoder: Any,
        config: SpeechBatchConfig | None = None,
        *,
        start: bool = True,
        name: str = "speech-engine",
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.config = config or SpeechBatchConfig()
        cfg = decoder.cfg
        self.heads = cfg.attention_heads
        self.head_dim = cfg.attention_dim // cfg.attention_heads
        self.n_layers = len(decoder.layers)
        weight = decoder.embedding.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.sos_id, self.eos_id = cfg.sos_id, cfg.eos_id
        self.max_batch_seen = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._rows = 0  # buffer rows; running request i holds row i (rows are kept compact)
        self._capacity = 0
        self._ids = itertools.count(1)
        if start:
            self._start(name)

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one position takes over all layers."""
        return (
            2 * self.n_layers * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        )

    # ---- submission (any thread) -------------------------------------------------------------------

    def submit(
        self,
        hidden: torch.Tensor,
        sampling: CodeSampling,
        sink: CodeSink,
        *,
        generator: torch.Generator | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> SpeechHandle:
        """Queue one segment: `hidden` = `decoder.text_to_hidden(...)`, (1, N, idim). Raises InvalidInput
        for a bad segment or one that could never fit the KV budget, ResourceExhausted if the queue is
        full, Unavailable once the batcher is closed."""
        hidden = self.decoder._check_hidden(hidden)
        if hidden.shape[0] != 1:
            raise InvalidInput(f"a speech request is one utterance (batch 1), got batch {hidden.shape[0]}")
        odim = self.decoder.cfg.odim
        if sampling.max_tokens < 0:
            raise InvalidInput(f"max_tokens must be >= 0, got {sampling.max_tokens}")
        if not 1 <= sampling.top_k <= odim + 1:
            raise InvalidInput(f"top_k must be in [1, {odim + 1}], got {sampling.top_k}")
        if sampling.penalty_window > 0 and not sampling.penalty > 0:
            raise InvalidInput(f"penalty must be > 0, got {sampling.penalty}")
        need = int(hidden.shape[1]) + 1 + sampling.max_tokens
        if _pow2(need) > self.config.kv_positions:
            raise InvalidInput(
                f"the segment needs {need} speech-decoder positions ({hidden.shape[1] + 1} prompt + up to "
                f"{sampling.max_tokens} codes) but this instance's KV budget is {self.config.kv_positions} "
                f"positions: split the text into shorter segments"
            )
        with self._cv:
            if self._closed:
                raise Unavailable("the speech engine is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise ResourceExhausted(
                    f"speech synthesis is at capacity: {len(self._waiting)} segments already wait for a "
                    f"batch slot (max_queue {self.config.max_queue}); retry shortly"
                )
            handle = SpeechHandle(self, next(self._ids))
            request = _Request(
                handle.id, hidden.to(self.device), sampling, generator, sink, is_cancelled, handle
            )
            self._waiting.append(request)
            self._cv.notify()
        return handle

    def stats(self) -> dict[str, int]:
        with self._cv:
            waiting = len(self._waiting)
        return {
            "running": len(self._running),
            "waiting": waiting,
            "rows": self._rows,
            "capacity": self._capacity,
            "steps": self.steps,
        }

    # ---- the engine thread ---------------------------------------------------------------------------

    failure = "the speech engine failed; see the server log"
    unloading = "speech_synth is unloading"

    def step(self) -> bool:
        """One scheduling step (see the module docstring); False if there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            self._release_buffers()
            return False
        self.steps += 1
        self._decode()
        if not self._running:
            self._release_buffers()
        return True

    def _admit(self) -> None:
        for _ in range(self.config.prompts_per_step):
            if len(self._running) >= self.config.max_batch:
                return
            with self._cv:
                if not self._waiting:
                    return
                request = self._waiting[0]
            if not self._running:
                self._release_buffers()  # (cancellations may just have emptied the batch) start from scratch
            rows = max(self._rows, _pow2(len(self._running) + 1))
            rows = min(rows, _pow2(self.config.max_batch))
            capacity = max(self._capacity, _pow2(max(request.positions, _MIN_CAPACITY)))
            if rows * capacity > self.config.kv_positions:
                if self._running:
                    return  # FIFO: the head waits for running segments to finish
                rows = 1  # alone it always fits (checked at submit)
            with self._cv:
                self._waiting.popleft()
            try:
                kv = self.decoder.prompt_kv(request.hidden)
                self._grow(rows, capacity)
            except Exception as exc:  # noqa: BLE001 - fail this request, keep serving the others
                self._finish(request, "error", _internal(exc))
                continue
            request.row = len(self._running)
            request.length = int(kv[0][0].shape[2])
            for layer, (k, v) in enumerate(kv):
                self._keys[layer][request.row, :, : request.length] = k[0]
                self._values[layer][request.row, :, : request.length] = v[0]
            request.history = [self.sos_id]
            request.state = _RUNNING
            request.handle.admitted_step = self.steps
            self._running.append(request)
            if request.sampling.max_tokens == 0:
                self._finish(request, "length")

    def _grow(self, rows: int, capacity: int) -> None:
        if rows <= self._rows and capacity <= self._capacity:
            return
        rows, capacity = max(rows, self._rows), max(capacity, self._capacity)
        shape = (rows, self.heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        n, width = len(self._running), max((r.length for r in self._running), default=0)
        for layer in range(len(self._keys)):
            keys[layer][:n, :, :width] = self._keys[layer][:n, :, :width]
            values[layer][:n, :, :width] = self._values[layer][:n, :, :width]
        self._keys, self._values, self._rows, self._capacity = keys, values, rows, capacity

    def _release_buffers(self) -> None:
        self._keys, self._values, self._rows, self._capacity = [], [], 0, 0

    def _decode(self) -> None:
        batch = list(self._running)
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        tokens = torch.tensor([r.history[-1] for r in batch], device=self.device)
        positions = torch.tensor([r.length for r in batch], device=self.device)
        try:
            logits = self.decoder.decode_batch(tokens, positions, self._keys, self._values)
        except Exception as exc:  # noqa: BLE001
            err = _internal(exc)
            for request in batch:
                self._finish(request, "error", err)
            return
        for request in batch:  # every row's new key/value is in its cache now (before any row moves)
            request.length += 1
            request.handle.peak_batch = max(request.handle.peak_batch, len(batch))
        chosen = self._choose_plain(batch, logits)
        for i, request in enumerate(batch):
            s = request.sampling
            code = chosen.get(i)
            if code is None:  # a repetition penalty: the row's own scores first
                code = self.decoder.choose_code(
                    logits[i],
                    request.history,
                    top_k=s.top_k,
                    greedy=s.greedy,
                    generator=request.generator,
                    penalty_window=s.penalty_window,
                    penalty=s.penalty,
                )
            if code == self.eos_id:
                self._finish(request, "stop")
                continue
            request.history.append(code)
            request.handle.codes += 1
            try:
                request.sink.on_code(code)
            except Exception as exc:  # noqa: BLE001 - a broken sink ends its own request only
                self._finish(request, "error", _internal(exc))
                continue
            if len(request.history) - 1 >= s.max_tokens:
                self._finish(request, "length")

    def _choose_plain(self, batch: list[_Request], logits: torch.Tensor) -> dict[int, int]:
        """The codes of the rows without a repetition penalty, by row index: what `choose_code` gives each
        row alone, computed for all such rows at once (greedy: one argmax; sampled: one softmax / top-k /
        renormalisation per top-k value, then each row's draw from its own generator)."""
        scores = logits.masked_fill(self.decoder._blocked(logits.device), float("-inf"))
        chosen: dict[int, int] = {}
        greedy = [i for i, r in enumerate(batch) if r.sampling.greedy and r.sampling.penalty_window <= 0]
        if greedy:
            ids = torch.argmax(scores[greedy], dim=-1).tolist()  # first maximal index, as alone
            chosen.update(zip(greedy, ids))
        by_k: dict[int, list[int]] = {}
        for i, r in enumerate(batch):
            if not r.sampling.greedy and r.sampling.penalty_window <= 0:
                by_k.setdefault(r.sampling.top_k, []).append(i)
        for k, rows in by_k.items():
            kept = top_k_distribution(scores[rows], k)  # the distribution `choose_code` draws from, per row
            for j, i in enumerate(rows):
                chosen[i] = int(torch.multinomial(kept[j], 1, generator=batch[i].generator))
        return chosen

    def _finish(self, request: _Request, reason: str, error: VitaserveError | None = None) -> None:
        if request.state == _DONE:
            return
        if request.state == _RUNNING:
            self._vacate(request)
        request.state = _DONE
        handle = request.handle
        handle.finish_reason, handle.finished_step = reason, self.steps
        try:
            request.sink.on_finish(reason, error)
        except Exception:  # noqa: BLE001 - nothing more can be told to a broken sink
            traceback.print_exc()

    def _vacate(self, request: _Request) -> None:
        """Take a running request out; the last row moves into its row, so rows 0..B-1 stay in use."""
        row = request.row
        last = self._running.pop()
        if last is not request:
            self._running[row] = last
            for layer in range(self.n_layers):
                self._keys[layer][row, :, : last.length] = self._keys[layer][last.row, :, : last.length]
                self._values[layer][row, :, : last.length] = self._values[layer][last.row, :, : last.length]
            last.row = row
        request.row = -1


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _internal(exc: BaseException) -> VitaserveError:
    if isinstance(exc, VitaserveError):
        return exc
    traceback.print_exception(exc)
    return VitaserveError(f"speech_synth failed: {type(exc).__name__}: {exc}")
