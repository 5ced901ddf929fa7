"""Tenancy: a namespace's batches reach that namespace's data and nothing else.

Two teams, ``team-a`` and ``team-b``, on the real cluster and the real MinIO. team-b
runs a batch; team-a then tries, as a user who may create ImageBatches and read Secrets
in its own namespace, every way it could reach team-b's data. Each attempt is refused:
by ``kubectl apply`` (the CRD schema), by a condition the operator sets, or with
AccessDenied from MinIO itself (the run's credential carries a session policy). At the
end team-b's objects are byte for byte what they were: the same keys and ETags.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from minio import Minio
from minio.error import S3Error

from imagebatch_operator import plan
from tests.cluster.stack import LocalCluster
from tests.e2e.conftest import OUTPUT_BUCKET, OperatorProcess, apply, get_batch, wait_batch
from tests.e2e.conftest import imagebatch as batch
from tests.support.servers import ImageServer, WebhookReceiver, photo

pytestmark = pytest.mark.e2e

HEADER = "S. No.,Product Name,Input Image Urls\n"


def make_namespace(cluster: LocalCluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.kubectl_ok("get", "serviceaccount", "default", "-n", name),
        f"namespace {name}",
    )
    return name


@pytest.fixture
def teams(cluster: LocalCluster) -> Iterator[tuple[str, str]]:
    a, b = make_namespace(cluster, "team-a"), make_namespace(cluster, "team-b")
    yield a, b
    for name in (a, b):
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def inventory(storage: Minio, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` with its ETag."""
    return {
        o.object_name or "": o.etag or ""
        for o in storage.list_objects(OUTPUT_BUCKET, prefix=prefix, recursive=True)
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = {c["type"]: c for c in obj["status"]["conditions"]}[type_]
    return found


def secret_data(cluster: LocalCluster, namespace: str, name: str) -> dict[str, str]:
    import base64

    raw = json.loads(cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json"))
    return {k: base64.b64decode(v).decode() for k, v in raw["data"].items()}


def denied(call: Any) -> bool:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)
    except S3Error as error:
        return error.code == "AccessDenied"
    return False


def test_a_team_cannot_reach_another_teams_data(
    cluster: LocalCluster,
    teams: tuple[str, str],
    operator: OperatorProcess,
    storage: Minio,
    images: ImageServer,
) -> None:
    team_a, team_b = teams
    s = images.url
    csv = HEADER + f"1,B1,{s}/a.jpg\n2,B2,{s}/b.png\n"
    apply(cluster, team_b, batch("catalog", {"inline": csv}))
    wait_batch(cluster, team_b, "catalog", ("Succeeded",))
    before = inventory(storage, f"{team_b}/")
    assert any(k.endswith("output.csv") for k in before)

    # 1. A prefix naming team-b's, with deletionPolicy Delete: it lands below team-a.
    apply(
        cluster,
        team_a,
        batch(
            "sneaky",
            {"inline": HEADER + f"1,A1,{s}/c.jpg\n"},
            output={"prefix": f"{team_b}/catalog/", "deletionPolicy": "Delete"},
        ),
    )
    sneaky = wait_batch(cluster, team_a, "sneaky", ("Succeeded",))
    assert sneaky["status"]["output"]["csv"] == (
        f"s3://{OUTPUT_BUCKET}/{team_a}/{team_b}/catalog/output.csv"
    )
    cluster.kubectl("delete", "ib", "sneaky", "-n", team_a, "--timeout=60s")
    assert inventory(storage, f"{team_a}/{team_b}/catalog/") == {}  # its own outputs went
    # ...and the schema refuses the ways out of the namespace outright.
    for bad, words in [
        ("../../" + team_b + "/", "'.' or '..'"),
        ("/" + team_b + "/", "must not start with '/'"),
        ("a//b", "must not contain '//'"),
        ("a\tb/", "only letters, digits"),
    ]:
        with pytest.raises(RuntimeError) as refused:
            apply(cluster, team_a, batch("escape", {"inline": csv}, output={"prefix": bad}))
        assert words in str(refused.value), (bad, str(refused.value))

    # 2. A bucket the operator does not allow.
    apply(cluster, team_a, batch("elsewhere", {"inline": csv}, output={"bucket": "foreign-x1"}))
    elsewhere = wait_batch(cluster, team_a, "elsewhere", ("Failed",))
    ready = condition(elsewhere, "Ready")
    assert ready["reason"] == "OutputNotAllowed" and "foreign-x1" in ready["message"]

    # 3. An s3 source under team-b's prefix.
    apply(
        cluster,
        team_a,
        batch("reader", {"s3": {"bucket": OUTPUT_BUCKET, "key": f"{team_b}/catalog/output.csv"}}),
    )
    reader = wait_batch(cluster, team_a, "reader", ("Failed",))
    ready = condition(reader, "Ready")
    assert ready["reason"] == "SourceNotAllowed"
    assert f"must be under {team_a}/" in ready["message"]
    assert "SKU" not in json.dumps(reader["status"]) and "http" not in ready["message"]

    # 4. team-a's worker credential, used directly with the SDK.
    apply(cluster, team_a, batch("own", {"inline": HEADER + f"1,A1,{s}/d.jpg\n"}))
    wait_batch(cluster, team_a, "own", ("Succeeded",))
    ref = plan.BatchRef(team_a, "own", "", 1)
    creds = secret_data(cluster, team_a, plan.storage_secret_name(ref))
    assert cluster.minio is not None
    assert creds["sessionToken"] and creds["accessKey"] != cluster.minio.access_key
    stolen = Minio(
        cluster.minio.endpoint,
        access_key=creds["accessKey"],
        secret_key=creds["secretKey"],
        session_token=creds["sessionToken"],
        secure=False,
        region="us-east-1",
    )
    victim = next(k for k in before if k.endswith("output.csv"))
    assert denied(lambda: stolen.get_object(OUTPUT_BUCKET, victim).read())
    assert denied(lambda: stolen.stat_object(OUTPUT_BUCKET, victim))
    assert denied(
        lambda: stolen.put_object(OUTPUT_BUCKET, f"{team_b}/planted.txt", _bytes(b"x"), 1)
    )
    assert denied(lambda: stolen.list_objects(OUTPUT_BUCKET, prefix=f"{team_b}/", recursive=True))
    assert denied(lambda: stolen.remove_object(OUTPUT_BUCKET, victim))
    assert denied(lambda: stolen.make_bucket(f"grab-{uuid.uuid4().hex[:6]}"))
    own_images = [k for k in inventory(storage, f"{team_a}/own/images/")]
    assert own_images
    # ...while what the run needs still works: its own images can be read and listed,
    # but not deleted; its own output.csv (not the worker's to read) is refused.
    assert stolen.stat_object(OUTPUT_BUCKET, own_images[0]).size
    assert denied(lambda: stolen.remove_object(OUTPUT_BUCKET, own_images[0]))
    assert denied(lambda: stolen.get_object(OUTPUT_BUCKET, f"{team_a}/own/output.csv").read())

    # team-b's objects are exactly as they were.
    assert inventory(storage, f"{team_b}/") == before


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_a_credential_is_renewed_mid_run_and_the_batch_completes(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, storage: Minio
) -> None:
    slow = ImageServer(
        {f"/slow/{i}.jpg": (photo(160, 120, 200 + i), "image/jpeg") for i in range(12)},
        latency=1.5,
    )
    # A margin longer than the credential's life: it is due for renewal at every look.
    saved = dict(operator.env)
    operator.env["IMAGEBATCH_CREDENTIAL_RENEW_SECONDS"] = "7200"
    operator.restart(kill=False)
    try:
        csv = HEADER + "".join(f"{i + 1},P{i},{slow.url}/slow/{i}.jpg\n" for i in range(12))
        apply(
            cluster,
            namespace,
            batch(
                "renewed",
                {"inline": csv},
                sharding={"imagesPerShard": 2, "parallelism": 1},
            ),
        )
        ref = plan.BatchRef(namespace, "renewed", "", 1)
        name = plan.storage_secret_name(ref)
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ib = get_batch(cluster, namespace, "renewed")
            if cluster.kubectl_ok("get", "secret", name, "-n", namespace):
                seen.add(secret_data(cluster, namespace, name)["accessKey"])
            if (ib.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        assert ib["status"]["phase"] == "Succeeded", ib["status"]
        assert ib["status"]["images"]["succeeded"] == 12
        assert len(seen) >= 2, "the credential was never renewed"
        events = json.loads(
            cluster.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector",
                "involvedObject.name=renewed",
                "-o",
                "json",
            )
        )["items"]
        assert any(e["reason"] == "CredentialsRenewed" for e in events)
        secret = json.loads(cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json"))
        assert secret["metadata"]["ownerReferences"][0]["kind"] == "ImageBatch"
        assert secret["metadata"]["annotations"]["imagebatch.dev/expires-at"]
    finally:
        slow.close()
        operator.env.clear()
        operator.env.update(saved)
        operator.restart(kill=False)


def test_a_secret_the_batch_does_not_own_is_never_taken_over(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    ref = plan.BatchRef(namespace, "clash", "", 1)
    name = plan.storage_secret_name(ref)
    cluster.kubectl(
        "create", "secret", "generic", name, "-n", namespace, "--from-literal=mine=precious"
    )
    apply(cluster, namespace, batch("clash", {"inline": HEADER + f"1,P,{images.url}/a.jpg\n"}))
    ib = wait_batch(cluster, namespace, "clash", ("Failed",))
    assert condition(ib, "Ready")["reason"] == "SecretConflict"
    assert secret_data(cluster, namespace, name) == {"mine": "precious"}


def test_caps_refuse_or_queue_with_a_message_naming_them(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess
) -> None:
    slow = ImageServer(
        {f"/q/{i}.jpg": (photo(120, 90, 300 + i), "image/jpeg") for i in range(6)}, latency=1.0
    )
    saved = dict(operator.env)
    operator.env.update(
        {
            "IMAGEBATCH_MAX_RUNNING_PER_NAMESPACE": "1",
            "IMAGEBATCH_MAX_SHARDS": "2",
            "IMAGEBATCH_MAX_IMAGES": "5",
            "IMAGEBATCH_MAX_PARALLELISM": "4",
        }
    )
    operator.restart(kill=False)
    try:
        rows = "".join(f"{i + 1},P{i},{slow.url}/q/{i}.jpg\n" for i in range(6))
        three = HEADER + "".join(f"{i + 1},P{i},{slow.url}/q/{i}.jpg\n" for i in range(3))
        apply(cluster, namespace, batch("wide", {"inline": three}, sharding={"parallelism": 9}))
        apply(cluster, namespace, batch("many", {"inline": HEADER + rows}))
        apply(cluster, namespace, batch("tiny", {"inline": three}, sharding={"imagesPerShard": 1}))
        for name, words in [
            ("wide", "limit of 4 (max parallelism per batch)"),
            ("many", "limit of 5 per batch (max images per batch)"),
            ("tiny", "limit of 2 per batch (max shards per batch)"),
        ]:
            ib = wait_batch(cluster, namespace, name, ("Failed",))
            ready = condition(ib, "Ready")
            assert ready["reason"] == "OverLimit" and words in ready["message"], ready
        # One batch in progress at a time: the second waits, queued, then runs.
        slow.latency = 6.0  # the first batch stays in progress a while
        apply(cluster, namespace, batch("first", {"inline": three}))
        wait_batch(cluster, namespace, "first", ("Running",))
        apply(cluster, namespace, batch("second", {"inline": three}))
        second = wait_batch(cluster, namespace, "second", ("Pending",), timeout=30)
        assert get_batch(cluster, namespace, "first")["status"]["phase"] == "Running"
        queued = condition(second, "Ready")
        assert queued["reason"] == "Queued" and "most allowed at once is 1" in queued["message"]
        table = cluster.kubectl("get", "ib", "second", "-n", namespace)
        assert "Queued" in table
        wait_batch(cluster, namespace, "first", ("Succeeded",), timeout=120)
        wait_batch(cluster, namespace, "second", ("Succeeded",), timeout=120)
    finally:
        slow.close()
        operator.env.clear()
        operator.env.update(saved)
        operator.restart(kill=False)


def test_urls_with_tokens_never_show_the_token(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    token = f"tok{uuid.uuid4().hex}"
    hook = WebhookReceiver(answers=lambda n: 500).start()
    try:
        apply(
            cluster,
            namespace,
            batch(
                "secretive",
                {"inline": HEADER + f"1,P,{images.url}/a.jpg\n"},
                webhook={"url": f"{hook.url}?token={token}"},
            ),
        )
        apply(
            cluster,
            namespace,
            batch("source", {"url": f"http://user:{token}@127.0.0.1:1/p.csv?sig={token}"}),
        )
        wait_batch(cluster, namespace, "secretive", ("Succeeded",))
        deadline = time.monotonic() + 30
        while len(hook.deliveries) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hook.deliveries  # the receiver was really called, at the URL with its token
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            source = get_batch(cluster, namespace, "source")
            if condition(source, "Validated")["reason"] == "SourceUnavailable":
                break
            time.sleep(0.5)
        shown = [
            json.dumps(get_batch(cluster, namespace, "secretive")["status"]),
            json.dumps(get_batch(cluster, namespace, "source")["status"]),
            cluster.kubectl("get", "events", "-n", namespace, "-o", "json"),
            operator.log(),  # the spec itself is the user's own and shows the URL as given
        ]
        status = get_batch(cluster, namespace, "secretive")["status"]
        assert status["webhook"]["lastStatusCode"] == 500
        for text in shown:
            assert token not in text
    finally:
        hook.close()


def test_the_object_store_and_the_api_server_are_never_fetched(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, storage: Minio
) -> None:
    assert cluster.minio is not None
    # Loopback is allowed for the test's image servers, yet these two stay out of reach.
    minio_url = f"{cluster.minio.url}/{OUTPUT_BUCKET}/{namespace}/x.jpg"
    api_url = f"{cluster.server}/api"
    csv = HEADER + f"1,Store,{minio_url}\n2,Api,{api_url}\n"
    apply(
        cluster,
        namespace,
        batch("inside", {"inline": csv}, failurePolicy={"maxFailedImagePercent": 100}),
    )
    wait_batch(cluster, namespace, "inside", ("Succeeded",))
    report = storage.get_object(OUTPUT_BUCKET, f"{namespace}/inside/errors.csv").read().decode()
    assert report.count("is a service of the cluster itself") == 2, report
    assert requests.get(minio_url, timeout=5).status_code in (403, 404)  # it is really there


def test_the_longest_prefix_allowed_gets_a_working_credential(
    cluster: LocalCluster, namespace: str, operator: OperatorProcess, images: ImageServer
) -> None:
    longest = ("deep-" * 40)[:199] + "/"  # the CRD's maxLength is 200
    apply(
        cluster,
        namespace,
        batch(
            "long",
            {"inline": HEADER + f"1,P,{images.url}/c.jpg\n"},
            output={"prefix": longest},
        ),
    )
    ib = wait_batch(cluster, namespace, "long", ("Succeeded",))
    assert ib["status"]["images"]["succeeded"] == 1
    assert ib["status"]["output"]["csv"].endswith(f"{namespace}/{longest}output.csv")
