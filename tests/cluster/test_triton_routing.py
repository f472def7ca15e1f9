"""Routing through real Triton servers: two `tritonserver`s each loading only llm_decoder (tiny checkpoint),
reached through a static list and through Kubernetes discovery (the API emulator's EndpointSlices point at
them). A session's generate calls land on one server; when its pod turns unready they move, the others
stay. `vitaserve cluster status` shows the pods and their model readiness."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_emulator import KubeEmulator, endpoint_slice, eventually

from vitaserve.cluster import cli
from vitaserve.cluster.discovery import KubernetesDiscovery
from vitaserve.cluster.routing import HashRing, Router
from vitaserve.components.base import GenerationParams
from vitaserve.components.triton import TritonComponents
from vitaserve.models.prompt import build_prompt
from vitaserve.triton.backend import ENV_CHECKPOINT_DIR
from vitaserve.triton.launcher import TritonServer
from vitaserve.triton.repository import CHECKED_IN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "vita"
SESSIONS = [f"sess-{i}" for i in range(8)]
PARAMS = GenerationParams(max_tokens=2, seed=0)


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonServer]]:
    root = tmp_path_factory.mktemp("routing")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_CHECKPOINT_DIR, str(tiny_checkpoint))
        found = [TritonServer(CHECKED_IN, models=["llm_decoder"], log_path=root / f"triton-{i}.log",
                              startup_timeout=180) for i in range(2)]
        errors: list[BaseException] = []

        def start(server: TritonServer) -> None:
            try:
                server.start()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in found]  # both boot at once
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    try:
        assert not errors, errors
        yield found
    finally:
        stoppers = [threading.Thread(target=s.stop) for s in found]  # each takes seconds to unload
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


def served_by(servers: list[TritonServer], request_id: str) -> int:
    """Index of the server whose llm_decoder logged `request_id`."""
    pattern = re.compile(rf"llm_decoder request_id='{re.escape(request_id)}' ")

    def find() -> list[int]:
        return [i for i, s in enumerate(servers) if pattern.search(s.log_path.read_text(errors="replace"))]

    hits = eventually(find, what=f"log line of {request_id}")
    assert len(hits) == 1, hits
    return hits[0]


async def turns(client: TritonComponents, tag: str) -> None:
    prompt = build_prompt([], "Hello")
    for session in SESSIONS:
        for turn in range(2):
            async for _ in client.generate(prompt, [], PARAMS, request_id=f"{tag}-{session}-{turn}",
                                           session_id=session):
                pass


def test_static_list_keeps_each_session_on_one_server(servers: list[TritonServer]) -> None:
    urls = ",".join(s.grpc_url for s in servers)

    async def body() -> None:
        client = TritonComponents({"llm_decoder": urls}, components=["llm_decoder"])
        try:
            assert (await client.health()).all_ready
            await turns(client, "static")
        finally:
            await client.close()

    asyncio.run(body())
    placement = {s: {served_by(servers, f"static-{s}-{t}") for t in range(2)} for s in SESSIONS}
    assert all(len(where) == 1 for where in placement.values()), placement  # both turns on one server
    # each session is where the hash ring puts it (static mode: the ring's names are host:port), so the
    # sessions spread over both servers as the ring spreads them (not a chance check on 8 random ids)
    names = [s.grpc_url for s in servers]
    ring = HashRing(names)
    assert {s: names[next(iter(w))] for s, w in placement.items()} == {s: ring.lookup(s) for s in SESSIONS}
    spread = {ring.lookup(f"sess-{i}") for i in range(64)}
    assert spread == set(names)


def test_an_unreachable_endpoint_is_failed_over_and_avoided(servers: list[TritonServer]) -> None:
    dead = f"127.0.0.1:{_free_port()}"  # listed, but nothing serves there (a pod gone since the last update)

    async def body() -> None:
        client = TritonComponents({"llm_decoder": f"{dead},{servers[0].grpc_url}"}, components=["llm_decoder"])
        try:
            await turns(client, "failover")  # no health check first: the first call to `dead` fails over
            assert [e.url for e in client.router.usable("llm_decoder")] == [servers[0].grpc_url]
            health = await client.endpoint_health()
            assert health["llm_decoder"] == {dead: False, servers[0].grpc_url: True}
        finally:
            await client.close()

    asyncio.run(body())
    assert all(served_by(servers, f"failover-{s}-{t}") == 0 for s in SESSIONS for t in range(2))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slices(servers: list[TritonServer], ready: tuple[bool, bool]) -> list[dict]:
    # one slice per pod: the two local servers listen on different ports (in a cluster they share one)
    return [endpoint_slice("triton-llm", f"triton-llm-{i}", [(f"llm-{i}", "127.0.0.1", ready[i])],
                           namespace=NS, port=int(s.grpc_url.rsplit(":", 1)[1]))
            for i, s in enumerate(servers)]


def test_kubernetes_discovery_routes_sessions_and_moves_them_off_an_unready_pod(
    servers: list[TritonServer],
) -> None:
    with KubeEmulator() as kube:
        for obj in _slices(servers, (True, True)):
            kube.apply(obj)
        discovery = KubernetesDiscovery({"llm_decoder": "triton-llm"}, namespace=NS,
                                        api_client=kube.api_client(), backoff_s=(0.05, 0.2))
        discovery.start()
        assert discovery.wait_synced(5)
        client = TritonComponents(router=Router(discovery), components=["llm_decoder"])

        async def phase(tag: str) -> None:
            await turns(client, tag)

        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(client.health()).all_ready
            loop.run_until_complete(phase("k8s1"))
            before = {s: served_by(servers, f"k8s1-{s}-1") for s in SESSIONS}
            assert all(served_by(servers, f"k8s1-{s}-0") == before[s] for s in SESSIONS)
            assert set(before.values()) == {0, 1}
            # pod llm-0 fails its readiness probe: its sessions move to llm-1, llm-1's stay
            kube.apply(_slices(servers, (False, True))[0])
            eventually(lambda: [e.name for e in discovery.endpoints("llm_decoder")] == ["llm-1"])
            loop.run_until_complete(phase("k8s2"))
            assert all(served_by(servers, f"k8s2-{s}-0") == 1 for s in SESSIONS)
            # llm-0 is ready again: every session is back where it was (its KV cache is there)
            kube.apply(_slices(servers, (True, True))[0])
            eventually(lambda: len(discovery.endpoints("llm_decoder")) == 2)
            loop.run_until_complete(phase("k8s3"))
            assert {s: served_by(servers, f"k8s3-{s}-0") for s in SESSIONS} == before
        finally:
            loop.run_until_complete(client.close())  # stops the discovery too
            loop.close()


def test_cluster_status_shows_pods_and_model_readiness(servers: list[TritonServer], capsys) -> None:
    with KubeEmulator() as kube:
        for obj in _slices(servers, (True, True)):
            kube.apply(obj)
        # a third pod is ready for Kubernetes but nothing serves the model there
        kube.apply(endpoint_slice("triton-llm", "triton-llm-x", [("llm-dead", "127.0.0.1", True)],
                                  namespace=NS, port=_free_port()))
        kube.apply(endpoint_slice("triton-vision", "triton-vision-0", [], namespace=NS))
        args = ["status", "--namespace", NS, "--service", "llm_decoder=triton-llm"]
        assert cli.main(args, api_client=kube.api_client()) == 0
        out = capsys.readouterr().out
        assert "llm_decoder: READY (Service triton-llm in namespace vita)" in out
        assert re.search(r"llm-0 +127\.0\.0\.1:\d+ +model ready", out)
        assert re.search(r"llm-1 +127\.0\.0\.1:\d+ +model ready", out)
        assert re.search(r"llm-dead +127\.0\.0\.1:\d+ +model NOT ready", out)
        # a component without a ready pod: exit code 1
        args += ["--service", "vision_encoder=triton-vision", "--json"]
        assert cli.main(args, api_client=kube.api_client()) == 1
        out = capsys.readouterr().out
        assert '"vision_encoder": {' in out and '"pods": []' in out
    assert cli.main(["status", "--url", "nope=1.2.3.4:5"]) == 2
    assert "COMPONENT=VALUE" in capsys.readouterr().err


def test_the_dashboards_triton_metrics_exist(servers: list[TritonServer]) -> None:
    """The Grafana dashboard's Triton queries name metrics a real tritonserver exports (GPU ones aside)."""
    import json
    import urllib.request

    dashboard = Path(__file__).parents[2] / "helm" / "vitaserve" / "dashboards" / "vitaserve.json"
    exprs = " ".join(t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"])
    wanted = set(re.findall(r"\b(nv_[a-z_]+)", exprs)) - {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
    with urllib.request.urlopen(servers[0].metrics_url, timeout=5) as response:
        exported = set(re.findall(r"^(nv_[a-z_]+)", response.read().decode(), re.MULTILINE))
    assert wanted and wanted <= exported, wanted - exported
