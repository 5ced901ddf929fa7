"""Fetch a batch's output.csv and errors.csv: over HTTP when the operator publishes
them, else from the object store with the user's own credentials.

``status.output`` names each file as ``s3://bucket/key`` and, when the operator has a
public URL base, as ``csvUrl``/``errorsUrl`` too. The public URL needs no credentials.
Otherwise the plugin logs in to the object store with the credentials of the person
running it, from the variables AWS tools read:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and ``AWS_SESSION_TOKEN`` for
  temporary credentials;
- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for the S3 API of MinIO or another
  store, as a URL (``http://minio.example:9000``; the scheme decides TLS); unset, AWS
  S3 itself;
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

Nothing else is read (no ``~/.aws`` profiles), and never the operator's keys: what the
user can download is what their own credentials allow. Files are written under a
temporary name and renamed, so a failed download never leaves half a CSV behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from imagebatch_common.storage import ObjectNotFound, Storage, StorageError
from imagebatch_common.storage_settings import StorageSettings

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CHUNK = 256 * 1024


class DownloadFailed(Exception):
    """A file could not be fetched; the message says from where and why (no secrets)."""


class Missing(DownloadFailed):
    """The file is not there (404 / NoSuchKey)."""


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str


def parse_s3_url(url: str) -> S3Url:
    """``s3://bucket/key/with/slashes`` -> bucket and key."""
    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return S3Url(parts.netloc, key)


def credentials_from_env(env: Mapping[str, str]) -> StorageSettings | None:
    """The user's S3 credentials; None when none are set. ValueError for a bad endpoint."""
    access = env.get("AWS_ACCESS_KEY_ID", "")
    secret = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        return None
    endpoint, secure = "s3.amazonaws.com", True
    for variable in ENDPOINT_VARIABLES:
        if env.get(variable):
            parts = urlsplit(env[variable])
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"{variable} must be a URL such as http://minio.example:9000, "
                    f"not {env[variable]!r}"
                )
            if parts.path.strip("/"):
                raise ValueError(f"{variable} must have no path: {env[variable]!r}")
            endpoint, secure = parts.netloc, parts.scheme == "https"
            break
    return StorageSettings(
        endpoint=endpoint,
        access_key=access,
        secret_key=secret,
        secure=secure,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
    )


def _save(chunks: Iterable[bytes], destination: Path) -> int:
    partial = destination.with_name(f".{destination.name}.part")
    size = 0
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)
    return size


def http_chunks(url: str, timeout: float = 30.0) -> Iterator[bytes]:
    """The body of a GET in chunks; ``Missing`` on 404, ``DownloadFailed`` otherwise."""
    shown = url.split("?", 1)[0]  # a presigned URL's signature stays out of messages
    try:
        response = requests.get(url, stream=True, timeout=timeout)
    except requests.RequestException as error:
        raise DownloadFailed(f"GET {shown}: {type(error).__name__}") from error
    with response:
        if response.status_code == 404:
            raise Missing(f"GET {shown}: HTTP 404")
        if response.status_code != 200:
            raise DownloadFailed(f"GET {shown}: HTTP {response.status_code}")
        try:
            yield from response.iter_content(_CHUNK)
        except requests.RequestException as error:
            raise DownloadFailed(f"GET {shown}: {type(error).__name__}") from error


def s3_chunks(settings: StorageSettings, where: S3Url) -> Iterator[bytes]:
    """The object's bytes in chunks; ``Missing`` or ``DownloadFailed``."""
    storage = Storage(settings)
    try:
        yield from storage.stream(where.bucket, where.key, _CHUNK)
    except ObjectNotFound as error:
        raise Missing(f"s3://{where.bucket}/{where.key} does not exist") from error
    except StorageError as error:
        raise DownloadFailed(f"s3://{where.bucket}/{where.key}: {error}") from error


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    via: str  # the URL or s3:// location it came from


def fetch(
    public_url: str | None,
    s3_url: str | None,
    destination: Path,
    credentials: StorageSettings | None,
    via: str = "auto",
) -> Fetched:
    """One file to ``destination``: the public URL first (``via`` auto or url), else S3.

    ``via`` ``s3`` skips the public URL; ``url`` never falls back to S3.
    """
    errors: list[str] = []
    if public_url and via in ("auto", "url"):
        try:
            return Fetched(destination, _save(http_chunks(public_url), destination), public_url)
        except Missing:
            raise
        except DownloadFailed as error:
            errors.append(str(error))
    if via in ("auto", "s3") and s3_url:
        if credentials is None:
            errors.append(
                f"{s3_url} needs your object-store credentials: set AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO)"
            )
        else:
            where = parse_s3_url(s3_url)
            return Fetched(destination, _save(s3_chunks(credentials, where), destination), s3_url)
    if not errors:
        errors.append("the batch's status names no location for it")
    raise DownloadFailed("; ".join(errors))


def environment() -> Mapping[str, str]:
    return os.environ
