"""Open the CSV named by ``spec.source`` as a stream of byte chunks.

Four kinds: ``inline`` (small CSVs in the spec itself), ``configMapKeyRef`` (the GitOps
path), ``s3`` (an object in the operator's MinIO) and ``url`` (fetched under the same
address guard as images). A source that cannot be read yet raises
``SourceUnavailable`` naming it; the operator retries later, because a ConfigMap applied
in the same commit may simply not exist yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from imagebatch_common.storage import Storage
from imagebatch_operator.kube import Kube

CHUNK = 64 * 1024

# url -> chunks; raises SourceUnavailable with a reason.
UrlOpener = Callable[[str], Iterator[bytes]]


class SourceUnavailable(Exception):
    """The CSV cannot be read now; the message names the source and why."""


def describe(source: Mapping[str, Any]) -> str:
    if "inline" in source:
        return "spec.source.inline"
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return f"ConfigMap {ref.get('name')} key {ref.get('key')}"
    if "s3" in source:
        return f"s3://{source['s3'].get('bucket')}/{source['s3'].get('key')}"
    if "url" in source:
        return f"URL {source['url']}"
    return "an unknown source"


def _pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


def open_source(
    source: Mapping[str, Any],
    namespace: str,
    kube: Kube,
    storage: Storage,
    open_url: UrlOpener,
) -> Iterator[bytes]:
    """Chunks of the CSV; the first chunk is read eagerly so errors surface here."""
    if "inline" in source:
        return _pieces(str(source["inline"]).encode())
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        value = kube.config_map_value(namespace, ref["name"], ref["key"])
        if value is None:
            raise SourceUnavailable(
                f"ConfigMap {namespace}/{ref['name']} or its key {ref['key']!r} does not exist"
            )
        return _pieces(value)
    if "s3" in source:
        bucket, key = source["s3"]["bucket"], source["s3"]["key"]
        try:
            response = storage.client.get_object(bucket, key)
        except Exception as error:  # the SDK raises several types; all mean "not now"
            raise SourceUnavailable(f"s3://{bucket}/{key}: {error}") from error

        def stream() -> Iterator[bytes]:
            try:
                yield from response.stream(CHUNK)
            finally:
                response.close()
                response.release_conn()

        return stream()
    if "url" in source:
        return open_url(str(source["url"]))
    raise SourceUnavailable("spec.source names no known kind (url, configMapKeyRef, s3, inline)")
