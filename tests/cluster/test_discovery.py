"""`KubernetesDiscovery` with the real `kubernetes` client against the API emulator (`kube_emulator.py`):
ready / unready / removed pods, other Services ignored, resume from resourceVersion, 410 Gone, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kube_emulator import KubeEmulator, endpoint_slice, eventually

from vitaserve.cluster.discovery import KubernetesDiscovery

pytestmark = pytest.mark.integration

NS = "vita"


def names(discovery: KubernetesDiscovery, component: str = "llm_decoder") -> list[str]:
    return [e.name for e in discovery.endpoints(component)]


@pytest.fixture
def discovery(kube: KubeEmulator) -> Iterator[KubernetesDiscovery]:
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x1", [("llm-a", "10.1.0.1", True),
                                                              ("llm-b", "10.1.0.2", False)], namespace=NS))
    kube.apply(endpoint_slice("triton-vision", "triton-vision-x1", [("vis-a", "10.2.0.1", True)], namespace=NS))
    # same Service name in another namespace: must not leak in
    kube.apply(endpoint_slice("triton-llm", "triton-llm-other", [("llm-z", "10.9.0.1", True)], namespace="other"))
    found = KubernetesDiscovery(
        {"llm_decoder": "triton-llm", "vision_encoder": "triton-vision", "speech_synth": "triton-llm"},
        namespace=NS, api_client=kube.api_client(), watch_timeout_s=30, backoff_s=(0.05, 0.2),
    )
    found.start()
    assert found.wait_synced(5)
    try:
        yield found
    finally:
        started = time.monotonic()
        found.stop()
        assert time.monotonic() - started < 2.0, "stop() must not wait for the watch to time out"


def test_follows_pods_becoming_ready_unready_and_removed(kube: KubeEmulator, discovery) -> None:
    assert names(discovery) == ["llm-a"] and names(discovery, "vision_encoder") == ["vis-a"]
    assert names(discovery, "speech_synth") == ["llm-a"]  # components sharing one Service
    assert discovery.endpoints("llm_decoder")[0].url == "10.1.0.1:8001"
    # llm-b passes its readiness probe
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x1", [("llm-a", "10.1.0.1", True),
                                                              ("llm-b", "10.1.0.2", True)], namespace=NS))
    eventually(lambda: names(discovery) == ["llm-a", "llm-b"], what="llm-b ready")
    # a scale-up lands in a second slice; its endpoint has no ready condition yet (nil reads as ready)
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x2", [("llm-c", "10.1.0.3", None)], namespace=NS))
    eventually(lambda: names(discovery) == ["llm-a", "llm-b", "llm-c"], what="llm-c added")
    # llm-a terminates (unready), then the second slice goes away
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x1", [("llm-a", "10.1.0.1", False),
                                                              ("llm-b", "10.1.0.2", True)], namespace=NS))
    eventually(lambda: names(discovery) == ["llm-b", "llm-c"], what="llm-a unready")
    kube.delete(NS, "triton-llm-x2")
    eventually(lambda: names(discovery) == ["llm-b"], what="slice removed")
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x1", [], namespace=NS))  # endpoints: null
    eventually(lambda: names(discovery) == [], what="no pods")
    assert names(discovery, "vision_encoder") == ["vis-a"]  # untouched throughout
    assert discovery.watchers["triton-llm"].relists == 1  # all of it from one list + one watch


def test_resumes_from_resource_version_and_relists_after_410(kube: KubeEmulator, discovery) -> None:
    watcher = discovery.watchers["triton-llm"]
    # the stream breaks (API server restart): the watcher resumes from its last version, no relist
    last = watcher.resource_version
    kube.drop_watches()
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x2", [("llm-c", "10.1.0.3", True)], namespace=NS))
    eventually(lambda: names(discovery) == ["llm-a", "llm-c"], what="change seen after reconnect")
    resumed = [r for r in kube.requests if r.get("watch") == "true" and "triton-llm" in r["labelSelector"]]
    assert resumed[-1]["resourceVersion"] == last and watcher.relists == 1
    # the watcher falls behind while the history is compacted: 410 Gone -> list from scratch
    kube.fail_next(1)  # its next reconnect fails (HTTP 500), so it is still behind after the compaction
    kube.drop_watches()
    kube.delete(NS, "triton-llm-x2")
    kube.compact()
    eventually(lambda: watcher.relists == 2, what="relist after 410")
    eventually(lambda: names(discovery) == ["llm-a"], what="state after relist")


def test_bookmarks_advance_the_resource_version(kube: KubeEmulator, discovery) -> None:
    watcher = discovery.watchers["triton-llm"]
    before = watcher.resource_version
    eventually(lambda: kube.open_watches() == 2, what="both watches open")  # bookmarks reach open watches
    # another Service changes: the store's version moves, our stream sees no event of it
    version = kube.apply(endpoint_slice("unrelated", "unrelated-1", [("u", "10.3.0.1", True)], namespace=NS))
    kube.bookmark()
    eventually(lambda: watcher.resource_version == version, what="bookmark")
    assert int(version) > int(before) and names(discovery) == ["llm-a"]


def test_api_errors_keep_the_last_endpoints_and_recover(kube: KubeEmulator, discovery) -> None:
    kube.fail_next(3, status=503)
    kube.drop_watches()
    time.sleep(0.1)
    assert names(discovery) == ["llm-a"]  # stale but usable while the API server is unavailable
    kube.apply(endpoint_slice("triton-llm", "triton-llm-x1", [("llm-b", "10.1.0.2", True)], namespace=NS))
    eventually(lambda: names(discovery) == ["llm-b"], what="recovery after errors")


def test_port_by_name() -> None:
    from vitaserve.cluster.discovery import slice_endpoints

    obj = endpoint_slice("s", "s-1", [("p", "10.0.0.1", True)], port=8001)
    obj["ports"] = [{"name": "http", "port": 8000}, {"name": "grpc", "port": 8001}]
    assert [e.url for e in slice_endpoints(obj, "grpc")] == ["10.0.0.1:8001"]
    assert slice_endpoints(obj, "metrics") == ()  # two ports, none named so: no guess
