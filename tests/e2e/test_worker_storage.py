"""The storage client's own S3 requests: Signature V4 by the book, against real MinIO.

The worker's per-image calls (get, put, stat, exists) are S3 requests signed by
``storage`` itself. The signing is checked against the worked examples of the AWS
Signature V4 documentation; the requests against a real MinIO: objects round-trip with
their metadata, keys with spaces and non-ASCII characters, missing keys and buckets are
facts, a wrong secret or a closed port are "unavailable", and temporary (STS)
credentials with a session token work.
"""

from __future__ import annotations

import calendar
import json
import socket
from collections.abc import Iterator

import pytest
from minio.credentials.providers import AssumeRoleProvider

from imagebatch_common import httpconn
from imagebatch_common.storage import (
    ObjectNotFound,
    Storage,
    StorageUnavailable,
    _S3Requests,
)
from imagebatch_common.storage_settings import StorageSettings
from tests.cluster.stack import MinioServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AWS_EXAMPLE = StorageSettings(
    "examplebucket.s3.amazonaws.com",
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    secure=True,
    region="us-east-1",
)
MAY_24_2013 = float(calendar.timegm((2013, 5, 24, 0, 0, 0)))
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("method", "path", "headers", "payload", "signature"),
    [
        (
            "GET",
            "/test.txt",
            {"Range": "bytes=0-9"},
            EMPTY,
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (
            "PUT",
            "/test%24file.text",
            {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
    ],
    ids=["aws-get-object-example", "aws-put-object-example"],
)
def test_signature_matches_the_aws_worked_examples(
    method: str, path: str, headers: dict[str, str], payload: str, signature: str
) -> None:
    signed = _S3Requests(AWS_EXAMPLE, 5.0, 0).signed_headers(
        method, path, "", headers, payload, "us-east-1", now=MAY_24_2013
    )

    assert signed["authorization"].endswith(f"Signature={signature}")
    assert signed["authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
    )


def test_session_token_is_sent_and_signed() -> None:
    settings = StorageSettings("minio:9000", "a", "b", session_token="token-123")

    signed = _S3Requests(settings, 5.0, 0).signed_headers("GET", "/b/k", "", {}, EMPTY, "r")

    assert signed["x-amz-security-token"] == "token-123"
    assert "x-amz-security-token" in signed["authorization"].split("SignedHeaders=")[1]
    assert signed["host"] == "minio:9000"


@pytest.fixture
def storage(minio_server: MinioServer) -> Iterator[Storage]:
    running = Storage(
        StorageSettings(minio_server.endpoint, minio_server.access_key, minio_server.secret_key)
    )
    yield running
    running.close()


@pytest.mark.parametrize(
    "key",
    ["ns/batch/images/abc.jpg", "with space/ünïcode/a+b=c&d~e.jpg", "percent%25and.dots.jpg"],
    ids=["plain", "spaces-and-non-ascii", "dots-and-percent"],
)
def test_objects_round_trip_with_metadata(storage: Storage, bucket: str, key: str) -> None:
    storage.put(bucket, key, b"\x00image bytes", "image/jpeg", {"imagebatch-width": "640"})

    assert storage.get(bucket, key) == b"\x00image bytes"
    info = storage.stat(bucket, key)
    assert info is not None
    assert (info.size, info.content_type) == (12, "image/jpeg")
    assert info.metadata == {"imagebatch-width": "640"}
    assert storage.exists(bucket, key)
    assert list(storage.list_keys(bucket, key)) == [key]


def test_missing_objects_and_buckets_are_facts(storage: Storage, bucket: str) -> None:
    assert storage.stat(bucket, "nothing") is None
    assert not storage.exists(bucket, "nothing")
    with pytest.raises(ObjectNotFound, match="NoSuchKey"):
        storage.get(bucket, "nothing")
    with pytest.raises(ObjectNotFound, match="NoSuchBucket"):
        storage.get("no-such-bucket-here", "nothing")


def test_wrong_secret_is_unavailable_and_not_echoed(minio_server: MinioServer, bucket: str) -> None:
    wrong = Storage(StorageSettings(minio_server.endpoint, minio_server.access_key, "wrong-secret"))

    with pytest.raises(StorageUnavailable) as caught:
        wrong.put(bucket, "k", b"x", "text/plain")

    assert "SignatureDoesNotMatch" in str(caught.value)
    assert "wrong-secret" not in str(caught.value)


def test_closed_port_is_unavailable() -> None:
    down = Storage(StorageSettings(f"127.0.0.1:{free_port()}", "a", "b"), retries=1)

    with pytest.raises(StorageUnavailable, match="refused"):
        down.get("bucket", "key")


def test_temporary_credentials_with_a_session_token(minio_server: MinioServer, bucket: str) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/allowed/*"],
            }
        ],
    }
    credentials = AssumeRoleProvider(
        sts_endpoint=minio_server.url,
        access_key=minio_server.access_key,
        secret_key=minio_server.secret_key,
        policy=json.dumps(policy),
    ).retrieve()
    assert credentials.session_token
    scoped = Storage(
        StorageSettings(
            minio_server.endpoint,
            credentials.access_key,
            credentials.secret_key,
            region="us-east-1",
            session_token=credentials.session_token,
        )
    )

    scoped.put(bucket, "allowed/a.jpg", b"ok", "image/jpeg")
    assert scoped.get(bucket, "allowed/a.jpg") == b"ok"
    with pytest.raises(StorageUnavailable, match="AccessDenied"):
        scoped.put(bucket, "elsewhere/a.jpg", b"no", "image/jpeg")


def test_a_request_on_a_connection_closed_meanwhile_is_sent_again(
    minio_server: MinioServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(  # no retries of its own: only the resend on a fresh connection
        StorageSettings(minio_server.endpoint, minio_server.access_key, minio_server.secret_key),
        retries=0,
    )
    storage.put(bucket, "first", b"1", "text/plain")
    (idle,) = storage._s3._pool._idle.values()
    assert idle and idle[0].sock is not None
    # The connection looks alive when taken but fails on send, as one the server
    # closes at that very moment does.
    monkeypatch.setattr(httpconn, "_dropped", lambda connection: False)
    idle[0].sock.shutdown(socket.SHUT_WR)

    storage.put(bucket, "second", b"2", "text/plain")

    assert storage.get(bucket, "second") == b"2"
