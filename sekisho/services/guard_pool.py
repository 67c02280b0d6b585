"""The guard service's worker threads: one shared ``Guard`` called off the event loop, in
fair order between users (``GuardPool``), and ``PoolBusy`` when no thread comes free in
time. Part of the guard service (``sekisho.services.guard``)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from sekisho.guard.limits import Limits
from sekisho.instance import Instance

class PoolBusy(Exception):
    """A call waited longer than the guard's query time for a worker thread."""

    def __init__(self, waited: float):
        super().__init__(f"no worker thread within {waited:.0f} s")
        self.waited = waited


@dataclass(eq=False)
class _Waiter:
    arrival: int
    user: str
    since: float
    ready: asyncio.Future


def default_workers(limits: Limits) -> int:
    """Worker threads for the guard's calls: the queries it executes at once
    (``max_running``) plus two, so that a query's Python work (planning, protection:
    under the GIL) overlaps the others' DuckDB work (which releases it)."""
    return limits.max_running + 2


def default_per_user(limits: Limits) -> int:
    """Calls of one user in progress at once: the queries the guard executes for one user
    (``max_running_per_user``) plus one being planned. More would only wait in the guard's
    admission while holding a thread another user could use."""
    return limits.max_running_per_user + 1


class GuardPool:
    """Runs calls of one shared ``Guard`` on a few worker threads, off the event loop,
    in fair order.

    The guard is thread-safe (a DuckDB cursor per query, locks around its caches) and
    follows the store's ``CURRENT`` pointer itself: a new ingest becomes visible at the
    next query while queries already running keep the snapshot they started on.

    **Threads.** DuckDB releases the GIL while it executes; the guard's own Python work
    per query holds it. The guard executes at most ``max_running`` queries at once (its
    admission), so threads beyond ``max_running`` + 2 (``default_workers``) would only
    add contention on the GIL and the cores, and per-thread state (each thread keeps a
    DuckDB cursor with prepared statements and a post-processing database).

    **Order.** A call that finds every thread busy waits here, in the event loop (no
    thread held), and is dispatched as the guard admits queries: first the user with
    fewest calls in progress, then the user dispatched least recently, then arrival. A
    first-in first-out pool would let one analyst's burst queue ahead of everybody else
    (the guard's fair share only sees calls that have a thread). A user has at most
    ``per_user`` calls in progress (``default_per_user``), so a burst leaves threads free
    for others even when nobody else is waiting yet. A call still waiting after
    ``wait_seconds`` (default: the guard's ``query_seconds``) fails with ``PoolBusy``,
    answered ``guard_busy`` like the guard's own admission.
    """

    def __init__(self, instance: Instance, guard_factory: Callable[[Instance], Any],
                 workers: int | None = None, wait_seconds: float | None = None, per_user: int | None = None):
        self.instance = instance
        self._factory = guard_factory
        self._guard: Any = None
        self._guard_lock = threading.Lock()
        limits = Limits.from_config(instance.config)
        self.workers = workers or default_workers(limits)
        self.wait_seconds = wait_seconds or limits.query_seconds
        self.per_user = per_user or default_per_user(limits)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="guard")
        # the dispatcher's state, touched only on the event loop thread
        self._busy = 0
        self._running: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._ticks = itertools.count(1)
        self._arrivals = itertools.count()
        self._waiting: list[_Waiter] = []
        self.dispatched: deque[str] = deque(maxlen=1000)   # dispatch order, for tests and tools

    def guard(self) -> Any:
        with self._guard_lock:
            if self._guard is None:
                self._guard = self._factory(self.instance)
            return self._guard

    async def call(self, caller: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``guard.<method>(*args, **kwargs)`` on a worker thread, dispatched for ``caller``."""
        def run() -> Any:
            return getattr(self.guard(), method)(*args, **kwargs)

        return await self.run(caller, run)

    async def run(self, user: str, fn: Callable[..., Any], /, *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, dispatched for ``user`` (see the class)."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(next(self._arrivals), user, loop.time(), loop.create_future())
        self._waiting.append(waiter)
        self._dispatch()
        if not waiter.ready.done():
            timer = loop.call_later(self.wait_seconds, self._expire, waiter)
            try:
                await waiter.ready
            except asyncio.CancelledError:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                raise
            finally:
                timer.cancel()
        # the slot is released when the thread is done, even if this coroutine is not awaited to the end
        future = self.executor.submit(fn, *args)
        future.add_done_callback(lambda _: self._release_threadsafe(loop, user))
        return await asyncio.wrap_future(future)

    def _dispatch(self) -> None:
        while self._busy < self.workers:
            eligible = [w for w in self._waiting if self._running.get(w.user, 0) < self.per_user]
            if not eligible:
                return
            waiter = min(eligible, key=lambda w: (self._running.get(w.user, 0), self._last.get(w.user, 0), w.arrival))
            self._waiting.remove(waiter)
            if waiter.ready.done():   # cancelled meanwhile
                continue
            self._busy += 1
            self._running[waiter.user] = self._running.get(waiter.user, 0) + 1
            self._last[waiter.user] = next(self._ticks)
            self.dispatched.append(waiter.user)
            waiter.ready.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter in self._waiting and not waiter.ready.done():
            self._waiting.remove(waiter)
            waiter.ready.set_exception(PoolBusy(asyncio.get_running_loop().time() - waiter.since))

    def _release_threadsafe(self, loop: asyncio.AbstractEventLoop, user: str) -> None:
        try:
            loop.call_soon_threadsafe(self._release, user)
        except RuntimeError:   # the loop is closed: the service is shutting down
            pass

    def _release(self, user: str) -> None:
        self._busy -= 1
        self._running[user] -= 1
        if not self._running[user]:
            del self._running[user]
        self._dispatch()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
        close = getattr(self._guard, "close", None)
        if callable(close):
            close()
