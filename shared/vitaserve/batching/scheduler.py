"""`BatchEngine`: continuous batching of LLM generation requests over one model instance.

Requests come from any thread (`submit`); one engine thread runs steps. A step:

1. drops cancelled requests (their handle's `cancel()`, or their `is_cancelled()` poll: Triton's
   cancellation) and frees their KV blocks at once;
2. admits waiting requests in FIFO order while the batch has room (`max_batch`) and the KV pool can hold
   their worst case (prompt + max_tokens), evicting least recently used session prefixes if needed;
   a request whose session left a matching prefix reuses those blocks (see `prefix_cache`);
3. prefills at most `prefill_chunk` prompt rows over all new requests (chunked: a long prompt spans several
   steps), so the streams already running never wait long for a new prompt; the pieces of all new
   requests go through one padded forward;
4. runs one decode forward for every running request together (one new token each), then samples each
   row with that request's own settings: greedy argmax, or temperature / top-k / top-p with the request's
   own seeded generator (so a request's ids do not depend on its batch mates).

Each request keeps its own positions and its own KV slots, and the attention mask hides other rows'
padding, so a row computes what it would compute alone (greedy ids are identical; float32 results can
differ from a lone run only by the rounding of different matrix shapes).

Back-pressure: `submit` raises `ResourceExhausted` (retryable) once `max_queue` requests wait, and
`InvalidInput` for a request that could never fit the KV budget. Memory never grows past the pool: there
is no allocation after admission. Results go to the request's `TokenSink` from the engine thread
(`on_token` per id, then exactly one `on_finish`), which must hand them on quickly.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from vitaserve.batching.engine_loop import EngineLoop, Handle, config_from_parameters
from vitaserve.batching.kv_cache import KVPool, PagedView, kv_bytes_per_token
from vitaserve.batching.prefix_cache import PrefixCache
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable, VitaserveError
from vitaserve.models.llm import SamplingParams, sample_token

_WAITING, _PREFILL, _DECODE, _DONE = "waiting", "prefill", "decode", "done"


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine (Triton: the llm_decoder config.pbtxt `parameters`).

    kv_cache_tokens: the KV-cache budget in tokens (all requests and cached prefixes together).
    kv_cache_bytes: if > 0, the budget in bytes instead (converted with the model's layers, KV heads,
        head size and dtype).
    kv_block_size: tokens per KV block (the allocation unit).
    max_batch: requests decoded together in one step; more wait in the queue.
    max_queue: requests waiting for admission; beyond it `submit` raises ResourceExhausted.
    prefill_chunk: prompt rows prefilled per step over all new requests.
    prefix_cache: keep finished sessions' KV blocks for their next turn.
    """

    kv_cache_tokens: int = 65536
    kv_cache_bytes: int = 0
    kv_block_size: int = 16
    max_batch: int = 32
    max_queue: int = 64
    prefill_chunk: int = 512
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_cache_tokens", "kv_block_size", "max_batch", "prefill_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0 or self.kv_cache_bytes < 0:
            raise ValueError(f"max_queue and kv_cache_bytes must be >= 0, got {self.max_queue}, "
                             f"{self.kv_cache_bytes}")

    def budget_tokens(self, model_config: Any, dtype: torch.dtype) -> int:
        """The KV budget in tokens for this model (from kv_cache_bytes when set)."""
        if self.kv_cache_bytes > 0:
            return self.kv_cache_bytes // kv_bytes_per_token(model_config, dtype)
        return self.kv_cache_tokens

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> EngineConfig:
        """Read the fields from string parameters (config.pbtxt); empty or missing = the default.
        Raises ValueError naming the bad parameter."""
        return config_from_parameters(cls, params)


class TokenSink(Protocol):
    """Where a request's results go; called on the engine thread."""

    def on_token(self, token_id: int) -> None: ...

    def on_finish(self, reason: str, error: VitaserveError | None) -> None:
        """Exactly once: reason 'stop' | 'length' | 'cancelled' | 'error' (then `error` is set)."""


@dataclass(eq=False)
class _Request:
    id: int
    embeds: torch.Tensor          # (L, H) prompt rows, media spliced
    keys: np.ndarray              # (L,) prefix-cache keys of those rows
    params: SamplingParams
    sink: TokenSink
    session_id: str
    is_cancelled: Callable[[], bool] | None
    handle: RequestHandle
    generator: torch.Generator | None = None
    state: str = _WAITING
    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None   # slot of every position up to prompt + max_tokens
    n_cached: int = 0                   # positions held in the KV cache
    generated: list[int] = field(default_factory=list)
    last_token: int | None = None       # sampled and sent, not yet in the cache

    @property
    def prompt_len(self) -> int:
        return int(self.embeds.shape[0])


class RequestHandle(Handle):
    """What `submit` returns (see `Handle`), with the request's prompt and prefix-reuse counts."""

    def __init__(self, engine: BatchEngine, request_id: int) -> None:
        super().__init__(engine, request_id)
        self.reused_tokens = 0  # prompt positions taken from the session's cached prefix
        self.prompt_tokens = 0  # prompt positions (set at submit)


class BatchEngine(EngineLoop):
    """Continuous batching over `model` (a `vitaserve.models.llm.VitaLLM`); see the module docstring.

    start: run the engine thread (False: the caller drives `step()`, as unit tests do).
    after_step: called on the engine thread after every step (e.g. to hand that step's responses to
        sender threads at once rather than waking them once per token).
    """

    def __init__(self, model: Any, config: EngineConfig | None = None, *, start: bool = True,
                 name: str = "llm-engine", after_step: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config or EngineConfig()
        self._after_step_fn = after_step
        self.max_positions = int(model.config.max_position_embeddings)
        budget = self.config.budget_tokens(model.config, model.dtype)
        self.pool = KVPool(model.config, budget, block_size=self.config.kv_block_size,
                           dtype=model.dtype, device=model.device)
        self.prefix = PrefixCache(self.pool)
        self.max_batch_seen = 0
        self._ids = itertools.count(1)
        if start:
            self._start(name)

    # ---- submission (any thread) -------------------------------------------------------------------

    def submit(self, embeds: torch.Tensor, keys: np.ndarray, params: SamplingParams, sink: TokenSink, *,
               session_id: str = "", is_cancelled: Callable[[], bool] | None = None) -> RequestHandle:
        """Queue one request: `embeds` (L, H) prompt rows, `keys` their prefix-cache keys (L,).
        Raises InvalidInput if it can never fit, ResourceExhausted if the queue is full, Unavailable
        once the engine is closed."""
        length = int(embeds.shape[0])
        if embeds.dim() != 2 or length == 0 or len(keys) != length:
            raise InvalidInput(f"prompt rows must be a non-empty (L, H) tensor with L keys, got "
                               f"{tuple(embeds.shape)} and {len(keys)} keys")
        total = length + params.max_new_tokens
        if total > self.max_positions:
            raise InvalidInput(f"context too long: {length} prompt positions + max_tokens "
                               f"{params.max_new_tokens} exceed the model's {self.max_positions}")
        if self.pool.blocks_for(total) > self.pool.n_blocks:
            raise InvalidInput(f"the request needs {total} KV-cache tokens ({length} prompt positions + max_tokens "
                               f"{params.max_new_tokens}) but this model instance's budget is "
                               f"{self.pool.capacity_tokens} tokens: shorten the prompt or lower max_tokens")
        with self._cv:
            if self._closed:
                raise Unavailable("the LLM engine is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise ResourceExhausted(
                    f"the LLM decoder is at capacity: {len(self._waiting)} requests already wait for KV-cache "
                    f"space or a batch slot (max_queue {self.config.max_queue}); retry shortly")
            handle = RequestHandle(self, next(self._ids))
            handle.prompt_tokens = length
            request = _Request(handle.id, embeds.to(device=self.model.device, dtype=self.model.dtype), keys,
                               params, sink, session_id, is_cancelled, handle)
            if params.seed is not None and params.temperature > 0:
                request.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
            self._waiting.append(request)
            self._cv.notify()
        return handle

    def stats(self) -> dict[str, int]:
        with self._cv:
            waiting = len(self._waiting)
        return {"running": len(self._running), "waiting": waiting, "free_blocks": self.pool.free_blocks,
                "total_blocks": self.pool.n_blocks, "cached_sessions": len(self.prefix),
                "cached_blocks": self.prefix.blocks, "steps": self.steps}

    # ---- the engine thread ---------------------------------------------------------------------------

    failure = "the LLM engine failed; see the server log"
    unloading = "the LLM decoder is unloading"

    def _after_step(self) -> None:
        if self._after_step_fn is not None:
            self._after_step_fn()

    def _on_closed(self) -> None:
        self.prefix.clear()

    def step(self) -> bool:
        """One scheduling step (see the module docstring); False if there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        self.steps += 1
        decoding = [r for r in self._running if r.state == _DECODE]
        self._prefill()
        if decoding:
            self._decode(decoding)
        return True

    # ---- scheduling ----------------------------------------------------------------------------------

    def _admit(self) -> None:
        sessions = {r.session_id for r in self._running if r.session_id}
        while len(self._running) < self.config.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                request = self._waiting[0]
            sid = request.session_id if self.config.prefix_cache and request.session_id not in sessions else ""
            reuse = self.prefix.match(sid, request.keys) if sid else 0
            need = self.pool.blocks_for(request.prompt_len + request.params.max_new_tokens)
            own = self.prefix.held(sid) if sid else 0
            if need > self.pool.free_blocks + self.prefix.evictable(exclude=sid) + own:
                return  # FIFO: the head waits for running requests to free blocks
            blocks = self.prefix.take(sid, reuse) if sid in self.prefix else []
            extra = need - len(blocks)
            self.prefix.evict_until(extra)
            blocks += self.pool.allocate(extra)
            request.blocks = blocks
            request.slots = self.pool.slots(blocks, 0, request.prompt_len + request.params.max_new_tokens)
            request.n_cached = reuse
            request.state = _PREFILL
            request.handle.admitted_step = self.steps
            request.handle.reused_tokens = reuse
            with self._cv:
                self._waiting.popleft()
            self._running.append(request)
            if request.session_id:
                sessions.add(request.session_id)

    def _prefill(self) -> None:
        """Prefill at most `prefill_chunk` prompt rows over the new requests, in one padded forward (a
        request that fails alone in it would fail the others: on an error each piece is retried alone)."""
        budget = self.config.prefill_chunk
        pieces: list[tuple[_Request, int, int]] = []
        for request in [r for r in self._running if r.state == _PREFILL]:
            if budget <= 0:
                break
            start = request.n_cached
            n = min(request.prompt_len - start, budget)
            budget -= n
            pieces.append((request, start, start + n))
        if not pieces:
            return
        if len(pieces) == 1:
            self._prefilled(pieces, self._prefill_alone(pieces[0]))
            return
        try:
            logits = self._prefill_forward(pieces)
        except Exception:  # noqa: BLE001 - find the request that fails, keep serving the others
            for piece in pieces:
                self._prefilled([piece], self._prefill_alone(piece))
            return
        self._prefilled(pieces, logits)

    def _prefill_alone(self, piece: tuple[_Request, int, int]) -> torch.Tensor | None:
        try:
            return self._prefill_forward([piece])
        except Exception as exc:  # noqa: BLE001 - fail this request only
            self._finish(piece[0], "error", _internal(exc))
            return None

    def _prefilled(self, pieces: list[tuple[_Request, int, int]], logits: torch.Tensor | None) -> None:
        if logits is None:
            return
        for b, (request, _, stop) in enumerate(pieces):
            request.n_cached = stop
            if stop == request.prompt_len:
                request.state = _DECODE
                self._emit(request, self._sample(request, logits[b]))

    def _prefill_forward(self, pieces: list[tuple[_Request, int, int]]) -> torch.Tensor:
        """One forward over prompt rows start..stop-1 of each piece's request: rows padded to the longest
        piece (B, q), each at its own positions, reading its own slots 0..stop-1 under a causal mask;
        padded rows write to the scratch slot and attend to position 0 only. Returns the logits of each
        piece's last row (B, V)."""
        device = self.model.device
        b, q = len(pieces), max(stop - start for _, start, stop in pieces)
        width = max(stop for _, _, stop in pieces)
        hidden = pieces[0][0].embeds.shape[1]
        rows = torch.zeros(b, q, hidden, dtype=self.model.dtype, device=device)
        positions = torch.zeros(b, q, dtype=torch.long, device=device)
        write = torch.full((b, q), self.pool.scratch, dtype=torch.long, device=device)
        read = torch.full((b, width), self.pool.scratch, dtype=torch.long, device=device)
        mask = torch.zeros(b, 1, q, width, dtype=torch.bool, device=device)
        mask[:, :, :, 0] = True  # padded query rows attend to something (no NaN); their output is unused
        last = []
        for i, (request, start, stop) in enumerate(pieces):
            n = stop - start
            rows[i, :n] = request.embeds[start:stop]
            positions[i, :n] = torch.arange(start, stop, device=device)
            write[i, :n] = request.slots[start:stop]
            read[i, :stop] = request.slots[:stop]
            mask[i, 0, :n, :stop] = torch.arange(stop, device=device)[None, :] <= positions[i, :n][:, None]
            last.append(n - 1)
        view = PagedView(self.pool, write.reshape(-1), read)
        return self._forward(rows, positions, view, mask, last=torch.tensor(last, device=device))

    def _decode(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if r.state == _DECODE]
        if not batch:
            return
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        device = self.model.device
        ids = torch.tensor([r.last_token for r in batch], device=device)
        lengths = [r.n_cached + 1 for r in batch]
        width = max(lengths)
        read = torch.full((len(batch), width), self.pool.scratch, dtype=torch.long, device=device)
        for i, (r, n) in enumerate(zip(batch, lengths)):
            read[i, :n] = r.slots[:n]
        write = torch.stack([r.slots[r.n_cached] for r in batch])
        positions = torch.tensor([r.n_cached for r in batch], device=device)[:, None]
        mask = (torch.arange(width, device=device)[None, :]
                < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]   # (B, 1, 1, width)
        rows = self.model.model.embed_tokens(ids)[:, None, :]
        try:
            logits = self._forward(rows, positions, PagedView(self.pool, write, read), mask)
        except Exception as exc:  # noqa: BLE001
            err = _internal(exc)
            for request in batch:
                self._finish(request, "error", err)
            return
        greedy = torch.argmax(logits, dim=-1).tolist()  # first maximal index: ties -> lowest id
        for i, request in enumerate(batch):
            request.n_cached += 1
            request.last_token = None
            token = greedy[i] if request.params.temperature == 0 else self._sample(request, logits[i])
            self._emit(request, token)

    def _forward(self, rows: torch.Tensor, positions: torch.Tensor, view: PagedView,
                 mask: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """(B, q, H) rows at `positions` (B, q) -> float32 logits (B, V) of each row's position `last`
        (B,), default the last one."""
        with torch.inference_mode():
            # a 4-D boolean mask is taken as it is (Qwen2 and Llama alike): each row sees only its own slots
            out = self.model.model(inputs_embeds=rows, attention_mask=mask,
                                   position_ids=positions, cache=view, use_cache=True)
            hidden = out.last_hidden_state
            picked = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0]), last]
            return self.model.lm_head(picked).float()

    def _sample(self, request: _Request, logits: torch.Tensor) -> int:
        return sample_token(logits, request.params, request.generator)

    def _emit(self, request: _Request, token: int) -> None:
        if token in request.params.stop_ids:
            self._finish(request, "stop")
            return
        request.generated.append(token)
        try:
            request.sink.on_token(token)
        except Exception as exc:  # noqa: BLE001 - a broken sink ends its own request only
            self._finish(request, "error", _internal(exc))
            return
        if len(request.generated) >= request.params.max_new_tokens:
            self._finish(request, "length")
        else:
            request.last_token = token

    def _finish(self, request: _Request, reason: str, error: VitaserveError | None = None) -> None:
        if request.state == _DONE:
            return
        was_running = request.state != _WAITING
        request.state = _DONE
        if request in self._running:
            self._running.remove(request)
        if was_running:
            if error is None and self.config.prefix_cache and request.session_id and request.n_cached > 0:
                fed = np.asarray(request.generated, dtype=np.int64)
                keys = np.concatenate([request.keys, fed])[:request.n_cached]
                self.prefix.put(request.session_id, keys, request.blocks)
            else:
                self.pool.release(request.blocks)
            request.blocks = []
        handle = request.handle
        handle.finish_reason, handle.finished_step = reason, self.steps
        try:
            request.sink.on_finish(reason, error)
        except Exception:  # noqa: BLE001 - nothing more can be told to a broken sink
            traceback.print_exc()


def _internal(exc: BaseException) -> VitaserveError:
    if isinstance(exc, VitaserveError):
        return exc
    traceback.print_exception(exc)
    return VitaserveError(f"llm_decoder failed: {type(exc).__name__}: {exc}")


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (tests and shutdown paths)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
