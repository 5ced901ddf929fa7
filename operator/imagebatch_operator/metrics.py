"""Prometheus metrics of the operator, served on a port of their own.

Names follow the Prometheus conventions with an ``imagebatch_`` prefix; no label holds a
batch's name or namespace, so the number of series stays fixed however many batches a
cluster keeps. What is counted:

* ``imagebatch_batches{phase}``: batches by phase, read from the watch cache at scrape time;
* ``imagebatch_images_total{result}`` and ``imagebatch_image_bytes_total{direction}``:
  images processed (succeeded, failed, skipped) and bytes in and out, as each shard's
  result is read;
* ``imagebatch_runs_started_total`` and ``imagebatch_runs_finished_total{outcome}``;
* ``imagebatch_reconcile_total{result}`` and ``imagebatch_reconcile_duration_seconds``:
  reconcile passes, like controller-runtime's ``controller_runtime_reconcile_total``;
* ``imagebatch_workqueue_depth`` and ``imagebatch_workqueue_delayed``: batches waiting
  to be looked at now, and at a later time; ``imagebatch_expensive_tasks``: CSVs being
  validated or results merged;
* ``imagebatch_webhook_deliveries_total{outcome}``;
* ``imagebatch_kubernetes_requests_total{verb,resource,code}``, counted in the adapter;
* ``imagebatch_storage_requests_total{operation,outcome}``, counted around the adapter.

Counters start at zero with each operator process, as Prometheus expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagebatch_common.storage import ObjectNotFound, Storage, StorageError
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator.status import Phase, Reason

PHASES = tuple(phase.value for phase in Phase)


class Metrics:
    """Every metric of one operator process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.images = Counter(
            "imagebatch_images_total",
            "Images processed, by result (succeeded, failed, skipped: already stored).",
            ["result"],
            registry=r,
        )
        self.image_bytes = Counter(
            "imagebatch_image_bytes_total",
            "Bytes of processed images: in (downloaded) and out (stored).",
            ["direction"],
            registry=r,
        )
        self.runs_started = Counter(
            "imagebatch_runs_started_total",
            "Runs started (one per spec that changes the output).",
            registry=r,
        )
        self.runs_finished = Counter(
            "imagebatch_runs_finished_total",
            "Runs finished, by outcome (succeeded, failed, invalid, refused).",
            ["outcome"],
            registry=r,
        )
        self.reconciles = Counter(
            "imagebatch_reconcile_total",
            "Reconcile passes, by result (ok, retry: a server was unreachable, error).",
            ["result"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "imagebatch_reconcile_duration_seconds",
            "Seconds one reconcile pass took.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.webhooks = Counter(
            "imagebatch_webhook_deliveries_total",
            "Webhook delivery attempts, by outcome (delivered, retrying, failed, gone).",
            ["outcome"],
            registry=r,
        )
        self.kube_requests = Counter(
            "imagebatch_kubernetes_requests_total",
            "Kubernetes API requests, by verb, resource and answer (HTTP code, ok, unreachable).",
            ["verb", "resource", "code"],
            registry=r,
        )
        self.storage_requests = Counter(
            "imagebatch_storage_requests_total",
            "Object storage requests, by operation and outcome (ok, not_found, unavailable).",
            ["operation", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagebatch_workqueue_depth", "Batches waiting to be looked at now.", registry=r
        )
        self.queue_delayed = Gauge(
            "imagebatch_workqueue_delayed",
            "Batches waiting for a later look (a webhook retry, a resync).",
            registry=r,
        )
        self.expensive = Gauge(
            "imagebatch_expensive_tasks",
            "CSVs being validated or results being merged right now (running or queued).",
            registry=r,
        )
        for result in ("succeeded", "failed", "skipped"):
            self.images.labels(result)
        for direction in ("in", "out"):
            self.image_bytes.labels(direction)
        for result in ("ok", "retry", "error"):
            self.reconciles.labels(result)

    def watch_batches(self, phases: Callable[[], Mapping[str, int]]) -> None:
        """Report ``imagebatch_batches{phase}`` from ``phases()`` at each scrape."""
        self.registry.register(_PhaseCollector(phases))

    def watch_queue(
        self, depth: Callable[[], int], delayed: Callable[[], int], expensive: Callable[[], int]
    ) -> None:
        self.queue_depth.set_function(lambda: float(depth()))
        self.queue_delayed.set_function(lambda: float(delayed()))
        self.expensive.set_function(lambda: float(expensive()))

    def finished(self, phase: str, reason: str) -> None:
        """Count a run that just ended, from its final phase and Ready reason."""
        if phase == Phase.SUCCEEDED:
            outcome = "succeeded"
        elif reason == Reason.INVALID_CSV:
            outcome = "invalid"
        elif reason == Reason.TOO_MANY_FAILED_IMAGES:
            outcome = "failed"
        else:
            outcome = "refused"
        self.runs_finished.labels(outcome).inc()

    def serve(self, port: int, address: str) -> None:
        """Serve ``/metrics`` on ``address:port`` from a thread of its own."""
        start_http_server(port, addr=address, registry=self.registry)


class _PhaseCollector(Collector):
    def __init__(self, phases: Callable[[], Mapping[str, int]]) -> None:
        self.phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "imagebatch_batches", "ImageBatches the operator knows of, by phase.", labels=["phase"]
        )
        counts = dict.fromkeys(PHASES, 0)
        counts.update(self.phases())
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], float(count))
        yield family


class MeteredStorage(Storage):
    """The storage adapter, with every request counted by operation and outcome."""

    def __init__(self, settings: StorageSettings, metrics: Metrics) -> None:
        super().__init__(settings)
        self._counter = metrics.storage_requests

    def _count(self, operation: str, call: Callable[[], object]) -> object:
        try:
            result = call()
        except ObjectNotFound:
            self._counter.labels(operation, "not_found").inc()
            raise
        except StorageError:
            self._counter.labels(operation, "unavailable").inc()
            raise
        self._counter.labels(operation, "ok").inc()
        return result

    def ensure_bucket(self, bucket: str) -> None:
        self._count("ensure_bucket", lambda: super(MeteredStorage, self).ensure_bucket(bucket))

    def get(self, bucket: str, key: str) -> bytes:
        data = self._count("get", lambda: super(MeteredStorage, self).get(bucket, key))
        assert isinstance(data, bytes)
        return data

    def stream(self, bucket: str, key: str, chunk: int = 256 * 1024) -> Iterator[bytes]:
        opened = self._count("get", lambda: super(MeteredStorage, self).stream(bucket, key, chunk))
        return opened  # type: ignore[return-value]

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._count(
            "put",
            lambda: super(MeteredStorage, self).put(bucket, key, data, content_type, metadata),
        )

    def put_file(self, bucket: str, key: str, path: str, content_type: str) -> None:
        self._count(
            "put", lambda: super(MeteredStorage, self).put_file(bucket, key, path, content_type)
        )

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        self._counter.labels("list", "ok").inc()
        return super().list_keys(bucket, prefix)

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        removed = self._count(
            "delete", lambda: super(MeteredStorage, self).delete_prefix(bucket, prefix)
        )
        assert isinstance(removed, int)
        return removed
