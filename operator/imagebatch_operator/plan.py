"""Pure planning: runs, shards and the Kubernetes objects one run needs.

Plain data in, plain manifests out; nothing here talks to a server. The same batch and
run always give the same names, keys and manifests, so every create is idempotent
(a 409 means it is already there) and an operator restart resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from imagebatch_common.contract import (
    EXIT_PERMANENT,
    Compression,
    ShardImage,
    ShardManifest,
    image_key,
)
from imagebatch_common.contract import (
    WorkerEnv as Env,
)
from imagebatch_operator.settings import Settings

GROUP = "imagebatch.dev"
VERSION = "v1alpha1"
PLURAL = "imagebatches"
KIND = "ImageBatch"
LABEL_BATCH = f"{GROUP}/batch"
LABEL_RUN = f"{GROUP}/run"
WORKER_CONTAINER = "worker"
WORKER_UID = 65532


@dataclass(frozen=True)
class BatchRef:
    """The identity of an ImageBatch."""

    namespace: str
    name: str
    uid: str
    generation: int


def run_id(batch: BatchRef) -> str:
    """One run per spec generation, distinct from an earlier object of the same name."""
    return f"g{batch.generation}-{batch.uid[:8]}"


def _short(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{text[: limit - 7].rstrip('-.')}-{digest}"


def job_name(batch: BatchRef) -> str:
    """Deterministic and short enough that pod hostnames ``<job>-<index>`` fit in 63."""
    return _short(f"{batch.name}-g{batch.generation}", 50)


def storage_secret_name(batch: BatchRef) -> str:
    return _short(f"{batch.name}-imagebatch-storage", 63)


def output_prefix(spec: Mapping[str, Any], batch: BatchRef) -> str:
    prefix = str((spec.get("output") or {}).get("prefix") or f"{batch.namespace}/{batch.name}/")
    return prefix if prefix.endswith("/") else prefix + "/"


def output_bucket(spec: Mapping[str, Any], settings: Settings) -> str:
    return str((spec.get("output") or {}).get("bucket") or settings.bucket)


def compression_of(spec: Mapping[str, Any]) -> Compression:
    c = spec.get("compression") or {}
    return Compression(
        quality=int(c.get("quality", 50)),
        format=str(c.get("format", "jpeg")),
        max_dimension=int(c["maxDimension"]) if c.get("maxDimension") else None,
    )


def unique_images(urls: Iterable[str], prefix: str, compression: Compression) -> dict[str, str]:
    """Each distinct URL once, in first-seen order, with its content-addressed key."""
    keys: dict[str, str] = {}
    for url in urls:
        if url not in keys:
            keys[url] = image_key(prefix, url, compression)
    return keys


def shard_manifests(
    images: Mapping[str, str],
    *,
    run: str,
    bucket: str,
    prefix: str,
    compression: Compression,
    per_shard: int,
    stored: Collection[str] = (),
) -> list[ShardManifest]:
    """Split the distinct images into shards of at most ``per_shard``, in order.

    ``stored`` holds the output keys already in storage (for format ``original``, the
    key without the extension the worker adds); every image is marked as stored or
    not, so a first attempt need not check each one.
    """
    if per_shard < 1:
        raise ValueError("imagesPerShard must be at least 1")
    items = [ShardImage(url, key, key in stored) for url, key in images.items()]
    return [
        ShardManifest(
            run=run,
            index=i,
            bucket=bucket,
            prefix=prefix,
            compression=compression,
            images=tuple(items[start : start + per_shard]),
        )
        for i, start in enumerate(range(0, len(items), per_shard))
    ]


def owner_reference(batch: BatchRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": batch.name,
        "uid": batch.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(batch: BatchRef, run: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "imagebatch",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "imagebatch-operator",
        LABEL_BATCH: _short(batch.name, 63),
        LABEL_RUN: run,
    }


def build_storage_secret(batch: BatchRef, settings: Settings) -> dict[str, Any]:
    """The worker's MinIO credentials, in the batch's namespace, owned by the batch."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": storage_secret_name(batch),
            "namespace": batch.namespace,
            "labels": {"app.kubernetes.io/name": "imagebatch", LABEL_BATCH: _short(batch.name, 63)},
            "ownerReferences": [owner_reference(batch)],
        },
        "stringData": {
            "accessKey": settings.storage.access_key,
            "secretKey": settings.storage.secret_key,
        },
    }


def build_job(
    batch: BatchRef,
    spec: Mapping[str, Any],
    settings: Settings,
    *,
    run: str,
    shards: int,
    bucket: str,
    prefix: str,
) -> dict[str, Any]:
    """The one Indexed Job of a run: one index per shard, retried per index."""
    sharding = spec.get("sharding") or {}
    parallelism = min(int(sharding.get("parallelism", 4)), shards)
    retries = int(sharding.get("retriesPerShard", 3))
    secret = storage_secret_name(batch)
    env: list[dict[str, Any]] = [
        {"name": Env.STORAGE_ENDPOINT.value, "value": settings.storage.endpoint},
        {"name": Env.STORAGE_SECURE.value, "value": "true" if settings.storage.secure else "false"},
        {
            "name": Env.STORAGE_ACCESS_KEY.value,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "accessKey"}},
        },
        {
            "name": Env.STORAGE_SECRET_KEY.value,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "secretKey"}},
        },
        {"name": Env.BUCKET.value, "value": bucket},
        {"name": Env.PREFIX.value, "value": prefix},
        {"name": Env.RUN.value, "value": run},
        {"name": Env.ALLOW_NETS.value, "value": settings.allow_nets},
        {"name": Env.MAX_IMAGE_BYTES.value, "value": str(settings.max_image_bytes)},
        {"name": Env.MAX_PIXELS.value, "value": str(settings.max_image_pixels)},
    ]
    pod_labels = labels(batch, run)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(batch),
            "namespace": batch.namespace,
            "labels": pod_labels,
            "ownerReferences": [owner_reference(batch)],
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": shards,
            "parallelism": parallelism,
            "backoffLimitPerIndex": retries,
            # Every index runs even when some fail: their images are reported, not lost.
            "maxFailedIndexes": shards,
            "suspend": bool(spec.get("suspend", False)),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailIndex",
                        "onExitCodes": {
                            "containerName": WORKER_CONTAINER,
                            "operator": "In",
                            "values": [EXIT_PERMANENT],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": WORKER_UID,
                        "runAsGroup": WORKER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": WORKER_CONTAINER,
                            "image": settings.worker_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": list(settings.worker_command),
                            "env": env,
                            "resources": {
                                "requests": {
                                    "cpu": settings.worker_cpu_request,
                                    "memory": settings.worker_memory_request,
                                },
                                "limits": {
                                    "cpu": settings.worker_cpu_limit,
                                    "memory": settings.worker_memory_limit,
                                },
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
                },
            },
        },
    }
