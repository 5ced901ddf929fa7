"""Pure status computation: conditions from what a run is doing, phase derived from them.

``decide`` says where the batch's current run is (a ``RunView``); this module turns that
into the whole status. A condition keeps its ``lastTransitionTime`` while its status
does not change, and the caller writes the status only when the result differs from
what is stored. kstatus and ``kubectl wait`` rules (DESIGN.md §10): ``Ready`` is there
from the first reconcile; a batch that cannot go on says ``Stalled=True`` as well as
``Ready=False``; every condition carries the generation it describes.

The enums here are the only spelling of phases, condition types and reasons in the
operator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """The display phase (a printer column), derived from the conditions."""

    PENDING = "Pending"
    VALIDATING = "Validating"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(StrEnum):
    READY = "Ready"
    VALIDATED = "Validated"
    COMPLETE = "Complete"
    FAILED = "Failed"
    WEBHOOK_DELIVERED = "WebhookDelivered"
    RECONCILING = "Reconciling"  # kstatus: work in progress
    STALLED = "Stalled"  # kstatus: cannot go on without a change


class RunState(StrEnum):
    """Where the current run is; decided each pass, never stored as such."""

    QUEUED = "Queued"  # waiting for a slot in its namespace
    VALIDATING = "Validating"
    SOURCE_UNAVAILABLE = "SourceUnavailable"  # the CSV cannot be read yet: retried
    INVALID = "Invalid"  # the CSV is bad: terminal until the spec changes
    REFUSED = "Refused"  # the spec asks for what this operator does not allow
    RUNNING = "Running"
    MERGING = "Merging"  # every shard finished; writing output.csv
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # more images failed than the failure policy allows


class Reason(StrEnum):
    """CamelCase reasons of the conditions."""

    PENDING = "Pending"
    QUEUED = "Queued"
    VALIDATING = "Validating"
    CSV_VALID = "CSVValid"
    INVALID_CSV = "InvalidCSV"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    MERGING = "Merging"
    SUCCEEDED = "Succeeded"
    SUCCEEDED_WITH_FAILURES = "SucceededWithFailures"
    TOO_MANY_FAILED_IMAGES = "TooManyFailedImages"
    NOT_COMPLETE = "NotComplete"
    NOT_FAILED = "NotFailed"
    # Refusals: the spec names something this operator's settings do not allow.
    OUTPUT_NOT_ALLOWED = "OutputNotAllowed"
    SOURCE_NOT_ALLOWED = "SourceNotAllowed"
    OVER_LIMIT = "OverLimit"
    SECRET_CONFLICT = "SecretConflict"  # noqa: S105 - a reason, not a secret
    CREDENTIALS_UNAVAILABLE = "CredentialsUnavailable"
    # WebhookDelivered
    WEBHOOK_PENDING = "Pending"
    WEBHOOK_DELIVERED = "Delivered"
    WEBHOOK_RETRYING = "Retrying"
    WEBHOOK_FAILED = "DeliveryFailed"
    WEBHOOK_GONE = "ReceiverGone"


class EventReason(StrEnum):
    """Reasons of the Events the operator posts on an ImageBatch."""

    VALIDATED = "Validated"
    INVALID_CSV = "InvalidCSV"
    CSV_NOTICE = "CSVNotice"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    REFUSED = "Refused"
    QUEUED = "Queued"
    JOB_CREATED = "JobCreated"
    JOB_RECREATED = "JobRecreated"
    RUN_REPLACED = "RunReplaced"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    WEBHOOK_DELIVERED = "WebhookDelivered"
    WEBHOOK_RETRYING = "WebhookRetrying"
    WEBHOOK_FAILED = "WebhookFailed"
    CREDENTIALS_RENEWED = "CredentialsRenewed"
    OUTPUTS_DELETED = "OutputsDeleted"
    RECONCILE_ERROR = "ReconcileError"


TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

IN_PROGRESS = frozenset(
    {
        RunState.QUEUED,
        RunState.VALIDATING,
        RunState.SOURCE_UNAVAILABLE,
        RunState.RUNNING,
        RunState.MERGING,
    }
)
CANNOT_GO_ON = frozenset({RunState.INVALID, RunState.REFUSED, RunState.FAILED})


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
class RunView:
    """Everything the status is computed from, for one look at one batch."""

    generation: int
    state: RunState
    run: str = ""
    identity: str = ""  # BatchSpec.run_identity() of the run
    message: str = ""
    reason: Reason | None = None  # the refusal's reason (RunState.REFUSED)
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
    validated_message: str = ""  # the Validated condition's message once valid
    webhook_configured: bool = False
    webhook: Mapping[str, Any] | None = None  # None keeps what is stored
    webhook_state: Reason | None = None  # None keeps what is stored
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


def condition_is(status: Mapping[str, Any], type_: str, value: str = TRUE) -> bool:
    found = condition(status, type_)
    return found is not None and found.get("status") == value


def webhook_condition_status(state: Reason) -> str:
    """WebhookDelivered: True once delivered, False once given up, Unknown while trying."""
    if state is Reason.WEBHOOK_DELIVERED:
        return TRUE
    if state in (Reason.WEBHOOK_FAILED, Reason.WEBHOOK_GONE):
        return FALSE
    return UNKNOWN


def derive_phase(conditions: Sequence[Mapping[str, Any]], state: RunState) -> Phase:
    """The display phase: from the conditions first, the run state only for in-progress."""
    by_type = {c["type"]: c for c in conditions}
    if by_type.get(ConditionType.COMPLETE, {}).get("status") == TRUE:
        return Phase.SUCCEEDED
    if by_type.get(ConditionType.FAILED, {}).get("status") == TRUE:
        return Phase.FAILED
    if state in (RunState.RUNNING, RunState.MERGING):
        return Phase.RUNNING
    if state in (RunState.VALIDATING, RunState.SOURCE_UNAVAILABLE):
        return Phase.VALIDATING
    return Phase.PENDING


def _summary(v: RunView) -> str:
    return (
        f"{v.images.succeeded}/{v.images.total} images done, {v.images.failed} failed; "
        f"{v.shards.succeeded + v.shards.failed}/{v.shards.total} shards finished"
    )


def _state_reason(v: RunView) -> Reason:
    if v.state is RunState.REFUSED:
        return v.reason or Reason.OVER_LIMIT
    if v.state is RunState.RUNNING and v.suspended:
        return Reason.SUSPENDED
    if v.state is RunState.SUCCEEDED and v.images.failed:
        return Reason.SUCCEEDED_WITH_FAILURES
    return {
        RunState.QUEUED: Reason.QUEUED,
        RunState.VALIDATING: Reason.VALIDATING,
        RunState.SOURCE_UNAVAILABLE: Reason.SOURCE_UNAVAILABLE,
        RunState.INVALID: Reason.INVALID_CSV,
        RunState.RUNNING: Reason.RUNNING,
        RunState.MERGING: Reason.MERGING,
        RunState.SUCCEEDED: Reason.SUCCEEDED,
        RunState.FAILED: Reason.TOO_MANY_FAILED_IMAGES,
    }[v.state]


def _complete_message(v: RunView) -> str:
    """Why the batch is or is not complete, true for every state."""
    shards_done = v.shards.succeeded + v.shards.failed
    if v.state is RunState.INVALID:
        return "the CSV is invalid: no shard ran"
    if v.state is RunState.REFUSED:
        return "refused: no shard ran"
    if v.state is RunState.FAILED:
        return (
            f"all {v.shards.total} shards finished, but {v.images.failed} of {v.images.total} "
            "images failed, more than the failure policy allows"
        )
    if v.state in (RunState.QUEUED, RunState.VALIDATING, RunState.SOURCE_UNAVAILABLE):
        return "not started: the CSV is not validated yet"
    if v.state is RunState.MERGING:
        return f"all {v.shards.total} shards finished; writing output.csv"
    return f"{shards_done} of {v.shards.total} shards finished"


def compute_status(previous: Mapping[str, Any], v: RunView, now: str) -> dict[str, Any]:
    """The whole status for ``v``, keeping what must survive from ``previous``."""
    g = v.generation
    conds: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]

    def put(type_: ConditionType, status: str, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, type_, status, reason, message, g, now)

    reason = _state_reason(v)
    message = v.message or _summary(v)
    # Validated
    if v.state in (RunState.QUEUED, RunState.VALIDATING):
        put(ConditionType.VALIDATED, UNKNOWN, reason, v.message or "the CSV is not read yet")
    elif v.state is RunState.SOURCE_UNAVAILABLE:
        put(ConditionType.VALIDATED, UNKNOWN, reason, v.message)
    elif v.state in (RunState.INVALID, RunState.REFUSED):
        put(ConditionType.VALIDATED, FALSE, reason, v.message)
    else:
        valid = v.validated_message or f"{v.rows.total} rows, {v.images.total} distinct images"
        put(ConditionType.VALIDATED, TRUE, Reason.CSV_VALID, valid)
    # Complete / Failed
    if v.state is RunState.SUCCEEDED:
        put(ConditionType.COMPLETE, TRUE, reason, _summary(v))
    else:
        put(ConditionType.COMPLETE, FALSE, Reason.NOT_COMPLETE, _complete_message(v))
    if v.state in CANNOT_GO_ON:
        put(ConditionType.FAILED, TRUE, reason, message)
    else:
        put(ConditionType.FAILED, FALSE, Reason.NOT_FAILED, "")
    # kstatus: Reconciling while work is in progress, Stalled when it cannot go on.
    in_progress = v.state in IN_PROGRESS
    stalled = v.state in CANNOT_GO_ON
    put(
        ConditionType.RECONCILING,
        TRUE if in_progress else FALSE,
        reason,
        message if in_progress else "",
    )
    put(ConditionType.STALLED, TRUE if stalled else FALSE, reason, message if stalled else "")
    put(ConditionType.READY, TRUE if v.state is RunState.SUCCEEDED else FALSE, reason, message)
    # WebhookDelivered, only when a webhook is configured.
    if v.webhook_configured:
        kept = condition(previous, ConditionType.WEBHOOK_DELIVERED)
        known = {r.value for r in Reason}
        state = v.webhook_state or (
            Reason(kept["reason"])
            if kept is not None and kept.get("reason") in known
            else Reason.WEBHOOK_PENDING
        )
        hook_message = (
            str(kept.get("message", ""))
            if v.webhook_state is None and kept is not None
            else v.webhook_message
        )
        put(ConditionType.WEBHOOK_DELIVERED, webhook_condition_status(state), state, hook_message)
    else:
        conds = [c for c in conds if c.get("type") != ConditionType.WEBHOOK_DELIVERED]

    return {
        "phase": derive_phase(conds, v.state).value,
        "observedGeneration": g,
        "conditions": conds,
        "run": v.run or None,
        "runIdentity": v.identity or None,
        "rows": v.rows.as_status(),
        "images": v.images.as_status(skipped=True),
        "imagesSummary": f"{v.images.succeeded}/{v.images.total}",
        "shardsSummary": f"{v.shards.succeeded + v.shards.failed}/{v.shards.total}",
        "shards": v.shards.as_status(active=True),
        "bytes": {"input": v.input_bytes, "output": v.output_bytes},
        "validationErrors": [dict(p) for p in v.problems] or None,
        "output": dict(v.output) if v.output else None,
        "webhook": dict(v.webhook) if v.webhook is not None else previous.get("webhook"),
        "startTime": v.start_time,
        "completionTime": v.completion_time,
    }


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


def only_counters_differ(stored: Mapping[str, Any], computed: Mapping[str, Any]) -> bool:
    """True when the change is progress alone (counters), with no condition moving.

    Such a write may wait a moment so a busy batch costs about one write a second;
    a change of any condition is written at once.
    """
    progress = {"rows", "images", "imagesSummary", "shards", "shardsSummary", "bytes"}
    changed = {
        key
        for key, value in computed.items()
        if _pruned(stored.get(key)) != _pruned(value) and not (value is None and key not in stored)
    }
    if not changed <= progress | {"conditions"}:
        return False
    if "conditions" not in changed:
        return True

    def shape(conditions: Any) -> set[tuple[str, str, str]]:
        return {(c.get("type"), c.get("status"), c.get("reason")) for c in conditions or []}

    return shape(stored.get("conditions")) == shape(computed.get("conditions"))
