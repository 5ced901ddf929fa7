"""The one MinIO client both the operator and the worker use.

A thin layer over the ``minio`` SDK that turns its many failure types into two that
callers act on: ``ObjectNotFound`` (a fact about the data) and ``StorageUnavailable``
(retry later: the operator with a TemporaryError, the worker with a non-zero exit so
the Job retries the shard). Credentials are never part of a message.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import urllib3
from minio import Minio
from minio.error import S3Error

from imagebatch_common.storage_settings import StorageSettings


class StorageError(Exception):
    """Base of the storage errors."""


class ObjectNotFound(StorageError):
    """The bucket or the key does not exist."""


class StorageUnavailable(StorageError):
    """MinIO could not be reached or refused the request; worth retrying."""


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat`` tells about a stored object."""

    key: str
    size: int
    content_type: str
    metadata: dict[str, str]  # user metadata: lower-case names without "x-amz-meta-"


_USER_METADATA = "x-amz-meta-"

_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}


class Storage:
    """Bytes in, bytes out, with errors a caller can act on."""

    def __init__(self, settings: StorageSettings, *, timeout: float = 30.0, retries: int = 2):
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
            maxsize=16,
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
            ),
        )
        self.settings = settings
        self.client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )

    def _fail(self, error: Exception, what: str) -> StorageError:
        if isinstance(error, S3Error):
            if error.code in _MISSING:
                return ObjectNotFound(f"{what}: {error.code}")
            return StorageUnavailable(f"{what}: {error.code}: {error.message}")
        return StorageUnavailable(f"{what}: {type(error).__name__}: {error}")

    def ensure_bucket(self, bucket: str) -> None:
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except S3Error as error:
            if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail(error, f"bucket {bucket}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"bucket {bucket}") from error

    def get(self, bucket: str, key: str) -> bytes:
        try:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"get {bucket}/{key}") from error

    def stream(self, bucket: str, key: str, chunk: int = 256 * 1024) -> Iterator[bytes]:
        """The object's bytes in chunks, never held whole; the first request is made now.

        Raises ``ObjectNotFound`` or ``StorageUnavailable`` before returning when the
        object cannot be opened; a failure while reading raises from the iterator.
        """
        try:
            response = self.client.get_object(bucket, key)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"get {bucket}/{key}") from error

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise self._fail(error, f"get {bucket}/{key}") from error
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def lines(self, bucket: str, key: str) -> Iterator[bytes]:
        """The object's lines (without the newline), streamed."""
        pending = b""
        for piece in self.stream(bucket, key):
            pending += piece
            *complete, pending = pending.split(b"\n")
            yield from complete
        if pending:
            yield pending

    def presigned_get(self, bucket: str, key: str, seconds: int) -> str:
        """A GET URL for the object that needs no credentials, valid for ``seconds``."""
        from datetime import timedelta

        try:
            return str(
                self.client.presigned_get_object(bucket, key, expires=timedelta(seconds=seconds))
            )
        except (S3Error, urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            raise self._fail(error, f"presign {bucket}/{key}") from error

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store ``data``; ``metadata`` becomes ``x-amz-meta-*`` user metadata."""
        try:
            self.client.put_object(
                bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=dict(metadata) if metadata else None,
            )
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"put {bucket}/{key}") from error

    def put_file(self, bucket: str, key: str, path: str, content_type: str) -> None:
        try:
            self.client.fput_object(bucket, key, path, content_type=content_type)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"put {bucket}/{key}") from error

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """Size, type and user metadata of an object; ``None`` if it does not exist."""
        try:
            found = self.client.stat_object(bucket, key)
        except S3Error as error:
            if error.code in _MISSING:
                return None
            raise self._fail(error, f"stat {bucket}/{key}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"stat {bucket}/{key}") from error
        metadata = {
            name.lower().removeprefix(_USER_METADATA): str(value)
            for name, value in (found.metadata or {}).items()
            if name.lower().startswith(_USER_METADATA)
        }
        return ObjectInfo(
            key=key,
            size=int(found.size or 0),
            content_type=str(found.content_type or ""),
            metadata=metadata,
        )

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.stat_object(bucket, key)
            return True
        except S3Error as error:
            if error.code in _MISSING:
                return False
            raise self._fail(error, f"stat {bucket}/{key}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"stat {bucket}/{key}") from error

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        try:
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if obj.object_name is not None:
                    yield obj.object_name
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"list {bucket}/{prefix}") from error

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Remove every object under ``prefix``; return how many there were."""
        from minio.deleteobjects import DeleteObject

        keys = [DeleteObject(k) for k in self.list_keys(bucket, prefix)]
        try:
            errors = list(self.client.remove_objects(bucket, keys))
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._fail(error, f"delete {bucket}/{prefix}") from error
        if errors:
            raise StorageUnavailable(f"delete {bucket}/{prefix}: {len(errors)} objects failed")
        return len(keys)

    def assume_role(
        self,
        policy: str,
        seconds: int,
        *,
        endpoint: str = "",
        role_arn: str = "",
        session_name: str = "",
    ) -> TemporaryCredentials:
        """A temporary credential limited by ``policy`` (S3 STS AssumeRole).

        The store grants the intersection of this client's own rights and the session
        policy. ``endpoint`` is the STS endpoint (default: the store's own, as MinIO
        serves STS there); ``role_arn`` is required by AWS and ignored by MinIO.
        """
        from minio.credentials.providers import AssumeRoleProvider

        settings = self.settings
        scheme = "https" if settings.secure else "http"
        provider = AssumeRoleProvider(
            sts_endpoint=endpoint or f"{scheme}://{settings.endpoint}",
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            duration_seconds=seconds,
            policy=policy,
            region=settings.region or "",
            role_arn=role_arn or None,
            role_session_name=session_name or None,
        )
        try:
            issued = provider.retrieve()
        except (ValueError, urllib3.exceptions.HTTPError, OSError) as error:
            # The provider's message names the endpoint and the status, never a key.
            raise StorageUnavailable(f"assume role: {error}") from error
        return TemporaryCredentials(
            access_key=issued.access_key,
            secret_key=issued.secret_key,
            session_token=issued.session_token or "",
            expiration=issued.expiration.replace(tzinfo=UTC) if issued.expiration else None,
        )


@dataclass(frozen=True)
class TemporaryCredentials:
    """What STS issues: keys, a session token and when they stop working."""

    access_key: str
    secret_key: str
    session_token: str
    expiration: datetime | None

    def __repr__(self) -> str:  # never print the secret
        return f"TemporaryCredentials(expiration={self.expiration})"
