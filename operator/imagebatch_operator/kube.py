"""The one module that talks to the Kubernetes API.

Every call is idempotent where it can be: a create that meets 409 means the object is
already there, a delete that meets 404 means it is already gone. Failures split in two:
``ApiUnavailable`` (the server is unreachable, overloaded or answering 5xx: back off
quietly and retry) and ``ApiRefused`` (a 4xx that retrying will not change, such as a
403 from RBAC: a defect to report). Every request is counted by verb, resource and
answer, for the metrics and the benchmarks; every request has a timeout, so an API
server that stops answering holds no worker thread for long.
"""

from __future__ import annotations

import base64
import datetime
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from imagebatch_operator.plan import GROUP, KIND, PLURAL, VERSION

_MERGE = "application/merge-patch+json"
_TIMEOUT = (5.0, 30.0)  # connect, read
_T = TypeVar("_T")


class ApiUnavailable(Exception):
    """The API server could not be reached or is overloaded; try again later."""


class ApiRefused(Exception):
    """The API server refused a request for good (403, 422, ...): retrying will not help."""


class Conflict(Exception):
    """The object changed since it was read (409 on an update with a resourceVersion)."""


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Kube:
    """Typed helpers over the official client; plain dicts in and out."""

    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self.on_request: Callable[[str, str, str], None] | None = None
        self.instance = socket.gethostname()

    # -- the one place a request is made ----------------------------------------

    def _call(
        self,
        verb: str,
        resource: str,
        what: str,
        request: Callable[[], _T],
        *,
        absent: tuple[int, ...] = (),
    ) -> _T | None:
        """Make one request; count it; None when it answered one of ``absent``."""
        try:
            result = request()
        except ApiException as error:
            code = int(error.status or 0)
            self._count(verb, resource, str(code))
            if code in absent:
                return None
            if code == 409:
                raise Conflict(f"{what}: changed meanwhile") from error
            if code in (429,) or code >= 500 or code == 0:
                raise ApiUnavailable(f"{what}: HTTP {code} {error.reason}") from error
            raise ApiRefused(f"{what}: HTTP {code} {error.reason}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            self._count(verb, resource, "unreachable")
            raise ApiUnavailable(f"{what}: the API server is unreachable") from error
        self._count(verb, resource, "ok")
        return result

    def _count(self, verb: str, resource: str, code: str) -> None:
        with self._lock:
            self.requests[(verb, resource, code)] += 1
        if self.on_request is not None:
            self.on_request(verb, resource, code)

    def _dict(self, obj: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return result

    # -- reads -------------------------------------------------------------------

    def config_map_value(self, namespace: str, name: str, key: str) -> bytes | None:
        """The bytes under ``key`` (data or binaryData); None when map or key is missing."""
        cm = self._call(
            "get",
            "configmaps",
            f"configmap {namespace}/{name}",
            lambda: self.core.read_namespaced_config_map(
                name, namespace, _request_timeout=_TIMEOUT
            ),
            absent=(404,),
        )
        if cm is None:
            return None
        if cm.data and key in cm.data:
            return str(cm.data[key]).encode()
        if cm.binary_data and key in cm.binary_data:
            return base64.b64decode(cm.binary_data[key])
        return None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as a dict (``data`` decoded to str); None when it does not exist."""
        secret = self._call(
            "get",
            "secrets",
            f"secret {namespace}/{name}",
            lambda: self.core.read_namespaced_secret(name, namespace, _request_timeout=_TIMEOUT),
            absent=(404,),
        )
        if secret is None:
            return None
        out = self._dict(secret)
        out["data"] = {
            k: base64.b64decode(v).decode(errors="replace")
            for k, v in (out.get("data") or {}).items()
        }
        return out

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = self.read_secret(namespace, name)
        if secret is None:
            return None
        value = secret["data"].get(key)
        return str(value) if value is not None else None

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self._call(
            "get",
            "jobs",
            f"job {namespace}/{name}",
            lambda: self.batch.read_namespaced_job(name, namespace, _request_timeout=_TIMEOUT),
            absent=(404,),
        )
        return None if job is None else self._dict(job)

    def get_batch(self, namespace: str, name: str) -> dict[str, Any] | None:
        found = self._call(
            "get",
            PLURAL,
            f"imagebatch {namespace}/{name}",
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=_TIMEOUT
            ),
            absent=(404,),
        )
        return None if found is None else dict(found)

    # -- writes ------------------------------------------------------------------

    def _create(
        self, resource: str, manifest: Mapping[str, Any], create: Callable[..., object]
    ) -> bool:
        """Create a namespaced object; False when one of that name already exists."""
        meta = manifest["metadata"]
        try:
            self._call(
                "create",
                resource,
                f"{resource[:-1]} {meta['namespace']}/{meta['name']}",
                lambda: create(meta["namespace"], dict(manifest), _request_timeout=_TIMEOUT),
            )
        except Conflict:
            return False
        return True

    def create_secret(self, manifest: Mapping[str, Any]) -> bool:
        """Create a Secret; False when one of that name already exists."""
        return self._create("secrets", manifest, self.core.create_namespaced_secret)

    def replace_secret(self, manifest: Mapping[str, Any], resource_version: str) -> None:
        """Rewrite a Secret's data, labels and annotations, only if it is still the version
        that was read (a merge patch: RBAC needs ``patch``, not ``update``)."""
        meta = manifest["metadata"]
        data = {
            key: base64.b64encode(str(value).encode()).decode()
            for key, value in (manifest.get("stringData") or {}).items()
        }
        body = {
            "metadata": {
                "resourceVersion": resource_version,
                "labels": meta.get("labels") or {},
                "annotations": meta.get("annotations") or {},
            },
            "data": data,
        }
        self._call(
            "patch",
            "secrets",
            f"secret {meta['namespace']}/{meta['name']}",
            lambda: self.core.patch_namespaced_secret(
                meta["name"],
                meta["namespace"],
                body,
                _content_type=_MERGE,
                _request_timeout=_TIMEOUT,
            ),
        )

    def create_job(self, manifest: Mapping[str, Any]) -> bool:
        """Create the Job; False when it already exists (a previous pass made it)."""
        return self._create("jobs", manifest, self.batch.create_namespaced_job)

    def patch_job(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """Merge-patch a Job's spec (suspend, parallelism); a missing Job is ignored."""
        self._call(
            "patch",
            "jobs",
            f"job {namespace}/{name}",
            lambda: self.batch.patch_namespaced_job(
                name, namespace, {"spec": dict(spec)}, _request_timeout=_TIMEOUT
            ),
            absent=(404,),
        )

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a missing Job is fine."""
        self._call(
            "delete",
            "jobs",
            f"job {namespace}/{name}",
            lambda: self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _request_timeout=_TIMEOUT
            ),
            absent=(404,),
        )

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; return the object as stored (None: gone).

        Lists (the conditions) are written whole, as a merge patch replaces them.
        """
        found = self._call(
            "patch",
            f"{PLURAL}/status",
            f"status of {namespace}/{name}",
            lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": dict(status)},
                _content_type=_MERGE,
                _request_timeout=_TIMEOUT,
            ),
            absent=(404,),
        )
        return None if found is None else dict(found)

    def set_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any] | None:
        """Write the batch's finalizers, only if it is still the version that was read."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        found = self._call(
            "patch",
            PLURAL,
            f"finalizers of {namespace}/{name}",
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body,
                _content_type=_MERGE,
                _request_timeout=_TIMEOUT,
            ),
            absent=(404,),
        )
        return None if found is None else dict(found)

    def watch_pods(
        self,
        label_selector: str,
        namespace: str | None,
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
    ) -> None:
        """List, then watch, the pods that carry ``label_selector``, until ``stop`` is set.

        The selector is applied by the API server, so only the operator's own worker
        pods travel, whatever else runs in the namespaces. Raw JSON, not client models:
        a watch event costs a ``json.loads``. A broken or expired watch lists again;
        failures back off up to 30 s.
        """
        failures = 0
        while not stop.is_set():
            try:
                version: str | None = self._list_pods(label_selector, namespace, on_event)
                failures = 0
                while version is not None and not stop.is_set():
                    # None: the version expired (410), so list again.
                    version = self._watch_pods(label_selector, namespace, version, on_event)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
                failures += 1
                stop.wait(min(2.0**failures, 30.0))

    def _pods_call(self, namespace: str | None, **kwargs: Any) -> Any:
        if namespace is None:
            return self.core.list_pod_for_all_namespaces(_preload_content=False, **kwargs)
        return self.core.list_namespaced_pod(namespace, _preload_content=False, **kwargs)

    def _list_pods(
        self,
        selector: str,
        namespace: str | None,
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> str:
        response = self._call(
            "list",
            "pods",
            "worker pods",
            lambda: self._pods_call(namespace, label_selector=selector, _request_timeout=_TIMEOUT),
        )
        assert response is not None
        listed = json.loads(response.data)
        for pod in listed.get("items") or []:
            on_event("LISTED", pod)
        return str(listed["metadata"]["resourceVersion"])

    def _watch_pods(
        self,
        selector: str,
        namespace: str | None,
        version: str,
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> str | None:
        """One watch request; the last version seen, or None when it expired."""
        response = self._call(
            "watch",
            "pods",
            "worker pods",
            lambda: self._pods_call(
                namespace,
                label_selector=selector,
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=300,
                _request_timeout=(_TIMEOUT[0], 330),
            ),
        )
        assert response is not None  # _call returns None only for an ``absent`` status
        try:
            pending = b""
            for chunk in response.stream(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        return None if obj.get("code") == 410 else version
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        on_event(str(kind), obj)
        finally:
            response.release_conn()
        return version

    def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """An Event on the ImageBatch, as ``kubectl describe`` shows them."""
        meta = involved["metadata"]
        now = _utc_now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "imagebatch-operator"},
            "reportingComponent": "imagebatch-operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        self._call(
            "create",
            "events",
            f"event on {meta['namespace']}/{meta['name']}",
            lambda: self.core.create_namespaced_event(
                meta["namespace"], event, _request_timeout=_TIMEOUT
            ),
        )
