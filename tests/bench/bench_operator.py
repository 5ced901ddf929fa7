"""The operator at scale and its overhead, measured on the real local cluster.

Run ``python -m tests.bench.bench_operator --out reports/bench-operator.md``. One local
cluster, MinIO and the real operator process; every figure is measured in this run and
reported next to the baseline it is read against, never asserted:

* idle cost with 1,000 finished batches present, against the same operator with none:
  threads, RSS, CPU over a quiet minute, Kubernetes API requests a minute (from the
  operator's own ``imagebatch_kubernetes_requests_total``);
* apply → Job created, p50 and p95 over many batches, with none and with 1,000 present;
* Jobs of other software in the watched namespaces: what watching them costs;
* a 100,000-row CSV validated and planned (rows/s from the operator's own timings,
  apart from the manifest upload and the Job), with the operator's peak RSS;
* the largest CSV the default limits allow: peak RSS and the spool's peak size on disk;
* 2,000 photos at 640x480 through ``kubectl apply`` with the default spec, against the
  worker alone on the same images in the same run;
* a 1,000-shard batch to completion;
* the worker's start-up CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from minio import Minio

from imagebatch_common.contract import Compression, ShardImage, ShardManifest, image_key
from imagebatch_common.contract import shard_manifest_key as manifest_key
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import (
    OUTPUT_BUCKET,
    PUBLIC_READ,
    OperatorProcess,
    apply,
    imagebatch,
    wait_batch,
)
from tests.support.servers import ImageServer, photo

HEADER = "S. No.,Product Name,Input Image Urls\n"
SETUP = "local cluster (kube-apiserver, Job controller, MinIO, node agent) on the same machine."


# -- measuring a process ------------------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status: VmRSS / VmHWM in KiB, Threads."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def metric_total(operator: OperatorProcess, name: str) -> float:
    text = requests.get(operator.metrics_url, timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def wait_metrics(operator: OperatorProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(operator.metrics_url, timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError("the operator's /metrics never answered")


def idle_cost(operator: OperatorProcess, seconds: float) -> dict[str, float]:
    """Threads, RSS, CPU and API requests over a quiet stretch."""
    assert operator.process is not None
    pid = operator.process.pid
    requests_before = metric_total(operator, "imagebatch_kubernetes_requests_total")
    cpu_before = cpu_seconds(pid)
    time.sleep(seconds)
    cpu = cpu_seconds(pid) - cpu_before
    api = metric_total(operator, "imagebatch_kubernetes_requests_total") - requests_before
    return {
        "threads": proc_status(pid, "Threads"),
        "rss_mib": proc_status(pid, "VmRSS") / 1024,
        "cpu_percent": 100 * cpu / seconds,
        "requests_per_min": api * 60 / seconds,
    }


def new_namespace(cluster: LocalCluster, name: str) -> str:
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.kubectl_ok("get", "sa", "default", "-n", name), f"namespace {name}"
    )
    return name


def apply_docs(cluster: LocalCluster, namespace: str, docs: list[dict[str, Any]]) -> None:
    for start in range(0, len(docs), 200):
        apply(
            cluster,
            namespace,
            {"apiVersion": "v1", "kind": "List", "items": docs[start : start + 200]},
        )


def count_phase(cluster: LocalCluster, namespace: str, phase: str) -> int:
    items = json.loads(cluster.kubectl("get", "ib", "-n", namespace, "-o", "json"))["items"]
    return sum(1 for b in items if (b.get("status") or {}).get("phase") == phase)


# -- the scenarios ------------------------------------------------------------------------


def present(
    cluster: LocalCluster, operator: OperatorProcess, images: ImageServer, count: int
) -> dict[str, float]:
    """``count`` finished batches, kept as GitOps keeps them: every image already stored."""
    namespace = new_namespace(cluster, "bench-present")
    csv = f"{HEADER}1,P,{images.url}/m/0.jpg\n"
    # One batch stores the image; the others find it stored and need no pod at all.
    apply(cluster, namespace, imagebatch("seed", {"inline": csv}))
    wait_batch(cluster, namespace, "seed", ("Succeeded",), 300)
    docs = [
        {**imagebatch(f"kept-{i:04d}", {"inline": csv}, output={"prefix": "seed/"})}
        for i in range(count - 1)
    ]
    started = time.monotonic()
    apply_docs(cluster, namespace, docs)
    deadline = time.monotonic() + 1800
    while count_phase(cluster, namespace, "Succeeded") < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the batches never all finished")
        time.sleep(5)
    return {"seconds": time.monotonic() - started, "namespace_count": count}


def apply_to_job(
    cluster: LocalCluster, images: ImageServer, label: str, samples: int
) -> dict[str, float]:
    """Seconds from ``kubectl apply`` to the batch's Job existing, one batch at a time."""
    namespace = new_namespace(cluster, f"bench-latency-{label}")
    seconds = []
    for i in range(samples):
        csv = f"{HEADER}1,P,{images.url}/m/{1 + i % 7}.jpg\n"
        name = f"b{i}"
        started = time.monotonic()
        apply(cluster, namespace, imagebatch(name, {"inline": csv}, suspend=True))
        while not cluster.kubectl_ok("get", "job", f"{name}-g1", "-n", namespace):
            time.sleep(0.02)
        seconds.append(time.monotonic() - started)
    seconds.sort()
    return {
        "p50": statistics.median(seconds),
        "p95": seconds[max(0, int(len(seconds) * 0.95) - 1)],
        "samples": len(seconds),
    }


def unrelated_jobs(
    cluster: LocalCluster, operator: OperatorProcess, count: int
) -> dict[str, float]:
    """What the Jobs of other software cost the operator, which watches every Job."""
    assert operator.process is not None
    pid = operator.process.pid
    namespace = new_namespace(cluster, "bench-other-jobs")
    rss_before = proc_status(pid, "VmRSS")
    cpu_before = cpu_seconds(pid)
    docs = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"other-{i}", "labels": {"app": "someone-else"}},
            "spec": {
                "suspend": True,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "x", "command": ["true"]}],
                    }
                },
            },
        }
        for i in range(count)
    ]
    apply_docs(cluster, namespace, docs)
    time.sleep(10)
    cpu_create = cpu_seconds(pid) - cpu_before
    # Every one of them changes once (a label): the watch streams each change.
    cpu_before = cpu_seconds(pid)
    cluster.kubectl("label", "jobs", "--all", "-n", namespace, "touched=yes")
    time.sleep(10)
    cpu_update = cpu_seconds(pid) - cpu_before
    rss_after = proc_status(pid, "VmRSS")
    # Gone before the next section: a thousand deletions streaming through the watches
    # would be measured as that section's overhead.
    cluster.kubectl("delete", "namespace", namespace, "--timeout=600s")
    return {
        "jobs": count,
        "cpu_per_created_job_ms": 1000 * cpu_create / count,
        "cpu_per_changed_job_ms": 1000 * cpu_update / count,
        "rss_growth_mib": (rss_after - rss_before) / 1024,
    }


def big_csv(rows: int, url_length: int) -> bytes:
    """``rows`` rows with two URLs each, of about ``url_length`` characters."""
    pad = "x" * max(0, url_length - 48)
    return (
        HEADER
        + "".join(
            f'{i + 1},SKU{i},"https://img.example.com/{pad}/p/{i}/front.jpg,'
            f'https://img.example.com/{pad}/p/{i // 2}/back.jpg"\n'
            for i in range(rows)
        )
    ).encode()


@contextmanager
def spool_watch(path: Path) -> Iterator[list[int]]:
    """The largest total size of the files in ``path`` while the block runs."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            size = 0
            for entry in os.scandir(path):
                try:
                    size += entry.stat().st_size
                except FileNotFoundError:
                    pass
            peak[0] = max(peak[0], size)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def ingest_timings(log: str, namespace: str, name: str) -> dict[str, float]:
    pattern = re.compile(
        rf"{namespace}/{name} run \S+: planned in ([0-9.]+)s \(validate ([0-9.]+)s, "
        rf"plan ([0-9.]+)s, upload ([0-9.]+)s\)"
    )
    found = pattern.findall(log)
    if not found:
        raise RuntimeError(f"no ingest timings for {namespace}/{name} in the operator's log")
    total, validate, plan_, upload = (float(v) for v in found[-1])
    return {"total": total, "validate": validate, "plan": plan_, "upload": upload}


def big(
    cluster: LocalCluster,
    operator: OperatorProcess,
    storage: Minio,
    spool: Path,
    label: str,
    data: bytes,
) -> dict[str, float]:
    """A big CSV from s3 through validation and planning (suspended: no pods), fresh operator."""
    operator.restart(kill=False)
    wait_metrics(operator)
    assert operator.process is not None
    namespace = new_namespace(cluster, f"bench-{label}")
    key = f"{namespace}/products.csv"
    storage.put_object(OUTPUT_BUCKET, key, io.BytesIO(data), len(data))
    idle = proc_status(operator.process.pid, "VmRSS")
    started = time.monotonic()
    with spool_watch(spool) as peak_spool:
        apply(
            cluster,
            namespace,
            imagebatch("big", {"s3": {"bucket": OUTPUT_BUCKET, "key": key}}, suspend=True),
        )
        obj = wait_batch(cluster, namespace, "big", ("Running", "Failed"), 900, interval=0.2)
    seconds = time.monotonic() - started
    rows = obj["status"]["rows"]["total"]
    timings = ingest_timings(operator.log(), namespace, "big")
    return {
        "rows": rows,
        "csv_mib": len(data) / 2**20,
        "images": obj["status"]["images"]["total"],
        "shards": obj["status"]["shards"]["total"],
        "apply_to_running_s": seconds,
        "validate_s": timings["validate"],
        "plan_s": timings["plan"],
        "upload_s": timings["upload"],
        "rows_per_s": rows / (timings["validate"] + timings["plan"]),
        "idle_mib": idle / 1024,
        "peak_mib": proc_status(operator.process.pid, "VmHWM") / 1024,
        "spool_mib": peak_spool[0] / 2**20,
        "phase": obj["status"]["phase"],
    }


def worker_env(cluster: LocalCluster, prefix: str, run: str) -> dict[str, str]:
    assert cluster.minio is not None
    return {
        **os.environ,
        "MINIO_ENDPOINT": cluster.minio.endpoint,
        "MINIO_ACCESS_KEY": cluster.minio.access_key,
        "MINIO_SECRET_KEY": cluster.minio.secret_key,
        "IMAGEBATCH_BUCKET": OUTPUT_BUCKET,
        "IMAGEBATCH_PREFIX": prefix,
        "IMAGEBATCH_RUN": run,
        "IMAGEBATCH_ALLOW_NETS": "127.0.0.0/8",
    }


def run_worker(cluster: LocalCluster, storage: Minio, prefix: str, urls: list[str]) -> float:
    """The worker alone on one shard holding ``urls``: wall seconds."""
    compression = Compression()
    manifest = ShardManifest(
        run="alone",
        index=0,
        bucket=OUTPUT_BUCKET,
        prefix=prefix,
        compression=compression,
        images=tuple(ShardImage(u, image_key(prefix, u, compression), False) for u in urls),
    )
    data = manifest.to_json()
    storage.put_object(OUTPUT_BUCKET, manifest_key(prefix, "alone", 0), io.BytesIO(data), len(data))
    started = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "imagebatch-worker"), "--shard", "0"],
        env=worker_env(cluster, prefix, "alone"),
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return time.monotonic() - started


def orchestration(
    cluster: LocalCluster,
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
    n: int,
    rounds: int,
) -> dict[str, Any]:
    """The same photos: the worker alone on one shard, and ``kubectl apply``, interleaved.

    The two alternate which goes first, round by round, so a drift in the machine's speed
    weighs on both; each round's ratio compares two runs seconds apart.
    """
    urls = [f"{images.url}/o/{i}.jpg" for i in range(n)]
    text = (HEADER + "".join(f"{i + 1},P{i},{u}\n" for i, u in enumerate(urls))).encode()
    alone: list[float] = []
    through: list[float] = []
    details: dict[str, Any] = {}

    def apply_and_wait(r: int) -> float:
        nonlocal details
        namespace = new_namespace(cluster, f"bench-orchestration-{r}")
        key = f"{namespace}/photos.csv"
        storage.put_object(OUTPUT_BUCKET, key, io.BytesIO(text), len(text))
        started = time.monotonic()
        apply(
            cluster, namespace, imagebatch("photos", {"s3": {"bucket": OUTPUT_BUCKET, "key": key}})
        )
        # One watching kubectl, not a poll: polling would take CPU from the run it times.
        cluster.kubectl(
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "ib/photos",
            "-n",
            namespace,
            "--timeout=1800s",
            check=False,
        )
        seconds = time.monotonic() - started
        obj = wait_batch(cluster, namespace, "photos", ("Succeeded", "Failed"), 60)
        details = {"shards": obj["status"]["shards"]["total"], "phase": obj["status"]["phase"]}
        return seconds

    for r in range(rounds):
        if r % 2 == 0:
            alone.append(run_worker(cluster, storage, f"bench/alone-{r}/", urls))
            through.append(apply_and_wait(r))
        else:
            through.append(apply_and_wait(r))
            alone.append(run_worker(cluster, storage, f"bench/alone-{r}/", urls))
    best_alone, best_through = min(alone), min(through)
    return {
        "images": n,
        "alone_s": best_alone,
        "e2e_s": best_through,
        "ratio": best_through / best_alone,
        "round_ratios": [t / a for a, t in zip(alone, through, strict=True)],
        "rounds": rounds,
        **details,
    }


def thousand_shards(
    cluster: LocalCluster, images: ImageServer, shards: int, parallelism: int
) -> dict[str, float]:
    namespace = new_namespace(cluster, "bench-shards")
    text = HEADER + "".join(f"{i + 1},P{i},{images.url}/s/{i}.jpg\n" for i in range(shards))
    key = f"{namespace}/shards.csv"
    assert cluster.minio is not None
    client = cluster.minio.client()
    data = text.encode()
    client.put_object(OUTPUT_BUCKET, key, io.BytesIO(data), len(data))
    started = time.monotonic()
    apply(
        cluster,
        namespace,
        imagebatch(
            "wide",
            {"s3": {"bucket": OUTPUT_BUCKET, "key": key}},
            sharding={"imagesPerShard": 1, "parallelism": parallelism},
        ),
    )
    obj = wait_batch(cluster, namespace, "wide", ("Succeeded", "Failed"), 3600, 1.0)
    return {
        "shards": obj["status"]["shards"]["total"],
        "succeeded": obj["status"]["shards"]["succeeded"],
        "images": obj["status"]["images"]["succeeded"],
        "seconds": time.monotonic() - started,
        "parallelism": parallelism,
        "phase": obj["status"]["phase"],
    }


def worker_startup(cluster: LocalCluster, storage: Minio, images: ImageServer) -> dict[str, float]:
    """CPU of a worker process on a shard of one small image, and of ``--help`` alone."""

    def cpu_of(argv: list[str], env: dict[str, str]) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    worker = str(Path(sys.executable).parent / "imagebatch-worker")
    prefix = "bench/startup/"
    url = f"{images.url}/m/7.jpg"
    shard_cpu = []
    for i in range(5):
        compression = Compression()
        manifest = ShardManifest(
            f"s{i}",
            0,
            OUTPUT_BUCKET,
            prefix,
            compression,
            (ShardImage(url, image_key(prefix, url, compression), False),),
        )
        data = manifest.to_json()
        storage.put_object(
            OUTPUT_BUCKET, manifest_key(prefix, f"s{i}", 0), io.BytesIO(data), len(data)
        )
        shard_cpu.append(cpu_of([worker, "--shard", "0"], worker_env(cluster, prefix, f"s{i}")))
    interpreter = [cpu_of([sys.executable, "-c", "pass"], dict(os.environ)) for _ in range(5)]
    return {
        "one_image_shard_ms": 1000 * min(shard_cpu),
        "bare_python_ms": 1000 * min(interpreter),
    }


# -- the report ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-operator.md"))
    parser.add_argument("--present", type=int, default=1000, help="batches kept present")
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--other-jobs", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the scale CSV")
    parser.add_argument("--photos", type=int, default=2000, help="photos for the overhead run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the overhead run")
    parser.add_argument("--shards", type=int, default=1000, help="shards of the wide batch")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--only", default="", help="comma separated sections to run (default: all)")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))

    def wanted(section: str) -> bool:
        return not only or section in only

    files = {f"/o/{i}.jpg": (photo(640, 480, i), "image/jpeg") for i in range(args.photos)}
    files.update({f"/m/{i}.jpg": (photo(200, 150, 100 + i), "image/jpeg") for i in range(8)})
    files.update(
        {f"/s/{i}.jpg": (photo(64, 48, 500 + i), "image/jpeg") for i in range(args.shards)}
    )
    images = ImageServer(files)
    spool = Path(tempfile.mkdtemp(prefix="imagebatch-bench-spool-"))
    results: dict[str, dict[str, Any]] = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
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
        operator.env["IMAGEBATCH_SPOOL_DIR"] = str(spool)
        operator.env["IMAGEBATCH_MAX_PARALLELISM"] = "64"
        operator.start()
        wait_metrics(operator)
        try:
            if wanted("scale"):
                results["scale"] = big(
                    cluster, operator, storage, spool, "scale", big_csv(args.rows, 48)
                )
            if wanted("largest"):
                # The default limits: 64 MiB, 100,000 rows, 200,000 distinct images.
                results["largest"] = big(
                    cluster, operator, storage, spool, "largest", big_csv(100_000, 320)
                )
            if wanted("idle"):
                results["idle_empty"] = idle_cost(operator, args.idle_seconds)
                results["latency_empty"] = apply_to_job(
                    cluster, images, "empty", args.latency_samples
                )
                results["present"] = present(cluster, operator, images, args.present)
                time.sleep(15)  # let the last writes settle before measuring quiet
                results["idle_full"] = idle_cost(operator, args.idle_seconds)
                results["latency_full"] = apply_to_job(
                    cluster, images, "full", args.latency_samples
                )
                results["other_jobs"] = unrelated_jobs(cluster, operator, args.other_jobs)
            if wanted("orchestration"):
                results["orchestration"] = orchestration(
                    cluster, operator, storage, images, args.photos, args.rounds
                )
            if wanted("shards"):
                results["shards"] = thousand_shards(cluster, images, args.shards, 16)
            if wanted("startup"):
                results["startup"] = worker_startup(cluster, storage, images)
        finally:
            operator.stop()
            images.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    report = render(results, load_before, load_after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def render(r: dict[str, dict[str, Any]], load_before: list[str], load_after: list[str]) -> str:
    lines = [
        "# Operator benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {SETUP} Load average before {' '.join(load_before)}, "
        f"after {' '.join(load_after)}.",
        "",
    ]
    if "idle_full" in r:
        e, f, other = r["idle_empty"], r["idle_full"], r["other_jobs"]
        lines += [
            f"## {int(r['present']['namespace_count'])} batches present",
            "",
            "Finished batches kept, as a GitOps repository keeps them; measured over a quiet "
            "minute, against the same operator with none.",
            "",
            "| | no batches | with them | ratio |",
            "|---|---|---|---|",
            f"| operator threads | {e['threads']:.0f} | {f['threads']:.0f} | "
            f"{f['threads'] / e['threads']:.2f} |",
            f"| RSS MiB | {e['rss_mib']:.0f} | {f['rss_mib']:.0f} | "
            f"{f['rss_mib'] / e['rss_mib']:.2f} |",
            f"| idle CPU % | {e['cpu_percent']:.2f} | {f['cpu_percent']:.2f} | |",
            f"| Kubernetes API requests a minute | {e['requests_per_min']:.1f} | "
            f"{f['requests_per_min']:.1f} | |",
            "",
            f"They took {r['present']['seconds']:.0f} s to apply and finish.",
            "",
            "## Apply to Job created",
            "",
            "| | no batches present | with them present |",
            "|---|---|---|",
            f"| p50 seconds | {r['latency_empty']['p50']:.2f} | {r['latency_full']['p50']:.2f} |",
            f"| p95 seconds | {r['latency_empty']['p95']:.2f} | {r['latency_full']['p95']:.2f} |",
            "",
            f"{int(r['latency_full']['samples'])} batches each, applied one at a time; includes "
            "`kubectl apply` itself and polling for the Job with `kubectl get`.",
            "",
            "## Jobs of other software in watched namespaces",
            "",
            "The operator watches Jobs with the batch label; kopf filters labels in the "
            "operator, so every Job in a watched namespace is streamed to it.",
            "",
            "| unrelated Jobs | operator CPU per Job created | per Job changed | RSS growth |",
            "|---|---|---|---|",
            f"| {other['jobs']:.0f} | {other['cpu_per_created_job_ms']:.2f} ms | "
            f"{other['cpu_per_changed_job_ms']:.2f} ms | "
            f"{other['rss_growth_mib']:.1f} MiB |",
            "",
        ]
    for key, title in (
        ("scale", "100,000-row CSV"),
        ("largest", "The largest CSV the defaults allow"),
    ):
        if key not in r:
            continue
        b = r[key]
        lines += [
            f"## {title}",
            "",
            "| rows | CSV MiB | distinct images | shards | validate s | plan s | upload s | "
            "rows/s (validate + plan) | operator idle MiB | peak MiB | spool peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {b['rows']:.0f} | {b['csv_mib']:.1f} | {b['images']:.0f} | {b['shards']:.0f} | "
            f"{b['validate_s']:.2f} | {b['plan_s']:.2f} | {b['upload_s']:.2f} | "
            f"{b['rows_per_s']:.0f} | {b['idle_mib']:.0f} | {b['peak_mib']:.0f} | "
            f"{b['spool_mib']:.0f} |",
            "",
            f"Apply to Running (manifests uploaded, Job created): {b['apply_to_running_s']:.1f} s; "
            f"phase {b['phase']}.",
            "",
        ]
    if "orchestration" in r:
        o = r["orchestration"]
        lines += [
            "## Orchestration overhead",
            "",
            f"{o['images']:.0f} photos of 640x480, the default spec ({o['shards']:.0f} shards); "
            f"{o['rounds']:.0f} interleaved rounds, alternating which runs first. The ratio is "
            "the median of the rounds' own ratios (the two runs of a round are seconds apart; "
            "this machine's speed drifts by a fifth over minutes); seconds are each path's best.",
            "",
            "| path | seconds (best) | ratio (median of rounds) |",
            "|---|---|---|",
            f"| worker alone, one shard | {o['alone_s']:.2f} | 1.00 |",
            f"| `kubectl apply` to Succeeded | {o['e2e_s']:.2f} | "
            f"{statistics.median(o['round_ratios']):.2f} |",
            "",
            "Rounds: "
            + ", ".join(f"{x:.2f}" for x in o["round_ratios"])
            + f"; best against best: {o['ratio']:.2f}.",
            "",
        ]
    if "shards" in r:
        s = r["shards"]
        lines += [
            "## A 1,000-shard batch",
            "",
            f"{s['shards']:.0f} shards of one image each, parallelism {s['parallelism']:.0f}: "
            f"{s['succeeded']:.0f} succeeded, {s['images']:.0f} images, phase {s['phase']}, "
            f"in {s['seconds']:.0f} s.",
            "",
        ]
    if "startup" in r:
        w = r["startup"]
        lines += [
            "## Worker start-up",
            "",
            "| process | CPU ms (best of 5) |",
            "|---|---|",
            f"| `python -c pass` | {w['bare_python_ms']:.0f} |",
            f"| `imagebatch-worker` on a one-image shard | {w['one_image_shard_ms']:.0f} |",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
