"""Validate a run's CSV and plan its shards, in bounded memory: the expensive task.

One pass over the CSV: valid rows are spooled to a file (``rows.jsonl`` in storage
afterwards, read back in row order by the merge; the URLs are left out, the merge
takes them from the row's own cells) and each distinct URL to a second file, in
first-seen order. Whether a URL was seen is kept as a set of 16-byte digests, bounded by
the cap on distinct images, so memory does not grow with the CSV's size beyond that
set; the disk holds the rows once and each distinct URL once or twice. Then the outputs
already in storage are listed once, and every distinct image without an output is put
in a shard manifest, uploaded as it is made. The run's plan
(``plan.json``) is written last: its presence means the whole plan is there.

An invalid CSV produces ``errors.csv`` with every problem and no plan. A CSV that
cannot be read yet, or storage that cannot be written, is reported as unavailable and
tried again later; nothing here leaves half a plan that a later pass would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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


class Spool:
    """The files one ingest writes to disk: the rows, each distinct URL, the images to do."""

    def __init__(self, directory: str) -> None:
        self.rows = tempfile.NamedTemporaryFile(  # noqa: SIM115 - removed by remove()
            "w", suffix=".jsonl", dir=directory, delete=False, encoding="utf-8"
        )
        self.urls = tempfile.NamedTemporaryFile(  # noqa: SIM115 - removed by remove()
            "w", suffix=".urls", dir=directory, delete=False, encoding="utf-8"
        )
        self.todo_path = self.urls.name + ".todo"

    def read_urls(self) -> Iterator[str]:
        with open(self.urls.name, encoding="utf-8") as lines:
            for line in lines:
                yield line[:-1]

    def read_todo(self) -> Iterator[ShardImage]:
        with open(self.todo_path, encoding="utf-8") as lines:
            for line in lines:
                url, key = line[:-1].split("\t")
                yield ShardImage(url, key, False)

    def remove(self) -> None:
        for handle in (self.rows, self.urls):
            handle.close()
        for path in (self.rows.name, self.urls.name, self.todo_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


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
        spool = Spool(self.settings.spool_dir)
        try:
            began = time.monotonic()
            rows, distinct = self._read(reader, spool, self.settings.max_images)
            self.timings = {"validate": time.monotonic() - began}
            problems = list(reader.problems)
            if problems:
                return self._invalid(target, problems)
            if distinct > self.settings.max_images:
                return IngestOutcome(
                    "refused",
                    f"the CSV has more than {self.settings.max_images} distinct images, over this "
                    f"operator's limit of {self.settings.max_images} per batch (max images per "
                    "batch); split it",
                    reason=Reason.OVER_LIMIT,
                )
            return self._plan(spec, target, reader, spool, rows, distinct)
        finally:
            spool.remove()

    @staticmethod
    def _read(reader: csvinput.CsvReader, spool: Spool, limit: int) -> tuple[int, int]:
        """Spool valid rows, and each distinct URL once, in first-seen order.

        Whether a URL was seen is answered by a set of 16-byte digests, never the URLs
        themselves: at most ``limit`` + 1 of them (about 16 MiB for 200,000), whatever
        the CSV's size; past the limit only rows are checked and counted. Two URLs with
        one digest (odds about 1 in 10^28) would leave the second without a shard,
        reported in errors.csv as having no result, never silently.
        """
        write_row = spool.rows.file.write  # the file itself: the wrapper costs a call
        write_url = spool.urls.file.write
        seen: set[bytes] = set()
        remember = seen.add
        digest = hashlib.blake2b
        rows = 0
        for row in reader.rows():
            rows += 1
            write_row(row.to_spool() + "\n")
            for url in row.urls:
                mark = digest(url.encode(), digest_size=16).digest()
                if mark not in seen and len(seen) <= limit:
                    remember(mark)
                    write_url(url + "\n")  # a checked URL holds no white space
        spool.rows.close()
        spool.urls.close()
        return rows, len(seen)

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
        spool: Spool,
        rows: int,
        distinct: int,
    ) -> IngestOutcome:
        began = time.monotonic()
        todo, images = self._todo(spool, target, spec.compression, distinct)
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
            target.bucket,
            rows_key(target.prefix, target.run),
            spool.rows.name,
            "application/x-ndjson",
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

    def _todo(
        self, spool: Spool, target: Target, compression: Compression, distinct: int
    ) -> tuple[int, Iterator[ShardImage]]:
        """How many images need a shard, and those images in first-seen order.

        The outputs already in storage are listed once (one request per thousand) and
        need no shard. A first run, with nothing stored, keys each image as it goes out;
        otherwise the images to do are keyed once into a spool file and counted.
        """
        key_of = image_keyer(target.prefix, compression)
        stored: set[bytes] = set()
        digest = hashlib.blake2b
        for key in stored_outputs(self.storage, target.bucket, target.prefix):
            stored.add(digest(key.encode(), digest_size=16).digest())
        if not stored:
            return distinct, (ShardImage(url, key_of(url), False) for url in spool.read_urls())
        todo = 0
        with open(spool.todo_path, "w", encoding="utf-8") as out:
            for url in spool.read_urls():
                key = key_of(url)
                if digest(key.encode(), digest_size=16).digest() not in stored:
                    out.write(f"{url}\t{key}\n")
                    todo += 1
        return todo, spool.read_todo()

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
