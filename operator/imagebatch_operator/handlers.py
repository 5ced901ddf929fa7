"""kopf handlers: the thin shell that feeds watch events to the controller.

Only this module (and ``main``) imports kopf. kopf watches ImageBatches and the Jobs that
carry the batch label, keeps an index of those Jobs by batch, and calls these handlers;
each one only records what changed and puts the batch's key in the controller's queue.
No handler holds a thread or a task per batch, none blocks, and none returns a value
(kopf would write it into ``status.<handler>``, which the schema prunes). kopf writes
nothing to the objects: the operator has no changing handlers, so no progress or
last-handled annotations, and no kopf finalizer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf

from imagebatch_operator import plan
from imagebatch_operator.controller import Controller, Key
from imagebatch_operator.decide import JobView
from imagebatch_operator.fetching import GuardedPoster, cluster_endpoints, csv_url_opener
from imagebatch_operator.kube import Kube
from imagebatch_operator.metrics import MeteredStorage, Metrics
from imagebatch_operator.observe import job_view, owner_batch
from imagebatch_operator.settings import Settings

_JOB_FILTER: dict[str, Any] = {"labels": {plan.LABEL_BATCH: kopf.PRESENT}}


def controller_of(memo: Any) -> Controller:
    found: Controller = memo["controller"]
    return found


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    # Events are posted by the controller, on purpose and with a reason.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    metrics = Metrics()
    kube = Kube()
    operator_settings = Settings.from_env()
    operator_settings = dataclasses.replace(
        operator_settings,
        deny_endpoints=cluster_endpoints(operator_settings, kube.api.configuration.host),
    )
    kube.on_request = lambda verb, resource, code: metrics.kube_requests.labels(
        verb, resource, code
    ).inc()
    controller = Controller(
        operator_settings,
        kube,
        MeteredStorage(operator_settings.storage, metrics),
        GuardedPoster(operator_settings.webhook_allow_nets, operator_settings.deny_endpoints),
        csv_url_opener(operator_settings),
        metrics,
    )
    if operator_settings.metrics_port:
        metrics.serve(operator_settings.metrics_port, operator_settings.metrics_address)
    memo["controller"] = controller
    await controller.start()
    logging.getLogger("imagebatch").info(
        "controller started: %d workers, %d expensive tasks at once",
        operator_settings.workers,
        operator_settings.heavy_workers,
    )


@kopf.on.cleanup()
async def stop(memo: Any, **_: Any) -> None:
    controller = memo.get("controller")
    if controller is not None:
        await controller.stop()


@kopf.index("batch", "v1", "jobs", **_JOB_FILTER)
async def batch_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, JobView]:
    """The batch's Jobs, by (namespace, batch name), as the controller reads them."""
    owner = owner_batch(body)
    if owner is None or namespace is None:
        return {}
    return {(namespace, owner): job_view(body)}


def _follow_index(controller: Controller, kwargs: dict[str, Any]) -> None:
    """Let the controller read kopf's live index of Jobs (passed to every handler)."""
    index: kopf.Index[Key, JobView] = kwargs["batch_jobs"]
    controller.jobs_of = lambda key: index.get(key, ())


@kopf.on.event("batch", "v1", "jobs", **_JOB_FILTER)
async def job_changed(body: kopf.Body, namespace: str | None, memo: Any, **kwargs: Any) -> None:
    controller = controller_of(memo)
    _follow_index(controller, kwargs)
    if namespace is not None:
        controller.job_event(namespace, owner_batch(body))


@kopf.on.event(plan.GROUP, plan.VERSION, plan.PLURAL)
async def batch_changed(event: kopf.RawEvent, memo: Any, **kwargs: Any) -> None:
    controller = controller_of(memo)
    _follow_index(controller, kwargs)
    controller.batch_event(event.get("type"), event["object"])
