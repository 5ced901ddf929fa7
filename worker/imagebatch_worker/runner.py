"""Run one shard: read its manifest, produce every image, write its result, pick the exit code.

The exit code is the contract with the Indexed Job (``contract.EXIT_*``):

* ``EXIT_OK`` once the result manifest is written, however many images failed: an
  image failure is data (recorded with its stage and reason), not a pod failure.
* ``EXIT_RETRY`` when the shard cannot finish now (storage unreachable or refusing):
  the Job runs the index again, and the retry skips every image already stored.
* ``EXIT_PERMANENT`` when the shard can never finish (manifest missing, unreadable,
  for another shard): the Job's podFailurePolicy fails the index at once.

Images flow through a three-stage pipeline (``_Pipeline``):

* ``concurrency`` download threads fetch images (and, on a retried shard, check whether
  each is stored already) and queue the bodies;
* ``compress_workers`` threads, as many as the CPUs the pod may use, compress them;
* upload threads store the results and record each image.

Downloads run ahead of compression and uploads behind it, so network and storage
waits overlap the codec; short queues between the stages bound the bytes held in
memory. Each image moves forward only: no thread waits for another to hand it back.
Measured on two cores, the earlier design (a thread per image handing each one to a
compression pool and waiting for it back) spent a quarter of its Python time waking
threads, and compressing and uploading on the same threads left a core idle during
every upload (12 MP: 20 % slower) (``tests/bench``).
Pillow releases the GIL while decoding, resizing and encoding into a file descriptor,
which is what lets threads use every core.
"""

from __future__ import annotations

import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from imagebatch_common.contract import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRY,
    FORMAT_EXTENSIONS,
    ImageResult,
    ShardImage,
    ShardManifest,
    ShardResult,
    Stage,
    shard_attempt_key,
    shard_manifest_key,
    shard_result_key,
)
from imagebatch_common.contract import (
    WorkerEnv as Env,
)
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.fetch import Fetcher
from imagebatch_common.redact import redact_url
from imagebatch_common.storage import (
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
)
from imagebatch_common.urlguard import Resolver, system_resolver
from imagebatch_worker.compressors import Compressor, make_compressor
from imagebatch_worker.formats import (
    TARGET_FORMATS,
    CompressedImage,
    CompressParams,
    target_format_problem,
)
from imagebatch_worker.logs import JsonLog
from imagebatch_worker.memory import MIB, MemoryBudget, budget_for, memory_limit
from imagebatch_worker.settings import WorkerSettings

# User metadata stored with every output, so a retry that skips an existing image can
# still report its sizes and dimensions without downloading anything.
_META_SOURCE_BYTES = "imagebatch-source-bytes"
_META_SOURCE_FORMAT = "imagebatch-source-format"
_META_FORMAT = "imagebatch-format"
_META_WIDTH = "imagebatch-width"
_META_HEIGHT = "imagebatch-height"
_META_KEPT_ORIGINAL = "imagebatch-kept-original"

_EXTENSION_FORMATS = {extension: name for name, extension in FORMAT_EXTENSIONS.items()}


class ShardFailure(Exception):
    """The shard as a whole cannot finish; ``exit_code`` tells the Job what to do."""

    def __init__(self, exit_code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ShardLocation:
    """Which shard this process runs and where its manifest is: the Job's input."""

    bucket: str
    prefix: str  # the batch prefix, e.g. "ns/name/"
    run: str
    index: int

    @property
    def manifest_key(self) -> str:
        return shard_manifest_key(self.prefix, self.run, self.index)

    @property
    def result_key(self) -> str:
        return shard_result_key(self.prefix, self.run, self.index)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, index: int | None = None
    ) -> ShardLocation:
        """Read ``IMAGEBATCH_BUCKET/PREFIX/RUN`` and ``JOB_COMPLETION_INDEX`` (unless given)."""
        source = os.environ if env is None else env
        missing = [name.value for name in (Env.BUCKET, Env.RUN) if not source.get(name)]
        if index is None and not source.get(Env.SHARD_INDEX, "").strip():
            missing.append(f"{Env.SHARD_INDEX.value} (or --shard)")
        if missing:
            raise ValueError(f"missing shard settings: {', '.join(missing)}")
        if index is None:
            raw = source[Env.SHARD_INDEX].strip()
            if not raw.isdigit():
                raise ValueError(f"{Env.SHARD_INDEX.value}={raw!r} is not a shard index")
            index = int(raw)
        if index < 0:
            raise ValueError(f"shard index {index} is negative")
        return cls(
            bucket=source[Env.BUCKET],
            prefix=source.get(Env.PREFIX, ""),
            run=source[Env.RUN],
            index=index,
        )


@dataclass(frozen=True)
class _Outcome:
    result: ImageResult
    reason: Reason | None = None  # why it failed, for the log line


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


@dataclass(frozen=True)
class _Fetched:
    """A downloaded image waiting for a compression thread."""

    image: ShardImage
    data: bytes
    started: float  # monotonic time its work began, for the log line


@dataclass(frozen=True)
class _Encoded:
    """A compressed image waiting for an upload thread."""

    image: ShardImage
    compressed: CompressedImage
    input_bytes: int
    started: float


_DONE = None  # tells a stage's thread that no more work will come


class _Pipeline:
    """Downloads feed compression, compression feeds uploads, through short queues."""

    def __init__(
        self,
        runner: ShardRunner,
        manifest: ShardManifest,
        params: CompressParams,
        trust_absent: bool,
        budget: MemoryBudget,
    ) -> None:
        self.runner = runner
        self.manifest = manifest
        self.params = params
        self.trust_absent = trust_absent
        self.budget = budget
        self.settings = runner.settings
        self.stop = threading.Event()
        self.results: dict[str, ImageResult] = {}
        self.cpu_ms_to_first_fetch: float | None = None
        # Thread CPU seconds by stage, summed over the threads: where an image's CPU goes.
        self.cpu: dict[str, float] = dict.fromkeys(
            ("check", "download", "compress", "upload", "record"), 0.0
        )
        # Seconds the compression threads waited, summed: for downloads to arrive, for
        # uploads to take what they made. Either shows which stage holds the codec back.
        self.waited: dict[str, float] = {"for_downloads": 0.0, "for_uploads": 0.0}
        self._error: BaseException | None = None  # what stopped the shard, re-raised
        self._lock = threading.Lock()
        self._next = 0
        self._images: list[ShardImage] = []
        workers = self.settings.compress_workers
        # Two items per compression thread on each side keep those threads busy while
        # downloads or uploads catch up; more would only hold more bytes in memory.
        self._ready: queue.Queue[_Fetched | None] = queue.Queue(maxsize=2 * workers)
        self._encoded: queue.Queue[_Encoded | None] = queue.Queue(maxsize=2 * workers)

    def run(self, images: list[ShardImage]) -> dict[str, ImageResult]:
        self._images = images
        if not images:
            return self.results
        workers = self.settings.compress_workers
        compressor = make_compressor(self.settings.compress_in, workers, self.budget)
        with Fetcher(
            self.settings.fetch_settings(), resolver=self.runner.resolver, stop=self.stop
        ) as fetcher:
            downloaders = self._start(
                "fetch", min(self.settings.concurrency, len(images)), self._download, fetcher
            )
            compressors = self._start("compress", workers, self._compress, compressor)
            # Uploads wait on the storage server (its fsync, a large object): with as
            # many uploads in flight as downloads, compression does not wait for them.
            # Measured at 640x480: with 3 upload threads the compression threads spent
            # a third of their time waiting to hand images on, with 8 a tenth.
            uploaders = self._start(
                "upload", min(self.settings.concurrency, len(images)), self._upload, None
            )
            self._finish(downloaders, self._ready, compressors)
            self._finish(compressors, self._encoded, uploaders)
            self._finish(uploaders, None, [])
            compressor.close()
        if self._error is not None:
            raise self._error  # the first StorageError (or defect) stops the shard
        return self.results

    def _start(
        self, stage: str, count: int, work: Callable[[Any], None], tool: object
    ) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._guard, args=(work, tool), name=f"{stage}-{n}")
            for n in range(count)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _finish(
        self,
        threads: list[threading.Thread],
        feeds: queue.Queue[Any] | None,
        consumers: list[threading.Thread],
    ) -> None:
        """Wait for a stage's threads, then tell the next stage's threads to end."""
        for thread in threads:
            thread.join()
        if feeds is not None:
            for _ in consumers:
                self._hand(feeds, _DONE, consumers)

    def _hand(
        self,
        feeds: queue.Queue[Any],
        item: object,
        consumers: list[threading.Thread] | None = None,
    ) -> bool:
        """Put ``item`` in the next stage's queue; give up when the shard stops (or, for
        the end marker, when no consumer is left to take it)."""
        while True:
            try:
                feeds.put(item, timeout=0.5)
                return True
            except queue.Full:
                if item is not _DONE and self.stop.is_set():
                    return False
                if consumers is not None and not any(t.is_alive() for t in consumers):
                    return False

    def _guard(self, work: Callable[[Any], None], tool: object) -> None:
        try:
            work(tool)
        except BaseException as error:  # a StorageError, or a defect: stop the shard
            with self._lock:
                if self._error is None:
                    self._error = error
            self.stop.set()  # in-flight downloads give up at their next chunk

    def _take(self) -> ShardImage | None:
        with self._lock:
            if self._next >= len(self._images) or self.stop.is_set():
                return None
            image = self._images[self._next]
            self._next += 1
            if self.cpu_ms_to_first_fetch is None:
                self.cpu_ms_to_first_fetch = round(time.process_time() * 1000, 1)
            return image

    def _add_cpu(self, spent: dict[str, float]) -> None:
        with self._lock:
            for stage, seconds in spent.items():
                self.cpu[stage] += seconds

    def _record_as(self, image: ShardImage, outcome: _Outcome, started: float) -> None:
        self.results[image.key] = outcome.result
        self.runner._log_image(self.manifest, outcome, started)

    # -- the stages ---------------------------------------------------------------

    def _download(self, fetcher: Fetcher) -> None:
        spent = dict.fromkeys(("check", "download", "record"), 0.0)
        runner, manifest, params = self.runner, self.manifest, self.params
        problem = target_format_problem(params.format)
        clock = time.thread_time
        try:
            while (image := self._take()) is not None:
                started = time.monotonic()
                if problem is not None:
                    self._record_as(image, runner._failed(image, problem), started)
                    continue
                if not (self.trust_absent and image.stored is False):
                    before = clock()
                    existing = runner._existing_output(manifest.bucket, image.key, params.format)
                    spent["check"] += clock() - before
                    if existing is not None:
                        self._record_as(image, _Outcome(runner._skipped(image, existing)), started)
                        continue
                before = clock()
                try:
                    fetched = fetcher.fetch(image.url)
                except ImageFailure as failure:
                    self._record_as(image, runner._failed(image, failure), started)
                    continue
                except Exception as error:  # a defect must cost one image, not the shard
                    defect = ImageFailure(
                        Stage.FETCH, Reason.INTERNAL, f"unexpected {type(error).__name__}: {error}"
                    )
                    self._record_as(image, runner._failed(image, defect), started)
                    continue
                finally:
                    spent["download"] += clock() - before
                if not self._hand(self._ready, _Fetched(image, fetched.data, started)):
                    return
        finally:
            self._add_cpu(spent)

    def _compress(self, compressor: Compressor) -> None:
        spent = dict.fromkeys(("compress", "record"), 0.0)
        waited = dict.fromkeys(self.waited, 0.0)
        runner, params = self.runner, self.params
        clock, wall = time.thread_time, time.monotonic
        try:
            while True:
                before = wall()
                item = self._ready.get()
                waited["for_downloads"] += wall() - before
                if item is _DONE:
                    break
                if self.stop.is_set():
                    continue  # drain: the shard is stopping, nothing more is stored
                image, data = item.image, item.data
                before = clock()
                try:
                    compressed = compressor.compress(data, params)
                except ImageFailure as failure:
                    self._record_as(image, runner._failed(image, failure, len(data)), item.started)
                    continue
                except Exception as error:  # a defect must cost one image, not the shard
                    defect = ImageFailure(
                        Stage.DECODE, Reason.INTERNAL, f"unexpected {type(error).__name__}: {error}"
                    )
                    self._record_as(image, runner._failed(image, defect, len(data)), item.started)
                    continue
                finally:
                    spent["compress"] += clock() - before
                encoded = _Encoded(image, compressed, len(data), item.started)
                before = wall()
                if not self._hand(self._encoded, encoded):
                    return
                waited["for_uploads"] += wall() - before
        finally:
            self._add_cpu(spent)
            with self._lock:
                for reason, seconds in waited.items():
                    self.waited[reason] += seconds

    def _upload(self, _tool: object) -> None:
        spent = dict.fromkeys(("upload", "record"), 0.0)
        runner, manifest, params = self.runner, self.manifest, self.params
        clock = time.thread_time
        try:
            while (item := self._encoded.get()) is not _DONE:
                if self.stop.is_set():
                    continue  # drain: the shard is stopping, nothing more is stored
                before = clock()
                outcome = runner._store(
                    item.image, manifest, params, item.compressed, item.input_bytes
                )
                between = clock()
                self._record_as(item.image, outcome, item.started)
                spent["upload"] += between - before
                spent["record"] += clock() - between
        finally:
            self._add_cpu(spent)


class ShardRunner:
    """Runs shards with one set of settings against one MinIO."""

    def __init__(
        self,
        settings: WorkerSettings,
        storage: Storage,
        *,
        log: JsonLog | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.log = log or JsonLog()
        self.resolver = resolver

    def run(self, location: ShardLocation) -> int:
        """Process the shard at ``location``; return the process exit code."""
        started = time.monotonic()
        started_at = _now()
        try:
            manifest = self._load_manifest(location)
            results, stats = self._process(manifest)
            summary = {**self._summary(results, time.monotonic() - started), **stats}
            result = ShardResult(
                run=location.run,
                index=location.index,
                images=results,
                started_at=started_at,
                finished_at=_now(),
                extra={"summary": summary},
            )
            self.storage.put(
                location.bucket, location.result_key, result.to_json(), "application/json"
            )
        except ShardFailure as failure:
            self._log_shard_failure(location, failure.exit_code, failure.reason, failure.message)
            return failure.exit_code
        except StorageError as error:
            # Unreachable or refusing storage may recover: retry. A missing output bucket
            # (the manifest was readable, so its own bucket exists) will not.
            exit_code = EXIT_PERMANENT if isinstance(error, ObjectNotFound) else EXIT_RETRY
            reason = "storage-missing" if exit_code == EXIT_PERMANENT else "storage-unavailable"
            self._log_shard_failure(location, exit_code, reason, str(error))
            return exit_code
        self.log.emit(
            "shard",
            run=location.run,
            index=location.index,
            result_key=location.result_key,
            exit=EXIT_OK,
            **summary,
        )
        return EXIT_OK

    # -- manifest -------------------------------------------------------------

    def _load_manifest(self, location: ShardLocation) -> ShardManifest:
        try:
            data = self.storage.get(location.bucket, location.manifest_key)
        except ObjectNotFound as error:
            raise ShardFailure(
                EXIT_PERMANENT,
                "manifest-missing",
                f"no shard manifest at {location.bucket}/{location.manifest_key} ({error})",
            ) from error
        try:
            manifest = ShardManifest.from_json(data)
        except ValueError as error:
            raise ShardFailure(EXIT_PERMANENT, "manifest-malformed", str(error)) from error
        if (manifest.run, manifest.index) != (location.run, location.index):
            raise ShardFailure(
                EXIT_PERMANENT,
                "manifest-mismatch",
                f"manifest is for run {manifest.run!r} shard {manifest.index}, "
                f"expected run {location.run!r} shard {location.index}",
            )
        compression = manifest.compression
        problems = []
        if not isinstance(compression.quality, int) or not 1 <= compression.quality <= 100:
            problems.append(f"quality {compression.quality!r} is not in 1-100")
        if compression.format not in TARGET_FORMATS:
            problems.append(f"format {compression.format!r} is not one of {TARGET_FORMATS}")
        if compression.max_dimension is not None and (
            not isinstance(compression.max_dimension, int) or compression.max_dimension < 1
        ):
            problems.append(f"maxDimension {compression.max_dimension!r} is not a positive int")
        if problems:
            raise ShardFailure(EXIT_PERMANENT, "manifest-malformed", "; ".join(problems))
        return manifest

    # -- images ---------------------------------------------------------------

    def _process(
        self, manifest: ShardManifest
    ) -> tuple[tuple[ImageResult, ...], dict[str, object]]:
        """Produce every image of ``manifest``; return the results in manifest order
        and the pipeline's figures for the summary."""
        params = CompressParams.from_compression(manifest.compression, self.settings.max_pixels)
        # A URL repeated in the shard has one key: produce it once, report it per row.
        unique: dict[str, ShardImage] = {}
        for image in manifest.images:
            unique.setdefault(image.key, image)
        trust_absent = self._first_attempt(manifest)
        limit = memory_limit(self.settings.memory_limit)
        budget = MemoryBudget(budget_for(limit))
        pipeline = _Pipeline(self, manifest, params, trust_absent, budget)
        cpu_before = time.process_time()
        produced = pipeline.run(list(unique.values()))
        process_cpu = time.process_time() - cpu_before
        results = []
        for image in manifest.images:
            result = produced[image.key]
            results.append(result if result.url == image.url else replace(result, url=image.url))
        count = max(len(unique), 1)
        per_image = {stage: seconds * 1000 / count for stage, seconds in pipeline.cpu.items()}
        per_image["other"] = process_cpu * 1000 / count - sum(per_image.values())
        stats: dict[str, object] = {
            "cpu_ms_to_first_fetch": pipeline.cpu_ms_to_first_fetch,
            # Process CPU per distinct image while images flowed, by pipeline stage
            # ("other": thread start-up and hand-over, the allocator, the GIL).
            "cpu_ms_per_image": {stage: round(ms, 3) for stage, ms in per_image.items()},
            # Wall milliseconds the compression threads spent waiting, summed over them.
            "compress_waited_ms": {
                reason: round(seconds * 1000, 1) for reason, seconds in pipeline.waited.items()
            },
            "memory_limit_mib": round(limit / MIB) if limit else None,
            "memory_budget_mib": round(budget.total / MIB) if budget.total else None,
            "memory_peak_reserved_mib": round(budget.peak / MIB, 1),
            "images_waited_for_memory": budget.waited,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        return tuple(results), stats

    def _log_image(self, manifest: ShardManifest, outcome: _Outcome, started: float) -> None:
        result = outcome.result
        self.log.emit(
            "image",
            shard=manifest.index,
            url=redact_url(result.url),
            key=result.key,
            ok=result.ok,
            skipped=result.skipped,
            kept_original=result.kept_original,
            stage=result.stage or None,
            reason=outcome.reason.value if outcome.reason else None,
            error=result.error or None,
            bytes_in=result.input_bytes,
            bytes_out=result.output_bytes,
            format=result.format or None,
            width=result.width,
            height=result.height,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _store(
        self,
        image: ShardImage,
        manifest: ShardManifest,
        params: CompressParams,
        compressed: CompressedImage,
        input_bytes: int,
    ) -> _Outcome:
        key = image.key if params.format != "original" else f"{image.key}.{compressed.extension}"
        self.storage.put(
            manifest.bucket,
            key,
            compressed.data,
            compressed.content_type,
            metadata=self._metadata(compressed, input_bytes),
        )
        return _Outcome(
            ImageResult(
                url=image.url,
                key=key,
                ok=True,
                input_bytes=input_bytes,
                output_bytes=len(compressed.data),
                format=compressed.format,
                width=compressed.width,
                height=compressed.height,
                kept_original=compressed.kept_original,
            )
        )

    def _first_attempt(self, manifest: ShardManifest) -> bool:
        """Whether this is the shard's first attempt; leaves the marker that says so."""
        marker = shard_attempt_key(manifest.prefix, manifest.run, manifest.index)
        if self.storage.stat(manifest.bucket, marker) is not None:
            return False
        self.storage.put(manifest.bucket, marker, b"", "application/octet-stream")
        return True

    def _existing_output(self, bucket: str, key: str, target: str) -> ObjectInfo | None:
        """The stored output of a previous attempt or run, if there is one."""
        if target != "original":
            return self.storage.stat(bucket, key)
        # "original" keys end in the extension of the format sniffed back then.
        for candidate in self.storage.list_keys(bucket, f"{key}."):
            if candidate.rsplit(".", 1)[-1] in _EXTENSION_FORMATS:
                return self.storage.stat(bucket, candidate)
        return None

    @staticmethod
    def _metadata(compressed: CompressedImage, input_bytes: int) -> dict[str, str]:
        return {
            _META_SOURCE_BYTES: str(input_bytes),
            _META_SOURCE_FORMAT: compressed.source_format,
            _META_FORMAT: compressed.format,
            _META_WIDTH: str(compressed.width),
            _META_HEIGHT: str(compressed.height),
            _META_KEPT_ORIGINAL: "true" if compressed.kept_original else "false",
        }

    @staticmethod
    def _skipped(image: ShardImage, existing: ObjectInfo) -> ImageResult:
        meta = existing.metadata
        extension = existing.key.rsplit(".", 1)[-1]
        return ImageResult(
            url=image.url,
            key=existing.key,
            ok=True,
            input_bytes=_int(meta.get(_META_SOURCE_BYTES)),
            output_bytes=existing.size,
            format=meta.get(_META_FORMAT) or _EXTENSION_FORMATS.get(extension, ""),
            width=_int(meta.get(_META_WIDTH)),
            height=_int(meta.get(_META_HEIGHT)),
            kept_original=meta.get(_META_KEPT_ORIGINAL) == "true",
            skipped=True,
        )

    @staticmethod
    def _failed(image: ShardImage, failure: ImageFailure, input_bytes: int = 0) -> _Outcome:
        return _Outcome(
            ImageResult(
                url=image.url,
                key=image.key,
                ok=False,
                input_bytes=input_bytes,
                stage=failure.stage.value,
                error=failure.error,
            ),
            failure.reason,
        )

    # -- reporting ------------------------------------------------------------

    @staticmethod
    def _summary(results: tuple[ImageResult, ...], seconds: float) -> dict[str, object]:
        done = [r for r in results if r.ok and not r.skipped]
        output_megapixels = sum(r.width * r.height for r in done) / 1e6
        return {
            "images": len(results),
            "ok": sum(1 for r in results if r.ok),
            "failed": sum(1 for r in results if not r.ok),
            "skipped": sum(1 for r in results if r.skipped),
            "kept_original": sum(1 for r in results if r.kept_original),
            "bytes_in": sum(r.input_bytes for r in results),
            "bytes_out": sum(r.output_bytes for r in results),
            "ms": round(seconds * 1000, 1),
            "images_per_s": round(len(done) / seconds, 2) if seconds > 0 else 0.0,
            "output_megapixels_per_s": (
                round(output_megapixels / seconds, 2) if seconds > 0 else 0.0
            ),
        }

    def _log_shard_failure(
        self, location: ShardLocation, exit_code: int, reason: str, message: str
    ) -> None:
        self.log.emit(
            "shard_failed",
            run=location.run,
            index=location.index,
            reason=reason,
            error=message,
            exit=exit_code,
        )
