"""Oversized HTTP requests, written on a raw socket (an HTTP client library would refuse to send them), and
the check that a listener refuses each and then still serves."""

from __future__ import annotations

import socket
import urllib.request

# Request heads no listener of ours may take: a 1 MB header line, a 1 MB request line, 100,000 headers (1 MB).
# Over 256 kB each: the gateway's bound (h11) applies to a head still incomplete after a socket read, so a
# head between its 64 KiB and one read (asyncio reads up to 256 kB) may pass; these never can.
OVERSIZE = {
    "header line": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    "request line": b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header count": b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)) + b"\r\n",
}


def status_of(port: int, request: bytes, timeout_s: float = 20.0) -> int:
    """The HTTP status the listener on 127.0.0.1:`port` answers `request` with (0: it closed the connection
    without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything: the status may still be there
        reply = b""
        try:
            while b"\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def assert_refused_and_still_serving(port: int, path: str, *, scheme: str = "http") -> dict[str, int]:
    """Each of `OVERSIZE` gets a 4xx; then `path` still answers 200. Returns what each got."""
    got = {name: status_of(port, request) for name, request in OVERSIZE.items()}
    assert all(400 <= code < 500 for code in got.values()), got
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=10) as reply:
        assert reply.status == 200
    return got
