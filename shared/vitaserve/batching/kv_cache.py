"""The paged KV-cache pool of one LLM instance and the per-forward view the Qwen2 layers use.

Memory: the pool holds `n_blocks · block_size` token slots per layer for keys and values, allocated once
when the engine starts, so the KV budget is a hard bound: a request is admitted only when the blocks for
its whole worst case (prompt + max_tokens) are free, and generation never allocates. Sequences own lists
of blocks; a token at position p of a sequence lives in slot `blocks[p // block_size] · block_size +
p % block_size`. One extra slot past the end (`scratch`) pads the read indices of shorter sequences in a
batch; what it holds is masked out.

`PagedView` is what a forward passes to the Hugging Face model as its `cache`: `Qwen2Attention` calls
`update(key, value, layer_idx)` once per layer with the new keys/values of the whole batch (B, kv_heads, q,
D); the view writes them into their slots with one `index_copy_` and returns every sequence's keys and
values gathered into (B, kv_heads, L_max, D) with one indexing op. The attention mask passed next to it
hides padding and future positions, so the model's own sdpa attention computes each row exactly as for a
sequence alone. (A fused paged-attention kernel would skip the gather; on the CPU the gather costs about
as much as reading the keys once more.)
"""

from __future__ import annotations

import math
from typing import Any

import torch


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the cache: keys and values of every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


class KVPool:
    """Fixed-size block pool for the keys and values of every layer.

    capacity_tokens: the budget in tokens (rounded down to whole blocks; at least one block).
    """

    def __init__(self, config: Any, capacity_tokens: int, *, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.n_blocks = capacity_tokens // block_size
        if self.n_blocks < 1:
            raise ValueError(f"the KV budget of {capacity_tokens} tokens is below one block of {block_size}")
        self.n_layers = int(config.num_hidden_layers)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.dtype = dtype
        self.device = torch.device(device)
        self.scratch = self.n_blocks * block_size  # the padding slot
        shape = (self.n_layers, self.scratch + 1, self.kv_heads, self.head_dim)
        # torch.empty: pages are committed by the OS as slots are first written; the size is the budget.
        self.keys = torch.empty(shape, dtype=dtype, device=self.device)
        self.values = torch.empty(shape, dtype=dtype, device=self.device)
        self._free = list(range(self.n_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def allocate(self, n_blocks: int) -> list[int]:
        """Take `n_blocks` free blocks; raises MemoryError (a scheduler bug: it checks first) if too few."""
        if n_blocks > len(self._free):
            raise MemoryError(f"KV pool: {n_blocks} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n_blocks)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """Slot indices of positions start..stop-1 of a sequence owning `blocks` (int64, on the pool's device)."""
        pos = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)


class PagedView:
    """The `cache` of one batched forward: write slots (B·q,) and read slots (B, L) into `pool`.

    Rows of `read_slots` shorter than L are padded with `pool.scratch`; the forward's attention mask must
    hide them. Implements the one method of transformers' Cache protocol that Qwen2 layers call.
    """

    def __init__(self, pool: KVPool, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        self.pool = pool
        self.write_slots = write_slots
        self.read_slots = read_slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, q, d = key_states.shape
        k_layer, v_layer = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        k_layer.index_copy_(0, self.write_slots, key_states.transpose(1, 2).reshape(b * q, h, d).to(k_layer.dtype))
        v_layer.index_copy_(0, self.write_slots, value_states.transpose(1, 2).reshape(b * q, h, d).to(v_layer.dtype))
        keys = k_layer[self.read_slots].transpose(1, 2)    # (B, kv_heads, L, D)
        values = v_layer[self.read_slots].transpose(1, 2)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers asks only without position_ids
        return int(self.read_slots.shape[1])
