"""Worker throughput, measured side by side with what it competes against.

Run ``python -m tests.bench.bench_worker --out reports/bench-worker.md`` (``make bench``).
It generates photograph-like JPEGs at 1920x1080, 640x480 and 4000x3000 (12 MP), serves
them over HTTP on 127.0.0.1 from a separate process, starts a local MinIO, and measures
on the same images in the same run:

* the worker: the ``imagebatch-worker`` console script running one shard (HTTP fetch,
  compress, upload to MinIO, result manifest), as a Job pod runs it; with
  ``--compare SCRIPT`` also another build's worker (the one before a change) on the
  same images, interleaved;
* the codec ceiling: Pillow decode + encode in memory with the worker's encoder
  options, in 2 processes, no I/O at all;
* the I/O-inclusive ceiling: the best rate two cores can reach when each image also
  costs its download and upload, i.e. 2 / (codec CPU + download CPU + upload CPU per
  image), each measured in this run, servers' CPU included;
* ``mogrify -quality 50`` over the same files, 2 processes in parallel;
* a naive sequential loop: ``requests.get`` + Pillow + MinIO ``put_object``;
* the codec in 2 threads encoding into ``io.BytesIO`` versus a memory file descriptor;
* lines for WebP output, a server answering after ``--latency-ms`` (default 20), 100
  image hosts with that latency, and four 7000x7000 PNGs under a 1 GiB memory limit;
* the worker's start-up CPU (to its first fetch, from its own summary) and a py-spy
  profile of its Python time, sorted into the costs the worker issue lists, with a
  flame graph per size next to the report.

CPU is counted per process (the worker through ``wait4``, MinIO and the image servers
through /proc, the codec processes themselves), so other work on the machine does not
land in a method's figures; wall-clock rates still suffer from it, so the report notes
the load average. Methods run interleaved (round after round) and each keeps its best
run. The report gives ratios, never pass/fail assertions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import PIL
import requests
from minio import Minio
from PIL import Image, ImageDraw, features

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
from tests.bench import profile
from tests.bench.images import photo_jpeg
from tests.bench.local_http import FileServers, file_servers_process
from tests.cluster.stack import LocalCluster, MinioServer

QUALITY = 50
CORES = 2  # the comparison the targets are set for: everything gets two cores
IO_CEILING_TARGET = 0.90
MEMORY_LIMIT = 1024**3
MIB = 1024 * 1024
HOSTS = 100
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ImageSet:
    name: str
    width: int
    height: int
    files: tuple[Path, ...]
    input_bytes: int

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def megapixels(self) -> float:
        return self.width * self.height * self.count / 1e6


@dataclass(frozen=True)
class Run:
    seconds: float  # the method's own time: in-shard for the worker, wall otherwise
    cpu: dict[str, float]  # CPU seconds by process group (worker, storage, server, ...)
    output_bytes: int
    summary: dict[str, Any] = field(default_factory=dict)  # the worker's shard summary
    peak_rss: int = 0  # bytes, for a worker run

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu.values())


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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(name: str, width: int, height: int, count: int, root: Path) -> ImageSet:
    directory = root / name
    directory.mkdir(parents=True)
    for index in range(count):
        (directory / f"{name}-{index:05d}.jpg").write_bytes(photo_jpeg(width, height, seed=index))
    files = tuple(sorted(directory.iterdir()))
    return ImageSet(name, width, height, files, sum(path.stat().st_size for path in files))


def halves(items: Sequence[Path]) -> list[list[Path]]:
    return [list(items[start::CORES]) for start in range(CORES)]


# -- the codec alone -----------------------------------------------------------------


def _codec_batch(
    paths: list[Path], target: str = "jpeg", into: str = "bytesio"
) -> tuple[float, int, float]:
    """Decode + encode ``paths`` in memory; return (seconds, output bytes, CPU seconds)."""
    blobs = [path.read_bytes() for path in paths]
    options = encoder_options(target, QUALITY)
    produced = 0
    cpu = time.process_time()
    started = time.perf_counter()
    for blob in blobs:
        image = Image.open(io.BytesIO(blob))
        image.load()
        if into == "memfd":
            descriptor = os.memfd_create("bench", os.MFD_CLOEXEC)
            with open(descriptor, "w+b") as memory:
                image.save(memory, target.upper(), **options)
                memory.flush()
                produced += os.fstat(memory.fileno()).st_size
        else:
            out = io.BytesIO()
            image.save(out, target.upper(), **options)
            produced += out.tell()
    return time.perf_counter() - started, produced, time.process_time() - cpu


def _warm() -> None:
    """Load Pillow's plugins and memory settings in a pool process before the clock."""
    from imagebatch_worker.compressors import reuse_image_memory

    reuse_image_memory(1)  # the worker's allocator settings, so the codecs compare fairly
    Image.open(io.BytesIO(photo_jpeg(16, 16))).load()


def codec_in_processes(images: ImageSet, pool: ProcessPoolExecutor, target: str = "jpeg") -> Run:
    parts = list(pool.map(_codec_batch, halves(images.files), [target] * CORES))
    return Run(
        max(seconds for seconds, _, _ in parts),
        {"codec": sum(cpu for _, _, cpu in parts)},
        sum(size for _, size, _ in parts),
    )


def codec_in_threads(images: ImageSet, into: str) -> Run:
    before = own_cpu()
    with ThreadPoolExecutor(CORES) as pool:
        parts = list(pool.map(_codec_batch, halves(images.files), ["jpeg"] * CORES, [into] * 2))
    return Run(
        max(seconds for seconds, _, _ in parts),
        {"codec": own_cpu() - before},
        sum(size for _, size, _ in parts),
    )


# -- the worker ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    minio: MinioServer
    minio_pid: int
    client: Minio
    bucket: str
    near: FileServers  # answers at once
    far: FileServers  # answers after the configured latency
    hosts: FileServers  # HOSTS servers, each with that latency
    big: FileServers  # the 7000x7000 PNGs

    def servers_cpu(self) -> float:
        return sum(process_cpu(s.pid) for s in (self.near, self.far, self.hosts, self.big))


def write_manifest(
    client: Minio,
    bucket: str,
    prefix: str,
    urls: list[str],
    target: str = "jpeg",
    max_dimension: int | None = None,
) -> None:
    compression = Compression(quality=QUALITY, format=target, max_dimension=max_dimension)
    # As the operator plans a run: it listed the (fresh) prefix and found no outputs, so
    # the shard's first attempt does not check each image.
    images = tuple(ShardImage(url, image_key(prefix, url, compression), False) for url in urls)
    manifest = ShardManifest("bench", 0, bucket, prefix, compression, images)
    body = manifest.to_json()
    client.put_object(bucket, shard_manifest_key(prefix, "bench", 0), io.BytesIO(body), len(body))


def default_worker() -> str:
    script = shutil.which("imagebatch-worker", path=str(Path(sys.executable).parent))
    if script is None:
        raise SystemExit("the imagebatch-worker console script is not installed")
    return script


def worker_env(stack: Stack, prefix: str, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "MINIO_ENDPOINT": stack.minio.endpoint,
        "MINIO_ACCESS_KEY": stack.minio.access_key,
        "MINIO_SECRET_KEY": stack.minio.secret_key,
        "IMAGEBATCH_BUCKET": stack.bucket,
        "IMAGEBATCH_PREFIX": prefix,
        "IMAGEBATCH_RUN": "bench",
        "IMAGEBATCH_ALLOW_NETS": "127.0.0.1/32",
        "IMAGEBATCH_COMPRESS_WORKERS": str(CORES),
    }
    env.update(extra)
    return env


def spawn_measured(
    command: list[str], env: Mapping[str, str]
) -> tuple[int, str, resource.struct_rusage]:
    """Run ``command``; return its exit code, stdout and its own resource usage."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, env=dict(env), stdout=out, stderr=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), usage


def run_worker(
    script: str,
    files: Sequence[Path],
    stack: Stack,
    servers: FileServers,
    target: str = "jpeg",
    max_dimension: int | None = None,
    **env: str,
) -> Run:
    """One shard through a worker console script, as a Job pod runs it."""
    prefix = f"bench/{uuid.uuid4().hex[:8]}/"  # fresh keys: nothing to skip
    urls = [f"{servers.urls[n % len(servers.urls)]}/img/{p.name}" for n, p in enumerate(files)]
    write_manifest(stack.client, stack.bucket, prefix, urls, target, max_dimension)
    storage_before, servers_before = process_cpu(stack.minio_pid), stack.servers_cpu()
    code, stdout, usage = spawn_measured([script, "--shard", "0"], worker_env(stack, prefix, **env))
    cpu = {
        "worker": usage.ru_utime + usage.ru_stime,
        "storage": process_cpu(stack.minio_pid) - storage_before,
        "server": stack.servers_cpu() - servers_before,
    }
    if code != 0:
        raise SystemExit(f"{script} exited {code}:\n{stdout[-2000:]}")
    summary = json.loads(stdout.splitlines()[-1])
    if summary.get("failed"):
        raise SystemExit(f"{script} failed images: {stdout[-2000:]}")
    return Run(
        summary["ms"] / 1000, cpu, int(summary["bytes_out"]), summary, usage.ru_maxrss * 1024
    )


def start_up_cpu(script: str, stack: Stack, samples: int = 3) -> float:
    """CPU seconds of a worker process that starts, finds no manifest and exits."""
    costs: list[float] = []
    for _ in range(samples):
        prefix = f"nothing-here-{uuid.uuid4().hex[:8]}/"
        _code, _out, usage = spawn_measured([script, "--shard", "0"], worker_env(stack, prefix))
        costs.append(usage.ru_utime + usage.ru_stime)
    return min(costs)


# -- what a user would otherwise run -------------------------------------------------


def run_mogrify(images: ImageSet, output: Path) -> Run:
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["mogrify", "-quality", str(QUALITY), "-path", str(output), *map(str, part)],
            stdout=subprocess.DEVNULL,
        )
        for part in halves(images.files)
    ]
    cpu = 0.0
    for process in processes:
        _pid, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"mogrify failed: {status}")
        cpu += usage.ru_utime + usage.ru_stime
    seconds = time.perf_counter() - started
    return Run(seconds, {"mogrify": cpu}, sum(p.stat().st_size for p in output.iterdir()))


def run_naive(images: ImageSet, stack: Stack, servers: FileServers) -> Run:
    prefix = f"naive/{uuid.uuid4().hex[:8]}/"
    produced = 0
    storage_before, servers_before, before = (
        process_cpu(stack.minio_pid),
        stack.servers_cpu(),
        own_cpu(),
    )
    started = time.perf_counter()
    for path in images.files:
        response = requests.get(f"{servers.urls[0]}/img/{path.name}", timeout=60)
        response.raise_for_status()
        image = Image.open(io.BytesIO(response.content))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=QUALITY)
        body = out.getvalue()
        stack.client.put_object(
            stack.bucket, prefix + path.name, io.BytesIO(body), len(body), "image/jpeg"
        )
        produced += len(body)
    cpu = {
        "client": own_cpu() - before,
        "storage": process_cpu(stack.minio_pid) - storage_before,
        "server": stack.servers_cpu() - servers_before,
    }
    return Run(time.perf_counter() - started, cpu, produced)


# -- what one image costs besides the codec --------------------------------------------


def per_image_costs(images: ImageSet, stack: Stack, samples: int) -> dict[str, float]:
    """CPU milliseconds per download, upload, stat and compress() of one image, each
    measured alone through the worker's own clients, as many at once as the worker runs
    (its default concurrency; compression on two threads), the upload with the user
    metadata the worker stores: client process plus the server that answered (image
    server or MinIO)."""
    from imagebatch_worker.runner import ShardRunner

    in_flight = WorkerSettings().concurrency
    storage = Storage(
        StorageSettings(stack.minio.endpoint, stack.minio.access_key, stack.minio.secret_key)
    )
    fetcher = Fetcher(WorkerSettings(allow_nets=parse_networks("127.0.0.1/32")).fetch_settings())
    compressor = ThreadCompressor(CORES)
    blobs = [path.read_bytes() for path in images.files[:20]]
    n = len(blobs)
    compressed = [compress(blob, CompressParams(quality=QUALITY)) for blob in blobs]
    outputs = [image.data for image in compressed]
    metadata = [
        ShardRunner._metadata(image, len(blob))
        for image, blob in zip(compressed, blobs, strict=True)
    ]
    prefix = f"cost/{uuid.uuid4().hex[:8]}/"
    base = stack.near.urls[0]
    operations: dict[str, tuple[Callable[[int], object], int]] = {
        "download": (
            lambda i: fetcher.fetch(f"{base}/img/{images.files[i % n].name}"),
            in_flight,
        ),
        "upload": (
            lambda i: storage.put(
                stack.bucket, f"{prefix}{i}", outputs[i % n], "image/jpeg", metadata[i % n]
            ),
            in_flight,
        ),
        "stat": (lambda i: storage.stat(stack.bucket, f"{prefix}{i}"), in_flight),
        "compress()": (
            lambda i: compressor.compress(blobs[i % n], CompressParams(quality=QUALITY)),
            CORES,
        ),
    }
    costs = {}
    for name, (operation, threads) in operations.items():
        before = (own_cpu(), process_cpu(stack.minio_pid), stack.servers_cpu())
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(operation, range(samples)))
        after = (own_cpu(), process_cpu(stack.minio_pid), stack.servers_cpu())
        costs[name] = sum(b - a for a, b in zip(before, after, strict=True)) / samples * 1000
    fetcher.close()
    storage.close()
    return costs


# -- the suspects, each measured alone ------------------------------------------------


def suspects(images: ImageSet) -> dict[str, float]:
    """CPU microseconds per image of each cost the worker issue names, measured alone in
    this process with the worker's own code and one of this set's images."""
    import queue
    import threading

    from imagebatch_common.contract import ImageResult, ShardResult
    from imagebatch_common.storage import _S3Requests
    from imagebatch_worker.logs import JsonLog
    from imagebatch_worker.runner import ShardRunner

    body = images.files[0].read_bytes()
    encoded = compress(body, CompressParams(quality=QUALITY))
    settings = StorageSettings("127.0.0.1:9000", "key", "secret")
    signer = _S3Requests(settings, 5.0, 0)
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
    log = JsonLog(sink)
    result = ImageResult(
        "http://images.example/a.jpg", "ns/b/images/0.jpg", True, len(body), len(encoded.data)
    )
    to_worker: queue.Queue[object] = queue.Queue()
    back: queue.Queue[object] = queue.Queue()

    def echo() -> None:
        while (item := to_worker.get()) is not None:
            back.put(item)

    echoing = threading.Thread(target=echo)
    echoing.start()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    def hand_over() -> None:  # one image through a queue to another thread and back
        to_worker.put(body)
        back.get()

    pool = ThreadPoolExecutor(2)

    def future_round_trip() -> None:  # what the worker did before: a pool's future per image
        pool.submit(len, body).result()

    measures: dict[str, Callable[[], object]] = {
        "hand-over: queue to another thread and back": hand_over,
        "JSON log line": lambda: log.emit(
            "image", url=result.url, key=result.key, ok=True, bytes_in=result.input_bytes
        ),
        "SHA-256 of the payload (once per upload)": lambda: (
            __import__("hashlib").sha256(encoded.data).hexdigest()
        ),
        "signature: canonical request and HMACs": lambda: signer.signed_headers(
            "PUT", "/b/ns/b/images/0.jpg", "", {"content-type": "image/jpeg"}, "0" * 64, "r"
        ),
        "metadata dict of an output": lambda: ShardRunner._metadata(encoded, len(body)),
        "buffer copy: the body joined from its reads": lambda: b"".join(chunks),
        "result manifest: one image record": lambda: ShardResult("r", 0, (result,)).to_json(),
    }
    measures["hand-over before: a pool's future per image, there and back"] = future_round_trip
    costs = {}
    for name, measure in measures.items():
        rounds = 1000
        before = time.process_time()  # every thread's CPU: a hand-over costs both sides
        for _ in range(rounds):
            measure()
        costs[name] = (time.process_time() - before) / rounds * 1e6
    to_worker.put(None)
    echoing.join()
    pool.shutdown()
    sink.close()
    return costs


# -- the big PNGs ----------------------------------------------------------------------


def transparent_pngs(directory: Path, size: int = 7000) -> list[Path]:
    """Four PNGs of ``size`` x ``size`` with transparency; each decodes to 196 MB RGBA."""
    directory.mkdir(parents=True)
    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((size // 8, size // 8, size - size // 8, size // 2), "red")
    palette = Image.new("P", (size, size), 0)
    palette.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    ImageDraw.Draw(palette).rectangle((size // 4, size // 4, size // 2, size // 2), 1)
    grey = Image.new("L", (size, size), 0)
    ImageDraw.Draw(grey).ellipse((size // 3, size // 3, size // 2, size // 2), 180)
    rgb = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(rgb).rectangle((size // 2, size // 2, size - 10, size - 10), (20, 90, 200))
    images: list[tuple[str, Image.Image, dict[str, Any]]] = [
        ("rgba.png", rgba, {}),
        ("palette-trns.png", palette, {"transparency": 0}),
        ("grey-trns.png", grey, {"transparency": 0}),
        ("rgb-trns.png", rgb, {"transparency": (0, 0, 0)}),
    ]
    for name, image, options in images:
        image.save(directory / name, "PNG", **options)
    return sorted(directory.iterdir())


# -- the report ------------------------------------------------------------------------


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


def rate(images: ImageSet, run: Run) -> float:
    return images.count / run.seconds


def per_image_ms(images: ImageSet, seconds: float) -> float:
    return seconds / images.count * 1000


def io_ceiling(images: ImageSet, results: dict[str, Measurement], costs: dict[str, float]) -> float:
    """Images/s two cores reach when every image costs codec + download + upload CPU."""
    codec_ms = per_image_ms(images, results["ceiling"].best.total_cpu)
    return CORES * 1000 / (codec_ms + costs["download"] + costs["upload"])


def detail_table(images: ImageSet, results: dict[str, Measurement]) -> list[str]:
    ceiling = results["ceiling"].seconds
    lines = [
        f"#### {images.name}: {images.count} JPEGs, {images.input_bytes / images.count / 1024:.0f}"
        " KiB each on average",
        "",
        "| method | images/s | MP/s | vs codec ceiling | CPU ms/image (by process) "
        "| avg output KiB | note |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for measurement in results.values():
        best = measurement.best
        parts = " + ".join(
            f"{name} {per_image_ms(images, seconds):.2f}" for name, seconds in best.cpu.items()
        )
        total = per_image_ms(images, best.total_cpu)
        cpu = f"**{total:.2f}** = {parts}" if len(best.cpu) > 1 else f"{total:.2f} ({parts})"
        lines.append(
            f"| {measurement.label} | {rate(images, best):,.1f} "
            f"| {images.megapixels / best.seconds:,.1f} | {ceiling / best.seconds:.0%} "
            f"| {cpu if best.cpu else '-'} | {best.output_bytes / images.count / 1024:.0f} "
            f"| {measurement.note} |"
        )
    return lines


def stage_line(summary: Mapping[str, Any]) -> str:
    stages = summary.get("cpu_ms_per_image")
    if not stages:
        return "n/a"
    return ", ".join(f"{name} {ms:.2f}" for name, ms in stages.items() if ms)


def summary_table(
    sets: list[ImageSet],
    results: dict[str, dict[str, Measurement]],
    costs: dict[str, dict[str, float]],
    compare: bool,
) -> list[str]:
    header = "| | " + " | ".join(s.name for s in sets) + " |"
    lines = [header, "|---|" + "---:|" * len(sets)]

    def row(label: str, cell: Callable[[ImageSet], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in sets) + " |")

    def best(s: ImageSet, key: str) -> Run | None:
        found = results[s.name].get(key)
        return found.best if found and found.runs else None

    def img_s(key: str) -> Callable[[ImageSet], str]:
        def cell(s: ImageSet) -> str:
            run = best(s, key)
            return f"{rate(s, run):,.1f}" if run else "-"

        return cell

    row("**worker**, img/s", img_s("worker"))
    if compare:
        row("worker before (--compare), img/s", img_s("before"))
    row("codec ceiling (Pillow in memory, 2 processes), img/s", img_s("ceiling"))
    row(
        "I/O-inclusive ceiling, img/s",
        lambda s: f"{io_ceiling(s, results[s.name], costs[s.name]):,.1f}",
    )

    def ratio(
        numerator: str, denominator: Callable[[ImageSet], float]
    ) -> Callable[[ImageSet], str]:
        def cell(s: ImageSet) -> str:
            run = best(s, numerator)
            return f"**{rate(s, run) / denominator(s):.0%}**" if run else "-"

        return cell

    row(
        "worker / codec ceiling",
        ratio("worker", lambda s: rate(s, results[s.name]["ceiling"].best)),
    )
    row(
        f"worker / I/O-inclusive ceiling (target {IO_CEILING_TARGET:.0%})",
        ratio("worker", lambda s: io_ceiling(s, results[s.name], costs[s.name])),
    )
    if compare:
        row(
            "worker before / I/O-inclusive ceiling",
            ratio("before", lambda s: io_ceiling(s, results[s.name], costs[s.name])),
        )
    row("parallel mogrify, img/s", img_s("mogrify"))

    def versus_mogrify(s: ImageSet) -> str:
        worker, mogrify = best(s, "worker"), best(s, "mogrify")
        return f"**{mogrify.seconds / worker.seconds:.2f}x**" if worker and mogrify else "-"

    row("worker / mogrify (target above 1x)", versus_mogrify)

    def cpu_cell(key: str) -> Callable[[ImageSet], str]:
        def cell(s: ImageSet) -> str:
            run = best(s, key)
            if not run:
                return "-"
            parts = "+".join(f"{per_image_ms(s, v):.2f}" for v in run.cpu.values())
            return f"{per_image_ms(s, run.total_cpu):.2f} ({parts})"

        return cell

    def cpu_bound(key: str) -> Callable[[ImageSet], str]:
        def cell(s: ImageSet) -> str:
            run = best(s, key)
            return f"{CORES * s.count / run.total_cpu:,.1f}" if run else "-"

        return cell

    row("worker, CPU-bound rate (2 cores / its CPU per image), img/s", cpu_bound("worker"))
    row("CPU ms/image, worker run (worker+MinIO+image server)", cpu_cell("worker"))
    if compare:
        row("CPU ms/image, before (worker+MinIO+image server)", cpu_cell("before"))
    row(
        "CPU ms/image alone: codec + download + upload",
        lambda s: (
            f"{per_image_ms(s, results[s.name]['ceiling'].best.total_cpu):.2f} + "
            f"{costs[s.name]['download']:.2f} + {costs[s.name]['upload']:.2f}"
        ),
    )
    row(
        "worker process CPU ms/image by stage",
        lambda s: stage_line(best(s, "worker").summary) if best(s, "worker") else "-",  # type: ignore[union-attr]
    )

    def waits(s: ImageSet) -> str:
        run = best(s, "worker")
        waited = run.summary.get("compress_waited_ms") if run else None
        if not run or not waited:
            return "-"
        return " / ".join(f"{ms / s.count:.2f}" for ms in waited.values())

    row("compression waited for downloads / for uploads, wall ms per image", waits)

    def first_fetch(s: ImageSet) -> str:
        runs = results[s.name]["worker"].runs
        return f"{min(r.summary.get('cpu_ms_to_first_fetch') or 0 for r in runs):.0f}"

    row("worker CPU ms to first fetch", first_fetch)
    row("worker with maxDimension 1500 (JPEG draft), img/s", img_s("draft"))
    row("WebP q50: worker, img/s", img_s("webp"))
    row("WebP q50: codec ceiling, img/s", img_s("webp-ceiling"))
    row(
        "WebP q50: worker / codec ceiling",
        ratio("webp", lambda s: rate(s, results[s.name]["webp-ceiling"].best)),
    )
    return lines


def bench_set(
    images: ImageSet,
    rounds: int,
    pool: ProcessPoolExecutor,
    stack: Stack,
    scratch: Path,
    latency_ms: int,
    worker: str,
    before: str | None,
    extras: bool,
) -> dict[str, Measurement]:
    print(f"{images.name}: {images.count} images", flush=True)
    far = f"{latency_ms} ms server latency"
    methods: dict[str, tuple[Measurement, Callable[[], Run]]] = {
        "worker": (
            Measurement("**worker** (imagebatch-worker)", "HTTP fetch + compress + upload"),
            lambda: run_worker(worker, images.files, stack, stack.near),
        ),
        "ceiling": (
            Measurement("codec ceiling, 2 processes", "Pillow in memory, worker's options"),
            lambda: codec_in_processes(images, pool),
        ),
    }
    if before:
        methods["before"] = (
            Measurement("worker before (--compare)", "the build compared against"),
            lambda: run_worker(before, images.files, stack, stack.near),
        )
    if shutil.which("mogrify"):
        methods["mogrify"] = (
            Measurement("mogrify -quality 50, 2 processes", "local files in and out"),
            lambda: run_mogrify(images, scratch / f"mogrify-{images.name}"),
        )
    if not extras:
        methods["draft"] = (
            Measurement(
                "worker, maxDimension 1500",
                "libjpeg decodes at 1/2 scale (draft), then a resize to 1500x1125",
            ),
            lambda: run_worker(worker, images.files, stack, stack.near, max_dimension=1500),
        )
    if extras:
        methods |= {
            "processes": (
                Measurement(
                    "worker, compression in processes",
                    "IMAGEBATCH_COMPRESS_IN; the pool processes' CPU is not in the figure",
                ),
                lambda: run_worker(
                    worker, images.files, stack, stack.near, IMAGEBATCH_COMPRESS_IN="processes"
                ),
            ),
            "webp": (
                Measurement("worker, WebP q50", "format webp"),
                lambda: run_worker(worker, images.files, stack, stack.near, "webp"),
            ),
            "webp-ceiling": (
                Measurement("codec ceiling, WebP q50, 2 processes", "Pillow in memory"),
                lambda: codec_in_processes(images, pool, "webp"),
            ),
            "naive": (
                Measurement("naive loop: requests + Pillow + put_object", "sequential"),
                lambda: run_naive(images, stack, stack.near),
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
                Measurement(f"worker, {far}", "one image host across the internet"),
                lambda: run_worker(worker, images.files, stack, stack.far),
            ),
            "naive-far": (
                Measurement(f"naive loop, {far}", "sequential: every wait adds up"),
                lambda: run_naive(images, stack, stack.far),
            ),
        }
    run_worker(worker, images.files, stack, stack.near)  # warm the page cache and MinIO
    for round_number in range(1, rounds + 1):
        for measurement, work in methods.values():
            run = work()
            measurement.runs.append(run)
            print(f"  round {round_number}: {measurement.label}: {run.seconds:.2f}s", flush=True)
    return {name: measurement for name, (measurement, _) in methods.items()}


def bench_hosts(
    images: ImageSet, rounds: int, stack: Stack, worker: str, before: str | None
) -> dict[str, Measurement]:
    """The same images from one host and from HOSTS hosts, all with the latency."""
    methods: dict[str, Callable[[str], Run]] = {
        "one host": lambda script: run_worker(script, images.files, stack, stack.far),
        f"{HOSTS} hosts": lambda script: run_worker(script, images.files, stack, stack.hosts),
    }
    results: dict[str, Measurement] = {}
    scripts = {"": worker} | ({" (before)": before} if before else {})
    for _ in range(rounds):
        for label, work in methods.items():
            for suffix, script in scripts.items():
                name = label + suffix
                results.setdefault(name, Measurement(name, "")).runs.append(work(script))
                print(f"  {name}: {results[name].runs[-1].seconds:.2f}s", flush=True)
    return results


def bench_memory(
    files: list[Path], stack: Stack, worker: str, before: str | None
) -> dict[str, Run]:
    runs = {
        "no memory limit": run_worker(worker, files, stack, stack.big),
        "IMAGEBATCH_MEMORY_LIMIT=1 GiB": run_worker(
            worker, files, stack, stack.big, IMAGEBATCH_MEMORY_LIMIT=str(MEMORY_LIMIT)
        ),
    }
    if before:
        runs["before (--compare), no budget"] = run_worker(before, files, stack, stack.big)
    for name, run in runs.items():
        print(f"  memory: {name}: peak {run.peak_rss / MIB:.0f} MiB", flush=True)
    return runs


@dataclass
class Profiles:
    after: dict[str, profile.Profile] = field(default_factory=dict)
    before: dict[str, profile.Profile] = field(default_factory=dict)


def record_profiles(
    sets: list[ImageSet],
    stack: Stack,
    scripts: dict[str, str],
    out_dir: Path,
    source_roots: dict[str, list[Path]],
) -> Profiles:
    profiles = Profiles()
    for images in sets:
        for which, script in scripts.items():
            prefix = f"profile/{uuid.uuid4().hex[:8]}/"
            urls = [f"{stack.near.urls[0]}/img/{p.name}" for p in images.files]
            write_manifest(stack.client, stack.bucket, prefix, urls)
            raw = out_dir / f"profile-{which}-{images.name}.txt"
            finished = profile.record(script, ["--shard", "0"], worker_env(stack, prefix), raw)
            if finished.returncode != 0:
                raise SystemExit(f"profiled worker exited {finished.returncode}")
            loaded = profile.load(raw, source_roots[which])
            getattr(profiles, which)[images.name] = loaded
            svg = out_dir / f"flame-worker-{which}-{images.name}.svg"
            svg.write_text(
                profile.flamegraph_svg(
                    loaded, f"worker ({which}), {images.name}: CPU time by Python stack"
                )
            )
            print(f"  profile {which} {images.name}: {loaded.seconds:.2f} s CPU", flush=True)
    return profiles


def profile_table(sets: list[ImageSet], profiles: Profiles) -> list[str]:
    columns = [(images, which) for images in sets for which in ("before", "after")]
    columns = [(i, w) for i, w in columns if i.name in getattr(profiles, w)]
    lines = [
        "| cost | " + " | ".join(f"{i.name} {w}" for i, w in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    counted = {(i.name, w): profile.categorize(getattr(profiles, w)[i.name]) for i, w in columns}
    names = list(next(iter(counted.values())).keys()) if counted else []
    for name in names:
        cells = []
        for images, which in columns:
            loaded = getattr(profiles, which)[images.name]
            weight = counted[(images.name, which)][name]
            ms = weight * loaded.unit / images.count * 1000
            cells.append(f"{ms:.3f} ({weight / max(loaded.samples, 1):.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = []
    for images, which in columns:
        loaded = getattr(profiles, which)[images.name]
        totals.append(f"**{loaded.seconds / images.count * 1000:.3f}**")
    lines.append("| the worker process's CPU, ms/image | " + " | ".join(totals) + " |")
    return lines


def source_roots_for(script: str) -> list[Path]:
    """Where the modules a worker script imports live, to read its profile's lines."""
    venv = Path(script).resolve().parent.parent
    roots = [venv.parent / "worker", venv.parent / "common"]
    roots += sorted(venv.glob("lib/python3*/site-packages"))
    roots.append(Path(os.__file__).parent)
    return roots


@contextmanager
def load_average() -> Iterator[list[str]]:
    readings = [" ".join(Path("/proc/loadavg").read_text().split()[:3])]
    yield readings
    readings.append(" ".join(Path("/proc/loadavg").read_text().split()[:3]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the ImageBatch worker.")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-worker.md"))
    parser.add_argument("--large", type=int, default=120, help="how many 1920x1080 images")
    parser.add_argument("--small", type=int, default=500, help="how many 640x480 images")
    parser.add_argument("--huge", type=int, default=16, help="how many 4000x3000 images")
    parser.add_argument("--rounds", type=int, default=3, help="runs per method; best is kept")
    parser.add_argument("--latency-ms", type=int, default=20, help="far servers' latency")
    parser.add_argument(
        "--compare", help="another worker console script to measure beside this one (before)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    args = parser.parse_args(argv)

    worker = default_worker()
    before = args.compare
    info = machine()
    print(f"machine: {info}", flush=True)
    with load_average() as load, tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        sets = [
            generate("1920x1080", 1920, 1080, args.large, scratch / "images"),
            generate("640x480", 640, 480, args.small, scratch / "images"),
            generate("4000x3000", 4000, 3000, args.huge, scratch / "images"),
        ]
        big = transparent_pngs(scratch / "big")
        big_sizes = [path.stat().st_size for path in big]
        print(f"generated images in {time.perf_counter() - started:.0f}s", flush=True)
        serve = scratch / "serve"
        serve.mkdir()
        for image_set in sets:
            for path in image_set.files:
                os.link(path, serve / path.name)

        context: Any = get_context("spawn")
        latency = args.latency_ms / 1000
        with ExitStack() as stack_of:
            cluster = stack_of.enter_context(LocalCluster(kubernetes=False))
            near = stack_of.enter_context(file_servers_process(serve))
            far = stack_of.enter_context(file_servers_process(serve, latency))
            hosts = stack_of.enter_context(file_servers_process(serve, latency, HOSTS))
            big_server = stack_of.enter_context(file_servers_process(scratch / "big"))
            pool = stack_of.enter_context(ProcessPoolExecutor(CORES, mp_context=context))
            assert cluster.minio is not None
            minio = cluster.minio
            minio_pid = next(p.pid for name, p in cluster.processes if name == "minio")
            stack = Stack(minio, minio_pid, minio.client(), "bench", near, far, hosts, big_server)
            stack.client.make_bucket(stack.bucket)
            for future in [pool.submit(_warm) for _ in range(CORES)]:
                future.result()
            results = {
                image_set.name: bench_set(
                    image_set,
                    args.rounds,
                    pool,
                    stack,
                    scratch,
                    args.latency_ms,
                    worker,
                    before,
                    extras=image_set.name != "4000x3000",
                )
                for image_set in sets
            }
            costs = {s.name: per_image_costs(s, stack, 60 if s.width > 2000 else 200) for s in sets}
            measured_alone = {s.name: suspects(s) for s in sets[:2]}
            print("hosts", flush=True)
            hosts_results = bench_hosts(sets[1], args.rounds, stack, worker, before)
            print("memory", flush=True)
            memory = bench_memory(big, stack, worker, before)
            start_up = {"after": start_up_cpu(worker, stack)}
            if before:
                start_up["before"] = start_up_cpu(before, stack)
            profiles = Profiles()
            if not args.no_profile:
                scripts = {"after": worker} | ({"before": before} if before else {})
                roots = {which: source_roots_for(script) for which, script in scripts.items()}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                profiles = record_profiles(sets[:2], stack, scripts, args.out.parent, roots)

    report = render(
        args,
        info,
        load,
        sets,
        results,
        costs,
        hosts_results,
        memory,
        start_up,
        profiles,
        big_sizes,
        measured_alone,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def render(
    args: argparse.Namespace,
    info: dict[str, str],
    load: list[str],
    sets: list[ImageSet],
    results: dict[str, dict[str, Measurement]],
    costs: dict[str, dict[str, float]],
    hosts: dict[str, Measurement],
    memory: dict[str, Run],
    start_up: dict[str, float],
    profiles: Profiles,
    big: list[int],
    measured_alone: dict[str, dict[str, float]],
) -> str:
    compare = bool(args.compare)
    lines = [
        "# Worker benchmark",
        "",
        "Generated by `python -m tests.bench.bench_worker`. Photograph-like JPEGs (gradients, "
        "grain, edges; quality 90) are served over HTTP on 127.0.0.1 by a separate process; "
        "outputs go to a local MinIO. All of it shares the same two cores. Methods ran "
        f"interleaved, {args.rounds} rounds; each figure is the method's best run. JPEG "
        f"quality {QUALITY}. A worker's images/s count from manifest read to result written "
        "(its own summary line). CPU is per process: the worker (wait4), MinIO and the image "
        "servers (/proc), the codec processes and mogrify themselves.",
        "",
        "The I/O-inclusive ceiling is 2 cores / (codec CPU + download CPU + upload CPU) per "
        "image: the codec's CPU from the codec-ceiling run, the download and upload each "
        "measured alone through the worker's own clients, server CPU included.",
        "",
        "## Machine",
        "",
        *[f"- {name}: {value}" for name, value in info.items()],
        f"- load average before / after: {load[0]} / {load[-1]}",
        "",
        "## Summary",
        "",
        *summary_table(sets, results, costs, compare),
        "",
        f"Start-up: a worker process that finds no manifest costs "
        f"{start_up['after'] * 1000:.0f} ms of CPU"
        + (f" (before: {start_up['before'] * 1000:.0f} ms)" if "before" in start_up else "")
        + "; the CPU to the first fetch, from the worker's own summary, is in the table.",
        "",
        "## Every method",
        "",
    ]
    for image_set in sets:
        lines += [*detail_table(image_set, results[image_set.name]), ""]
    lines += [
        "## What one image costs besides the codec",
        "",
        "CPU milliseconds per operation, each measured alone through the worker's own "
        "fetcher and storage client, as many at once as the worker runs them, uploads with "
        "the worker's user metadata (client process + the server that answered).",
        "",
        "| operation | " + " | ".join(s.name for s in sets) + " |",
        "|---|" + "---:|" * len(sets),
    ]
    for operation in costs[sets[0].name]:
        lines.append(
            f"| {operation} | " + " | ".join(f"{costs[s.name][operation]:.2f}" for s in sets) + " |"
        )
    lines += [
        "",
        "### The costs the worker issue names, each measured alone",
        "",
        "CPU microseconds per image, the worker's own code in a loop in the benchmark "
        "process (all its threads), on one image of each size: what each suspect can cost "
        "at most, beside the profile below, which shows what it cost in a shard. The "
        "payload's SHA-256 is computed once per upload (over https none: the payload is "
        "sent as UNSIGNED-PAYLOAD under TLS); the SDK before computed it once over http "
        "and an MD5 over https.",
        "",
        "| cost | " + " | ".join(measured_alone) + " |",
        "|---|" + "---:|" * len(measured_alone),
    ]
    for name in next(iter(measured_alone.values())):
        lines.append(
            f"| {name} | "
            + " | ".join(f"{costs_[name]:.1f}" for costs_ in measured_alone.values())
            + " |"
        )
    small = sets[1]
    lines += [
        "",
        f"## {HOSTS} image hosts, {args.latency_ms} ms latency each ({small.name})",
        "",
        "The same images spread round-robin over one host or "
        f"{HOSTS} (one port each): whether connection reuse per host matters.",
        "",
        "| method | images/s | CPU ms/image (worker+MinIO+servers) |",
        "|---|---:|---:|",
    ]
    for measurement in hosts.values():
        best = measurement.best
        lines.append(
            f"| {measurement.label} | {rate(small, best):,.1f} "
            f"| {per_image_ms(small, best.total_cpu):.2f} |"
        )
    lines += [
        "",
        f"## Memory: {len(big)} PNGs of 7000x7000 with transparency in one shard",
        "",
        f"Files of {', '.join(f'{size // 1024} KiB' for size in big)}; each "
        "decodes to 49 million pixels. Peak RSS of the worker process (wait4).",
        "",
        "| run | peak RSS MiB | seconds | images waited for memory | peak reserved MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in memory.items():
        lines.append(
            f"| {name} | **{run.peak_rss / MIB:,.0f}** | {run.seconds:.1f} "
            f"| {run.summary.get('images_waited_for_memory', '-')} "
            f"| {run.summary.get('memory_peak_reserved_mib', '-')} |"
        )
    if not profiles.after:
        lines += ["", "Profiles were not recorded (--no-profile)."]
    if profiles.after:
        lines += [
            "",
            "## Where the worker's CPU goes",
            "",
            "One shard per size under tests/bench/cpu_sampler.py: every millisecond each "
            "thread's CPU clock is read and the CPU it used since is charged to the Python "
            "stack it is in (time in C, the codec or a socket call, to the frame that called "
            "it). A short burst followed by a wait is charged at the wait, in the same thread "
            "and stage: the hand-over row holds the queue operations and what ran just before "
            "them. Each stack is counted once, under the first matching cost "
            "(tests/bench/profile.py), in CPU ms per image and share of the process; the "
            "worker's own per-stage CPU clocks (the summary table) are exact. py-spy's "
            "`--gil` mode was tried first: when no thread holds the GIL it charges the thread "
            "that held it last, which put half of a shard on lines that take microseconds.",
            "",
            *profile_table(sets[:2], profiles),
            "",
            "Flame graphs: "
            + ", ".join(
                f"[{which} {name}](flame-worker-{which}-{name}.svg)"
                for which, found in (("before", profiles.before), ("after", profiles.after))
                for name in found
            ),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
