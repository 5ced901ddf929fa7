"""The worker's settings: every limit, timeout and concurrency knob, read once at start.

One frozen value built from ``IMAGEBATCH_*`` environment variables (the operator's
Job template sets them from its own config). Every limit has a name and a default, so
an image that hits one fails with a message naming the limit. Where MinIO is lives in
``storage.StorageSettings``; which shard to run is the Job's input, not a setting
(``runner.ShardLocation``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imagebatch_common.contract import WorkerEnv as Env
from imagebatch_common.envread import (
    IPNetwork,
    non_negative_int,
    parse_networks,
    positive_float,
    positive_int,
    read_env,
)
from imagebatch_common.fetch import FetchSettings
from imagebatch_common.urlguard import parse_endpoints

MIB = 1024 * 1024


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: affinity, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` reports the node's cores; a pod limited to 2 CPUs on a 64-core
    node would otherwise start 64 compressions and be throttled.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = cpus or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: affinity is the answer
    return count


def _compress_mode(raw: str) -> str:
    if raw not in ("processes", "threads"):
        raise ValueError('must be "processes" or "threads"')
    return raw


@dataclass(frozen=True)
class WorkerSettings:
    """Limits and knobs of one worker process. ``from_env`` reads ``IMAGEBATCH_*``."""

    # Largest image body accepted, in bytes (IMAGEBATCH_MAX_IMAGE_BYTES). A declared
    # Content-Length above it fails before the body is read; a body that grows past
    # it is cut off as it streams.
    max_image_bytes: int = 50 * MIB
    # Largest decoded image, width x height (IMAGEBATCH_MAX_PIXELS): the
    # decompression-bomb cap, checked from the header before any pixel is decoded.
    max_pixels: int = 50_000_000
    # Seconds to open a TCP (and TLS) connection (IMAGEBATCH_CONNECT_TIMEOUT).
    connect_timeout: float = 5.0
    # Seconds the server may stay silent while we wait for bytes (IMAGEBATCH_READ_TIMEOUT).
    read_timeout: float = 15.0
    # Wall-clock seconds for one image's download, redirects, retries and backoff
    # included (IMAGEBATCH_IMAGE_TIMEOUT): a server trickling one byte at a time
    # cannot hold a worker longer than this.
    image_timeout: float = 60.0
    # Redirects followed per image; each target is checked like the first URL
    # (IMAGEBATCH_MAX_REDIRECTS).
    max_redirects: int = 5
    # Extra attempts after a transient failure: connection reset, timeout, 429, 5xx
    # (IMAGEBATCH_RETRIES). A 4xx is never retried.
    retries: int = 3
    # First backoff delay in seconds; doubles per attempt, with jitter
    # (IMAGEBATCH_RETRY_BACKOFF).
    retry_backoff: float = 0.5
    # Longest Retry-After we honour, in seconds (IMAGEBATCH_MAX_RETRY_AFTER); a server
    # asking for more gets this much, and never more than the image's time left.
    max_retry_after: float = 10.0
    # Networks the fetcher may reach although they are not global (loopback, private,
    # ...). Empty by default: only public addresses (IMAGEBATCH_ALLOW_NETS, CIDRs).
    allow_nets: tuple[IPNetwork, ...] = ()
    # Endpoints (address, port) never fetched from, whatever allow_nets says: the object
    # store's and the Kubernetes API server's (IMAGEBATCH_DENY_ENDPOINTS, address:port).
    deny_endpoints: frozenset[tuple[str, int]] = frozenset()
    # Downloads in flight at once, and as many uploads: both overlap with compression
    # (IMAGEBATCH_CONCURRENCY).
    concurrency: int = 8
    # Images compressed at once; defaults to the CPUs the pod may use
    # (IMAGEBATCH_COMPRESS_WORKERS).
    compress_workers: int = field(default_factory=available_cpus)
    # Where compression runs (IMAGEBATCH_COMPRESS_IN): "threads", measured fastest
    # (tests/bench/bench_worker.py), or "processes", which costs more CPU per image but
    # turns a decoder crash or out-of-memory kill into one failed image.
    compress_in: str = "threads"
    # CA bundle (file or directory) for https downloads; empty means the system
    # default bundle (IMAGEBATCH_CA_BUNDLE).
    ca_bundle: str = ""
    # User-Agent sent with every download (IMAGEBATCH_USER_AGENT).
    user_agent: str = "imagebatch-worker/0.1"
    # The pod's memory limit in bytes (IMAGEBATCH_MEMORY_LIMIT; the Job sets it from
    # the chart's worker memory limit). The worker also reads its cgroup's limit and
    # uses the smaller; images are admitted to decoding within a budget derived from it
    # (``memory``). None: only the cgroup's limit, if any, applies.
    memory_limit: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read the settings; raise ``ValueError`` naming the first bad variable."""
        source = os.environ if env is None else env
        defaults = cls()
        return cls(
            max_image_bytes=read_env(
                source, Env.MAX_IMAGE_BYTES, positive_int, defaults.max_image_bytes
            ),
            max_pixels=read_env(source, Env.MAX_PIXELS, positive_int, defaults.max_pixels),
            connect_timeout=read_env(
                source, "IMAGEBATCH_CONNECT_TIMEOUT", positive_float, defaults.connect_timeout
            ),
            read_timeout=read_env(
                source, "IMAGEBATCH_READ_TIMEOUT", positive_float, defaults.read_timeout
            ),
            image_timeout=read_env(
                source, "IMAGEBATCH_IMAGE_TIMEOUT", positive_float, defaults.image_timeout
            ),
            max_redirects=read_env(
                source, "IMAGEBATCH_MAX_REDIRECTS", non_negative_int, defaults.max_redirects
            ),
            retries=read_env(source, "IMAGEBATCH_RETRIES", non_negative_int, defaults.retries),
            retry_backoff=read_env(
                source, "IMAGEBATCH_RETRY_BACKOFF", positive_float, defaults.retry_backoff
            ),
            max_retry_after=read_env(
                source, "IMAGEBATCH_MAX_RETRY_AFTER", positive_float, defaults.max_retry_after
            ),
            allow_nets=read_env(source, Env.ALLOW_NETS, parse_networks, ()),
            deny_endpoints=read_env(source, Env.DENY_ENDPOINTS, parse_endpoints, frozenset()),
            concurrency=read_env(
                source, "IMAGEBATCH_CONCURRENCY", positive_int, defaults.concurrency
            ),
            compress_workers=read_env(
                source, "IMAGEBATCH_COMPRESS_WORKERS", positive_int, defaults.compress_workers
            ),
            compress_in=read_env(
                source, "IMAGEBATCH_COMPRESS_IN", _compress_mode, defaults.compress_in
            ),
            ca_bundle=source.get("IMAGEBATCH_CA_BUNDLE", "").strip(),
            user_agent=source.get("IMAGEBATCH_USER_AGENT", "").strip() or defaults.user_agent,
            memory_limit=read_env(source, Env.MEMORY_LIMIT, positive_int, 0) or None,
        )

    def fetch_settings(self) -> FetchSettings:
        """The download limits of these settings, for the shared fetcher."""
        return FetchSettings(
            max_bytes=self.max_image_bytes,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            total_timeout=self.image_timeout,
            max_redirects=self.max_redirects,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            max_retry_after=self.max_retry_after,
            allow_nets=self.allow_nets,
            deny=self.deny_endpoints,
            pool_size=self.concurrency,
            ca_bundle=self.ca_bundle,
            user_agent=self.user_agent,
        )
