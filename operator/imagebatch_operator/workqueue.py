"""A work queue of batch keys, as Kubernetes controllers keep one.

Watch events (an ImageBatch changed, one of its Jobs changed) and timers (a webhook
retry coming due, a slow safety resync) add the batch's key; a fixed number of workers
take keys and reconcile them. The queue guarantees what makes that safe and cheap:

* a key waits in the queue once, however often it is added meanwhile;
* a key is never handed to two workers at once: added while being processed, it is
  queued again when the worker is done;
* ``add_after`` keeps only the earliest due time per key, and one timer task serves
  every delayed key, so a thousand waiting batches cost one sleeping task, not a
  thousand.

``add`` may be called from any thread (the blocking work runs on a thread pool); the
rest runs on the event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """The queue was shut down; a worker should stop."""


class WorkQueue(Generic[K]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._counter = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wakeup = asyncio.Event()
        self._timer_wakeup = asyncio.Event()
        self._shutdown = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tie the queue to the loop its workers run on (from that loop's thread)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # -- adding ----------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue ``key`` now (from any thread)."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._add, key)
        else:
            self._add(key)

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` once ``delay`` seconds have passed (from any thread)."""
        if delay <= 0:
            self.add(key)
            return
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._add_after, key, delay)
        else:
            self._add_after(key, delay)

    def _add(self, key: K) -> None:
        if self._shutdown:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._ready.append(key)
        self._wakeup.set()

    def _add_after(self, key: K, delay: float) -> None:
        if self._shutdown:
            return
        due = self._clock() + delay
        known = self._due.get(key)
        if known is not None and known <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._counter), key))
        self._timer_wakeup.set()

    # -- taking ----------------------------------------------------------------

    async def get(self) -> K:
        """The next key to process; the caller must call ``done`` with it."""
        while True:
            if self._shutdown:
                raise ShutDown
            if self._ready:
                key = self._ready.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            self._wakeup.clear()
            await self._wakeup.wait()

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self._add(key)

    # -- the timer -------------------------------------------------------------

    def _pop_due(self) -> float | None:
        """Move every due key to the ready queue; return seconds until the next one."""
        now = self._clock()
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) != due:
                heapq.heappop(self._heap)  # superseded by an earlier due time, or fired
                continue
            if due > now:
                return due - now
            heapq.heappop(self._heap)
            del self._due[key]
            self._add(key)
        return None

    async def run_timer(self) -> None:
        """Serve ``add_after`` until shut down: one task for every delayed key."""
        while not self._shutdown:
            wait = self._pop_due()
            self._timer_wakeup.clear()
            try:
                await asyncio.wait_for(self._timer_wakeup.wait(), timeout=wait)
            except TimeoutError:
                pass

    # -- state -----------------------------------------------------------------

    def shutdown(self) -> None:
        self._shutdown = True
        self._wakeup.set()
        self._timer_wakeup.set()

    def depth(self) -> int:
        """Keys waiting to be processed now."""
        return len(self._ready)

    def delayed(self) -> int:
        """Keys waiting for a due time."""
        return len(self._due)

    def scheduled_in(self, key: K) -> float | None:
        """Seconds until ``key`` is due, or None when it is not scheduled."""
        due = self._due.get(key)
        return None if due is None else max(0.0, due - self._clock())
