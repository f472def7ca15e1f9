"""Resource use of running processes, read from /proc (Linux), and the trend of a sampled series.

Used by soak runs (bench/soak.py, tests/soak/) to watch for leaks while a stack serves load:

    rss_bytes(pid)                   resident set size (VmRSS)
    open_fds(pid)                    entries of /proc/PID/fd
    child_pids(pid)                  direct children (scanned from /proc/*/stat; no psutil dependency)
    tcp_peer_ports(pid)              remote ports of the process's TCP sockets (connections it holds to
                                     a server, e.g. a Redis connection pool, can be told from the rest)
    triton_model_processes(pid)      {model instance name: pid} of the Python-backend stubs of a
                                     tritonserver (each `triton_python_backend_stub` child runs one model
                                     instance, named on its command line, e.g. "llm_decoder_0_0")
    trend(times_s, values)           least-squares slope per minute with its standard error, first/last,
                                     and whether the slope is clearly above noise (`Trend.flagged`)

Readers raise `ProcessLookupError` when the process is gone (a /proc entry vanishes between listing and
reading), so a caller can tell "gone" from "zero".
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

PROC = Path("/proc")
STUB_NAME = "triton_python_backend_stub"
# The stub's argv (python_backend's stub_launcher): stub, model.py path, shm region, shm sizes, parent
# pid, libpython dir, IPC handle, model instance name, ...: the instance name is argv[8].
_STUB_INSTANCE_ARG = 8


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(str(path)) from exc


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` in bytes."""
    for line in _read(PROC / str(pid) / "status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0  # a zombie has no VmRSS line


def open_fds(pid: int) -> int:
    """Open file descriptors of `pid` (needs the same user, or root)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` that are alive (zombies left out)."""
    children = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name (which may hold spaces): state, ppid, ...
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            children.append(int(entry.name))
    return sorted(children)


def tcp_peer_ports(pid: int) -> list[int]:
    """The remote port of every TCP socket `pid` holds open (IPv4 and IPv6; listening sockets have 0)."""
    inodes = []
    try:
        fd_dir = PROC / str(pid) / "fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue  # closed while we looked
            if target.startswith("socket:["):
                inodes.append(target[8:-1])
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc
    peers: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = _read(PROC / str(pid) / "net" / table).splitlines()[1:]
        except ProcessLookupError:
            continue  # no IPv6 in this kernel
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            peers[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return [peers[inode] for inode in inodes if inode in peers]


def cmdline(pid: int) -> list[str]:
    raw = _read(PROC / str(pid) / "cmdline")
    return [arg for arg in raw.split("\0") if arg]


def triton_model_processes(triton_pid: int) -> dict[str, int]:
    """The Python-backend stub processes under `triton_pid`, by model instance name. A stub whose command
    line does not have the expected shape is named by its model folder (…/<model>/<version>/model.py)."""
    found: dict[str, int] = {}
    for child in child_pids(triton_pid):
        try:
            args = cmdline(child)
        except ProcessLookupError:
            continue
        if not args or Path(args[0]).name != STUB_NAME:
            continue
        if len(args) > _STUB_INSTANCE_ARG:
            name = args[_STUB_INSTANCE_ARG]
        else:
            name = Path(args[1]).parent.parent.name if len(args) > 1 else f"stub-{child}"
        while name in found:  # never merge two processes into one series
            name += "+"
        found[name] = child
    return found


@dataclass(frozen=True)
class Trend:
    """The least-squares line through a series. `slope_per_min` ± `stderr_per_min`; `flagged` when the
    slope is both statistically clear (more than `SIGMAS` standard errors above 0) and large enough to
    matter: over the fitted window it adds more than `rel_floor` of the series' mean and more than
    `abs_floor` (two units of a count: a line fitted through a one-unit step, e.g. one more pooled
    connection opened once, adds ~1.3), so a flat series with a jitter or a step of one fd is never
    flagged."""

    n: int
    first: float
    last: float
    mean: float
    slope_per_min: float
    stderr_per_min: float
    window_min: float
    flagged: bool

    SIGMAS = 3.0

    def as_dict(self, digits: int = 3) -> dict[str, float | int | bool]:
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


def trend(times_s: list[float], values: list[float], *, rel_floor: float = 0.02,
          abs_floor: float = 2.0) -> Trend:
    """Fit `values` against `times_s` (seconds) by least squares; see `Trend` for the flag rule."""
    if len(times_s) != len(values):
        raise ValueError("times and values differ in length")
    n = len(values)
    if n == 0:
        nan = float("nan")
        return Trend(0, nan, nan, nan, nan, nan, 0.0, False)
    mean_v = sum(values) / n
    if n < 3:
        return Trend(n, values[0], values[-1], mean_v, 0.0, float("inf"), 0.0, False)
    t = [x / 60.0 for x in times_s]
    mean_t = sum(t) / n
    sxx = sum((x - mean_t) ** 2 for x in t)
    if sxx == 0:
        return Trend(n, values[0], values[-1], mean_v, 0.0, float("inf"), 0.0, False)
    slope = sum((x - mean_t) * (y - mean_v) for x, y in zip(t, values)) / sxx
    residual = sum((y - mean_v - slope * (x - mean_t)) ** 2 for x, y in zip(t, values))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    window = t[-1] - t[0]
    growth = slope * window
    flagged = (slope > Trend.SIGMAS * stderr and growth > abs_floor and growth > rel_floor * abs(mean_v))
    return Trend(n, values[0], values[-1], mean_v, slope, stderr, window, flagged)
