"""The contract between the operator and the worker: object keys and shard manifests.

Both sides import this module and nothing else of each other. The operator writes one
shard manifest per Job index; the worker pod for that index reads it, processes every
image in it and writes one result manifest. Everything is plain JSON in MinIO under the
batch's prefix (DESIGN.md §5)::

    <prefix>output.csv
    <prefix>errors.csv
    <prefix>images/<key>.<ext>
    <prefix>.runs/<run>/shards/<i>.json
    <prefix>.runs/<run>/results/<i>.json

Output keys are content-addressed over the source URL and the compression settings, so
a URL repeated across rows is processed once and a re-run with the same settings finds
its outputs already there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

MANIFEST_VERSION = 1

# Worker exit codes: the contract with the Job's podFailurePolicy.
EXIT_OK = 0  # the shard finished; failed images are recorded, not fatal
EXIT_RETRY = 1  # the shard could not finish (storage down, ...): the Job retries the index
EXIT_PERMANENT = 42  # the shard can never finish (manifest unreadable): FailIndex

# Output format -> file extension. bmp and tiff appear only for compression.format
# "original", where the key gets the sniffed format's extension.
FORMAT_EXTENSIONS = {
    "jpeg": "jpg",
    "webp": "webp",
    "avif": "avif",
    "png": "png",
    "gif": "gif",
    "bmp": "bmp",
    "tiff": "tiff",
}


class WorkerEnv(StrEnum):
    """The environment a Job hands each worker pod: one name per variable, both sides.

    The operator's Job builder sets these; the worker's readers read them. Storage
    credentials come from the run's Secret, the rest as plain values.
    """

    STORAGE_ENDPOINT = "MINIO_ENDPOINT"  # host:port, no scheme
    STORAGE_SECURE = "MINIO_SECURE"  # "true" for https
    STORAGE_REGION = "MINIO_REGION"  # set, so no GetBucketLocation is needed
    STORAGE_ACCESS_KEY = "MINIO_ACCESS_KEY"
    STORAGE_SECRET_KEY = "MINIO_SECRET_KEY"  # noqa: S105 - a variable name, not a secret
    STORAGE_SESSION_TOKEN = "MINIO_SESSION_TOKEN"  # noqa: S105 - set with STS credentials
    BUCKET = "IMAGEBATCH_BUCKET"
    PREFIX = "IMAGEBATCH_PREFIX"  # the batch's prefix, "<namespace>/<name>/"
    RUN = "IMAGEBATCH_RUN"
    SHARD_INDEX = "JOB_COMPLETION_INDEX"  # set by the Indexed Job itself
    ALLOW_NETS = "IMAGEBATCH_ALLOW_NETS"  # non-global networks images may come from
    DENY_ENDPOINTS = "IMAGEBATCH_DENY_ENDPOINTS"  # address:port never fetched from
    MAX_IMAGE_BYTES = "IMAGEBATCH_MAX_IMAGE_BYTES"
    MAX_PIXELS = "IMAGEBATCH_MAX_PIXELS"
    MEMORY_LIMIT = "IMAGEBATCH_MEMORY_LIMIT"  # bytes the pod may use (its memory limit)


class Stage(StrEnum):
    """Where an image failed; the ``stage`` column of errors.csv."""

    VALIDATE = "validate"
    FETCH = "fetch"
    DECODE = "decode"
    ENCODE = "encode"
    STORE = "store"
    SHARD = "shard"  # the whole shard failed permanently; its images are reported so


@dataclass(frozen=True)
class Compression:
    """Compression settings of a run, as in ``spec.compression``."""

    quality: int = 50
    format: str = "jpeg"  # jpeg | webp | avif | original
    max_dimension: int | None = None

    def identity(self) -> str:
        return f"q={self.quality};f={self.format};d={self.max_dimension or 0}"


def image_digest(url: str, compression: Compression) -> str:
    """The content address of one output: source identity plus compression settings."""
    material = f"{url}\n{compression.identity()}".encode()
    return hashlib.sha256(material).hexdigest()[:40]


def image_key(prefix: str, url: str, compression: Compression) -> str:
    """Object key of a compressed image, without extension for ``original`` format.

    For a fixed target format the extension is known up front; for ``original`` the
    worker appends the sniffed format's extension and records the full key in its
    result.
    """
    digest = image_digest(url, compression)
    base = f"{prefix}images/{digest}"
    ext = FORMAT_EXTENSIONS.get(compression.format)
    return f"{base}.{ext}" if ext else base


def image_keyer(prefix: str, compression: Compression) -> Callable[[str], str]:
    """``image_key`` for one prefix and one compression, with the fixed parts computed once.

    Planning keys a hundred thousand URLs in a row; the result is the same as
    ``image_key(prefix, url, compression)``.
    """
    material = f"\n{compression.identity()}".encode()
    head = f"{prefix}images/"
    ext = FORMAT_EXTENSIONS.get(compression.format)
    tail = f".{ext}" if ext else ""
    sha256 = hashlib.sha256

    def key(url: str) -> str:
        return head + sha256(url.encode() + material).hexdigest()[:40] + tail

    return key


def run_prefix(prefix: str, run: str) -> str:
    return f"{prefix}.runs/{run}/"


def shard_manifest_key(prefix: str, run: str, index: int) -> str:
    return f"{run_prefix(prefix, run)}shards/{index}.json"


def shard_attempt_key(prefix: str, run: str, index: int) -> str:
    """A marker the worker leaves when a shard starts: its presence means a retry."""
    return f"{run_prefix(prefix, run)}attempts/{index}"


def shard_result_key(prefix: str, run: str, index: int) -> str:
    return f"{run_prefix(prefix, run)}results/{index}.json"


def output_csv_key(prefix: str) -> str:
    return f"{prefix}output.csv"


def errors_csv_key(prefix: str) -> str:
    return f"{prefix}errors.csv"


class ShardImage(NamedTuple):
    """One image a shard must produce.

    ``stored`` is what the operator saw when it planned the run: True, the output was
    already in storage; False, it was not; None, unknown. On a shard's first attempt
    the worker trusts False and skips its per-image existence check (one request and
    about a millisecond and a half of CPU per image); a retried shard checks every
    image, since its own earlier attempt may have stored some.
    """

    url: str
    key: str
    stored: bool | None = None
    # A named tuple, not a dataclass: planning makes one per distinct image, up to the
    # hundreds of thousands, and a frozen dataclass costs three times as much to make.


@dataclass(frozen=True)
class ShardManifest:
    """Input of one Job index: which images, where to put them, how to compress."""

    run: str
    index: int
    bucket: str
    prefix: str
    compression: Compression
    images: tuple[ShardImage, ...]
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies every field, and a run of 150,000
        # images spent more time there than in everything else it plans.
        # The image records are written as text: the same bytes json.dumps gives them,
        # at less than half its cost.
        head = {
            "run": self.run,
            "index": self.index,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "compression": {
                "quality": self.compression.quality,
                "format": self.compression.format,
                "max_dimension": self.compression.max_dimension,
            },
        }
        quote = json.encoder.encode_basestring_ascii
        stored = {True: "true", False: "false", None: "null"}
        images = ",".join(
            f'{{"url":{quote(url)},"key":{quote(key)},"stored":{stored[done]}}}'
            for url, key, done in self.images
        )
        text = json.dumps(head, separators=(",", ":"))[:-1]
        return f'{text},"images":[{images}],"version":{self.version}}}'.encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardManifest:
        """Parse a manifest; raises ``ValueError`` on anything malformed."""
        try:
            doc = json.loads(data)
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported manifest version {doc.get('version')!r}")
            return cls(
                run=str(doc["run"]),
                index=int(doc["index"]),
                bucket=str(doc["bucket"]),
                prefix=str(doc["prefix"]),
                compression=Compression(**doc["compression"]),
                images=tuple(
                    ShardImage(
                        str(i["url"]),
                        str(i["key"]),
                        None if i.get("stored") is None else bool(i["stored"]),
                    )
                    for i in doc["images"]
                ),
            )
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"malformed shard manifest: {error}") from error


@dataclass(frozen=True)
class ImageResult:
    """What happened to one image. ``error`` set means it failed at ``stage``."""

    url: str
    key: str  # the final object key (with extension) when it succeeded
    ok: bool
    input_bytes: int = 0
    output_bytes: int = 0
    format: str = ""  # the output format
    width: int = 0
    height: int = 0
    kept_original: bool = False  # re-encoding was larger, the source bytes were stored
    skipped: bool = False  # the output already existed (a retry or a re-run)
    stage: str = ""
    error: str = ""


@dataclass(frozen=True)
class ShardResult:
    """Output of one Job index: one entry per image of its manifest, in manifest order."""

    run: str
    index: int
    images: tuple[ImageResult, ...]
    started_at: str = ""
    finished_at: str = ""
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        # The fields as they are, not ``asdict``: its deep copy of every image record
        # was a tenth of a 640x480 worker's Python time (tests/bench/bench_worker.py).
        doc = {
            "run": self.run,
            "index": self.index,
            "images": [vars(image) for image in self.images],
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "version": self.version,
            "extra": self.extra,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardResult:
        try:
            doc = json.loads(data)
            return cls(
                run=str(doc["run"]),
                index=int(doc["index"]),
                images=tuple(ImageResult(**i) for i in doc["images"]),
                started_at=str(doc.get("started_at", "")),
                finished_at=str(doc.get("finished_at", "")),
                extra=dict(doc.get("extra") or {}),
            )
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"malformed shard result: {error}") from error
