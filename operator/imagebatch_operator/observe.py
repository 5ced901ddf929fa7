"""Gather one typed ``Observation`` of a batch, in one place.

The batch and its Jobs come from the watch caches (no API call); the run's plan and the
results of shards that finished since the last look come from storage, each read once
per run and remembered in ``RunMemory`` (a restart simply reads them again). What the
expensive tasks are doing comes from the controller. Nothing here decides anything.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagebatch_common.contract import ShardResult, shard_result_key
from imagebatch_common.storage import ObjectNotFound, Storage
from imagebatch_operator import plan
from imagebatch_operator.decide import (
    JobView,
    Observation,
    PlanSummary,
    ShardTally,
    Task,
    current_run,
    stored_state,
)
from imagebatch_operator.ingest import plan_from_json, plan_key
from imagebatch_operator.settings import Settings
from imagebatch_operator.spec import parse_spec
from imagebatch_operator.status import RunState


def parse_indexes(text: str | None) -> frozenset[int]:
    """The Job's ``completedIndexes`` / ``failedIndexes`` notation, e.g. ``"0-2,5"``."""
    found: set[int] = set()
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            found.update(range(int(low), int(high) + 1))
        else:
            found.add(int(part))
    return frozenset(found)


def job_view(job: Mapping[str, Any]) -> JobView:
    """What the operator needs of a Job, from its watch body."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return JobView(
        name=str(meta.get("name")),
        run=str((meta.get("labels") or {}).get(plan.LABEL_RUN, "")),
        completed=parse_indexes(status.get("completedIndexes")),
        failed=parse_indexes(status.get("failedIndexes")),
        active=int(status.get("active") or 0),
        suspended=bool(spec.get("suspend")),
        parallelism=int(spec.get("parallelism") or 0),
        finished=conditions.get("Complete") == "True" or conditions.get("Failed") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
    )


def finished_shard(pod: Mapping[str, Any]) -> tuple[str, int] | None:
    """(Job name, index) of a worker pod that succeeded, else None.

    A succeeded pod completes its index for good; seeing it here is faster than waiting
    for the Job controller to fold it into the Job's status.
    """
    if (pod.get("status") or {}).get("phase") != "Succeeded":
        return None
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    index = (meta.get("annotations") or {}).get(INDEX_KEY) or labels.get(INDEX_KEY)
    if not job or not str(index).isdigit():
        return None
    return str(job), int(str(index))


INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def owner_batch(job: Mapping[str, Any]) -> str | None:
    """The name of the ImageBatch that controls a Job, if one does."""
    for ref in (job.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == plan.KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


def tally(result: ShardResult) -> ShardTally:
    ok = failed = skipped = bytes_in = bytes_out = 0
    for image in result.images:
        if image.ok:
            ok += 1
            skipped += image.skipped
            bytes_in += image.input_bytes
            bytes_out += image.output_bytes
        else:
            failed += 1
    return ShardTally(ok, failed, skipped, bytes_in, bytes_out)


@dataclass
class RunMemory:
    """What this process has read of one batch's current run (a cache, never the truth)."""

    run: str = ""
    plan: PlanSummary | None = None
    tallies: dict[int, ShardTally] = field(default_factory=dict)
    last_write: float = 0.0  # monotonic time of this process's last status write
    credentials_expire: datetime.datetime | None = None  # of the run's worker Secret
    credentials_issued: datetime.datetime | None = None  # when this process minted it
    credentials_run: str = ""


class Observer:
    """Builds observations; owns the per-run read caches."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        on_tally: Callable[[ShardTally], None] = lambda tally: None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.on_tally = on_tally  # each shard result read for the first time (metrics)
        self.memory: dict[tuple[str, str], RunMemory] = {}
        self._lock = threading.Lock()

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self.memory.pop(key, None)

    def memory_of(self, key: tuple[str, str], run: str) -> RunMemory:
        with self._lock:
            memory = self.memory.get(key)
            if memory is None or memory.run != run:
                last = memory.last_write if memory is not None else 0.0
                memory = RunMemory(run=run, last_write=last)
                self.memory[key] = memory
            return memory

    def observe(
        self,
        body: Mapping[str, Any],
        jobs: Iterable[JobView],
        tasks: Mapping[str, Task],
        now: datetime.datetime,
        monotonic: float,
        namespace_active_before: int = 0,
    ) -> Observation:
        meta = body["metadata"]
        ref = plan.BatchRef(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
        )
        spec = parse_spec(body.get("spec") or {})
        status = body.get("status") or {}
        job_views = tuple(jobs)
        base = Observation(
            now=now,
            ref=ref,
            spec=spec,
            status=status,
            finalizers=tuple(meta.get("finalizers") or ()),
            deleting=bool(meta.get("deletionTimestamp")),
            jobs=job_views,
            ingest=tasks.get("ingest"),
            merge=tasks.get("merge"),
            namespace_active_before=namespace_active_before,
        )
        if base.deleting:
            return base
        run, new = current_run(base)
        memory = self.memory_of((ref.namespace, ref.name), run)
        state = None if new else stored_state(status, run)
        bucket = plan.output_bucket(spec, self.settings)
        prefix = plan.output_prefix(spec, ref)
        needs_plan = state in (RunState.RUNNING, RunState.MERGING) or (
            state in (RunState.VALIDATING, RunState.SOURCE_UNAVAILABLE) and "ingest" not in tasks
        )
        if memory.plan is None and needs_plan:
            memory.plan = self._read_plan(bucket, prefix, run)
        job = next((j for j in job_views if j.run == run and not j.deleting), None)
        if job is not None and state is RunState.RUNNING:
            for index in sorted(job.completed - memory.tallies.keys()):
                memory.tallies[index] = self._read_tally(bucket, prefix, run, index)
                self.on_tally(memory.tallies[index])
        return Observation(
            now=now,
            ref=ref,
            spec=spec,
            status=status,
            finalizers=base.finalizers,
            deleting=False,
            jobs=job_views,
            plan=memory.plan,
            tallies=dict(memory.tallies),
            ingest=base.ingest,
            merge=base.merge,
            seconds_since_write=monotonic - memory.last_write,
            credentials_expire=memory.credentials_expire,
            credentials_issued=memory.credentials_issued,
            namespace_active_before=namespace_active_before,
        )

    def _read_plan(self, bucket: str, prefix: str, run: str) -> PlanSummary | None:
        try:
            return plan_from_json(self.storage.get(bucket, plan_key(prefix, run)))
        except ObjectNotFound:
            return None
        except ValueError:
            return None

    def _read_tally(self, bucket: str, prefix: str, run: str, index: int) -> ShardTally:
        try:
            return tally(
                ShardResult.from_json(
                    self.storage.get(bucket, shard_result_key(prefix, run, index))
                )
            )
        except ObjectNotFound:
            return ShardTally(malformed=True)
        except ValueError:
            return ShardTally(malformed=True)
