"""What the operator reads from a Job and a worker pod, from their watch bodies."""

from __future__ import annotations

from typing import Any

import pytest

from imagebatch_operator.observe import finished_shard, job_view, owner_batch, parse_indexes


@pytest.mark.parametrize(
    ("text", "indexes"),
    [("", set()), (None, set()), ("0-2,5", {0, 1, 2, 5}), ("7", {7}), ("1-1,3-4", {1, 3, 4})],
)
def test_the_jobs_index_notation(text: str | None, indexes: set[int]) -> None:
    assert parse_indexes(text) == frozenset(indexes)


def pod(phase: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", **meta}, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            pod(
                "Succeeded",
                labels={"batch.kubernetes.io/job-name": "spring-g1"},
                annotations={"batch.kubernetes.io/job-completion-index": "3"},
            ),
            ("spring-g1", 3),
            id="succeeded",
        ),
        pytest.param(
            pod(
                "Succeeded",
                labels={"job-name": "spring-g1", "batch.kubernetes.io/job-completion-index": "0"},
            ),
            ("spring-g1", 0),
            id="older-labels",
        ),
        pytest.param(
            pod(
                "Running",
                labels={"batch.kubernetes.io/job-name": "spring-g1"},
                annotations={"batch.kubernetes.io/job-completion-index": "3"},
            ),
            None,
            id="still-running",
        ),
        pytest.param(
            pod("Failed", labels={"batch.kubernetes.io/job-name": "spring-g1"}),
            None,
            id="failed",
        ),
        pytest.param(pod("Succeeded", labels={}), None, id="not-a-job-pod"),
    ],
)
def test_a_succeeded_worker_pod_completes_its_index(
    body: dict[str, Any], expected: tuple[str, int] | None
) -> None:
    assert finished_shard(body) == expected


def test_a_job_as_the_operator_sees_it() -> None:
    body = {
        "metadata": {
            "name": "spring-g1",
            "labels": {"imagebatch.dev/run": "g1-0f1e2d3c"},
            "ownerReferences": [{"kind": "ImageBatch", "name": "spring", "controller": True}],
            "deletionTimestamp": None,
        },
        "spec": {"suspend": True, "parallelism": 3},
        "status": {
            "completedIndexes": "0-1",
            "failedIndexes": "4",
            "active": 2,
            "conditions": [{"type": "Complete", "status": "False"}],
        },
    }
    view = job_view(body)
    assert (view.run, view.completed, view.failed, view.active) == (
        "g1-0f1e2d3c",
        frozenset({0, 1}),
        frozenset({4}),
        2,
    )
    assert view.suspended and not view.finished and not view.deleting
    assert owner_batch(body) == "spring"
    assert owner_batch({"metadata": {"ownerReferences": [{"kind": "Deployment"}]}}) is None
