"""A live stream's lease on its session: renewed in the background, given back when the stream ends.

`create`/`claim` of the session store hand a stream the lease (session.py's docstring has the rules).
`StreamLease` renews it every `interval_s` (a third of `stream_lease_s`, so two renewals may fail before
the lease lapses). A renewal refused because a newer stream claimed the session calls `on_lost` once:
the owner ends its stream. A store that cannot be reached is not a reason to end a stream: the renewal is
retried at the next tick (the session keeps being served from memory; saves report their own errors, and
fencing still refuses a stale write once the store is back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vitaserve.errors import VitaserveError

from vitaserve_orchestrator.session import Session, SessionStore, SessionSuperseded
from vitaserve_orchestrator.tasks import TaskSet

log = logging.getLogger(__name__)


class StreamLease:
    """The heartbeat of one stream's lease (see the module docstring)."""

    def __init__(
        self,
        store: SessionStore,
        session: Session,
        *,
        interval_s: float,
        on_lost: Callable[[SessionSuperseded], None],
    ) -> None:
        self._store = store
        self._session = session
        self._interval_s = interval_s
        self._on_lost = on_lost
        self._tasks = TaskSet(f"lease:{session.id}")
        self._released = False

    def start(self) -> None:
        self._tasks.spawn(self._beat(), "renew")

    async def _beat(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._store.renew(self._session)
            except SessionSuperseded as exc:
                log.info("session %s: a newer stream took it over; ending this one", self._session.id)
                self._on_lost(exc)
                return
            except VitaserveError as exc:
                if not failing:
                    log.warning("session %s: renewing the stream lease failed: %s", self._session.id, exc)
                failing = True
                continue
            if failing:
                log.info("session %s: stream lease renewed again", self._session.id)
            failing = False

    async def aclose(self, timeout_s: float) -> None:
        """Stop renewing and give the lease back (once; failures are logged: the lease expires anyway)."""
        await self._tasks.cancel_all(timeout_s)
        if self._released:
            return
        self._released = True
        try:
            await self._store.release(self._session)
        except VitaserveError as exc:
            log.warning("session %s: releasing the stream lease failed (it expires by itself): %s",
                        self._session.id, exc)
