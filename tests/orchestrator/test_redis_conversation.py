"""Conversations over the Redis store (a real redis-server started here), with scripted components: a
turn's end is sent only once its history is saved; a Redis outage during a turn is an UNAVAILABLE
`ErrorEvent` and the stream goes on, and saves again once Redis is back; a second stream on the same
session takes it over and the first one ends (ABORTED) without writing anything more."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from conftest import make_config, run
from fakes import FakeComponents
from vitaserve.redis_server import RedisServer
from vitaserve_orchestrator import events as ev
from vitaserve_orchestrator.auth import Tenant
from vitaserve_orchestrator.conversation import Conversation
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.redis_keys import RedisKeys
from vitaserve_orchestrator.redis_store import RedisSessionStore
from vitaserve_orchestrator.session import Session, SettingsUpdate

pytestmark = [
    pytest.mark.integration,
]

END = (ev.ResponseDone, ev.Interrupted, ev.ErrorEvent)
CONFIG = make_config(stream_lease_s=1.0, redis_timeout_s=0.5)
ACME = Tenant("acme", max_streams=5)


@pytest.fixture()
def redis_server(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(work_dir=tmp_path) as server:
        yield server


class Stream:
    """One conversation as the servicer drives it: events go through `before_send` before "sending"."""

    def __init__(self, store: RedisSessionStore) -> None:
        self.store = store
        self.outbox = Outbox()
        self.conv: Conversation | None = None

    async def open(self, session_id: str = "") -> ev.SessionStarted:
        self.conv = await Conversation.open(
            ev.UpdateSession(session_id=session_id, settings=SettingsUpdate(turn_detection="manual")),
            store=self.store, components=FakeComponents(), config=CONFIG, outbox=self.outbox, tenant=ACME,
        )
        started = (await self.next()).event
        assert isinstance(started, ev.SessionStarted)
        return started

    async def next(self, timeout: float = 5.0) -> ev.Envelope:
        env = await asyncio.wait_for(self.outbox.get(), timeout)
        assert env is not None, "the stream ended"
        assert self.conv is not None
        await self.conv.before_send(env)
        return env

    async def turn(self, text: str) -> list[ev.Envelope]:
        assert self.conv is not None
        await self.conv.dispatch(ev.TextIn(text=text))
        got = [await self.next()]
        while not isinstance(got[-1].event, END):
            got.append(await self.next())
        return got


class GatedStore(RedisSessionStore):
    """The real Redis store whose saves wait for `gate` (to hold a save in flight)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.gate.set()

    async def save(self, session: Session) -> None:
        await self.gate.wait()
        await super().save(session)


def test_turn_end_waits_for_the_save(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = GatedStore(redis_server.url, keys=RedisKeys("barrier"), timeout_s=0.5)
        stream = Stream(store)
        await stream.open()
        assert stream.conv is not None
        sid = stream.conv.session.id
        await stream.turn("first")
        store.gate.clear()  # the next save stays in flight
        await stream.conv.dispatch(ev.TextIn(text="second"))
        while not isinstance((env := await asyncio.wait_for(stream.outbox.get(), 5)).event, ev.ResponseDone):
            await stream.conv.before_send(env)  # text deltas go out at once
        sending = asyncio.get_running_loop().create_task(stream.conv.before_send(env))
        await asyncio.sleep(0.2)
        assert not sending.done(), "response_done must wait for its turn's save"
        assert [t.user for t in (await store.load(sid, tenant="acme")).history] == ["first"]
        store.gate.set()
        assert await asyncio.wait_for(sending, 2)  # sent
        # The instant the client can see response_done, another replica already sees the turn.
        assert [t.user for t in (await store.load(sid, tenant="acme")).history] == ["first", "second"]
        await stream.conv.aclose()
        await store.close()

    run(body())


def test_redis_outage_during_a_stream_reports_unavailable_and_recovers(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = RedisSessionStore(redis_server.url, keys=RedisKeys("outage"), timeout_s=0.5)
        stream = Stream(store)
        await stream.open()
        assert stream.conv is not None
        await stream.turn("before the outage")
        redis_server.kill()
        events = await stream.turn("during the outage")
        assert isinstance(events[-1].event, ev.ResponseDone)  # the turn itself does not need Redis
        error = (await stream.next()).event
        assert isinstance(error, ev.ErrorEvent) and error.code == "UNAVAILABLE" and error.retryable
        assert "session store" in error.message
        redis_server.start()  # same port, empty
        events = await stream.turn("after the outage")
        assert isinstance(events[-1].event, ev.ResponseDone)
        # The live stream wrote its whole history back; nothing else was reported.
        stored = await store.load(stream.conv.session.id, tenant="acme")
        assert [t.user for t in stored.history] == [
            "before the outage", "during the outage", "after the outage"]
        assert stream.outbox.pending() == 0
        await stream.conv.aclose()
        await store.close()

    run(body())


def test_second_stream_takes_the_session_over(redis_server: RedisServer) -> None:
    async def body() -> None:
        replica_a = RedisSessionStore(redis_server.url, keys=RedisKeys("takeover"), timeout_s=0.5)
        replica_b = RedisSessionStore(redis_server.url, keys=RedisKeys("takeover"), timeout_s=0.5)
        old, new = Stream(replica_a), Stream(replica_b)
        await old.open()
        assert old.conv is not None
        sid = old.conv.session.id
        await old.turn("first")
        started = await new.open(sid)  # the client reconnected elsewhere; A has not noticed
        assert started.resumed and started.history_turns == 1
        # A learns at its next lease renewal (a third of stream_lease_s) and ends (the servicer: ABORTED).
        assert await asyncio.wait_for(old.outbox.get(), 3.0) is None
        assert old.conv.superseded is not None and old.conv.superseded.code == "ABORTED"
        await old.conv.aclose()  # A's stream-end save is fenced off: it writes nothing
        await new.turn("second")
        stored = await replica_b.load(sid, tenant="acme")
        assert [t.user for t in stored.history] == ["first", "second"]
        assert await replica_b.live_streams("acme") == 1
        assert new.conv is not None
        await new.conv.aclose()
        assert await replica_b.live_streams("acme") == 0
        await replica_a.close()
        await replica_b.close()

    run(body())


def test_a_turn_whose_save_a_newer_stream_refused_is_not_reported_done(redis_server: RedisServer) -> None:
    async def body() -> None:
        replica_a = GatedStore(redis_server.url, keys=RedisKeys("refused"), timeout_s=0.5)
        replica_b = RedisSessionStore(redis_server.url, keys=RedisKeys("refused"), timeout_s=0.5)
        old, new = Stream(replica_a), Stream(replica_b)
        await old.open()
        assert old.conv is not None
        sid = old.conv.session.id
        replica_a.gate.clear()
        await old.conv.dispatch(ev.TextIn(text="lost race"))
        while not isinstance((env := await asyncio.wait_for(old.outbox.get(), 5)).event, ev.ResponseDone):
            pass
        sending = asyncio.get_running_loop().create_task(old.conv.before_send(env))
        await new.open(sid)  # takes the session while A's save is in flight
        replica_a.gate.set()
        assert not await asyncio.wait_for(sending, 2), "a turn that is not in history is not reported done"
        assert old.conv.superseded is not None
        assert (await replica_b.load(sid, tenant="acme")).history == []
        await old.conv.aclose()
        assert new.conv is not None
        await new.conv.aclose()
        await replica_a.close()
        await replica_b.close()

    run(body())
