"""Carry out a ``Decision`` through the Kubernetes and storage adapters.

Actions run in the order decided; each is idempotent (a Job that exists is not made
twice, a Job already gone is not an error). Events are posted once per transition.
The status is written only when the computed one differs from what is stored; a change
of counters alone waits until ``min_write_seconds`` have passed since this batch's last
write (the pass is looked at again then), so a busy batch costs about one write a
second. A webhook attempt is one POST; its outcome is written at once, with the time
of the next attempt.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from imagebatch_common.contract import errors_csv_key, output_csv_key
from imagebatch_common.redact import redact_text
from imagebatch_common.storage import Storage
from imagebatch_operator import plan, webhook
from imagebatch_operator.decide import (
    AddFinalizer,
    CreateJob,
    Decision,
    DeleteJob,
    DeleteOutputs,
    DeliverWebhook,
    EnsureCredentials,
    Event,
    Observation,
    PatchJob,
    RemoveFinalizer,
    StartIngest,
    StartMerge,
    webhook_result,
)
from imagebatch_operator.fetching import Poster, attempt_delivery
from imagebatch_operator.kube import Conflict, Kube
from imagebatch_operator.observe import RunMemory
from imagebatch_operator.settings import Settings
from imagebatch_operator.status import (
    EventReason,
    Phase,
    Reason,
    RunState,
    RunView,
    compute_status,
    differs,
    only_counters_differ,
)

log = logging.getLogger("imagebatch.act")


class Tasks(Protocol):
    """Where expensive work is started (the controller's bounded pool)."""

    def start_ingest(self, obs: Observation, run: str) -> None: ...

    def start_merge(self, obs: Observation, run: str) -> None: ...


class Credentials(Protocol):
    """Makes sure a run's worker credentials exist, fresh, in the batch's namespace."""

    def ensure(
        self, obs: Observation, run: str, memory: RunMemory, now: datetime.datetime
    ) -> tuple[Reason | None, bool]:
        """(why it cannot be, or None; whether an expiring credential was renewed)."""
        ...


@dataclass(frozen=True)
class Result:
    """What a pass did: the object as now stored (if written) and when to look again."""

    stored: dict[str, Any] | None
    requeue_after: float | None


def utcnow_text(now: datetime.datetime) -> str:
    return webhook.format_time(now)


class Actor:
    """Executes decisions. Blocking; runs on the controller's thread pool."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        storage: Storage,
        poster: Poster,
        tasks: Tasks,
        credentials: Credentials,
        clock: Callable[[], float] = time.monotonic,
        on_webhook: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.storage = storage
        self.poster = poster
        self.tasks = tasks
        self.credentials = credentials
        self.clock = clock
        self.on_webhook = on_webhook  # each delivery attempt's outcome (metrics)

    def url_of(self, bucket: str, key: str) -> str:
        """Public URL of an object: under the public base, else a presigned GET."""
        if self.settings.public_url:
            return f"{self.settings.public_url}/{key}"
        return self.storage.presigned_get(bucket, key, self.settings.presign_seconds)

    # -- the pass ----------------------------------------------------------------

    def execute(
        self,
        body: Mapping[str, Any],
        obs: Observation,
        decision: Decision,
        memory: RunMemory,
    ) -> Result:
        view = decision.view
        requeue = decision.requeue_after
        events = list(decision.events)
        stored: dict[str, Any] | None = None
        for action in decision.actions:
            if isinstance(action, AddFinalizer | RemoveFinalizer):
                stored = self._finalizers(body, add=isinstance(action, AddFinalizer))
                if stored is None:
                    return Result(None, 0.5)  # changed meanwhile: look again at the new one
                body = stored
            elif isinstance(action, DeleteOutputs):
                removed = self.storage.delete_prefix(action.bucket, action.prefix)
                log.info(
                    "%s/%s deleted: removed %d objects under s3://%s/%s",
                    obs.ref.namespace,
                    obs.ref.name,
                    removed,
                    action.bucket,
                    action.prefix,
                )
            elif isinstance(action, DeleteJob):
                self.kube.delete_job(obs.ref.namespace, action.name)
            elif isinstance(action, StartIngest):
                self.tasks.start_ingest(obs, action.run)
            elif isinstance(action, StartMerge):
                self.tasks.start_merge(obs, action.run)
            elif isinstance(action, EnsureCredentials):
                refused, renewed = self.credentials.ensure(obs, action.run, memory, obs.now)
                if renewed:
                    events.append(
                        Event(
                            "Normal",
                            EventReason.CREDENTIALS_RENEWED,
                            f"run {action.run}: storage credentials renewed before they expire; "
                            "pods started from now on use the new ones",
                        )
                    )
                if refused is not None and view is not None:
                    message = (
                        f"the Secret {plan.storage_secret_name(obs.ref)} exists and is not this "
                        "batch's; rename or delete it"
                        if refused is Reason.SECRET_CONFLICT
                        else "the run's storage credentials cannot be made now; retrying"
                    )
                    if refused is Reason.SECRET_CONFLICT:
                        view = replace(
                            view, state=RunState.REFUSED, reason=refused, message=message
                        )
                        events.append(Event("Warning", EventReason.REFUSED, message))
                        break
                    events.append(Event("Warning", EventReason.REFUSED, message))
                    requeue = 15.0
                    break
            elif isinstance(action, CreateJob):
                self._create_job(obs, action, events)
            elif isinstance(action, PatchJob):
                self.kube.patch_job(obs.ref.namespace, action.name, action.changes)
            elif isinstance(action, DeliverWebhook):
                assert view is not None
                view, events, requeue = self._deliver(obs, view, action, events)
        for event in events:
            self._post(body, event)
        if view is None:
            return Result(stored, requeue)
        return self._write(body, obs, view, decision.progress_only, memory, requeue, stored)

    # -- actions -------------------------------------------------------------------

    def _finalizers(self, body: Mapping[str, Any], *, add: bool) -> dict[str, Any] | None:
        meta = body["metadata"]
        current = list(meta.get("finalizers") or [])
        wanted = (
            [*current, plan.FINALIZER]
            if add and plan.FINALIZER not in current
            else [f for f in current if f != plan.FINALIZER]
        )
        try:
            return self.kube.set_finalizers(
                meta["namespace"], meta["name"], wanted, str(meta.get("resourceVersion"))
            )
        except Conflict:
            return None

    def _create_job(self, obs: Observation, action: CreateJob, events: list[Event]) -> None:
        bucket = plan.output_bucket(obs.spec, self.settings)
        prefix = plan.output_prefix(obs.spec, obs.ref)
        manifest = plan.build_job(
            obs.ref,
            obs.spec,
            self.settings,
            run=action.run,
            shards=action.shards,
            bucket=bucket,
            prefix=prefix,
        )
        name = manifest["metadata"]["name"]
        if not self.kube.create_job(manifest):
            return  # there already: an earlier pass made it
        if action.recreate:
            events.append(
                Event(
                    "Warning",
                    EventReason.JOB_RECREATED,
                    f"Job {name} was missing and has been created again; shards already "
                    "done are skipped",
                )
            )
        else:
            events.append(
                Event(
                    "Normal",
                    EventReason.JOB_CREATED,
                    f"run {action.run}: Job {name} with {action.shards} shards",
                )
            )

    def _deliver(
        self, obs: Observation, view: RunView, action: DeliverWebhook, events: list[Event]
    ) -> tuple[RunView, list[Event], float | None]:
        hook = obs.spec.webhook
        assert hook is not None
        record = dict(view.webhook or obs.status.get("webhook") or {})
        if record.get("run") != action.run:
            record = webhook.fresh_record(obs.ref.uid, action.run)
        secret: str | None = None
        attempt_time = datetime.datetime.now(datetime.UTC)
        if hook.secret_name and hook.secret_key:
            secret = self.kube.secret_value(obs.ref.namespace, hook.secret_name, hook.secret_key)
        if hook.secret_name and secret is None:
            attempt = webhook.Attempt(
                action.attempt,
                utcnow_text(attempt_time),
                None,
                f"the signing secret {hook.secret_name}/{hook.secret_key} does not exist",
                False,
                True,
            )
        else:
            body = webhook.encode(self._payload(obs, view, action.run))
            attempt = attempt_delivery(
                self.poster,
                hook.url,
                body,
                webhook.headers(str(record["id"]), body, secret, attempt_time),
                action.attempt,
                self.settings.webhook_timeout_seconds,
                lambda: utcnow_text(datetime.datetime.now(datetime.UTC)),
            )
        new, state, message, event, wait = webhook_result(
            record, attempt, self.settings.webhook_schedule, datetime.datetime.now(datetime.UTC)
        )
        log.info(
            "%s/%s webhook attempt %d: %s",
            obs.ref.namespace,
            obs.ref.name,
            action.attempt,
            redact_text(message),
        )
        if event is not None:
            events.append(event)
        self.on_webhook(
            {
                Reason.WEBHOOK_DELIVERED: "delivered",
                Reason.WEBHOOK_GONE: "gone",
                Reason.WEBHOOK_FAILED: "failed",
            }.get(state, "retrying")
        )
        view = replace(view, webhook=new, webhook_state=state, webhook_message=message)
        return view, events, wait

    def _payload(self, obs: Observation, view: RunView, run: str) -> dict[str, Any]:
        bucket = plan.output_bucket(obs.spec, self.settings)
        prefix = plan.output_prefix(obs.spec, obs.ref)
        has_output = bool(view.output and view.output.get("csv"))
        has_errors = bool(view.output and view.output.get("errors"))
        return webhook.build_payload(
            namespace=obs.ref.namespace,
            name=obs.ref.name,
            uid=obs.ref.uid,
            run=run,
            phase=(Phase.SUCCEEDED if view.state is RunState.SUCCEEDED else Phase.FAILED).value,
            rows=view.rows.as_status(),
            images=view.images.as_status(skipped=True),
            shards=view.shards.as_status(),
            output_csv_url=self.url_of(bucket, output_csv_key(prefix)) if has_output else "",
            errors_csv_url=self.url_of(bucket, errors_csv_key(prefix)) if has_errors else "",
            completion_time=view.completion_time or utcnow_text(obs.now),
        )

    def _post(self, body: Mapping[str, Any], event: Event) -> None:
        try:
            self.kube.post_event(body, event.type, event.reason.value, redact_text(event.message))
        except Exception as error:  # an Event is worth less than the pass that made it
            log.warning("could not post an Event: %s", error)

    # -- status ----------------------------------------------------------------------

    def _write(
        self,
        body: Mapping[str, Any],
        obs: Observation,
        view: RunView,
        progress_only: bool,
        memory: RunMemory,
        requeue: float | None,
        stored: dict[str, Any] | None,
    ) -> Result:
        current = body.get("status") or {}
        computed = compute_status(current, view, utcnow_text(obs.now))
        if not differs(current, computed):
            return Result(stored, requeue)
        if progress_only and only_counters_differ(current, computed):
            since = self.clock() - memory.last_write
            if since < self.settings.min_write_seconds:
                wait = self.settings.min_write_seconds - since
                return Result(stored, wait if requeue is None else min(wait, requeue))
        written = self.kube.patch_status(obs.ref.namespace, obs.ref.name, computed)
        memory.last_write = self.clock()
        log.info(
            "status %s/%s written: phase=%s images=%s (run %s)",
            obs.ref.namespace,
            obs.ref.name,
            computed["phase"],
            computed["imagesSummary"],
            view.run,
        )
        return Result(written, requeue)
