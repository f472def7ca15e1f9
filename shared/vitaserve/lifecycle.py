"""Programs that start other processes (the demo, benchmarks, launchers) stop them on SIGINT and SIGTERM.

Triton and the orchestrator run in sessions of their own (so a Ctrl-C in a terminal reaches only the
program that owns them), which means the default action of SIGTERM — dying on the spot — would orphan
them. `stop_on_signals()` turns the first SIGINT or SIGTERM into a `Terminated` exception in the main
thread instead: it unwinds whatever runs there (an `asyncio.run` conversation included: its tasks are
cancelled), so every `with LocalStack(...)` / `with TritonServer(...)` on the way stops its processes,
and the program exits with 128 + the signal number. Later signals are ignored while that cleanup runs
(it takes seconds: Triton stops in ~3 s), so a second Ctrl-C cannot interrupt it halfway.

    def main() -> int:
        with stop_on_signals():
            with LocalStack(...) as stack:
                ...
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):  # noqa: N818 - a KeyboardInterrupt, not an error a caller handles
    """A SIGINT or SIGTERM arrived; `exit_code` is 128 + its number. A KeyboardInterrupt because asyncio
    lets exactly those (and SystemExit) escape from inside a task straight out of the event loop; any
    other exception raised in a task would wait in it until someone awaits the task."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise(signum: int, _frame: object) -> None:
    for sig in SIGNALS:  # the cleanup that this exception starts must not be interrupted in turn
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active (in the main thread), SIGINT/SIGTERM raise `Terminated`; on leaving, the previous
    handlers come back. Catch `Terminated` at the program's top to exit with its `exit_code`."""
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_main(main: object, *args: object) -> int:
    """Call `main(*args)` under `stop_on_signals()`; a signal ends it with 128 + the signal number once
    everything it started has stopped."""
    try:
        with stop_on_signals():
            return main(*args)  # type: ignore[operator]
    except Terminated as exc:
        return exc.exit_code
