"""The shard runner's decisions that need a misbehaving store to show.

MinIO cannot be told to fail half-way through a shard, so these cases run the
runner against an in-memory store that fails on cue; images come from an HTTP server
on 127.0.0.1. The behaviour against real MinIO is in tests/e2e/test_worker_shard.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from PIL import Image, ImageDraw

from imagebatch_common.contract import (
    EXIT_OK,
    EXIT_RETRY,
    Compression,
    ShardImage,
    ShardManifest,
    ShardResult,
    image_key,
)
from imagebatch_common.envread import parse_networks
from imagebatch_common.storage import (
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageUnavailable,
)
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_worker import formats
from imagebatch_worker.logs import JsonLog
from imagebatch_worker.runner import ShardLocation, ShardRunner
from imagebatch_worker.settings import WorkerSettings
from tests.bench.images import photo_jpeg
from tests.bench.local_http import LocalHTTPServer

pytestmark = pytest.mark.timeout(60)  # real sockets and processes: never hang

PREFIX = "ns/batch/"


class MemoryStorage(Storage):
    """Objects in a dict; ``fail_puts_after`` image puts succeed, then MinIO "goes away"."""

    def __init__(self, fail_puts_after: int | None = None) -> None:
        super().__init__(StorageSettings("127.0.0.1:1", "unused", "unused"))
        self.objects: dict[tuple[str, str], tuple[bytes, dict[str, str]]] = {}
        self.fail_puts_after = fail_puts_after
        self.image_puts = 0
        self._lock = threading.Lock()

    def get(self, bucket: str, key: str) -> bytes:
        if (bucket, key) not in self.objects:
            raise ObjectNotFound(f"get {bucket}/{key}: NoSuchKey")
        return self.objects[(bucket, key)][0]

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        with self._lock:
            if "/images/" in key:
                self.image_puts += 1
                if self.fail_puts_after is not None and self.image_puts > self.fail_puts_after:
                    raise StorageUnavailable(f"put {bucket}/{key}: connection refused")
            self.objects[(bucket, key)] = (data, dict(metadata or {}))

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        found = self.objects.get((bucket, key))
        return ObjectInfo(key, len(found[0]), "", found[1]) if found else None

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        return iter(sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix)))


def large_png() -> bytes:
    """2000x2000 with transparency: a small file that decodes to 16 MB of pixels."""
    image = Image.new("RGBA", (2000, 2000), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((200, 200, 1800, 1800), fill=(200, 30, 30, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    files = {f"{n}.jpg": photo_jpeg(160, 120, seed=n) for n in range(6)}
    files["large.png"] = large_png()
    with LocalHTTPServer(files, stall_seconds=20) as running:
        yield running


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "allow_nets": parse_networks("127.0.0.1/32"),
        "read_timeout": 5.0,
        "image_timeout": 20.0,
        "retries": 0,
        "concurrency": 4,
        "compress_workers": 2,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def shard(storage: MemoryStorage, urls: list[str], compression: Compression) -> ShardLocation:
    images = tuple(ShardImage(url, image_key(PREFIX, url, compression)) for url in urls)
    manifest = ShardManifest("r1", 0, "images", PREFIX, compression, images)
    location = ShardLocation("images", PREFIX, "r1", 0)
    storage.put("images", location.manifest_key, manifest.to_json(), "application/json")
    return location


def test_storage_failing_mid_shard_stops_it_for_a_retry(server: LocalHTTPServer) -> None:
    storage = MemoryStorage(fail_puts_after=1)
    # The stalled download starts first and is in flight when storage fails.
    urls = [server.url("slow")] + [server.image_url(f"{n}.jpg") for n in range(6)]
    location = shard(storage, urls, Compression())
    out = io.StringIO()

    started = time.monotonic()
    code = ShardRunner(settings(read_timeout=2.0), storage, log=JsonLog(out)).run(location)

    assert code == EXIT_RETRY
    # Queued images were cancelled and the stalled download abandoned at its read
    # timeout, instead of running the shard to its end (the stall alone lasts 20 s).
    assert time.monotonic() - started < 2.0 + 3.0
    assert storage.image_puts < 6
    assert ("images", location.result_key) not in storage.objects  # no partial result
    last = json.loads(out.getvalue().splitlines()[-1])
    assert (last["event"], last["reason"], last["exit"]) == (
        "shard_failed",
        "storage-unavailable",
        EXIT_RETRY,
    )


def test_unavailable_encoder_fails_every_image_without_downloading(
    server: LocalHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(formats, "avif_available", lambda: False)
    storage = MemoryStorage()
    urls = [server.image_url("0.jpg"), server.image_url("1.jpg")]
    location = shard(storage, urls, Compression(format="avif"))

    code = ShardRunner(settings(), storage, log=JsonLog(io.StringIO())).run(location)

    assert code == EXIT_OK
    result = ShardResult.from_json(storage.get("images", location.result_key))
    assert [(image.ok, image.stage) for image in result.images] == [(False, "encode")] * 2
    assert all("AVIF" in image.error for image in result.images)
    assert server.count("/img/0.jpg") == 0


def test_result_summary_counts(server: LocalHTTPServer) -> None:
    storage = MemoryStorage()
    urls = [server.image_url("0.jpg"), server.image_url("1.jpg"), server.url("status/404")]
    location = shard(storage, urls, Compression())

    assert ShardRunner(settings(), storage, log=JsonLog(io.StringIO())).run(location) == EXIT_OK

    result = ShardResult.from_json(storage.get("images", location.result_key))
    summary = result.extra["summary"]
    assert (summary["images"], summary["ok"], summary["failed"]) == (3, 2, 1)
    assert summary["bytes_out"] == sum(image.output_bytes for image in result.images)
    assert result.started_at and result.finished_at


def test_image_too_large_for_the_memory_budget_fails_alone(server: LocalHTTPServer) -> None:
    storage = MemoryStorage()
    urls = [server.image_url("large.png"), server.image_url("0.jpg")]
    location = shard(storage, urls, Compression())
    out = io.StringIO()

    # 64 MiB of memory leaves a 16 MiB budget for pixels: the PNG needs more.
    code = ShardRunner(settings(memory_limit=64 * 1024 * 1024), storage, log=JsonLog(out)).run(
        location
    )

    assert code == EXIT_OK
    large, small = ShardResult.from_json(storage.get("images", location.result_key)).images
    assert (large.ok, large.stage) == (False, "decode")
    assert large.error.startswith("too-large-for-memory: ")
    assert "16 MiB memory budget" in large.error
    assert small.ok
    summary = json.loads(out.getvalue().splitlines()[-1])
    assert (summary["memory_limit_mib"], summary["memory_budget_mib"]) == (64, 16)
