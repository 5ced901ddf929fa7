"""Pure planning: runs, shards and the Kubernetes objects one run needs.

Plain data in, plain manifests out; nothing here talks to a server. The same batch and
run always give the same names, keys and manifests, so every create is idempotent
(a 409 means it is already there) and an operator restart resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from imagebatch_common.contract import (
    EXIT_PERMANENT,
    Compression,
    ShardImage,
    ShardManifest,
)
from imagebatch_common.contract import (
    WorkerEnv as Env,
)
from imagebatch_operator.settings import Settings
from imagebatch_operator.spec import BatchSpec

GROUP = "imagebatch.dev"
VERSION = "v1alpha1"
PLURAL = "imagebatches"
KIND = "ImageBatch"
LABEL_BATCH = f"{GROUP}/batch"
LABEL_RUN = f"{GROUP}/run"
FINALIZER = f"{GROUP}/delete-outputs"
WORKER_CONTAINER = "worker"
WORKER_UID = 65532

# Derived shard sizes (imagesPerShard unset): at least this many images per pod, so a
# small batch does not pay one pod start-up per handful of images...
MIN_DERIVED_SHARD = 50
# ...and at most this many, so a pod killed near its end loses little in-flight work
# and a shard's result manifest stays small.
MAX_DERIVED_SHARD = 500


@dataclass(frozen=True)
class BatchRef:
    """The identity of an ImageBatch."""

    namespace: str
    name: str
    uid: str
    generation: int


def run_id(batch: BatchRef) -> str:
    """The run a spec generation starts, distinct from an earlier object of the same name."""
    return f"g{batch.generation}-{batch.uid[:8]}"


def _short(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{text[: limit - 7].rstrip('-.')}-{digest}"


def job_name(batch: BatchRef, run: str) -> str:
    """Deterministic and short enough that pod hostnames ``<job>-<index>`` fit in 63."""
    return _short(f"{batch.name}-{run.split('-', 1)[0]}", 50)


def storage_secret_name(batch: BatchRef) -> str:
    return _short(f"{batch.name}-imagebatch-storage", 63)


def output_prefix(spec: BatchSpec, batch: BatchRef) -> str:
    """Every key of a batch is under its namespace; a user's prefix is a suffix below it."""
    below = spec.output.prefix or f"{batch.name}/"
    below = below if below.endswith("/") else below + "/"
    return f"{batch.namespace}/{below}"


def output_bucket(spec: BatchSpec, settings: Settings) -> str:
    return spec.output.bucket or settings.bucket


def images_per_shard(spec: BatchSpec, images: int) -> int:
    """The shard size: the user's, or one that gives each parallel pod one shard.

    Left to the operator, ``ceil(images / parallelism)`` clamped to
    ``MIN_DERIVED_SHARD``..``MAX_DERIVED_SHARD``: every pod start-up is spread over as
    many images as the parallelism allows, and no shard grows past the upper bound.
    """
    if spec.sharding.images_per_shard:
        return spec.sharding.images_per_shard
    wanted = math.ceil(max(images, 1) / max(spec.sharding.parallelism, 1))
    return min(max(wanted, MIN_DERIVED_SHARD), MAX_DERIVED_SHARD)


def shard_manifests(
    images: Iterable[ShardImage],
    *,
    run: str,
    bucket: str,
    prefix: str,
    compression: Compression,
    per_shard: int,
) -> Iterator[ShardManifest]:
    """Split the images into shards of at most ``per_shard``, in order, as they come."""
    if per_shard < 1:
        raise ValueError("imagesPerShard must be at least 1")
    source = iter(images)
    index = 0
    while batch := tuple(islice(source, per_shard)):
        yield ShardManifest(run, index, bucket, prefix, compression, batch)
        index += 1


def owner_reference(batch: BatchRef) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": batch.name,
        "uid": batch.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def batch_label(name: str) -> str:
    """The value of ``LABEL_BATCH`` for a batch: its name, shortened to a label's 63."""
    return _short(name, 63)


def labels(batch: BatchRef, run: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "imagebatch",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "imagebatch-operator",
        LABEL_BATCH: batch_label(batch.name),
        LABEL_RUN: run,
    }


ANNOTATION_EXPIRES = f"{GROUP}/expires-at"


def build_storage_secret(
    batch: BatchRef, run: str, credentials: dict[str, str], expires: str = ""
) -> dict[str, Any]:
    """The worker's storage credentials, in the batch's namespace, owned by the batch."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": storage_secret_name(batch),
            "namespace": batch.namespace,
            "annotations": {ANNOTATION_EXPIRES: expires} if expires else {},
            "labels": {
                "app.kubernetes.io/name": "imagebatch",
                "app.kubernetes.io/managed-by": "imagebatch-operator",
                LABEL_BATCH: _short(batch.name, 63),
                LABEL_RUN: run,
            },
            "ownerReferences": [owner_reference(batch)],
        },
        "stringData": credentials,
    }


def session_policy(bucket: str, prefix: str, run: str) -> str:
    """The session policy of a run's worker credential: exactly the run's keys.

    Read and write under the run's own ``.runs/<run>/`` (manifests in, results and
    attempt markers out) and the batch's ``images/``; list only ``images/``. Nothing of
    another prefix, run or bucket, no delete, no bucket operation. Minified and with each
    resource named once: S3 stores cap a session policy at 2048 characters, and the
    longest bucket, namespace and prefix the CRD allows stay well under (a unit test
    checks it).
    """
    arn = f"arn:aws:s3:::{bucket}"
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": [f"{arn}/{prefix}.runs/{run}/*", f"{arn}/{prefix}images/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [arn],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}images/*"]}},
            },
        ],
    }
    return json.dumps(document, separators=(",", ":"))


def credentials_data(access_key: str, secret_key: str, session_token: str = "") -> dict[str, str]:
    """The Secret keys a worker's env reads (``sessionToken`` only with temporary ones)."""
    data = {"accessKey": access_key, "secretKey": secret_key}
    if session_token:
        data["sessionToken"] = session_token
    return data


def _secret_env(name: Env, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name.value, "valueFrom": {"secretKeyRef": ref}}


def build_job(
    batch: BatchRef,
    spec: BatchSpec,
    settings: Settings,
    *,
    run: str,
    shards: int,
    bucket: str,
    prefix: str,
) -> dict[str, Any]:
    """The one Indexed Job of a run: one index per shard, retried per index."""
    parallelism = max(1, min(spec.sharding.parallelism, shards))
    secret = storage_secret_name(batch)
    env: list[dict[str, Any]] = [
        {"name": Env.STORAGE_ENDPOINT.value, "value": settings.storage.endpoint},
        {"name": Env.STORAGE_SECURE.value, "value": "true" if settings.storage.secure else "false"},
        {"name": Env.STORAGE_REGION.value, "value": settings.storage_region},
        _secret_env(Env.STORAGE_ACCESS_KEY, secret, "accessKey"),
        _secret_env(Env.STORAGE_SECRET_KEY, secret, "secretKey"),
        _secret_env(Env.STORAGE_SESSION_TOKEN, secret, "sessionToken", optional=True),
        {"name": Env.BUCKET.value, "value": bucket},
        {"name": Env.PREFIX.value, "value": prefix},
        {"name": Env.RUN.value, "value": run},
        {"name": Env.ALLOW_NETS.value, "value": settings.allow_nets},
        {"name": Env.DENY_ENDPOINTS.value, "value": settings.deny_endpoints},
        {"name": Env.MAX_IMAGE_BYTES.value, "value": str(settings.max_image_bytes)},
        {"name": Env.MAX_PIXELS.value, "value": str(settings.max_image_pixels)},
        {"name": Env.MEMORY_LIMIT.value, "value": str(settings.worker_memory_limit_bytes)},
    ]
    pod_labels = labels(batch, run)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(batch, run),
            "namespace": batch.namespace,
            "labels": pod_labels,
            "ownerReferences": [owner_reference(batch)],
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": shards,
            "parallelism": parallelism,
            "backoffLimitPerIndex": spec.sharding.retries_per_shard,
            # Every index runs even when some fail: their images are reported, not lost.
            "maxFailedIndexes": shards,
            "suspend": spec.suspend,
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
