"""The storage credentials a run's worker pods use, as a Secret owned by the batch.

By default each run gets a temporary credential of its own, minted with S3 STS
AssumeRole and an inline session policy (``plan.session_policy``) that reaches exactly
that run's keys: another namespace's prefix, another bucket, a delete, all answer
AccessDenied from the store itself. One credential per run, not per pod (the store
keeps every credential it issues). The Secret carries the credential's expiry; a run
that outlives it gets a new one before it expires, and pods started later read it.

The operator's own keys never leave its namespace, except with the explicit
``static`` setting, for a store without STS.

The Secret lives in the batch's namespace (pods read it through ``secretKeyRef``) and
carries an owner reference, so it goes when the batch goes. A Secret of that name that
this batch does not own is never overwritten: that is a conflict the user must solve.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from imagebatch_common.storage import Storage
from imagebatch_operator import plan
from imagebatch_operator.decide import Observation
from imagebatch_operator.kube import Conflict, Kube
from imagebatch_operator.observe import RunMemory
from imagebatch_operator.settings import Settings
from imagebatch_operator.status import Reason
from imagebatch_operator.webhook import format_time, parse_time

# A static credential does not expire; this stands for "never renew".
NEVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)


def owned_by(secret: Mapping[str, Any], uid: str) -> bool:
    refs = (secret.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class Credentials:
    """Makes sure a run's worker credentials exist and are fresh."""

    def __init__(self, settings: Settings, kube: Kube, storage: Storage) -> None:
        self.settings = settings
        self.kube = kube
        self.storage = storage

    def ensure(
        self, obs: Observation, run: str, memory: RunMemory, now: datetime.datetime
    ) -> tuple[Reason | None, bool]:
        """(a refusal reason or None, whether a credential was renewed) for ``run``.

        ``memory.credentials_expire`` is set to what the Secret now holds.
        """
        renew_before = datetime.timedelta(seconds=self.settings.credential_renew_seconds)
        expiry = memory.credentials_expire
        if expiry is not None and memory.credentials_run == run and now < expiry - renew_before:
            return None, False  # fresh, and known without asking the API server
        name = plan.storage_secret_name(obs.ref)
        existing = self.kube.read_secret(obs.ref.namespace, name)
        if existing is not None and not owned_by(existing, obs.ref.uid):
            return Reason.SECRET_CONFLICT, False
        if existing is not None:
            labels = existing["metadata"].get("labels") or {}
            annotations = existing["metadata"].get("annotations") or {}
            stored = parse_time(annotations.get(plan.ANNOTATION_EXPIRES))
            static = self.settings.worker_credentials == "static"
            if labels.get(plan.LABEL_RUN) == run and (
                (static and "sessionToken" not in existing["data"])
                or (stored is not None and now < stored - renew_before)
            ):
                memory.credentials_expire = NEVER if static else stored
                memory.credentials_run = run
                return None, False
        data, expires = self._issue(obs, run)
        manifest = plan.build_storage_secret(obs.ref, run, data, format_time(expires))
        if existing is None:
            if not self.kube.create_secret(manifest):
                return None, False  # made meanwhile: the next pass reads it
        else:
            try:
                self.kube.replace_secret(manifest, str(existing["metadata"]["resourceVersion"]))
            except Conflict:
                return None, False
        memory.credentials_expire = expires
        memory.credentials_issued = now
        memory.credentials_run = run
        same_run = (existing or {}).get("metadata", {}).get("labels", {}).get(plan.LABEL_RUN)
        return None, same_run == run

    def _issue(self, obs: Observation, run: str) -> tuple[dict[str, str], datetime.datetime]:
        """New keys for ``run``: a temporary credential, or the operator's own (static)."""
        settings = self.settings
        if settings.worker_credentials == "static":
            keys = plan.credentials_data(settings.storage.access_key, settings.storage.secret_key)
            return keys, NEVER
        issued = self.storage.assume_role(
            plan.session_policy(
                plan.output_bucket(obs.spec, settings), plan.output_prefix(obs.spec, obs.ref), run
            ),
            settings.credential_seconds,
            endpoint=settings.sts_endpoint,
            role_arn=settings.sts_role_arn,
            session_name=f"imagebatch-{obs.ref.uid[:8]}-{run}"[:64],
        )
        expires = issued.expiration or (
            datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(seconds=settings.credential_seconds)
        )
        keys = plan.credentials_data(issued.access_key, issued.secret_key, issued.session_token)
        return keys, expires
