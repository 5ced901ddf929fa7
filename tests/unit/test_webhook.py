"""The webhook payload, its Standard Webhooks signature and the retry rules."""

from __future__ import annotations

import datetime
import json

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


def test_schedule_parses_and_refuses_nonsense() -> None:
    assert webhook.parse_schedule("0, 5,300") == (0.0, 5.0, 300.0)
    assert sum(webhook.DEFAULT_SCHEDULE) > 24 * 3600  # spans a receiver down for a day
    for bad, why in [("", "no attempt"), ("0,x", "'x'"), ("0,-1", "negative")]:
        with pytest.raises(ValueError, match=why):
            webhook.parse_schedule(bad)


NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
SCHEDULE = (0.0, 5.0, 300.0)


def attempt(number: int, code: int | None, retry_after: float | None = None) -> webhook.Attempt:
    if code is None:
        return webhook.Attempt(
            number, "t", None, "ConnectionError: connection refused", False, True
        )
    delivered, retry = webhook.classify(code)
    return webhook.Attempt(
        number, "t", code, "" if delivered else f"HTTP {code}", delivered, retry, retry_after
    )


@pytest.mark.parametrize(
    ("given", "verdict", "next_at", "gave_up"),
    [
        pytest.param(attempt(1, 204), "delivered", None, None, id="2xx-delivers"),
        pytest.param(attempt(1, 410), "gone", None, True, id="410-stops"),
        pytest.param(attempt(1, 404), "failed", None, True, id="4xx-is-final"),
        pytest.param(attempt(1, 302), "failed", None, True, id="3xx-is-a-failure"),
        pytest.param(attempt(1, 503), "retrying", "2026-01-01T00:00:05Z", None, id="5xx-next-step"),
        pytest.param(attempt(1, None), "retrying", "2026-01-01T00:00:05Z", None, id="refused"),
        pytest.param(
            attempt(2, 429, retry_after=3600.0),
            "retrying",
            "2026-01-01T01:00:00Z",
            None,
            id="retry-after-longer-than-the-schedule-wins",
        ),
        pytest.param(
            attempt(1, 429, retry_after=1.0),
            "retrying",
            "2026-01-01T00:00:05Z",
            None,
            id="retry-after-shorter-keeps-the-schedule",
        ),
        pytest.param(attempt(3, 503), "failed", None, True, id="schedule-spent-gives-up"),
    ],
)
def test_one_attempt_moves_the_record(
    given: webhook.Attempt, verdict: str, next_at: str | None, gave_up: bool | None
) -> None:
    record, got, message = webhook.next_record({"run": "r", "attempts": 0}, given, SCHEDULE, NOW)
    assert got == verdict
    assert record["nextAttemptTime"] == next_at
    assert record.get("gaveUp") == gave_up
    assert record["attempts"] == given.number
    assert (record.get("deliveredTime") is not None) == (verdict == "delivered")
    assert message


def test_the_next_attempt_is_never_before_retry_after_even_within_a_second() -> None:
    late_in_a_second = NOW.replace(microsecond=900_000)
    record, _, _ = webhook.next_record(
        {"run": "r"}, attempt(1, 429, retry_after=3.0), SCHEDULE, late_in_a_second
    )
    due = webhook.parse_time(record["nextAttemptTime"])
    assert due is not None and due >= late_in_a_second + datetime.timedelta(seconds=5)
