"""ImageBatch end to end: kubectl apply to output CSV, images in MinIO and the webhook.

Real kube-apiserver and Job controller, real MinIO, the real operator process and the
real worker in every shard pod, real HTTP servers for images and webhooks.
"""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import pytest
import requests
import yaml
from minio import Minio
from PIL import Image
from standardwebhooks.webhooks import Webhook

from imagebatch_common.contract import Compression, image_key
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import (
    OUTPUT_BUCKET,
    OperatorProcess,
    apply,
    get_batch,
    public_base,
    wait_batch,
)
from tests.e2e.conftest import (
    imagebatch as batch,
)
from tests.support.servers import ImageServer, WebhookReceiver

pytestmark = pytest.mark.e2e

HEADER = "S. No.,Product Name,Input Image Urls\n"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(autouse=True)
def restricted(cluster: LocalCluster, namespace: str) -> None:
    """Every batch runs where the restricted Pod Security Standard is enforced."""
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    # The admission plugin really enforces it: a pod without a securityContext is refused.
    assert not cluster.kubectl_ok(
        "run", "unrestricted", "--image=x", "--restart=Never", "--dry-run=server", "-n", namespace
    )


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}


def read(storage: Minio, key: str, bucket: str = OUTPUT_BUCKET) -> bytes:
    response = storage.get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def events(cluster: LocalCluster, namespace: str, name: str) -> list[tuple[str, str, str]]:
    out = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.name={name}",
            "-o",
            "json",
        )
    )
    return [(e["type"], e["reason"], e["message"]) for e in out["items"]]


def test_inline_batch_compresses_every_image_writes_csv_and_signs_the_webhook(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    s = images.url
    hits_before = images.hits.get("/a.jpg", 0)  # the image server serves the whole session
    text = (
        HEADER
        + f'1,SKU1,"{s}/a.jpg,{s}/b.png"\n'
        + f"2,SKU2,{s}/c.jpg\n"
        + f'3,=HYPERLINK("x"),{s}/a.jpg\n'
    )
    cluster.kubectl(
        "create", "secret", "generic", "hook", "-n", namespace, f"--from-literal=secret={SECRET}"
    )
    apply(
        cluster,
        namespace,
        batch(
            "spring",
            {"inline": text},
            webhook={"url": receiver.url, "secretRef": {"name": "hook", "key": "secret"}},
            sharding={"imagesPerShard": 2},
        ),
    )
    cluster.kubectl("wait", "--for=condition=Ready", "ib/spring", "-n", namespace, "--timeout=180s")
    ib = wait_batch(cluster, namespace, "spring", ("Succeeded",))
    status = ib["status"]
    assert status["images"] == {"total": 3, "succeeded": 3, "failed": 0, "skipped": 0}
    assert status["rows"] == {"total": 3, "succeeded": 3, "failed": 0}
    assert status["shards"]["total"] == 2 and status["shards"]["succeeded"] == 2
    assert 0 < status["bytes"]["output"] < status["bytes"]["input"]
    c = conditions(ib)
    assert c["Ready"] == ("True", "Succeeded")
    assert c["Complete"] == ("True", "Succeeded")
    assert c["Validated"] == ("True", "CSVValid")
    assert c["Stalled"][0] == "False" and c["Reconciling"][0] == "False"
    assert status["output"]["csv"] == f"s3://{OUTPUT_BUCKET}/{namespace}/spring/output.csv"

    base = public_base(cluster)
    compression = Compression()
    prefix = f"{namespace}/spring/"

    def out(path: str) -> str:
        return f"{base}/{image_key(prefix, s + path, compression)}"

    output_csv = read(storage, f"{prefix}output.csv")
    assert output_csv.decode() == (
        "S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
        f'1,SKU1,"{s}/a.jpg,{s}/b.png","{out("/a.jpg")},{out("/b.png")}"\r\n'
        f"2,SKU2,{s}/c.jpg,{out('/c.jpg')}\r\n"
        f'3,"\'=HYPERLINK(""x"")",{s}/a.jpg,{out("/a.jpg")}\r\n'
    )
    assert read(storage, f"{prefix}errors.csv") == b"row,url,stage,reason\r\n"
    rows = csv_rows(output_csv)
    sources = {
        "/a.jpg": images.files["/a.jpg"][0],
        "/b.png": images.files["/b.png"][0],
        "/c.jpg": images.files["/c.jpg"][0],
    }
    for path, original in sources.items():
        body = requests.get(out(path), timeout=10).content
        if path.endswith(".jpg"):  # quality 95 in, quality 50 out
            assert len(body) < len(original)
        with Image.open(io.BytesIO(body)) as img, Image.open(io.BytesIO(original)) as src:
            assert img.format == "JPEG" and img.size == src.size
    stored = sorted(
        o.object_name or ""
        for o in storage.list_objects(
            OUTPUT_BUCKET, prefix=f"{namespace}/spring/images/", recursive=True
        )
    )
    assert len(stored) == 3 and all(k.endswith(".jpg") for k in stored)
    assert images.hits["/a.jpg"] - hits_before == 1  # a URL repeated across rows: once

    deadline = time.monotonic() + 30
    while not receiver.deliveries and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(receiver.deliveries) == 1
    delivery = receiver.deliveries[0]
    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "imagebatch.completed"
    data = payload["data"]
    assert (data["namespace"], data["name"], data["uid"]) == (
        namespace,
        "spring",
        ib["metadata"]["uid"],
    )
    assert data["phase"] == "Succeeded" and data["run"] == status["run"]
    assert data["images"]["succeeded"] == 3
    assert csv_rows(requests.get(data["outputCsvUrl"], timeout=10).content) == rows
    final = get_batch(cluster, namespace, "spring")
    assert conditions(final)["WebhookDelivered"] == ("True", "Delivered")
    assert final["status"]["webhook"]["attempts"] == 1
    assert final["status"]["webhook"]["lastStatusCode"] == 200
    assert "X-Amz-Signature" not in json.dumps(final["status"])  # no presigned URL in status

    table = cluster.kubectl("get", "ib", "-n", namespace)
    assert table.split("\n")[0].split() == [
        "NAME",
        "PHASE",
        "IMAGES",
        "FAILED",
        "SHARDS",
        "WEBHOOK",
        "REASON",
        "AGE",
    ]
    assert table.split("\n")[1].split()[:7] == [
        "spring",
        "Succeeded",
        "3/3",
        "0",
        "2/2",
        "Delivered",
        "Succeeded",
    ]
    reasons = [e[1] for e in events(cluster, namespace, "spring")]
    assert "JobCreated" in reasons and "Succeeded" in reasons and "WebhookDelivered" in reasons


def test_configmap_batch_reports_failed_images_and_still_completes(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    s = images.url
    text = HEADER + f'1,Good,{s}/d.jpg\n2,Missing,"{s}/nope.jpg,{s}/d.jpg"\n3,Fake,{s}/fake.jpg\n'
    cluster.kubectl(
        "create",
        "configmap",
        "products",
        "-n",
        namespace,
        "--from-file=products.csv=/dev/stdin",
        input=text,
    )
    apply(
        cluster,
        namespace,
        batch(
            "gitops",
            {"configMapKeyRef": {"name": "products", "key": "products.csv"}},
            failurePolicy={"maxFailedImagePercent": 80},
        ),
    )
    ib = wait_batch(cluster, namespace, "gitops", ("Succeeded", "Failed"))
    status = ib["status"]
    assert status["phase"] == "Succeeded"
    assert conditions(ib)["Complete"] == ("True", "SucceededWithFailures")
    assert status["images"]["total"] == 3 and status["images"]["failed"] == 2
    assert status["rows"] == {"total": 3, "succeeded": 1, "failed": 2}
    rows = csv_rows(read(storage, f"{namespace}/gitops/output.csv"))
    assert rows[2][3].startswith(",http")  # the missing image's slot is empty, order kept
    assert rows[3][3] == ""
    errors = csv_rows(read(storage, f"{namespace}/gitops/errors.csv"))
    assert errors[0] == ["row", "url", "stage", "reason"]
    by_url = {e[1]: e for e in errors[1:]}
    assert by_url[f"{s}/nope.jpg"][0] == "3" and by_url[f"{s}/nope.jpg"][2] == "fetch"
    assert "404" in by_url[f"{s}/nope.jpg"][3]
    assert by_url[f"{s}/fake.jpg"][0] == "4" and by_url[f"{s}/fake.jpg"][2] == "decode"


def test_s3_batch_over_the_failure_limit_is_failed_and_stalled(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    s = images.url
    data = (HEADER + f"1,A,{s}/d.jpg\n2,B,{s}/gone.jpg\n").encode()
    key = f"{namespace}/inputs/products.csv"  # a batch reads only its namespace's objects
    storage.put_object(OUTPUT_BUCKET, key, io.BytesIO(data), len(data))
    apply(
        cluster,
        namespace,
        batch(
            "strict",
            {"s3": {"bucket": OUTPUT_BUCKET, "key": key}},
            failurePolicy={"maxFailedImagePercent": 0},
        ),
    )
    cluster.kubectl(
        "wait", "--for=condition=Stalled", "ib/strict", "-n", namespace, "--timeout=180s"
    )
    ib = wait_batch(cluster, namespace, "strict", ("Failed",))
    c = conditions(ib)
    assert c["Failed"] == ("True", "TooManyFailedImages")
    assert c["Ready"][0] == "False" and c["Stalled"][0] == "True"
    assert "1 of 2 images failed (50.0%), above the limit of 0%" in ib["status"]["conditions"][0][
        "message"
    ] or any("1 of 2 images failed (50.0%)" in x["message"] for x in ib["status"]["conditions"])
    assert any(e[0] == "Warning" and e[1] == "Failed" for e in events(cluster, namespace, "strict"))


def test_url_source_is_fetched_under_the_guard(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    images.files["/catalog.csv"] = ((HEADER + f"1,A,{images.url}/d.jpg\n").encode(), "text/csv")
    apply(cluster, namespace, batch("remote", {"url": f"{images.url}/catalog.csv"}))
    ib = wait_batch(cluster, namespace, "remote", ("Succeeded",))
    assert ib["status"]["images"]["succeeded"] == 1
    rows = csv_rows(read(storage, f"{namespace}/remote/output.csv"))
    assert rows[1][:3] == ["1", "A", f"{images.url}/d.jpg"] and rows[1][3].startswith("http")


def test_invalid_csv_fails_validation_with_rows_and_columns(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, storage: Minio
) -> None:
    text = HEADER + "1,A,http://x.test/a.jpg\nx,,ftp://x.test/b\n1,C,http://x.test/c.jpg\n"
    apply(cluster, namespace, batch("broken", {"inline": text}))
    ib = wait_batch(cluster, namespace, "broken", ("Failed",))
    c = conditions(ib)
    assert c["Validated"] == ("False", "InvalidCSV")
    assert c["Stalled"] == ("True", "InvalidCSV")
    assert c["Ready"] == ("False", "InvalidCSV")
    problems = ib["status"]["validationErrors"]
    assert problems == [
        {"row": 3, "column": "S. No.", "message": "'x' is not a positive whole number"},
        {"row": 3, "column": "Product Name", "message": "the product name is empty"},
        {
            "row": 3,
            "column": "Input Image Urls",
            "message": "URL 'ftp://x.test/b' is not http or https",
        },
        {"row": 4, "column": "S. No.", "message": "serial number 1 repeats line 2"},
    ]
    report = csv_rows(read(storage, f"{namespace}/broken/errors.csv"))
    assert report[1] == ["3", "", "validate", "S. No.: 'x' is not a positive whole number"]
    assert len(report) == 5
    warnings = [e for e in events(cluster, namespace, "broken") if e[0] == "Warning"]
    assert warnings and warnings[0][1] == "InvalidCSV" and "row 3" in warnings[0][2]
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))["items"]
    assert jobs == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            {"source": {"inline": "x", "url": "http://a.test/x.csv"}},
            "source must set exactly one of url, configMapKeyRef, s3, inline",
            id="two-sources",
        ),
        pytest.param(
            {"source": {}},
            "source must set exactly one of url, configMapKeyRef, s3, inline",
            id="no-source",
        ),
        pytest.param(
            {"source": {"url": "ftp://a.test/x.csv"}},
            "source.url must start with http:// or https://",
            id="ftp",
        ),
        pytest.param(
            {"source": {"inline": "x"}, "compression": {"quality": 0}},
            "should be greater than or equal to 1",
            id="quality-0",
        ),
        pytest.param(
            {"source": {"inline": "x"}, "compression": {"format": "gif"}},
            'Unsupported value: "gif"',
            id="format",
        ),
        pytest.param(
            {"source": {"inline": "x" * 40000}}, "Too long: may not be", id="inline-too-big"
        ),
    ],
)
def test_kubectl_apply_refuses_a_bad_spec(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    spec: dict[str, Any],
    message: str,
) -> None:
    manifest = {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatch",
        "metadata": {"name": "bad"},
        "spec": spec,
    }
    with pytest.raises(RuntimeError) as refused:  # kubectl exited non-zero
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    assert message in str(refused.value)  # the message is kubectl's stderr


def test_spec_change_reruns_only_what_changed(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    s = images.url
    before = [images.hits.get(f"/many/{i}.jpg", 0) for i in range(3)]

    def fetched() -> list[int]:
        return [images.hits.get(f"/many/{i}.jpg", 0) - before[i] for i in range(3)]

    rows = [f"1,A,{s}/many/0.jpg\n", f"2,B,{s}/many/1.jpg\n", f"3,C,{s}/many/2.jpg\n"]
    manifest = batch(
        "evolving", {"inline": HEADER + "".join(rows[:2])}, webhook={"url": receiver.url}
    )
    apply(cluster, namespace, manifest)
    first = wait_batch(cluster, namespace, "evolving", ("Succeeded",))
    first_job = f"evolving-g{first['metadata']['generation']}"
    assert cluster.kubectl_ok("get", "job", first_job, "-n", namespace)
    assert first["status"]["images"] == {"total": 2, "succeeded": 2, "failed": 0, "skipped": 0}

    # A row added: only its image is fetched and compressed; the others are skipped.
    manifest["spec"]["source"] = {"inline": HEADER + "".join(rows)}
    apply(cluster, namespace, manifest)
    second = wait_batch(cluster, namespace, "evolving", ("Succeeded",))
    assert second["status"]["run"] != first["status"]["run"]
    assert second["status"]["images"] == {"total": 3, "succeeded": 3, "failed": 0, "skipped": 2}
    assert fetched() == [1, 1, 1]
    cluster.wait_for(
        lambda: not cluster.kubectl_ok("get", "job", first_job, "-n", namespace),
        "the old run's Job to be deleted",
    )
    output = csv_rows(read(storage, f"{namespace}/evolving/output.csv"))
    assert [r[0] for r in output[1:]] == ["1", "2", "3"]

    # New compression settings are new content addresses: everything runs again.
    manifest["spec"]["compression"] = {"quality": 30}
    apply(cluster, namespace, manifest)
    third = wait_batch(cluster, namespace, "evolving", ("Succeeded",))
    assert third["status"]["images"] == {"total": 3, "succeeded": 3, "failed": 0, "skipped": 0}
    assert fetched() == [2, 2, 2]

    deadline = time.monotonic() + 30
    while len(receiver.deliveries) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    ids = [d.headers["webhook-id"] for d in receiver.deliveries]
    assert len(ids) == 3 and len(set(ids)) == 3  # one delivery per run, each its own id
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))["items"]
    assert [j["metadata"]["name"] for j in jobs] == [f"evolving-g{third['metadata']['generation']}"]


def test_operator_killed_mid_run_resumes_without_duplicates(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    s = images.url
    text = HEADER + "".join(f"{i + 1},P{i},{s}/many/{i}.jpg\n" for i in range(12))
    apply(
        cluster,
        namespace,
        batch(
            "crashy",
            {"inline": text},
            webhook={"url": receiver.url},
            sharding={"imagesPerShard": 1, "parallelism": 1},
        ),
    )
    started = time.monotonic()
    wait_batch(cluster, namespace, "crashy", ("Running",))
    operator.restart(kill=True)
    time.sleep(2)
    operator.restart(kill=True)
    ib = wait_batch(cluster, namespace, "crashy", ("Succeeded",), timeout=240)
    assert ib["status"]["images"]["succeeded"] == 12
    assert ib["status"]["shards"] == {"total": 12, "succeeded": 12, "failed": 0, "active": 0}
    elapsed = time.monotonic() - started
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))["items"]
    assert len(jobs) == 1
    # Progress is written at most about once a second, transitions at once.
    writes = operator.log().count(f"status {namespace}/crashy written")
    assert 3 <= writes <= elapsed + 8, (writes, elapsed)
    deadline = time.monotonic() + 30
    while not receiver.deliveries and time.monotonic() < deadline:
        time.sleep(0.2)
    # A restart after delivery must not deliver again.
    operator.restart(kill=True)
    time.sleep(5)
    assert len(receiver.deliveries) == 1
    rows = csv_rows(read(storage, f"{namespace}/crashy/output.csv"))
    assert [r[0] for r in rows[1:]] == [str(i + 1) for i in range(12)]
    assert all(r[3].startswith("http") for r in rows[1:])


def test_deletion_policy_delete_removes_outputs_and_jobs_go_with_the_batch(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    text = HEADER + f"1,A,{images.url}/many/5.jpg\n"
    apply(cluster, namespace, batch("temp", {"inline": text}, output={"deletionPolicy": "Delete"}))
    wait_batch(cluster, namespace, "temp", ("Succeeded",))
    prefix = f"{namespace}/temp/"
    assert list(storage.list_objects(OUTPUT_BUCKET, prefix=prefix, recursive=True))
    cluster.kubectl("delete", "ib", "temp", "-n", namespace, "--timeout=60s")
    assert list(storage.list_objects(OUTPUT_BUCKET, prefix=prefix, recursive=True)) == []
    cluster.wait_for(
        lambda: (
            json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))["items"] == []
        ),
        "the Job to be garbage-collected with its ImageBatch",
    )


def test_webhook_retries_a_failing_receiver_and_records_every_attempt(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    images: ImageServer,
) -> None:
    receiver = WebhookReceiver(answers=lambda n: 503 if n < 3 else 204).start()
    try:
        text = HEADER + f"1,A,{images.url}/many/7.jpg\n"
        apply(cluster, namespace, batch("retried", {"inline": text}, webhook={"url": receiver.url}))
        wait_batch(cluster, namespace, "retried", ("Succeeded",))
        cluster.wait_for(
            lambda: (
                conditions(get_batch(cluster, namespace, "retried"))["WebhookDelivered"][0]
                == "True"
            ),
            "the webhook to be delivered",
        )
        ib = get_batch(cluster, namespace, "retried")
        record = ib["status"]["webhook"]
        assert record["attempts"] == 3 and record["lastStatusCode"] == 204
        assert "deliveredTime" in record
        assert conditions(ib)["WebhookDelivered"] == ("True", "Delivered")
        assert len(receiver.deliveries) == 3
        assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 1
    finally:
        receiver.close()


def test_a_receiver_that_answers_410_is_not_called_again(
    cluster: LocalCluster,
    namespace: str,
    operator: OperatorProcess,
    images: ImageServer,
) -> None:
    receiver = WebhookReceiver(answers=lambda n: 410).start()
    try:
        text = HEADER + f"1,A,{images.url}/many/8.jpg\n"
        apply(cluster, namespace, batch("gone", {"inline": text}, webhook={"url": receiver.url}))
        cluster.wait_for(
            lambda: (
                conditions(get_batch(cluster, namespace, "gone")).get("WebhookDelivered", ("",))[0]
                == "False"
            ),
            "the webhook to be given up",
        )
        ib = get_batch(cluster, namespace, "gone")
        assert ib["status"]["phase"] == "Succeeded"  # delivery never changes the batch's result
        assert conditions(ib)["WebhookDelivered"] == ("False", "ReceiverGone")
        assert ib["status"]["webhook"]["attempts"] == 1
        assert len(receiver.deliveries) == 1
    finally:
        receiver.close()


def test_a_suspended_batch_starts_no_pods_until_resumed(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    text = HEADER + f"1,A,{images.url}/many/9.jpg\n2,B,{images.url}/many/10.jpg\n"
    manifest = batch("paused", {"inline": text}, suspend=True)
    apply(cluster, namespace, manifest)
    ib = wait_batch(cluster, namespace, "paused", ("Running",))
    assert conditions(ib)["Reconciling"] == ("True", "Suspended")
    assert conditions(ib)["Ready"] == ("False", "Suspended")
    job = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json"))["items"][0]
    assert job["spec"]["suspend"] is True
    time.sleep(2)
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
    assert pods == []
    manifest["spec"]["suspend"] = False
    apply(cluster, namespace, manifest)
    resumed = wait_batch(cluster, namespace, "paused", ("Succeeded",))
    assert resumed["status"]["images"]["succeeded"] == 2
