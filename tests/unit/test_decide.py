"""decide(): every transition of a batch, from plain observations, no server."""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Any

import pytest

from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator import plan, webhook
from imagebatch_operator.decide import (
    AddFinalizer,
    CreateJob,
    Decision,
    DeleteJob,
    DeleteOutputs,
    DeliverWebhook,
    EnsureCredentials,
    IngestOutcome,
    JobView,
    MergeOutcome,
    Observation,
    PatchJob,
    PlanSummary,
    RemoveFinalizer,
    ShardTally,
    StartIngest,
    StartMerge,
    Task,
    decide,
    webhook_result,
)
from imagebatch_operator.settings import Settings
from imagebatch_operator.spec import parse_spec
from imagebatch_operator.status import (
    Counts,
    EventReason,
    Reason,
    compute_status,
)

NOW = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
UID = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
SETTINGS = Settings(
    storage=StorageSettings("minio:9000", "ak", "sk"),
    webhook_schedule=(0.0, 5.0, 300.0),
    max_running_per_namespace=2,
)
HOOK = {"url": "https://hooks.example.com/ib?token=abc"}


def observe(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
    **fields: Any,
) -> Observation:
    return Observation(
        now=NOW,
        ref=plan.BatchRef("shop", "spring", UID, generation),
        spec=parse_spec({"source": {"inline": "x"}, **(spec or {})}),
        status=status or {},
        **fields,
    )


def after(obs: Observation, decision: Decision) -> dict[str, Any]:
    """The status the decision writes, as the next observation would see it."""
    assert decision.view is not None
    return compute_status(obs.status, decision.view, "2026-03-01T12:00:00Z")


def kinds(decision: Decision) -> list[str]:
    return [type(a).__name__ for a in decision.actions]


def reasons(decision: Decision) -> list[EventReason]:
    return [e.reason for e in decision.events]


RUN = "g1-0f1e2d3c"
PLANNED = PlanSummary(run=RUN, rows=3, images=4, stored=1, shards=2, per_shard=2)


def validated(
    spec: dict[str, Any] | None = None, **fields: Any
) -> tuple[Observation, dict[str, Any]]:
    """A batch whose run was planned and whose Job was created: the stored status."""
    first = observe(spec)
    planned = replace(
        first, ingest=Task(RUN, running=False, ingest=IngestOutcome("planned", plan=PLANNED))
    )
    status = after(planned, decide(planned, SETTINGS))
    # The run's credential is fresh unless a test says otherwise.
    fields.setdefault("credentials_expire", NOW + datetime.timedelta(hours=1))
    return observe(spec, status, plan=PLANNED, **fields), status


def job(**fields: Any) -> JobView:
    return JobView(name="spring-g1", run=RUN, parallelism=2, **fields)


# -- validating ----------------------------------------------------------------------


def test_a_new_batch_starts_validating_at_once() -> None:
    obs = observe()
    d = decide(obs, SETTINGS)
    assert kinds(d) == ["StartIngest"]
    status = after(obs, d)
    assert status["phase"] == "Validating" and status["run"] == RUN
    assert status["startTime"] == "2026-03-01T12:00:00Z"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"


def test_while_the_csv_is_read_nothing_else_happens() -> None:
    first = observe()
    status = after(first, decide(first, SETTINGS))
    later = observe(status=status, ingest=Task(RUN, running=True))
    d = decide(later, SETTINGS)
    assert d.actions == ()
    assert after(later, d)["startTime"] == status["startTime"]  # kept across passes


def test_start_time_survives_a_restart_before_running() -> None:
    first = observe()
    status = after(first, decide(first, SETTINGS))
    restarted = replace(observe(status=status), now=NOW + datetime.timedelta(minutes=5))
    d = decide(restarted, SETTINGS)
    assert kinds(d) == ["StartIngest"]  # the task is gone with the old process
    assert after(restarted, d)["startTime"] == "2026-03-01T12:00:00Z"


def test_a_planned_run_gets_credentials_and_its_job() -> None:
    obs = replace(
        observe(), ingest=Task(RUN, running=False, ingest=IngestOutcome("planned", plan=PLANNED))
    )
    d = decide(obs, SETTINGS)
    assert d.actions == (EnsureCredentials(RUN), CreateJob(RUN, 2))
    status = after(obs, d)
    assert status["phase"] == "Running"
    assert status["images"] == {"total": 4, "succeeded": 1, "failed": 0, "skipped": 1}
    assert EventReason.VALIDATED in reasons(d)


def test_a_plan_left_by_a_killed_operator_is_taken_up() -> None:
    first = observe()
    status = after(first, decide(first, SETTINGS))
    d = decide(observe(status=status, plan=PLANNED), SETTINGS)
    assert d.actions == (EnsureCredentials(RUN), CreateJob(RUN, 2))


def test_nothing_left_to_process_goes_straight_to_the_merge() -> None:
    nothing = replace(PLANNED, stored=4, shards=0)
    obs = replace(
        observe(), ingest=Task(RUN, running=False, ingest=IngestOutcome("planned", plan=nothing))
    )
    d = decide(obs, SETTINGS)
    assert d.actions == ()
    assert d.requeue_after == 0.0
    d2 = decide(observe(status=after(obs, d), plan=nothing), SETTINGS)
    assert d2.actions == (StartMerge(RUN),)


def test_an_invalid_csv_fails_and_stalls_with_the_problems() -> None:
    problems = ({"row": 3, "column": "Input Image Urls", "message": "bad"},)
    outcome = IngestOutcome("invalid", "1 problem(s)", problems=problems, errors_written=True)
    obs = replace(observe(), ingest=Task(RUN, running=False, ingest=outcome))
    d = decide(obs, SETTINGS)
    status = after(obs, d)
    conds = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert status["phase"] == "Failed"
    assert conds["Validated"] == ("False", "InvalidCSV")
    assert conds["Stalled"] == ("True", "InvalidCSV")
    assert status["validationErrors"] == [dict(problems[0])]
    assert status["output"] == {"errors": "s3://imagebatch/shop/spring/errors.csv"}
    assert EventReason.INVALID_CSV in reasons(d)
    # Terminal: the next look does nothing at all.
    quiet = decide(observe(status=status), SETTINGS)
    assert quiet.actions == () and quiet.requeue_after is None


def test_an_unreadable_source_is_retried_after_a_pause_not_at_once() -> None:
    outcome = IngestOutcome("unavailable", "ConfigMap shop/x does not exist")
    failed_at = Task(RUN, running=False, ingest=outcome, finished=NOW)
    obs = replace(observe(), ingest=failed_at)
    d = decide(obs, SETTINGS)
    assert d.actions == ()
    assert d.requeue_after == pytest.approx(15.0)
    status = after(obs, d)
    assert status["phase"] == "Validating"
    assert {c["type"]: c["reason"] for c in status["conditions"]}[
        "Validated"
    ] == "SourceUnavailable"
    later = replace(
        observe(status=status, ingest=failed_at), now=NOW + datetime.timedelta(seconds=16)
    )
    d2 = decide(later, SETTINGS)
    assert d2.actions == (StartIngest(RUN),)
    assert EventReason.SOURCE_UNAVAILABLE not in reasons(d2)  # said once, not every retry


def test_too_many_images_is_refused_naming_the_limit() -> None:
    outcome = IngestOutcome(
        "refused",
        "more than this operator's limit of 200000 (max images per batch)",
        reason=Reason.OVER_LIMIT,
    )
    obs = replace(observe(), ingest=Task(RUN, running=False, ingest=outcome))
    status = after(obs, decide(obs, SETTINGS))
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["reason"], status["phase"]) == ("OverLimit", "Failed")
    assert "max images per batch" in ready["message"]


# -- tenancy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        pytest.param(
            {"output": {"bucket": "team-b-bucket"}},
            "OutputNotAllowed",
            "spec.output.bucket 'team-b-bucket' is not one of the buckets",
            id="foreign-output-bucket",
        ),
        pytest.param(
            {"source": {"s3": {"bucket": "imagebatch", "key": "team-b/secret.csv"}}},
            "SourceNotAllowed",
            "spec.source.s3.key must be under shop/",
            id="s3-source-in-another-namespace",
        ),
        pytest.param(
            {"source": {"s3": {"bucket": "other", "key": "shop/a.csv"}}},
            "SourceNotAllowed",
            "spec.source.s3.bucket 'other'",
            id="s3-source-in-a-foreign-bucket",
        ),
        pytest.param(
            {"sharding": {"parallelism": 500}},
            "OverLimit",
            "limit of 16 (max parallelism per batch)",
            id="parallelism-over-the-cap",
        ),
    ],
)
def test_what_a_namespace_may_not_do_is_refused_before_anything_runs(
    spec: dict[str, Any], reason: str, words: str
) -> None:
    obs = observe(spec)
    d = decide(obs, SETTINGS)
    assert not any(isinstance(a, StartIngest | CreateJob) for a in d.actions)
    ready = {c["type"]: c for c in after(obs, d)["conditions"]}["Ready"]
    assert ready["reason"] == reason and words in ready["message"]


def test_a_namespace_over_its_running_cap_queues_the_newer_batch() -> None:
    obs = observe(namespace_active_before=2)
    d = decide(obs, SETTINGS)
    assert d.actions == ()
    status = after(obs, d)
    assert status["phase"] == "Pending"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "Queued"
    assert EventReason.QUEUED in reasons(d)
    # A slot frees: it starts.
    assert kinds(decide(observe(status=status, namespace_active_before=1), SETTINGS)) == [
        "StartIngest"
    ]


# -- running ---------------------------------------------------------------------------


def test_progress_comes_from_the_job_and_the_shard_results() -> None:
    obs, _ = validated(
        jobs=(job(completed=frozenset({0}), active=1),),
        tallies={0: ShardTally(ok=1, failed=1, bytes_in=100, bytes_out=40)},
    )
    d = decide(obs, SETTINGS)
    assert d.actions == () and d.progress_only
    status = after(obs, d)
    assert status["images"] == {"total": 4, "succeeded": 2, "failed": 1, "skipped": 1}
    assert status["shards"] == {"total": 2, "succeeded": 1, "failed": 0, "active": 1}
    assert status["bytes"] == {"input": 100, "output": 40}


def test_a_malformed_shard_result_counts_as_a_failed_shard_not_a_missing_one() -> None:
    obs, _ = validated(
        jobs=(job(completed=frozenset({0})),), tallies={0: ShardTally(malformed=True)}
    )
    status = after(obs, decide(obs, SETTINGS))
    assert status["shards"]["succeeded"] == 0 and status["shards"]["failed"] == 1


def test_a_job_deleted_by_hand_is_made_again() -> None:
    obs, _ = validated()
    d = decide(obs, SETTINGS)
    assert d.actions == (EnsureCredentials(RUN), CreateJob(RUN, 2, recreate=True))


def test_a_job_still_being_deleted_in_the_foreground_is_waited_for() -> None:
    obs, _ = validated(jobs=(job(deleting=True),))
    assert decide(obs, SETTINGS).actions == ()


def test_suspend_and_parallelism_change_the_job_in_place_not_the_run() -> None:
    _, status = validated(jobs=(job(),))
    obs = observe(
        {"suspend": True, "sharding": {"parallelism": 1}},
        status,
        generation=2,
        plan=PLANNED,
        jobs=(job(),),
        credentials_expire=NOW + datetime.timedelta(hours=1),
    )
    d = decide(obs, SETTINGS)
    assert d.actions == (PatchJob("spring-g1", {"suspend": True, "parallelism": 1}),)
    new = after(obs, d)
    assert new["run"] == RUN and new["observedGeneration"] == 2
    assert {c["type"]: c["reason"] for c in new["conditions"]}["Ready"] == "Suspended"


def test_a_spec_change_mid_run_starts_a_new_run_and_deletes_the_old_job() -> None:
    _, status = validated(jobs=(job(),))
    obs = observe({"compression": {"quality": 70}}, status, generation=2, jobs=(job(),))
    d = decide(obs, SETTINGS)
    assert d.actions == (DeleteJob("spring-g1"), StartIngest("g2-0f1e2d3c"))
    assert EventReason.RUN_REPLACED in reasons(d)
    new = after(obs, d)
    assert new["run"] == "g2-0f1e2d3c" and new["phase"] == "Validating"


def test_a_finished_job_is_merged() -> None:
    obs, _ = validated(jobs=(job(completed=frozenset({0, 1}), finished=True),))
    d = decide(obs, SETTINGS)
    assert d.actions == (StartMerge(RUN),)
    assert {c["type"]: c["reason"] for c in after(obs, d)["conditions"]}["Reconciling"] == "Merging"


# -- the failure policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed", "limit", "phase", "reason"),
    [
        pytest.param(0, 10, "Succeeded", "Succeeded", id="all-good"),
        pytest.param(1, 10, "Succeeded", "SucceededWithFailures", id="at-the-limit"),
        pytest.param(2, 10, "Failed", "TooManyFailedImages", id="over-the-limit"),
        pytest.param(1, 0, "Failed", "TooManyFailedImages", id="zero-tolerance"),
        pytest.param(10, 100, "Succeeded", "SucceededWithFailures", id="anything-goes"),
    ],
)
def test_the_failure_policy_decides_the_final_phase(
    failed: int, limit: float, phase: str, reason: str
) -> None:
    spec = {"failurePolicy": {"maxFailedImagePercent": limit}}
    obs, _ = validated(spec, jobs=(job(completed=frozenset({0, 1}), finished=True),))
    merged = MergeOutcome(
        "merged",
        rows=Counts(total=3, succeeded=3),
        images=Counts(total=10, succeeded=10 - failed, failed=failed),
        shards=Counts(total=2, succeeded=2),
    )
    obs = replace(obs, merge=Task(RUN, running=False, merge=merged, finished=NOW))
    d = decide(obs, SETTINGS)
    status = after(obs, d)
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == phase and conds["Ready"]["reason"] == reason
    assert status["completionTime"] == "2026-03-01T12:00:00Z"
    if phase == "Failed":
        assert conds["Stalled"]["status"] == "True"
        assert "all 2 shards finished" in conds["Complete"]["message"]
    assert d.requeue_after is None  # finished, no webhook: nothing more, ever


def test_a_failed_merge_is_tried_again_after_a_pause() -> None:
    obs, _ = validated(jobs=(job(completed=frozenset({0, 1}), finished=True),))
    broken = Task(RUN, running=False, merge=MergeOutcome("error", "storage down"), finished=NOW)
    d = decide(replace(obs, merge=broken), SETTINGS)
    assert d.actions == () and d.requeue_after == pytest.approx(10.0)
    later = replace(obs, merge=broken, now=NOW + datetime.timedelta(seconds=11))
    assert decide(later, SETTINGS).actions == (StartMerge(RUN),)


# -- the webhook ----------------------------------------------------------------------------


def finished(**fields: Any) -> tuple[Observation, dict[str, Any]]:
    obs, _ = validated({"webhook": HOOK}, jobs=(job(completed=frozenset({0, 1}), finished=True),))
    merged = MergeOutcome("merged", images=Counts(total=4, succeeded=4), shards=Counts(2, 2))
    obs = replace(obs, merge=Task(RUN, running=False, merge=merged, finished=NOW))
    d = decide(obs, SETTINGS)
    assert d.actions == (DeliverWebhook(RUN, 1),)
    status = after(obs, d)
    return observe({"webhook": HOOK}, status, plan=PLANNED, **fields), status


def test_the_webhook_is_delivered_once_the_run_is_finished() -> None:
    obs, status = finished()
    assert status["webhook"]["id"] == f"ib_{UID}_{RUN}"
    assert decide(obs, SETTINGS).actions == (DeliverWebhook(RUN, 1),)


def test_a_retry_waits_for_its_time_with_no_action() -> None:
    obs, status = finished()
    status = {
        **status,
        "webhook": {**status["webhook"], "attempts": 1, "nextAttemptTime": "2026-03-01T12:05:00Z"},
    }
    d = decide(replace(obs, status=status), SETTINGS)
    assert d.actions == () and d.requeue_after == pytest.approx(300.0)
    due = replace(obs, status=status, now=NOW + datetime.timedelta(minutes=5))
    assert decide(due, SETTINGS).actions == (DeliverWebhook(RUN, 2),)


def test_a_settled_webhook_costs_nothing() -> None:
    obs, status = finished()
    for settled in ({"deliveredTime": "2026-03-01T12:00:01Z"}, {"gaveUp": True}):
        quiet = decide(
            replace(obs, status={**status, "webhook": {**status["webhook"], **settled}}), SETTINGS
        )
        assert quiet.actions == () and quiet.requeue_after is None


@pytest.mark.parametrize(
    ("code", "retry_after", "reason", "wait", "event"),
    [
        pytest.param(200, None, Reason.WEBHOOK_DELIVERED, None, "WebhookDelivered", id="delivered"),
        pytest.param(503, None, Reason.WEBHOOK_RETRYING, 5.0, "WebhookRetrying", id="retry"),
        pytest.param(
            429, 120.0, Reason.WEBHOOK_RETRYING, 120.0, "WebhookRetrying", id="retry-after"
        ),
        pytest.param(410, None, Reason.WEBHOOK_GONE, None, "WebhookFailed", id="410-gone"),
        pytest.param(400, None, Reason.WEBHOOK_FAILED, None, "WebhookFailed", id="4xx-final"),
    ],
)
def test_webhook_outcomes(
    code: int, retry_after: float | None, reason: Reason, wait: float | None, event: str
) -> None:
    delivered, retry = webhook.classify(code)
    attempt = webhook.Attempt(
        1, "t", code, "" if delivered else f"HTTP {code}", delivered, retry, retry_after
    )
    _, state, _, posted, next_look = webhook_result({"run": RUN}, attempt, (0.0, 5.0), NOW)
    assert state is reason
    assert next_look == wait
    assert posted is not None and posted.reason == event


def test_the_webhook_gives_up_when_the_schedule_is_spent() -> None:
    attempt = webhook.Attempt(2, "t", 503, "HTTP 503", False, True)
    record, state, message, _, wait = webhook_result({"run": RUN}, attempt, (0.0, 5.0), NOW)
    assert state is Reason.WEBHOOK_FAILED and record["gaveUp"] is True and wait is None
    assert "schedule is spent" in message


# -- deletion ------------------------------------------------------------------------------


def test_delete_policy_holds_a_finalizer_and_removes_only_its_prefix() -> None:
    spec = {"output": {"deletionPolicy": "Delete"}}
    assert decide(observe(spec), SETTINGS).actions[0] == AddFinalizer()
    gone = observe(spec, deleting=True, finalizers=(plan.FINALIZER,))
    assert decide(gone, SETTINGS).actions == (
        DeleteOutputs("imagebatch", "shop/spring/"),
        RemoveFinalizer(),
    )


def test_retain_needs_no_finalizer_and_deletion_needs_no_operator() -> None:
    obs = observe(finalizers=(plan.FINALIZER,))
    assert decide(obs, SETTINGS).actions[0] == RemoveFinalizer()
    assert decide(observe(deleting=True), SETTINGS) == Decision()


# -- credentials ------------------------------------------------------------------------


def test_a_running_batch_is_woken_to_renew_its_credential_before_it_expires() -> None:
    expires = NOW + datetime.timedelta(minutes=16)
    obs, _ = validated(jobs=(job(active=1),), credentials_expire=expires)
    d = decide(obs, SETTINGS)
    assert d.actions == ()
    assert d.requeue_after == pytest.approx(60.0)  # renewed 15 minutes before it expires
    due = replace(obs, now=expires - datetime.timedelta(minutes=14))
    assert decide(due, SETTINGS).actions == (EnsureCredentials(RUN),)


def test_a_credential_this_process_has_not_seen_is_checked() -> None:
    obs, _ = validated(jobs=(job(active=1),), credentials_expire=None)
    assert decide(obs, SETTINGS).actions == (EnsureCredentials(RUN),)


def test_renewals_are_spaced_however_short_the_credential() -> None:
    short = replace(SETTINGS, credential_renew_seconds=7200)
    expires = NOW + datetime.timedelta(hours=1)
    just = replace(
        validated(jobs=(job(active=1),), credentials_expire=expires)[0], credentials_issued=NOW
    )
    d = decide(just, short)
    assert d.actions == ()
    assert d.requeue_after == pytest.approx(5.0)  # at most one renewal every 5 s
    later = replace(just, now=NOW + datetime.timedelta(seconds=5))
    assert decide(later, short).actions == (EnsureCredentials(RUN),)


def test_static_credentials_are_never_renewed() -> None:
    static = replace(SETTINGS, worker_credentials="static")
    obs, _ = validated(jobs=(job(active=1),), credentials_expire=None)
    assert decide(obs, static).actions == ()


def test_every_shard_done_is_merged_before_the_job_controller_says_so() -> None:
    # Both indexes' pods succeeded (seen by the pod watch); the Job is not complete yet.
    obs, _ = validated(jobs=(job(completed=frozenset({0, 1}), finished=False),))
    assert decide(obs, SETTINGS).actions == (StartMerge(RUN),)
    # One index given up by the Job and one done: every shard has an outcome.
    obs, _ = validated(jobs=(job(completed=frozenset({0}), failed=frozenset({1})),))
    assert decide(obs, SETTINGS).actions == (StartMerge(RUN),)
    # One still to go: keep following.
    obs, _ = validated(jobs=(job(completed=frozenset({0}), active=1),))
    assert decide(obs, SETTINGS).actions == ()
