"""The local cluster behaves like a real one where ImageBatch depends on it.

Real etcd, kube-apiserver and kube-controller-manager (the real Job controller), a real
MinIO, and the node agent running pods as processes. Nothing here is mocked.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import textwrap
import time
import uuid
from typing import Any

import pytest
import yaml

from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import apply

pytestmark = pytest.mark.e2e

# The pod's program: write its JOB_COMPLETION_INDEX to MinIO; with FAIL_ONCE_INDEX set,
# that index fails the first time (leaving a marker) and succeeds on the retry.
WRITE_INDEX = textwrap.dedent(
    """
    import io, os, sys
    from minio import Minio
    from minio.error import S3Error
    client = Minio(os.environ["MINIO_ENDPOINT"], access_key=os.environ["MINIO_ACCESS_KEY"],
                   secret_key=os.environ["MINIO_SECRET_KEY"], secure=False)
    bucket, index = os.environ["BUCKET"], os.environ["JOB_COMPLETION_INDEX"]
    if index == os.environ.get("FAIL_ONCE_INDEX"):
        try:
            client.stat_object(bucket, f"failed-once/{index}")
        except S3Error:
            client.put_object(bucket, f"failed-once/{index}", io.BytesIO(b"x"), 1)
            print("failing on purpose", flush=True)
            sys.exit(3)
    data = f"{index} {os.environ['POD_NAME']}".encode()
    client.put_object(bucket, f"indexes/{index}.txt", io.BytesIO(data), len(data))
    """
)


def minio_secret(cluster: LocalCluster, namespace: str) -> None:
    assert cluster.minio is not None
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "minio",
        "-n",
        namespace,
        f"--from-literal=endpoint={cluster.minio.endpoint}",
        f"--from-literal=accessKey={cluster.minio.access_key}",
        f"--from-literal=secretKey={cluster.minio.secret_key}",
    )


def indexed_job(
    name: str, bucket: str, completions: int, fail_once_index: str = ""
) -> dict[str, Any]:
    def secret(key: str) -> dict[str, Any]:
        return {"secretKeyRef": {"name": "minio", "key": key}}

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimitPerIndex": 1,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", WRITE_INDEX],
                            "env": [
                                {"name": "MINIO_ENDPOINT", "valueFrom": secret("endpoint")},
                                {"name": "MINIO_ACCESS_KEY", "valueFrom": secret("accessKey")},
                                {"name": "MINIO_SECRET_KEY", "valueFrom": secret("secretKey")},
                                {"name": "BUCKET", "value": bucket},
                                {"name": "FAIL_ONCE_INDEX", "value": fail_once_index},
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                            ],
                        }
                    ],
                }
            },
        },
    }


def wait_job(
    cluster: LocalCluster, namespace: str, name: str, timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = json.loads(cluster.kubectl("get", "job", name, "-n", namespace, "-o", "json"))
        kinds = {
            c["type"] for c in job.get("status", {}).get("conditions", []) if c["status"] == "True"
        }
        if kinds & {"Complete", "Failed"}:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {name} did not finish in {timeout}s: {job.get('status')}")


def objects(cluster: LocalCluster, bucket: str, prefix: str) -> dict[str, bytes]:
    assert cluster.minio is not None
    client = cluster.minio.client()
    found = {}
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        assert obj.object_name is not None
        response = client.get_object(bucket, obj.object_name)
        found[obj.object_name] = response.read()
        response.close()
    return found


def test_indexed_job_completes_and_every_index_writes_to_minio(
    cluster: LocalCluster, namespace: str, bucket: str
) -> None:
    minio_secret(cluster, namespace)
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(indexed_job("three", bucket, 3))
    )
    job = wait_job(cluster, namespace, "three")
    conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conditions.get("Complete") == "True", job["status"]
    assert job["status"]["completedIndexes"] == "0-2"
    assert job["status"]["succeeded"] == 3
    written = objects(cluster, bucket, "indexes/")
    assert sorted(written) == ["indexes/0.txt", "indexes/1.txt", "indexes/2.txt"]
    for key, body in written.items():
        index, pod = body.decode().split()
        assert key == f"indexes/{index}.txt"
        assert pod.startswith(f"three-{index}-")  # env came from the pod, via fieldRef


def test_an_index_that_fails_once_is_retried_per_index(
    cluster: LocalCluster, namespace: str, bucket: str
) -> None:
    minio_secret(cluster, namespace)
    apply(cluster, namespace, indexed_job("flaky", bucket, 3, fail_once_index="1"))
    job = wait_job(cluster, namespace, "flaky")
    conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conditions.get("Complete") == "True", job["status"]
    assert job["status"]["completedIndexes"] == "0-2"
    assert job["status"]["failed"] == 1
    assert "failedIndexes" not in job["status"] or job["status"]["failedIndexes"] == ""
    assert sorted(objects(cluster, bucket, "failed-once/")) == ["failed-once/1"]
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=flaky", "-o", "json")
    )
    phases = sorted(
        (p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"], p["status"]["phase"])
        for p in pods["items"]
    )
    assert phases == [("0", "Succeeded"), ("1", "Failed"), ("1", "Succeeded"), ("2", "Succeeded")]
    failed = next(p for p in pods["items"] if p["status"]["phase"] == "Failed")
    assert failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_kubectl_sees_nodes_jobs_and_pods(
    cluster: LocalCluster, namespace: str, bucket: str
) -> None:
    minio_secret(cluster, namespace)
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(indexed_job("seen", bucket, 1))
    )
    wait_job(cluster, namespace, "seen")
    out = cluster.kubectl("get", "nodes,jobs,pods", "-n", namespace)
    assert "node/imagebatch-node" in out and " Ready " in out
    assert "job.batch/seen" in out
    assert "pod/seen-0-" in out and "Completed" in out


RBAC_PROBE = textwrap.dedent(
    """
    import os
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    config.load_kube_config()
    api = client.CoreV1Api()
    try:
        api.list_namespaced_config_map(os.environ["NS"])
        print("configmaps: allowed")
    except ApiException as e:
        print(f"configmaps: {e.status}")
    try:
        api.list_namespaced_secret(os.environ["NS"])
        print("secrets: allowed")
    except ApiException as e:
        print(f"secrets: {e.status}")
    """
)


def test_pod_gets_its_service_account_rights_and_no_more(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl(
        "create", "role", "cm-reader", "--verb=list", "--resource=configmaps", "-n", namespace
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "cm-reader",
        "--role=cm-reader",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    name = f"probe-{uuid.uuid4().hex[:6]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "serviceAccountName": "reader",
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "probe",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", RBAC_PROBE],
                    "env": [
                        {
                            "name": "NS",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        }
                    ],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    cluster.wait_for(
        lambda: (
            cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}")
            == "Succeeded"
        ),
        f"pod {name} to succeed",
    )
    log = (cluster.pod_logs / f"{namespace}_{name}_probe.log").read_text()
    assert "configmaps: allowed" in log
    assert "secrets: 403" in log


def test_deleting_a_running_pod_terminates_its_process(
    cluster: LocalCluster, namespace: str
) -> None:
    script = textwrap.dedent(
        """
        import signal, sys, time
        def bye(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("running", flush=True)
        time.sleep(600)
        """
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "x", "command": ["python", "-c", script]}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    cluster.wait_for(
        lambda: (
            cluster.kubectl(
                "get", "pod", "sleeper", "-n", namespace, "-o", "jsonpath={.status.phase}"
            )
            == "Running"
        ),
        "sleeper running",
    )
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=true", "--timeout=60s")
    assert time.monotonic() - started < 30
    assert not cluster.kubectl_ok("get", "pod", "sleeper", "-n", namespace)
    log = (cluster.pod_logs / f"{namespace}_sleeper_main.log").read_text()
    assert "got SIGTERM" in log


def test_restart_policy_on_failure_restarts_the_container(
    cluster: LocalCluster, namespace: str, bucket: str
) -> None:
    minio_secret(cluster, namespace)
    job = indexed_job("restarts", bucket, 1, fail_once_index="0")
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["restartPolicy"] = "OnFailure"
    del job["spec"]["backoffLimitPerIndex"]  # per-index backoff needs restartPolicy Never
    job["spec"]["backoffLimit"] = 2  # with OnFailure, container restarts count here
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    finished = wait_job(cluster, namespace, "restarts")
    conditions = {c["type"]: c["status"] for c in finished["status"]["conditions"]}
    assert conditions.get("Complete") == "True", finished["status"]
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=restarts", "-o", "json")
    )["items"]
    assert len(pods) == 1  # the same pod, its container restarted in place
    status = pods[0]["status"]
    assert status["phase"] == "Succeeded"
    assert status["containerStatuses"][0]["restartCount"] == 1
    assert sorted(objects(cluster, bucket, "indexes/")) == ["indexes/0.txt"]


def test_kubectl_logs_shows_a_pods_output(cluster: LocalCluster, namespace: str) -> None:
    # The API server proxies `kubectl logs` to the node agent's container-log endpoint
    # (HTTPS both ways, certificates from the cluster's CA), as it would to a kubelet.
    script = textwrap.dedent(
        """
        import time
        for i in range(3):
            print(f"line {i}", flush=True)
        time.sleep(2)
        print("last line", flush=True)
        """
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "talker"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "x", "command": ["python", "-c", script]}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
    # A client that connects to the node's log port and never speaks TLS (a port probe
    # from another program) must not hold up anyone else's logs.
    port = cluster.kubectl(
        "get", "node", "imagebatch-node",
        "-o", "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}",
    )  # fmt: skip
    silent = socket.create_connection(("127.0.0.1", int(port)))
    cluster.wait_for(
        lambda: "line 2" in cluster.kubectl("logs", "talker", "-n", namespace, check=False),
        "the first lines in kubectl logs",
    )
    silent.close()
    # Followed while running: kubectl returns once the container has exited, with
    # everything it wrote.
    followed = cluster.kubectl("logs", "-f", "talker", "-n", namespace)
    assert followed == "line 0\nline 1\nline 2\nlast line\n"
    assert cluster.kubectl("logs", "talker", "-n", namespace, "--tail=2") == ("line 2\nlast line\n")
    assert cluster.kubectl("logs", "talker", "-n", namespace, "--limit-bytes=8") == "line 0\nl"
    assert cluster.kubectl("logs", "pod/talker", "-c", "main", "-n", namespace).startswith(
        "line 0\n"
    )
    kubectl = [str(cluster.binaries["kubectl"]), "--kubeconfig", str(cluster.kubeconfig)]
    missing = subprocess.run(
        [*kubectl, "logs", "talker", "-c", "nope", "-n", namespace],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode != 0
    assert "container nope is not valid for pod talker" in missing.stderr


def sleeper_job(name: str, seconds: float) -> dict[str, Any]:
    """A one-pod Job whose process sleeps ``seconds`` and exits 0."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "main",
                            "image": "x",
                            "command": ["python", "-c", f"import time; time.sleep({seconds})"],
                        }
                    ],
                }
            },
        },
    }


def pod_phase(cluster: LocalCluster, namespace: str, job: str) -> str:
    return cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "jsonpath={..phase}"
    )


@pytest.mark.faults
def test_a_pod_that_exits_while_the_api_server_is_down_still_completes_its_job(
    cluster: LocalCluster, namespace: str
) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(sleeper_job("outage", 4))
    )
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "outage") == "Running", "pod running")
    port = cluster.server
    with cluster.server_down("kube-apiserver"):
        assert not cluster.kubectl_ok("get", "ns", "--request-timeout=2s")
        time.sleep(10)  # the pod exits in here: its final status must not be lost
    assert cluster.server == port  # same address: clients reconnect as they were
    job = wait_job(cluster, namespace, "outage", timeout=90)
    conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conditions.get("Complete") == "True", job["status"]
    assert pod_phase(cluster, namespace, "outage") == "Succeeded"
    # The agent's pod watch came back too: a new pod is bound and run.
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(sleeper_job("after", 0))
    )
    assert "Complete" in {
        c["type"] for c in wait_job(cluster, namespace, "after")["status"]["conditions"]
    }


@pytest.mark.faults
@pytest.mark.parametrize("server", ["minio", "etcd", "kube-controller-manager"])
def test_a_restarted_server_keeps_its_port_and_data(
    cluster: LocalCluster, namespace: str, bucket: str, server: str
) -> None:
    assert cluster.minio is not None
    storage = cluster.minio.client()
    storage.put_object(bucket, "kept.txt", io.BytesIO(b"kept"), 4)
    cluster.kubectl("create", "configmap", "kept", "-n", namespace, "--from-literal=k=v")
    before = [p.pid for name, p in cluster.processes if name == server]
    cluster.restart_server(server)
    after = [p.pid for name, p in cluster.processes if name == server]
    assert len(after) == 1 and after != before  # a new process, in the old one's place
    assert len(cluster.processes) == len({name for name, _ in cluster.processes})
    response = storage.get_object(bucket, "kept.txt")
    assert response.read() == b"kept"
    response.close()
    assert (
        cluster.kubectl("get", "configmap", "kept", "-n", namespace, "-o", "jsonpath={.data.k}")
        == "v"
    )
    # The controllers still act: a Job runs to completion.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(sleeper_job("j", 0)))
    assert "Complete" in {
        c["type"] for c in wait_job(cluster, namespace, "j")["status"]["conditions"]
    }
