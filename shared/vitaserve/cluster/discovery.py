"""Where each component's Triton servers are: a static list, or the ready pods of a Kubernetes Service.

- `StaticDiscovery`: `host:port[,host:port...]` per component (docker-compose, a fixed fleet, tests). Every
  listed endpoint counts as ready; model readiness is checked by `TritonComponents.health()`.
- `KubernetesDiscovery`: one `EndpointSliceWatcher` per Service. It lists the Service's EndpointSlices
  (`discovery.k8s.io/v1`, label `kubernetes.io/service-name=<service>`), then watches from the list's
  resourceVersion, applying ADDED / MODIFIED / DELETED and BOOKMARK events. A watch that ends (server
  timeout) resumes from the last resourceVersion; `410 Gone` (the version was compacted away) relists;
  any other error reconnects with capped exponential backoff. Until reconnected, the last known endpoints
  stay in use: a short API-server outage must not take routing down.

An endpoint is ready when its `conditions.ready` is true or unset (the API's documented reading of nil).
The kubelet sets it from the pod's readiness probe, which for Triton pods is `/v2/health/ready`.
The watcher runs the synchronous `kubernetes` client in a daemon thread per Service (it blocks on the
stream). It reads the watch response itself rather than through `kubernetes.watch.Watch`, whose `stop()`
cannot interrupt a blocked plain-HTTP read with urllib3 2 (the socket is not reachable from the
connection object while streaming); `stop()` here shuts the response down, so the thread ends at once.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, order=True)
class Endpoint:
    """One Triton server of a component. `name` identifies it on the hash ring: the pod name in Kubernetes
    (a restarted pod is a new name, as its KV cache is gone too), `host:port` in static mode."""

    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 pod addresses
        return f"{host}:{self.port}"


def parse_endpoints(spec: str) -> tuple[Endpoint, ...]:
    """`host:port[,host:port...]` -> endpoints (duplicates dropped, order kept). Raises ValueError."""
    endpoints: dict[str, Endpoint] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint must be host:port, got {item!r} (in {spec!r})")
        endpoint = Endpoint(item, host, int(port))
        endpoints.setdefault(endpoint.url, endpoint)
    if not endpoints:
        raise ValueError(f"no endpoint in {spec!r}")
    return tuple(endpoints.values())


class Discovery(ABC):
    """The ready endpoints of each component."""

    components: tuple[str, ...]

    @abstractmethod
    def endpoints(self, component: str) -> tuple[Endpoint, ...]:
        """Ready endpoints of `component`, in a stable order (empty when none is ready)."""

    @abstractmethod
    def describe(self, component: str) -> str:
        """Where the endpoints of `component` come from (for error messages and `vitaserve cluster`)."""

    def start(self) -> None:
        """Begin following changes (no-op for a static list)."""

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once every source has been read at least once."""
        return True

    def stop(self) -> None:
        """Stop following changes and release connections."""


class StaticDiscovery(Discovery):
    """Fixed endpoints: `{component: "host:port[,host:port]" | [Endpoint, ...]}`."""

    def __init__(self, endpoints: Mapping[str, str | Sequence[Endpoint]]) -> None:
        self._endpoints = {
            component: parse_endpoints(spec) if isinstance(spec, str) else tuple(spec)
            for component, spec in endpoints.items()
        }
        self.components = tuple(self._endpoints)

    def endpoints(self, component: str) -> tuple[Endpoint, ...]:
        return self._endpoints.get(component, ())

    def describe(self, component: str) -> str:
        listed = ",".join(e.url for e in self._endpoints.get(component, ())) or "none"
        return f"static list {listed}"


# ---------------------------------------------------------------------------------------------------
# Kubernetes


def slice_endpoints(obj: Mapping[str, Any], port_name: str) -> tuple[Endpoint, ...]:
    """Ready endpoints of one EndpointSlice (a JSON dict) on the port named `port_name` (or the slice's
    only port when none has that name)."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
    if port is None and len(ports) == 1:
        port = ports[0].get("port")
    if not port:
        if obj.get("endpoints"):
            log.warning("EndpointSlice %s has no port named %r: ignored",
                        obj.get("metadata", {}).get("name"), port_name)
        return ()
    found = []
    for endpoint in obj.get("endpoints") or []:  # the API sends null for a slice without endpoints
        ready = (endpoint.get("conditions") or {}).get("ready")
        addresses = endpoint.get("addresses") or []
        if ready is False or not addresses:
            continue
        ref = endpoint.get("targetRef") or {}
        name = ref.get("name") if ref.get("kind", "Pod") == "Pod" and ref.get("name") else addresses[0]
        found.append(Endpoint(name, addresses[0], int(port)))
    return tuple(sorted(found))


class WatchError(Exception):
    """An ERROR event inside a watch stream (the server's Status)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class EndpointSliceWatcher:
    """Follows the EndpointSlices of one Service (see the module docstring). `on_change(endpoints)` is
    called from the watcher thread after every change of the ready set."""

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        service: str,
        port_name: str = "grpc",
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.2, 10.0),
        on_change: Callable[[tuple[Endpoint, ...]], None] | None = None,
    ) -> None:
        from kubernetes import client

        self.api = client.DiscoveryV1Api(api_client)
        self.namespace = namespace
        self.service = service
        self.port_name = port_name
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.on_change = on_change
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.relists = 0  # how often the watcher listed from scratch (first list included)
        self._slices: dict[str, tuple[Endpoint, ...]] = {}
        self._ready: tuple[Endpoint, ...] = ()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._response: Any = None  # the open watch response, shut down by stop()
        self._thread: threading.Thread | None = None

    @property
    def selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.service}"

    def endpoints(self) -> tuple[Endpoint, ...]:
        with self._lock:
            return self._ready

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"endpointslices-{self.service}", daemon=True)
            self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end without waiting (`stop` waits)."""
        self._stopping.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks the read in the watcher thread (urllib3 >= 2.3)
            except Exception:  # noqa: BLE001 - already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the loop (watcher thread) -------------------------------------------------------------

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = self.backoff_s[0]
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch_once()
                delay = self.backoff_s[0]  # a watch that ended normally (server timeout): resume at once
            except (ApiException, WatchError) as exc:
                if exc.status == 410:  # our resourceVersion was compacted away: start over from a list
                    log.info("EndpointSlices of %s: resourceVersion %s expired, relisting",
                             self.service, self.resource_version)
                    need_list = True
                    continue
                need_list = need_list or exc.status in (401, 403, 404)
                delay = self._backoff(f"HTTP {exc.status} {exc.reason}", delay)
            except Exception as exc:  # noqa: BLE001 - connection errors, timeouts: reconnect
                if self._stopping.is_set():
                    break
                delay = self._backoff(repr(exc), delay)

    def _backoff(self, why: str, delay: float) -> float:
        log.warning("EndpointSlices of %s in %s: %s; retrying in %.1f s", self.service, self.namespace, why, delay)
        self._stopping.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, self.backoff_s[1])

    def _list(self) -> None:
        response = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=self.request_timeout_s,
        )
        body = json.loads(response.data)
        self.relists += 1
        slices = {item["metadata"]["name"]: slice_endpoints(item, self.port_name) for item in body.get("items") or []}
        with self._lock:
            self._slices = slices
        self.resource_version = body["metadata"]["resourceVersion"]
        self._publish()
        self.synced.set()

    def _watch_once(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        response = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, watch=True, resource_version=self.resource_version,
            allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s, _preload_content=False,
            # The read timeout outlasts the server-side watch timeout, so a silent stream means trouble.
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + self.request_timeout_s),
        )
        self._response = response
        try:
            if self._stopping.is_set():
                return
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":  # a Status object: 410 Expired, or another failure
                    status = event.get("object") or {}
                    raise WatchError(int(status.get("code") or 500), status.get("reason", ""),
                                     status.get("message", ""))
                self._apply(event["type"], event.get("object") or {})
        finally:
            self._response = None
            response.release_conn()

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = meta.get("name", "")
        with self._lock:
            if kind == "DELETED":
                self._slices.pop(name, None)
            elif kind in ("ADDED", "MODIFIED"):
                self._slices[name] = slice_endpoints(obj, self.port_name)
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            merged: dict[str, Endpoint] = {}
            for endpoints in self._slices.values():  # a pod may appear in two slices while they are rebalanced
                for endpoint in endpoints:
                    merged.setdefault(endpoint.name, endpoint)
            ready = tuple(sorted(merged.values()))
            changed = ready != self._ready
            self._ready = ready
        if changed:
            log.info("%s: %d ready endpoint(s): %s", self.service, len(ready),
                     ", ".join(f"{e.name}={e.url}" for e in ready) or "none")
            if self.on_change is not None:
                self.on_change(ready)


class KubernetesDiscovery(Discovery):
    """The ready pods of one Service per component, from its EndpointSlices.

    services: component -> Service name (several components may share one Service).
    api_client: a `kubernetes.client.ApiClient`; default: in-cluster config (service account) inside a
        pod, else the kubeconfig (`~/.kube/config` or $KUBECONFIG).
    """

    def __init__(
        self,
        services: Mapping[str, str],
        *,
        namespace: str,
        api_client: Any = None,
        port_name: str = "grpc",
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.components = tuple(services)
        self.namespace = namespace
        self.services = dict(services)
        self.api_client = api_client if api_client is not None else default_api_client()
        self.watchers = {
            service: EndpointSliceWatcher(
                self.api_client, namespace=namespace, service=service, port_name=port_name,
                watch_timeout_s=watch_timeout_s, request_timeout_s=request_timeout_s, backoff_s=backoff_s,
            )
            for service in dict.fromkeys(self.services.values())
        }

    def endpoints(self, component: str) -> tuple[Endpoint, ...]:
        service = self.services.get(component)
        return self.watchers[service].endpoints() if service else ()

    def describe(self, component: str) -> str:
        return f"Service {self.services.get(component, '?')} in namespace {self.namespace}"

    def start(self) -> None:
        for watcher in self.watchers.values():
            watcher.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return all(w.synced.wait(timeout) for w in self.watchers.values())

    def stop(self) -> None:
        for watcher in self.watchers.values():
            watcher.request_stop()  # all at once, so no backoff sleep of one delays the others
        for watcher in self.watchers.values():
            watcher.stop()
        close = getattr(self.api_client, "close", None)
        if close is not None:
            close()


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (from its service account), else `default`."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or default
    except OSError:
        return default


def default_api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ApiClient from the pod's service account when running in a cluster, else from kubeconfig."""
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                persist_config=False)
    return client.ApiClient(configuration)

