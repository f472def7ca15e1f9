"""Reuse of a session's KV cache across its turns.

A multi-turn prompt repeats the whole conversation, so turn n+1 starts with (most of) what turn n already
ran through the model. When a request finishes, the engine keeps its KV blocks here under its SESSION_ID
together with the keys of the positions they hold; the session's next request reuses the longest common
prefix and prefills only the rest.

Reuse must be exact: a position's keys/values depend on every earlier input row, so a prefix is valid only
if every earlier row is the same. `sequence_keys` gives one int64 per row of the spliced sequence: the token
id for text rows, and for the rows of a media placeholder a negative key derived from a 64-bit BLAKE2b digest
of that media's float32 bytes and the row index. A different image, or the same image in another place,
therefore breaks the match at its first row.

At least the last prompt row is always recomputed (its logits give the first new token). Entries are kept
in LRU order; the scheduler evicts the least recently used ones when a new request needs their blocks, so
reuse never reduces the budget available to new sessions. One entry per session: a request that finds no
usable prefix (or whose session has another request running) prefills from scratch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vitaserve.batching.kv_cache import KVPool
from vitaserve.models.configs import AUDIO_TOKEN_ID, IMAGE_TOKEN_ID

_KEY_MASK = np.uint64(2**62 - 1)
_ROW_STRIDE = np.uint64(0x9E3779B97F4A7C15)  # odd: consecutive rows of one medium get distinct keys


def media_keys(rows: np.ndarray) -> np.ndarray:
    """Keys (negative int64) of the rows of one media array (n, H) as it is spliced (float32)."""
    arr = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
    digest = hashlib.blake2b(arr.tobytes(), digest_size=8, person=b"vitaserve-kv")
    digest.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
    base = np.frombuffer(digest.digest(), dtype=np.uint64)[0]
    with np.errstate(over="ignore"):
        mixed = (base + np.arange(arr.shape[0], dtype=np.uint64) * _ROW_STRIDE) & _KEY_MASK
    return -1 - mixed.astype(np.int64)


def sequence_keys(ids: Sequence[int], media: Sequence[np.ndarray]) -> np.ndarray:
    """One key per row of the spliced sequence of `ids` (with -200/-500 placeholders) and `media` (one
    array per placeholder, in order): text ids unchanged (>= 0), media rows from `media_keys`."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    placeholders = np.nonzero((ids_arr == IMAGE_TOKEN_ID) | (ids_arr == AUDIO_TOKEN_ID))[0]
    if len(placeholders) != len(media):
        raise ValueError(f"{len(placeholders)} placeholders but {len(media)} media arrays")
    pieces, start = [], 0
    for pos, rows in zip(placeholders.tolist(), media):
        pieces += [ids_arr[start:pos], media_keys(rows)]
        start = pos + 1
    pieces.append(ids_arr[start:])
    return np.concatenate(pieces)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


@dataclass
class CachedPrefix:
    keys: np.ndarray   # keys of the positions the blocks hold, in order
    blocks: list[int]


class PrefixCache:
    """Session id -> the KV blocks of its last finished request, in LRU order, owning those blocks."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    @property
    def blocks(self) -> int:
        return sum(len(e.blocks) for e in self._entries.values())

    def put(self, session_id: str, keys: np.ndarray, blocks: list[int]) -> None:
        """Keep `blocks` (holding positions 0..len(keys)-1) for `session_id`, replacing its older entry.
        Blocks past the last held position go back to the pool."""
        self.drop(session_id)
        used = self.pool.blocks_for(len(keys))
        self.pool.release(blocks[used:])
        if used == 0:
            return
        self._entries[session_id] = CachedPrefix(np.asarray(keys, dtype=np.int64), blocks[:used])

    def match(self, session_id: str, keys: np.ndarray) -> int:
        """Positions of `keys` the session's entry can serve (0 if none); keeps the last row to compute."""
        entry = self._entries.get(session_id)
        if entry is None:
            return 0
        return min(common_prefix(entry.keys, keys), len(keys) - 1)

    def held(self, session_id: str) -> int:
        """Blocks the session's entry holds (0 if none)."""
        entry = self._entries.get(session_id)
        return len(entry.blocks) if entry is not None else 0

    def take(self, session_id: str, n_positions: int) -> list[int]:
        """Remove the session's entry and return the blocks holding its first `n_positions` positions
        (the caller now owns them); the rest go back to the pool."""
        entry = self._entries.pop(session_id)
        keep = self.pool.blocks_for(n_positions)
        self.pool.release(entry.blocks[keep:])
        return entry.blocks[:keep]

    def drop(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self.pool.release(entry.blocks)

    def evictable(self, exclude: str | None = None) -> int:
        """Blocks that evicting every entry but `exclude` would free."""
        return sum(len(e.blocks) for sid, e in self._entries.items() if sid != exclude)

    def evict_until(self, free_blocks: int, exclude: str | None = None) -> int:
        """Evict least recently used entries (never `exclude`) until the pool has `free_blocks` free;
        returns how many entries were evicted."""
        evicted = 0
        for sid in list(self._entries):
            if self.pool.free_blocks >= free_blocks:
                break
            if sid != exclude:
                self.drop(sid)
                evicted += 1
        return evicted

    def clear(self) -> None:
        for sid in list(self._entries):
            self.drop(sid)
