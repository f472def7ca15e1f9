"""Which Triton endpoint serves a call: a consistent-hash ring for session affinity, round-robin otherwise.

The LLM keeps a session's KV cache on the pod that served its previous turn, so every LLM call of a session
goes to the same pod while that pod is ready. A consistent-hash ring with virtual nodes gives that and
survives scaling: adding an (N+1)-th pod moves only the ~1/(N+1) sessions that now hash onto it, removing a
pod moves only its own sessions. Stateless calls (encoders, speech) are spread round-robin.

`Router` is the seam `TritonComponents` calls once per request (`pick(component, affinity=...)`); it reads
the ready endpoints from a `Discovery` (static list or Kubernetes EndpointSlices, see `discovery.py`) and
excludes endpoints whose model the last health check found not ready.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import threading
from collections.abc import Iterable, Sequence

from vitaserve.cluster.discovery import Discovery, Endpoint
from vitaserve.errors import Unavailable

DEFAULT_VNODES = 160  # per endpoint: the load spread is within ~10% of even for a handful of pods


def _hash(key: str) -> int:
    # blake2b, not hash(): stable across processes, so every orchestrator replica routes a session the same.
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """An immutable consistent-hash ring over endpoint names with `vnodes` points per endpoint."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.nodes = tuple(sorted(set(nodes)))
        points = sorted((_hash(f"{node}#{i}"), node) for node in self.nodes for i in range(vnodes))
        self._keys = [point for point, _ in points]
        self._owners = [node for _, node in points]

    def lookup(self, key: str) -> str:
        """The node owning `key`: the first ring point clockwise of the key's hash."""
        if not self._keys:
            raise LookupError("the ring is empty")
        i = bisect.bisect(self._keys, _hash(key)) % len(self._keys)
        return self._owners[i]

    def __len__(self) -> int:
        return len(self.nodes)


class Router:
    """Picks the endpoint of each call from a `Discovery`.

    pick(component, affinity=key): the ring's endpoint for `key` among the usable endpoints (same key, same
        endpoint, as long as it stays usable); without a key, round-robin.
    Usable = ready in discovery and not marked unhealthy by `set_health` (the last model-readiness check).
    When every ready endpoint is marked unhealthy, all ready ones are used: a stale health mark must not
    turn a recovering component into a hard outage.
    Thread-safe: discovery updates arrive from watcher threads.
    """

    def __init__(self, discovery: Discovery, *, vnodes: int = DEFAULT_VNODES) -> None:
        self.discovery = discovery
        self.vnodes = vnodes
        self._lock = threading.Lock()
        self._rings: dict[str, tuple[tuple[Endpoint, ...], HashRing]] = {}
        self._counters: dict[str, itertools.count[int]] = {}
        self._unhealthy: set[tuple[str, str]] = set()  # (component, endpoint url)

    @property
    def components(self) -> tuple[str, ...]:
        return self.discovery.components

    def endpoints(self, component: str) -> tuple[Endpoint, ...]:
        """Ready endpoints of `component` according to discovery (health marks not applied)."""
        return self.discovery.endpoints(component)

    def usable(self, component: str) -> tuple[Endpoint, ...]:
        ready = self.discovery.endpoints(component)
        with self._lock:
            healthy = tuple(e for e in ready if (component, e.url) not in self._unhealthy)
        return healthy or ready

    def close(self) -> None:
        """Stop the discovery (its watcher threads); the router owns it."""
        self.discovery.stop()

    def set_health(self, component: str, url: str, ready: bool) -> None:
        with self._lock:
            (self._unhealthy.discard if ready else self._unhealthy.add)((component, url))

    def pick(self, component: str, *, affinity: str = "") -> Endpoint:
        endpoints = self.usable(component)
        if not endpoints:
            raise Unavailable(f"{component}: no ready Triton endpoint ({self.discovery.describe(component)})")
        if affinity:
            return self._ring_pick(component, endpoints, affinity)
        with self._lock:
            counter = self._counters.setdefault(component, itertools.count())
            return endpoints[next(counter) % len(endpoints)]

    def _ring_pick(self, component: str, endpoints: Sequence[Endpoint], key: str) -> Endpoint:
        endpoints = tuple(sorted(endpoints))
        with self._lock:
            cached = self._rings.get(component)
            if cached is None or cached[0] != endpoints:  # rebuilt only when the endpoint set changes
                cached = (endpoints, HashRing((e.name for e in endpoints), self.vnodes))
                self._rings[component] = cached
        by_name = {e.name: e for e in endpoints}
        return by_name[cached[1].lookup(key)]

