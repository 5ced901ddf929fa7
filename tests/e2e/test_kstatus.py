"""kstatus, the library Flux and kapply judge health with, run on real ImageBatches.

``tests/kstatus`` is a Go program built from ``sigs.k8s.io/cli-utils`` (the version in
``tests/cluster/build.py``) that prints ``status.Compute`` for an object read from the
API server, or for an object given on stdin (used here for the object exactly as the
API server returned it from a write, before the operator could see it). Each check
pairs the library's verdict with Argo CD's (``examples/argocd/health.lua``) on the same
object, so the two GitOps tools are held to one story: in progress, current, failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from tests.cluster import build
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import OperatorProcess, apply, get_batch, imagebatch, wait_batch
from tests.support.servers import photo
from tests.unit.test_lua_health import argocd_health

pytestmark = pytest.mark.e2e

HEADER = "S. No.,Product Name,Input Image Urls\n"
# Argo CD's health for each kstatus verdict, as examples/argocd/health.lua maps them.
ARGOCD_FOR = {"InProgress": "Progressing", "Current": "Healthy", "Failed": "Degraded"}


@dataclass(frozen=True)
class Verdict:
    status: str
    message: str
    object: dict[str, Any]


def kstatus(cluster: LocalCluster, namespace: str, name: str) -> Verdict:
    """status.Compute for the batch as the API server has it now."""
    return _run(cluster, ["imagebatches.imagebatch.dev", namespace, name])


def kstatus_of(cluster: LocalCluster, obj: dict[str, Any]) -> Verdict:
    """status.Compute for an object given whole (e.g. a write's response)."""
    return _run(cluster, ["-"], json.dumps(obj))


def _run(cluster: LocalCluster, args: list[str], stdin: str | None = None) -> Verdict:
    result = subprocess.run(
        [str(build.binary_path("kstatus")), *args],
        input=stdin,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return Verdict(out["status"], out["message"], out.get("object") or {})


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def agrees_with_argocd(verdict: Verdict) -> None:
    assert argocd_health(verdict.object)["status"] == ARGOCD_FOR[verdict.status]


class GatedServer:
    """Serves ``files``; every GET waits until ``release()`` (at most 30 s) first."""

    def __init__(self, files: dict[str, tuple[bytes, str]]):
        self.files = files
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.waiting.release()
                outer.gate.wait(30)
                body, ctype = outer.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def held(self, timeout: float = 30) -> bool:
        """True once a request is waiting at the gate."""
        return self.waiting.acquire(timeout=timeout)

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gated() -> Iterator[GatedServer]:
    server = GatedServer({})
    yield server
    server.close()


def wait_phase(
    cluster: LocalCluster, namespace: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    batch: dict[str, Any] = {}
    while time.monotonic() < deadline:
        batch = get_batch(cluster, namespace, name)
        status = batch.get("status") or {}
        if (
            status.get("phase") == phase
            and status.get("observedGeneration") == batch["metadata"]["generation"]
        ):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {phase}: {json.dumps(batch.get('status'))}")


def test_in_progress_while_validating_and_running_then_current(
    cluster: LocalCluster,
    operator: OperatorProcess,
    namespace: str,
    gated: GatedServer,
) -> None:
    tag = uuid.uuid4().hex[:8]
    image = f"/{tag}/a.jpg"
    gated.files[image] = (photo(200, 150, 7), "image/jpeg")
    gated.files[f"/{tag}/products.csv"] = (
        (HEADER + f"1,SKU1,{gated.url}{image}\n").encode(),
        "text/csv",
    )
    apply(cluster, namespace, imagebatch("gated", {"url": f"{gated.url}/{tag}/products.csv"}))

    # Validating: the operator is reading the CSV, which the server holds back.
    assert gated.held(), "the operator never asked for the CSV"
    validating = wait_phase(cluster, namespace, "gated", "Validating")
    verdict = kstatus(cluster, namespace, "gated")
    assert verdict.status == "InProgress"
    assert verdict.message == condition(validating, "Reconciling")["message"]
    assert verdict.object["status"]["phase"] == "Validating"
    agrees_with_argocd(verdict)

    # Running: the CSV is read; the worker is fetching the image, held back in turn.
    gated.gate.set()
    gated.gate = threading.Event()
    assert gated.held(), "the worker never asked for the image"
    cluster.wait_for(
        lambda: (
            (get_batch(cluster, namespace, "gated").get("status") or {})
            .get("shards", {})
            .get("active")
            == 1
        ),
        "the batch to count its running shard",
    )
    verdict = kstatus(cluster, namespace, "gated")
    assert (verdict.status, verdict.object["status"]["phase"]) == ("InProgress", "Running")
    assert verdict.object["status"]["shards"]["active"] == 1
    assert verdict.message == condition(verdict.object, "Reconciling")["message"]
    agrees_with_argocd(verdict)

    gated.release()
    wait_phase(cluster, namespace, "gated", "Succeeded")
    verdict = kstatus(cluster, namespace, "gated")
    assert (verdict.status, verdict.message) == ("Current", "Resource is Ready")
    agrees_with_argocd(verdict)


def test_in_progress_after_a_spec_change_until_observed(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gated: GatedServer
) -> None:
    gated.release()
    gated.files["/b.jpg"] = (photo(120, 90, 3), "image/jpeg")
    text = HEADER + f"1,SKU1,{gated.url}/b.jpg\n"
    apply(cluster, namespace, imagebatch("changing", {"inline": text}))
    wait_batch(cluster, namespace, "changing", ("Succeeded",))
    assert kstatus(cluster, namespace, "changing").status == "Current"

    # The object exactly as the API server stored the change: not observed yet.
    changed = json.loads(
        cluster.kubectl(
            "patch", "imagebatch", "changing", "-n", namespace, "--type", "merge",
            "-p", json.dumps({"spec": {"compression": {"quality": 30}}}), "-o", "json",
        )
    )  # fmt: skip
    assert changed["metadata"]["generation"] == 2
    assert changed["status"]["observedGeneration"] == 1
    assert changed["status"]["phase"] == "Succeeded"  # the status of the old spec
    verdict = kstatus_of(cluster, changed)
    assert verdict.status == "InProgress"
    assert verdict.message == "ImageBatch generation is 2, but latest observed generation is 1"
    agrees_with_argocd(verdict)

    wait_batch(cluster, namespace, "changing", ("Succeeded",))
    verdict = kstatus(cluster, namespace, "changing")
    assert (verdict.status, verdict.object["status"]["observedGeneration"]) == ("Current", 2)


def test_failed_for_an_invalid_csv_and_over_the_failure_threshold(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gated: GatedServer
) -> None:
    gated.release()
    gated.files["/ok.jpg"] = (photo(120, 90, 5), "image/jpeg")
    apply(cluster, namespace, imagebatch("invalid", {"inline": HEADER + "x,,ftp://a\n"}))
    over = HEADER + f"1,SKU1,{gated.url}/ok.jpg\n2,SKU2,{gated.url}/missing.jpg\n"
    apply(cluster, namespace, imagebatch("over", {"inline": over}))
    for name, reason in (("invalid", "InvalidCSV"), ("over", "TooManyFailedImages")):
        batch = wait_batch(cluster, namespace, name, ("Failed",))
        verdict = kstatus(cluster, namespace, name)
        assert verdict.status == "Failed", name
        stalled = condition(batch, "Stalled")
        assert (stalled["status"], stalled["reason"]) == ("True", reason)
        assert verdict.message == stalled["message"]
        agrees_with_argocd(verdict)


def test_terminating_while_deleting(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gated: GatedServer
) -> None:
    gated.release()
    gated.files["/c.jpg"] = (photo(120, 90, 9), "image/jpeg")
    text = HEADER + f"1,SKU1,{gated.url}/c.jpg\n"
    # A foreign finalizer holds the batch while its owner cleans up.
    held = imagebatch("held", {"inline": text})
    held["metadata"]["finalizers"] = ["example.com/hold"]
    apply(cluster, namespace, held)
    # deletionPolicy Delete: the operator's own finalizer, removed once outputs are gone.
    apply(
        cluster,
        namespace,
        imagebatch("purged", {"inline": text}, output={"deletionPolicy": "Delete"}),
    )
    for name in ("held", "purged"):
        wait_batch(cluster, namespace, name, ("Succeeded",))
    assert get_batch(cluster, namespace, "purged")["metadata"]["finalizers"] == [
        "imagebatch.dev/delete-outputs"
    ]

    cluster.kubectl("delete", "imagebatch", "held", "-n", namespace, "--wait=false")
    verdict = kstatus(cluster, namespace, "held")
    assert (verdict.status, verdict.message) == ("Terminating", "Resource scheduled for deletion")
    cluster.kubectl(
        "patch", "imagebatch", "held", "-n", namespace, "--type", "json",
        "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]),
    )  # fmt: skip
    cluster.wait_for(lambda: kstatus(cluster, namespace, "held").status == "NotFound", "held to go")

    operator.stop()  # so the operator's finalizer stays while we look
    try:
        cluster.kubectl("delete", "imagebatch", "purged", "-n", namespace, "--wait=false")
        verdict = kstatus(cluster, namespace, "purged")
        assert verdict.status == "Terminating"
        assert verdict.object["metadata"]["finalizers"] == ["imagebatch.dev/delete-outputs"]
    finally:
        operator.start()
    cluster.wait_for(
        lambda: kstatus(cluster, namespace, "purged").status == "NotFound",
        "the operator to delete the outputs and release the batch",
    )


def test_a_batch_without_a_status_yet_is_in_progress(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    # The object as the API server returns it from the create, before any controller.
    manifest = imagebatch("fresh", {"inline": HEADER + "1,SKU1,http://a.test/x\n"})
    created = json.loads(
        cluster.kubectl(
            "create", "-n", namespace, "-f", "-", "-o", "json", input=yaml.safe_dump(manifest)
        )
    )
    # The CRD defaults the status to observedGeneration 0: not observed yet.
    assert created["status"] == {"observedGeneration": 0}
    assert kstatus_of(cluster, created).status == "InProgress"
