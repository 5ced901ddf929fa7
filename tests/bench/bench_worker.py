"""Worker throughput, measured side by side with what it competes against.

Run ``python -m tests.bench.bench_worker --out reports/bench-worker.md``. It generates
photograph-like JPEGs at 1920x1080 and 640x480, serves them over HTTP on 127.0.0.1
from a separate process, starts a local MinIO, and measures on the same images in the
same run:

* the worker: the ``imagebatch-worker`` console script running one shard (HTTP fetch,
  compress, upload to MinIO, result manifest), as a Job pod runs it, once with
  compression in threads (the default) and once in a process pool;
* (a) the codec ceiling: Pillow decode + encode in memory with the worker's encoder
  options, in 2 processes, no I/O at all;
* (b) ``mogrify -quality 50`` over the same files, 2 processes in parallel;
* (c) a naive sequential loop: ``requests.get`` + Pillow + MinIO ``put_object``;
* the codec in 2 threads encoding into ``io.BytesIO`` versus a memory file descriptor,
  the fact that makes compressing in threads viable at all;
* what one image costs the machine besides the codec: a stat, a download and an
  upload, in CPU time across all processes (worker, MinIO, HTTP server, kernel);
* the worker and the naive loop once more against a server that answers each image
  after ``--latency-ms`` (default 20), as image hosts across the internet do; loopback
  answers at once, which hides what concurrency is for.

Methods run interleaved (round after round) and each keeps its best run, so a burst of
other work on the machine costs one run, not one method. The report gives ratios,
never pass/fail assertions; the targets are there to read the ratios against.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import PIL
import requests
from minio import Minio
from PIL import Image, features

from imagebatch_common.contract import (
    Compression,
    ShardImage,
    ShardManifest,
    image_key,
    shard_manifest_key,
)
from imagebatch_common.envread import parse_networks
from imagebatch_common.fetch import Fetcher
from imagebatch_common.storage import Storage
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_worker.compress import CompressParams, compress, encoder_options
from imagebatch_worker.compressors import ThreadCompressor
from imagebatch_worker.settings import WorkerSettings
from tests.bench.images import photo_jpeg
from tests.bench.local_http import directory_server_process
from tests.cluster.stack import LocalCluster, MinioServer

QUALITY = 50
CORES = 2  # the comparison the targets are set for: everything gets two cores
TARGETS = {"1920x1080": 0.85, "640x480": 0.60}


@dataclass(frozen=True)
class ImageSet:
    name: str
    width: int
    height: int
    files: tuple[Path, ...]
    input_bytes: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height * len(self.files) / 1e6


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_seconds: float  # busy CPU of the whole machine during the run
    output_bytes: int


@dataclass
class Measurement:
    label: str
    note: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda run: run.seconds)

    @property
    def seconds(self) -> float:
        return self.best.seconds


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(work: Callable[[], tuple[float | None, int]]) -> Run:
    """Run ``work``; it may return its own seconds (None: wall time is used)."""
    busy = machine_busy_seconds()
    started = time.perf_counter()
    own_seconds, produced = work()
    wall = time.perf_counter() - started
    return Run(
        own_seconds if own_seconds is not None else wall, machine_busy_seconds() - busy, produced
    )


def generate(name: str, width: int, height: int, count: int, root: Path) -> ImageSet:
    directory = root / name
    directory.mkdir(parents=True)
    for index in range(count):
        (directory / f"{name}-{index:05d}.jpg").write_bytes(photo_jpeg(width, height, seed=index))
    files = tuple(sorted(directory.iterdir()))
    return ImageSet(name, width, height, files, sum(path.stat().st_size for path in files))


def halves(items: Sequence[Path]) -> list[list[Path]]:
    return [list(items[start::CORES]) for start in range(CORES)]


# -- (a) and the design probe: the codec alone ---------------------------------


def _codec_batch(paths: list[Path], target: str = "bytesio") -> tuple[float, int]:
    """Decode + encode ``paths`` in memory; return (seconds, output bytes)."""
    blobs = [path.read_bytes() for path in paths]
    options = encoder_options("jpeg", QUALITY)
    produced = 0
    started = time.perf_counter()
    for blob in blobs:
        image = Image.open(io.BytesIO(blob))
        image.load()
        if target == "memfd":
            descriptor = os.memfd_create("bench", os.MFD_CLOEXEC)
            with open(descriptor, "w+b") as memory:
                image.save(memory, "JPEG", **options)
                memory.flush()
                produced += os.fstat(memory.fileno()).st_size
        else:
            out = io.BytesIO()
            image.save(out, "JPEG", **options)
            produced += out.tell()
    return time.perf_counter() - started, produced


def _warm() -> None:
    """Import Pillow's JPEG plugin in a pool process before the clock starts."""
    Image.open(io.BytesIO(photo_jpeg(16, 16))).load()


def codec_in_processes(images: ImageSet, pool: ProcessPoolExecutor) -> tuple[float, int]:
    parts = list(pool.map(_codec_batch, halves(images.files)))
    return max(seconds for seconds, _ in parts), sum(size for _, size in parts)


def codec_in_threads(images: ImageSet, target: str) -> tuple[float | None, int]:
    with ThreadPoolExecutor(CORES) as pool:
        parts = list(pool.map(_codec_batch, halves(images.files), [target] * CORES))
    return max(seconds for seconds, _ in parts), sum(size for _, size in parts)


# -- the worker ----------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    minio: MinioServer
    client: Minio
    bucket: str
    base_url: str
    far_url: str  # the same files, each answered after the configured latency


def write_manifest(client: Minio, bucket: str, prefix: str, urls: list[str]) -> None:
    compression = Compression(quality=QUALITY, format="jpeg")
    # As the operator plans a run: it listed the (fresh) prefix and found no outputs, so
    # the shard's first attempt does not check each image.
    images = tuple(ShardImage(url, image_key(prefix, url, compression), False) for url in urls)
    manifest = ShardManifest("bench", 0, bucket, prefix, compression, images)
    body = manifest.to_json()
    client.put_object(bucket, shard_manifest_key(prefix, "bench", 0), io.BytesIO(body), len(body))


def worker_script() -> str:
    script = shutil.which("imagebatch-worker", path=str(Path(sys.executable).parent))
    if script is None:
        raise SystemExit("the imagebatch-worker console script is not installed")
    return script


def worker_env(stack: Stack, prefix: str, compress_in: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "MINIO_ENDPOINT": stack.minio.endpoint,
        "MINIO_ACCESS_KEY": stack.minio.access_key,
        "MINIO_SECRET_KEY": stack.minio.secret_key,
        "IMAGEBATCH_BUCKET": stack.bucket,
        "IMAGEBATCH_PREFIX": prefix,
        "IMAGEBATCH_RUN": "bench",
        "IMAGEBATCH_ALLOW_NETS": "127.0.0.1/32",
        "IMAGEBATCH_COMPRESS_WORKERS": str(CORES),
        "IMAGEBATCH_COMPRESS_IN": compress_in,
    }


def run_worker(
    images: ImageSet, stack: Stack, compress_in: str, base_url: str = ""
) -> tuple[float, float, int]:
    """Run one shard through the console script; return (wall s, in-shard s, bytes out)."""
    prefix = f"bench/{uuid.uuid4().hex[:8]}/"  # fresh keys: nothing to skip
    urls = [f"{base_url or stack.base_url}/img/{path.name}" for path in images.files]
    write_manifest(stack.client, stack.bucket, prefix, urls)
    started = time.perf_counter()
    finished = subprocess.run(
        [worker_script(), "--shard", "0"],
        env=worker_env(stack, prefix, compress_in),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"worker exited {finished.returncode}:\n{finished.stdout[-2000:]}")
    summary = json.loads(finished.stdout.splitlines()[-1])
    if summary.get("failed"):
        raise SystemExit(f"worker failed images: {finished.stdout[-2000:]}")
    return wall, summary["ms"] / 1000, int(summary["bytes_out"])


def worker_start_up(stack: Stack, samples: int = 3) -> float:
    """Machine CPU seconds of a worker process that starts, finds no manifest and exits."""

    def start_and_stop() -> tuple[float | None, int]:
        subprocess.run(
            [worker_script(), "--shard", "0"],
            env=worker_env(stack, f"nothing-here-{uuid.uuid4().hex[:8]}/", "threads"),
            capture_output=True,
            timeout=120,
        )
        return None, 0

    return min(timed(start_and_stop).cpu_seconds for _ in range(samples))


# -- (b) mogrify -----------------------------------------------------------------


def run_mogrify(images: ImageSet, output: Path) -> tuple[float | None, int]:
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    processes = [
        subprocess.Popen(
            ["mogrify", "-quality", str(QUALITY), "-path", str(output), *map(str, part)],
            stdout=subprocess.DEVNULL,
        )
        for part in halves(images.files)
    ]
    codes = [process.wait(timeout=1800) for process in processes]
    if any(codes):
        raise SystemExit(f"mogrify failed: {codes}")
    return None, sum(path.stat().st_size for path in output.iterdir())


# -- (c) the naive loop ------------------------------------------------------------


def run_naive(images: ImageSet, stack: Stack, base_url: str = "") -> tuple[float | None, int]:
    prefix = f"naive/{uuid.uuid4().hex[:8]}/"
    produced = 0
    for path in images.files:
        response = requests.get(f"{base_url or stack.base_url}/img/{path.name}", timeout=60)
        response.raise_for_status()
        image = Image.open(io.BytesIO(response.content))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=QUALITY)
        body = out.getvalue()
        stack.client.put_object(
            stack.bucket, prefix + path.name, io.BytesIO(body), len(body), "image/jpeg"
        )
        produced += len(body)
    return None, produced


# -- the cost of one image besides the codec -----------------------------------------


def per_image_costs(images: ImageSet, stack: Stack, samples: int) -> dict[str, float]:
    """Machine CPU milliseconds per stat, download, upload and compress() of one image."""
    storage = Storage(
        StorageSettings(stack.minio.endpoint, stack.minio.access_key, stack.minio.secret_key)
    )
    fetcher = Fetcher(WorkerSettings(allow_nets=parse_networks("127.0.0.1/32")).fetch_settings())
    compressor = ThreadCompressor(CORES)  # as the worker compresses: dedicated threads
    blobs = [path.read_bytes() for path in images.files[:20]]
    outputs = [compress(blob, CompressParams(quality=QUALITY)).data for blob in blobs]
    prefix = f"cost/{uuid.uuid4().hex[:8]}/"
    operations: dict[str, Callable[[int], object]] = {
        "stat (only a retried shard checks)": lambda i: storage.stat(stack.bucket, f"{prefix}{i}"),
        "download over HTTP": lambda i: fetcher.fetch(
            f"{stack.base_url}/img/{images.files[i % len(blobs)].name}"
        ),
        "upload to MinIO": lambda i: storage.put(
            stack.bucket, f"{prefix}{i}", outputs[i % len(outputs)], "image/jpeg"
        ),
        "compress()": lambda i: compressor.compress(
            blobs[i % len(blobs)], CompressParams(quality=QUALITY)
        ),
    }
    costs = {}
    for name, operation in operations.items():

        def run_all(operation: Callable[[int], object] = operation) -> tuple[float | None, int]:
            with ThreadPoolExecutor(CORES * 2) as pool:
                list(pool.map(operation, range(samples)))
            return None, 0

        costs[name] = timed(run_all).cpu_seconds / samples * 1000
    fetcher.close()
    compressor.close()
    return costs


# -- report ------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mogrify = shutil.which("mogrify")
    magick = "not installed"
    if mogrify:
        version = subprocess.run(
            [mogrify, "-version"], capture_output=True, text=True, check=False
        ).stdout
        magick = version.splitlines()[0].removeprefix("Version: ") if version else "unknown"
    return {
        "nproc": str(os.cpu_count()),
        "CPU": model,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "Pillow": PIL.__version__
        + (" (libjpeg-turbo)" if features.check_feature("libjpeg_turbo") else ""),
        "ImageMagick": magick,
    }


def report_set(images: ImageSet, results: dict[str, Measurement]) -> list[str]:
    ceiling = results["ceiling"].seconds
    count = len(images.files)
    lines = [
        f"### {images.name}: {count} JPEGs, {images.input_bytes / count / 1024:.0f} KiB each "
        "on average",
        "",
        "| method | images/s | megapixels/s | vs (a) | machine CPU ms/image | avg output KiB "
        "| note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for measurement in results.values():
        best = measurement.best
        cpu = f"{best.cpu_seconds / count * 1000:.1f}" if best.cpu_seconds else "(above)"
        lines.append(
            f"| {measurement.label} | {count / best.seconds:,.1f} "
            f"| {images.megapixels / best.seconds:,.1f} | {ceiling / best.seconds:.0%} "
            f"| {cpu} "
            f"| {best.output_bytes / count / 1024:.0f} | {measurement.note} |"
        )
    return lines


def verdicts(name: str, results: dict[str, Measurement], latency_ms: int) -> list[str]:
    worker = results["worker"].seconds
    ceiling = results["ceiling"].seconds
    lines = [
        f"- worker / (a) codec ceiling: **{ceiling / worker:.0%}** "
        f"(target at least {TARGETS[name]:.0%}); timed from exec to exit, interpreter "
        f"start-up included: {ceiling / results['worker-wall'].seconds:.0%}",
        f"- worker / (c) naive loop: **{results['naive'].seconds / worker:.1f}x** "
        f"(target at least 3x); with {latency_ms} ms server latency: "
        f"**{results['naive-far'].seconds / results['worker-far'].seconds:.1f}x**",
    ]
    if "mogrify" in results:
        lines.append(
            f"- worker / (b) mogrify: **{results['mogrify'].seconds / worker:.1f}x** "
            "(target above 1x)"
        )
    else:
        lines.append("- worker / (b) mogrify: not measured (ImageMagick is not installed)")
    lines += [
        f"- whole worker, compression in threads / in processes: "
        f"**{results['worker-processes'].seconds / worker:.2f}x** faster, "
        f"{results['worker-processes'].best.cpu_seconds / results['worker'].best.cpu_seconds:.2f}x"
        " less machine CPU",
        f"- codec in 2 threads, into a memory file descriptor / into io.BytesIO: "
        f"**{results['threads-bytesio'].seconds / results['threads-memfd'].seconds:.2f}x**",
    ]
    return lines


def bench_set(
    images: ImageSet,
    rounds: int,
    pool: ProcessPoolExecutor,
    stack: Stack,
    scratch: Path,
    latency_ms: int,
) -> dict[str, Measurement]:
    print(f"{images.name}: {len(images.files)} images", flush=True)
    walls: list[Run] = []

    def worker(compress_in: str, base_url: str = "") -> tuple[float | None, int]:
        wall, in_shard, produced = run_worker(images, stack, compress_in, base_url)
        if compress_in == "threads" and not base_url:
            walls.append(Run(wall, 0.0, produced))
        return in_shard, produced

    far = f"{latency_ms} ms server latency"
    methods: dict[str, tuple[Measurement, Callable[[], tuple[float | None, int]]]] = {
        "worker": (
            Measurement(
                "worker (imagebatch-worker)",
                "the shipped default: HTTP fetch + compress in threads + upload to MinIO",
            ),
            lambda: worker("threads"),
        ),
        "worker-processes": (
            Measurement("worker, compression in processes", "IMAGEBATCH_COMPRESS_IN=processes"),
            lambda: worker("processes"),
        ),
        "ceiling": (
            Measurement(
                "(a) codec ceiling, 2 processes",
                "Pillow decode + encode in memory, the worker's encoder options, no I/O",
            ),
            lambda: codec_in_processes(images, pool),
        ),
        "naive": (
            Measurement("(c) naive loop: requests + Pillow + put_object", "sequential"),
            lambda: run_naive(images, stack),
        ),
        "threads-bytesio": (
            Measurement("codec, 2 threads, into io.BytesIO", "Pillow keeps the GIL"),
            lambda: codec_in_threads(images, "bytesio"),
        ),
        "threads-memfd": (
            Measurement("codec, 2 threads, into a memfd", "Pillow releases the GIL"),
            lambda: codec_in_threads(images, "memfd"),
        ),
        "worker-far": (
            Measurement(f"worker, {far}", "as an image host across the internet"),
            lambda: worker("threads", stack.far_url),
        ),
        "naive-far": (
            Measurement(f"(c) naive loop, {far}", "sequential: every wait adds up"),
            lambda: run_naive(images, stack, stack.far_url),
        ),
    }
    if shutil.which("mogrify"):
        methods["mogrify"] = (
            Measurement("(b) mogrify -quality 50, 2 processes", "local files in and out"),
            lambda: run_mogrify(images, scratch / f"mogrify-{images.name}"),
        )
    run_worker(images, stack, "threads")  # warm the page cache and MinIO
    for round_number in range(1, rounds + 1):
        for measurement, work in methods.values():
            run = timed(work)
            measurement.runs.append(run)
            print(f"  round {round_number}: {measurement.label}: {run.seconds:.2f}s", flush=True)
    results = {name: measurement for name, (measurement, _) in methods.items()}
    results["worker-wall"] = Measurement(
        "worker, whole process",
        "the default's runs timed from exec to exit: interpreter start and imports included",
        walls,
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the ImageBatch worker.")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-worker.md"))
    parser.add_argument("--large", type=int, default=120, help="how many 1920x1080 images")
    parser.add_argument("--small", type=int, default=500, help="how many 640x480 images")
    parser.add_argument("--rounds", type=int, default=3, help="runs per method; best is kept")
    parser.add_argument(
        "--latency-ms", type=int, default=20, help="server latency of the far scenario"
    )
    args = parser.parse_args(argv)

    info = machine()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    print(f"machine: {info}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as temporary:
        scratch = Path(temporary)
        started = time.perf_counter()
        sets = [
            generate("1920x1080", 1920, 1080, args.large, scratch / "images"),
            generate("640x480", 640, 480, args.small, scratch / "images"),
        ]
        print(f"generated images in {time.perf_counter() - started:.0f}s", flush=True)
        serve = scratch / "serve"
        serve.mkdir()
        for image_set in sets:
            for path in image_set.files:
                os.link(path, serve / path.name)

        context: Any = get_context("spawn")
        with (
            LocalCluster(kubernetes=False) as cluster,
            directory_server_process(serve) as base_url,
            directory_server_process(serve, args.latency_ms / 1000) as far_url,
            ProcessPoolExecutor(CORES, mp_context=context) as pool,
        ):
            assert cluster.minio is not None
            minio = cluster.minio
            client = Minio(
                minio.endpoint,
                access_key=minio.access_key,
                secret_key=minio.secret_key,
                secure=False,
            )
            stack = Stack(minio, client, "bench", base_url, far_url)
            client.make_bucket(stack.bucket)
            for future in [pool.submit(_warm) for _ in range(CORES)]:  # start the processes
                future.result()
            results = {
                image_set.name: bench_set(
                    image_set, args.rounds, pool, stack, scratch, args.latency_ms
                )
                for image_set in sets
            }
            costs = {image_set.name: per_image_costs(image_set, stack, 200) for image_set in sets}
            start_up = worker_start_up(stack)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    lines = [
        "# Worker benchmark",
        "",
        "Generated by `python -m tests.bench.bench_worker`. Photograph-like JPEGs (gradients, "
        "grain, edges; quality 90) are served over HTTP on 127.0.0.1 by a separate process; "
        "outputs go to a local MinIO. All of it shares the same two cores: the HTTP server, "
        "MinIO and the kernel's loopback networking run beside the worker and the naive "
        "loop, while the codec ceiling and mogrify read local files. Methods ran "
        f"interleaved, {args.rounds} rounds; each figure is the method's best run. JPEG "
        f"quality {QUALITY}. *Machine CPU* is busy CPU time of the whole machine (all "
        "processes and the kernel) per image during that run; for the worker it covers the "
        "whole process, start-up included, while its images/s count from manifest read to "
        "result written, as the worker's own summary line reports.",
        "",
        "## Machine",
        "",
        *[f"- {name}: {value}" for name, value in info.items()],
        f"- load average before / after: {' '.join(load_before)} / {' '.join(load_after)}",
        "",
        "## Results",
        "",
    ]
    for image_set in sets:
        lines += report_set(image_set, results[image_set.name])
        lines += ["", *verdicts(image_set.name, results[image_set.name], args.latency_ms), ""]
    lines += [
        "## What one image costs besides the codec",
        "",
        "Machine CPU milliseconds per operation, measured alone with 4 threads, through the "
        "worker's own fetcher and storage client: everything an image needs on top of "
        "`compress()` is paid on the same two cores in the worker run, and not at all in "
        "the codec ceiling.",
        "",
        "| operation | " + " | ".join(image_set.name for image_set in sets) + " |",
        "|---|" + "---:|" * len(sets),
    ]
    for operation in costs[sets[0].name]:
        lines.append(
            f"| {operation} | "
            + " | ".join(f"{costs[image_set.name][operation]:.1f}" for image_set in sets)
            + " |"
        )
    lines += [
        "",
        f"A worker process costs {start_up * 1000:.0f} ms of machine CPU to start (interpreter, "
        "imports) before its first image. Where the worker's extra machine CPU per image "
        "goes, against the ceiling, start-up taken out:",
        "",
    ]
    for image_set in sets:
        count = len(image_set.files)
        worker_cpu = results[image_set.name]["worker"].best.cpu_seconds - start_up
        worker_ms = worker_cpu / count * 1000
        ceiling_ms = results[image_set.name]["ceiling"].best.cpu_seconds / count * 1000
        # A first attempt trusts the plan and does not stat (see ShardImage.stored).
        io_ms = sum(
            value
            for name, value in costs[image_set.name].items()
            if name in ("download over HTTP", "upload to MinIO")
        )
        lines.append(
            f"- {image_set.name}: worker {worker_ms:.1f} ms, ceiling {ceiling_ms:.1f} ms; the "
            f"download and upload measured alone account for {io_ms:.1f} of the "
            f"{worker_ms - ceiling_ms:.1f} ms difference (a first attempt makes no stat)."
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
