"""Pure status computation: conditions from what is observed, phase derived from them.

The operator never chains on ``status.phase``; it observes (the CSV's validity, the
Job, the shard results, the webhook) and this module turns one observation into the
whole status. A condition keeps its ``lastTransitionTime`` while its status does not
change, and the caller writes the status only when the result differs from what is
stored. kstatus and ``kubectl wait`` rules (DESIGN.md §10): ``Ready`` is there from the
first reconcile; a failed batch says ``Stalled=True`` as well as ``Ready=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    """Where a run is; an observation, not stored state."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    INVALID = "Invalid"  # the CSV is bad: terminal until the spec changes
    SOURCE_UNAVAILABLE = "SourceUnavailable"  # cannot read the CSV yet: retried
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """CamelCase reasons of the conditions; also the Event reasons."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    CSV_VALID = "CSVValid"
    INVALID_CSV = "InvalidCSV"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    SUCCEEDED_WITH_FAILURES = "SucceededWithFailures"
    TOO_MANY_FAILED_IMAGES = "TooManyFailedImages"
    NOT_COMPLETE = "NotComplete"
    NOT_FAILED = "NotFailed"
    WEBHOOK_PENDING = "Pending"
    WEBHOOK_DELIVERED = "Delivered"
    WEBHOOK_RETRYING = "Retrying"
    WEBHOOK_FAILED = "DeliveryFailed"
    WEBHOOK_GONE = "ReceiverGone"


@dataclass(frozen=True)
class Counts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    active: int = 0
    skipped: int = 0

    def as_status(self, *, active: bool = False, skipped: bool = False) -> dict[str, int]:
        out = {"total": self.total, "succeeded": self.succeeded, "failed": self.failed}
        if active:
            out["active"] = self.active
        if skipped:
            out["skipped"] = self.skipped
        return out


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from, for one look at one batch."""

    generation: int
    stage: Stage
    run: str = ""
    message: str = ""
    suspended: bool = False
    rows: Counts = field(default_factory=Counts)
    images: Counts = field(default_factory=Counts)
    shards: Counts = field(default_factory=Counts)
    input_bytes: int = 0
    output_bytes: int = 0
    problems: tuple[Mapping[str, Any], ...] = ()
    output: Mapping[str, str] | None = None
    start_time: str | None = None
    completion_time: str | None = None
    webhook_configured: bool = False
    webhook: Mapping[str, Any] | None = None  # attempts, lastStatusCode, deliveredTime, ...
    webhook_state: Reason | None = None
    webhook_message: str = ""


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """A copy of ``conditions`` with one condition set; its transition time kept if unchanged."""
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = now
    if old is not None and old.get("status") == status:
        since = str(old.get("lastTransitionTime", now))
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }
    out = [new if c is old else dict(c) for c in conditions]
    if old is None:
        out.append(new)
    return out


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return c  # type: ignore[no-any-return]
    return None


def webhook_condition_status(state: Reason) -> str:
    """WebhookDelivered: True once delivered, False once given up, Unknown while trying."""
    if state is Reason.WEBHOOK_DELIVERED:
        return "True"
    if state in (Reason.WEBHOOK_FAILED, Reason.WEBHOOK_GONE):
        return "False"
    return "Unknown"


def derive_phase(conditions: Sequence[Mapping[str, Any]], stage: Stage) -> str:
    """The display phase: from the conditions first, the stage only for in-progress."""
    by_type = {c["type"]: c for c in conditions}
    if by_type.get("Complete", {}).get("status") == "True":
        return "Succeeded"
    if by_type.get("Failed", {}).get("status") == "True":
        return "Failed"
    if stage in (Stage.RUNNING,):
        return "Running"
    if stage in (Stage.VALIDATING, Stage.SOURCE_UNAVAILABLE):
        return "Validating"
    return "Pending"


def _summary(o: Observation) -> str:
    return (
        f"{o.images.succeeded}/{o.images.total} images done, {o.images.failed} failed; "
        f"{o.shards.succeeded}/{o.shards.total} shards"
    )


def compute_status(previous: Mapping[str, Any], o: Observation, now: str) -> dict[str, Any]:
    """The whole status for observation ``o``, keeping what must survive from ``previous``."""
    g = o.generation
    conds: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]

    def put(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, status, reason, message, g, now)

    terminal_failure = o.stage in (Stage.INVALID, Stage.FAILED)
    # Validated
    if o.stage in (Stage.PENDING, Stage.VALIDATING):
        put("Validated", "Unknown", Reason.VALIDATING, "reading and validating the CSV")
    elif o.stage is Stage.SOURCE_UNAVAILABLE:
        put("Validated", "Unknown", Reason.SOURCE_UNAVAILABLE, o.message)
    elif o.stage is Stage.INVALID:
        put("Validated", "False", Reason.INVALID_CSV, o.message)
    else:
        valid = f"{o.rows.total} rows, {o.images.total} distinct images"
        put("Validated", "True", Reason.CSV_VALID, valid)
    # Complete / Failed
    if o.stage is Stage.SUCCEEDED:
        reason = Reason.SUCCEEDED_WITH_FAILURES if o.images.failed else Reason.SUCCEEDED
        put("Complete", "True", reason, _summary(o))
    else:
        put("Complete", "False", Reason.NOT_COMPLETE, "not every shard has finished")
    if o.stage is Stage.INVALID:
        put("Failed", "True", Reason.INVALID_CSV, o.message)
    elif o.stage is Stage.FAILED:
        put("Failed", "True", Reason.TOO_MANY_FAILED_IMAGES, o.message or _summary(o))
    else:
        put("Failed", "False", Reason.NOT_FAILED, "")
    # kstatus: Reconciling while work is in progress, Stalled when it cannot go on.
    stage_reason = {
        Stage.PENDING: Reason.PENDING,
        Stage.VALIDATING: Reason.VALIDATING,
        Stage.SOURCE_UNAVAILABLE: Reason.SOURCE_UNAVAILABLE,
        Stage.INVALID: Reason.INVALID_CSV,
        Stage.RUNNING: Reason.SUSPENDED if o.suspended else Reason.RUNNING,
        Stage.SUCCEEDED: Reason.SUCCEEDED,
        Stage.FAILED: Reason.TOO_MANY_FAILED_IMAGES,
    }[o.stage]
    in_progress = o.stage in (
        Stage.PENDING,
        Stage.VALIDATING,
        Stage.SOURCE_UNAVAILABLE,
        Stage.RUNNING,
    )
    message = o.message or _summary(o)
    put(
        "Reconciling",
        "True" if in_progress else "False",
        stage_reason,
        message if in_progress else "",
    )
    put(
        "Stalled",
        "True" if terminal_failure else "False",
        stage_reason,
        message if terminal_failure else "",
    )
    put("Ready", "True" if o.stage is Stage.SUCCEEDED else "False", stage_reason, message)
    # WebhookDelivered, only when a webhook is configured.
    if o.webhook_configured:
        kept = condition(previous, "WebhookDelivered")
        state = o.webhook_state or (
            Reason(kept["reason"])
            if kept is not None and kept.get("reason") in set(Reason)
            else Reason.WEBHOOK_PENDING
        )
        if o.webhook_state is None and kept is not None:
            message = str(kept.get("message", ""))
        else:
            message = o.webhook_message
        put("WebhookDelivered", webhook_condition_status(state), state, message)
    else:
        conds = [c for c in conds if c.get("type") != "WebhookDelivered"]

    status: dict[str, Any] = {
        "phase": derive_phase(conds, o.stage),
        "observedGeneration": g,
        "conditions": conds,
        "run": o.run or None,
        "rows": o.rows.as_status(),
        "images": o.images.as_status(skipped=True),
        "imagesSummary": f"{o.images.succeeded}/{o.images.total}",
        "shardsSummary": f"{o.shards.succeeded + o.shards.failed}/{o.shards.total}",
        "shards": o.shards.as_status(active=True),
        "bytes": {"input": o.input_bytes, "output": o.output_bytes},
        "validationErrors": [dict(p) for p in o.problems] or None,
        "output": dict(o.output) if o.output else None,
        "webhook": dict(o.webhook) if o.webhook is not None else previous.get("webhook"),
        "startTime": o.start_time,
        "completionTime": o.completion_time,
    }
    return status


def _pruned(value: Any) -> Any:
    """``value`` as a merge patch leaves it: keys set to None are absent."""
    if isinstance(value, Mapping):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    return value


def differs(stored: Mapping[str, Any], computed: Mapping[str, Any]) -> bool:
    """True when merge-patching ``computed`` would change what is stored."""
    for key, value in computed.items():
        if value is None:
            if stored.get(key) is not None:
                return True
        elif _pruned(stored.get(key)) != _pruned(value):
            return True
    return False
