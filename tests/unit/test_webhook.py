"""The webhook payload, its Standard Webhooks signature and the retry rules."""

from __future__ import annotations

import datetime
import json
import random

import pytest
from standardwebhooks.webhooks import Webhook

from imagebatch_operator import webhook

WHEN = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def payload() -> dict[str, object]:
    return webhook.build_payload(
        namespace="shop",
        name="spring",
        uid="u-1",
        run="g1-u",
        phase="Succeeded",
        rows={"total": 2, "succeeded": 2, "failed": 0},
        images={"total": 3, "succeeded": 3, "failed": 0},
        shards={"total": 1, "succeeded": 1, "failed": 0},
        output_csv_url="http://s/o.csv",
        errors_csv_url="http://s/e.csv",
        completion_time="2026-01-01T00:00:00Z",
    )


def test_payload_names_batch_run_phase_counts_and_output() -> None:
    p = payload()
    assert p["type"] == "imagebatch.completed"
    data = p["data"]
    assert isinstance(data, dict)
    assert (data["namespace"], data["name"], data["uid"], data["run"], data["phase"]) == (
        "shop",
        "spring",
        "u-1",
        "g1-u",
        "Succeeded",
    )
    assert data["images"] == {"total": 3, "succeeded": 3, "failed": 0}
    assert data["outputCsvUrl"] == "http://s/o.csv"


@pytest.mark.parametrize(
    "secret", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "plain-shared-secret"]
)
def test_signature_verifies_with_the_standard_library(secret: str) -> None:
    body = webhook.encode(payload())
    hdrs = webhook.headers("ib_u-1_g1-u", body, secret, datetime.datetime.now(datetime.UTC))
    assert hdrs["webhook-signature"].startswith("v1,")
    verified = Webhook(webhook.secret_material(secret)).verify(body, hdrs)
    assert verified == json.loads(body)


def test_tampered_body_fails_verification() -> None:
    body = webhook.encode(payload())
    hdrs = webhook.headers(
        "id1", body, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", datetime.datetime.now(datetime.UTC)
    )
    with pytest.raises(Exception, match="No matching signature"):
        Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").verify(
            body.replace(b"Succeeded", b"Failed"), hdrs
        )


def test_no_secret_no_signature_but_stable_id() -> None:
    hdrs = webhook.headers("ib_u-1_g1-u", b"{}", None, WHEN)
    assert "webhook-signature" not in hdrs
    assert hdrs["webhook-id"] == webhook.webhook_id("u-1", "g1-u")
    assert hdrs["webhook-timestamp"] == str(int(WHEN.timestamp()))


@pytest.mark.parametrize(
    ("code", "delivered", "retry"),
    [
        (200, True, False),
        (204, True, False),
        (301, False, False),
        (400, False, False),
        (410, False, False),
        (429, False, True),
        (500, False, True),
        (503, False, True),
    ],
)
def test_which_answers_are_retried(code: int, delivered: bool, retry: bool) -> None:
    assert webhook.classify(code) == (delivered, retry)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    rng = random.Random(1)
    waits = [webhook.backoff(n, 1.0, None, rng) for n in range(1, 6)]
    for n, wait in enumerate(waits, start=1):
        assert 2 ** (n - 1) / 2 <= wait <= 2 ** (n - 1)
    assert webhook.backoff(1, 1.0, 7.0, rng) == 7.0
    assert webhook.backoff(1, 1.0, 10_000.0, rng) == 300.0
