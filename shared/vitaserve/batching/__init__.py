"""Continuous batching for the LLM decoder: many sessions share each forward pass.

- `kv_cache`      the paged KV-cache pool (a fixed token budget split into blocks) and the view that lets the
                  Hugging Face Qwen2 layers write to and read from it for a whole batch in one call per layer
- `prefix_cache`  per-session reuse of an earlier turn's KV blocks (exact prefix match, LRU eviction)
- `scheduler`     `BatchEngine`: the queue, admission against the budget, the step loop (bounded prefill +
                  one batched decode step), sampling per request, cancellation, the engine thread

`vitaserve.components.engines.LLMEngine` prepares requests (tokenise, splice media) and submits them here;
the Triton `llm_decoder` adapter and the in-process client both go through it.
"""

from vitaserve.batching.kv_cache import KVPool
from vitaserve.batching.prefix_cache import PrefixCache, sequence_keys
from vitaserve.batching.scheduler import BatchEngine, EngineConfig, RequestHandle, TokenSink

__all__ = ["BatchEngine", "EngineConfig", "KVPool", "PrefixCache", "RequestHandle", "TokenSink", "sequence_keys"]
