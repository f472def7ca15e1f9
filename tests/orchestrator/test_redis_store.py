"""The session stores against their contract, with a real Redis (a `redis-server` this module starts on a
free port, stopped by pid): the record round trip, TTLs, fencing (a stale epoch's save is refused), tenant
namespacing, stream limits across two store instances (two replicas), Redis outages (UNAVAILABLE within the
timeout, recovery without a new client). The contract tests run on the in-memory store too.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import make_config, run
from vitaserve.errors import NotFound, ResourceExhausted, Unavailable, VitaserveError
from vitaserve.models.prompt import Turn
from vitaserve.redis_server import RedisServer
from vitaserve_orchestrator.redis_keys import RedisKeys
from vitaserve_orchestrator.redis_store import RedisSessionStore
from vitaserve_orchestrator.session import (
    RECORD_VERSION,
    InMemorySessionStore,
    Session,
    SessionSettings,
    SessionStore,
    SessionSuperseded,
    SettingsUpdate,
    session_from_record,
    session_to_record,
)

pytestmark = [
    pytest.mark.integration,
]

SETTINGS = SessionSettings.resolve(
    SettingsUpdate(turn_detection="manual", seed=7, system_prompt="Réponds en français ✓",
                   max_reply_tokens=9, vad_create_response=False),
    make_config(),
)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def redis_store(server: RedisServer, prefix: str, **kwargs: object) -> RedisSessionStore:
    return RedisSessionStore(server.url, keys=RedisKeys(prefix), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, redis_server: RedisServer):
    """A factory of stores sharing one backing state (two `make_store()` = two replicas)."""
    prefix = f"t{uuid.uuid4().hex[:8]}"  # each test its own key space in the shared Redis
    memory = InMemorySessionStore()

    def make() -> SessionStore:
        return memory if request.param == "memory" else redis_store(redis_server, prefix)

    return make


def test_record_is_versioned_json_without_media() -> None:
    session = Session(id="sess-1", settings=SETTINGS, tenant="acme", turns=3,
                      history=[Turn("[image] what is it? [spoken question]", "☞A cat — 猫.", "turn-3")])
    session.pending.images.append(object())  # type: ignore[arg-type] - working state: never persisted
    session.pending.audio.extend(b"\0" * 1000)
    raw = session_to_record(session)
    record = json.loads(raw)
    assert record["v"] == RECORD_VERSION
    assert set(record) == {"v", "id", "tenant", "turns", "settings", "history", "turn_ids"}
    # The turn ids sit beside the (user, assistant) pairs, which a replica of an earlier release reads.
    assert record["history"] == [["[image] what is it? [spoken question]", "☞A cat — 猫."]]
    assert record["turn_ids"] == ["turn-3"]
    back = session_from_record(raw, frames_kept=4, epoch=5)
    assert (back.id, back.tenant, back.turns, back.epoch) == ("sess-1", "acme", 3, 5)
    assert back.history == session.history and back.settings == SETTINGS
    # A record written before turns had ids (or saved since by such a replica): empty ids.
    del record["turn_ids"]
    assert session_from_record(json.dumps(record), frames_kept=4).history == [
        Turn("[image] what is it? [spoken question]", "☞A cat — 猫.", turn_id="")
    ]
    with pytest.raises(VitaserveError, match="unreadable session record"):
        session_from_record(json.dumps({**record, "turn_ids": ["a", "b"]}), frames_kept=4)
    assert back.pending.empty() and not back.frames
    with pytest.raises(VitaserveError, match="newer than this replica reads"):
        session_from_record(json.dumps({**record, "v": RECORD_VERSION + 1}), frames_kept=4)
    with pytest.raises(VitaserveError, match="unreadable session record"):
        session_from_record(b"{not json", frames_kept=4)


def test_round_trip_and_namespacing(make_store) -> None:
    async def body() -> None:
        store = make_store()
        a = await store.create(SETTINGS, tenant="acme")
        assert a.epoch > 0 and a.tenant == "acme"
        a.record_turn("hello", "☜Hi!", turn_id="turn-1", max_turns=20)
        a.turns = 1
        await store.save(a)
        other = make_store()  # another replica
        loaded = await other.load(a.id, tenant="acme")
        assert loaded.history == [Turn("hello", "☜Hi!", "turn-1")] and loaded.turns == 1
        assert loaded.settings == SETTINGS and not SETTINGS.vad_create_response
        assert loaded.epoch == 0  # a snapshot holds no lease
        # Another tenant's session id is indistinguishable from a missing one.
        with pytest.raises(NotFound) as foreign:
            await other.load(a.id, tenant="globex")
        with pytest.raises(NotFound) as missing:
            await other.load("sess-missing", tenant="globex")
        assert str(foreign.value).replace(a.id, "X") == str(missing.value).replace("sess-missing", "X")
        with pytest.raises(NotFound):
            await other.claim(a.id, tenant="globex")
        with pytest.raises(NotFound):
            await other.load("../../etc", tenant="acme")  # never reaches a key
        await store.close()
        await other.close()

    run(body())


def test_fencing_newest_stream_wins(make_store) -> None:
    async def body() -> None:
        replica_a, replica_b = make_store(), make_store()
        a = await replica_a.create(SETTINGS)
        a.record_turn("q1", "a1", max_turns=20)
        await replica_a.save(a)
        b = await replica_b.claim(a.id)  # the client reconnected to replica B
        assert b.epoch > a.epoch and b.history == a.history
        b.record_turn("q2", "a2", max_turns=20)
        await replica_b.save(b)
        a.record_turn("stale", "stale", max_turns=20)
        with pytest.raises(SessionSuperseded):
            await replica_a.save(a)  # A's late save cannot overwrite B's history
        with pytest.raises(SessionSuperseded):
            await replica_a.renew(a)
        await replica_a.release(a)  # a no-op: B holds the lease
        await replica_b.renew(b)
        assert [t.user for t in (await replica_b.load(a.id)).history] == ["q1", "q2"]
        # Ending the session fences every holder; it cannot be resumed or written back.
        await replica_b.delete(a.id)
        with pytest.raises(NotFound):
            await replica_a.claim(a.id)
        with pytest.raises(SessionSuperseded):
            await replica_a.save(a)
        with pytest.raises(NotFound):
            await replica_b.load(a.id)
        await replica_a.close()
        await replica_b.close()

    run(body())


def test_stream_limits_hold_across_replicas(make_store) -> None:
    async def body() -> None:
        replica_a, replica_b = make_store(), make_store()
        s1 = await replica_a.create(SETTINGS, tenant="acme", max_streams=2)
        await replica_b.create(SETTINGS, tenant="acme", max_streams=2)
        with pytest.raises(ResourceExhausted, match="max_streams=2") as err:
            await replica_a.create(SETTINGS, tenant="acme", max_streams=2)
        assert "'acme'" in str(err.value) and err.value.retryable
        await replica_b.create(SETTINGS, tenant="globex", max_streams=2)  # other tenants are not affected
        # Resuming a session whose (maybe dead) stream still holds the lease does not count twice.
        again = await replica_b.claim(s1.id, tenant="acme", max_streams=2)
        await replica_b.release(again)
        await replica_a.create(SETTINGS, tenant="acme", max_streams=2)  # the released lease made room
        with pytest.raises(ResourceExhausted):
            await replica_b.claim(s1.id, tenant="acme", max_streams=2)
        await replica_a.close()
        await replica_b.close()

    run(body())


def test_ttls_are_set_and_refreshed(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = redis_store(redis_server, "ttl", ttl_s=30.0, lease_s=5.0)
        keys = store.keys
        s = await store.create(SETTINGS, tenant="acme")
        r = store.client
        assert keys.session("acme", s.id) == f"ttl:t:{{acme}}:session:{s.id}"
        assert 29_000 < await r.pttl(keys.session("acme", s.id)) <= 30_000
        assert 29_000 < await r.pttl(keys.epoch("acme", s.id)) <= 30_000
        assert 4_000 < await r.pttl(keys.streams("acme")) <= 5_000
        assert await store.live_streams("acme") == 1
        await r.pexpire(keys.session("acme", s.id), 1000)
        await store.save(s)  # use refreshes the TTL
        assert await r.pttl(keys.session("acme", s.id)) > 29_000
        await r.pexpire(keys.session("acme", s.id), 1000)
        await store.renew(s)
        assert await r.pttl(keys.session("acme", s.id)) > 29_000
        stored = json.loads(await r.get(keys.session("acme", s.id)))
        assert stored["v"] == RECORD_VERSION and stored["tenant"] == "acme"
        await store.close()
        # Idle sessions expire; a lease nobody renews lapses (a replica that died stops counting).
        short = redis_store(redis_server, "ttl-short", ttl_s=0.3, lease_s=0.3)
        gone = await short.create(SETTINGS, tenant="acme", max_streams=1)
        with pytest.raises(ResourceExhausted):
            await short.create(SETTINGS, tenant="acme", max_streams=1)
        await asyncio.sleep(0.45)
        with pytest.raises(NotFound):
            await short.load(gone.id, tenant="acme")
        assert await short.live_streams("acme") == 0
        await short.create(SETTINGS, tenant="acme", max_streams=1)
        await short.close()

    run(body())


def test_a_live_stream_writes_its_session_back_after_redis_lost_it(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = redis_store(redis_server, "lost")
        s = await store.create(SETTINGS)
        s.record_turn("q", "a", max_turns=20)
        for key in (store.keys.session(s.tenant, s.id), store.keys.epoch(s.tenant, s.id)):
            await store.client.delete(key)  # as after a restart without persistence
        await store.save(s)  # the holder's memory is the newest state there is
        assert (await store.load(s.id)).history == [Turn("q", "a")]
        newer = await store.claim(s.id)
        with pytest.raises(SessionSuperseded):
            await store.save(s)
        await store.save(newer)
        await store.close()

    run(body())


def test_redis_outage_is_unavailable_within_the_timeout_and_recovers(tmp_path) -> None:
    with RedisServer(work_dir=tmp_path) as server:
        async def body() -> None:
            store = redis_store(server, "outage", timeout_s=0.5)
            s = await store.create(SETTINGS)
            await store.check()
            server.kill()
            for op in (lambda: store.create(SETTINGS), lambda: store.load(s.id), lambda: store.save(s),
                       lambda: store.claim(s.id), lambda: store.renew(s), store.check):
                t0 = time.perf_counter()
                with pytest.raises(Unavailable, match="Redis at 127.0.0.1") as err:
                    await op()
                assert time.perf_counter() - t0 < 1.5, "bounded by the timeout, never a hang"
                assert err.value.retryable and err.value.code == "UNAVAILABLE"
            server.start()  # same port, empty (no persistence)
            await store.check()  # the same client reconnects by itself
            fresh = await store.create(SETTINGS)
            assert (await store.load(fresh.id)).id == fresh.id
            with pytest.raises(NotFound):
                await store.load(s.id)  # lost with the restart: NOT_FOUND, not an error
            await store.close()

        run(body())
