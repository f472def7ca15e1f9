"""vitaserve.resources, on this very process and real children and sockets: RSS and fds move when memory
and files are taken, children are found by parent pid, a TCP connection's remote port is seen; and the
trend rule flags clear growth, never a flat series, a one-fd jitter or noise."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

from vitaserve.resources import child_pids, open_fds, rss_bytes, tcp_peer_ports, trend

pytestmark = [pytest.mark.unit]


def test_rss_and_fds_of_a_live_process_and_gone_processes() -> None:
    before_rss, before_fds = rss_bytes(os.getpid()), open_fds(os.getpid())
    block = bytearray(64 * 1024 * 1024)  # touched: resident
    block[::4096] = b"x" * len(block[::4096])
    files = [open(os.devnull) for _ in range(5)]  # noqa: SIM115 - closed below
    try:
        assert rss_bytes(os.getpid()) >= before_rss + 48 * 1024 * 1024
        assert open_fds(os.getpid()) == before_fds + 5
    finally:
        for f in files:
            f.close()
        del block
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        rss_bytes(child.pid)
    with pytest.raises(ProcessLookupError):
        open_fds(child.pid)


def test_children_and_tcp_peers() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids(os.getpid())
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        before = tcp_peer_ports(os.getpid()).count(port)
        with socket.create_connection(("127.0.0.1", port)):
            assert tcp_peer_ports(os.getpid()).count(port) == before + 1


def test_trend_flags_clear_growth_only() -> None:
    rng = random.Random(0)
    times = [5.0 * i for i in range(60)]  # five minutes, a sample every 5 s
    growing = [300 + 2.0 * t / 60 + rng.gauss(0, 0.5) for t in times]  # +2 MB/min on 300 MB
    fitted = trend(times, growing)
    assert fitted.flagged and 1.8 < fitted.slope_per_min < 2.2
    assert not trend(times, [68.0] * 60).flagged  # flat
    jitter = [16.0 + (i % 7 == 0) for i in range(60)]  # an fd that comes and goes
    assert not trend(times, jitter).flagged
    step = [16.0] * 40 + [17.0] * 20  # one more fd for good: growth of one unit, not a trend
    assert not trend(times, step).flagged
    noise = [300 + rng.gauss(0, 5) for _ in times]
    assert not trend(times, noise).flagged
    small = [300 + 0.2 * t / 60 for t in times]  # clear but tiny: 1 MB over 5 min on 300 MB (< 2 %)
    assert not trend(times, small).flagged
    shrinking = [300 - 2.0 * t / 60 for t in times]
    assert not trend(times, shrinking).flagged and trend(times, shrinking).slope_per_min < 0
