"""What to do about one batch, decided from one observation: a pure function.

``decide(observation, settings)`` reads plain data (the batch, its Jobs as the watch
last saw them, the shard results read so far, the state of its expensive tasks, the
clock) and returns a ``Decision``: the actions to take, in order, the status the batch
should have, Events to post and when to look again. Nothing here talks to a server,
sleeps or reads the clock, so every transition is a table-driven unit test.

The batch's run is identified by the spec fields that change what is produced
(``BatchSpec.run_identity``); ``suspend`` and ``parallelism`` are applied to the running
Job in place. A run goes: (queued) → validating (the CSV is read and planned by an
expensive task) → running (one Indexed Job) → merging (output.csv) → succeeded or
failed → the webhook is delivered along its schedule. Where it is comes from the
status the operator wrote (the only state it keeps), so a restart resumes there.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagebatch_operator import plan, webhook
from imagebatch_operator.plan import BatchRef
from imagebatch_operator.settings import Settings
from imagebatch_operator.spec import BatchSpec
from imagebatch_operator.status import (
    TRUE,
    ConditionType,
    Counts,
    EventReason,
    Reason,
    RunState,
    RunView,
    condition,
)

# How soon to look again at a CSV source that could not be read (a ConfigMap applied in
# the same commit may simply not exist yet).
SOURCE_RETRY_SECONDS = 15.0
# How soon to retry an expensive task that failed for a passing reason (storage down).
TASK_RETRY_SECONDS = 10.0
# Least seconds between two renewals of one run's credential, however short its life.
MIN_RENEW_SECONDS = 5.0

_REFUSALS = {
    Reason.OUTPUT_NOT_ALLOWED,
    Reason.SOURCE_NOT_ALLOWED,
    Reason.OVER_LIMIT,
    Reason.SECRET_CONFLICT,
}


# -- what is observed ----------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """One Job of the batch, as the watch last saw it."""

    name: str
    run: str
    completed: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    active: int = 0
    suspended: bool = False
    parallelism: int = 1
    finished: bool = False  # the Complete or Failed condition is True
    deleting: bool = False


@dataclass(frozen=True)
class ShardTally:
    """What one finished shard's result says, in numbers."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    malformed: bool = False  # the result could not be read as a shard result


@dataclass(frozen=True)
class PlanSummary:
    """What validating and planning a run found (``plan.json`` of the run)."""

    run: str
    rows: int
    images: int  # distinct images
    stored: int  # of which an output already existed: not in any shard
    shards: int
    per_shard: int
    message: str = ""  # for the Validated condition, e.g. the separator used


@dataclass(frozen=True)
class IngestOutcome:
    """The end of a validate-and-plan task."""

    kind: str  # planned | invalid | unavailable | refused | error
    message: str = ""
    plan: PlanSummary | None = None
    problems: tuple[Mapping[str, Any], ...] = ()
    notices: tuple[str, ...] = ()
    reason: Reason | None = None  # for refused
    errors_written: bool = False  # errors.csv was written (invalid)


@dataclass(frozen=True)
class MergeOutcome:
    """The end of a merge task: the run's final counters."""

    kind: str  # merged | error
    message: str = ""
    rows: Counts = field(default_factory=Counts)
    images: Counts = field(default_factory=Counts)
    shards: Counts = field(default_factory=Counts)
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class Task:
    """An expensive task of the current run: running, or finished with an outcome."""

    run: str
    running: bool
    ingest: IngestOutcome | None = None
    merge: MergeOutcome | None = None
    finished: datetime.datetime | None = None


@dataclass(frozen=True)
class Observation:
    """Everything one decision needs about one batch."""

    now: datetime.datetime
    ref: BatchRef
    spec: BatchSpec
    status: Mapping[str, Any]
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    jobs: tuple[JobView, ...] = ()
    plan: PlanSummary | None = None  # the current run's plan, when it exists
    tallies: Mapping[int, ShardTally] = field(default_factory=dict)
    ingest: Task | None = None
    merge: Task | None = None
    seconds_since_write: float = 1e9  # since this operator last wrote the status
    # When the run's worker credential expires, as last seen (None: not known yet), and
    # when this process last issued one.
    credentials_expire: datetime.datetime | None = None
    credentials_issued: datetime.datetime | None = None
    # Tenancy: batches of the namespace started before this one and still in progress.
    namespace_active_before: int = 0
    webhook_secret_missing: bool = False


# -- what to do ----------------------------------------------------------------


@dataclass(frozen=True)
class AddFinalizer:
    pass


@dataclass(frozen=True)
class RemoveFinalizer:
    pass


@dataclass(frozen=True)
class DeleteOutputs:
    bucket: str
    prefix: str


@dataclass(frozen=True)
class DeleteJob:
    name: str


@dataclass(frozen=True)
class StartIngest:
    run: str


@dataclass(frozen=True)
class StartMerge:
    run: str


@dataclass(frozen=True)
class EnsureCredentials:
    run: str


@dataclass(frozen=True)
class CreateJob:
    run: str
    shards: int
    recreate: bool = False  # the run's Job existed and is gone: say so when made again


@dataclass(frozen=True)
class PatchJob:
    name: str
    changes: Mapping[str, Any]


@dataclass(frozen=True)
class DeliverWebhook:
    run: str
    attempt: int


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: EventReason
    message: str


Action = (
    AddFinalizer
    | RemoveFinalizer
    | DeleteOutputs
    | DeleteJob
    | StartIngest
    | StartMerge
    | EnsureCredentials
    | CreateJob
    | PatchJob
    | DeliverWebhook
)


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()
    view: RunView | None = None  # the status to have; None leaves it
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None  # look again then, unless something happens first
    progress_only: bool = False  # the view changes only counters: the write may wait


# -- helpers ---------------------------------------------------------------------


def format_time(when: datetime.datetime) -> str:
    return webhook.format_time(when)


def current_run(obs: Observation) -> tuple[str, bool]:
    """The run the spec asks for, and whether it is a new one."""
    identity = obs.spec.run_identity()
    stored_run = obs.status.get("run")
    if stored_run and obs.status.get("runIdentity") == identity:
        return str(stored_run), False
    return plan.run_id(obs.ref), True


def stored_state(status: Mapping[str, Any], run: str) -> RunState | None:
    """Where the status says ``run`` is; None when it says nothing of this run."""
    if status.get("run") != run:
        return None
    complete = condition(status, ConditionType.COMPLETE)
    if complete is not None and complete.get("status") == TRUE:
        return RunState.SUCCEEDED
    failed = condition(status, ConditionType.FAILED)
    if failed is not None and failed.get("status") == TRUE:
        reason = failed.get("reason")
        if reason == Reason.INVALID_CSV:
            return RunState.INVALID
        if reason in _REFUSALS:
            return RunState.REFUSED
        return RunState.FAILED
    validated = condition(status, ConditionType.VALIDATED)
    if validated is not None and validated.get("status") == TRUE:
        reconciling = condition(status, ConditionType.RECONCILING)
        if reconciling is not None and reconciling.get("reason") == Reason.MERGING:
            return RunState.MERGING
        return RunState.RUNNING
    if validated is not None and validated.get("reason") == Reason.SOURCE_UNAVAILABLE:
        return RunState.SOURCE_UNAVAILABLE
    if validated is not None and validated.get("reason") == Reason.QUEUED:
        return RunState.QUEUED
    return RunState.VALIDATING


def _counts(raw: Any, *, active: bool = False) -> Counts:
    raw = raw or {}
    return Counts(
        total=int(raw.get("total", 0)),
        succeeded=int(raw.get("succeeded", 0)),
        failed=int(raw.get("failed", 0)),
        active=int(raw.get("active", 0)) if active else 0,
        skipped=int(raw.get("skipped", 0)),
    )


def view_from_status(obs: Observation, run: str, state: RunState) -> RunView:
    """The view that reproduces a finished run's stored status (for the generation now)."""
    s = obs.status
    failed = condition(s, ConditionType.FAILED)
    validated = condition(s, ConditionType.VALIDATED)
    refusal = (
        Reason(str(failed.get("reason")))
        if failed is not None and failed.get("reason") in _REFUSALS
        else None
    )
    message = (
        str(failed.get("message", ""))
        if failed is not None and state in (RunState.INVALID, RunState.REFUSED, RunState.FAILED)
        else ""
    )
    return RunView(
        generation=obs.ref.generation,
        state=state,
        run=run,
        identity=obs.spec.run_identity(),
        message=message,
        reason=refusal,
        rows=_counts(s.get("rows")),
        images=_counts(s.get("images")),
        shards=_counts(s.get("shards")),
        input_bytes=int((s.get("bytes") or {}).get("input", 0)),
        output_bytes=int((s.get("bytes") or {}).get("output", 0)),
        problems=tuple(s.get("validationErrors") or ()),
        output=s.get("output"),
        start_time=s.get("startTime"),
        completion_time=s.get("completionTime"),
        validated_message=str(validated.get("message", ""))
        if validated is not None and validated.get("status") == TRUE
        else "",
        webhook_configured=obs.spec.webhook is not None,
    )


def _renewal_time(obs: Observation, settings: Settings) -> datetime.datetime | None:
    """When the run's temporary credential is due for renewal; None if it needs none."""
    if settings.worker_credentials != "sts":
        return None
    if obs.credentials_expire is None:
        return obs.now  # not seen yet by this process: look at the Secret
    due = obs.credentials_expire - datetime.timedelta(seconds=settings.credential_renew_seconds)
    if obs.credentials_issued is not None:
        due = max(due, obs.credentials_issued + datetime.timedelta(seconds=MIN_RENEW_SECONDS))
    return due


def _refusal(obs: Observation, settings: Settings) -> tuple[Reason, str] | None:
    """Why this operator will not run the spec at all, or None."""
    spec = obs.spec
    bucket = plan.output_bucket(spec, settings)
    if bucket not in settings.allowed_buckets:
        allowed = ", ".join(settings.allowed_buckets)
        return (
            Reason.OUTPUT_NOT_ALLOWED,
            f"spec.output.bucket {bucket!r} is not one of the buckets this operator may "
            f"write to ({allowed})",
        )
    if spec.source.s3 is not None:
        source_bucket, key = spec.source.s3
        if source_bucket not in settings.allowed_buckets:
            return (
                Reason.SOURCE_NOT_ALLOWED,
                f"spec.source.s3.bucket {source_bucket!r} is not one of the buckets this "
                f"operator may read ({', '.join(settings.allowed_buckets)})",
            )
        if not key.startswith(f"{obs.ref.namespace}/"):
            return (
                Reason.SOURCE_NOT_ALLOWED,
                f"spec.source.s3.key must be under {obs.ref.namespace}/ (the batch's own "
                "namespace); a batch reads only its namespace's objects",
            )
    if spec.sharding.parallelism > settings.max_parallelism:
        return (
            Reason.OVER_LIMIT,
            f"spec.sharding.parallelism {spec.sharding.parallelism} is over this operator's "
            f"limit of {settings.max_parallelism} (max parallelism per batch)",
        )
    return None


def _job_of(obs: Observation, run: str) -> tuple[JobView | None, bool]:
    """The run's live Job, and whether one of its Jobs is still being deleted."""
    live = [j for j in obs.jobs if j.run == run and not j.deleting]
    deleting = any(j.run == run and j.deleting for j in obs.jobs)
    return (live[0] if live else None), deleting


def _base(obs: Observation, run: str, state: RunState, **fields: Any) -> RunView:
    start = obs.status.get("startTime") if obs.status.get("run") == run else None
    return RunView(
        generation=obs.ref.generation,
        state=state,
        run=run,
        identity=obs.spec.run_identity(),
        suspended=obs.spec.suspend,
        start_time=start or format_time(obs.now),
        webhook_configured=obs.spec.webhook is not None,
        webhook=webhook.fresh_record(obs.ref.uid, run)
        if obs.spec.webhook is not None and (obs.status.get("webhook") or {}).get("run") != run
        else None,
        webhook_state=Reason.WEBHOOK_PENDING
        if obs.spec.webhook is not None and (obs.status.get("webhook") or {}).get("run") != run
        else None,
        webhook_message="sent when every shard has finished",
        **fields,
    )


def _progress(obs: Observation, summary: PlanSummary, job: JobView | None) -> dict[str, Any]:
    """Counters of a running batch from its plan and the shard results read so far."""
    completed = job.completed if job is not None else frozenset()
    tallies = [t for i, t in obs.tallies.items() if i in completed]
    malformed = sum(1 for t in tallies if t.malformed)
    ok = sum(t.ok for t in tallies)
    skipped = sum(t.skipped for t in tallies)
    failed = sum(t.failed for t in tallies)
    return {
        "rows": Counts(total=summary.rows),
        "images": Counts(
            total=summary.images,
            succeeded=summary.stored + ok,
            failed=failed,
            skipped=summary.stored + skipped,
        ),
        "shards": Counts(
            total=summary.shards,
            succeeded=len(completed) - malformed,
            # A shard whose result cannot be read counts as failed now; the merge reports
            # each of its images with that reason.
            failed=(len(job.failed) if job is not None else 0) + malformed,
            active=job.active if job is not None else 0,
        ),
        "input_bytes": sum(t.bytes_in for t in tallies),
        "output_bytes": sum(t.bytes_out for t in tallies),
        "validated_message": summary.message,
    }


# -- the decision ----------------------------------------------------------------


def decide(obs: Observation, settings: Settings) -> Decision:
    """Actions, status, Events and the next look for one batch."""
    spec = obs.spec
    prefix = plan.output_prefix(spec, obs.ref)
    bucket = plan.output_bucket(spec, settings)
    want_finalizer = spec.output.deletion_policy == "Delete"

    if obs.deleting:
        if plan.FINALIZER not in obs.finalizers:
            return Decision()
        cleanup: tuple[Action, ...] = (
            (DeleteOutputs(bucket, prefix), RemoveFinalizer())
            if want_finalizer and bucket in settings.allowed_buckets
            else (RemoveFinalizer(),)
        )
        return Decision(actions=cleanup)

    actions: list[Action] = []
    events: list[Event] = []
    if want_finalizer and plan.FINALIZER not in obs.finalizers:
        actions.append(AddFinalizer())
    elif not want_finalizer and plan.FINALIZER in obs.finalizers:
        actions.append(RemoveFinalizer())

    run, new_run = current_run(obs)
    for old in obs.jobs:
        if old.run != run and not old.deleting:
            actions.append(DeleteJob(old.name))
            events.append(
                Event("Normal", EventReason.RUN_REPLACED, f"spec changed: deleted Job {old.name}")
            )
    state = None if new_run else stored_state(obs.status, run)

    def done(
        view: RunView | None, requeue: float | None = None, progress: bool = False
    ) -> Decision:
        return Decision(tuple(actions), view, tuple(events), requeue, progress)

    # Finished runs: only the webhook is left, if anything.
    if state in (RunState.SUCCEEDED, RunState.FAILED, RunState.INVALID, RunState.REFUSED):
        assert state is not None
        view = view_from_status(obs, run, state)
        return _webhook(obs, settings, run, view, actions, events)

    refusal = _refusal(obs, settings)
    if refusal is not None:
        reason, message = refusal
        events.append(Event("Warning", EventReason.REFUSED, message))
        return done(
            _base(
                obs,
                run,
                RunState.REFUSED,
                reason=reason,
                message=message,
                completion_time=format_time(obs.now),
            )
        )

    if state in (None, RunState.QUEUED, RunState.VALIDATING, RunState.SOURCE_UNAVAILABLE):
        if obs.namespace_active_before >= settings.max_running_per_namespace:
            message = (
                f"queued: {obs.namespace_active_before} batches of this namespace are in "
                f"progress, the most allowed at once is {settings.max_running_per_namespace}"
            )
            if state is not RunState.QUEUED:
                events.append(Event("Normal", EventReason.QUEUED, message))
            return done(_base(obs, run, RunState.QUEUED, message=message), settings.resync_seconds)
        return _validate(obs, settings, run, actions, events)

    summary = obs.plan
    if summary is None:
        # The plan of a running run could not be read yet (storage down): look again.
        return done(None, TASK_RETRY_SECONDS)
    job, job_deleting = _job_of(obs, run)
    progress = _progress(obs, summary, job)
    # Every index done (from the Job, or a succeeded pod seen first) means finished,
    # even before the Job controller says so.
    every_shard = job is not None and len(job.completed | job.failed) >= summary.shards
    if (
        summary.shards > 0
        and state is RunState.RUNNING
        and (job is None or not (job.finished or every_shard))
    ):
        if job is None:
            if not job_deleting:
                actions.append(EnsureCredentials(run))
                actions.append(CreateJob(run, summary.shards, recreate=True))
            view = _base(obs, run, RunState.RUNNING, **progress)
            return done(view, settings.resync_seconds)
        requeue = settings.resync_seconds
        renew_at = _renewal_time(obs, settings)
        if renew_at is not None:
            if obs.now >= renew_at:
                actions.append(EnsureCredentials(run))
            else:
                requeue = min(requeue, max((renew_at - obs.now).total_seconds(), MIN_RENEW_SECONDS))
        changes: dict[str, Any] = {}
        if job.suspended != spec.suspend:
            changes["suspend"] = spec.suspend
        parallelism = max(1, min(spec.sharding.parallelism, summary.shards))
        if job.parallelism != parallelism:
            changes["parallelism"] = parallelism
        if changes:
            actions.append(PatchJob(job.name, changes))
        view = _base(obs, run, RunState.RUNNING, **progress)
        return done(view, requeue, progress=True)

    # Every shard has finished (or there was none): merge the results into output.csv.
    task = obs.merge if obs.merge is not None and obs.merge.run == run else None
    merging = _base(obs, run, RunState.MERGING, **progress)
    if task is None:
        actions.append(StartMerge(run))
        return done(merging, settings.resync_seconds)
    if task.running or task.merge is None:
        return done(merging, settings.resync_seconds)
    if task.merge.kind == "error":
        waited = (obs.now - task.finished).total_seconds() if task.finished else 1e9
        if waited < TASK_RETRY_SECONDS:
            return done(merging, TASK_RETRY_SECONDS - waited)
        actions.append(StartMerge(run))
        return done(merging, settings.resync_seconds)
    merged = task.merge
    percent = 100.0 * merged.images.failed / merged.images.total if merged.images.total else 0.0
    limit = spec.max_failed_image_percent
    failed = percent > limit
    message = (
        f"{merged.images.failed} of {merged.images.total} images failed ({percent:.1f}%), "
        f"above the limit of {limit:g}%; see errors.csv"
        if failed
        else ""
    )
    output = {
        "csv": f"s3://{bucket}/{prefix}output.csv",
        "errors": f"s3://{bucket}/{prefix}errors.csv",
    }
    if settings.public_url:
        output["csvUrl"] = f"{settings.public_url}/{prefix}output.csv"
        output["errorsUrl"] = f"{settings.public_url}/{prefix}errors.csv"
    final = _base(
        obs,
        run,
        RunState.FAILED if failed else RunState.SUCCEEDED,
        message=message,
        rows=merged.rows,
        images=merged.images,
        shards=merged.shards,
        input_bytes=merged.bytes_in,
        output_bytes=merged.bytes_out,
        output=output,
        completion_time=format_time(obs.now),
        validated_message=summary.message,
    )
    summary_text = (
        f"{merged.images.succeeded}/{merged.images.total} images compressed, "
        f"{merged.images.failed} failed; output at {output['csv']}"
    )
    if failed:
        events.append(Event("Warning", EventReason.FAILED, message))
    else:
        events.append(Event("Normal", EventReason.SUCCEEDED, summary_text))
    return _webhook(obs, settings, run, final, actions, events)


def _validate(
    obs: Observation,
    settings: Settings,
    run: str,
    actions: list[Action],
    events: list[Event],
) -> Decision:
    """A run not yet validated: start the task, wait for it, or take its outcome."""

    def done(view: RunView, requeue: float | None) -> Decision:
        return Decision(tuple(actions), view, tuple(events), requeue)

    task = obs.ingest if obs.ingest is not None and obs.ingest.run == run else None
    summary = obs.plan if obs.plan is not None and obs.plan.run == run else None
    outcome = task.ingest if task is not None and not task.running else None
    if summary is None and outcome is not None and outcome.kind == "planned":
        summary = outcome.plan
    if summary is not None:
        # Planned: the Job starts (when there is anything to process).
        for notice in outcome.notices if outcome is not None else ():
            events.append(Event("Warning", EventReason.CSV_NOTICE, notice))
        events.append(
            Event(
                "Normal",
                EventReason.VALIDATED,
                f"run {run}: {summary.rows} rows, {summary.images} distinct images "
                f"({summary.stored} already stored) in {summary.shards} shards",
            )
        )
        if summary.shards > 0:
            actions.append(EnsureCredentials(run))
            actions.append(CreateJob(run, summary.shards))
        view = _base(
            obs,
            run,
            RunState.RUNNING,
            rows=Counts(total=summary.rows),
            images=Counts(total=summary.images, succeeded=summary.stored, skipped=summary.stored),
            shards=Counts(total=summary.shards),
            validated_message=summary.message,
        )
        return done(view, 0.0 if summary.shards == 0 else settings.resync_seconds)
    reading = _base(obs, run, RunState.VALIDATING, message="reading and validating the CSV")
    if task is None:
        actions.append(StartIngest(run))
        return done(reading, settings.resync_seconds)
    if outcome is None:
        return done(reading, settings.resync_seconds)
    if outcome.kind == "invalid":
        events.append(Event("Warning", EventReason.INVALID_CSV, outcome.message))
        output = None
        if outcome.errors_written:
            prefix = plan.output_prefix(obs.spec, obs.ref)
            bucket = plan.output_bucket(obs.spec, settings)
            output = {"errors": f"s3://{bucket}/{prefix}errors.csv"}
            if settings.public_url:
                output["errorsUrl"] = f"{settings.public_url}/{prefix}errors.csv"
        view = _base(
            obs,
            run,
            RunState.INVALID,
            message=outcome.message,
            problems=outcome.problems[: settings.status_problem_count],
            output=output,
            completion_time=format_time(obs.now),
        )
        return _webhook(obs, settings, run, view, actions, events)
    if outcome.kind == "refused":
        events.append(Event("Warning", EventReason.REFUSED, outcome.message))
        view = _base(
            obs,
            run,
            RunState.REFUSED,
            reason=outcome.reason or Reason.OVER_LIMIT,
            message=outcome.message,
            completion_time=format_time(obs.now),
        )
        return _webhook(obs, settings, run, view, actions, events)
    # Unavailable, or a passing error: say so, and read the source again a little later.
    waited = (obs.now - task.finished).total_seconds() if task.finished is not None else 1e9
    view = _base(obs, run, RunState.SOURCE_UNAVAILABLE, message=outcome.message)
    if stored_state(obs.status, run) is not RunState.SOURCE_UNAVAILABLE:
        events.append(Event("Warning", EventReason.SOURCE_UNAVAILABLE, outcome.message))
    if waited < SOURCE_RETRY_SECONDS:
        return done(view, SOURCE_RETRY_SECONDS - waited)
    actions.append(StartIngest(run))
    return done(view, settings.resync_seconds)


def _webhook(
    obs: Observation,
    settings: Settings,
    run: str,
    view: RunView,
    actions: list[Action],
    events: list[Event],
) -> Decision:
    """A finished run: deliver the webhook when due, or wait for its next attempt."""
    hook = obs.spec.webhook
    record = dict(obs.status.get("webhook") or {})
    if hook is None:
        return Decision(tuple(actions), view, tuple(events), None)
    if record.get("run") != run:
        record = webhook.fresh_record(obs.ref.uid, run)
        view = _with_record(
            view, record, Reason.WEBHOOK_PENDING, "sent when every shard has finished"
        )
    if record.get("deliveredTime") or record.get("gaveUp"):
        return Decision(tuple(actions), view, tuple(events), None)
    due = webhook.parse_time(record.get("nextAttemptTime"))
    if due is not None and due > obs.now:
        wait = (due - obs.now).total_seconds()
        return Decision(tuple(actions), view, tuple(events), wait)
    attempt = int(record.get("attempts") or 0) + 1
    if attempt == 1 and settings.webhook_schedule[0] > 0 and due is None:
        first = obs.now + datetime.timedelta(seconds=settings.webhook_schedule[0])
        record["nextAttemptTime"] = format_time(first)
        view = _with_record(
            view, record, Reason.WEBHOOK_PENDING, f"first attempt at {record['nextAttemptTime']}"
        )
        return Decision(tuple(actions), view, tuple(events), settings.webhook_schedule[0])
    actions.append(DeliverWebhook(run, attempt))
    return Decision(tuple(actions), view, tuple(events), None)


def _with_record(view: RunView, record: Mapping[str, Any], state: Reason, message: str) -> RunView:
    from dataclasses import replace

    return replace(view, webhook=dict(record), webhook_state=state, webhook_message=message)


def webhook_result(
    record: Mapping[str, Any],
    attempt: webhook.Attempt,
    schedule: tuple[float, ...],
    now: datetime.datetime,
) -> tuple[dict[str, Any], Reason, str, Event | None, float | None]:
    """A delivery attempt's outcome: the new record, the condition, an Event, the next look."""
    new, verdict, message = webhook.next_record(record, attempt, schedule, now)
    if verdict == "delivered":
        return (
            new,
            Reason.WEBHOOK_DELIVERED,
            message,
            Event("Normal", EventReason.WEBHOOK_DELIVERED, message),
            None,
        )
    if verdict == "gone":
        return (
            new,
            Reason.WEBHOOK_GONE,
            message,
            Event("Warning", EventReason.WEBHOOK_FAILED, message),
            None,
        )
    if verdict == "failed":
        return (
            new,
            Reason.WEBHOOK_FAILED,
            message,
            Event("Warning", EventReason.WEBHOOK_FAILED, message),
            None,
        )
    due = webhook.parse_time(new.get("nextAttemptTime"))
    wait = max(0.0, (due - now).total_seconds()) if due is not None else None
    # A retry is worth one Event on the first failure, not one per attempt.
    event = Event("Warning", EventReason.WEBHOOK_RETRYING, message) if attempt.number == 1 else None
    return new, Reason.WEBHOOK_RETRYING, message, event, wait
