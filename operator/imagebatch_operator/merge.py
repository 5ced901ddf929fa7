"""Merge a finished run's shard results into output.csv and errors.csv: the other expensive task.

Every shard's result is loaded into a scratch SQLite database (one row per distinct
image), then the run's rows are streamed back from storage in input order and each
URL is looked up there, so memory stays flat for any batch the limits allow. A shard
that left no result, a malformed one, or one the Job gave up on still accounts for
each of its images, as a failure with the reason; an image planned out because its
output was already stored is counted as skipped, if it is still there.

Idempotent: a merge cut short by a restart is simply done again.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from imagebatch_common.contract import (
    ImageResult,
    ShardManifest,
    ShardResult,
    errors_csv_key,
    image_key,
    output_csv_key,
    shard_manifest_key,
    shard_result_key,
)
from imagebatch_common.contract import Stage as ImageStage
from imagebatch_common.storage import ObjectNotFound, Storage
from imagebatch_operator import csvinput, results
from imagebatch_operator.decide import MergeOutcome, PlanSummary
from imagebatch_operator.ingest import header_key, rows_key
from imagebatch_operator.spec import BatchSpec
from imagebatch_operator.status import Counts

_BATCH = 2000


def scratch_db(directory: str) -> tuple[sqlite3.Connection, str]:
    """A throw-away SQLite database on disk, tuned for one writer and no durability.

    The connection opens a transaction by itself before every write and commits only
    when told: committing each row (autocommit) measured twenty times slower.
    """
    handle, path = tempfile.mkstemp(prefix="imagebatch-", suffix=".sqlite", dir=directory)
    os.close(handle)
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA temp_store=FILE")
    db.execute("PRAGMA cache_size=-8192")  # 8 MiB of pages, whatever the batch size
    return db, path


@dataclass(frozen=True)
class MergeInput:
    """What the merge needs to know of the run besides storage."""

    bucket: str
    prefix: str
    run: str
    plan: PlanSummary
    spec: BatchSpec
    completed: frozenset[int]
    failed: frozenset[int]


def _image_row(image: ImageResult) -> tuple[object, ...]:
    return (
        image.url,
        image.key,
        int(image.ok),
        int(image.skipped),
        image.stage,
        image.error,
        image.input_bytes,
        image.output_bytes,
    )


class Merge:
    """Writes output.csv and errors.csv for a run. Blocking; run it on the expensive pool."""

    def __init__(self, storage: Storage, url_of: Callable[[str, str], str], spool_dir: str):
        self.storage = storage
        self.url_of = url_of  # (bucket, key) -> the URL written into output.csv
        self.spool_dir = spool_dir

    def run(self, job: MergeInput) -> MergeOutcome:
        db, path = scratch_db(self.spool_dir)
        try:
            shards_ok, shards_failed = self._load(db, job)
            return self._write(db, job, shards_ok, shards_failed)
        finally:
            db.close()
            os.unlink(path)

    # -- results in ------------------------------------------------------------

    def _load(self, db: sqlite3.Connection, job: MergeInput) -> tuple[int, int]:
        db.execute(
            "CREATE TABLE results (url TEXT PRIMARY KEY, key TEXT, ok INTEGER, skipped INTEGER,"
            " stage TEXT, error TEXT, bytes_in INTEGER, bytes_out INTEGER)"
        )
        insert = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        retries = job.spec.sharding.retries_per_shard
        ok_shards = failed_shards = 0
        for index in range(job.plan.shards):
            images = self._shard(job, index, retries)
            if images is None:
                continue
            shard_ok, entries = images
            if shard_ok:
                ok_shards += 1
            else:
                failed_shards += 1
            for start in range(0, len(entries), _BATCH):
                db.executemany(insert, [_image_row(i) for i in entries[start : start + _BATCH]])
        return ok_shards, failed_shards

    def _shard(
        self, job: MergeInput, index: int, retries: int
    ) -> tuple[bool, list[ImageResult]] | None:
        """(whether the shard itself finished, one result per image) for one index."""
        key = shard_result_key(job.prefix, job.run, index)
        why = ""
        if index in job.completed:
            try:
                result = ShardResult.from_json(self.storage.get(job.bucket, key))
                if result.run == job.run and result.index == index:
                    return True, list(result.images)
                why = "the shard's result belongs to another run or shard"
            except ObjectNotFound:
                why = "the shard finished without writing its result"
            except ValueError as error:
                why = f"the shard's result is malformed: {str(error)[:200]}"
        elif index in job.failed:
            why = f"the shard failed after {retries + 1} attempt(s)"
        else:
            why = "the Job finished without running this shard"
        manifest = ShardManifest.from_json(
            self.storage.get(job.bucket, shard_manifest_key(job.prefix, job.run, index))
        )
        return False, [
            ImageResult(url=i.url, key=i.key, ok=False, stage=ImageStage.SHARD.value, error=why)
            for i in manifest.images
        ]

    # -- CSVs out --------------------------------------------------------------

    def _write(
        self, db: sqlite3.Connection, job: MergeInput, shards_ok: int, shards_failed: int
    ) -> MergeOutcome:
        # Outputs already stored when the run was planned are in no shard: find them again.
        db.execute("CREATE TABLE stored (key TEXT PRIMARY KEY, full TEXT) WITHOUT ROWID")
        if job.plan.stored:
            pending: list[tuple[str, str]] = []
            for full in self.storage.list_keys(job.bucket, f"{job.prefix}images/"):
                pending.append((full, full))
                stem = full.rsplit(".", 1)[0]
                if stem != full:
                    pending.append((stem, full))  # format "original" plans keys without it
                if len(pending) >= _BATCH:
                    db.executemany("INSERT OR IGNORE INTO stored VALUES (?, ?)", pending)
                    pending.clear()
            db.executemany("INSERT OR IGNORE INTO stored VALUES (?, ?)", pending)
        compression = job.spec.compression
        insert = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        cache: dict[str, ImageResult] = {}

        def lookup(url: str) -> ImageResult:
            known = cache.get(url)
            if known is not None:
                return known
            found = db.execute(
                "SELECT key, ok, skipped, stage, error, bytes_in, bytes_out FROM results "
                "WHERE url = ?",
                (url,),
            ).fetchone()
            if found is not None:
                key, ok, skipped, stage, error, bytes_in, bytes_out = found
                result = ImageResult(
                    url=url,
                    key=key,
                    ok=bool(ok),
                    skipped=bool(skipped),
                    stage=stage,
                    error=error,
                    input_bytes=bytes_in,
                    output_bytes=bytes_out,
                )
            else:
                planned = image_key(job.prefix, url, compression)
                row = db.execute("SELECT full FROM stored WHERE key = ?", (planned,)).fetchone()
                result = (
                    ImageResult(url=url, key=str(row[0]), ok=True, skipped=True)
                    if row is not None
                    else ImageResult(
                        url=url,
                        key=planned,
                        ok=False,
                        stage=ImageStage.SHARD.value,
                        error="no result was recorded for this image",
                    )
                )
                db.execute(insert, _image_row(result))  # counted with the others below
            if len(cache) > 4096:
                cache.clear()
            cache[url] = result
            return result

        header = csvinput.Header.from_json(
            self.storage.get(job.bucket, header_key(job.prefix, job.run))
        )

        def rows() -> Iterator[csvinput.Row]:
            for line in self.storage.lines(job.bucket, rows_key(job.prefix, job.run)):
                if line:
                    yield csvinput.Row.from_spool(line, header.urls)

        tally: list[results.RowTally] = []

        def url_of(key: str) -> str:
            return self.url_of(job.bucket, key)

        self._put_csv(
            job.bucket,
            output_csv_key(job.prefix),
            results.output_rows(header, rows(), lookup, url_of, tally),
        )
        self._put_csv(job.bucket, errors_csv_key(job.prefix), results.error_rows(rows(), lookup))
        row_tally = tally[0] if tally else results.RowTally()
        (total, ok, skipped, failed, bytes_in, bytes_out) = db.execute(
            "SELECT count(*), coalesce(sum(ok), 0), coalesce(sum(skipped * ok), 0),"
            " coalesce(sum(1 - ok), 0), coalesce(sum(bytes_in), 0), coalesce(sum(bytes_out), 0)"
            " FROM results"
        ).fetchone()
        return MergeOutcome(
            "merged",
            rows=Counts(
                total=row_tally.rows, succeeded=row_tally.rows_ok, failed=row_tally.rows_failed
            ),
            images=Counts(
                total=int(total), succeeded=int(ok), failed=int(failed), skipped=int(skipped)
            ),
            shards=Counts(total=job.plan.shards, succeeded=shards_ok, failed=shards_failed),
            bytes_in=int(bytes_in),
            bytes_out=int(bytes_out),
        )

    def _put_csv(self, bucket: str, key: str, rows: Iterable[list[str]]) -> None:
        with tempfile.NamedTemporaryFile(
            "wb", suffix=".csv", dir=self.spool_dir, delete=False
        ) as out:
            for piece in results.to_csv(rows):
                out.write(piece)
        try:
            self.storage.put_file(bucket, key, out.name, "text/csv")
        finally:
            os.unlink(out.name)
