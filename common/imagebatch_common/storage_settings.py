"""Where the object store is and how to log in: plain values, no client.

Kept apart from the storage adapter so that settings (the operator's, the worker's) can
name them without importing the S3 client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from imagebatch_common.contract import WorkerEnv as Env


@dataclass(frozen=True)
class StorageSettings:
    """Where MinIO is and how to log in. Read from ``MINIO_*`` environment variables."""

    endpoint: str  # host:port, no scheme
    access_key: str
    secret_key: str
    secure: bool = False
    region: str | None = None
    session_token: str | None = None  # with temporary (STS) credentials

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StorageSettings:
        source = os.environ if env is None else env
        required = (Env.STORAGE_ENDPOINT, Env.STORAGE_ACCESS_KEY, Env.STORAGE_SECRET_KEY)
        missing = [name.value for name in required if not source.get(name)]
        if missing:
            raise ValueError(f"missing storage settings: {', '.join(missing)}")
        return cls(
            endpoint=source[Env.STORAGE_ENDPOINT],
            access_key=source[Env.STORAGE_ACCESS_KEY],
            secret_key=source[Env.STORAGE_SECRET_KEY],
            secure=source.get(Env.STORAGE_SECURE, "false").lower() in ("1", "true", "yes"),
            region=source.get(Env.STORAGE_REGION) or None,
            session_token=source.get(Env.STORAGE_SESSION_TOKEN) or None,
        )

    def __repr__(self) -> str:  # never print the secret
        return f"StorageSettings(endpoint={self.endpoint!r}, secure={self.secure})"
