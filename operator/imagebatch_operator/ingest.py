"""Validate a run's CSV and plan its shards, in bounded memory: the expensive task.

One pass over the CSV: valid rows are spooled to a file (``rows.jsonl`` in storage
afterwards, read back in row order by the merge) and each URL goes into a scratch
SQLite database on disk, which deduplicates them in first-seen order. Memory stays
flat whatever the CSV's size; the disk holds the rows once and each distinct URL about
twice. Then the outputs already in storage are listed once, and every distinct image
without an output is put in a shard manifest, uploaded as it is made. The run's plan
(``plan.json``) is written last: its presence means the whole plan is there.

An invalid CSV produces ``errors.csv`` with every problem and no plan. A CSV that
cannot be read yet, or storage that cannot be written, is reported as unavailable and
tried again later; nothing here leaves half a plan that a later pass would trust.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from imagebatch_common.contract import (
    Compression,
    ShardImage,
    ShardManifest,
    Stage,
    errors_csv_key,
    image_keyer,
    run_prefix,
    shard_manifest_key,
)
from imagebatch_common.storage import Storage, StorageError
from imagebatch_operator import csvinput, plan, results
from imagebatch_operator.decide import IngestOutcome, PlanSummary
from imagebatch_operator.kube import ApiUnavailable, Kube
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import SourceUnavailable, UrlOpener, open_source
from imagebatch_operator.spec import BatchSpec
from imagebatch_operator.status import Reason

log = logging.getLogger("imagebatch.ingest")

_BATCH = 5000  # URLs per executemany
_UPLOADS_IN_FLIGHT = 16  # manifest PUTs overlapped


def rows_key(prefix: str, run: str) -> str:
    return f"{run_prefix(prefix, run)}rows.jsonl"


def plan_key(prefix: str, run: str) -> str:
    return f"{run_prefix(prefix, run)}plan.json"


def header_key(prefix: str, run: str) -> str:
    return f"{run_prefix(prefix, run)}header.json"


def plan_to_json(summary: PlanSummary) -> bytes:
    return json.dumps(summary.__dict__, separators=(",", ":")).encode()


def plan_from_json(data: bytes) -> PlanSummary:
    """A stored plan; raises ValueError when it is not one."""
    try:
        doc = json.loads(data)
        return PlanSummary(
            run=str(doc["run"]),
            rows=int(doc["rows"]),
            images=int(doc["images"]),
            stored=int(doc["stored"]),
            shards=int(doc["shards"]),
            per_shard=int(doc["per_shard"]),
            message=str(doc.get("message", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed plan: {error}") from error


@dataclass(frozen=True)
class Target:
    """Where one run's objects go."""

    bucket: str
    prefix: str
    run: str


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
    db.execute("PRAGMA cache_size=-16384")  # 16 MiB of pages, whatever the batch size
    return db, path


def stored_outputs(storage: Storage, bucket: str, prefix: str) -> Iterator[str]:
    """Output keys already in storage, also without extension (``original`` keys have none)."""
    for key in storage.list_keys(bucket, f"{prefix}images/"):
        yield key
        stem = key.rsplit(".", 1)[0]
        if stem != key:
            yield stem


class Ingest:
    """Validates one run's CSV and plans it. Blocking; run it on the expensive pool."""

    def __init__(
        self, settings: Settings, kube: Kube, storage: Storage, open_url: UrlOpener
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.storage = storage
        self.open_url = open_url
        # Seconds spent in each part of the last run: validate (read the CSV, check it,
        # spool it, deduplicate its URLs), plan (keys, what is stored, the manifests) and
        # upload (waiting for storage).
        self.timings: dict[str, float] = {}

    def run(self, ref: plan.BatchRef, spec: BatchSpec, run: str) -> IngestOutcome:
        target = Target(plan.output_bucket(spec, self.settings), plan.output_prefix(spec, ref), run)
        started = time.monotonic()
        self.timings = {}
        try:
            existing = self._existing_plan(target)
            if existing is not None:
                return IngestOutcome("planned", plan=existing)
            outcome = self._ingest(ref, spec, target)
        except SourceUnavailable as error:
            return IngestOutcome(
                "unavailable", f"cannot read the CSV from {spec.source.describe()}: {error}"
            )
        except (StorageError, ApiUnavailable) as error:
            return IngestOutcome("unavailable", f"cannot plan the run now: {error}")
        log.info(
            "%s/%s run %s: %s in %.2fs (%s)",
            ref.namespace,
            ref.name,
            run,
            outcome.kind,
            time.monotonic() - started,
            ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()),
        )
        return outcome

    def _existing_plan(self, target: Target) -> PlanSummary | None:
        """A plan left by an earlier pass of this run (before a restart): reuse it."""
        from imagebatch_common.storage import ObjectNotFound

        try:
            return plan_from_json(
                self.storage.get(target.bucket, plan_key(target.prefix, target.run))
            )
        except ObjectNotFound:
            return None
        except ValueError:
            return None

    def _ingest(self, ref: plan.BatchRef, spec: BatchSpec, target: Target) -> IngestOutcome:
        self.storage.ensure_bucket(target.bucket)
        chunks = open_source(spec.source, ref.namespace, self.kube, self.storage, self.open_url)
        reader = csvinput.CsvReader(chunks, self.settings.csv_limits)
        db, db_path = scratch_db(self.settings.spool_dir)
        spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in finally
            "w", suffix=".jsonl", dir=self.settings.spool_dir, delete=False, encoding="utf-8"
        )
        try:
            began = time.monotonic()
            rows, distinct = self._read(reader, db, spool)
            spool.close()
            self.timings = {"validate": time.monotonic() - began}
            problems = list(reader.problems)
            if problems:
                return self._invalid(target, problems)
            if distinct > self.settings.max_images:
                return IngestOutcome(
                    "refused",
                    f"the CSV has {distinct} distinct images, more than this operator's limit "
                    f"of {self.settings.max_images} per batch (max images per batch); split it",
                    reason=Reason.OVER_LIMIT,
                )
            return self._plan(spec, target, reader, db, spool.name, rows, distinct)
        finally:
            spool.close()
            db.close()
            for path in (spool.name, db_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    @staticmethod
    def _read(
        reader: csvinput.CsvReader, db: sqlite3.Connection, spool: IO[str]
    ) -> tuple[int, int]:
        """Spool valid rows; insert URLs, first-seen order kept by a running sequence."""
        db.execute("CREATE TABLE urls (url TEXT PRIMARY KEY, seq INTEGER NOT NULL)")
        write = spool.write
        pending: list[tuple[str, int]] = []
        seq = rows = 0
        insert = "INSERT OR IGNORE INTO urls VALUES (?, ?)"
        for row in reader.rows():
            rows += 1
            write(row.to_json() + "\n")
            for url in row.urls:
                pending.append((url, seq))
                seq += 1
            if len(pending) >= _BATCH:
                db.executemany(insert, pending)
                pending.clear()
        if pending:
            db.executemany(insert, pending)
        (distinct,) = db.execute("SELECT count(*) FROM urls").fetchone()
        return rows, int(distinct)

    def _invalid(self, target: Target, problems: list[csvinput.CsvProblem]) -> IngestOutcome:
        """errors.csv with every problem; the first few go into the status."""
        report = results.to_csv(
            [list(results.ERROR_COLUMNS)]
            + [
                [
                    str(p.row),
                    "",
                    Stage.VALIDATE.value,
                    f"{p.column}: {p.message}" if p.column else p.message,
                ]
                for p in problems
            ]
        )
        written = True
        try:
            self.storage.put(
                target.bucket, errors_csv_key(target.prefix), b"".join(report), "text/csv"
            )
        except StorageError:
            written = False  # the status still says what is wrong; the report can wait
        first = problems[0]
        where = f"row {first.row}" + (f", column {first.column!r}" if first.column else "")
        message = f"{len(problems)} problem(s) in the CSV; first at {where}: {first.message}"
        return IngestOutcome(
            "invalid",
            message,
            problems=tuple(p.as_status() for p in problems[: self.settings.status_problem_count]),
            errors_written=written,
        )

    def _plan(
        self,
        spec: BatchSpec,
        target: Target,
        reader: csvinput.CsvReader,
        db: sqlite3.Connection,
        spool_path: str,
        rows: int,
        distinct: int,
    ) -> IngestOutcome:
        began = time.monotonic()
        stored_count = self._load_stored(db, target)
        todo, images = self._todo(db, target, spec.compression, stored_count, distinct)
        per_shard = plan.images_per_shard(spec, todo)
        shards = -(-todo // per_shard)
        self.timings["plan"] = time.monotonic() - began
        if shards > self.settings.max_shards:
            return IngestOutcome(
                "refused",
                f"{todo} images in shards of {per_shard} make {shards} shards, more than this "
                f"operator's limit of {self.settings.max_shards} per batch (max shards per "
                "batch); raise spec.sharding.imagesPerShard",
                reason=Reason.OVER_LIMIT,
            )
        manifests = plan.shard_manifests(
            images,
            run=target.run,
            bucket=target.bucket,
            prefix=target.prefix,
            compression=spec.compression,
            per_shard=per_shard,
        )
        self._upload_manifests(target, manifests)
        uploads_began = time.monotonic()
        self.storage.put_file(
            target.bucket, rows_key(target.prefix, target.run), spool_path, "application/x-ndjson"
        )
        assert reader.header is not None  # a CSV without one has a problem
        self.storage.put(
            target.bucket,
            header_key(target.prefix, target.run),
            reader.header.to_json().encode(),
            "application/json",
        )
        noted = reader.summary()
        summary = PlanSummary(
            run=target.run,
            rows=rows,
            images=distinct,
            stored=distinct - todo,
            shards=shards,
            per_shard=per_shard,
            message=f"{rows} rows, {distinct} distinct images" + (f"; {noted}" if noted else ""),
        )
        self.storage.put(
            target.bucket,
            plan_key(target.prefix, target.run),
            plan_to_json(summary),
            "application/json",
        )
        self.timings["upload"] += time.monotonic() - uploads_began
        notices = tuple(
            f"line {n.row}: {n.message}" if n.row else n.message for n in reader.notices[:20]
        )
        return IngestOutcome("planned", plan=summary, notices=notices)

    def _load_stored(self, db: sqlite3.Connection, target: Target) -> int:
        """Outputs already in storage, once: they need no shard."""
        db.execute("CREATE TABLE stored (key TEXT PRIMARY KEY) WITHOUT ROWID")
        batch: list[tuple[str]] = []
        count = 0
        for key in stored_outputs(self.storage, target.bucket, target.prefix):
            batch.append((key,))
            count += 1
            if len(batch) >= _BATCH:
                db.executemany("INSERT OR IGNORE INTO stored VALUES (?)", batch)
                batch.clear()
        if batch:
            db.executemany("INSERT OR IGNORE INTO stored VALUES (?)", batch)
        return count

    def _todo(
        self,
        db: sqlite3.Connection,
        target: Target,
        compression: Compression,
        stored: int,
        distinct: int,
    ) -> tuple[int, Iterator[ShardImage]]:
        """How many images need a shard, and those images in first-seen order."""
        key_of = image_keyer(target.prefix, compression)
        if stored == 0:  # a first run: every image, keyed as it goes out
            ordered = db.execute("SELECT url FROM urls ORDER BY seq")
            return distinct, (ShardImage(url, key_of(url), False) for (url,) in ordered)
        db.execute("CREATE TABLE planned (seq INTEGER PRIMARY KEY, url TEXT, key TEXT)")
        keyed: list[tuple[int, str, str]] = []
        for seq, url in db.execute("SELECT seq, url FROM urls ORDER BY seq"):
            keyed.append((seq, url, key_of(url)))
            if len(keyed) >= _BATCH:
                db.executemany("INSERT INTO planned VALUES (?, ?, ?)", keyed)
                keyed.clear()
        if keyed:
            db.executemany("INSERT INTO planned VALUES (?, ?, ?)", keyed)
        todo_query = (
            "SELECT p.url, p.key FROM planned p WHERE NOT EXISTS "
            "(SELECT 1 FROM stored s WHERE s.key = p.key) ORDER BY p.seq"
        )
        (todo,) = db.execute(f"SELECT count(*) FROM ({todo_query})").fetchone()  # noqa: S608
        return int(todo), (ShardImage(url, key, False) for url, key in db.execute(todo_query))

    def _upload_manifests(self, target: Target, manifests: Iterator[ShardManifest]) -> None:
        """PUT each manifest as it is made, a bounded number in flight.

        Time spent making manifests counts as planning, time waiting for PUTs as upload.
        """
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="manifest") as pool:
            in_flight: list[Future[None]] = []
            waited = 0.0
            began = time.monotonic()
            for manifest in manifests:
                in_flight.append(
                    pool.submit(
                        self.storage.put,
                        target.bucket,
                        shard_manifest_key(target.prefix, target.run, manifest.index),
                        manifest.to_json(),
                        "application/json",
                    )
                )
                if len(in_flight) >= _UPLOADS_IN_FLIGHT:
                    start = time.monotonic()
                    in_flight.pop(0).result()
                    waited += time.monotonic() - start
            start = time.monotonic()
            for future in in_flight:
                future.result()
            waited += time.monotonic() - start
        self.timings["plan"] += time.monotonic() - began - waited
        self.timings["upload"] = waited
