"""Run one shard: read its manifest, produce every image, write its result, pick the exit code.

The exit code is the contract with the Indexed Job (``contract.EXIT_*``):

* ``EXIT_OK`` once the result manifest is written, however many images failed: an
  image failure is data (recorded with its stage and reason), not a pod failure.
* ``EXIT_RETRY`` when the shard cannot finish now (MinIO unreachable or refusing):
  the Job runs the index again, and the retry skips every image already stored.
* ``EXIT_PERMANENT`` when the shard can never finish (manifest missing, unreadable,
  for another shard): the Job's podFailurePolicy fails the index at once.

Images flow through a pool of threads, each taking one image from download through
compression to upload, so network waits of some images overlap the compression of
others. Compression itself is bounded to the CPUs the pod may use (``compressors``):
more would only make images wait on each other and hold more decoded pixels in memory.
Pillow releases the GIL while decoding, resizing and (into a file descriptor) encoding,
which is what lets threads use every core; ``tests/bench/bench_worker.py`` measures it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import UTC, datetime

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
from imagebatch_worker.compress import (
    TARGET_FORMATS,
    CompressedImage,
    CompressParams,
    target_format_problem,
)
from imagebatch_worker.compressors import Compressor, make_compressor
from imagebatch_worker.logs import JsonLog
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
            results = self._process(manifest)
            result = ShardResult(
                run=location.run,
                index=location.index,
                images=results,
                started_at=started_at,
                finished_at=_now(),
                extra={"summary": self._summary(results, time.monotonic() - started)},
            )
            self.storage.put(
                location.bucket, location.result_key, result.to_json(), "application/json"
            )
        except ShardFailure as failure:
            self._log_shard_failure(location, failure.exit_code, failure.reason, failure.message)
            return failure.exit_code
        except StorageError as error:
            # Unreachable or refusing MinIO may recover: retry. A missing output bucket
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
            **self._summary(results, time.monotonic() - started),
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

    def _process(self, manifest: ShardManifest) -> tuple[ImageResult, ...]:
        params = CompressParams.from_compression(manifest.compression, self.settings.max_pixels)
        # A URL repeated in the shard has one key: produce it once, report it per row.
        unique: dict[str, ShardImage] = {}
        for image in manifest.images:
            unique.setdefault(image.key, image)
        trust_absent = self._first_attempt(manifest)
        stop = threading.Event()
        compressor = make_compressor(self.settings.compress_in, self.settings.compress_workers)
        with Fetcher(self.settings.fetch_settings(), resolver=self.resolver, stop=stop) as fetcher:
            pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="image")
            futures: dict[str, Future[ImageResult]] = {
                key: pool.submit(
                    self._process_image, image, manifest, params, fetcher, compressor, trust_absent
                )
                for key, image in unique.items()
            }
            try:
                for future in as_completed(futures.values()):
                    future.result()  # the first StorageUnavailable stops the shard
            except BaseException:
                stop.set()  # in-flight downloads give up at their next chunk
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                compressor.close()
            pool.shutdown(wait=True)
        return tuple(
            replace(futures[image.key].result(), url=image.url) for image in manifest.images
        )

    def _process_image(
        self,
        image: ShardImage,
        manifest: ShardManifest,
        params: CompressParams,
        fetcher: Fetcher,
        compressor: Compressor,
        trust_absent: bool,
    ) -> ImageResult:
        started = time.monotonic()
        outcome = self._produce(image, manifest, params, fetcher, compressor, trust_absent)
        result = outcome.result
        self.log.emit(
            "image",
            shard=manifest.index,
            url=redact_url(image.url),
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
        return result

    def _produce(
        self,
        image: ShardImage,
        manifest: ShardManifest,
        params: CompressParams,
        fetcher: Fetcher,
        compressor: Compressor,
        trust_absent: bool,
    ) -> _Outcome:
        problem = target_format_problem(params.format)
        if problem is not None:
            return self._failed(image, problem)
        if not (trust_absent and image.stored is False):
            existing = self._existing_output(manifest.bucket, image.key, params.format)
            if existing is not None:
                return _Outcome(self._skipped(image, existing))
        input_bytes = 0
        try:
            fetched = fetcher.fetch(image.url)
            input_bytes = len(fetched.data)
            compressed = compressor.compress(fetched.data, params)
        except ImageFailure as failure:
            return self._failed(image, failure, input_bytes)
        except Exception as error:  # a defect must cost one image, not the whole shard
            defect = ImageFailure(
                Stage.FETCH if input_bytes == 0 else Stage.DECODE,
                Reason.INTERNAL,
                f"unexpected {type(error).__name__}: {error}",
            )
            return self._failed(image, defect, input_bytes)
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
