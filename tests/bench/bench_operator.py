"""Orchestration and scale, measured on the real local cluster.

Run ``python -m tests.bench.bench_operator --out reports/bench-operator.md``. One local
cluster, MinIO and the real operator process; every figure is measured in this run and
reported next to the baseline it is read against, never asserted:

* orchestration overhead: the same images through ``kubectl apply`` end to end (CSV
  validation, shard manifests, the Indexed Job, pods, results, output CSV) versus the
  ``imagebatch-worker`` alone on one shard holding every image;
* scale: a 100,000-row CSV read from s3, validated, deduplicated and sharded into
  manifests plus a Job (suspended, so only the operator's part is timed), with the
  operator's peak memory (VmHWM) against its idle size and the CSV's size;
* many batches: N small batches applied at once, time until all are Succeeded;
* API writes: status writes per batch, counted from the operator's log.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from minio import Minio

from imagebatch_common.contract import Compression, ShardImage, ShardManifest, image_key
from imagebatch_common.contract import shard_manifest_key as manifest_key
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import (
    OUTPUT_BUCKET,
    PUBLIC_READ,
    OperatorProcess,
    imagebatch,
    wait_batch,
)
from tests.support.servers import ImageServer, photo

HEADER = "S. No.,Product Name,Input Image Urls\n"
SETUP = "local cluster (kube-apiserver, Job controller, MinIO, node agent) on the same machine."
SPOOLED = "Rows are spooled to disk; only distinct URLs and their keys stay in memory."


def memory_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc, in KiB: VmRSS now, VmHWM at its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def new_namespace(cluster: LocalCluster, name: str) -> str:
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.kubectl_ok("get", "sa", "default", "-n", name), f"namespace {name}"
    )
    return name


def orchestration(
    cluster: LocalCluster, operator: OperatorProcess, storage: Minio, images: ImageServer, n: int
) -> dict[str, float]:
    """Same images: the worker alone on one shard, then kubectl apply end to end."""
    urls = [f"{images.url}/o/{i}.jpg" for i in range(n)]
    assert cluster.minio is not None
    # Worker alone: one manifest with every image, the console script run directly.
    prefix = "bench/worker-alone/"
    compression = Compression()
    manifest = ShardManifest(
        run="alone",
        index=0,
        bucket=OUTPUT_BUCKET,
        prefix=prefix,
        compression=compression,
        images=tuple(ShardImage(u, image_key(prefix, u, compression)) for u in urls),
    )
    data = manifest.to_json()
    storage.put_object(OUTPUT_BUCKET, manifest_key(prefix, "alone", 0), io.BytesIO(data), len(data))
    env = {
        **os.environ,
        "MINIO_ENDPOINT": cluster.minio.endpoint,
        "MINIO_ACCESS_KEY": cluster.minio.access_key,
        "MINIO_SECRET_KEY": cluster.minio.secret_key,
        "IMAGEBATCH_BUCKET": OUTPUT_BUCKET,
        "IMAGEBATCH_PREFIX": prefix,
        "IMAGEBATCH_RUN": "alone",
        "IMAGEBATCH_ALLOW_NETS": "127.0.0.0/8",
    }
    started = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "imagebatch-worker"), "--shard", "0"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    alone = time.monotonic() - started
    # Through the operator, sharded as a user would shard it.
    namespace = new_namespace(cluster, "bench-orchestration")
    text = HEADER + "".join(f"{i + 1},P{i},{u}\n" for i, u in enumerate(urls))
    storage.put_object(
        OUTPUT_BUCKET, "bench/orchestration.csv", io.BytesIO(text.encode()), len(text.encode())
    )
    started = time.monotonic()
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(
            imagebatch(
                "orchestrated",
                {"s3": {"bucket": OUTPUT_BUCKET, "key": "bench/orchestration.csv"}},
                sharding={"imagesPerShard": max(n // 4, 1), "parallelism": 2},
            )
        ),
    )
    obj = wait_batch(cluster, namespace, "orchestrated", ("Succeeded", "Failed"), 600, interval=0.2)
    end_to_end = time.monotonic() - started
    job = json.loads(cluster.kubectl("get", "job", "-n", namespace, "-o", "json"))["items"][0]
    created = job["metadata"]["creationTimestamp"]
    return {
        "images": n,
        "alone_s": alone,
        "e2e_s": end_to_end,
        "ratio": end_to_end / alone,
        "succeeded": obj["status"]["images"]["succeeded"],
        "shards": obj["status"]["shards"]["total"],
        "writes": operator.log().count(f"status {namespace}/orchestrated written"),
        "job_created": created,
        "batch_created": obj["metadata"]["creationTimestamp"],
    }


def scale(
    cluster: LocalCluster, operator: OperatorProcess, storage: Minio, rows: int
) -> dict[str, float]:
    """A big CSV through validation and sharding; pods suspended so only the operator counts."""
    assert operator.process is not None
    text = HEADER + "".join(
        f'{i + 1},SKU{i},"https://img.example.com/p/{i}/front.jpg,'
        f'https://img.example.com/p/{i // 2}/back.jpg"\n'
        for i in range(rows)
    )
    data = text.encode()
    storage.put_object(OUTPUT_BUCKET, "bench/scale.csv", io.BytesIO(data), len(data))
    namespace = new_namespace(cluster, "bench-scale")
    idle = memory_kib(operator.process.pid, "VmRSS")
    started = time.monotonic()
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(
            imagebatch(
                "big",
                {"s3": {"bucket": OUTPUT_BUCKET, "key": "bench/scale.csv"}},
                suspend=True,
            )
        ),
    )
    obj = wait_batch(cluster, namespace, "big", ("Running", "Failed"), 900, interval=0.2)
    seconds = time.monotonic() - started
    peak = memory_kib(operator.process.pid, "VmHWM")
    return {
        "rows": rows,
        "csv_mib": len(data) / 2**20,
        "images": obj["status"]["images"]["total"],
        "shards": obj["status"]["shards"]["total"],
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "idle_mib": idle / 1024,
        "peak_mib": peak / 1024,
        "writes": operator.log().count(f"status {namespace}/big written"),
        "phase": obj["status"]["phase"],
    }


def many(
    cluster: LocalCluster, operator: OperatorProcess, images: ImageServer, count: int
) -> dict[str, float]:
    namespace = new_namespace(cluster, "bench-many")
    docs = []
    for b in range(count):
        text = HEADER + f"1,A,{images.url}/m/{b % 8}.jpg\n2,B,{images.url}/m/{(b + 1) % 8}.jpg\n"
        docs.append(yaml.safe_dump(imagebatch(f"b{b}", {"inline": text})))
    started = time.monotonic()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input="---\n".join(docs))
    for b in range(count):
        wait_batch(cluster, namespace, f"b{b}", ("Succeeded", "Failed"), 900, interval=0.2)
    seconds = time.monotonic() - started
    log = operator.log()
    writes = [log.count(f"status {namespace}/b{b} written") for b in range(count)]
    return {
        "batches": count,
        "seconds": seconds,
        "batches_per_s": count / seconds,
        "writes_mean": sum(writes) / count,
        "writes_max": max(writes),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-operator.md"))
    parser.add_argument("--images", type=int, default=40, help="images for the overhead run")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the scale CSV")
    parser.add_argument("--batches", type=int, default=50, help="batches applied at once")
    args = parser.parse_args(argv)
    files = {f"/o/{i}.jpg": (photo(640, 480, i), "image/jpeg") for i in range(args.images)}
    files.update({f"/m/{i}.jpg": (photo(200, 150, 100 + i), "image/jpeg") for i in range(8)})
    images = ImageServer(files)
    with LocalCluster() as cluster:
        assert cluster.minio is not None
        storage = cluster.minio.client()
        storage.make_bucket(OUTPUT_BUCKET)
        storage.set_bucket_policy(OUTPUT_BUCKET, json.dumps(PUBLIC_READ))
        cluster.kubectl("apply", "-f", "crds/imagebatches.imagebatch.dev.yaml")
        cluster.kubectl(
            "wait",
            "--for=condition=Established",
            "crd/imagebatches.imagebatch.dev",
            "--timeout=60s",
        )
        operator = OperatorProcess(cluster)
        operator.start()
        try:
            over = orchestration(cluster, operator, storage, images, args.images)
            big = scale(cluster, operator, storage, args.rows)
            crowd = many(cluster, operator, images, args.batches)
        finally:
            operator.stop()
            images.close()
    lines = [
        "# Operator benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; " + SETUP,
        "",
        "## Orchestration overhead",
        "",
        f"{over['images']} photos of 640x480, {over['shards']} shards, parallelism 2.",
        "",
        "| path | seconds | ratio |",
        "|---|---|---|",
        f"| worker alone, one shard | {over['alone_s']:.2f} | 1.00 |",
        f"| `kubectl apply` to Succeeded | {over['e2e_s']:.2f} | {over['ratio']:.2f} |",
        "",
        f"Status writes for that batch: {over['writes']}. Batch created "
        f"{over['batch_created']}, Job created {over['job_created']}.",
        "",
        "## Scale: validate and shard a big CSV",
        "",
        "| rows | CSV MiB | distinct images | shards | seconds to Running | rows/s | "
        "operator idle MiB | operator peak MiB | status writes |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {big['rows']} | {big['csv_mib']:.1f} | {big['images']} | {big['shards']} | "
        f"{big['seconds']:.1f} | {big['rows_per_s']:.0f} | {big['idle_mib']:.0f} | "
        f"{big['peak_mib']:.0f} | {big['writes']} |",
        "",
        f"Phase reached: {big['phase']}. "
        f"Peak over idle: {big['peak_mib'] - big['idle_mib']:.0f} MiB for a "
        f"{big['csv_mib']:.1f} MiB CSV. " + SPOOLED,
        "",
        "## Many batches at once",
        "",
        "| batches | seconds to all Succeeded | batches/s | status writes per batch (mean / max) |",
        "|---|---|---|---|",
        f"| {crowd['batches']} | {crowd['seconds']:.1f} | {crowd['batches_per_s']:.2f} | "
        f"{crowd['writes_mean']:.1f} / {crowd['writes_max']} |",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
