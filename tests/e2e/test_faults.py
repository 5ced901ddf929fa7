"""Fault drills: whatever breaks during a batch, the user ends up with what a fault-free
run gives them.

Each drill runs one batch shaped to give its fault a window (91 images served with
latency, 7 shards of 15, 3 at a time, a webhook; or 40,000 rows over 20 images for the
output merge), breaks something at a chosen moment, and then checks what a user sees
against a fault-free run of the same CSV, made once per session:

- the batch is Succeeded, its counters add up and equal the fault-free run's;
- output.csv and errors.csv equal the fault-free run's (its namespace and name aside);
- every image output.csv names is in MinIO and decodes;
- the run has exactly one Job;
- the webhook was delivered, and every delivery carried the run's one ``webhook-id``.

The servers are real (the local cluster, MinIO, the operator process, worker pods run
by the node agent); the faults are real too: SIGKILL, servers stopped and started again
on their data, a Job deleted with kubectl, a receiver that refuses or stalls.
"""

from __future__ import annotations

import csv
import email.utils
import io
import json
import math
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from minio import Minio
from minio.error import S3Error
from PIL import Image

from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import OUTPUT_BUCKET, OperatorProcess, apply, public_base
from tests.e2e.conftest import imagebatch as manifest
from tests.support.servers import Answer, Delivery, ImageServer, WebhookReceiver, photo

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

GROUP, VERSION, PLURAL = "imagebatch.dev", "v1alpha1", "imagebatches"
LABEL_BATCH, LABEL_RUN = f"{GROUP}/batch", f"{GROUP}/run"
HEADER = "S. No.,Product Name,Input Image Urls\n"
LATENCY = 0.03  # seconds before each image is served: shards take long enough to hit


@dataclass(frozen=True)
class Shape:
    """A batch: its CSV (a path on the drill server) and what its counters must say."""

    csv: str
    rows: int
    images: int  # distinct image URLs
    missing: int  # of which the image server answers 404
    shards: int
    sharding: dict[str, int]


# 60 rows, 90 images and one 404; 7 shards of at most 15, 3 at a time. Retries are
# generous so that a stopped MinIO (each attempt fails fast) does not use them up.
STANDARD = Shape(
    "/drill.csv",
    rows=60,
    images=91,
    missing=1,
    shards=7,
    sharding={"imagesPerShard": 15, "parallelism": 3, "retriesPerShard": 5},
)
# 40,000 rows over 20 images: little to compress, much to validate and merge.
MERGE = Shape(
    "/merge.csv",
    rows=40_000,
    images=20,
    missing=0,
    shards=2,
    sharding={"imagesPerShard": 10, "parallelism": 2, "retriesPerShard": 5},
)


def standard_csv(base: str) -> bytes:
    lines = [HEADER]
    for r in range(STANDARD.rows):
        urls = [f"{base}/drill/{r}.jpg"]
        if r < 30:
            urls.append(f"{base}/drill/{60 + r}.jpg")
        if r == 45:
            urls.append(f"{base}/drill/missing.jpg")
        lines.append(f'{r + 1},Product {r + 1},"{",".join(urls)}"\n')
    return "".join(lines).encode()


URLS_PER_ROW = 10  # in the merge CSV: enough output (~40 MB) that writing it takes seconds


def merge_csv(base: str) -> bytes:
    lines = [HEADER]
    for r in range(MERGE.rows):
        urls = ",".join(f"{base}/merge/{(r + j) % MERGE.images}.jpg" for j in range(URLS_PER_ROW))
        lines.append(f'{r + 1},Item {r + 1},"{urls}"\n')
    return "".join(lines).encode()


# -- session fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def drill_server() -> Iterator[ImageServer]:
    """The drills' images and CSVs, each image served after ``LATENCY`` seconds."""
    files: dict[str, tuple[bytes, str]] = {
        f"/drill/{i}.jpg": (photo(120, 90, 100 + i), "image/jpeg") for i in range(90)
    }
    files.update(
        {f"/merge/{i}.jpg": (photo(120, 90, 300 + i), "image/jpeg") for i in range(MERGE.images)}
    )
    server = ImageServer(files, latency=LATENCY)
    server.files[STANDARD.csv] = (standard_csv(server.url), "text/csv")
    server.files[MERGE.csv] = (merge_csv(server.url), "text/csv")
    yield server
    server.close()


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> client.ApiClient:
    """An API client for polling fast (a kubectl process per look is too slow for a window)."""
    return config.new_client_from_config(str(cluster.kubeconfig))


@dataclass(frozen=True)
class Outcome:
    """What a user sees of a finished batch, comparable across namespaces and names."""

    output_csv: str
    errors_csv: str
    images: tuple[int, int]  # succeeded, failed
    rows: tuple[int, int]
    # Seconds from "every Job index complete" to output.csv stored: the merge's window.
    merge_seconds: float = 0.0


@dataclass
class Baselines:
    """Fault-free runs, one per shape, made the first time a drill asks for one."""

    cluster: LocalCluster
    kube: client.ApiClient
    storage: Minio
    server: ImageServer
    namespaces: list[str] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def of(self, shape: Shape) -> Outcome:
        if shape.csv not in self.outcomes:
            namespace = f"baseline-{uuid.uuid4().hex[:8]}"
            self.cluster.kubectl("create", "namespace", namespace)
            self.namespaces.append(namespace)
            receiver = WebhookReceiver().start()
            try:
                drill = Drill(
                    self.cluster, self.kube, self.storage, self.server, namespace, receiver, shape
                )
                drill.apply()
                drill.wait_indexes(lambda done: len(done) == shape.shards, "every index done")
                indexes_done = time.monotonic()
                drill.wait(drill.output_exists, "output.csv", timeout=120, interval=0.05)
                merge_seconds = time.monotonic() - indexes_done
                batch = drill.check(None)
                self.outcomes[shape.csv] = drill.outcome(batch, merge_seconds)
            finally:
                receiver.close()
        return self.outcomes[shape.csv]


@pytest.fixture(scope="session")
def baselines(
    cluster: LocalCluster,
    kube: client.ApiClient,
    operator: OperatorProcess,
    storage: Minio,
    drill_server: ImageServer,
) -> Iterator[Baselines]:
    made = Baselines(cluster, kube, storage, drill_server)
    yield made
    for namespace in made.namespaces:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# -- one drill ----------------------------------------------------------------------


@dataclass
class Drill:
    """One batch under a fault, and the looks a test takes at it."""

    cluster: LocalCluster
    kube: client.ApiClient
    storage: Minio
    server: ImageServer
    namespace: str
    receiver: WebhookReceiver
    shape: Shape = STANDARD
    name: str = "drill"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}/{self.name}/"

    def apply(self, **spec: Any) -> None:
        body = manifest(
            self.name,
            {"url": f"{self.server.url}{self.shape.csv}"},
            sharding=self.shape.sharding,
            webhook={"url": self.receiver.url},
            **spec,
        )
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(body))

    # -- looks ----------------------------------------------------------------

    def batch(self) -> dict[str, Any]:
        found: dict[str, Any] = client.CustomObjectsApi(self.kube).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return found

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.batch().get("status") or {}
        return status

    def jobs(self) -> list[dict[str, Any]]:
        response = client.BatchV1Api(self.kube).list_namespaced_job(
            self.namespace, label_selector=f"{LABEL_BATCH}={self.name}", _preload_content=False
        )
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def completed_indexes(self) -> set[int]:
        jobs = self.jobs()
        if not jobs:
            return set()
        return parse_indexes(jobs[0].get("status", {}).get("completedIndexes", ""))

    def output_exists(self) -> bool:
        try:
            self.storage.stat_object(OUTPUT_BUCKET, f"{self.prefix}output.csv")
        except S3Error:
            return False
        return True

    def read(self, key: str) -> bytes:
        response = self.storage.get_object(OUTPUT_BUCKET, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    # -- waiting --------------------------------------------------------------

    def wait(
        self, condition: Callable[[], bool], what: str, timeout: float = 180, interval: float = 0.2
    ) -> None:
        """Poll ``condition``; a failed look (a server restarting) counts as not yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except Exception:  # noqa: S110 - the next look decides
                pass
            time.sleep(interval)
        raise AssertionError(f"{self.namespace}/{self.name}: no {what} after {timeout:.0f}s")

    def wait_indexes(self, condition: Callable[[set[int]], bool], what: str) -> set[int]:
        found: set[int] = set()

        def look() -> bool:
            nonlocal found
            found = self.completed_indexes()
            return condition(found)

        self.wait(look, what, interval=0.05)
        return found

    def wait_phase(self, phase: str, timeout: float = 240) -> dict[str, Any]:
        batch: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal batch
            batch = self.batch()
            status = batch.get("status") or {}
            return bool(
                status.get("phase") == phase
                and status.get("observedGeneration") == batch["metadata"]["generation"]
            )

        try:
            self.wait(reached, f"phase {phase}", timeout=timeout, interval=0.5)
        except AssertionError as late:
            raise AssertionError(f"{late}; status: {json.dumps(batch.get('status'))}") from None
        return batch

    def wait_delivered(self, timeout: float = 120) -> dict[str, Any]:
        def delivered() -> bool:
            return condition(self.batch(), "WebhookDelivered") == "True"

        try:
            self.wait(delivered, "delivered webhook", timeout=timeout, interval=0.5)
        except AssertionError as late:
            record = self.status().get("webhook")
            raise AssertionError(f"{late}; status.webhook: {json.dumps(record)}") from None
        return self.batch()

    # -- what the user sees ---------------------------------------------------

    def normalised(self, text: str) -> str:
        return text.replace(f"/{self.prefix}", "/<namespace>/<name>/")

    def outcome(self, batch: dict[str, Any], merge_seconds: float = 0.0) -> Outcome:
        status = batch["status"]
        images, rows = status["images"], status["rows"]
        return Outcome(
            output_csv=self.normalised(self.read(f"{self.prefix}output.csv").decode()),
            errors_csv=self.normalised(self.read(f"{self.prefix}errors.csv").decode()),
            images=(images["succeeded"], images["failed"]),
            rows=(rows["succeeded"], rows["failed"]),
            merge_seconds=merge_seconds,
        )

    def check(self, baseline: Outcome | None, timeout: float = 240) -> dict[str, Any]:
        """Everything a user sees of the finished batch, against the fault-free run's
        (``None``: this is the fault-free run)."""
        batch = self.wait_phase("Succeeded", timeout)
        status = batch["status"]
        images, rows, shards = status["images"], status["rows"], status["shards"]
        assert images["total"] == self.shape.images
        assert images["failed"] == self.shape.missing, images
        assert images["succeeded"] + images["failed"] == images["total"]
        assert rows["total"] == self.shape.rows
        assert rows["succeeded"] + rows["failed"] == rows["total"]
        assert shards["total"] == self.shape.shards
        assert shards["succeeded"] == shards["total"], shards

        if baseline is not None:
            seen = self.outcome(batch)
            assert seen.images == baseline.images
            assert seen.rows == baseline.rows
            assert seen.output_csv == baseline.output_csv, (
                "output.csv differs from a fault-free run"
            )
            assert seen.errors_csv == baseline.errors_csv, (
                "errors.csv differs from a fault-free run"
            )

        base = public_base(self.cluster) + "/"
        keys = {
            url.removeprefix(base)
            for row in csv.reader(io.StringIO(self.read(f"{self.prefix}output.csv").decode()))
            for url in row[3].split(",")
            if url.startswith(base)
        }
        assert len(keys) == images["succeeded"]
        for key in sorted(keys):
            with Image.open(io.BytesIO(self.read(key))) as picture:
                picture.load()  # decodes every pixel: a truncated object fails here
                assert picture.format == "JPEG"

        batch = self.wait_delivered()
        record = batch["status"]["webhook"]
        runs = Counter(job["metadata"]["labels"][LABEL_RUN] for job in self.jobs())
        assert runs == {record["run"]: 1}, f"Jobs per run: {dict(runs)}"
        ids = self.receiver.ids
        assert ids, "no delivery arrived"
        assert set(ids) == {record["id"]}, f"deliveries carried ids {Counter(ids)}"
        return batch


def parse_indexes(text: str) -> set[int]:
    """A Job's ``completedIndexes`` notation, e.g. ``"0-2,5"``."""
    found: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def condition(batch: dict[str, Any], kind: str) -> str:
    for c in (batch.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return str(c["status"])
    return ""


@pytest.fixture
def drill(
    cluster: LocalCluster,
    kube: client.ApiClient,
    storage: Minio,
    drill_server: ImageServer,
    namespace: str,
    receiver: WebhookReceiver,
    operator: OperatorProcess,
) -> Iterator[Drill]:
    """A drill of the standard shape; the operator is running at its end, whatever the test did."""
    drill_server.latency, drill_server.pace = LATENCY, {}
    yield Drill(cluster, kube, storage, drill_server, namespace, receiver)
    drill_server.latency, drill_server.pace = LATENCY, {}
    if operator.process is None or operator.process.poll() is not None:
        operator.start()
    for server in ("minio", "kube-apiserver"):
        if not cluster.is_running(server):
            cluster.start_server(server)


# -- the operator killed --------------------------------------------------------------


def test_operator_killed_while_validating(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(STANDARD)
    drill.server.pace[STANDARD.csv] = 5.0  # the CSV trickles in: validation takes seconds
    before = drill.server.hits_snapshot()
    drill.apply()
    drill.wait(lambda: STANDARD.csv in drill.server.hits_since(before), "CSV download")
    time.sleep(1.5)  # a third of the CSV in
    assert drill.status().get("phase") in (None, "Pending", "Validating")
    assert drill.jobs() == []
    operator.restart(kill=True)
    drill.check(baseline)


def test_start_time_survives_operator_kills_before_running(
    drill: Drill, operator: OperatorProcess
) -> None:
    drill.server.pace[STANDARD.csv] = 4.0
    drill.apply(suspend=True)  # no pods: only the way to Running matters here
    drill.wait(lambda: "startTime" in drill.status(), "status.startTime")
    started = drill.status()["startTime"]
    time.sleep(1.5)  # a reset start time would be later, even at whole seconds
    operator.restart(kill=True)  # while validating
    drill.wait(lambda: bool(drill.jobs()), "the run's Job", timeout=60, interval=0.05)
    operator.restart(kill=True)  # just after the Job was created
    drill.wait_phase("Running")
    assert drill.status()["startTime"] == started


def test_operator_killed_right_after_creating_the_job(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(STANDARD)
    drill.apply()
    drill.wait(lambda: bool(drill.jobs()), "the run's Job", interval=0.02)
    operator.restart(kill=True)
    drill.check(baseline)


def test_operator_killed_mid_run(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(STANDARD)
    drill.apply()
    done = drill.wait_indexes(lambda d: 0 < len(d) < STANDARD.shards, "some shards done")
    operator.restart(kill=True)
    assert len(done) < STANDARD.shards
    drill.check(baseline)


def test_operator_killed_while_merging_a_large_output(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(MERGE)
    drill.shape = MERGE
    drill.apply()
    drill.wait_indexes(lambda d: len(d) == MERGE.shards, "every index done")
    # Halfway through the fault-free run's merge window: all shards are done and the
    # operator is writing output.csv.
    print(f"fault-free merge window: {baseline.merge_seconds:.2f}s")
    time.sleep(baseline.merge_seconds / 2)
    operator.kill_now()
    assert not drill.output_exists(), (
        f"output.csv was written before the kill (merge took {baseline.merge_seconds:.1f}s)"
    )
    operator.restart(kill=True)
    drill.check(baseline, timeout=300)


def test_operator_killed_while_the_webhook_is_in_flight(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(STANDARD)
    drill.receiver.answers = lambda n: Answer(200, delay=4.0) if n == 1 else 200
    drill.apply()
    assert drill.receiver.wait_for(lambda d: len(d) >= 1, timeout=180), "no delivery came"
    operator.restart(kill=True)  # the receiver still holds the first request
    drill.check(baseline)


def test_operator_killed_the_instant_the_receiver_answered(
    drill: Drill, baselines: Baselines, operator: OperatorProcess
) -> None:
    baseline = baselines.of(STANDARD)

    def kill_on_first(delivery: Delivery) -> None:
        if delivery is drill.receiver.deliveries[0]:
            operator.kill_now()

    drill.receiver.on_answer = kill_on_first
    drill.apply()
    answered = drill.receiver.wait_for(lambda d: bool(d) and d[0].answered is not None, 180)
    assert answered, "no delivery was answered"
    operator.restart(kill=True)
    drill.check(baseline)


# -- worker pods ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerProcess:
    pid: int
    pod: str


def worker_processes(cluster: LocalCluster, namespace: str) -> list[WorkerProcess]:
    """The main process of each worker container the node agent runs in ``namespace``.

    The agent gives each pod a folder of its own as HOME; its name starts with the
    namespace and the pod's name.
    """
    pods = f"{cluster.workdir / 'node' / 'pods'}/{namespace}_"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            pid = int(entry.name)
            leader = os.getpgid(pid) == pid  # the container's process, not a helper
        except (OSError, ProcessLookupError):
            continue
        home = next((v[5:].decode() for v in environ if v.startswith(b"HOME=")), "")
        if (
            leader
            and home.startswith(pods)
            and any(v.startswith(b"IMAGEBATCH_RUN=") for v in environ)
        ):
            found.append(WorkerProcess(pid, Path(home).name.split("_")[1]))
    return found


def stored_by(cluster: LocalCluster, namespace: str, pod: str) -> set[str]:
    """Keys the pod's worker has logged as compressed and stored (skips not counted)."""
    log = cluster.pod_logs / f"{namespace}_{pod}_worker.log"
    keys = set()
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "image" and event.get("ok") and not event.get("skipped"):
            keys.add(str(event["key"]))
    return keys


def test_worker_killed_mid_shard_is_retried_without_fetching_stored_images_again(
    drill: Drill, baselines: Baselines
) -> None:
    baseline = baselines.of(STANDARD)
    drill.server.latency = 0.6  # a shard takes a couple of seconds: time to catch it
    before = drill.server.hits_snapshot()
    drill.apply()
    victim: WorkerProcess | None = None

    def busy_worker() -> bool:
        nonlocal victim
        for worker in worker_processes(drill.cluster, drill.namespace):
            if len(stored_by(drill.cluster, drill.namespace, worker.pod)) >= 3:
                victim = worker
                return True
        return False

    drill.wait(busy_worker, "a worker midway through its shard", interval=0.05)
    assert victim is not None
    os.killpg(victim.pid, signal.SIGKILL)
    killed_stored = stored_by(drill.cluster, drill.namespace, victim.pod)
    assert 0 < len(killed_stored) < STANDARD.sharding["imagesPerShard"]
    drill.server.latency = LATENCY

    drill.check(baseline)
    # The batch may finish on the shard pods' success before the Job controller has
    # folded them into the Job's status: wait for the Job to say it is complete.
    drill.wait(
        lambda: any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in drill.jobs()[0]["status"].get("conditions") or []
        ),
        "the Job to be complete",
    )
    job = drill.jobs()[0]
    assert job["status"].get("failed", 0) >= 1, job["status"]
    pod = json.loads(
        drill.cluster.kubectl("get", "pod", victim.pod, "-n", drill.namespace, "-o", "json")
    )
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    # An image the killed attempt stored was never fetched again; one it had in flight
    # at most once more; every other image once.
    fetched = drill.server.hits_since(before)
    base = public_base(drill.cluster) + "/"
    key_of = {
        url: key.removeprefix(base)
        for row in csv.reader(io.StringIO(drill.read(f"{drill.prefix}output.csv").decode()))
        for url, key in zip(row[2].split(","), row[3].split(","), strict=True)
        if key.startswith(base)
    }
    again = {}
    for url, key in key_of.items():
        path = url.removeprefix(drill.server.url)
        if key in killed_stored:
            assert fetched[path] == 1, f"{path} was stored before the kill, yet fetched again"
        elif fetched[path] > 1:
            again[path] = fetched[path]
    assert all(n == 2 for n in again.values()), again
    assert len(again) <= 8, again  # at most the worker's concurrency was in flight


# -- servers stopped ----------------------------------------------------------------------


def test_minio_stopped_mid_run_and_restarted_on_its_data(
    drill: Drill, baselines: Baselines
) -> None:
    baseline = baselines.of(STANDARD)
    drill.apply()
    drill.wait_indexes(lambda d: 0 < len(d) < STANDARD.shards, "some shards done")
    with drill.cluster.server_down("minio"):
        time.sleep(25)
    drill.check(baseline, timeout=300)


def test_kube_apiserver_stopped_mid_run_and_restarted(drill: Drill, baselines: Baselines) -> None:
    baseline = baselines.of(STANDARD)
    drill.apply()
    drill.wait_indexes(lambda d: 0 < len(d) < STANDARD.shards, "some shards done")
    with drill.cluster.server_down("kube-apiserver"):
        time.sleep(18)  # running shards finish meanwhile; their pods' status must not be lost
    drill.check(baseline, timeout=300)


# -- the Job deleted by hand ------------------------------------------------------------------


@pytest.mark.parametrize("cascade", ["foreground", "background"])
def test_job_deleted_by_hand_mid_run(drill: Drill, baselines: Baselines, cascade: str) -> None:
    baseline = baselines.of(STANDARD)
    drill.apply()
    drill.wait_indexes(lambda d: 0 < len(d) < STANDARD.shards, "some shards done")
    job = drill.jobs()[0]["metadata"]
    drill.cluster.kubectl(
        "delete", "job", job["name"], "-n", drill.namespace, f"--cascade={cascade}", "--wait=false"
    )
    drill.check(baseline)
    assert drill.jobs()[0]["metadata"]["uid"] != job["uid"]  # really replaced


# -- the receiver -------------------------------------------------------------------------


def test_receiver_answering_503_for_a_while_then_204(drill: Drill, baselines: Baselines) -> None:
    baseline = baselines.of(STANDARD)
    drill.receiver.answers = lambda n: 503 if n <= 4 else 204
    drill.apply()
    batch = drill.check(baseline)
    record = batch["status"]["webhook"]
    assert record["attempts"] == 5 and record["lastStatusCode"] == 204
    assert [d.status for d in drill.receiver.deliveries] == [503, 503, 503, 503, 204]


def test_receiver_refusing_connections_longer_than_the_old_schedule(
    drill: Drill, baselines: Baselines
) -> None:
    baseline = baselines.of(STANDARD)
    drill.receiver.stop()  # the port stays ours to listen on again
    drill.apply()
    drill.wait_phase("Succeeded")
    down_since = time.monotonic()
    drill.wait(
        lambda: int((drill.status().get("webhook") or {}).get("attempts") or 0) >= 2,
        "a second refused attempt",
        timeout=60,
    )
    time.sleep(max(0.0, 15 - (time.monotonic() - down_since)))
    record = drill.status()["webhook"]
    assert not record.get("gaveUp"), f"gave up while the receiver was down: {record}"
    assert not record.get("deliveredTime")
    assert record.get("lastError"), record
    assert record.get("nextAttemptTime"), f"no next attempt scheduled: {record}"
    time.sleep(max(0.0, 35 - (time.monotonic() - down_since)))
    drill.receiver.start()
    drill.check(baseline)
    assert len(drill.receiver.deliveries) == 1  # only the attempt that found it listening


def retry_after_seconds() -> tuple[str, float]:
    return "3", 3.0


def retry_after_http_date() -> tuple[str, float]:
    # Whole seconds only: the date names a second at least 3 s away.
    at = math.ceil(time.time()) + 4
    return email.utils.formatdate(at, usegmt=True), at - time.time()


@pytest.mark.parametrize(
    "retry_after",
    [retry_after_seconds, retry_after_http_date],
    ids=["seconds", "http-date"],
)
def test_receiver_answering_429_with_retry_after(
    drill: Drill, baselines: Baselines, retry_after: Callable[[], tuple[str, float]]
) -> None:
    baseline = baselines.of(STANDARD)
    earliest: list[float] = []

    def answers(n: int) -> Answer:
        if n > 1:
            return Answer(200)
        header, wait = retry_after()
        earliest.append(time.monotonic() + wait)
        return Answer(429, {"Retry-After": header})

    drill.receiver.answers = answers
    drill.apply()
    drill.check(baseline)
    second = drill.receiver.deliveries[1]
    assert second.arrived >= earliest[0], (
        f"attempt 2 came {earliest[0] - second.arrived:.2f}s before Retry-After allowed"
    )
    assert [d.status for d in drill.receiver.deliveries] == [429, 200]


# -- deletion with many batches ----------------------------------------------------------------


def tiny_batch(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return manifest(name, {"inline": f"{HEADER}1,{name},{image}\n"}, **spec)


def gone(cluster: LocalCluster, namespace: str, name: str) -> bool:
    return not cluster.kubectl_ok("get", "imagebatch", name, "-n", namespace)


def test_deleting_a_batch_is_prompt_with_a_hundred_others_present(
    drill: Drill, kube: client.ApiClient
) -> None:
    cluster, namespace, server = drill.cluster, drill.namespace, drill.server
    image = f"{server.url}/drill/0.jpg"
    doomed = tiny_batch("doomed", image, output={"deletionPolicy": "Delete"})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doomed))
    Drill(
        cluster, kube, drill.storage, server, namespace, drill.receiver, name="doomed"
    ).wait_phase("Succeeded", timeout=120)
    doomed_prefix = f"{namespace}/doomed/"
    assert list(drill.storage.list_objects(OUTPUT_BUCKET, prefix=doomed_prefix, recursive=True))
    server.latency = 5.0  # the running batch stays running throughout
    drill.apply()
    idle = [tiny_batch(f"idle-{i:03}", image, suspend=True) for i in range(100)]
    apply(cluster, namespace, {"apiVersion": "v1", "kind": "List", "items": idle})
    custom = client.CustomObjectsApi(kube)
    try:
        drill.wait_phase("Running", timeout=120)
        time.sleep(5)  # the operator has seen all of them

        started = time.monotonic()
        cluster.kubectl("delete", "imagebatch", "idle-042", "-n", namespace, "--wait=false")
        drill.wait(lambda: gone(cluster, namespace, "idle-042"), "deletion (Retain)", timeout=10)
        retain_seconds = time.monotonic() - started

        started = time.monotonic()
        cluster.kubectl("delete", "imagebatch", "doomed", "-n", namespace, "--wait=false")
        drill.wait(lambda: gone(cluster, namespace, "doomed"), "deletion (Delete)", timeout=10)
        delete_seconds = time.monotonic() - started
        assert (
            list(drill.storage.list_objects(OUTPUT_BUCKET, prefix=doomed_prefix, recursive=True))
            == []
        ), "deletionPolicy Delete left outputs behind"
        print(f"deleted in {retain_seconds:.1f}s (Retain) and {delete_seconds:.1f}s (Delete)")
    finally:
        # Leave nothing for the rest of the session to wait on: without finalizers the
        # namespace's batches go at once, whatever state the operator is in.
        cluster.kubectl("delete", "imagebatch", "--all", "-n", namespace, "--wait=false")
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]:
            if item["metadata"].get("finalizers"):
                try:
                    custom.patch_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        namespace,
                        PLURAL,
                        item["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                        _content_type="application/merge-patch+json",
                    )
                except ApiException as error:
                    if error.status != 404:
                        raise
