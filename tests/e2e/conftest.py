"""End-to-end fixtures: the CRD applied, the real operator running, sample servers up.

The operator runs as its own process (``imagebatch-operator``) against the local
cluster, exactly as the chart's Deployment would run it, so a test can kill and restart
it. Worker pods run the real ``imagebatch-worker`` through the node agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from minio import Minio

from tests.cluster.proc import die_with_parent
from tests.cluster.stack import LocalCluster, free_port
from tests.support.servers import ImageServer, WebhookReceiver, photo

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "imagebatches.imagebatch.dev.yaml"
OUTPUT_BUCKET = "imagebatch"
WEBHOOK_SCHEDULE = "0,1,2,3,5,8,10,10,10,10,10,10"


def public_base(cluster: LocalCluster) -> str:
    assert cluster.minio is not None
    return f"{cluster.minio.url}/{OUTPUT_BUCKET}"


PUBLIC_READ = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"AWS": ["*"]},
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{OUTPUT_BUCKET}/*"],
        }
    ],
}


class OperatorProcess:
    """The operator as a real process; ``restart(kill=True)`` simulates a crash."""

    def __init__(self, cluster: LocalCluster):
        assert cluster.minio is not None
        self.cluster = cluster
        self.log_path = cluster.workdir / "logs" / "operator.log"
        self.env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "MINIO_ENDPOINT": cluster.minio.endpoint,
            "MINIO_ACCESS_KEY": cluster.minio.access_key,
            "MINIO_SECRET_KEY": cluster.minio.secret_key,
            "IMAGEBATCH_BUCKET": OUTPUT_BUCKET,
            # Output URLs under a public base (the bucket is anonymously readable), so
            # output.csv is deterministic and can be compared byte by byte.
            "IMAGEBATCH_PUBLIC_URL": public_base(cluster),
            # The sample servers live on loopback; a real install allows nothing here.
            "IMAGEBATCH_ALLOW_NETS": "127.0.0.0/8",
            "IMAGEBATCH_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
            "IMAGEBATCH_WORKER_IMAGE": "imagebatch:e2e",
            # Webhook retries: the delays in seconds before each attempt, shortened from
            # the default (about a day and a half) so a receiver's outage fits in a test.
            "IMAGEBATCH_WEBHOOK_SCHEDULE": WEBHOOK_SCHEDULE,
            # Many batches share a test namespace now and then; caps are tested on their own.
            "IMAGEBATCH_MAX_RUNNING_PER_NAMESPACE": "1000",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0

    def start(self) -> None:
        port = free_port()
        self.env["IMAGEBATCH_LIVENESS_ENDPOINT"] = f"http://127.0.0.1:{port}/healthz"
        self.metrics_port = free_port()
        self.env["IMAGEBATCH_METRICS_PORT"] = str(self.metrics_port)
        self.env["IMAGEBATCH_METRICS_ADDRESS"] = "127.0.0.1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "imagebatch-operator")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def kill_now(self) -> None:
        """SIGKILL the operator without waiting: safe from any thread (a server's hook).

        Start it again with ``restart()`` from the test's own thread: a child dies with
        the thread that started it.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @contextmanager
    def configured(self, **env: str) -> Iterator[OperatorProcess]:
        """The operator restarted with ``env`` added for the block, and as before after it."""
        saved = {name: self.env.get(name) for name in env}
        self.env.update(env)
        self.restart(kill=False)
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:
                    self.env.pop(name, None)
                else:
                    self.env[name] = value
            self.restart(kill=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, storage: Minio) -> Iterator[OperatorProcess]:
    """The CRD installed and one operator watching every namespace."""
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/imagebatches.imagebatch.dev", "--timeout=60s"
    )
    process = OperatorProcess(cluster)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def storage(cluster: LocalCluster) -> Minio:
    assert cluster.minio is not None
    client = cluster.minio.client()
    if not client.bucket_exists(OUTPUT_BUCKET):
        client.make_bucket(OUTPUT_BUCKET)
    client.set_bucket_policy(OUTPUT_BUCKET, json.dumps(PUBLIC_READ))
    return client


SAMPLE_TEXT = b"this is not an image, whatever the extension says\n"


@pytest.fixture(scope="session")
def images() -> Iterator[ImageServer]:
    """Sample images on 127.0.0.1, plus a 404 and a text file posing as a JPEG."""
    files = {
        "/a.jpg": (photo(640, 480, 1), "image/jpeg"),
        "/b.png": (photo(320, 240, 2, "PNG"), "image/png"),
        "/c.jpg": (photo(800, 600, 3), "image/jpeg"),
        "/d.jpg": (photo(400, 300, 4), "image/jpeg"),
        "/fake.jpg": (SAMPLE_TEXT, "image/jpeg"),
    }
    for i in range(12):
        files[f"/many/{i}.jpg"] = (photo(200, 150, 10 + i), "image/jpeg")
    server = ImageServer(files)
    yield server
    server.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver().start()
    yield hook
    hook.close()


def apply(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> str:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def get_batch(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        cluster.kubectl("get", "imagebatch", name, "-n", namespace, "-o", "json")
    )
    return out


def imagebatch(name: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """An ImageBatch manifest: ``source`` plus any other spec fields."""
    return {
        "apiVersion": "imagebatch.dev/v1alpha1",
        "kind": "ImageBatch",
        "metadata": {"name": name},
        "spec": {"source": source, **spec},
    }


def wait_batch(
    cluster: LocalCluster,
    namespace: str,
    name: str,
    phases: tuple[str, ...],
    timeout: float = 180,
    interval: float = 0.5,
) -> dict[str, Any]:
    """Poll until the batch reaches one of ``phases`` for its current generation."""
    deadline = time.monotonic() + timeout
    batch: dict[str, Any] = {}
    while time.monotonic() < deadline:
        batch = get_batch(cluster, namespace, name)
        status = batch.get("status") or {}
        if (
            status.get("phase") in phases
            and status.get("observedGeneration") == batch["metadata"]["generation"]
        ):
            return batch
        time.sleep(interval)
    raise AssertionError(
        f"{namespace}/{name} never reached {phases}: {json.dumps(batch.get('status'))}"
    )
