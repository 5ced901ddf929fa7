"""The event-driven core: a work queue of batches, a few workers, bounded pools.

Watch events put a batch's key in the queue: the ImageBatch changed, or one of its Jobs
did (the handler shell feeds both, from kopf's watch and its index of Jobs by batch).
A fixed number of asyncio workers take keys; each pass (observe → decide → act) runs on
a bounded thread pool, because the Kubernetes and storage clients block. Reading and
validating a CSV and merging a run's results are expensive, so they run on a second,
smaller pool and wake the batch when done. Timers exist only for what is due later: a
webhook retry, a progress write held back, a slow resync of a batch still in progress.
A finished batch whose webhook is settled costs nothing: no task, no timer, no request.

Nothing here survives a restart and nothing needs to: the status, the Jobs and storage
are the truth, and the caches refill from the watch and from storage.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagebatch_common.storage import Storage, StorageError
from imagebatch_operator import plan
from imagebatch_operator.act import Actor
from imagebatch_operator.credentials import Credentials
from imagebatch_operator.decide import (
    IngestOutcome,
    JobView,
    MergeOutcome,
    Observation,
    ShardTally,
    Task,
    current_run,
    decide,
    stored_state,
)
from imagebatch_operator.fetching import Poster
from imagebatch_operator.ingest import Ingest
from imagebatch_operator.kube import ApiUnavailable, Conflict, Kube
from imagebatch_operator.merge import Merge, MergeInput
from imagebatch_operator.metrics import Metrics
from imagebatch_operator.observe import Observer, finished_shard
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import UrlOpener
from imagebatch_operator.status import (
    ConditionType,
    EventReason,
    Phase,
    Reason,
    RunState,
    condition,
)
from imagebatch_operator.workqueue import ShutDown, WorkQueue

log = logging.getLogger("imagebatch.controller")

Key = tuple[str, str]  # (namespace, name)

# Backoff after a failed pass: 1 s, 2 s, 4 s ... at most a minute.
MAX_BACKOFF_SECONDS = 60.0

_FINISHED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.INVALID, RunState.REFUSED})


def _version(body: Mapping[str, Any]) -> int | None:
    raw = str((body.get("metadata") or {}).get("resourceVersion"))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _finished(body: Mapping[str, Any]) -> bool:
    """Whether the batch's stored status is final for its current spec."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    if status.get("observedGeneration") != generation:
        return False
    return status.get("phase") in (Phase.SUCCEEDED, Phase.FAILED)


def _queued(body: Mapping[str, Any]) -> bool:
    validated = condition(body.get("status") or {}, ConditionType.VALIDATED)
    return validated is not None and validated.get("reason") == Reason.QUEUED


class Controller:
    """Owns the queue, the caches and the pools; ``handlers`` feeds it events."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        storage: Storage,
        poster: Poster,
        open_url: UrlOpener,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.kube = kube
        self.storage = storage
        self.queue: WorkQueue[Key] = WorkQueue()
        self.jobs_of: Callable[[Key], Iterable[JobView]] = lambda key: ()
        self._batches: dict[Key, dict[str, Any]] = {}
        self._by_namespace: dict[str, set[str]] = {}
        self._tasks: dict[Key, dict[str, Task]] = {}
        # Shards whose pod succeeded, by (namespace, Job name), from the watch of worker
        # pods; and which batch a batch label names, to wake it.
        self._pods_done: dict[tuple[str, str], set[int]] = {}
        self._by_label: dict[tuple[str, str], str] = {}
        self._stop_watching = threading.Event()
        self._failures: dict[Key, int] = {}
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="reconcile")
        self.heavy = ThreadPoolExecutor(settings.heavy_workers, thread_name_prefix="ingest")
        self.observer = Observer(settings, storage, self._count_tally)
        self.ingest = Ingest(settings, kube, storage, open_url)
        self.actor = Actor(
            settings,
            kube,
            storage,
            poster,
            self,
            Credentials(settings, kube, storage),
            on_webhook=lambda outcome: self.metrics.webhooks.labels(outcome).inc(),
        )
        self.merge = Merge(storage, self.actor.url_of, settings.spool_dir)
        self._running: list[asyncio.Task[None]] = []
        self._expensive = 0  # tasks submitted to the expensive pool and not yet done
        self.metrics.watch_batches(self.phases)
        self.metrics.watch_queue(self.queue.depth, self.queue.delayed, lambda: self._expensive)

    def _count_tally(self, tally: ShardTally) -> None:
        images = self.metrics.images
        images.labels("succeeded").inc(tally.ok - tally.skipped)
        images.labels("skipped").inc(tally.skipped)
        images.labels("failed").inc(tally.failed)
        self.metrics.image_bytes.labels("in").inc(tally.bytes_in)
        self.metrics.image_bytes.labels("out").inc(tally.bytes_out)

    def _count_pass(self, result: str, seconds: float) -> None:
        self.metrics.reconciles.labels(result).inc()
        self.metrics.reconcile_seconds.observe(seconds)

    def _submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the expensive pool, counted while it waits or runs."""
        with self._lock:
            self._expensive += 1

        def counted() -> None:
            try:
                work()
            finally:
                with self._lock:
                    self._expensive -= 1

        self.heavy.submit(counted)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self.queue.bind(asyncio.get_running_loop())
        for namespace in self.settings.watch_namespaces or (None,):
            threading.Thread(
                target=self.kube.watch_pods,
                args=(plan.LABEL_BATCH, namespace, self.pod_event, self._stop_watching),
                name=f"pods-{namespace or 'all'}",
                daemon=True,
            ).start()
        self._running.append(asyncio.create_task(self.queue.run_timer(), name="imagebatch-timer"))
        for number in range(self.settings.workers):
            self._running.append(
                asyncio.create_task(self._worker(), name=f"imagebatch-worker-{number}")
            )

    async def stop(self) -> None:
        self._stop_watching.set()
        self.queue.shutdown()
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.heavy.shutdown(wait=False, cancel_futures=True)

    # -- events from the watch ------------------------------------------------------

    def batch_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """An ImageBatch was listed, added, modified or deleted."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            with self._lock:
                self._batches.pop(key, None)
                self._by_namespace.get(key[0], set()).discard(key[1])
                self._tasks.pop(key, None)
                self._by_label.pop((key[0], plan.batch_label(key[1])), None)
                for job in [k for k in self._pods_done if k[0] == key[0]]:
                    long_name = len(key[1]) > 43 and job[1].startswith(key[1][:43])
                    if job[1].startswith(f"{key[1]}-") or long_name:
                        del self._pods_done[job]
            self.observer.forget(key)
            self._wake_queued(key[0])
            return
        self.remember(copy.deepcopy(dict(body)))
        self.queue.add(key)

    def pod_event(self, event_type: str, pod: Mapping[str, Any]) -> None:
        """A worker pod changed (from the pod watch's thread): wake its batch on success."""
        done = finished_shard(pod)
        if done is None:
            return
        meta = pod.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        label = str((meta.get("labels") or {}).get(plan.LABEL_BATCH, ""))
        with self._lock:
            indexes = self._pods_done.setdefault((namespace, done[0]), set())
            if done[1] in indexes:
                return
            indexes.add(done[1])
            batch = self._by_label.get((namespace, label))
        if batch is not None:
            self.queue.add((namespace, batch))

    def with_finished_pods(self, namespace: str, jobs: tuple[JobView, ...]) -> tuple[JobView, ...]:
        """The Jobs as the watch saw them, plus the shards whose pod already succeeded."""
        with self._lock:
            done = [frozenset(self._pods_done.get((namespace, j.name), ())) for j in jobs]
        return tuple(
            dataclasses.replace(j, completed=j.completed | extra) if extra - j.completed else j
            for j, extra in zip(jobs, done, strict=True)
        )

    def job_event(self, namespace: str, batch: str | None) -> None:
        """One of a batch's Jobs changed (the index is already up to date)."""
        if batch is not None:
            self.queue.add((namespace, batch))

    def remember(self, body: dict[str, Any]) -> None:
        """Keep the newest version of a batch (a write's answer may beat its watch event)."""
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        with self._lock:
            known = self._batches.get(key)
            new, old = _version(body), (_version(known) if known is not None else None)
            if known is not None and new is not None and old is not None and new < old:
                return
            if known is not None and known["metadata"].get("uid") != meta.get("uid"):
                self._tasks.pop(key, None)  # a new object with the same name
            self._batches[key] = body
            self._by_namespace.setdefault(key[0], set()).add(key[1])
            self._by_label[(key[0], plan.batch_label(key[1]))] = key[1]

    def batch(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._batches.get(key)

    def count(self) -> int:
        with self._lock:
            return len(self._batches)

    def phases(self) -> dict[str, int]:
        """How many batches are in each phase (for the metrics)."""
        out: dict[str, int] = {}
        with self._lock:
            for body in self._batches.values():
                phase = str((body.get("status") or {}).get("phase") or Phase.PENDING.value)
                out[phase] = out.get(phase, 0) + 1
        return out

    # -- tenancy: order within a namespace --------------------------------------------

    def active_before(self, body: Mapping[str, Any]) -> int:
        """Batches of the same namespace, made earlier, still in progress and not suspended."""
        meta = body["metadata"]
        mine = (str(meta.get("creationTimestamp") or ""), str(meta["name"]))
        namespace = str(meta["namespace"])
        count = 0
        with self._lock:
            for name in self._by_namespace.get(namespace, ()):
                other = self._batches.get((namespace, name))
                if other is None or name == meta["name"]:
                    continue
                other_meta = other["metadata"]
                if (str(other_meta.get("creationTimestamp") or ""), name) >= mine:
                    continue
                if other_meta.get("deletionTimestamp") or (other.get("spec") or {}).get("suspend"):
                    continue
                if _finished(other) or _queued(other):
                    continue
                count += 1
        return count

    def _wake_queued(self, namespace: str) -> None:
        with self._lock:
            names = list(self._by_namespace.get(namespace, ()))
            waiting = [n for n in names if _queued(self._batches.get((namespace, n)) or {})]
        for name in waiting:
            self.queue.add((namespace, name))

    # -- expensive tasks ---------------------------------------------------------------

    def tasks_of(self, key: Key) -> dict[str, Task]:
        with self._lock:
            return dict(self._tasks.get(key, {}))

    def _set_task(self, key: Key, kind: str, task: Task | None) -> None:
        with self._lock:
            tasks = self._tasks.setdefault(key, {})
            if task is None:
                tasks.pop(kind, None)
            else:
                tasks[kind] = task

    def start_ingest(self, obs: Observation, run: str) -> None:
        key = (obs.ref.namespace, obs.ref.name)
        current = self.tasks_of(key).get("ingest")
        if current is not None and current.run == run and current.running:
            return
        self._set_task(key, "ingest", Task(run, running=True))

        def work() -> None:
            try:
                outcome = self.ingest.run(obs.ref, obs.spec, run)
            except Exception as error:
                log.exception("%s/%s: validating run %s failed", key[0], key[1], run)
                outcome = IngestOutcome("unavailable", f"validating failed: {error}"[:300])
            now = datetime.datetime.now(datetime.UTC)
            self._set_task(key, "ingest", Task(run, running=False, ingest=outcome, finished=now))
            if outcome.plan is not None and outcome.plan.stored:
                self.metrics.images.labels("skipped").inc(outcome.plan.stored)
            self.queue.add(key)

        self._submit(work)

    def start_merge(self, obs: Observation, run: str) -> None:
        key = (obs.ref.namespace, obs.ref.name)
        current = self.tasks_of(key).get("merge")
        if current is not None and current.run == run and current.running:
            return
        assert obs.plan is not None
        job = next((j for j in obs.jobs if j.run == run and not j.deleting), None)
        merge_input = MergeInput(
            bucket=plan.output_bucket(obs.spec, self.settings),
            prefix=plan.output_prefix(obs.spec, obs.ref),
            run=run,
            plan=obs.plan,
            spec=obs.spec,
            completed=job.completed if job is not None else frozenset(),
            failed=job.failed if job is not None else frozenset(),
        )
        self._set_task(key, "merge", Task(run, running=True))

        def work() -> None:
            try:
                outcome = self.merge.run(merge_input)
            except (StorageError, ValueError) as error:
                log.warning("%s/%s: merging run %s: %s", key[0], key[1], run, error)
                outcome = MergeOutcome("error", str(error)[:300])
            except Exception as error:
                log.exception("%s/%s: merging run %s failed", key[0], key[1], run)
                outcome = MergeOutcome("error", f"{type(error).__name__}: {error}"[:300])
            now = datetime.datetime.now(datetime.UTC)
            self._set_task(key, "merge", Task(run, running=False, merge=outcome, finished=now))
            self.queue.add(key)

        self._submit(work)

    # -- the pass -------------------------------------------------------------------

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            started = time.monotonic()
            result = "ok"
            try:
                # kopf's index is read on its own loop thread.
                jobs = self.with_finished_pods(key[0], tuple(self.jobs_of(key)))
                requeue = await loop.run_in_executor(self.pool, self.reconcile, key, jobs)
                self._failures.pop(key, None)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            except (ApiUnavailable, StorageError, Conflict) as error:
                result = "retry"
                delay = self._backoff(key)
                log.warning("%s/%s: will look again in %.0fs: %s", key[0], key[1], delay, error)
                self.queue.add_after(key, delay)
            except Exception as error:
                result = "error"
                delay = self._backoff(key)
                log.exception("%s/%s: unexpected error; looking again in %.0fs", *key, delay)
                if self._failures.get(key) == 1:
                    await loop.run_in_executor(self.pool, self._report, key, error)
                self.queue.add_after(key, delay)
            finally:
                self.queue.done(key)
                self._count_pass(result, time.monotonic() - started)

    def _backoff(self, key: Key) -> float:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        return min(2.0 ** (failures - 1), MAX_BACKOFF_SECONDS)

    def _report(self, key: Key, error: Exception) -> None:
        body = self.batch(key)
        if body is None:
            return
        try:
            self.kube.post_event(
                body,
                "Warning",
                EventReason.RECONCILE_ERROR.value,
                f"{type(error).__name__}: {error}"[:500],
            )
        except Exception:
            log.warning("could not post the ReconcileError Event for %s/%s", *key)

    def reconcile(self, key: Key, jobs: tuple[JobView, ...]) -> float | None:
        """One pass for one batch: observe, decide, act. Returns when to look again."""
        body = self.batch(key)
        if body is None:
            self.observer.forget(key)
            return None
        obs = self.observer.observe(
            body,
            jobs,
            self.tasks_of(key),
            datetime.datetime.now(datetime.UTC),
            time.monotonic(),
            self.active_before(body),
        )
        decision = decide(obs, self.settings)
        run, _ = current_run(obs) if not obs.deleting else ("", False)
        memory = self.observer.memory_of(key, run)
        was_finished = _finished(body)
        was_run = (body.get("status") or {}).get("run")
        result = self.actor.execute(body, obs, decision, memory)
        if result.stored is not None:
            self.remember(result.stored)
            body = result.stored
        self._drop_consumed_tasks(key, body, run)
        status = body.get("status") or {}
        if status.get("run") and status.get("run") != was_run:
            self.metrics.runs_started.inc()
        if not was_finished and _finished(body):
            ready = condition(status, ConditionType.READY) or {}
            self.metrics.finished(str(status.get("phase")), str(ready.get("reason")))
            self._wake_queued(key[0])
        return result.requeue_after

    def _drop_consumed_tasks(self, key: Key, body: Mapping[str, Any], run: str) -> None:
        """Forget task outcomes the status now records (or that belong to another run)."""
        state = stored_state(body.get("status") or {}, run)
        with self._lock:
            tasks = self._tasks.get(key)
            if not tasks:
                return
            for kind, task in list(tasks.items()):
                if task.running:
                    continue
                if (
                    task.run != run
                    or (
                        kind == "ingest"
                        and state
                        not in (
                            None,
                            RunState.QUEUED,
                            RunState.VALIDATING,
                            RunState.SOURCE_UNAVAILABLE,
                        )
                    )
                    or (kind == "merge" and state in _FINISHED)
                ):
                    del tasks[kind]
