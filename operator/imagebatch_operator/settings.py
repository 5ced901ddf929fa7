"""The operator's one settings object, read once at start-up from the environment.

The Helm chart sets every variable below; each has a default that suits a small
install. Limits have names so that an error can say which one was hit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from imagebatch_common.envread import (
    non_negative_float,
    parse_networks,
    positive_float,
    positive_int,
    read_env,
)
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator.csvinput import CsvLimits
from imagebatch_operator.webhook import DEFAULT_SCHEDULE, parse_schedule

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|[mk])?$")
_UNITS = {
    None: 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (``1Gi``, ``512M``, ``1073741824``) in bytes."""
    match = _QUANTITY.match(text.strip())
    if not match or match.group(2) == "m":
        raise ValueError(f"{text!r} is not a memory quantity such as 1Gi or 512Mi")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _networks(raw: str) -> str:
    parse_networks(raw)  # refuse a bad CIDR at start-up, naming the variable
    return raw


def _credential_mode(raw: str) -> str:
    if raw not in ("sts", "static"):
        raise ValueError('must be "sts" or "static"')
    return raw


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number, or 0 for none")
    return value


def _quantity(raw: str) -> str:
    quantity_bytes(raw)
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything the operator needs to know that is not in an ImageBatch."""

    # Object storage endpoint and the operator's own credentials (MINIO_ENDPOINT,
    # MINIO_ACCESS_KEY, ...). They never leave the operator's namespace.
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
    # Most distinct images one batch may hold (IMAGEBATCH_MAX_IMAGES).
    max_images: int = 200_000
    # Per-image limits handed to the worker.
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # How many validation problems are copied into the status (the rest: errors.csv).
    status_problem_count: int = 10
    # Webhook delivery: seconds to wait before each attempt, the first usually 0
    # (IMAGEBATCH_WEBHOOK_SCHEDULE, comma separated); about a day and a half by default.
    webhook_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    webhook_timeout_seconds: float = 10.0
    # Batches reconciled at once; each pass is short (IMAGEBATCH_WORKERS).
    workers: int = 8
    # CSVs read and validated, or outputs merged, at once: the expensive passes, held
    # to a few so a hundred big CSVs applied together queue instead of exhausting
    # memory (IMAGEBATCH_HEAVY_WORKERS).
    heavy_workers: int = 2
    # Seconds between two safety looks at a batch that is still in progress, for
    # anything a watch missed (IMAGEBATCH_RESYNC_SECONDS). A finished batch gets none.
    resync_seconds: float = 300.0
    # Least seconds between two progress writes of one batch's status (condition
    # changes are written at once); bounds the API writes of a busy batch.
    min_write_seconds: float = 1.0
    # Where ingest and merge spool rows and their scratch database (IMAGEBATCH_SPOOL_DIR).
    spool_dir: str = "/tmp"
    # Namespaces watched (IMAGEBATCH_WATCH_NAMESPACES, comma separated); empty: all.
    watch_namespaces: tuple[str, ...] = ()
    # Prometheus /metrics: port (0 turns it off) and address (IMAGEBATCH_METRICS_PORT,
    # IMAGEBATCH_METRICS_ADDRESS).
    metrics_port: int = 8081
    metrics_address: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod IP
    # Worker credentials: "sts" (default) mints one temporary credential per run with S3
    # STS AssumeRole, limited by a session policy to that run's keys; "static" hands
    # workers the operator's own keys, only for a store without STS
    # (IMAGEBATCH_WORKER_CREDENTIALS).
    worker_credentials: str = "sts"
    # STS endpoint (IMAGEBATCH_STS_ENDPOINT; empty: the store's own endpoint, as MinIO
    # serves STS there) and the role to assume (IMAGEBATCH_STS_ROLE_ARN; AWS needs one).
    sts_endpoint: str = ""
    sts_role_arn: str = ""
    # Lifetime of a run's credential in seconds (IMAGEBATCH_CREDENTIAL_SECONDS; at least
    # 3600, the S3 client's floor), and how long before expiry it is renewed
    # (IMAGEBATCH_CREDENTIAL_RENEW_SECONDS).
    credential_seconds: int = 3600
    credential_renew_seconds: float = 900.0
    # Non-global networks the webhook may be sent to (IMAGEBATCH_WEBHOOK_ALLOW_NETS),
    # apart from allow_nets, which is for images and CSV URLs.
    webhook_allow_nets: str = ""
    # Endpoints (host:port) no fetcher may reach whatever the allowed networks say
    # (IMAGEBATCH_DENY_ENDPOINTS); the object store's and the API server's are added.
    deny_endpoints: str = ""
    # Tenancy. Buckets besides the operator's own that spec.output.bucket and
    # spec.source.s3.bucket may name (IMAGEBATCH_EXTRA_BUCKETS, comma separated).
    extra_buckets: tuple[str, ...] = ()
    # Per batch: most shards (IMAGEBATCH_MAX_SHARDS) and most pods at once
    # (IMAGEBATCH_MAX_PARALLELISM); per namespace: most batches in progress at once,
    # the rest wait as Pending/Queued in creation order (IMAGEBATCH_MAX_RUNNING_PER_NAMESPACE).
    max_shards: int = 2000
    max_parallelism: int = 16
    max_running_per_namespace: int = 10

    @property
    def allowed_buckets(self) -> tuple[str, ...]:
        """The buckets a batch may name: the operator's own, then the extra ones."""
        return (self.bucket, *(b for b in self.extra_buckets if b != self.bucket))

    @property
    def storage_region(self) -> str:
        """The region handed to workers (MINIO_REGION, else us-east-1), so their client
        never asks for a bucket's location, which a prefix-scoped credential may not."""
        return self.storage.region or "us-east-1"

    @property
    def worker_memory_limit_bytes(self) -> int:
        return quantity_bytes(self.worker_memory_limit)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls(storage=StorageSettings("unset:9000", "", ""))
        limits = CsvLimits(
            max_bytes=read_env(e, "IMAGEBATCH_MAX_CSV_BYTES", positive_int, d.csv_limits.max_bytes),
            max_rows=read_env(e, "IMAGEBATCH_MAX_ROWS", positive_int, d.csv_limits.max_rows),
            max_urls_per_row=read_env(
                e, "IMAGEBATCH_MAX_URLS_PER_ROW", positive_int, d.csv_limits.max_urls_per_row
            ),
        )
        command = e.get("IMAGEBATCH_WORKER_COMMAND", "")
        return cls(
            storage=StorageSettings.from_env(dict(e)),
            bucket=e.get("IMAGEBATCH_BUCKET", d.bucket),
            public_url=e.get("IMAGEBATCH_PUBLIC_URL", "").rstrip("/"),
            presign_seconds=read_env(
                e, "IMAGEBATCH_PRESIGN_SECONDS", positive_int, d.presign_seconds
            ),
            worker_image=e.get("IMAGEBATCH_WORKER_IMAGE", d.worker_image),
            worker_command=tuple(command.split()) if command else d.worker_command,
            worker_cpu_request=e.get("IMAGEBATCH_WORKER_CPU_REQUEST", d.worker_cpu_request),
            worker_cpu_limit=e.get("IMAGEBATCH_WORKER_CPU_LIMIT", d.worker_cpu_limit),
            worker_memory_request=read_env(
                e, "IMAGEBATCH_WORKER_MEMORY_REQUEST", _quantity, d.worker_memory_request
            ),
            worker_memory_limit=read_env(
                e, "IMAGEBATCH_WORKER_MEMORY_LIMIT", _quantity, d.worker_memory_limit
            ),
            allow_nets=read_env(e, "IMAGEBATCH_ALLOW_NETS", _networks, ""),
            csv_limits=limits,
            max_images=read_env(e, "IMAGEBATCH_MAX_IMAGES", positive_int, d.max_images),
            max_image_bytes=read_env(
                e, "IMAGEBATCH_MAX_IMAGE_BYTES", positive_int, d.max_image_bytes
            ),
            max_image_pixels=read_env(
                e, "IMAGEBATCH_MAX_IMAGE_PIXELS", positive_int, d.max_image_pixels
            ),
            webhook_schedule=read_env(
                e, "IMAGEBATCH_WEBHOOK_SCHEDULE", parse_schedule, d.webhook_schedule
            ),
            webhook_timeout_seconds=read_env(
                e, "IMAGEBATCH_WEBHOOK_TIMEOUT_SECONDS", positive_float, d.webhook_timeout_seconds
            ),
            workers=read_env(e, "IMAGEBATCH_WORKERS", positive_int, d.workers),
            heavy_workers=read_env(e, "IMAGEBATCH_HEAVY_WORKERS", positive_int, d.heavy_workers),
            resync_seconds=read_env(
                e, "IMAGEBATCH_RESYNC_SECONDS", positive_float, d.resync_seconds
            ),
            min_write_seconds=read_env(
                e, "IMAGEBATCH_MIN_WRITE_SECONDS", non_negative_float, d.min_write_seconds
            ),
            spool_dir=e.get("IMAGEBATCH_SPOOL_DIR", "") or d.spool_dir,
            worker_credentials=read_env(
                e, "IMAGEBATCH_WORKER_CREDENTIALS", _credential_mode, d.worker_credentials
            ),
            sts_endpoint=e.get("IMAGEBATCH_STS_ENDPOINT", "").strip(),
            sts_role_arn=e.get("IMAGEBATCH_STS_ROLE_ARN", "").strip(),
            credential_seconds=read_env(
                e, "IMAGEBATCH_CREDENTIAL_SECONDS", positive_int, d.credential_seconds
            ),
            credential_renew_seconds=read_env(
                e,
                "IMAGEBATCH_CREDENTIAL_RENEW_SECONDS",
                non_negative_float,
                d.credential_renew_seconds,
            ),
            webhook_allow_nets=read_env(e, "IMAGEBATCH_WEBHOOK_ALLOW_NETS", _networks, ""),
            deny_endpoints=e.get("IMAGEBATCH_DENY_ENDPOINTS", "").strip(),
            watch_namespaces=tuple(
                n.strip() for n in e.get("IMAGEBATCH_WATCH_NAMESPACES", "").split(",") if n.strip()
            ),
            metrics_port=read_env(e, "IMAGEBATCH_METRICS_PORT", _port, d.metrics_port),
            metrics_address=e.get("IMAGEBATCH_METRICS_ADDRESS", "") or d.metrics_address,
            extra_buckets=tuple(
                b.strip() for b in e.get("IMAGEBATCH_EXTRA_BUCKETS", "").split(",") if b.strip()
            ),
            max_shards=read_env(e, "IMAGEBATCH_MAX_SHARDS", positive_int, d.max_shards),
            max_parallelism=read_env(
                e, "IMAGEBATCH_MAX_PARALLELISM", positive_int, d.max_parallelism
            ),
            max_running_per_namespace=read_env(
                e,
                "IMAGEBATCH_MAX_RUNNING_PER_NAMESPACE",
                positive_int,
                d.max_running_per_namespace,
            ),
        )
