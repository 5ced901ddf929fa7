"""Sharding, content-addressed keys and the Job builder: same input, same output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch_common.contract import (
    EXIT_PERMANENT,
    Compression,
    ShardImage,
    ShardManifest,
    image_key,
    image_keyer,
)
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator import plan
from imagebatch_operator.settings import Settings
from imagebatch_operator.spec import BatchSpec, Sharding, Source, parse_spec

ROOT = Path(__file__).resolve().parents[2]
REF = plan.BatchRef("shop", "spring-catalog", "0f1e2d3c-aaaa-bbbb-cccc-123456789abc", 3)
SETTINGS = Settings(storage=StorageSettings("minio.storage:9000", "AKIA", "s3cr3t"))


def test_keys_are_content_addressed_over_url_and_settings() -> None:
    a = image_key("p/", "https://x.test/a.jpg", Compression())
    assert a == image_key("p/", "https://x.test/a.jpg", Compression())
    assert a.startswith("p/images/") and a.endswith(".jpg")
    assert a != image_key("p/", "https://x.test/b.jpg", Compression())
    assert a != image_key("p/", "https://x.test/a.jpg", Compression(quality=60))
    assert image_key("p/", "https://x.test/a.jpg", Compression(format="webp")).endswith(".webp")


def images(count: int) -> list[ShardImage]:
    return [
        ShardImage(f"https://x.test/{i}", image_key("p/", f"https://x.test/{i}", Compression()))
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "per_shard", "sizes"), [(5, 2, [2, 2, 1]), (4, 4, [4]), (1, 100, [1]), (0, 3, [])]
)
def test_shards_split_in_order(count: int, per_shard: int, sizes: list[int]) -> None:
    given = images(count)
    manifests = list(
        plan.shard_manifests(
            iter(given),
            run="r",
            bucket="b",
            prefix="p/",
            compression=Compression(),
            per_shard=per_shard,
        )
    )
    assert [len(m.images) for m in manifests] == sizes
    assert [m.index for m in manifests] == list(range(len(sizes)))
    assert [i for m in manifests for i in m.images] == given
    for m in manifests:
        assert ShardManifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("images_count", "parallelism", "given", "expected"),
    [
        pytest.param(2000, 4, None, 500, id="one-shard-per-pod"),
        pytest.param(1000, 4, None, 250, id="quarter-each"),
        pytest.param(10, 4, None, 50, id="small-batch-one-pod"),
        pytest.param(100_000, 4, None, 500, id="capped-so-a-retry-redoes-little"),
        pytest.param(2000, 4, 7, 7, id="the-user-decides"),
        pytest.param(0, 4, None, 50, id="nothing-to-do"),
    ],
)
def test_shard_size_follows_images_and_parallelism(
    images_count: int, parallelism: int, given: int | None, expected: int
) -> None:
    spec = BatchSpec(
        source=Source(inline="x"),
        sharding=Sharding(images_per_shard=given, parallelism=parallelism),
    )
    assert plan.images_per_shard(spec, images_count) == expected


def test_names_are_deterministic_and_fit_hostname_limits() -> None:
    long = plan.BatchRef("n", "x" * 200, REF.uid, 12)
    run = plan.run_id(long)
    assert plan.job_name(long, run) == plan.job_name(long, run)
    assert len(plan.job_name(long, run)) <= 50
    assert plan.run_id(REF) == "g3-0f1e2d3c"
    assert plan.job_name(REF, "g3-0f1e2d3c") == "spring-catalog-g3"


def job(**spec: Any) -> dict[str, Any]:
    return plan.build_job(
        REF,
        parse_spec({"source": {"inline": "x"}, **spec}),
        SETTINGS,
        run="g3-0f1e2d3c",
        shards=7,
        bucket="imagebatch",
        prefix="shop/spring-catalog/",
    )


def test_job_is_one_indexed_job_owned_by_the_batch() -> None:
    j = job(sharding={"parallelism": 3, "retriesPerShard": 2})
    assert j == job(sharding={"parallelism": 3, "retriesPerShard": 2})
    s = j["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"], s["backoffLimitPerIndex"]) == (
        "Indexed",
        7,
        3,
        2,
    )
    assert s["maxFailedIndexes"] == 7
    owner = j["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ImageBatch", REF.uid, True)
    rules = s["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailIndex" and rules[0]["onExitCodes"]["values"] == [
        EXIT_PERMANENT
    ]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_parallelism_never_exceeds_the_shard_count() -> None:
    assert job(sharding={"parallelism": 50})["spec"]["parallelism"] == 7


def test_worker_pod_is_restricted_and_has_no_token() -> None:
    pod = job()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]["securityContext"]
    assert c == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_credentials_come_from_a_secret_never_the_manifest() -> None:
    j = job()
    env = {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == plan.storage_secret_name(
        REF
    )
    assert env["MINIO_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secretKey"
    assert "s3cr3t" not in repr(j) and "AKIA" not in repr(j)
    assert env["IMAGEBATCH_RUN"]["value"] == "g3-0f1e2d3c"
    assert env["IMAGEBATCH_PREFIX"]["value"] == "shop/spring-catalog/"


def test_suspend_is_carried_to_the_job() -> None:
    assert job(suspend=True)["spec"]["suspend"] is True
    assert job()["spec"]["suspend"] is False


def spec_with(**fields: Any) -> BatchSpec:
    return parse_spec({"source": {"inline": "x"}, **fields})


@pytest.mark.parametrize(
    ("output", "prefix"),
    [
        pytest.param({}, "shop/spring-catalog/", id="default-namespace-and-name"),
        pytest.param({"prefix": "custom"}, "shop/custom/", id="user-prefix-below-namespace"),
        pytest.param({"prefix": "team-b/victim/"}, "shop/team-b/victim/", id="never-elsewhere"),
    ],
)
def test_output_location_is_always_under_the_namespace(output: dict[str, str], prefix: str) -> None:
    assert plan.output_prefix(spec_with(output=output), REF) == prefix


def test_output_bucket_defaults_to_the_operators() -> None:
    assert plan.output_bucket(spec_with(), SETTINGS) == "imagebatch"
    assert plan.output_bucket(spec_with(output={"bucket": "other"}), SETTINGS) == "other"


def test_the_worker_learns_its_memory_limit_in_bytes() -> None:
    env = {e["name"]: e for e in job()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["IMAGEBATCH_MEMORY_LIMIT"]["value"] == str(1024**3)
    assert env["MINIO_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif", "original"])
def test_the_planning_keyer_gives_the_contracts_keys(fmt: str) -> None:
    compression = Compression(quality=61, format=fmt, max_dimension=800)
    keyer = image_keyer("ns/b/", compression)
    for url in ("https://x.test/a.jpg", "https://x.test/é?q=1"):
        assert keyer(url) == image_key("ns/b/", url, compression)


def test_the_session_policy_reaches_exactly_the_runs_keys() -> None:
    policy = json.loads(plan.session_policy("imagebatch", "shop/spring/", "g3-0f1e2d3c"))
    objects, listing = policy["Statement"]
    assert sorted(objects["Action"]) == ["s3:AbortMultipartUpload", "s3:GetObject", "s3:PutObject"]
    assert objects["Resource"] == [
        "arn:aws:s3:::imagebatch/shop/spring/.runs/g3-0f1e2d3c/*",
        "arn:aws:s3:::imagebatch/shop/spring/images/*",
    ]
    assert listing["Action"] == ["s3:ListBucket"]
    assert listing["Resource"] == ["arn:aws:s3:::imagebatch"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["shop/spring/images/*"]}}
    assert "Delete" not in json.dumps(policy)


def test_the_longest_names_the_crd_allows_keep_the_policy_well_under_2048() -> None:
    schema = yaml.safe_load((ROOT / "crds" / "imagebatches.imagebatch.dev.yaml").read_text())
    output = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["output"]["properties"]
    longest_prefix = "p" * output["prefix"]["maxLength"]
    longest_bucket = "b" * output["bucket"]["maxLength"]
    batch = plan.BatchRef("n" * 63, "x" * 253, REF.uid, 2**63 - 1)
    spec = parse_spec(
        {"source": {"inline": "x"}, "output": {"prefix": longest_prefix, "bucket": longest_bucket}}
    )
    policy = plan.session_policy(
        plan.output_bucket(spec, SETTINGS), plan.output_prefix(spec, batch), plan.run_id(batch)
    )
    assert len(policy) <= 1500


@pytest.mark.parametrize("stored", [False, True, None])
def test_a_manifest_is_written_as_json_dumps_writes_it(stored: bool | None) -> None:
    manifest = ShardManifest(
        "g1",
        3,
        "b",
        "ns/é/",
        Compression(40, "webp", 800),
        (ShardImage('https://h/"q"/ü.jpg', "k1", stored), ShardImage("u", "k2", stored)),
    )
    doc = {
        "run": "g1",
        "index": 3,
        "bucket": "b",
        "prefix": "ns/é/",
        "compression": {"quality": 40, "format": "webp", "max_dimension": 800},
        "images": [{"url": i.url, "key": i.key, "stored": stored} for i in manifest.images],
        "version": manifest.version,
    }
    assert manifest.to_json() == json.dumps(doc, separators=(",", ":")).encode()
