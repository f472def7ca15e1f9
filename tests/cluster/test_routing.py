"""The hash ring and the router: session affinity that survives scaling, round-robin, health marks."""

from __future__ import annotations

import pytest

from vitaserve.cluster.discovery import Endpoint, StaticDiscovery, parse_endpoints
from vitaserve.cluster.routing import HashRing, Router
from vitaserve.errors import Unavailable

pytestmark = pytest.mark.unit

SESSIONS = [f"session-{i}" for i in range(4000)]


def test_ring_keeps_keys_and_spreads_them() -> None:
    ring = HashRing([f"pod-{i}" for i in range(4)])
    owners = {key: ring.lookup(key) for key in SESSIONS}
    same = HashRing(reversed(ring.nodes))  # built from the nodes in another order (another replica)
    assert all(same.lookup(k) == v for k, v in owners.items())
    counts = {node: list(owners.values()).count(node) for node in ring.nodes}
    assert all(abs(c / len(SESSIONS) - 0.25) < 0.06 for c in counts.values()), counts


@pytest.mark.parametrize("n", [2, 4, 8])
def test_scale_up_moves_about_one_in_n_plus_one_and_only_to_the_new_pod(n: int) -> None:
    before = HashRing([f"pod-{i}" for i in range(n)])
    after = HashRing([f"pod-{i}" for i in range(n + 1)])
    moved = [k for k in SESSIONS if before.lookup(k) != after.lookup(k)]
    assert all(after.lookup(k) == f"pod-{n}" for k in moved)  # nothing shuffles between old pods
    share = len(moved) / len(SESSIONS)
    assert abs(share - 1 / (n + 1)) < 0.35 / (n + 1), share


def test_scale_down_moves_only_the_removed_pods_sessions() -> None:
    before = HashRing([f"pod-{i}" for i in range(5)])
    after = HashRing([f"pod-{i}" for i in range(5) if i != 2])
    for key in SESSIONS:
        if before.lookup(key) != "pod-2":
            assert after.lookup(key) == before.lookup(key)


def test_empty_ring_and_bad_vnodes() -> None:
    with pytest.raises(LookupError):
        HashRing([]).lookup("x")
    with pytest.raises(ValueError, match="vnodes"):
        HashRing(["a"], vnodes=0)


class MutableDiscovery(StaticDiscovery):
    """A static list the test edits (discovery's own tests use the real Kubernetes watcher)."""

    def set(self, component: str, endpoints: list[Endpoint]) -> None:
        self._endpoints[component] = tuple(endpoints)


def pods(*names: str) -> list[Endpoint]:
    return [Endpoint(name, f"10.0.0.{i + 1}", 8001) for i, name in enumerate(names)]


def test_router_affinity_follows_readiness() -> None:
    discovery = MutableDiscovery({"llm_decoder": pods("a", "b", "c")})
    router = Router(discovery)
    first = {s: router.pick("llm_decoder", affinity=s).name for s in SESSIONS[:300]}
    assert set(first.values()) == {"a", "b", "c"}
    assert all(router.pick("llm_decoder", affinity=s).name == p for s, p in first.items())
    # b becomes unready: only b's sessions move, and they come back when b is ready again
    discovery.set("llm_decoder", [e for e in pods("a", "b", "c") if e.name != "b"])
    during = {s: router.pick("llm_decoder", affinity=s).name for s in first}
    assert all(during[s] == p for s, p in first.items() if p != "b")
    assert "b" not in during.values()
    discovery.set("llm_decoder", pods("a", "b", "c"))
    assert {s: router.pick("llm_decoder", affinity=s).name for s in first} == first


def test_router_round_robin_health_marks_and_no_endpoint() -> None:
    discovery = MutableDiscovery({"vision_encoder": pods("a", "b"), "audio_encoder": []})
    router = Router(discovery)
    assert [router.pick("vision_encoder").name for _ in range(4)] == ["a", "b", "a", "b"]
    router.set_health("vision_encoder", "10.0.0.1:8001", False)  # a's model not ready
    assert {router.pick("vision_encoder").name for _ in range(4)} == {"b"}
    router.set_health("vision_encoder", "10.0.0.2:8001", False)  # none healthy: use every ready one
    assert {router.pick("vision_encoder").name for _ in range(4)} == {"a", "b"}
    router.set_health("vision_encoder", "10.0.0.1:8001", True)
    assert {router.pick("vision_encoder").name for _ in range(4)} == {"a"}
    with pytest.raises(Unavailable, match="audio_encoder: no ready Triton endpoint"):
        router.pick("audio_encoder")


def test_static_lists() -> None:
    assert [e.url for e in parse_endpoints("a:1, b:2,a:1,[::1]:3")] == ["a:1", "b:2", "[::1]:3"]
    for bad in ("", "a", "a:0", "a:x", ":1", "a:70000"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
