"""Installing ImageBatch with Helm on a real local cluster, as a user would.

This module starts a LocalCluster of its own: the session's cluster already runs an
operator watching every namespace, and two operators must never act on the same
batches. In it the chart is linted, rendered and checked by the API server, installed
(the node agent runs the operator pod with the chart's ServiceAccount token, so RBAC is
really enforced, in namespaces under the restricted Pod Security Standard), used by
ImageBatches applied with kubectl, upgraded to watch one namespace only, and uninstalled.

The tests run in file order and share one release: install, use, upgrade, uninstall.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests import demo
from tests.cluster.stack import LocalCluster, free_port
from tests.e2e.conftest import apply, imagebatch, wait_batch
from tests.support.servers import ImageServer, photo
from tests.unit.test_lua_health import TESTDATA, argocd_health

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "imagebatch"
EXAMPLES = ROOT / "examples"
CRD = "imagebatches.imagebatch.dev"
HEADER = "S. No.,Product Name,Input Image Urls\n"
# The release name contains the chart name, so the objects are named after the release.
FULLNAME = demo.RELEASE
ACCOUNT = f"system:serviceaccount:{demo.OPERATOR_NAMESPACE}:{FULLNAME}"


@dataclass
class Release:
    cluster: LocalCluster
    values: dict[str, Any]
    install_output: str
    liveness_port: int


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster for this module alone (see the module docstring)."""
    with LocalCluster(keep=os.environ.get("IMAGEBATCH_KEEP_CLUSTER") == "1") as running:
        yield running


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    server = ImageServer(
        {
            "/a.jpg": (photo(640, 480, 1), "image/jpeg"),
            "/b.png": (photo(320, 240, 2, "PNG"), "image/png"),
            "/c.jpg": (photo(400, 300, 3), "image/jpeg"),
        }
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def release(own_cluster: LocalCluster) -> Release:
    port = free_port()
    values = {**demo.local_values(own_cluster, port), "healthService": {"enabled": True}}
    output = demo.install(own_cluster, values)
    return Release(own_cluster, values, output, port)


def kubectl_json(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl(*args, "-o", "json"))
    return out


def can_i(cluster: LocalCluster, verb: str, resource: str, namespace: str | None) -> bool:
    """``kubectl auth can-i`` as the operator's ServiceAccount ("RESOURCE/SUB": a subresource)."""
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    kind, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    answer = cluster.kubectl(
        "auth", "can-i", verb, kind, *extra, "--as", ACCOUNT, *where, check=False
    )
    return answer.strip() == "yes"


def operator_pods(cluster: LocalCluster) -> list[dict[str, Any]]:
    pods = kubectl_json(
        cluster,
        "get",
        "pods",
        "-n",
        demo.OPERATOR_NAMESPACE,
        "-l",
        f"app.kubernetes.io/instance={demo.RELEASE},app.kubernetes.io/component=operator",
    )["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def running_operator(cluster: LocalCluster) -> dict[str, Any]:
    cluster.wait_for(
        lambda: [p["status"].get("phase") for p in operator_pods(cluster)] == ["Running"],
        "one Running operator pod",
    )
    return operator_pods(cluster)[0]


def operator_log(cluster: LocalCluster, pod: dict[str, Any]) -> str:
    path = cluster.pod_logs / f"{demo.OPERATOR_NAMESPACE}_{pod['metadata']['name']}_operator.log"
    return path.read_text(errors="replace") if path.exists() else ""


def healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def save_testdata(name: str, obj: dict[str, Any]) -> None:
    """Keep a real object for the Lua unit test (IMAGEBATCH_UPDATE_TESTDATA=1)."""
    if os.environ.get("IMAGEBATCH_UPDATE_TESTDATA") != "1":
        return
    clean = json.loads(json.dumps(obj))
    clean["metadata"].pop("managedFields", None)
    TESTDATA.mkdir(parents=True, exist_ok=True)
    (TESTDATA / f"{name}.json").write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")


# -- before installing -------------------------------------------------------------------


def test_helm_lint_strict(own_cluster: LocalCluster) -> None:
    values = own_cluster.workdir / "lint-values.yaml"
    values.write_text(yaml.safe_dump(demo.local_values(own_cluster, 8080)))
    out = demo.helm(own_cluster, "lint", "--strict", str(CHART), "--values", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="all-namespaces"),
        pytest.param({"watchNamespaces": ["default", "kube-public"]}, id="some-namespaces"),
        pytest.param({"healthService": {"enabled": True}, "verbose": True}, id="service"),
    ],
)
def test_rendered_chart_passes_the_api_servers_dry_run(
    own_cluster: LocalCluster, extra: dict[str, Any]
) -> None:
    demo.restricted_namespace(own_cluster, "dry-run")
    values = own_cluster.workdir / "dry-run-values.yaml"
    values.write_text(yaml.safe_dump({**demo.local_values(own_cluster, 8080), **extra}))
    rendered = demo.helm(
        own_cluster,
        "template",
        "dry",
        str(CHART),
        "--namespace",
        "dry-run",
        "--include-crds",
        "--values",
        str(values),
    )
    out = own_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    kinds = [line.split("/")[0] for line in out.splitlines()]
    assert "customresourcedefinition.apiextensions.k8s.io" in kinds
    assert "deployment.apps" in kinds
    assert all(line.endswith("(server dry run)") for line in out.splitlines()), out


def test_server_dry_run_really_checks(own_cluster: LocalCluster) -> None:
    """The same dry run refuses a pod that breaks the restricted standard."""
    demo.restricted_namespace(own_cluster, "dry-run")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root", "namespace": "dry-run"},
        "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"]}]},
    }
    result = subprocess.run(
        [str(own_cluster.binaries["kubectl"]), "apply", "--dry-run=server", "-f", "-"],
        input=json.dumps(pod),
        env={**os.environ, **own_cluster.env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in result.stderr


# -- install -----------------------------------------------------------------------------


def test_install_runs_the_operator_with_its_own_service_account(release: Release) -> None:
    cluster = release.cluster
    deployment = kubectl_json(cluster, "get", "deployment", FULLNAME, "-n", demo.OPERATOR_NAMESPACE)
    assert deployment["status"]["availableReplicas"] == 1
    pod = running_operator(cluster)
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    # Admission gave it a token volume, which the node agent turned into credentials.
    assert any("projected" in v for v in pod["spec"]["volumes"])
    # kopf's liveness endpoint, on the port the chart was given, answers.
    cluster.wait_for(lambda: healthy(release.liveness_port), "the liveness endpoint")
    service = kubectl_json(
        cluster, "get", "service", f"{FULLNAME}-health", "-n", demo.OPERATOR_NAMESPACE
    )
    assert service["spec"]["ports"][0]["targetPort"] == "health"


def test_install_notes_say_what_to_run_next(release: Release) -> None:
    notes = release.install_output
    assert f"kubectl -n {demo.OPERATOR_NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    assert "kubectl apply -f examples/imagebatch.yaml" in notes
    assert "every namespace" in notes


def test_crd_is_installed_from_the_chart(release: Release) -> None:
    crd = kubectl_json(release.cluster, "get", "crd", CRD)
    assert crd["spec"]["names"]["shortNames"] == ["ib"]


def test_examples_pass_the_api_servers_dry_run(release: Release) -> None:
    cluster = release.cluster
    demo.restricted_namespace(cluster, "examples")
    files = sorted(EXAMPLES.glob("*.yaml")) + sorted((EXAMPLES / "sources").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        out = cluster.kubectl("apply", "--dry-run=server", "-n", "examples", "-f", str(path))
        assert "imagebatch.imagebatch.dev/" in out and "(server dry run)" in out, path


def test_gitops_kustomization_follows_the_hashed_configmap_name(release: Release) -> None:
    cluster = release.cluster
    rendered = cluster.kubectl("kustomize", str(EXAMPLES / "gitops"))
    objects = {o["kind"]: o for o in yaml.safe_load_all(rendered)}
    generated = objects["ConfigMap"]["metadata"]["name"]
    assert (
        generated.startswith("spring-catalog-products-") and generated != "spring-catalog-products"
    )
    ref = objects["ImageBatch"]["spec"]["source"]["configMapKeyRef"]
    assert ref == {"name": generated, "key": "products.csv"}
    assert (
        objects["ConfigMap"]["data"]["products.csv"]
        == (EXAMPLES / "gitops" / "products.csv").read_text()
    )
    demo.restricted_namespace(cluster, "gitops")
    out = cluster.kubectl("apply", "--dry-run=server", "-n", "gitops", "-f", "-", input=rendered)
    assert f"configmap/{generated} created (server dry run)" in out
    assert "imagebatch.imagebatch.dev/spring-catalog created (server dry run)" in out


# -- use ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(release: Release, images: ImageServer) -> dict[str, dict[str, Any]]:
    """The batches a user runs: the example (succeeds), a broken CSV, a suspended one."""
    cluster = release.cluster
    demo.restricted_namespace(cluster, "shop")
    s = images.url
    cluster.kubectl(
        "create",
        "configmap",
        "products",
        "-n",
        "shop",
        "--from-file=products.csv=/dev/stdin",
        input=HEADER + f'1,SKU1,"{s}/a.jpg,{s}/b.png"\n2,SKU2,{s}/c.jpg\n',
    )
    cluster.kubectl("apply", "-n", "shop", "-f", str(EXAMPLES / "imagebatch.yaml"))
    apply(cluster, "shop", imagebatch("broken", {"inline": HEADER + "x,,ftp://a/b\n"}))
    apply(
        cluster, "shop", imagebatch("paused", {"inline": HEADER + f"1,A,{s}/a.jpg\n"}, suspend=True)
    )
    return {
        "succeeded": wait_batch(cluster, "shop", "spring-catalog", ("Succeeded",), 120),
        "failed-invalid-csv": wait_batch(cluster, "shop", "broken", ("Failed",), 120),
        "running-suspended": wait_batch(cluster, "shop", "paused", ("Running",), 120),
    }


def test_example_batch_applied_with_kubectl_completes(
    release: Release, shop: dict[str, dict[str, Any]]
) -> None:
    cluster = release.cluster
    status = shop["succeeded"]["status"]
    assert status["images"] == {"total": 3, "succeeded": 3, "failed": 0, "skipped": 0}
    assert status["rows"] == {"total": 2, "succeeded": 2, "failed": 0}
    table = cluster.kubectl("get", "ib", "spring-catalog", "-n", "shop").splitlines()
    assert table[1].split()[:5] == ["spring-catalog", "Succeeded", "3/3", "0", "1/1"]
    output = demo.read_object(cluster, demo.BUCKET, "shop/spring-catalog/output.csv").decode()
    rows = list(csv.reader(io.StringIO(output)))
    assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    public = release.values["publicUrl"]
    for row in rows[1:]:
        for url in row[3].split(","):
            assert url.startswith(f"{public}/shop/spring-catalog/images/")
            assert requests.get(url, timeout=10).content[:2] == b"\xff\xd8"  # a JPEG
    # Events are posted with the operator's own credentials (RBAC: events create).
    events = kubectl_json(
        cluster,
        "get",
        "events",
        "-n",
        "shop",
        "--field-selector",
        "involvedObject.name=spring-catalog",
    )
    assert {"JobCreated", "Succeeded"} <= {e["reason"] for e in events["items"]}


def test_worker_pods_ran_under_the_restricted_standard(
    release: Release, shop: dict[str, dict[str, Any]]
) -> None:
    labels = kubectl_json(release.cluster, "get", "namespace", "shop")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    # Admission would have refused a non-compliant pod; the shard's pod ran and succeeded.
    # The batch can finish on its pod's success a moment before the Job says so.
    def succeeded() -> bool:
        jobs = kubectl_json(release.cluster, "get", "jobs", "-n", "shop")["items"]
        done = [
            j for j in jobs if j["metadata"]["labels"]["imagebatch.dev/batch"] == "spring-catalog"
        ]
        return bool(done) and done[0]["status"].get("succeeded") == 1

    release.cluster.wait_for(succeeded, "the spring-catalog Job to count its pod", 30)


def test_invalid_csv_is_failed_and_stalled(shop: dict[str, dict[str, Any]]) -> None:
    conditions = {c["type"]: c for c in shop["failed-invalid-csv"]["status"]["conditions"]}
    assert conditions["Stalled"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "InvalidCSV"


def test_argocd_health_check_on_the_live_objects(shop: dict[str, dict[str, Any]]) -> None:
    expected = {
        "succeeded": "Healthy",
        "failed-invalid-csv": "Degraded",
        "running-suspended": "Progressing",
    }
    for name, obj in shop.items():
        save_testdata(name, obj)
        assert argocd_health(obj)["status"] == expected[name], name


def test_operator_needed_no_permission_it_lacks(
    release: Release, shop: dict[str, dict[str, Any]]
) -> None:
    log = operator_log(release.cluster, running_operator(release.cluster))
    assert log  # the node agent ran the pod and kept its output
    for word in ("Forbidden", "forbidden", "Not enough permissions", "Failed to post an event"):
        assert word not in log, word


def test_rbac_grants_what_the_operator_does_and_no_more(release: Release) -> None:
    cluster = release.cluster
    allowed = [
        ("create", "jobs.batch", "shop"),
        ("delete", "jobs.batch", "shop"),
        ("watch", "jobs.batch", "shop"),
        ("watch", "pods", "shop"),
        ("patch", "imagebatches.imagebatch.dev/status", "shop"),
        ("update", "imagebatches.imagebatch.dev/finalizers", "shop"),
        ("get", "configmaps", "shop"),
        ("get", "secrets", "shop"),
        ("create", "events", "shop"),
        ("watch", "imagebatches.imagebatch.dev", None),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io", None),
    ]
    denied = [
        ("list", "secrets", "shop"),
        ("delete", "secrets", "shop"),
        ("update", "configmaps", "shop"),
        ("create", "pods", "shop"),
        ("delete", "imagebatches.imagebatch.dev", "shop"),
        ("update", "imagebatches.imagebatch.dev/status", "shop"),
        ("create", "pods/exec", "shop"),
        ("update", "deployments.apps", demo.OPERATOR_NAMESPACE),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
        ("list", "namespaces", None),  # kopf needs no namespaces when watching all
    ]
    assert [a for a in allowed if not can_i(cluster, *a)] == []
    assert [d for d in denied if can_i(cluster, *d)] == []


# -- upgrade -----------------------------------------------------------------------------


def test_upgrade_with_changed_values_rolls_the_operator(
    release: Release, images: ImageServer, shop: dict[str, dict[str, Any]]
) -> None:
    cluster = release.cluster
    before = running_operator(cluster)
    old_hash = before["metadata"]["labels"]["pod-template-hash"]
    demo.restricted_namespace(cluster, "team-a")
    values = {**release.values, "watchNamespaces": ["team-a"], "resyncSeconds": 120}
    path = cluster.workdir / "upgrade-values.yaml"
    path.write_text(yaml.safe_dump(values))
    demo.helm(
        cluster,
        "upgrade",
        demo.RELEASE,
        str(CHART),
        "-n",
        demo.OPERATOR_NAMESPACE,
        "--values",
        str(path),
        "--wait",
        "--timeout",
        "120s",
    )
    after = running_operator(cluster)
    assert after["metadata"]["name"] != before["metadata"]["name"]
    assert after["metadata"]["labels"]["pod-template-hash"] != old_hash
    sets = kubectl_json(cluster, "get", "replicasets", "-n", demo.OPERATOR_NAMESPACE)["items"]
    replicas = {
        rs["metadata"]["labels"]["pod-template-hash"]: rs["spec"]["replicas"] for rs in sets
    }
    assert (
        replicas[old_hash] == 0 and replicas[after["metadata"]["labels"]["pod-template-hash"]] == 1
    )
    env = {e["name"]: e.get("value") for e in after["spec"]["containers"][0]["env"]}
    assert env["IMAGEBATCH_WATCH_NAMESPACES"] == "team-a"
    assert env["IMAGEBATCH_RESYNC_SECONDS"] == "120"
    cluster.wait_for(
        lambda: (
            not cluster.kubectl_ok(
                "get", "pod", before["metadata"]["name"], "-n", demo.OPERATOR_NAMESPACE
            )
        ),
        "the old operator pod to be gone",
    )

    # Least privilege in the new mode: a Role in team-a, nothing in shop any more.
    assert can_i(cluster, "create", "jobs.batch", "team-a")
    assert can_i(cluster, "get", "secrets", "team-a")
    assert not can_i(cluster, "get", "secrets", "shop")
    assert not can_i(cluster, "watch", "imagebatches.imagebatch.dev", None)
    assert can_i(cluster, "list", "namespaces", None)

    # The new operator acts in team-a only.
    s = images.url
    apply(cluster, "team-a", imagebatch("watched", {"inline": HEADER + f"1,A,{s}/c.jpg\n"}))
    apply(cluster, "shop", imagebatch("ignored", {"inline": HEADER + f"1,A,{s}/c.jpg\n"}))
    watched = wait_batch(cluster, "team-a", "watched", ("Succeeded",), 120)
    assert watched["status"]["images"]["succeeded"] == 1
    time.sleep(2)
    # Never looked at: the status is still the CRD's default, not observed.
    ignored = kubectl_json(cluster, "get", "ib", "ignored", "-n", "shop")
    assert ignored.get("status") in (None, {"observedGeneration": 0})
    log = operator_log(cluster, after)
    for word in ("Forbidden", "Not enough permissions"):
        assert word not in log, word


# -- uninstall ---------------------------------------------------------------------------


def test_uninstall_leaves_no_operator_objects_and_keeps_the_crd(release: Release) -> None:
    cluster = release.cluster
    pod = running_operator(cluster)["metadata"]["name"]
    demo.helm(
        cluster,
        "uninstall",
        demo.RELEASE,
        "-n",
        demo.OPERATOR_NAMESPACE,
        "--wait",
        "--timeout",
        "120s",
    )
    selector = f"app.kubernetes.io/instance={demo.RELEASE}"
    kinds = "deployments,replicasets,serviceaccounts,services,roles,rolebindings,secrets,configmaps"
    leftovers = kubectl_json(cluster, "get", kinds, "-A", "-l", selector)["items"]
    assert leftovers == []
    cluster_wide = kubectl_json(cluster, "get", "clusterroles,clusterrolebindings", "-l", selector)[
        "items"
    ]
    assert cluster_wide == []
    assert not cluster.kubectl_ok("get", "serviceaccount", FULLNAME, "-n", demo.OPERATOR_NAMESPACE)
    cluster.wait_for(
        lambda: not cluster.kubectl_ok("get", "pod", pod, "-n", demo.OPERATOR_NAMESPACE),
        "the operator pod to be gone",
    )
    # Helm never deletes a CRD from crds/: the user's ImageBatches stay.
    assert cluster.kubectl_ok("get", "crd", CRD)
    assert cluster.kubectl_ok("get", "ib", "spring-catalog", "-n", "shop")
    # The release's MinIO credentials Secret was the user's, not the chart's: it stays.
    assert cluster.kubectl_ok("get", "secret", demo.MINIO_SECRET, "-n", demo.OPERATOR_NAMESPACE)
