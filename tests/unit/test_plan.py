"""Sharding, content-addressed keys and the Job builder: same input, same output."""

from __future__ import annotations

from typing import Any

import pytest

from imagebatch_common.contract import EXIT_PERMANENT, Compression, ShardManifest, image_key
from imagebatch_common.storage import StorageSettings
from imagebatch_operator import plan
from imagebatch_operator.settings import Settings

REF = plan.BatchRef("shop", "spring-catalog", "0f1e2d3c-aaaa-bbbb-cccc-123456789abc", 3)
SETTINGS = Settings(storage=StorageSettings("minio.storage:9000", "AKIA", "s3cr3t"))


def test_keys_are_content_addressed_over_url_and_settings() -> None:
    a = image_key("p/", "https://x.test/a.jpg", Compression())
    assert a == image_key("p/", "https://x.test/a.jpg", Compression())
    assert a.startswith("p/images/") and a.endswith(".jpg")
    assert a != image_key("p/", "https://x.test/b.jpg", Compression())
    assert a != image_key("p/", "https://x.test/a.jpg", Compression(quality=60))
    assert image_key("p/", "https://x.test/a.jpg", Compression(format="webp")).endswith(".webp")


def test_repeated_urls_are_processed_once_in_first_seen_order() -> None:
    keys = plan.unique_images(["u1", "u2", "u1", "u3", "u2"], "p/", Compression())
    assert list(keys) == ["u1", "u2", "u3"]


@pytest.mark.parametrize(
    ("images", "per_shard", "sizes"), [(5, 2, [2, 2, 1]), (4, 4, [4]), (1, 100, [1]), (0, 3, [])]
)
def test_shards_split_in_order(images: int, per_shard: int, sizes: list[int]) -> None:
    keys = plan.unique_images([f"https://x.test/{i}" for i in range(images)], "p/", Compression())
    manifests = plan.shard_manifests(
        keys, run="r", bucket="b", prefix="p/", compression=Compression(), per_shard=per_shard
    )
    assert [len(m.images) for m in manifests] == sizes
    assert [m.index for m in manifests] == list(range(len(sizes)))
    flat = [i.url for m in manifests for i in m.images]
    assert flat == list(keys)
    for m in manifests:
        assert ShardManifest.from_json(m.to_json()) == m


def test_manifests_say_which_outputs_were_already_stored() -> None:
    keys = plan.unique_images(["https://x.test/a", "https://x.test/b"], "p/", Compression())
    stored = {keys["https://x.test/a"]}
    manifests = plan.shard_manifests(
        keys,
        run="r",
        bucket="b",
        prefix="p/",
        compression=Compression(),
        per_shard=5,
        stored=stored,
    )
    assert [(i.url, i.stored) for i in manifests[0].images] == [
        ("https://x.test/a", True),
        ("https://x.test/b", False),
    ]
    again = ShardManifest.from_json(manifests[0].to_json())
    assert [i.stored for i in again.images] == [True, False]


def test_names_are_deterministic_and_fit_hostname_limits() -> None:
    long = plan.BatchRef("n", "x" * 200, REF.uid, 12)
    assert plan.job_name(long) == plan.job_name(long)
    assert len(plan.job_name(long)) <= 50
    assert plan.job_name(REF) == "spring-catalog-g3"
    assert plan.run_id(REF) == "g3-0f1e2d3c"


def job(**spec: Any) -> dict[str, Any]:
    return plan.build_job(
        REF,
        spec,
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


def test_output_location_defaults_to_namespace_and_name() -> None:
    assert plan.output_prefix({}, REF) == "shop/spring-catalog/"
    assert plan.output_prefix({"output": {"prefix": "custom"}}, REF) == "custom/"
    assert plan.output_bucket({}, SETTINGS) == "imagebatch"
    assert plan.output_bucket({"output": {"bucket": "other"}}, SETTINGS) == "other"
