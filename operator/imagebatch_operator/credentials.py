"""The storage credentials a run's worker pods use, as a Secret owned by the batch.

The Secret lives in the batch's namespace (pods read it through ``secretKeyRef``) and
carries an owner reference, so it goes when the batch goes. A Secret of that name that
this batch does not own is never overwritten: that is a conflict the user must solve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagebatch_operator import plan
from imagebatch_operator.decide import Observation
from imagebatch_operator.kube import Kube
from imagebatch_operator.settings import Settings
from imagebatch_operator.status import Reason


def owned_by(secret: Mapping[str, Any], uid: str) -> bool:
    refs = (secret.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class StaticCredentials:
    """Hands each run the operator's own storage keys (explicit opt-in; see the README)."""

    def __init__(self, settings: Settings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube

    def ensure(self, obs: Observation, run: str) -> Reason | None:
        name = plan.storage_secret_name(obs.ref)
        existing = self.kube.read_secret(obs.ref.namespace, name)
        if existing is not None:
            return None if owned_by(existing, obs.ref.uid) else Reason.SECRET_CONFLICT
        keys = {
            "accessKey": self.settings.storage.access_key,
            "secretKey": self.settings.storage.secret_key,
        }
        if not self.kube.create_secret(plan.build_storage_secret(obs.ref, run, keys)):
            existing = self.kube.read_secret(obs.ref.namespace, name)
            if existing is None or not owned_by(existing, obs.ref.uid):
                return Reason.SECRET_CONFLICT
        return None
