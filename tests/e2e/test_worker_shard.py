"""Whole shard runs against a real MinIO and a real HTTP server on 127.0.0.1.

A shard mixes good images with every kind of bad one; the run must store the good
ones, record each failure with its stage and reason, log one JSON line per image
without query strings, and exit 0. Then the exit-code contract: storage down is
EXIT_RETRY, a missing or malformed manifest EXIT_PERMANENT; checked both in-process
and through the ``imagebatch-worker`` console script the Job runs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from imagebatch_common.contract import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRY,
    Compression,
    ShardImage,
    ShardManifest,
    ShardResult,
    image_key,
    shard_manifest_key,
)
from imagebatch_common.envread import parse_networks
from imagebatch_common.storage import Storage
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_worker.logs import JsonLog
from imagebatch_worker.runner import ShardLocation, ShardRunner
from imagebatch_worker.settings import WorkerSettings
from tests.bench.images import photo, photo_jpeg
from tests.bench.local_http import LocalHTTPServer
from tests.cluster.stack import MinioServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PREFIX = "shop/spring-catalog/"
SECRET = "X-Amz-Signature=deadbeefsecret"


def png_with_alpha() -> bytes:
    image = Image.new("RGBA", (300, 200), (0, 128, 255, 0))
    image.paste((0, 128, 255, 255), (0, 0, 150, 200))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (120, 80), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return out.getvalue()


FILES = {
    "photo.jpg": photo_jpeg(800, 600, seed=21),
    "alpha.png": png_with_alpha(),
    "animated.jpg": animated_gif(),  # a GIF behind a .jpg name: sniffed, not trusted
    "not-really.jpg": b"<!doctype html><title>Soft 404</title>",
    "webp-photo.webp": b"",  # filled below
}
_webp = io.BytesIO()
photo(400, 300, seed=22).save(_webp, "WEBP", quality=90)
FILES["webp-photo.webp"] = _webp.getvalue()


def fast_settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "allow_nets": parse_networks("127.0.0.1/32"),
        "connect_timeout": 1.0,
        "read_timeout": 0.5,
        "image_timeout": 4.0,
        "retries": 1,
        "retry_backoff": 0.05,
        "max_image_bytes": 2 * 1024 * 1024,
        "concurrency": 6,
        "compress_workers": 2,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def storage_for(minio: MinioServer) -> Storage:
    return Storage(StorageSettings(minio.endpoint, minio.access_key, minio.secret_key))


@pytest.fixture
def storage(minio_server: MinioServer) -> Storage:
    return storage_for(minio_server)


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer(FILES, stall_seconds=10) as running:
        yield running


def write_manifest(
    storage: Storage,
    bucket: str,
    urls: list[str],
    compression: Compression | None = None,
    run: str = "run-1",
    index: int = 0,
    stored: bool | None = None,
) -> ShardLocation:
    compression = compression or Compression()
    images = tuple(ShardImage(url, image_key(PREFIX, url, compression), stored) for url in urls)
    manifest = ShardManifest(run, index, bucket, PREFIX, compression, images)
    storage.put(
        bucket, shard_manifest_key(PREFIX, run, index), manifest.to_json(), "application/json"
    )
    return ShardLocation(bucket, PREFIX, run, index)


def read_result(storage: Storage, location: ShardLocation) -> ShardResult:
    return ShardResult.from_json(storage.get(location.bucket, location.result_key))


def run_shard(
    storage: Storage, location: ShardLocation, settings: WorkerSettings | None = None
) -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    code = ShardRunner(settings or fast_settings(), storage, log=JsonLog(out)).run(location)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


@dataclass(frozen=True)
class Outcome:
    ok: bool
    stage: str = ""
    reason: str = ""  # the first word of ``error``
    format: str = ""
    size: tuple[int, int] = (0, 0)


def expected_outcomes(server: LocalHTTPServer) -> dict[str, Outcome]:
    return {
        server.image_url("photo.jpg") + f"?{SECRET}": Outcome(True, format="jpeg", size=(800, 600)),
        server.image_url("alpha.png"): Outcome(True, format="jpeg", size=(300, 200)),
        server.image_url("animated.jpg"): Outcome(True, format="jpeg", size=(120, 80)),
        server.image_url("webp-photo.webp"): Outcome(True, format="jpeg", size=(400, 300)),
        server.url("status/404"): Outcome(False, "fetch", "http-status"),
        server.url("drop"): Outcome(False, "fetch", "connection-failed"),
        server.url("slow"): Outcome(False, "fetch", "timeout"),
        server.url("huge"): Outcome(False, "fetch", "too-large"),
        server.url("loop/0"): Outcome(False, "fetch", "too-many-redirects"),
        server.image_url("not-really.jpg"): Outcome(False, "decode", "not-an-image"),
        "http://10.0.0.1/never-contacted.jpg": Outcome(False, "fetch", "address-blocked"),
        "ftp://127.0.0.1/a.jpg": Outcome(False, "fetch", "url-invalid"),
    }


def test_shard_stores_good_images_and_records_every_failure(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    expected = expected_outcomes(server)
    urls = [*expected, next(iter(expected))]  # the first URL twice: one key, one fetch
    location = write_manifest(storage, bucket, urls)

    started = time.monotonic()
    code, logs = run_shard(storage, location)
    elapsed = time.monotonic() - started

    assert code == EXIT_OK
    assert elapsed < 30
    result = read_result(storage, location)
    assert [image.url for image in result.images] == urls  # manifest order, one per row
    for image in result.images:
        want = expected[image.url]
        assert image.ok == want.ok, image
        if want.ok:
            stored = storage.get(bucket, image.key)
            decoded = Image.open(io.BytesIO(stored))
            assert (decoded.format, decoded.size) == ("JPEG", want.size)
            assert (image.width, image.height) == want.size
            assert image.format == want.format
            assert image.output_bytes == len(stored)
            assert image.input_bytes > 0
            assert image.stage == image.error == ""
        else:
            assert image.stage == want.stage, image
            assert image.error.startswith(f"{want.reason}: "), image
            assert not storage.exists(bucket, image.key)
    assert result.images[0] == result.images[-1]
    assert server.count("/img/photo.jpg") == 1
    assert server.count("/drop") == 2  # retried once

    image_lines = [line for line in logs if line["event"] == "image"]
    assert len(image_lines) == len(expected)
    for line in image_lines:
        assert {"url", "key", "ok", "stage", "reason", "bytes_in", "bytes_out", "ms"} <= set(line)
        assert line["ok"] == (line["reason"] is None)
    assert all("?" not in line["url"] for line in image_lines)
    summary = [line for line in logs if line["event"] == "shard"]
    assert len(summary) == 1
    assert summary[0]["ok"] == 5 and summary[0]["failed"] == 8 and summary[0]["exit"] == 0
    all_output = json.dumps(logs)
    assert "deadbeefsecret" not in all_output
    assert storage.settings.secret_key not in all_output


def test_retried_shard_skips_stored_images_and_overwrites_its_result(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    urls = [server.image_url("photo.jpg"), server.image_url("alpha.png"), server.url("status/404")]
    location = write_manifest(storage, bucket, urls)
    assert run_shard(storage, location)[0] == EXIT_OK
    first = read_result(storage, location)

    code, _ = run_shard(storage, location)

    assert code == EXIT_OK
    second = read_result(storage, location)
    assert [image.skipped for image in second.images] == [True, True, False]
    for before, after in zip(first.images[:2], second.images[:2], strict=True):
        assert after.ok and after.skipped
        # Sizes and dimensions come back from the stored object's metadata.
        assert (after.key, after.output_bytes, after.input_bytes, after.width, after.height) == (
            before.key,
            before.output_bytes,
            before.input_bytes,
            before.width,
            before.height,
        )
    assert server.count("/img/photo.jpg") == 1  # not downloaded again
    assert server.count("/status/404") == 2  # failures are tried again
    assert sorted(storage.list_keys(bucket, f"{PREFIX}images/")) == sorted(
        image.key for image in first.images[:2]
    )
    assert list(storage.list_keys(bucket, f"{PREFIX}.runs/run-1/results/")) == [location.result_key]


def test_first_attempt_trusts_the_plan_and_a_retry_checks_storage(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    urls = [server.image_url("photo.jpg")]
    # The output is already stored, but the plan says it is not: a first attempt trusts
    # the plan and does not look (so it produces the image again, the same bytes).
    done = write_manifest(storage, bucket, urls, run="earlier")
    assert run_shard(storage, done)[0] == EXIT_OK
    location = write_manifest(storage, bucket, urls, run="planned", stored=False)
    assert run_shard(storage, location)[0] == EXIT_OK
    first = read_result(storage, location)
    assert [image.skipped for image in first.images] == [False]
    assert server.count("/img/photo.jpg") == 2
    # The same shard again is a retry (its attempt marker is there): it checks storage.
    assert run_shard(storage, location)[0] == EXIT_OK
    assert [image.skipped for image in read_result(storage, location).images] == [True]
    assert server.count("/img/photo.jpg") == 2
    assert list(storage.list_keys(bucket, f"{PREFIX}.runs/planned/attempts/")) == [
        f"{PREFIX}.runs/planned/attempts/0"
    ]


def test_an_image_the_plan_says_is_stored_is_checked_and_skipped(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    urls = [server.image_url("photo.jpg")]
    assert run_shard(storage, write_manifest(storage, bucket, urls, run="earlier"))[0] == EXIT_OK
    location = write_manifest(storage, bucket, urls, run="again", stored=True)
    assert run_shard(storage, location)[0] == EXIT_OK
    assert [image.skipped for image in read_result(storage, location).images] == [True]
    assert server.count("/img/photo.jpg") == 1


def test_original_format_keys_carry_the_sniffed_extension(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    compression = Compression(quality=60, format="original")
    urls = [
        server.image_url("photo.jpg"),
        server.image_url("alpha.png"),
        server.image_url("animated.jpg"),
        server.image_url("webp-photo.webp"),
    ]
    location = write_manifest(storage, bucket, urls, compression)

    assert run_shard(storage, location)[0] == EXIT_OK
    result = read_result(storage, location)
    assert [image.key.rsplit(".", 1)[1] for image in result.images] == ["jpg", "png", "gif", "webp"]
    assert [image.format for image in result.images] == ["jpeg", "png", "gif", "webp"]
    for image in result.images:
        assert image.key.startswith(image_key(PREFIX, image.url, compression) + ".")
        assert storage.exists(bucket, image.key)

    # The retry finds each output by listing, although the key's extension is not known.
    assert run_shard(storage, location)[0] == EXIT_OK
    again = read_result(storage, location)
    assert all(image.skipped for image in again.images)
    assert [image.key for image in again.images] == [image.key for image in result.images]


def test_webp_with_max_dimension(storage: Storage, bucket: str, server: LocalHTTPServer) -> None:
    compression = Compression(quality=50, format="webp", max_dimension=200)
    location = write_manifest(storage, bucket, [server.image_url("photo.jpg")], compression)

    assert run_shard(storage, location)[0] == EXIT_OK
    (image,) = read_result(storage, location).images
    decoded = Image.open(io.BytesIO(storage.get(bucket, image.key)))
    assert image.key.endswith(".webp")
    assert (decoded.format, decoded.size, image.width, image.height) == (
        "WEBP",
        (200, 150),
        200,
        150,
    )


# -- the exit-code contract ---------------------------------------------------


def test_missing_manifest_is_permanent(storage: Storage, bucket: str) -> None:
    code, logs = run_shard(storage, ShardLocation(bucket, PREFIX, "run-1", 7))

    assert code == EXIT_PERMANENT
    assert logs[-1]["event"] == "shard_failed"
    assert logs[-1]["reason"] == "manifest-missing"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"version": 99}', b'{"version": 1, "run": "run-1"}', b"[]"],
    ids=["not-json", "unknown-version", "fields-missing", "not-an-object"],
)
def test_malformed_manifest_is_permanent(storage: Storage, bucket: str, body: bytes) -> None:
    location = ShardLocation(bucket, PREFIX, "run-1", 0)
    storage.put(bucket, location.manifest_key, body, "application/json")

    code, logs = run_shard(storage, location)

    assert code == EXIT_PERMANENT
    assert logs[-1]["reason"] == "manifest-malformed"


@pytest.mark.parametrize(
    ("compression", "words"),
    [
        ({"quality": 0, "format": "jpeg", "max_dimension": None}, "quality 0"),
        ({"quality": 50, "format": "heic", "max_dimension": None}, "format 'heic'"),
        ({"quality": 50, "format": "jpeg", "max_dimension": -5}, "maxDimension -5"),
        ({"quality": "high", "format": "jpeg", "max_dimension": None}, "quality 'high'"),
    ],
    ids=["quality-zero", "unknown-format", "negative-dimension", "quality-not-a-number"],
)
def test_impossible_compression_is_permanent(
    storage: Storage, bucket: str, compression: dict[str, Any], words: str
) -> None:
    location = ShardLocation(bucket, PREFIX, "run-1", 0)
    manifest = {
        "version": 1,
        "run": "run-1",
        "index": 0,
        "bucket": bucket,
        "prefix": PREFIX,
        "compression": compression,
        "images": [],
    }
    storage.put(bucket, location.manifest_key, json.dumps(manifest).encode(), "application/json")

    code, logs = run_shard(storage, location)

    assert code == EXIT_PERMANENT
    assert logs[-1]["reason"] == "manifest-malformed"
    assert words in logs[-1]["error"]


def test_manifest_of_another_shard_is_permanent(storage: Storage, bucket: str) -> None:
    location = write_manifest(storage, bucket, [], index=3)
    storage.put(
        bucket,
        shard_manifest_key(PREFIX, "run-1", 4),
        storage.get(bucket, location.manifest_key),
        "application/json",
    )

    code, logs = run_shard(storage, ShardLocation(bucket, PREFIX, "run-1", 4))

    assert code == EXIT_PERMANENT
    assert logs[-1]["reason"] == "manifest-mismatch"


def test_empty_shard_finishes(storage: Storage, bucket: str) -> None:
    location = write_manifest(storage, bucket, [])

    assert run_shard(storage, location)[0] == EXIT_OK
    assert read_result(storage, location).images == ()


def test_storage_down_means_retry() -> None:
    down = Storage(StorageSettings(f"127.0.0.1:{free_port()}", "nobody", "nothing"), retries=0)

    code, logs = run_shard(down, ShardLocation("images", PREFIX, "run-1", 0))

    assert code == EXIT_RETRY
    assert logs[-1]["reason"] == "storage-unavailable"
    assert "nothing" not in json.dumps(logs)


def test_missing_output_bucket_is_permanent(
    storage: Storage, bucket: str, server: LocalHTTPServer
) -> None:
    location = write_manifest(storage, bucket, [server.image_url("photo.jpg")])
    manifest = ShardManifest.from_json(storage.get(bucket, location.manifest_key))
    elsewhere = ShardManifest(
        manifest.run,
        manifest.index,
        "no-such-bucket-here",
        PREFIX,
        manifest.compression,
        manifest.images,
    )
    storage.put(bucket, location.manifest_key, elsewhere.to_json(), "application/json")

    code, logs = run_shard(storage, location)

    assert code == EXIT_PERMANENT
    assert logs[-1]["reason"] == "storage-missing"


# -- through the console script, as the Job runs it ---------------------------


def worker_command() -> list[str]:
    script = shutil.which("imagebatch-worker", path=str(Path(sys.executable).parent))
    assert script is not None, "the imagebatch-worker console script is not installed"
    return [script]


def worker_env(minio: MinioServer, bucket: str, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "MINIO_ENDPOINT": minio.endpoint,
        "MINIO_ACCESS_KEY": minio.access_key,
        "MINIO_SECRET_KEY": minio.secret_key,
        "IMAGEBATCH_BUCKET": bucket,
        "IMAGEBATCH_PREFIX": PREFIX,
        "IMAGEBATCH_RUN": "run-1",
        "IMAGEBATCH_ALLOW_NETS": "127.0.0.1/32",
        "IMAGEBATCH_READ_TIMEOUT": "1",
        "IMAGEBATCH_RETRIES": "0",
        "JOB_COMPLETION_INDEX": "0",
    }
    env.update(extra)
    return env


def run_console_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*worker_command(), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_console_script_finishes_a_shard(
    storage: Storage, minio_server: MinioServer, bucket: str, server: LocalHTTPServer
) -> None:
    urls = [server.image_url("photo.jpg"), server.url("status/404")]
    location = write_manifest(storage, bucket, urls, index=2)

    finished = run_console_script(worker_env(minio_server, bucket), "--shard", "2")

    assert finished.returncode == EXIT_OK, finished.stdout + finished.stderr
    result = read_result(storage, location)
    assert [image.ok for image in result.images] == [True, False]
    lines = [json.loads(line) for line in finished.stdout.splitlines()]
    assert [line["event"] for line in lines].count("image") == 2
    assert lines[-1]["event"] == "shard"
    assert minio_server.secret_key not in finished.stdout + finished.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"JOB_COMPLETION_INDEX": "5"}, EXIT_PERMANENT),  # no manifest for index 5
        ({"MINIO_ENDPOINT": "127.0.0.1:{closed}"}, EXIT_RETRY),
        ({"MINIO_SECRET_KEY": ""}, EXIT_PERMANENT),  # configuration the pod cannot fix
        ({"MINIO_ENDPOINT": "http://127.0.0.1:9000"}, EXIT_PERMANENT),  # not host:port
        ({"IMAGEBATCH_MAX_PIXELS": "many"}, EXIT_PERMANENT),
        ({"JOB_COMPLETION_INDEX": ""}, EXIT_PERMANENT),
    ],
    ids=[
        "missing-manifest",
        "storage-down",
        "no-credentials",
        "endpoint-with-scheme",
        "bad-limit",
        "no-index",
    ],
)
def test_console_script_exit_codes(
    minio_server: MinioServer, bucket: str, change: dict[str, str], expected: int
) -> None:
    env = worker_env(minio_server, bucket)
    env.update({name: value.format(closed=free_port()) for name, value in change.items()})

    finished = run_console_script(env)

    assert finished.returncode == expected, finished.stdout + finished.stderr
    last = json.loads(finished.stdout.splitlines()[-1])
    assert (last["event"], last["exit"]) == ("shard_failed", expected)
    assert minio_server.secret_key not in finished.stdout + finished.stderr


# -- memory: large images under the pod's limit ----------------------------------------


def transparent_pngs(size: int = 7000) -> dict[str, bytes]:
    """Four PNGs of ``size`` x ``size`` with transparency, a few hundred KB each.

    Each decodes to 49 million pixels: 196 MB as RGBA before any conversion.
    """

    def png(image: Image.Image, **options: Any) -> bytes:
        out = io.BytesIO()
        image.save(out, "PNG", **options)
        return out.getvalue()

    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((size // 8, size // 8, size - size // 8, size // 2), "red")
    palette = Image.new("P", (size, size), 0)
    palette.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    ImageDraw.Draw(palette).rectangle((size // 4, size // 4, size // 2, size // 2), 1)
    grey = Image.new("L", (size, size), 0)
    ImageDraw.Draw(grey).ellipse((size // 3, size // 3, size // 2, size // 2), 180)
    rgb = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(rgb).rectangle((size // 2, size // 2, size - 10, size - 10), (20, 90, 200))
    return {
        "rgba.png": png(rgba),
        "palette-trns.png": png(palette, transparency=0),
        "grey-trns.png": png(grey, transparency=0),
        "rgb-trns.png": png(rgb, transparency=(0, 0, 0)),
    }


def test_large_images_stay_within_the_memory_limit(
    storage: Storage, minio_server: MinioServer, bucket: str
) -> None:
    limit = 1024**3
    files = transparent_pngs()
    with LocalHTTPServer(files) as big:
        urls = [big.image_url(name) for name in files]
        write_manifest(storage, bucket, urls, stored=False)
        env = worker_env(
            minio_server,
            bucket,
            IMAGEBATCH_MEMORY_LIMIT=str(limit),
            IMAGEBATCH_COMPRESS_WORKERS="2",
            IMAGEBATCH_READ_TIMEOUT="30",
        )
        with tempfile.TemporaryFile("w+") as out:
            process = subprocess.Popen(worker_command(), env=env, stdout=out)
            _pid, status, usage = os.wait4(process.pid, 0)  # the worker's own rusage
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            stdout = out.read()

    assert process.returncode == EXIT_OK, stdout
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["ok"] == 4, stdout
    assert summary["memory_limit_mib"] == 1024
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    assert peak < limit, f"peak RSS {peak / 1024**2:.0f} MiB; {summary}"
    assert summary["peak_rss_mib"] <= peak / 1024**2 + 1  # the worker's own view agrees
