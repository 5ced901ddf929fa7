"""The typed spec: its defaults are the CRD's, and what starts a new run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch_operator.spec import BatchSpec, parse_spec

CRD = Path(__file__).resolve().parents[2] / "crds" / "imagebatches.imagebatch.dev.yaml"


def crd_defaults() -> dict[str, Any]:
    """Every default in the CRD's spec schema, by dotted path."""
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found: dict[str, Any] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        for name, child in (node.get("properties") or {}).items():
            where = f"{path}.{name}" if path else name
            if "default" in child and child.get("type") != "object":
                found[where] = child["default"]
            walk(child, where)

    walk(schema["properties"]["spec"], "")
    return found


def code_defaults(spec: BatchSpec) -> dict[str, Any]:
    return {
        "compression.quality": spec.compression.quality,
        "compression.format": spec.compression.format,
        "output.deletionPolicy": spec.output.deletion_policy,
        "sharding.parallelism": spec.sharding.parallelism,
        "sharding.retriesPerShard": spec.sharding.retries_per_shard,
        "failurePolicy.maxFailedImagePercent": spec.max_failed_image_percent,
        "suspend": spec.suspend,
    }


def test_the_codes_defaults_are_the_crds() -> None:
    from_crd = crd_defaults()
    parsed = code_defaults(parse_spec({"source": {"inline": "x"}}))
    assert parsed == from_crd
    assert "sharding.imagesPerShard" not in from_crd  # derived when unset


@pytest.mark.parametrize(
    ("change", "new_run"),
    [
        pytest.param({"suspend": True}, False, id="suspend-is-applied-in-place"),
        pytest.param({"sharding": {"parallelism": 9}}, False, id="parallelism-in-place"),
        pytest.param({"compression": {"quality": 80}}, True, id="quality"),
        pytest.param({"compression": {"format": "webp"}}, True, id="format"),
        pytest.param({"source": {"inline": "y"}}, True, id="source"),
        pytest.param({"sharding": {"imagesPerShard": 7}}, True, id="shard-size"),
        pytest.param({"failurePolicy": {"maxFailedImagePercent": 1}}, True, id="policy"),
        pytest.param({"webhook": {"url": "https://h.example/x"}}, True, id="webhook"),
        pytest.param({"retry": "2026-03-01T12:00:00Z"}, True, id="retry-token"),
    ],
)
def test_which_changes_start_a_new_run(change: dict[str, Any], new_run: bool) -> None:
    before = parse_spec({"source": {"inline": "x"}})
    after = parse_spec({"source": {"inline": "x"}, **change})
    assert (before.run_identity() != after.run_identity()) == new_run


def test_every_source_kind_parses_and_describes_itself_without_secrets() -> None:
    assert parse_spec(
        {"source": {"url": "https://u:p@h.example/a.csv?sig=1"}}
    ).source.describe() == ("URL https://h.example/a.csv")
    assert parse_spec({"source": {"configMapKeyRef": {"name": "c", "key": "k"}}}).source.kind == (
        "configMapKeyRef"
    )
    assert parse_spec({"source": {"s3": {"bucket": "b", "key": "ns/a.csv"}}}).source.s3 == (
        "b",
        "ns/a.csv",
    )
