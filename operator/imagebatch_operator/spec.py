"""The ImageBatch spec, parsed once into typed values.

The API server has already applied the CRD's defaults and checked its ranges and CEL
rules before the operator sees an object, so parsing here is a translation, not a
validation. The defaults below are the CRD's (``crds/imagebatches.imagebatch.dev.yaml``);
a unit test holds the two equal. They matter only for an object stored before a
default existed.

``imagesPerShard`` has no default on purpose: left unset, the shard size follows from
the number of images and the parallelism (``plan.images_per_shard``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagebatch_common.contract import Compression


@dataclass(frozen=True)
class Source:
    """Exactly one of the four kinds is set (the CRD's CEL rule says so)."""

    url: str | None = None
    config_map: tuple[str, str] | None = None  # (name, key)
    s3: tuple[str, str] | None = None  # (bucket, key)
    inline: str | None = None

    @property
    def kind(self) -> str:
        if self.url is not None:
            return "url"
        if self.config_map is not None:
            return "configMapKeyRef"
        if self.s3 is not None:
            return "s3"
        return "inline"

    def describe(self) -> str:
        """Where the CSV is, in words, without query string or userinfo."""
        from imagebatch_common.redact import redact_url

        if self.url is not None:
            return f"URL {redact_url(self.url)}"
        if self.config_map is not None:
            return f"ConfigMap {self.config_map[0]} key {self.config_map[1]}"
        if self.s3 is not None:
            return f"s3://{self.s3[0]}/{self.s3[1]}"
        return "spec.source.inline"


@dataclass(frozen=True)
class Output:
    bucket: str | None = None  # None: the operator's bucket
    prefix: str | None = None  # None: "<name>/" below the namespace
    deletion_policy: str = "Retain"  # Retain | Delete


@dataclass(frozen=True)
class Sharding:
    images_per_shard: int | None = None  # None: derived from images and parallelism
    parallelism: int = 4
    retries_per_shard: int = 3


@dataclass(frozen=True)
class Webhook:
    url: str
    secret_name: str | None = None
    secret_key: str | None = None


@dataclass(frozen=True)
class BatchSpec:
    """Everything a user says about one batch."""

    source: Source
    compression: Compression = field(default_factory=Compression)
    output: Output = field(default_factory=Output)
    sharding: Sharding = field(default_factory=Sharding)
    max_failed_image_percent: float = 10.0
    webhook: Webhook | None = None
    suspend: bool = False
    retry: str = ""  # a new value re-runs only the images without an output

    def run_identity(self) -> str:
        """What a run is made of: a change here starts a new run, anything else does not.

        ``suspend`` and ``parallelism`` are applied to the running Job in place; every
        other field changes what is produced, reported or called.
        """
        material = {
            "source": [self.source.url, self.source.config_map, self.source.s3, self.source.inline],
            "compression": self.compression.identity(),
            "output": [self.output.bucket, self.output.prefix],
            "imagesPerShard": self.sharding.images_per_shard,
            "retriesPerShard": self.sharding.retries_per_shard,
            "maxFailedImagePercent": self.max_failed_image_percent,
            "webhook": [self.webhook.url, self.webhook.secret_name, self.webhook.secret_key]
            if self.webhook
            else None,
            "retry": self.retry,
        }
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        return digest[:16]


def _pair(value: Any, first: str, second: str) -> tuple[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    return (str(value.get(first, "")), str(value.get(second, "")))


def parse_spec(raw: Mapping[str, Any]) -> BatchSpec:
    """The typed spec of an ImageBatch object's ``spec`` mapping."""
    source = raw.get("source") or {}
    compression = raw.get("compression") or {}
    output = raw.get("output") or {}
    sharding = raw.get("sharding") or {}
    policy = raw.get("failurePolicy") or {}
    hook = raw.get("webhook") or {}
    secret = hook.get("secretRef") or {}
    per_shard = sharding.get("imagesPerShard")
    max_dimension = compression.get("maxDimension")
    return BatchSpec(
        source=Source(
            url=str(source["url"]) if "url" in source else None,
            config_map=_pair(source.get("configMapKeyRef"), "name", "key"),
            s3=_pair(source.get("s3"), "bucket", "key"),
            inline=str(source["inline"]) if "inline" in source else None,
        ),
        compression=Compression(
            quality=int(compression.get("quality", 50)),
            format=str(compression.get("format", "jpeg")),
            max_dimension=int(max_dimension) if max_dimension else None,
        ),
        output=Output(
            bucket=str(output["bucket"]) if output.get("bucket") else None,
            prefix=str(output["prefix"]) if output.get("prefix") else None,
            deletion_policy=str(output.get("deletionPolicy", "Retain")),
        ),
        sharding=Sharding(
            images_per_shard=int(per_shard) if per_shard else None,
            parallelism=int(sharding.get("parallelism", 4)),
            retries_per_shard=int(sharding.get("retriesPerShard", 3)),
        ),
        max_failed_image_percent=float(policy.get("maxFailedImagePercent", 10)),
        webhook=Webhook(
            url=str(hook["url"]),
            secret_name=str(secret["name"]) if secret.get("name") else None,
            secret_key=str(secret["key"]) if secret.get("key") else None,
        )
        if hook.get("url")
        else None,
        suspend=bool(raw.get("suspend", False)),
        retry=str(raw.get("retry") or ""),
    )
