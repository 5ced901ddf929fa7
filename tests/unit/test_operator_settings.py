"""The operator's settings: read once from the environment, a bad value names its variable."""

from __future__ import annotations

import pytest

from imagebatch_operator.settings import Settings, quantity_bytes

BASE = {"MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "ak", "MINIO_SECRET_KEY": "sk"}


def test_defaults_and_overrides() -> None:
    s = Settings.from_env(
        {**BASE, "IMAGEBATCH_MAX_ROWS": "10", "IMAGEBATCH_PUBLIC_URL": "https://cdn/x/"}
    )
    assert s.csv_limits.max_rows == 10
    assert s.public_url == "https://cdn/x"
    assert s.bucket == "imagebatch"
    assert s.worker_command == ("imagebatch-worker",)
    assert "sk" not in repr(s.storage)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMAGEBATCH_MAX_ROWS", "many"),
        ("IMAGEBATCH_MAX_CSV_BYTES", "0"),
        ("IMAGEBATCH_RESYNC_SECONDS", "-1"),
        ("IMAGEBATCH_WEBHOOK_SCHEDULE", "0,soon"),
        ("IMAGEBATCH_WORKER_MEMORY_LIMIT", "lots"),
        ("IMAGEBATCH_ALLOW_NETS", "10.0.0.0/8,intranet"),
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name}='{value}' is not valid"):
        Settings.from_env({**BASE, name: value})


def test_missing_storage_settings_are_named() -> None:
    with pytest.raises(ValueError, match="missing storage settings: MINIO_SECRET_KEY"):
        Settings.from_env({k: v for k, v in BASE.items() if k != "MINIO_SECRET_KEY"})


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("1Gi", 1024**3), ("512Mi", 512 * 1024**2), ("1G", 10**9), ("1073741824", 1024**3)],
)
def test_memory_quantities_read_as_kubernetes_reads_them(quantity: str, expected: int) -> None:
    assert quantity_bytes(quantity) == expected


def test_allowed_buckets_start_with_the_operators_own() -> None:
    s = Settings.from_env({**BASE, "IMAGEBATCH_EXTRA_BUCKETS": "archive, imagebatch,staging"})
    assert s.allowed_buckets == ("imagebatch", "archive", "staging")
