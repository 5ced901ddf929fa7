"""Worker settings, shard location and log lines: parsing from the environment, redaction."""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path

import pytest

from imagebatch_common.envread import parse_networks
from imagebatch_common.redact import redact_url
from imagebatch_worker.logs import JsonLog
from imagebatch_worker.runner import ShardLocation
from imagebatch_worker.settings import MIB, WorkerSettings, available_cpus


def test_defaults_are_the_documented_limits() -> None:
    settings = WorkerSettings.from_env({})

    assert settings.max_image_bytes == 50 * MIB
    assert settings.max_pixels == 50_000_000
    assert settings.max_redirects == 5
    assert settings.allow_nets == ()
    assert settings.compress_workers >= 1


def test_every_variable_is_read() -> None:
    settings = WorkerSettings.from_env(
        {
            "IMAGEBATCH_MAX_IMAGE_BYTES": "1024",
            "IMAGEBATCH_MAX_PIXELS": "2000",
            "IMAGEBATCH_CONNECT_TIMEOUT": "1.5",
            "IMAGEBATCH_READ_TIMEOUT": "2.5",
            "IMAGEBATCH_IMAGE_TIMEOUT": "9",
            "IMAGEBATCH_MAX_REDIRECTS": "0",
            "IMAGEBATCH_RETRIES": "0",
            "IMAGEBATCH_RETRY_BACKOFF": "0.1",
            "IMAGEBATCH_MAX_RETRY_AFTER": "4",
            "IMAGEBATCH_ALLOW_NETS": "127.0.0.0/8, ::1/128 10.1.0.0/16",
            "IMAGEBATCH_CONCURRENCY": "3",
            "IMAGEBATCH_COMPRESS_WORKERS": "1",
            "IMAGEBATCH_COMPRESS_IN": "threads",
            "IMAGEBATCH_CA_BUNDLE": "/etc/ssl/ca.pem",
            "IMAGEBATCH_USER_AGENT": "catalog-bot/2",
            "IMAGEBATCH_MEMORY_LIMIT": "1073741824",
        }
    )

    assert settings == WorkerSettings(
        max_image_bytes=1024,
        max_pixels=2000,
        connect_timeout=1.5,
        read_timeout=2.5,
        image_timeout=9.0,
        max_redirects=0,
        retries=0,
        retry_backoff=0.1,
        max_retry_after=4.0,
        allow_nets=(
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("10.1.0.0/16"),
        ),
        concurrency=3,
        compress_workers=1,
        compress_in="threads",
        ca_bundle="/etc/ssl/ca.pem",
        user_agent="catalog-bot/2",
        memory_limit=1024**3,
    )


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("IMAGEBATCH_MAX_PIXELS", "lots", "IMAGEBATCH_MAX_PIXELS='lots'"),
        ("IMAGEBATCH_MAX_IMAGE_BYTES", "0", "greater than zero"),
        ("IMAGEBATCH_READ_TIMEOUT", "-1", "greater than zero"),
        ("IMAGEBATCH_IMAGE_TIMEOUT", "nan", "greater than zero"),
        ("IMAGEBATCH_RETRIES", "-2", "must not be negative"),
        ("IMAGEBATCH_ALLOW_NETS", "127.0.0.0/8,localhost", "'localhost' is not a CIDR"),
        ("IMAGEBATCH_COMPRESS_IN", "gpu", '"processes" or "threads"'),
        ("IMAGEBATCH_MEMORY_LIMIT", "1Gi", "IMAGEBATCH_MEMORY_LIMIT='1Gi'"),
    ],
    ids=[
        "not-a-number",
        "zero-bytes",
        "negative-timeout",
        "nan",
        "negative-retries",
        "bad-cidr",
        "bad-compress-mode",
        "memory-limit-not-in-bytes",
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, words: str) -> None:
    with pytest.raises(ValueError, match="IMAGEBATCH_") as caught:
        WorkerSettings.from_env({name: value})

    assert words in str(caught.value)


def test_parse_networks_accepts_host_bits() -> None:
    assert parse_networks("127.0.0.1/8") == (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    ("cpu_max", "expected_at_most"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("garbage", None)],
    ids=["no-quota", "one-and-a-half-cpus", "half-a-cpu", "unreadable"],
)
def test_available_cpus_honours_the_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected_at_most: int | None
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    unlimited = available_cpus(tmp_path / "missing")

    counted = available_cpus(tmp_path)

    if expected_at_most is None:
        assert counted == unlimited
    else:
        assert counted == min(unlimited, expected_at_most)


# -- shard location -----------------------------------------------------------

BASE_ENV = {"IMAGEBATCH_BUCKET": "images", "IMAGEBATCH_PREFIX": "ns/b/", "IMAGEBATCH_RUN": "r7"}


def test_location_from_job_environment() -> None:
    location = ShardLocation.from_env({**BASE_ENV, "JOB_COMPLETION_INDEX": "3"})

    assert location == ShardLocation("images", "ns/b/", "r7", 3)
    assert location.manifest_key == "ns/b/.runs/r7/shards/3.json"
    assert location.result_key == "ns/b/.runs/r7/results/3.json"


def test_shard_flag_overrides_the_job_index() -> None:
    location = ShardLocation.from_env({**BASE_ENV, "JOB_COMPLETION_INDEX": "3"}, index=9)

    assert location.index == 9


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (BASE_ENV, "JOB_COMPLETION_INDEX"),
        ({**BASE_ENV, "JOB_COMPLETION_INDEX": "x"}, "not a shard index"),
        ({"IMAGEBATCH_RUN": "r", "JOB_COMPLETION_INDEX": "0"}, "IMAGEBATCH_BUCKET"),
        ({"IMAGEBATCH_BUCKET": "b", "JOB_COMPLETION_INDEX": "0"}, "IMAGEBATCH_RUN"),
    ],
    ids=["no-index", "bad-index", "no-bucket", "no-run"],
)
def test_location_errors(env: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ShardLocation.from_env(env)


# -- logs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (
            "https://cdn.example/a/b.jpg?X-Amz-Signature=abc&X-Amz-Credential=key",
            "https://cdn.example/a/b.jpg",
        ),
        ("https://user:password@cdn.example:8443/a.jpg#frag", "https://cdn.example:8443/a.jpg"),
        ("http://[2001:db8::1]:8080/a.png?t=1", "http://[2001:db8::1]:8080/a.png"),
        ("http://example.com:bad/", "<unparseable URL>"),
    ],
    ids=["presigned", "userinfo-and-fragment", "ipv6", "unparseable"],
)
def test_logged_urls_carry_no_secrets(url: str, logged: str) -> None:
    assert redact_url(url) == logged


def test_json_log_writes_one_object_per_line() -> None:
    out = io.StringIO()
    log = JsonLog(out)

    log.emit("image", url="https://a.example/x.jpg", ok=True, ms=1.5)
    log.emit("shard", images=1)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["image", "shard"]
    assert lines[0]["ok"] is True and lines[0]["ms"] == 1.5
    assert all("ts" in line for line in lines)
