"""Status and conditions computed from observations, as kstatus and kubectl wait read them."""

from __future__ import annotations

from typing import Any

import pytest

from imagebatch_operator.status import (
    Counts,
    Reason,
    RunState,
    RunView,
    compute_status,
    differs,
    only_counters_differ,
    set_condition,
    webhook_condition_status,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(
    ("stage", "phase", "ready", "stalled", "reconciling"),
    [
        (RunState.QUEUED, "Pending", ("False", "Queued"), "False", "True"),
        (RunState.VALIDATING, "Validating", ("False", "Validating"), "False", "True"),
        (
            RunState.SOURCE_UNAVAILABLE,
            "Validating",
            ("False", "SourceUnavailable"),
            "False",
            "True",
        ),
        (RunState.RUNNING, "Running", ("False", "Running"), "False", "True"),
        (RunState.SUCCEEDED, "Succeeded", ("True", "Succeeded"), "False", "False"),
        (RunState.FAILED, "Failed", ("False", "TooManyFailedImages"), "True", "False"),
        (RunState.INVALID, "Failed", ("False", "InvalidCSV"), "True", "False"),
        (RunState.REFUSED, "Failed", ("False", "OverLimit"), "True", "False"),
        (RunState.MERGING, "Running", ("False", "Merging"), "False", "True"),
    ],
)
def test_every_stage_has_ready_and_kstatus_conditions(
    stage: RunState, phase: str, ready: tuple[str, str], stalled: str, reconciling: str
) -> None:
    status = compute_status({}, RunView(generation=2, state=stage), T0)
    c = conds(status)
    assert status["phase"] == phase
    assert c["Ready"] == ready
    assert c["Stalled"][0] == stalled
    assert c["Reconciling"][0] == reconciling
    assert status["observedGeneration"] == 2
    assert all(x["observedGeneration"] == 2 for x in status["conditions"])


def test_invalid_csv_sets_validated_false_with_reason() -> None:
    status = compute_status(
        {}, RunView(generation=1, state=RunState.INVALID, message="bad row 3"), T0
    )
    assert conds(status)["Validated"] == ("False", "InvalidCSV")
    assert conds(status)["Failed"] == ("True", "InvalidCSV")


def test_success_with_some_failed_images_says_so() -> None:
    o = RunView(
        generation=1, state=RunState.SUCCEEDED, images=Counts(total=10, succeeded=9, failed=1)
    )
    status = compute_status({}, o, T0)
    assert conds(status)["Complete"] == ("True", "SucceededWithFailures")
    assert status["images"] == {"total": 10, "succeeded": 9, "failed": 1, "skipped": 0}
    assert status["imagesSummary"] == "9/10"


def test_transition_time_kept_while_the_status_does_not_change() -> None:
    first = compute_status({}, RunView(generation=1, state=RunState.RUNNING), T0)
    second = compute_status(
        first,
        RunView(generation=1, state=RunState.RUNNING, images=Counts(total=4, succeeded=1)),
        T1,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == T0 and times["Reconciling"] == T0
    done = compute_status(second, RunView(generation=1, state=RunState.SUCCEEDED), T1)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Ready"] == T1 and times["Complete"] == T1 and times["Stalled"] == T0


def test_set_condition_adds_and_replaces() -> None:
    c = set_condition([], "Ready", "False", "Pending", "", 1, T0)
    c = set_condition(c, "Ready", "True", "Succeeded", "ok", 2, T1)
    assert c == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Succeeded",
            "message": "ok",
            "observedGeneration": 2,
            "lastTransitionTime": T1,
        }
    ]


def test_webhook_condition_only_when_configured_and_record_is_kept() -> None:
    without = compute_status({}, RunView(generation=1, state=RunState.RUNNING), T0)
    assert "WebhookDelivered" not in conds(without)
    pending = compute_status(
        {}, RunView(generation=1, state=RunState.RUNNING, webhook_configured=True), T0
    )
    assert conds(pending)["WebhookDelivered"] == ("Unknown", "Pending")
    delivered = {
        **pending,
        "webhook": {"attempts": 1},
        "conditions": set_condition(
            pending["conditions"], "WebhookDelivered", "True", Reason.WEBHOOK_DELIVERED, "", 1, T1
        ),
    }
    again = compute_status(
        delivered, RunView(generation=1, state=RunState.SUCCEEDED, webhook_configured=True), T1
    )
    assert conds(again)["WebhookDelivered"] == ("True", "Delivered")
    assert again["webhook"] == {"attempts": 1}


def test_differs_only_when_a_write_would_change_something() -> None:
    status = compute_status({}, RunView(generation=1, state=RunState.RUNNING), T0)
    assert not differs(
        status, compute_status(status, RunView(generation=1, state=RunState.RUNNING), T1)
    )
    assert differs(
        status,
        compute_status(
            status, RunView(generation=1, state=RunState.RUNNING, images=Counts(1, 1)), T1
        ),
    )


def test_fields_set_to_none_count_as_absent() -> None:
    stored = {"webhook": {"run": "r2", "attempts": 0}}
    computed = {"webhook": {"run": "r2", "attempts": 0, "deliveredTime": None}}
    assert not differs(stored, computed)
    assert differs({"webhook": {"run": "r1", "deliveredTime": "t"}}, computed)


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (Reason.WEBHOOK_DELIVERED, "True"),
        (Reason.WEBHOOK_FAILED, "False"),
        (Reason.WEBHOOK_GONE, "False"),
        (Reason.WEBHOOK_RETRYING, "Unknown"),
        (Reason.WEBHOOK_PENDING, "Unknown"),
    ],
)
def test_webhook_condition_follows_the_delivery_state(state: Reason, value: str) -> None:
    assert webhook_condition_status(state) == value


@pytest.mark.parametrize(
    ("view", "message"),
    [
        pytest.param(
            RunView(
                generation=1,
                state=RunState.FAILED,
                shards=Counts(total=3, succeeded=3),
                images=Counts(total=10, succeeded=5, failed=5),
            ),
            "all 3 shards finished, but 5 of 10 images failed, more than the failure policy allows",
            id="failed-over-the-limit-says-every-shard-finished",
        ),
        pytest.param(
            RunView(generation=1, state=RunState.INVALID),
            "the CSV is invalid: no shard ran",
            id="invalid-csv-ran-nothing",
        ),
        pytest.param(
            RunView(
                generation=1, state=RunState.RUNNING, shards=Counts(total=4, succeeded=1, failed=1)
            ),
            "2 of 4 shards finished",
            id="running-counts-finished-shards",
        ),
        pytest.param(
            RunView(generation=1, state=RunState.VALIDATING),
            "not started: the CSV is not validated yet",
            id="validating",
        ),
        pytest.param(
            RunView(generation=1, state=RunState.MERGING, shards=Counts(total=2, succeeded=2)),
            "all 2 shards finished; writing output.csv",
            id="merging",
        ),
    ],
)
def test_complete_condition_message_is_true_in_every_state(view: RunView, message: str) -> None:
    complete = {c["type"]: c for c in compute_status({}, view, T0)["conditions"]}["Complete"]
    assert complete["message"] == message


def test_progress_alone_may_wait_but_a_condition_change_may_not() -> None:
    running = compute_status({}, RunView(generation=1, state=RunState.RUNNING), T0)
    more = compute_status(
        running, RunView(generation=1, state=RunState.RUNNING, images=Counts(4, 1)), T1
    )
    assert only_counters_differ(running, more)
    done = compute_status(running, RunView(generation=1, state=RunState.SUCCEEDED), T1)
    assert not only_counters_differ(running, done)


def test_a_refusal_names_its_reason_everywhere() -> None:
    view = RunView(
        generation=1,
        state=RunState.REFUSED,
        reason=Reason.OUTPUT_NOT_ALLOWED,
        message="spec.output.bucket 'other' is not allowed",
    )
    c = conds(compute_status({}, view, T0))
    assert c["Ready"] == ("False", "OutputNotAllowed")
    assert c["Stalled"] == ("True", "OutputNotAllowed")
    assert c["Validated"] == ("False", "OutputNotAllowed")
