"""Routing cost and stability: how long `Router.pick` takes (session affinity on the hash ring, and
round-robin), and which share of sessions moves when the LLM pool scales from N to N+1 pods.

    .venv/bin/python bench/routing.py [--sessions 20000] [--picks 200000] [--max-pods 16] [--json]

Numbers go in the issue notes, not in tests (tests/cluster/test_routing.py asserts the ~1/(N+1) bound).
"""

from __future__ import annotations

import argparse
import json
import time

from vitaserve.cluster.discovery import Endpoint, StaticDiscovery
from vitaserve.cluster.routing import HashRing, Router


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--picks", type=int, default=200000)
    parser.add_argument("--max-pods", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sessions = [f"session-{i}" for i in range(args.sessions)]

    pods = [Endpoint(f"llm-{i}", f"10.0.0.{i + 1}", 8001) for i in range(8)]
    router = Router(StaticDiscovery({"llm_decoder": pods, "vision_encoder": pods}))
    started = time.perf_counter()
    for i in range(args.picks):
        router.pick("llm_decoder", affinity=sessions[i % len(sessions)])
    affinity_us = (time.perf_counter() - started) / args.picks * 1e6
    started = time.perf_counter()
    for _ in range(args.picks):
        router.pick("vision_encoder")
    round_robin_us = (time.perf_counter() - started) / args.picks * 1e6

    moves = []
    for n in range(1, args.max_pods):
        before = HashRing([f"llm-{i}" for i in range(n)])
        after = HashRing([f"llm-{i}" for i in range(n + 1)])
        moved = sum(before.lookup(s) != after.lookup(s) for s in sessions) / len(sessions)
        moves.append({"pods": f"{n}->{n + 1}", "moved": round(moved, 4), "ideal": round(1 / (n + 1), 4)})

    result = {"pick_affinity_us": round(affinity_us, 2), "pick_round_robin_us": round(round_robin_us, 2),
              "scale_up_moves": moves}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"pick with affinity (8 pods): {affinity_us:.2f} us   round-robin: {round_robin_us:.2f} us")
    for m in moves:
        print(f"  {m['pods']:>7} pods: {m['moved']:.1%} of sessions moved (ideal {m['ideal']:.1%})")


if __name__ == "__main__":
    main()
