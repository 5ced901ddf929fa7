"""Open the CSV named by ``spec.source`` as a stream of byte chunks.

Four kinds: ``inline`` (small CSVs in the spec itself), ``configMapKeyRef`` (the GitOps
path), ``s3`` (an object under the batch's own namespace prefix in an allowed bucket;
``decide`` refuses any other before this runs) and ``url`` (fetched under the same
address guard as images). A source that cannot be read yet raises
``SourceUnavailable`` naming it, without quoting anything read from it; the operator
retries later, because a ConfigMap applied in the same commit may simply not exist yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from imagebatch_common.storage import ObjectNotFound, Storage, StorageError
from imagebatch_operator.kube import Kube
from imagebatch_operator.spec import Source

CHUNK = 64 * 1024

# url -> chunks; raises SourceUnavailable with a reason.
UrlOpener = Callable[[str], Iterator[bytes]]


class SourceUnavailable(Exception):
    """The CSV cannot be read now; the message names the source and why."""


def _pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


def open_source(
    source: Source,
    namespace: str,
    kube: Kube,
    storage: Storage,
    open_url: UrlOpener,
) -> Iterator[bytes]:
    """Chunks of the CSV; the source is opened here so errors surface here."""
    if source.inline is not None:
        return _pieces(source.inline.encode())
    if source.config_map is not None:
        name, key = source.config_map
        value = kube.config_map_value(namespace, name, key)
        if value is None:
            raise SourceUnavailable(
                f"ConfigMap {namespace}/{name} or its key {key!r} does not exist"
            )
        return _pieces(value)
    if source.s3 is not None:
        bucket, key = source.s3
        try:
            return storage.stream(bucket, key, CHUNK)
        except ObjectNotFound as error:
            raise SourceUnavailable(f"s3://{bucket}/{key} does not exist") from error
        except StorageError as error:
            raise SourceUnavailable(f"s3://{bucket}/{key} cannot be read now: {error}") from error
    if source.url is not None:
        return open_url(source.url)
    raise SourceUnavailable("spec.source names no known kind (url, configMapKeyRef, s3, inline)")
