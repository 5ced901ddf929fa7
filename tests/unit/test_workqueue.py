"""The work queue: one wait per key, never two workers on one key, one timer for all."""

from __future__ import annotations

import asyncio
import threading

import pytest

from imagebatch_operator.workqueue import ShutDown, WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, timeout=5))  # type: ignore[arg-type]


def test_a_key_added_many_times_waits_once() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.bind(asyncio.get_running_loop())
        for key in ("a", "b", "a", "a"):
            queue.add(key)
        assert queue.depth() == 2
        assert await queue.get() == "a"
        assert await queue.get() == "b"

    run(scenario())


def test_a_key_added_while_processed_comes_back_after_done() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.bind(asyncio.get_running_loop())
        queue.add("a")
        key = await queue.get()
        queue.add("a")  # an event arrives mid-pass
        assert queue.depth() == 0  # not handed to a second worker meanwhile
        queue.done(key)
        assert queue.depth() == 1
        assert await queue.get() == "a"

    run(scenario())


def test_add_after_keeps_the_earliest_due_time_and_fires_once() -> None:
    async def scenario() -> None:
        clock = Clock()
        queue: WorkQueue[str] = WorkQueue(clock=clock)
        queue.bind(asyncio.get_running_loop())
        queue.add_after("a", 300)
        queue.add_after("a", 5)
        queue.add_after("a", 60)
        assert queue.scheduled_in("a") == 5
        assert queue.delayed() == 1
        timer = asyncio.create_task(queue.run_timer())
        await asyncio.sleep(0.05)
        assert queue.depth() == 0
        clock.now = 6
        queue.add_after("b", 1000)  # wakes the timer, which finds "a" due
        assert await queue.get() == "a"
        assert queue.delayed() == 1  # only "b" waits
        queue.shutdown()
        await timer

    run(scenario())


def test_add_from_another_thread_reaches_the_loop() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.bind(asyncio.get_running_loop())
        thread = threading.Thread(target=queue.add, args=("from-a-pool",))
        thread.start()
        thread.join()
        assert await queue.get() == "from-a-pool"

    run(scenario())


def test_shutdown_releases_waiting_workers() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.bind(asyncio.get_running_loop())
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0.01)
        queue.shutdown()
        with pytest.raises(ShutDown):
            await waiting

    run(scenario())
