"""``make demo``: the whole ImageBatch path on a local cluster, in one command.

1. builds the servers that are missing (first run only; cached afterwards) and starts
   the local stack: etcd, kube-apiserver, kube-controller-manager, MinIO, node agent;
2. installs the Helm chart the way a user does on a real cluster: a namespace under the
   restricted Pod Security Standard, a Secret with the MinIO credentials, ``helm install``;
   the node agent runs the operator pod with the chart's ServiceAccount token;
3. serves generated sample images on 127.0.0.1 (nothing is downloaded);
4. does what examples/imagebatch.yaml says: creates the ``products`` ConfigMap from a
   CSV (here one listing the sample images) and applies the example;
5. waits for the batch, prints ``kubectl get ib``, the first rows of the output CSV and
   where the images are; then stops everything (``--keep``: waits for Ctrl-C first).

Run: ``python -m tests.demo [--keep]``. The functions that install the chart are also
what the install end-to-end tests use.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from minio import Minio

from tests.cluster.stack import LocalCluster, free_port
from tests.support.servers import ImageServer, photo

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "imagebatch"
EXAMPLE = ROOT / "examples" / "imagebatch.yaml"
RELEASE = "imagebatch"
OPERATOR_NAMESPACE = "imagebatch-system"
MINIO_SECRET = "imagebatch-minio"
BUCKET = "imagebatch"


def helm(cluster: LocalCluster, *args: str, timeout: float = 180) -> str:
    """Run the cluster's helm with its own config and cache folders; return stdout."""
    home = cluster.workdir / "helm"
    env = {
        **os.environ,
        **cluster.env(),
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    result = subprocess.run(
        [str(cluster.binaries["helm"]), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def restricted_namespace(cluster: LocalCluster, name: str) -> None:
    """A namespace where admission enforces the restricted Pod Security Standard."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def storage_client(cluster: LocalCluster) -> Minio:
    assert cluster.minio is not None
    return Minio(
        cluster.minio.endpoint,
        access_key=cluster.minio.access_key,
        secret_key=cluster.minio.secret_key,
        secure=False,
    )


def public_bucket(cluster: LocalCluster, bucket: str = BUCKET) -> str:
    """Create ``bucket`` readable without credentials; return its public base URL."""
    assert cluster.minio is not None
    client = storage_client(cluster)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": ["*"]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }
    client.set_bucket_policy(bucket, json.dumps(policy))
    return f"{cluster.minio.url}/{bucket}"


def local_values(cluster: LocalCluster, liveness_port: int) -> dict[str, Any]:
    """Chart values for the local stack; a real install sets only the minio.* ones."""
    assert cluster.minio is not None
    return {
        "minio": {"endpoint": cluster.minio.endpoint, "existingSecret": MINIO_SECRET},
        "bucket": BUCKET,
        # Output URLs under the bucket's public base instead of presigned URLs.
        "publicUrl": public_bucket(cluster),
        # The sample servers live on loopback, which a real install never allows.
        "allowNets": ["127.0.0.0/8"],
        "webhookAllowNets": ["127.0.0.0/8"],
        # The pod is a local process here: its port is a port of this machine.
        "liveness": {"port": liveness_port, "bindAddress": "127.0.0.1"},
        "metrics": {"port": free_port(), "bindAddress": "127.0.0.1"},
        "image": {"tag": "local"},
        # Webhook retries seconds apart, not hours.
        "webhook": {"schedule": [0, 1, 2, 5, 10]},
    }


def install(
    cluster: LocalCluster,
    values: dict[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = OPERATOR_NAMESPACE,
) -> str:
    """Namespace, credentials Secret, ``helm install --wait``; return helm's output."""
    assert cluster.minio is not None
    restricted_namespace(cluster, namespace)
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        MINIO_SECRET,
        "-n",
        namespace,
        f"--from-literal=accessKey={cluster.minio.access_key}",
        f"--from-literal=secretKey={cluster.minio.secret_key}",
    )
    values_file = cluster.workdir / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return helm(
        cluster,
        "install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(values_file),
        "--wait",
        "--timeout",
        "120s",
    )


def sample_images() -> dict[str, tuple[bytes, str]]:
    """Generated product photos in a few sizes and two formats."""
    files: dict[str, tuple[bytes, str]] = {}
    for i in range(8):
        width, height = (480 + 40 * i, 360 + 30 * i)
        files[f"/catalog/sku{i + 1}-front.jpg"] = (photo(width, height, i), "image/jpeg")
    for i in range(2):
        files[f"/catalog/sku{i + 1}-back.png"] = (photo(320, 240, 20 + i, "PNG"), "image/png")
    return files


def sample_csv(base_url: str, paths: list[str]) -> str:
    """The products CSV in the format the operator takes, one product per SKU."""
    by_sku: dict[str, list[str]] = {}
    for path in sorted(paths, key=lambda p: ("back" in p, p)):
        sku = path.rsplit("/", 1)[1].split("-")[0]
        by_sku.setdefault(sku, []).append(base_url + path)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for n, (sku, urls) in enumerate(sorted(by_sku.items(), key=lambda x: int(x[0][3:])), 1):
        writer.writerow([n, sku.upper(), ",".join(urls)])
    return out.getvalue()


def read_object(cluster: LocalCluster, bucket: str, key: str) -> bytes:
    response = storage_client(cluster).get_object(bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def run_demo(keep: bool, out: Any = sys.stdout) -> int:
    started = time.monotonic()

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    def step(text: str) -> None:
        say(f"[{time.monotonic() - started:5.1f}s] {text}")

    step("starting the local cluster (etcd, kube-apiserver, controller-manager, MinIO, node)")
    with LocalCluster() as cluster:
        assert cluster.minio is not None
        step(f"cluster ready in {cluster.startup_seconds:.1f}s")
        step(f"helm install {RELEASE} charts/imagebatch -n {OPERATOR_NAMESPACE}")
        install(cluster, local_values(cluster, free_port()))
        step("operator running")

        images = ImageServer(sample_images())
        try:
            step(f"serving {len(images.files)} generated sample images at {images.url}")
            example = yaml.safe_load(EXAMPLE.read_text())
            name = example["metadata"]["name"]
            ref = example["spec"]["source"]["configMapKeyRef"]
            namespace = "demo"
            restricted_namespace(cluster, namespace)
            with tempfile.TemporaryDirectory() as folder:
                csv_file = Path(folder) / ref["key"]
                csv_file.write_text(sample_csv(images.url, list(images.files)))
                step(f"kubectl create configmap {ref['name']} --from-file={ref['key']}=...")
                cluster.kubectl(
                    "create",
                    "configmap",
                    ref["name"],
                    "-n",
                    namespace,
                    f"--from-file={ref['key']}={csv_file}",
                )
            step("kubectl apply -f examples/imagebatch.yaml")
            cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
            step(f"kubectl wait --for=condition=Ready ib/{name}")
            waited = subprocess.run(
                [
                    str(cluster.binaries["kubectl"]),
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "wait",
                    "--for=condition=Ready",
                    f"ib/{name}",
                    "-n",
                    namespace,
                    "--timeout=120s",
                ],
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
            )
            say()
            say(f"$ kubectl get ib -n {namespace}")
            say(cluster.kubectl("get", "ib", "-n", namespace).rstrip())
            batch = json.loads(cluster.kubectl("get", "ib", name, "-n", namespace, "-o", "json"))
            status = batch.get("status") or {}
            if waited.returncode != 0 or status.get("phase") != "Succeeded":
                say()
                say(f"the batch did not succeed: {json.dumps(status.get('conditions'), indent=1)}")
                say(cluster.kubectl("describe", "ib", name, "-n", namespace))
                return 1
            prefix = f"{namespace}/{name}/"
            output = read_object(cluster, BUCKET, prefix + "output.csv").decode()
            say()
            say(f"$ first rows of s3://{BUCKET}/{prefix}output.csv")
            for line in output.splitlines()[:4]:
                say(line if len(line) <= 220 else line[:217] + "...")
            keys = [
                o.object_name or ""
                for o in storage_client(cluster).list_objects(
                    BUCKET, prefix=prefix + "images/", recursive=True
                )
            ]
            saved = status["bytes"]["input"] - status["bytes"]["output"]
            say()
            say(
                f"{len(keys)} compressed images in s3://{BUCKET}/{prefix}images/ on MinIO "
                f"{cluster.minio.url} ({status['bytes']['input']} bytes in, "
                f"{status['bytes']['output']} out, {saved} saved)"
            )
            say(f"e.g. {cluster.minio.url}/{BUCKET}/{keys[0]}")
            step("done")
            if keep:
                stop = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                # Ctrl-C may come while the hints below are still being printed.
                try:
                    say()
                    say("the stack stays up; to look around:")
                    say(f"export KUBECONFIG={cluster.kubeconfig}")
                    say(f"export PATH={cluster.workdir / 'tools'}:$PATH   # kubectl, helm")
                    say(
                        f"MinIO: {cluster.minio.url} (user {cluster.minio.access_key}, "
                        f"password {cluster.minio.secret_key})"
                    )
                    say("Ctrl-C stops everything")
                    stop.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            images.close()
    say("stopped; nothing left running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.demo", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--keep", action="store_true", help="keep the stack running until Ctrl-C")
    args = parser.parse_args(argv)
    return run_demo(args.keep)


if __name__ == "__main__":
    sys.exit(main())
