"""The operator's /metrics, scraped during and after a real batch, against its status."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import OperatorProcess, apply, get_batch, wait_batch
from tests.e2e.conftest import imagebatch as batch
from tests.support.servers import ImageServer, WebhookReceiver

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(operator: OperatorProcess) -> Samples:
    deadline = time.monotonic() + 30  # the operator may still be starting
    while True:
        try:
            text = requests.get(operator.metrics_url, timeout=10).text
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all((k, w) in ls for k, w in labels.items())
    )


def test_metrics_follow_a_batch_and_agree_with_its_status(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    # An operator of this namespace alone, so its counters are this batch's and nothing
    # else the session runs meanwhile.
    saved = dict(operator.env)
    operator.env["IMAGEBATCH_WATCH_NAMESPACES"] = namespace
    operator.restart(kill=False)
    try:
        check_metrics(cluster, namespace, operator, images, receiver)
    finally:
        operator.env.clear()
        operator.env.update(saved)
        operator.restart(kill=False)


def check_metrics(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    before = scrape(operator)
    s = images.url
    text = "S. No.,Product Name,Input Image Urls\n" + "".join(
        f"{i + 1},P{i},{s}/many/{i}.jpg\n" for i in range(10)
    )
    text += f"11,Missing,{s}/gone.jpg\n"
    apply(
        cluster,
        namespace,
        batch(
            "metered",
            {"inline": text},
            suspend=True,
            webhook={"url": receiver.url},
            sharding={"imagesPerShard": 4},
        ),
    )
    wait_batch(cluster, namespace, "metered", ("Running",))
    during = scrape(operator)
    assert value(during, "imagebatch_batches", phase="Running") >= 1
    assert (
        value(during, "imagebatch_runs_started_total")
        >= value(before, "imagebatch_runs_started_total") + 1
    )
    assert "imagebatch_workqueue_depth" in {n for n, _ in during}

    cluster.kubectl(
        "patch",
        "ib",
        "metered",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"suspend":false}}',
    )
    wait_batch(cluster, namespace, "metered", ("Succeeded",))
    deadline = time.monotonic() + 30
    status = get_batch(cluster, namespace, "metered")["status"]
    while not (status.get("webhook") or {}).get("deliveredTime"):
        assert time.monotonic() < deadline, "the webhook was not delivered"
        time.sleep(0.2)
        status = get_batch(cluster, namespace, "metered")["status"]
    after = scrape(operator)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    images_status = status["images"]
    assert delta("imagebatch_images_total", result="succeeded") == (
        images_status["succeeded"] - images_status["skipped"]
    )
    assert delta("imagebatch_images_total", result="failed") == images_status["failed"] == 1
    assert delta("imagebatch_image_bytes_total", direction="in") == status["bytes"]["input"]
    assert delta("imagebatch_image_bytes_total", direction="out") == status["bytes"]["output"]
    assert delta("imagebatch_runs_finished_total", outcome="succeeded") == 1
    assert delta("imagebatch_webhook_deliveries_total", outcome="delivered") == 1
    assert value(after, "imagebatch_batches", phase="Succeeded") >= 1
    assert total(after, "imagebatch_reconcile_total", result="ok") > total(
        before, "imagebatch_reconcile_total", result="ok"
    )
    assert value(after, "imagebatch_reconcile_duration_seconds_count") > 0
    assert (
        delta("imagebatch_kubernetes_requests_total", verb="create", resource="jobs", code="ok")
        == 1
    )
    assert total(after, "imagebatch_storage_requests_total", operation="put", outcome="ok") > total(
        before, "imagebatch_storage_requests_total", operation="put", outcome="ok"
    )
    # Bounded cardinality: no series carries a batch's name or namespace.
    for (_, labels), _v in after.items():
        assert all(namespace not in v and "metered" not in v for _, v in labels)
