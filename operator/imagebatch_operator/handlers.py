"""kopf handlers: thin. Gather, call the reconciler, map errors to a wait.

One daemon per ImageBatch drives it through ``Reconciler.reconcile`` in a loop; the
daemon's ``body`` is kept current by kopf's watch, so a spec change is seen on the next
pass without a separate update handler. Handlers return None (kopf would otherwise write
``status.<handler>``, which the schema prunes). Transient failures (MinIO or the API
server unreachable) back off and retry; nothing is retried in a tight loop.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from imagebatch_common.storage import Storage, StorageError
from imagebatch_operator import plan
from imagebatch_operator.fetching import GuardedPoster, csv_url_opener
from imagebatch_operator.kube import ApiUnavailable, Kube
from imagebatch_operator.reconcile import Reconciler, RunCache
from imagebatch_operator.settings import Settings

_state: dict[str, Any] = {}


class KopfEvents:
    """Events on the ImageBatch, posted through kopf."""

    def __init__(self, body: kopf.Body):
        self.body = body

    def normal(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Normal", reason=reason, message=message)

    def warning(self, reason: str, message: str) -> None:
        kopf.event(self.body, type="Warning", reason=reason, message=message)


def reconciler() -> Reconciler:
    if "reconciler" not in _state:
        settings = Settings.from_env()
        storage = Storage(settings.storage)
        _state["reconciler"] = Reconciler(
            settings, Kube(), storage, csv_url_opener(settings), GuardedPoster(settings.allow_nets)
        )
    value: Reconciler = _state["reconciler"]
    return value


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own logs are not Events; Events are posted on purpose with a reason.
    settings.posting.level = logging.WARNING
    # kopf keeps its progress in annotations, never in our status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="imagebatch.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="imagebatch.dev", key="last-handled-configuration"
    )
    # One daemon thread per batch: size the pool for many batches at once.
    settings.execution.max_workers = 64
    settings.watching.server_timeout = 300
    reconciler()


@kopf.daemon(plan.GROUP, plan.VERSION, plan.PLURAL, cancellation_timeout=10.0)
def drive(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
    """Drive one batch: validate, run, follow, finish, deliver; then watch for spec changes."""
    cache = RunCache()
    events = KopfEvents(body)
    failures = 0
    while not stopped:
        try:
            delay = reconciler().reconcile(body, cache, events)
            failures = 0
        except (StorageError, ApiUnavailable) as error:
            failures += 1
            delay = min(2.0**failures, 60.0)
            logger.warning("will retry in %.0fs: %s", delay, error)
        except Exception as error:  # a defect: say so on the object, back off, keep driving
            failures += 1
            delay = min(2.0**failures, 60.0)
            logger.exception("unexpected error; will retry in %.0fs", delay)
            if failures == 1:
                events.warning("ReconcileError", f"{type(error).__name__}: {error}"[:500])
        generation = body.get("metadata", {}).get("generation")
        # Wake early when the spec changes (kopf updates ``body`` in place).
        waited = 0.0
        while waited < delay and not stopped:
            stopped.wait(min(0.5, delay - waited))
            waited += 0.5
            if body.get("metadata", {}).get("generation") != generation:
                break


@kopf.on.delete(plan.GROUP, plan.VERSION, plan.PLURAL)
def cleanup(
    spec: kopf.Spec, meta: kopf.Meta, namespace: str | None, logger: kopf.Logger, **_: Any
) -> None:
    """Outputs stay unless ``spec.output.deletionPolicy`` is Delete. Jobs go by ownership."""
    if (spec.get("output") or {}).get("deletionPolicy") != "Delete":
        return
    r = reconciler()
    ref = plan.BatchRef(str(namespace), meta["name"], meta["uid"], int(meta.get("generation") or 1))
    bucket = plan.output_bucket(spec, r.settings)
    prefix = plan.output_prefix(spec, ref)
    try:
        removed = r.storage.delete_prefix(bucket, prefix)
    except StorageError as error:
        raise kopf.TemporaryError(f"cannot delete outputs yet: {error}", delay=15) from error
    logger.info("deleted %d objects under s3://%s/%s", removed, bucket, prefix)
