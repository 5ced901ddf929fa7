"""The operator with many batches: every one is taken up, and a new one is not kept waiting.

A GitOps repository keeps its batches, so a cluster collects hundreds; the operator
holds no thread or timer per batch and is woken by watch events, so the 301st batch is
handled like the first. Also here: a webhook whose receiver asked to be called later is
called at that time even when the operator restarted meanwhile, and only once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import OperatorProcess, apply, get_batch, wait_batch
from tests.e2e.conftest import imagebatch as batch
from tests.support.servers import Answer, ImageServer, WebhookReceiver

pytestmark = pytest.mark.e2e

MANY = 300


def jobs_by_batch(cluster: LocalCluster, namespace: str) -> dict[str, list[dict[str, Any]]]:
    out = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))
    found: dict[str, list[dict[str, Any]]] = {}
    for job in out["items"]:
        found.setdefault(job["metadata"]["labels"]["imagebatch.dev/batch"], []).append(job)
    return found


def test_hundreds_of_batches_are_all_taken_up_and_one_more_starts_at_once(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    csv = f"S. No.,Product Name,Input Image Urls\n1,P,{images.url}/many/0.jpg\n"
    manifests = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {**batch(f"b{i:03d}", {"inline": csv}, suspend=True), "metadata": {"name": f"b{i:03d}"}}
            for i in range(MANY)
        ],
    }
    started = time.monotonic()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifests))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        listed = json.loads(cluster.kubectl("get", "ib", "-n", namespace, "-o", "json"))["items"]
        running = [b for b in listed if (b.get("status") or {}).get("phase") == "Running"]
        if len(running) == MANY:
            break
        time.sleep(2)
    took = time.monotonic() - started
    assert len(running) == MANY, f"{len(running)} of {MANY} batches running after {took:.0f}s"
    for b in running:
        ready = {c["type"]: c for c in b["status"]["conditions"]}["Ready"]
        assert ready["reason"] == "Suspended"
    jobs = jobs_by_batch(cluster, namespace)
    assert len(jobs) == MANY and all(len(j) == 1 for j in jobs.values())
    assert all(j[0]["spec"]["suspend"] is True for j in jobs.values())
    print(f"{MANY} batches validated and given a Job in {took:.1f}s")

    # One more, with work to do: taken up at once, not behind the others.
    applied = time.monotonic()
    apply(cluster, namespace, batch("latecomer", {"inline": csv}))
    while "latecomer" not in jobs_by_batch(cluster, namespace):
        assert time.monotonic() - applied < 20, "the new batch got no Job within 20 s"
        time.sleep(0.2)
    print(f"batch {MANY + 1} got its Job {time.monotonic() - applied:.1f}s after apply")
    wait_batch(cluster, namespace, "latecomer", ("Succeeded",), timeout=120)
    # kopf wrote nothing of its own on the batches: no finalizer, no progress annotations.
    meta = get_batch(cluster, namespace, "b000")["metadata"]
    assert not meta.get("finalizers")
    assert not [a for a in meta.get("annotations") or {} if "kopf" in a]


def test_a_webhook_retry_after_is_kept_across_a_restart_and_delivered_once(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    hook = WebhookReceiver(
        answers=lambda n: Answer(503, {"Retry-After": "12"}) if n == 1 else Answer(204)
    ).start()
    try:
        csv = f"S. No.,Product Name,Input Image Urls\n1,P,{images.url}/many/1.jpg\n"
        apply(cluster, namespace, batch("patient", {"inline": csv}, webhook={"url": hook.url}))
        wait_batch(cluster, namespace, "patient", ("Succeeded",))
        deadline = time.monotonic() + 60
        while not hook.deliveries and time.monotonic() < deadline:
            time.sleep(0.2)
        first_at = time.monotonic()
        record = get_batch(cluster, namespace, "patient")["status"]["webhook"]
        assert record["attempts"] == 1 and record["lastStatusCode"] == 503
        assert record["nextAttemptTime"]
        operator.restart(kill=True)
        while len(hook.deliveries) < 2 and time.monotonic() < first_at + 60:
            time.sleep(0.2)
        waited = time.monotonic() - first_at
        assert len(hook.deliveries) == 2
        assert waited >= 11, f"called again after {waited:.1f}s, before Retry-After (12 s)"
        time.sleep(3)
        assert len(hook.deliveries) == 2  # once delivered, never again
        ids = {d.headers["webhook-id"] for d in hook.deliveries}
        assert len(ids) == 1
        final = get_batch(cluster, namespace, "patient")["status"]
        assert final["webhook"]["deliveredTime"] and final["webhook"]["attempts"] == 2
        conditions = {c["type"]: c for c in final["conditions"]}
        assert conditions["WebhookDelivered"]["reason"] == "Delivered"
    finally:
        hook.close()
