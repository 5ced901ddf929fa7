"""One look at one ImageBatch: observe, act idempotently, write the status if it changed.

The handler calls ``Reconciler.reconcile`` in a loop. Nothing here is remembered that
cannot be rebuilt: the run id comes from the spec generation, totals from the status,
shard results from MinIO, progress from the Job. ``RunCache`` only saves re-reading a
shard result that was already read; after a restart it is refilled from MinIO.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from imagebatch_common.contract import (
    ImageResult,
    ShardManifest,
    ShardResult,
    errors_csv_key,
    output_csv_key,
    run_prefix,
    shard_manifest_key,
    shard_result_key,
)
from imagebatch_common.contract import (
    Stage as ImageStage,
)
from imagebatch_common.storage import ObjectNotFound, Storage
from imagebatch_operator import csvinput, plan, results, webhook
from imagebatch_operator.kube import Kube
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import SourceUnavailable, UrlOpener, describe, open_source
from imagebatch_operator.status import (
    Counts,
    Observation,
    Reason,
    Stage,
    compute_status,
    differs,
    set_condition,
    webhook_condition_status,
)

log = logging.getLogger("imagebatch.reconcile")

IDLE_SECONDS = 30.0
SOURCE_RETRY_SECONDS = 10.0


class Events(Protocol):
    """Where user-facing Events go (kopf posts them on the ImageBatch)."""

    def normal(self, reason: str, message: str) -> None: ...

    def warning(self, reason: str, message: str) -> None: ...


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_indexes(text: str | None) -> set[int]:
    """The Job's ``completedIndexes`` / ``failedIndexes`` notation, e.g. ``"0-2,5"``."""
    found: set[int] = set()
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            found.update(range(int(low), int(high) + 1))
        else:
            found.add(int(part))
    return found


def row_to_json(row: csvinput.Row) -> str:
    return json.dumps([row.line, row.serial, row.product, list(row.urls), row.raw_urls])


def row_from_json(line: bytes) -> csvinput.Row:
    number, serial, product, urls, raw = json.loads(line)
    return csvinput.Row(int(number), int(serial), str(product), tuple(urls), str(raw))


def rows_key(prefix: str, run: str) -> str:
    return f"{run_prefix(prefix, run)}rows.jsonl"


@dataclass
class RunCache:
    """What one operator process has already read for the current run."""

    run: str = ""
    results: dict[int, ShardResult] = field(default_factory=dict)
    last_write: float = 0.0
    writes: int = 0


@dataclass(frozen=True)
class Batch:
    """The parts of an ImageBatch object one pass needs."""

    ref: plan.BatchRef
    spec: Mapping[str, Any]
    status: Mapping[str, Any]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Batch:
        meta = body["metadata"]
        return cls(
            ref=plan.BatchRef(
                namespace=meta["namespace"],
                name=meta["name"],
                uid=meta["uid"],
                generation=int(meta.get("generation") or 1),
            ),
            spec=body.get("spec") or {},
            status=body.get("status") or {},
        )


class Reconciler:
    """Drives one batch from its spec to a terminal status and a delivered webhook."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        storage: Storage,
        open_url: UrlOpener,
        poster: webhook.Poster,
    ):
        self.settings = settings
        self.kube = kube
        self.storage = storage
        self.open_url = open_url
        self.poster = poster
        self.rng = random.Random()  # noqa: S311 - jitter, not secrecy

    # -- status ---------------------------------------------------------------

    def write(
        self, batch: Batch, obs: Observation, cache: RunCache, *, progress: bool = False
    ) -> dict[str, Any]:
        """Compute the status; patch it only when it differs from what is stored.

        A ``progress`` write (counters of a running batch) is also held back until
        ``min_write_seconds`` have passed since the last one, so a busy batch costs the
        API server about one write a second; transitions are always written at once.
        """
        computed = compute_status(batch.status, obs, utcnow())
        if not differs(batch.status, computed):
            return computed
        if progress and time.monotonic() - cache.last_write < self.settings.min_write_seconds:
            return dict(batch.status)
        self.kube.patch_status(batch.ref.namespace, batch.ref.name, computed)
        cache.last_write = time.monotonic()
        cache.writes += 1
        log.info(
            "status %s/%s written: phase=%s images=%s/%s (write %d of this run)",
            batch.ref.namespace,
            batch.ref.name,
            computed["phase"],
            computed["images"]["succeeded"],
            computed["images"]["total"],
            cache.writes,
        )
        return computed

    def url_of(self, bucket: str) -> Callable[[str], str]:
        """Public URL of an object: under the public base, else a presigned GET."""
        if self.settings.public_url:
            base = self.settings.public_url
            return lambda key: f"{base}/{key}"
        expires = datetime.timedelta(seconds=self.settings.presign_seconds)
        client = self.storage.client
        return lambda key: str(client.presigned_get_object(bucket, key, expires=expires))

    # -- the pass -------------------------------------------------------------

    def reconcile(self, body: Mapping[str, Any], cache: RunCache, events: Events) -> float:
        """One look; returns how many seconds until the next one is worthwhile."""
        batch = Batch.from_body(body)
        run = plan.run_id(batch.ref)
        status = batch.status
        same_run = (
            status.get("run") == run and status.get("observedGeneration") == batch.ref.generation
        )
        if same_run and status.get("phase") in ("Succeeded", "Failed"):
            return self.after_completion(batch, events)
        if cache.run != run:
            cache.run, cache.results, cache.writes = run, {}, 0
        if same_run and status.get("phase") == "Running":
            return self.follow(batch, run, cache, events)
        return self.start_run(batch, run, cache, events)

    def start_run(self, batch: Batch, run: str, cache: RunCache, events: Events) -> float:
        """Validate the CSV, write shard manifests, create the run's Job."""
        ref = batch.ref
        webhook_configured = bool((batch.spec.get("webhook") or {}).get("url"))
        base = Observation(
            generation=ref.generation,
            stage=Stage.VALIDATING,
            run=run,
            webhook_configured=webhook_configured,
            start_time=utcnow(),
            webhook=(webhook.fresh_record(ref.uid, run) if webhook_configured else None),
            webhook_state=Reason.WEBHOOK_PENDING if webhook_configured else None,
            webhook_message="sent when every shard has finished" if webhook_configured else "",
        )
        batch = Batch(ref, batch.spec, self.write(batch, base, cache))
        bucket = plan.output_bucket(batch.spec, self.settings)
        prefix = plan.output_prefix(batch.spec, ref)
        compression = plan.compression_of(batch.spec)
        source = batch.spec.get("source") or {}
        self.storage.ensure_bucket(bucket)
        problems: list[csvinput.CsvProblem] = []
        images: dict[str, str] = {}
        rows = 0
        with tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False) as spool:
            try:
                chunks = open_source(source, ref.namespace, self.kube, self.storage, self.open_url)
                for row in csvinput.parse(chunks, self.settings.csv_limits, problems):
                    rows += 1
                    spool.write(row_to_json(row) + "\n")
                    for url in row.urls:
                        if url not in images:
                            images[url] = ""
            except SourceUnavailable as error:
                message = f"cannot read the CSV from {describe(source)}: {error}"
                events.warning(Reason.SOURCE_UNAVAILABLE, message)
                self.write(
                    batch,
                    Observation(
                        generation=ref.generation,
                        stage=Stage.SOURCE_UNAVAILABLE,
                        run=run,
                        message=message,
                        webhook_configured=webhook_configured,
                        start_time=base.start_time,
                    ),
                    cache,
                )
                os.unlink(spool.name)
                return SOURCE_RETRY_SECONDS
            spool_name = spool.name
        try:
            if rows == 0 and not problems:
                problems.append(csvinput.CsvProblem(2, "", "the CSV has a header but no data rows"))
            if problems:
                return self.reject(batch, run, bucket, prefix, problems, cache, events, base)
            keys = plan.unique_images(images, prefix, compression)
            per_shard = int((batch.spec.get("sharding") or {}).get("imagesPerShard", 100))
            manifests = plan.shard_manifests(
                keys,
                run=run,
                bucket=bucket,
                prefix=prefix,
                compression=compression,
                per_shard=per_shard,
                stored=self.stored_keys(bucket, prefix),
            )
            self.storage.put_file(bucket, rows_key(prefix, run), spool_name, "application/x-ndjson")
        finally:
            os.unlink(spool_name)
        # Many small PUTs: overlap their round trips.
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(
                pool.map(
                    lambda m: self.storage.put(
                        bucket,
                        shard_manifest_key(prefix, run, m.index),
                        m.to_json(),
                        "application/json",
                    ),
                    manifests,
                )
            )
        self.kube.ensure_secret(plan.build_storage_secret(ref, self.settings))
        job = plan.build_job(
            ref,
            batch.spec,
            self.settings,
            run=run,
            shards=len(manifests),
            bucket=bucket,
            prefix=prefix,
        )
        self.kube.ensure_job(job)
        replaced = self.kube.delete_other_jobs(
            ref.namespace, job["metadata"]["labels"][plan.LABEL_BATCH], job["metadata"]["name"]
        )
        if replaced:
            events.normal("RunReplaced", f"spec changed: deleted Job(s) {', '.join(replaced)}")
        events.normal(
            "JobCreated",
            f"run {run}: {rows} rows, {len(keys)} distinct images in {len(manifests)} shards, "
            f"Job {job['metadata']['name']}",
        )
        running = Observation(
            generation=ref.generation,
            stage=Stage.RUNNING,
            run=run,
            suspended=bool(batch.spec.get("suspend")),
            rows=Counts(total=rows),
            images=Counts(total=len(keys)),
            shards=Counts(total=len(manifests)),
            webhook_configured=webhook_configured,
            start_time=base.start_time,
        )
        self.write(batch, running, cache)
        return self.settings.poll_seconds

    def stored_keys(self, bucket: str, prefix: str) -> set[str]:
        """Output keys already in storage (one LIST per thousand), extensions also cut off.

        Keys of format ``original`` are planned without the extension the worker adds.
        """
        keys = set(self.storage.list_keys(bucket, f"{prefix}images/"))
        return keys | {key.rsplit(".", 1)[0] for key in keys}

    def reject(
        self,
        batch: Batch,
        run: str,
        bucket: str,
        prefix: str,
        problems: list[csvinput.CsvProblem],
        cache: RunCache,
        events: Events,
        base: Observation,
    ) -> float:
        """An invalid CSV: every problem in errors.csv, the first few in the status."""
        report = results.to_csv(
            [list(results.ERROR_COLUMNS)]
            + [
                [
                    str(p.row),
                    "",
                    ImageStage.VALIDATE.value,
                    f"{p.column}: {p.message}" if p.column else p.message,
                ]
                for p in problems
            ]
        )
        self.storage.put(bucket, errors_csv_key(prefix), b"".join(report), "text/csv")
        first = problems[0]
        where = f"row {first.row}" + (f", column {first.column!r}" if first.column else "")
        message = f"{len(problems)} problem(s) in the CSV; first at {where}: {first.message}"
        events.warning(Reason.INVALID_CSV, message)
        output = {"errors": f"s3://{bucket}/{errors_csv_key(prefix)}"}
        if self.settings.public_url:
            output["errorsUrl"] = f"{self.settings.public_url}/{errors_csv_key(prefix)}"
        self.write(
            batch,
            Observation(
                generation=batch.ref.generation,
                stage=Stage.INVALID,
                run=run,
                message=message,
                problems=tuple(
                    p.as_status() for p in problems[: self.settings.status_problem_count]
                ),
                output=output,
                webhook_configured=base.webhook_configured,
                start_time=base.start_time,
                completion_time=utcnow(),
            ),
            cache,
        )
        return IDLE_SECONDS

    def _shard_result(self, bucket: str, prefix: str, run: str, index: int) -> ShardResult | None:
        try:
            return ShardResult.from_json(
                self.storage.get(bucket, shard_result_key(prefix, run, index))
            )
        except ObjectNotFound:
            return None
        except ValueError:
            return None

    def _failed_shard(
        self, bucket: str, prefix: str, run: str, index: int, why: str
    ) -> ShardResult:
        """A shard that never finished: each of its images is reported failed."""
        manifest = ShardManifest.from_json(
            self.storage.get(bucket, shard_manifest_key(prefix, run, index))
        )
        return ShardResult(
            run=run,
            index=index,
            images=tuple(
                ImageResult(url=i.url, key=i.key, ok=False, stage=ImageStage.SHARD.value, error=why)
                for i in manifest.images
            ),
        )

    def follow(self, batch: Batch, run: str, cache: RunCache, events: Events) -> float:
        """Track the run's Job and shard results; finish when the Job is done."""
        ref = batch.ref
        bucket = plan.output_bucket(batch.spec, self.settings)
        prefix = plan.output_prefix(batch.spec, ref)
        name = plan.job_name(ref)
        job = self.kube.read_job(ref.namespace, name)
        shards_total = int((batch.status.get("shards") or {}).get("total", 0))
        if job is None:
            # Deleted under us: recreate it; finished shards are skipped by the worker.
            self.kube.ensure_job(
                plan.build_job(
                    ref,
                    batch.spec,
                    self.settings,
                    run=run,
                    shards=shards_total,
                    bucket=bucket,
                    prefix=prefix,
                )
            )
            events.warning("JobRecreated", f"Job {name} was missing and has been recreated")
            return self.settings.poll_seconds
        suspend = bool(batch.spec.get("suspend"))
        if bool(job["spec"].get("suspend")) != suspend:
            self.kube.set_job_suspend(ref.namespace, name, suspend)
        job_status = job.get("status") or {}
        completed = parse_indexes(job_status.get("completedIndexes"))
        failed = parse_indexes(job_status.get("failedIndexes"))
        for index in sorted(completed - cache.results.keys()):
            result = self._shard_result(bucket, prefix, run, index)
            cache.results[index] = (
                result
                if result is not None
                else self._failed_shard(
                    bucket, prefix, run, index, "the shard finished without writing its result"
                )
            )
        conditions = {c["type"]: c["status"] for c in job_status.get("conditions") or []}
        done = conditions.get("Complete") == "True" or conditions.get("Failed") == "True"
        if done:
            retries = int((batch.spec.get("sharding") or {}).get("retriesPerShard", 3))
            for index in sorted(failed - cache.results.keys()):
                cache.results[index] = self._failed_shard(
                    bucket, prefix, run, index, f"the shard failed after {retries + 1} attempt(s)"
                )
            for index in range(shards_total):
                if index not in cache.results:
                    cache.results[index] = self._failed_shard(
                        bucket, prefix, run, index, "the Job finished without running this shard"
                    )
            return self.finish(batch, run, bucket, prefix, cache, events)
        obs = self.progress(
            batch,
            run,
            cache,
            Stage.RUNNING,
            suspend,
            len(completed),
            len(failed),
            int(job_status.get("active") or 0),
        )
        self.write(batch, obs, cache, progress=True)
        return self.settings.poll_seconds

    def progress(
        self,
        batch: Batch,
        run: str,
        cache: RunCache,
        stage: Stage,
        suspended: bool,
        shards_ok: int,
        shards_failed: int,
        active: int,
        **extra: Any,
    ) -> Observation:
        ok = failed = skipped = bytes_in = bytes_out = 0
        for shard in cache.results.values():
            for image in shard.images:
                if image.ok:
                    ok += 1
                    skipped += image.skipped
                    bytes_in += image.input_bytes
                    bytes_out += image.output_bytes
                else:
                    failed += 1
        status = batch.status
        totals = {
            k: int((status.get(k) or {}).get("total", 0)) for k in ("rows", "images", "shards")
        }
        return Observation(
            generation=batch.ref.generation,
            stage=stage,
            run=run,
            suspended=suspended,
            rows=extra.pop("rows", Counts(total=totals["rows"])),
            images=Counts(total=totals["images"], succeeded=ok, failed=failed, skipped=skipped),
            shards=Counts(
                total=totals["shards"], succeeded=shards_ok, failed=shards_failed, active=active
            ),
            input_bytes=bytes_in,
            output_bytes=bytes_out,
            webhook_configured=bool((batch.spec.get("webhook") or {}).get("url")),
            start_time=status.get("startTime"),
            **extra,
        )

    def _rows(self, bucket: str, prefix: str, run: str) -> Iterator[csvinput.Row]:
        response = self.storage.client.get_object(bucket, rows_key(prefix, run))
        try:
            pending = b""
            for chunk in response.stream(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line:
                        yield row_from_json(line)
            if pending.strip():
                yield row_from_json(pending)
        finally:
            response.close()
            response.release_conn()

    def finish(
        self, batch: Batch, run: str, bucket: str, prefix: str, cache: RunCache, events: Events
    ) -> float:
        """Merge the shard results into output.csv and errors.csv; final status; Events."""
        by_url = {image.url: image for shard in cache.results.values() for image in shard.images}
        tally: list[results.RowTally] = []
        url_of = self.url_of(bucket)
        for key, rows in (
            (
                output_csv_key(prefix),
                results.output_rows(self._rows(bucket, prefix, run), by_url, url_of, tally),
            ),
            (errors_csv_key(prefix), results.error_rows(self._rows(bucket, prefix, run), by_url)),
        ):
            with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as out:
                for piece in results.to_csv(rows):
                    out.write(piece)
            try:
                self.storage.put_file(bucket, key, out.name, "text/csv")
            finally:
                os.unlink(out.name)
        rows_tally = tally[0] if tally else results.RowTally()
        failed_shards = sum(
            1
            for s in cache.results.values()
            if any(i.stage == ImageStage.SHARD.value for i in s.images)
        )
        total_images = len(by_url)
        failed_images = sum(1 for i in by_url.values() if not i.ok)
        limit = float((batch.spec.get("failurePolicy") or {}).get("maxFailedImagePercent", 10))
        percent = 100.0 * failed_images / total_images if total_images else 0.0
        stage = Stage.FAILED if percent > limit else Stage.SUCCEEDED
        message = (
            f"{failed_images} of {total_images} images failed ({percent:.1f}%), above the "
            f"limit of {limit:g}%; see errors.csv"
            if stage is Stage.FAILED
            else ""
        )
        output = {
            "csv": f"s3://{bucket}/{output_csv_key(prefix)}",
            "errors": f"s3://{bucket}/{errors_csv_key(prefix)}",
        }
        if self.settings.public_url:
            output["csvUrl"] = f"{self.settings.public_url}/{output_csv_key(prefix)}"
            output["errorsUrl"] = f"{self.settings.public_url}/{errors_csv_key(prefix)}"
        obs = self.progress(
            batch,
            run,
            cache,
            stage,
            False,
            len(cache.results) - failed_shards,
            failed_shards,
            0,
            rows=Counts(
                total=rows_tally.rows, succeeded=rows_tally.rows_ok, failed=rows_tally.rows_failed
            ),
            message=message,
            output=output,
            completion_time=utcnow(),
        )
        status = self.write(batch, obs, cache)
        summary = (
            f"{obs.images.succeeded}/{obs.images.total} images compressed, {obs.images.failed} "
            f"failed; output at {output['csv']}"
        )
        if stage is Stage.SUCCEEDED:
            events.normal("Succeeded", summary)
        else:
            events.warning("Failed", message)
        finished = Batch(batch.ref, batch.spec, status)
        return self.after_completion(finished, events)

    # -- webhook --------------------------------------------------------------

    def after_completion(self, batch: Batch, events: Events) -> float:
        """Deliver the webhook once per run; nothing else is left to do."""
        hook = batch.spec.get("webhook") or {}
        record = dict(batch.status.get("webhook") or {})
        run = str(batch.status.get("run"))
        if not hook.get("url") or (
            record.get("run") == run and (record.get("deliveredTime") or record.get("gaveUp"))
        ):
            return IDLE_SECONDS
        self.deliver(batch, hook, events)
        return IDLE_SECONDS

    def deliver(self, batch: Batch, hook: Mapping[str, Any], events: Events) -> None:
        ref = batch.ref
        status = dict(batch.status)
        run = str(status.get("run"))
        record = dict(status.get("webhook") or {})
        if record.get("run") != run:
            record = {"run": run, "attempts": 0}
        record.setdefault("id", webhook.webhook_id(ref.uid, run))
        record.setdefault("attempts", 0)
        secret = None
        secret_ref = hook.get("secretRef")
        if secret_ref:
            secret = self.kube.secret_value(ref.namespace, secret_ref["name"], secret_ref["key"])
            if secret is None:
                events.warning(
                    Reason.WEBHOOK_FAILED,
                    f"webhook secret {secret_ref['name']}/{secret_ref['key']} not found; not sent",
                )
        bucket = plan.output_bucket(batch.spec, self.settings)
        prefix = plan.output_prefix(batch.spec, ref)
        url_of = self.url_of(bucket)
        body = webhook.encode(
            webhook.build_payload(
                namespace=ref.namespace,
                name=ref.name,
                uid=ref.uid,
                run=run,
                phase=str(status.get("phase")),
                rows=status.get("rows") or {},
                images=status.get("images") or {},
                shards=status.get("shards") or {},
                # An invalid CSV has an error report but no output.csv.
                output_csv_url=(
                    url_of(output_csv_key(prefix))
                    if (status.get("output") or {}).get("csv")
                    else ""
                ),
                errors_csv_url=url_of(errors_csv_key(prefix)),
                completion_time=str(status.get("completionTime") or utcnow()),
            )
        )
        while record["attempts"] < self.settings.webhook_attempts:
            if secret_ref and secret is None:
                break
            number = int(record["attempts"]) + 1
            when = datetime.datetime.now(datetime.UTC)
            attempt = webhook.attempt_delivery(
                self.poster,
                str(hook["url"]),
                body,
                webhook.headers(str(record["id"]), body, secret, when),
                number,
                self.settings.webhook_timeout_seconds,
                utcnow,
            )
            record.update(attempts=number, lastAttemptTime=attempt.time)
            record["lastStatusCode"] = attempt.status_code
            record["lastError"] = attempt.error or None
            if attempt.delivered:
                record["deliveredTime"] = attempt.time
                state, msg = (
                    Reason.WEBHOOK_DELIVERED,
                    f"delivered on attempt {number} (HTTP {attempt.status_code})",
                )
            elif attempt.status_code == 410:
                record["gaveUp"] = True
                state, msg = Reason.WEBHOOK_GONE, "the receiver answered 410 Gone; not retried"
            elif not attempt.retry or number >= self.settings.webhook_attempts:
                record["gaveUp"] = True
                state, msg = (
                    Reason.WEBHOOK_FAILED,
                    f"attempt {number} failed: {attempt.error}; not retried",
                )
            else:
                state, msg = (
                    Reason.WEBHOOK_RETRYING,
                    f"attempt {number} failed: {attempt.error}; retrying",
                )
            status = self._write_webhook(batch, status, record, state, msg)
            if state is Reason.WEBHOOK_DELIVERED:
                events.normal("WebhookDelivered", msg)
                return
            if record.get("gaveUp"):
                events.warning(state, msg)
                return
            time.sleep(
                webhook.backoff(
                    number, self.settings.webhook_backoff_seconds, attempt.retry_after, self.rng
                )
            )
        record["gaveUp"] = True
        self._write_webhook(batch, status, record, Reason.WEBHOOK_FAILED, "not delivered")

    def _write_webhook(
        self,
        batch: Batch,
        status: Mapping[str, Any],
        record: Mapping[str, Any],
        state: Reason,
        message: str,
    ) -> dict[str, Any]:
        """Patch only the webhook record and its condition; the rest of the status stands."""
        conds = set_condition(
            status.get("conditions") or [],
            "WebhookDelivered",
            webhook_condition_status(state),
            state,
            message,
            batch.ref.generation,
            utcnow(),
        )
        patch = {"webhook": dict(record), "conditions": conds}
        self.kube.patch_status(batch.ref.namespace, batch.ref.name, patch)
        return {**status, **patch}
