"""``kubectl imagebatch`` end to end: found by kubectl's plugin mechanism, run on the
local cluster against the real operator, MinIO, an image server and a webhook receiver.

Each command runs as a user types it, ``kubectl imagebatch ...``, with PATH holding the
built kubectl and the virtualenv's ``kubectl-imagebatch``; what is asserted is what the
user sees (stdout, stderr, the exit code) and what the cluster and MinIO then hold.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from minio import Minio
from minio.credentials.providers import AssumeRoleProvider

from tests.cluster import pki
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import (
    OUTPUT_BUCKET,
    OperatorProcess,
    apply,
    get_batch,
    imagebatch,
    wait_batch,
)
from tests.support.servers import ImageServer, WebhookReceiver, photo

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
HEADER = "S. No.,Product Name,Input Image Urls\n"


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def kubectl_imagebatch(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> Iterator[Any]:
    """Runs ``kubectl imagebatch ARGS`` in ``tmp_path`` as a user would."""
    base = cluster.env()
    path = os.pathsep.join([str(VENV_BIN), base["PATH"]])

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Ran:
        # Only what a user's shell would have: no operator credentials in the environment.
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "AWS_"))}
        try:
            result = subprocess.run(
                ["kubectl", "imagebatch", *args],
                cwd=tmp_path,
                env={**clean, **base, "PATH": path, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as hung:  # show what it printed before it hung
            out, err = (
                b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                for b in (hung.stdout, hung.stderr)
            )
            return Ran(-1, out, f"{err}\n[killed after {timeout:.0f}s: {args}]")
        return Ran(result.returncode, result.stdout, result.stderr)

    yield run


@pytest.fixture
def image_host() -> Iterator[ImageServer]:
    """Six product photos, each path unique to the test."""
    tag = uuid.uuid4().hex[:8]
    files = {f"/{tag}/{i}.jpg": (photo(160 + 8 * i, 120, 30 + i), "image/jpeg") for i in range(6)}
    server = ImageServer(files)
    yield server
    server.close()


def url(server: ImageServer, index: int) -> str:
    return server.url + sorted(server.files)[index]


def path(server: ImageServer, index: int) -> str:
    return sorted(server.files)[index]


def minio_object(storage: Minio, key: str) -> bytes:
    response = storage.get_object(OUTPUT_BUCKET, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_kubectl_finds_the_plugin(kubectl_imagebatch: Any, cluster: LocalCluster) -> None:
    listed = subprocess.run(
        ["kubectl", "plugin", "list"],
        env={
            **os.environ,
            **cluster.env(),
            "PATH": f"{VENV_BIN}{os.pathsep}{cluster.env()['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert str(VENV_BIN / "kubectl-imagebatch") in listed.stdout
    helped = kubectl_imagebatch("--help")
    assert helped.code == 0
    assert helped.out.startswith("usage: kubectl imagebatch")


def test_submit_wait_fails_then_retry_fetches_only_the_failed_images(
    kubectl_imagebatch: Any,
    cluster: LocalCluster,
    namespace: str,
    storage: Minio,
    image_host: ImageServer,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    host = image_host
    rows = [
        f'1,SKU1,"{url(host, 0)},{url(host, 1)}"',
        f"2,SKU2,{url(host, 2)}",
        f'3,SKU3,"{url(host, 3)},{url(host, 4)}"',
        f"4,SKU4,{url(host, 5)}",
    ]
    (tmp_path / "spring.csv").write_text(HEADER + "\n".join(rows) + "\n")
    # The image host is half down: one image answers 503, another is not published yet.
    host.failures = {path(host, 4): 503, path(host, 5): 404}

    submitted = kubectl_imagebatch(
        "submit", "spring.csv", "-n", namespace, "--webhook", receiver.url, "--wait"
    )
    # 2 of 6 images failed: above the default 10%, so the batch failed and so does --wait.
    assert submitted.code == 1, submitted
    assert submitted.out.splitlines() == [
        f"imagebatch.imagebatch.dev/spring created in {namespace}: 4 rows, 6 distinct images "
        "(CSV inline)",
        "Failed: 2 of 6 images failed (33.3%), above the limit of 10%; see errors.csv",
    ]
    assert "Failed       images [########################] 6/6 100%  2 failed  shards 1/1" in (
        submitted.err
    )
    first_run = get_batch(cluster, namespace, "spring")["status"]["run"]
    hits_after_first = dict(host.hits)
    assert all(hits_after_first[path(host, i)] == 1 for i in range(4))
    wait_until(lambda: len(receiver.deliveries) == 1, "the first run's webhook")

    status = kubectl_imagebatch("status", "spring", "-n", namespace)
    assert status.code == 1  # the batch is Failed
    for line in (
        "Phase:     Failed (TooManyFailedImages): 2 of 6 images failed (33.3%), above the "
        "limit of 10%; see errors.csv",
        f"Run:       {first_run} (generation 1)",
        "Rows:      4 total, 2 succeeded, 2 failed",
        "Images:    6 total, 4 succeeded, 2 failed, 0 already stored",
        "Shards:    1 total, 1 succeeded, 0 failed, 0 running",
        "Failed images (errors.csv, first 2):",
    ):
        assert line in status.out.splitlines(), status.out
    assert "Webhook:   Delivered, 1 attempt, last answer HTTP 200" in status.out
    failed_lines = status.out.split("Failed images (errors.csv, first 2):\n")[1].splitlines()
    assert sorted(line.split()[1] for line in failed_lines[1:]) == [url(host, 4), url(host, 5)]
    assert "http-status: HTTP 503" in status.out and "http-status: HTTP 404" in status.out

    logs = kubectl_imagebatch("logs", "spring", "-n", namespace, "--shard", "0")
    assert logs.code == 0, logs
    assert logs.err.startswith("==> shard 0: pod spring-g1-0-")
    records = [json.loads(line) for line in logs.out.splitlines()]
    images = {r["url"]: r["ok"] for r in records if r["event"] == "image"}
    assert images == {url(host, i): i < 4 for i in range(6)}
    assert records[-1]["event"] == "shard" and records[-1]["run"] == first_run

    # The host is fixed; a retry fetches the two failed images and nothing else.
    host.failures.clear()
    retried = kubectl_imagebatch("retry", "spring", "-n", namespace, "--wait")
    assert retried.code == 0, retried
    token = get_batch(cluster, namespace, "spring")["spec"]["retry"]
    assert retried.out.splitlines() == [
        f"imagebatch.imagebatch.dev/spring retry {token} (generation 2): a new run for 2 "
        "failed images",
        "Succeeded: 6/6 images done, 0 failed; 1/1 shards finished",
    ]
    assert {p: host.hits[p] - hits_after_first[p] for p in host.hits} == {
        **{path(host, i): 0 for i in range(4)},
        path(host, 4): 1,
        path(host, 5): 1,
    }
    second = get_batch(cluster, namespace, "spring")["status"]
    assert second["run"] != first_run
    assert second["images"] == {"total": 6, "succeeded": 6, "failed": 0, "skipped": 4}

    # The webhook fired once per run, each with its own stable id.
    wait_until(lambda: len(receiver.deliveries) == 2, "the retry's webhook")
    time.sleep(2)  # and no more after that
    assert len(receiver.deliveries) == 2
    payloads = [d.json()["data"] for d in receiver.deliveries]
    assert [(p["run"], p["phase"]) for p in payloads] == [
        (first_run, "Failed"),
        (second["run"], "Succeeded"),
    ]
    assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 2

    # Results: byte for byte what is in MinIO; output.csv complete, in the input's order.
    results = kubectl_imagebatch("results", "spring", "-n", namespace, "-o", "out")
    assert results.code == 0, results
    prefix = f"{namespace}/spring/"
    for name in ("output.csv", "errors.csv"):
        assert (tmp_path / "out" / name).read_bytes() == minio_object(storage, prefix + name)
        assert f"out/{name}" in results.out
    table = list(csv.reader(io.StringIO((tmp_path / "out" / "output.csv").read_text())))
    assert table[0][-1] == "Output Image Urls"
    assert [r[0] for r in table[1:]] == ["1", "2", "3", "4"]
    for row in table[1:]:
        outputs = row[3].split(",")
        assert len(outputs) == len(row[2].split(",")) and all(outputs)
    assert (tmp_path / "out" / "errors.csv").read_text().splitlines() == ["row,url,stage,reason"]

    listing = kubectl_imagebatch("status", "-n", namespace)
    assert listing.code == 0
    assert listing.out.splitlines()[0].split() == [
        *("NAME", "PHASE", "IMAGES", "FAILED", "SHARDS", "WEBHOOK", "REASON", "AGE")
    ]
    assert listing.out.splitlines()[1].split()[:7] == [
        *("spring", "Succeeded", "6/6", "0", "1/1", "Delivered", "Succeeded")
    ]


def test_an_invalid_csv_is_refused_before_anything_is_created_with_the_operators_words(
    kubectl_imagebatch: Any, cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    text = HEADER + "1,SKU1,http://img.test/a.jpg\nx,SKU2,ftp://img.test/b.jpg\n1,,\n"
    (tmp_path / "bad.csv").write_text(text)
    # What the operator says about the same file, applied the usual way.
    apply(cluster, namespace, imagebatch("applied", {"inline": text}))
    problems = wait_batch(cluster, namespace, "applied", ("Failed",))["status"]["validationErrors"]
    assert len(problems) >= 3

    refused = kubectl_imagebatch("submit", "bad.csv", "-n", namespace, "--name", "refused")
    assert refused.code == 1
    lines = refused.out.splitlines()
    assert lines[0] == f"bad.csv is not valid: {len(problems)} problems"
    assert lines[1:-1] == [
        f"  row {p['row']}, column {p['column']!r}: {p['message']}" for p in problems
    ]
    assert lines[-1] == "Nothing was created."
    assert not cluster.kubectl_ok("get", "imagebatch", "refused", "-n", namespace)
    assert "refused" not in cluster.kubectl("get", "configmaps", "-n", namespace, "-o", "name")


def test_a_csv_over_32_kib_goes_in_a_configmap_that_goes_with_the_batch(
    kubectl_imagebatch: Any,
    cluster: LocalCluster,
    namespace: str,
    image_host: ImageServer,
    tmp_path: Path,
) -> None:
    lines = [
        f'{i},"Product {i}, a long descriptive name that makes the file large",'
        f"{url(image_host, i % 6)}"
        for i in range(1, 501)
    ]
    data = (HEADER + "\n".join(lines) + "\n").encode()
    assert len(data) > 32 * 1024
    (tmp_path / "Autumn Catalog.csv").write_bytes(data)
    done = kubectl_imagebatch(
        "submit", "Autumn Catalog.csv", "-n", namespace, "--quality", "40", "--wait"
    )
    assert done.code == 0, done
    assert done.out.splitlines() == [
        f"imagebatch.imagebatch.dev/autumn-catalog created in {namespace}: 500 rows, "
        "6 distinct images (CSV ConfigMap autumn-catalog-csv)",
        "Succeeded: 6/6 images done, 0 failed; 1/1 shards finished",
    ]
    batch = get_batch(cluster, namespace, "autumn-catalog")
    assert batch["spec"]["compression"]["quality"] == 40
    cm = json.loads(
        cluster.kubectl("get", "configmap", "autumn-catalog-csv", "-n", namespace, "-o", "json")
    )
    assert cm["data"]["products.csv"].encode() == data
    assert [r["uid"] for r in cm["metadata"]["ownerReferences"]] == [batch["metadata"]["uid"]]
    # Taken again, the name is refused before anything is created.
    again = kubectl_imagebatch("submit", "Autumn Catalog.csv", "-n", namespace)
    assert again.code == 3
    assert "imagebatch 'autumn-catalog' already exists" in again.err

    cluster.kubectl("delete", "imagebatch", "autumn-catalog", "-n", namespace)
    wait_until(
        lambda: not cluster.kubectl_ok("get", "configmap", "autumn-catalog-csv", "-n", namespace),
        "the garbage collector to delete the CSV's ConfigMap with its batch",
        # The collector looks for new resource types every 30 s: a CRD installed just
        # before may not be watched yet.
        timeout=90,
    )


def test_results_with_the_users_own_scoped_credentials(
    kubectl_imagebatch: Any,
    cluster: LocalCluster,
    namespace: str,
    storage: Minio,
    image_host: ImageServer,
    tmp_path: Path,
) -> None:
    (tmp_path / "small.csv").write_text(HEADER + f"1,SKU1,{url(image_host, 0)}\n")
    assert kubectl_imagebatch("submit", "small.csv", "-n", namespace, "--wait").code == 0
    # A user's credential: temporary (STS), allowed to read their namespace's keys only.
    assert cluster.minio is not None
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{OUTPUT_BUCKET}/{namespace}/*"],
            }
        ],
    }
    credentials = AssumeRoleProvider(
        sts_endpoint=cluster.minio.url,
        access_key=cluster.minio.access_key,
        secret_key=cluster.minio.secret_key,
        policy=json.dumps(policy),
    ).retrieve()
    env = {
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_SESSION_TOKEN": credentials.session_token or "",
        "AWS_ENDPOINT_URL": cluster.minio.url,
        "AWS_REGION": "us-east-1",
    }
    got = kubectl_imagebatch("results", "small", "-n", namespace, "--via", "s3", env=env)
    assert got.code == 0, got
    for name in ("output.csv", "errors.csv"):
        key = f"{namespace}/small/{name}"
        assert (tmp_path / "small" / name).read_bytes() == minio_object(storage, key)
        assert f"from s3://{OUTPUT_BUCKET}/{key}" in got.out
    # Without credentials of their own, the user is told what to set.
    bare = kubectl_imagebatch("results", "small", "-n", namespace, "--via", "s3")
    assert bare.code == 3
    assert "set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in bare.err


def test_exit_codes_a_script_can_use(
    kubectl_imagebatch: Any,
    cluster: LocalCluster,
    namespace: str,
    image_host: ImageServer,
    tmp_path: Path,
) -> None:
    missing = kubectl_imagebatch("status", "nope", "-n", namespace)
    assert (missing.code, missing.err) == (
        3,
        f"error: imagebatch 'nope' not found in namespace {namespace}\n",
    )
    usage = kubectl_imagebatch("submit", "x.csv", "--quality", "101")
    assert usage.code == 2 and "quality is 1 (smallest) to 100 (best)" in usage.err
    unreadable = kubectl_imagebatch("submit", "absent.csv", "-n", namespace)
    assert unreadable.code == 2 and "cannot read absent.csv" in unreadable.err

    # A suspended batch runs no pod: it stays Running until resumed.
    text = HEADER + f"1,SKU1,{url(image_host, 0)}\n"
    apply(cluster, namespace, imagebatch("paused", {"inline": text}, suspend=True))
    wait_batch(cluster, namespace, "paused", ("Running",))
    busy = kubectl_imagebatch("retry", "paused", "-n", namespace)
    assert busy.code == 2 and "is Running: a retry replaces the run in progress" in busy.err
    gave_up = kubectl_imagebatch(
        "retry", "paused", "-n", namespace, "--force", "--wait", "--timeout", "3s"
    )
    assert gave_up.code == 4, gave_up
    assert "gave up waiting after 3s; the batch goes on" in gave_up.err
    assert get_batch(cluster, namespace, "paused")["spec"]["retry"]
    shard = kubectl_imagebatch("logs", "paused", "-n", namespace, "--shard", "5")
    assert (shard.code, shard.err.strip().endswith("has 1 shard (0 to 0)")) == (2, True)
    cluster.kubectl(
        "patch", "imagebatch", "paused", "-n", namespace, "--type", "merge",
        "-p", yaml.safe_dump({"spec": {"suspend": False}}),
    )  # fmt: skip
    wait_batch(cluster, namespace, "paused", ("Succeeded",))
    ok = kubectl_imagebatch("status", "paused", "-n", namespace)
    assert ok.code == 0 and "Phase:     Succeeded (Succeeded)" in ok.out


ROLE = Path(__file__).resolve().parents[2] / "examples" / "rbac" / "kubectl-imagebatch-user.yaml"


def test_the_example_role_is_all_a_user_needs(
    kubectl_imagebatch: Any,
    cluster: LocalCluster,
    namespace: str,
    image_host: ImageServer,
    tmp_path: Path,
) -> None:
    # Jane: a service account bound to the example Role only, her own kubeconfig.
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROLE))
    cluster.kubectl("create", "serviceaccount", "jane", "-n", namespace)
    cluster.kubectl(
        "create", "rolebinding", "jane", "-n", namespace,
        "--role=imagebatch-user", f"--serviceaccount={namespace}:jane",
    )  # fmt: skip
    token = cluster.kubectl("create", "token", "jane", "-n", namespace).strip()
    kubeconfig = tmp_path / "jane.kubeconfig"
    kubeconfig.write_text(
        pki.token_kubeconfig(cluster.server, cluster.workdir / "pki" / "ca.crt", token, namespace)
    )
    jane = ["--kubeconfig", str(kubeconfig)]  # her context's namespace is the test's
    assert not cluster.kubectl_ok("--kubeconfig", str(kubeconfig), "get", "secrets")

    rows = [f"{i},SKU {i} {'x' * 80},{url(image_host, i % 6)}" for i in range(1, 401)]
    (tmp_path / "big.csv").write_text(HEADER + "\n".join(rows) + "\n")  # a ConfigMap's worth
    submitted = kubectl_imagebatch("submit", "big.csv", *jane, "--wait")
    assert submitted.code == 0, submitted
    assert "(CSV ConfigMap big-csv)" in submitted.out
    assert "warning" not in submitted.err  # the owner reference was set
    for args in (
        ["status", "big"],
        ["status"],
        ["logs", "big", "--shard", "0"],
        ["retry", "big", "--force", "--wait"],
        ["results", "big"],
    ):
        ran = kubectl_imagebatch(*args, *jane)
        assert ran.code == 0, (args, ran)
    # And she cannot reach what the Role leaves out: another namespace.
    elsewhere = kubectl_imagebatch("status", *jane, "-n", "default")
    assert elsewhere.code == 3 and "forbidden" in elsewhere.err
