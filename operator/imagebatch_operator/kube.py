"""The one module that talks to the Kubernetes API.

Every call is idempotent where it can be: a create that meets 409 means the object is
already there, a delete that meets 404 means it is already gone. API failures that are
worth retrying surface as ``ApiUnavailable`` so the caller can back off.
"""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from imagebatch_operator.plan import GROUP, LABEL_BATCH, PLURAL, VERSION

_MERGE = "application/merge-patch+json"


class ApiUnavailable(Exception):
    """The API server refused or could not be reached; try again later."""


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

    def _dict(self, obj: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return result

    @staticmethod
    def _unavailable(error: ApiException, what: str) -> ApiUnavailable:
        return ApiUnavailable(f"{what}: HTTP {error.status} {error.reason}")

    def config_map_value(self, namespace: str, name: str, key: str) -> bytes | None:
        """The bytes under ``key`` (data or binaryData); None when map or key is missing."""
        try:
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise self._unavailable(error, f"configmap {namespace}/{name}") from error
        if cm.data and key in cm.data:
            return str(cm.data[key]).encode()
        if cm.binary_data and key in cm.binary_data:
            return base64.b64decode(cm.binary_data[key])
        return None

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise self._unavailable(error, f"secret {namespace}/{name}") from error
        raw = (secret.data or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    def ensure_secret(self, manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        try:
            self.core.create_namespaced_secret(meta["namespace"], manifest)
        except ApiException as error:
            if error.status != 409:
                raise self._unavailable(error, f"secret {meta['name']}") from error
            try:
                self.core.patch_namespaced_secret(meta["name"], meta["namespace"], manifest)
            except ApiException as patch_error:
                raise self._unavailable(patch_error, f"secret {meta['name']}") from patch_error

    def ensure_job(self, manifest: dict[str, Any]) -> None:
        """Create the Job; 409 means a previous pass (or operator) already did."""
        meta = manifest["metadata"]
        try:
            self.batch.create_namespaced_job(meta["namespace"], manifest)
        except ApiException as error:
            if error.status != 409:
                raise self._unavailable(error, f"job {meta['name']}") from error

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.batch.read_namespaced_job(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise self._unavailable(error, f"job {namespace}/{name}") from error

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        try:
            self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
        except ApiException as error:
            if error.status != 404:
                raise self._unavailable(error, f"job {namespace}/{name}") from error

    def delete_other_jobs(self, namespace: str, batch_label: str, keep: str) -> list[str]:
        """Delete the batch's Jobs of earlier runs (and their pods); return their names."""
        try:
            jobs = self.batch.list_namespaced_job(
                namespace, label_selector=f"{LABEL_BATCH}={batch_label}"
            )
        except ApiException as error:
            raise self._unavailable(error, f"jobs of {namespace}/{batch_label}") from error
        deleted = []
        for job in jobs.items:
            if job.metadata.name == keep:
                continue
            try:
                self.batch.delete_namespaced_job(
                    job.metadata.name, namespace, propagation_policy="Background"
                )
                deleted.append(job.metadata.name)
            except ApiException as error:
                if error.status != 404:
                    raise self._unavailable(error, f"job {job.metadata.name}") from error
        return deleted

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists, e.g. conditions, are written whole)."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _content_type=_MERGE,
            )
        except ApiException as error:
            if error.status == 404:
                return  # deleted meanwhile
            raise self._unavailable(error, f"status of {namespace}/{name}") from error
