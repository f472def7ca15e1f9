"""A small Kubernetes API emulator for the EndpointSlice endpoints of `discovery.k8s.io/v1`, served over real
HTTP on a loopback port so the real `kubernetes` client talks to it unchanged.

Why our own: no API server runs here and none can be downloaded. PyPI's `kmock` 0.8 has a Kubernetes
emulator, but it answers every list with resourceVersion "...", replays all objects on every watch and has
no label selectors or `410 Gone`, which are exactly what discovery must get right.

What it implements, as kube-apiserver does:
- `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` with `labelSelector` (equality terms
  `k=v`, `k==v`, `k!=v`, comma-separated): an `EndpointSliceList` whose `metadata.resourceVersion` is the
  store's current version; every object carries its own `resourceVersion` (one global counter).
- the same path with `watch=true`: a chunked stream of JSON lines `{"type": ..., "object": ...}` with every
  change after `resourceVersion` (ADDED / MODIFIED / DELETED), then changes as they happen, until
  `timeoutSeconds`; no or "0" resourceVersion = synthetic ADDED for the current objects first. A version
  older than the compacted history gets `ERROR` with a `Status` of code 410 (reason Expired), as the real
  server does for a watch. `allowWatchBookmarks=true` streams BOOKMARK events sent with `bookmark()`.
- test controls: `apply` / `delete` objects, `compact()` the history, `drop_watches()` (cut every open
  stream, as a restarting API server does), `fail_next(n, status)` (the next n requests answer with a
  `Status` error), and `requests` (the query of every request) for assertions.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy (watch events arrive on another thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {result!r}"
        time.sleep(0.02)


def endpoint_slice(
    service: str,
    name: str,
    pods: Iterable[tuple[str, str, bool | None]],
    *,
    namespace: str = "default",
    port: int = 8001,
    port_name: str = "grpc",
) -> dict[str, Any]:
    """An EndpointSlice of `service` with endpoints (pod name, IP, ready); ready None = condition unset."""
    endpoints = []
    for pod, ip, ready in pods:
        conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": False}
        endpoints.append({"addresses": [ip], "conditions": conditions,
                          "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints or None,  # the API server sends null for a slice without endpoints
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class KubeEmulator:
    """The store and the HTTP server (see the module docstring). Use as a context manager."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 1
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, object), ascending
        self._compacted = 0  # versions <= this are gone from the history
        self._generation = 0  # bumped by drop_watches(): streams of older generations end
        self._failures: list[int] = []
        self._bookmarks = 0  # sequence number of the last bookmark
        self._open_watches = 0
        self.requests: list[dict[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api_client(self) -> Any:
        """A real `kubernetes.client.ApiClient` pointed at this emulator."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # ---- store ---------------------------------------------------------------------------------

    def apply(self, obj: Mapping[str, Any]) -> str:
        """Create or replace an object; returns its new resourceVersion."""
        obj = copy.deepcopy(dict(obj))
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._cond:
            self._version += 1
            meta["resourceVersion"] = str(self._version)
            kind = "MODIFIED" if key in self._objects else "ADDED"
            meta.setdefault("uid", f"uid-{meta['name']}")
            self._objects[key] = obj
            self._history.append((self._version, kind, copy.deepcopy(obj)))
            self._cond.notify_all()
            return meta["resourceVersion"]

    def delete(self, namespace: str, name: str) -> None:
        with self._cond:
            obj = self._objects.pop((namespace, name))
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._history.append((self._version, "DELETED", obj))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history up to now: a new watch from an older version gets 410 Gone. Open streams go
        on, as etcd compaction does not cut running watches."""
        with self._cond:
            self._compacted = self._version

    def drop_watches(self) -> None:
        """End every open watch stream (the client sees the connection close)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version to watches that allowed bookmarks."""
        with self._cond:
            self._bookmarks += 1
            self._history.append((self._version, "BOOKMARK", {"seq": self._bookmarks}))
            self._cond.notify_all()

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._cond:
            self._failures.extend([status] * count)

    def open_watches(self) -> int:
        """Watch streams being served right now."""
        with self._cond:
            return self._open_watches

    def watch_count(self) -> int:
        return sum(1 for r in self.requests if r.get("watch") in ("true", "1"))

    def list_count(self) -> int:
        return sum(1 for r in self.requests if r.get("watch") not in ("true", "1"))

    # ---- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                emulator._serve(self)

        return Handler

    def _send_json(self, handler: BaseHTTPRequestHandler, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append({"path": parts.path, **query})
        with self._cond:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            self._send_json(handler, failure, _status(failure, "InternalError", "injected failure"))
            return
        path = parts.path
        if not (path.startswith(PREFIX) and path.endswith("/endpointslices")):
            self._send_json(handler, 404, _status(404, "NotFound", f"the server could not find {path}"))
            return
        namespace = path[len(PREFIX):-len("/endpointslices")]
        selector = query.get("labelSelector", "")
        if query.get("watch") in ("true", "1"):
            self._watch(handler, namespace, selector, query)
        else:
            self._list(handler, namespace, selector)

    def _matches(self, obj: Mapping[str, Any], namespace: str, selector: str) -> bool:
        meta = obj.get("metadata", {})
        return meta.get("namespace") == namespace and _selector_matches(selector, meta.get("labels") or {})

    def _list(self, handler: BaseHTTPRequestHandler, namespace: str, selector: str) -> None:
        with self._cond:
            items = [copy.deepcopy(o) for o in self._objects.values() if self._matches(o, namespace, selector)]
            version = self._version
        self._send_json(handler, 200, {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                       "metadata": {"resourceVersion": str(version)}, "items": items})

    def _pending(self, since: int, bookmark_floor: int) -> list[tuple[int, str, dict[str, Any]]]:
        """History after `since` (and bookmarks after `bookmark_floor`); call with the lock held."""
        return [(rv, kind, copy.deepcopy(obj)) for rv, kind, obj in self._history
                if (obj["seq"] > bookmark_floor if kind == "BOOKMARK" else rv > since)]

    def _watch(self, handler: BaseHTTPRequestHandler, namespace: str, selector: str, query: dict[str, str]
               ) -> None:
        timeout = float(query.get("timeoutSeconds", "1800"))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv_text = query.get("resourceVersion", "")
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")  # a stream ends with its connection
        handler.end_headers()

        def send(event: Mapping[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        deadline = time.monotonic() + timeout
        try:
            with self._cond:
                generation = self._generation
                bookmark_floor = self._bookmarks  # only bookmarks sent from now on reach this stream
                self._open_watches += 1
                if rv_text in ("", "0"):
                    since = self._version
                    initial = [copy.deepcopy(o) for o in self._objects.values()
                               if self._matches(o, namespace, selector)]
                else:
                    since = int(rv_text)
                    initial = []
                    if since < self._compacted:
                        send({"type": "ERROR", "object": _status(
                            410, "Expired", f"too old resource version: {since} ({self._compacted})")})
                        return
            for obj in initial:
                send({"type": "ADDED", "object": obj})
            while True:
                with self._cond:
                    pending = self._pending(since, bookmark_floor)
                    while not pending and generation == self._generation and time.monotonic() < deadline:
                        self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                        pending = self._pending(since, bookmark_floor)
                    if generation != self._generation or (not pending and time.monotonic() >= deadline):
                        return
                for rv, kind, obj in pending:
                    if kind == "BOOKMARK":
                        bookmark_floor = obj["seq"]
                        if bookmarks:
                            send({"type": "BOOKMARK", "object": {
                                "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                "metadata": {"resourceVersion": str(rv)}}})
                        continue
                    since = rv
                    if self._matches(obj, namespace, selector):
                        send({"type": kind, "object": obj})
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with self._cond:
                self._open_watches -= 1
            try:
                handler.wfile.write(b"0\r\n\r\n")  # the end of the chunked body
                handler.wfile.flush()
            except OSError:
                pass
            handler.close_connection = True
