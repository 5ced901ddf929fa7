"""The operator's one settings object, read once at start-up from the environment.

The Helm chart sets every variable below; each has a default that suits a small
install. Limits have names so that an error can say which one was hit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from imagebatch_common.envread import positive_float, positive_int, read_env
from imagebatch_common.storage import StorageSettings
from imagebatch_operator.csvinput import CsvLimits


@dataclass(frozen=True)
class Settings:
    """Everything the operator needs to know that is not in an ImageBatch."""

    # MinIO endpoint and root-of-trust credentials (MINIO_ENDPOINT, MINIO_ACCESS_KEY, ...).
    storage: StorageSettings
    # The bucket outputs go to unless spec.output.bucket says otherwise.
    bucket: str = "imagebatch"
    # Base URL under which objects are publicly readable, e.g. https://cdn.example.com/imagebatch;
    # empty means output URLs are presigned GET URLs instead.
    public_url: str = ""
    # Lifetime of a presigned output URL, in seconds (S3 allows at most 7 days).
    presign_seconds: int = 7 * 24 * 3600
    # Image and command of the worker pods.
    worker_image: str = "ghcr.io/imagebatch/imagebatch:0.1.0"
    worker_command: tuple[str, ...] = ("imagebatch-worker",)
    worker_cpu_request: str = "500m"
    worker_cpu_limit: str = "2"
    worker_memory_request: str = "256Mi"
    worker_memory_limit: str = "1Gi"
    # Networks the fetchers may reach although they are not global (comma separated
    # CIDRs). Empty by default: loopback, private and link-local are refused.
    allow_nets: str = ""
    # CSV limits: bytes, rows, URLs per row.
    csv_limits: CsvLimits = field(default_factory=CsvLimits)
    # Per-image limits handed to the worker.
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # How many validation problems are copied into the status (the rest: errors.csv).
    status_problem_count: int = 10
    # Webhook delivery: attempts and the first backoff in seconds (doubling, with jitter).
    webhook_attempts: int = 6
    webhook_backoff_seconds: float = 1.0
    webhook_timeout_seconds: float = 10.0
    # Seconds between two looks at a running batch.
    poll_seconds: float = 1.0
    # Least seconds between two progress writes of one batch's status (transitions are
    # written at once); bounds the API writes of a busy batch.
    min_write_seconds: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        defaults = cls(storage=StorageSettings("unset:9000", "", ""))
        limits = CsvLimits(
            max_bytes=read_env(
                e, "IMAGEBATCH_MAX_CSV_BYTES", positive_int, defaults.csv_limits.max_bytes
            ),
            max_rows=read_env(e, "IMAGEBATCH_MAX_ROWS", positive_int, defaults.csv_limits.max_rows),
            max_urls_per_row=read_env(
                e, "IMAGEBATCH_MAX_URLS_PER_ROW", positive_int, defaults.csv_limits.max_urls_per_row
            ),
        )
        command = e.get("IMAGEBATCH_WORKER_COMMAND", "")
        return cls(
            storage=StorageSettings.from_env(dict(e)),
            bucket=e.get("IMAGEBATCH_BUCKET", defaults.bucket),
            public_url=e.get("IMAGEBATCH_PUBLIC_URL", "").rstrip("/"),
            presign_seconds=read_env(
                e, "IMAGEBATCH_PRESIGN_SECONDS", positive_int, defaults.presign_seconds
            ),
            worker_image=e.get("IMAGEBATCH_WORKER_IMAGE", defaults.worker_image),
            worker_command=tuple(command.split()) if command else defaults.worker_command,
            worker_cpu_request=e.get("IMAGEBATCH_WORKER_CPU_REQUEST", defaults.worker_cpu_request),
            worker_cpu_limit=e.get("IMAGEBATCH_WORKER_CPU_LIMIT", defaults.worker_cpu_limit),
            worker_memory_request=e.get(
                "IMAGEBATCH_WORKER_MEMORY_REQUEST", defaults.worker_memory_request
            ),
            worker_memory_limit=e.get(
                "IMAGEBATCH_WORKER_MEMORY_LIMIT", defaults.worker_memory_limit
            ),
            allow_nets=e.get("IMAGEBATCH_ALLOW_NETS", ""),
            csv_limits=limits,
            max_image_bytes=read_env(
                e, "IMAGEBATCH_MAX_IMAGE_BYTES", positive_int, defaults.max_image_bytes
            ),
            max_image_pixels=read_env(
                e, "IMAGEBATCH_MAX_IMAGE_PIXELS", positive_int, defaults.max_image_pixels
            ),
            webhook_attempts=read_env(
                e, "IMAGEBATCH_WEBHOOK_ATTEMPTS", positive_int, defaults.webhook_attempts
            ),
            webhook_backoff_seconds=read_env(
                e,
                "IMAGEBATCH_WEBHOOK_BACKOFF_SECONDS",
                positive_float,
                defaults.webhook_backoff_seconds,
            ),
            poll_seconds=read_env(
                e, "IMAGEBATCH_POLL_SECONDS", positive_float, defaults.poll_seconds
            ),
            min_write_seconds=read_env(
                e, "IMAGEBATCH_MIN_WRITE_SECONDS", positive_float, defaults.min_write_seconds
            ),
        )
