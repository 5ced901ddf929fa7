"""The operator's settings: read once from the environment, a bad value names its variable."""

from __future__ import annotations

import pytest

from imagebatch_operator.settings import Settings

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
        ("IMAGEBATCH_POLL_SECONDS", "-1"),
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name}='{value}' is not valid"):
        Settings.from_env({**BASE, name: value})


def test_missing_storage_settings_are_named() -> None:
    with pytest.raises(ValueError, match="missing storage settings: MINIO_SECRET_KEY"):
        Settings.from_env({k: v for k, v in BASE.items() if k != "MINIO_SECRET_KEY"})
