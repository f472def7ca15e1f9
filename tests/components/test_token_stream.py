"""Unit test of `backend.TokenStream`'s adaptive coalescing, with a fake response sender.

`backend` builds responses through `triton_python_backend_utils`, which exists only inside Triton's stub:
a small fake module stands in for it here. The real path (many streams through real Triton give the
in-process results; one stream gets one token per response) is tested in test_triton_batching.py.
"""

from __future__ import annotations

import threading
import time
import types

import pytest

from vitaserve.errors import ResourceExhausted
from vitaserve.triton import backend

pytestmark = pytest.mark.unit

FINAL = 1


class FakeSender:
    """Records (response, flags)."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []
        self.done = threading.Event()
        self.polls = 0
        self.cancelled = False

    def send(self, response: object = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags == FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        self.polls += 1
        return self.cancelled


class FakeRequest:
    def __init__(self, sender: FakeSender, rid: str = "r") -> None:
        self.sender, self.rid = sender, rid

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def request_id(self) -> str:
        return self.rid


@pytest.fixture()
def pb(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    logs: list[str] = []
    logger = types.SimpleNamespace(log_info=logs.append, log_warn=logs.append, log_error=logs.append)

    class TritonError:
        INTERNAL, UNAVAILABLE, INVALID_ARG = "INTERNAL", "UNAVAILABLE", "INVALID_ARG"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    fake = types.SimpleNamespace(
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL, Logger=logger, TritonError=TritonError,
        InferenceResponse=lambda error: ("error", error.message), logs=logs)
    monkeypatch.setattr(backend, "_pb", lambda: fake)
    return fake


def build(ids: list[int], finish: str) -> tuple:
    return ("tokens", list(ids) + ([-1] if finish else []), finish)


def engine_steps(dispatcher: backend.ResponseDispatcher, stream: backend.TokenStream, n: int,
                 end: str = "length") -> None:
    """What the engine thread does: push a token per step, flush after each step, then finish."""
    for token in range(n):
        stream.push(token)
        dispatcher.flush()
    stream.finish(end) if end else None
    dispatcher.flush()


def run_on_engine_thread(fn) -> None:  # noqa: ANN001
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(10)


def busy_sender(dispatcher: backend.ResponseDispatcher) -> threading.Event:
    """Hold the (one) sender thread until the returned event is set: it is behind by then."""
    release = threading.Event()
    dispatcher.post(0, release.wait)
    return release


def test_a_sender_that_keeps_up_gets_one_token_per_response(pb) -> None:
    dispatcher = backend.ResponseDispatcher("m", threads=1)
    sender = FakeSender()
    stream = dispatcher.open_tokens(FakeRequest(sender), build)

    def engine() -> None:
        for token in range(5):
            stream.push(token)
            dispatcher.flush()
            while len(sender.sent) <= token:  # the engine's next step comes after the send (low load)
                time.sleep(0.0005)
        stream.finish("stop")
        dispatcher.flush()

    run_on_engine_thread(engine)
    assert sender.done.wait(5)
    dispatcher.shutdown()
    assert [r for r, _ in sender.sent] == [("tokens", [t], "") for t in range(5)] + [("tokens", [-1], "stop")]
    assert [f for _, f in sender.sent] == [0] * 5 + [FINAL]
    assert any("responses=6" in line and "tokens=5" in line for line in pb.logs), pb.logs


def test_a_sender_behind_coalesces_pending_tokens_and_the_first_goes_alone(pb) -> None:
    dispatcher = backend.ResponseDispatcher("m", threads=1)
    release = busy_sender(dispatcher)
    sender = FakeSender()
    stream = dispatcher.open_tokens(FakeRequest(sender), build)
    run_on_engine_thread(lambda: engine_steps(dispatcher, stream, 10))  # all 10 steps before any send
    release.set()
    assert sender.done.wait(5)
    dispatcher.shutdown()
    responses = [r for r, _ in sender.sent]
    # the first token alone; the rest (coalesced) with the end in the last response, which has the final flag
    assert responses == [("tokens", [0], ""), ("tokens", list(range(1, 10)) + [-1], "length")]
    assert [f for _, f in sender.sent] == [0, FINAL]
    assert any("responses=2" in line and "tokens=10" in line for line in pb.logs), pb.logs


def test_max_items_bounds_a_response(pb) -> None:
    dispatcher = backend.ResponseDispatcher("m", threads=1)
    release = busy_sender(dispatcher)
    sender = FakeSender()
    stream = dispatcher.open_tokens(FakeRequest(sender), build, max_items=4)
    run_on_engine_thread(lambda: engine_steps(dispatcher, stream, 10))
    release.set()
    assert sender.done.wait(5)
    dispatcher.shutdown()
    ids = [r[1] for r, _ in sender.sent]
    assert ids == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, -1]]
    assert sum(len(i) for i in ids) == 11 and [f for _, f in sender.sent][-1] == FINAL


def test_cancel_drops_pending_tokens_and_an_error_follows_them(pb) -> None:
    dispatcher = backend.ResponseDispatcher("m", threads=1)
    release = busy_sender(dispatcher)
    cancelled, failed = FakeSender(), FakeSender()
    s1 = dispatcher.open_tokens(FakeRequest(cancelled, "c"), build)
    s2 = dispatcher.open_tokens(FakeRequest(failed, "e"), build)

    def engine() -> None:
        for token in range(3):
            s1.push(token)
            s2.push(token)
            dispatcher.flush()
        s1.close(outcome="cancelled")
        s2.close(error=ResourceExhausted("queue full"))
        s1.push(99)  # nothing is sent after the end
        dispatcher.flush()

    run_on_engine_thread(engine)
    release.set()
    assert cancelled.done.wait(5) and failed.done.wait(5)
    dispatcher.shutdown()
    assert cancelled.sent == [(None, FINAL)]
    assert failed.sent == [(("tokens", [0], ""), 0), (("tokens", [1, 2], ""), 0),
                           (("error", "[RESOURCE_EXHAUSTED] queue full"), FINAL)]
    assert any("request_id='c'" in line and "outcome=cancelled" in line for line in pb.logs), pb.logs
    assert any("request_id='e'" in line and "outcome=error RESOURCE_EXHAUSTED" in line for line in pb.logs)


def test_cancellation_is_polled_by_the_sender_and_by_the_engine_only_when_nobody_asked(pb) -> None:
    dispatcher = backend.ResponseDispatcher("m", threads=1)
    sender = FakeSender()
    stream = dispatcher.open_tokens(FakeRequest(sender), build)
    stream.cancel_poll_s = 0.05
    assert not stream.is_cancelled() and sender.polls == 1  # never asked: the engine asks
    assert not stream.is_cancelled() and sender.polls == 1  # asked just now: no IPC
    sender.cancelled = True
    time.sleep(0.06)
    stream.push(1)  # not on the engine thread: sent at once, and the send asks Triton (due again)
    deadline = time.monotonic() + 5
    while sender.polls < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sender.polls == 2 and stream.is_cancelled()  # the engine reads the sender's answer
    stream.close(outcome="cancelled")
    assert sender.done.wait(5)
    dispatcher.shutdown()
