"""The merge: every shard's outcome accounted for, in row order, without a server.

Storage is an in-memory stand-in with the four calls the merge makes; the e2e tests run
the same code against MinIO.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from imagebatch_common.contract import (
    Compression,
    ImageResult,
    ShardImage,
    ShardManifest,
    ShardResult,
    image_key,
    shard_manifest_key,
    shard_result_key,
)
from imagebatch_common.storage import ObjectNotFound, Storage
from imagebatch_operator import csvinput
from imagebatch_operator.decide import PlanSummary
from imagebatch_operator.ingest import header_key, rows_key
from imagebatch_operator.merge import Merge, MergeInput
from imagebatch_operator.spec import parse_spec

PREFIX, RUN, BUCKET = "shop/b/", "g1-0f1e2d3c", "imagebatch"
COMPRESSION = Compression()


class MemoryStorage:
    """The merge's view of storage, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def get(self, bucket: str, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key]

    def lines(self, bucket: str, key: str) -> Iterator[bytes]:
        yield from self.get(bucket, key).split(b"\n")

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        yield from sorted(k for k in self.objects if k.startswith(prefix))

    def put_file(self, bucket: str, key: str, path: str, content_type: str) -> None:
        self.objects[key] = Path(path).read_bytes()


def url(n: int) -> str:
    return f"https://img.example/{n}.jpg"


def key(n: int) -> str:
    return image_key(PREFIX, url(n), COMPRESSION)


def prepare(storage: MemoryStorage, rows: list[tuple[int, ...]], shards: list[list[int]]) -> None:
    header = csvinput.Header(("S. No.", "Product Name", "Input Image Urls"), ",", "utf-8", 0, 1, 2)
    storage.objects[header_key(PREFIX, RUN)] = header.to_json().encode()
    spooled = [
        csvinput.Row(
            line=i + 2,
            cells=(str(i + 1), f"P{i}", ",".join(url(n) for n in images)),
            urls=tuple(url(n) for n in images),
        ).to_spool()
        for i, images in enumerate(rows)
    ]
    storage.objects[rows_key(PREFIX, RUN)] = "\n".join(spooled).encode()
    for index, images in enumerate(shards):
        manifest = ShardManifest(
            RUN,
            index,
            BUCKET,
            PREFIX,
            COMPRESSION,
            tuple(ShardImage(url(n), key(n), False) for n in images),
        )
        storage.objects[shard_manifest_key(PREFIX, RUN, index)] = manifest.to_json()


def result(index: int, images: list[int], failed: tuple[int, ...] = ()) -> bytes:
    return ShardResult(
        RUN,
        index,
        tuple(
            ImageResult(
                url(n),
                key(n),
                n not in failed,
                100,
                40,
                stage="fetch" if n in failed else "",
                error="http-status: HTTP 404" if n in failed else "",
            )
            for n in images
        ),
    ).to_json()


def merge(
    storage: MemoryStorage,
    shards: int,
    stored: int,
    images: int,
    completed: frozenset[int],
    failed: frozenset[int],
) -> Any:
    job = MergeInput(
        BUCKET,
        PREFIX,
        RUN,
        PlanSummary(RUN, rows=0, images=images, stored=stored, shards=shards, per_shard=2),
        parse_spec({"source": {"inline": "x"}}),
        completed,
        failed,
    )
    return Merge(cast(Storage, storage), lambda b, k: f"https://cdn/{k}", "/tmp").run(job)


def error_lines(storage: MemoryStorage) -> list[str]:
    return storage.objects[f"{PREFIX}errors.csv"].decode().splitlines()[1:]


def test_every_kind_of_shard_outcome_is_accounted_for() -> None:
    storage = MemoryStorage()
    # Shard 0 fine (image 2 failed); shard 1 malformed; shard 2 gave up; shard 3 never ran;
    # image 9 was stored before the run and planned out.
    prepare(
        storage, rows=[(0, 1), (2,), (3, 4), (5,), (6,), (9,)], shards=[[0, 1, 2], [3, 4], [5], [6]]
    )
    storage.objects[shard_result_key(PREFIX, RUN, 0)] = result(0, [0, 1, 2], failed=(2,))
    storage.objects[shard_result_key(PREFIX, RUN, 1)] = b"{not json"
    storage.objects[key(9)] = b"jpeg"
    out = merge(
        storage, shards=4, stored=1, images=8, completed=frozenset({0, 1}), failed=frozenset({2})
    )
    assert out.kind == "merged"
    assert (out.images.total, out.images.succeeded, out.images.failed, out.images.skipped) == (
        8,
        3,
        5,
        1,
    )
    assert (out.shards.succeeded, out.shards.failed) == (1, 3)
    assert (out.rows.total, out.rows.succeeded, out.rows.failed) == (6, 2, 4)
    reasons = {line.split(",")[1]: line.split(",", 3)[3] for line in error_lines(storage)}
    assert reasons[url(2)] == "http-status: HTTP 404"
    assert reasons[url(3)].startswith("the shard's result is malformed")  # not "missing"
    assert reasons[url(5)] == "the shard failed after 4 attempt(s)"
    assert reasons[url(6)] == "the Job finished without running this shard"
    output = storage.objects[f"{PREFIX}output.csv"].decode().splitlines()
    assert output[0] == "S. No.,Product Name,Input Image Urls,Output Image Urls"
    assert output[1].endswith(f'"https://cdn/{key(0)},https://cdn/{key(1)}"')
    assert output[6].endswith(f"https://cdn/{key(9)}")  # stored before: kept


@pytest.mark.parametrize("stored_still", [True, False])
def test_an_output_planned_out_as_stored_is_checked_again(stored_still: bool) -> None:
    storage = MemoryStorage()
    prepare(storage, rows=[(9,)], shards=[])
    if stored_still:
        storage.objects[key(9)] = b"jpeg"
    out = merge(storage, shards=0, stored=1, images=1, completed=frozenset(), failed=frozenset())
    assert (out.images.succeeded, out.images.failed) == ((1, 0) if stored_still else (0, 1))
    if not stored_still:
        assert error_lines(storage)[0].endswith("no result was recorded for this image")
