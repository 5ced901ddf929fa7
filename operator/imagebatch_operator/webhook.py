"""The completion webhook: payload, Standard Webhooks signature, bounded delivery.

A run's webhook carries a stable ``webhook-id`` (batch uid + run), so a receiver can
drop a repeat after an operator crash. With a secret it is signed as the Standard
Webhooks specification says (``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``id.timestamp.body``), by the ``standardwebhooks`` package.

Delivery is one attempt per reconcile pass, never a sleep: network errors, 429 and 5xx
are retried along a schedule of delays (about a day and a half by default, a setting),
and ``Retry-After`` in either form stretches the wait; 3xx and other 4xx are failures,
and 410 means the receiver wants no more. ``next_record`` turns one attempt into the
run's delivery record, with ``nextAttemptTime`` persisted in the status so a restart
keeps the schedule. Everything here is pure; the POST itself is ``fetching``'s, under
the same address guard as image fetches, and no error text carries the URL (a webhook
URL may hold a token).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from standardwebhooks.webhooks import Webhook

EVENT_COMPLETED = "imagebatch.completed"


def webhook_id(uid: str, run: str) -> str:
    return f"ib_{uid}_{run}"


def fresh_record(uid: str, run: str) -> dict[str, Any]:
    """``status.webhook`` for a run that has not called yet; None clears an earlier run's field."""
    return {
        "run": run,
        "id": webhook_id(uid, run),
        "attempts": 0,
        "lastStatusCode": None,
        "lastError": None,
        "lastAttemptTime": None,
        "nextAttemptTime": None,
        "deliveredTime": None,
        "gaveUp": None,
    }


def build_payload(
    *,
    namespace: str,
    name: str,
    uid: str,
    run: str,
    phase: str,
    rows: Mapping[str, int],
    images: Mapping[str, int],
    shards: Mapping[str, int],
    output_csv_url: str,
    errors_csv_url: str,
    completion_time: str,
) -> dict[str, Any]:
    """The JSON body a receiver gets when a run finishes."""
    return {
        "type": EVENT_COMPLETED,
        "timestamp": completion_time,
        "data": {
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "run": run,
            "phase": phase,
            "rows": dict(rows),
            "images": dict(images),
            "shards": dict(shards),
            "outputCsvUrl": output_csv_url,
            "errorsCsvUrl": errors_csv_url,
            "completionTime": completion_time,
        },
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def headers(
    msg_id: str, body: bytes, secret: str | None, when: datetime.datetime
) -> dict[str, str]:
    """Standard Webhooks headers; the signature only when a secret is given."""
    out = {
        "content-type": "application/json",
        "user-agent": "imagebatch-operator",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
    }
    if secret:
        out["webhook-signature"] = Webhook(secret_material(secret)).sign(
            msg_id, when, body.decode()
        )
    return out


def secret_material(secret: str) -> str | bytes:
    """A ``whsec_``-prefixed secret is base64 as the spec says; anything else is raw bytes."""
    return secret if secret.startswith("whsec_") else secret.encode()


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt, as recorded in ``status.webhook``."""

    number: int
    time: str
    status_code: int | None
    error: str
    delivered: bool
    retry: bool  # worth trying again
    retry_after: float | None = None


def classify(status_code: int) -> tuple[bool, bool]:
    """(delivered, retry) for an HTTP answer."""
    if 200 <= status_code < 300:
        return True, False
    if status_code == 429 or status_code >= 500:
        return False, True
    return False, False  # 3xx is a failure (no redirects followed); 4xx is final


def parse_schedule(text: str) -> tuple[float, ...]:
    """A retry schedule from ``"0,5,300"``: seconds to wait before each attempt, in order.

    The first entry is the wait before the first attempt (usually 0). Raises
    ``ValueError`` naming a bad entry.
    """
    delays: list[float] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            delay = float(item)
        except ValueError as error:
            raise ValueError(f"{item!r} is not a number of seconds") from error
        if not delay >= 0:
            raise ValueError(f"{item!r} is negative")
        delays.append(delay)
    if not delays:
        raise ValueError("the schedule has no attempt")
    return tuple(delays)


# Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about a day and a half, as
# Standard Webhooks providers retry, so a receiver down overnight still gets the call.
DEFAULT_SCHEDULE = parse_schedule("0,5,300,1800,7200,18000,36000,36000")
# A receiver asking for more than this in Retry-After is waited for this long.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


def next_record(
    record: Mapping[str, Any],
    attempt: Attempt,
    schedule: tuple[float, ...],
    now: datetime.datetime,
) -> tuple[dict[str, Any], str, str]:
    """The delivery record after ``attempt`` and what to say: (record, verdict, message).

    ``verdict`` is one of ``delivered``, ``gone`` (410), ``failed`` (not worth retrying,
    or the schedule is spent) and ``retrying``; for ``retrying`` the record's
    ``nextAttemptTime`` is when the schedule (or a longer Retry-After) says to try again.
    """
    out = dict(record)
    out.update(
        attempts=attempt.number,
        lastAttemptTime=attempt.time,
        lastStatusCode=attempt.status_code,
        lastError=attempt.error or None,
        nextAttemptTime=None,
    )
    if attempt.delivered:
        out["deliveredTime"] = attempt.time
        return (
            out,
            "delivered",
            f"delivered on attempt {attempt.number} (HTTP {attempt.status_code})",
        )
    if attempt.status_code == 410:
        out["gaveUp"] = True
        return out, "gone", "the receiver answered 410 Gone; not retried"
    if not attempt.retry:
        out["gaveUp"] = True
        return out, "failed", f"attempt {attempt.number} failed: {attempt.error}; not retried"
    if attempt.number >= len(schedule):
        out["gaveUp"] = True
        return (
            out,
            "failed",
            f"attempt {attempt.number} failed: {attempt.error}; the retry schedule is spent",
        )
    wait = schedule[attempt.number]
    if attempt.retry_after is not None:
        wait = max(wait, min(attempt.retry_after, MAX_RETRY_AFTER_SECONDS))
    due = now + datetime.timedelta(seconds=wait)
    if due.microsecond:  # the status keeps whole seconds: round up, never early
        due += datetime.timedelta(microseconds=1_000_000 - due.microsecond)
    out["nextAttemptTime"] = format_time(due)
    return (
        out,
        "retrying",
        f"attempt {attempt.number} of {len(schedule)} failed: {attempt.error}; "
        f"next attempt at {out['nextAttemptTime']}",
    )


def format_time(when: datetime.datetime) -> str:
    """RFC 3339 in UTC with seconds, as Kubernetes writes times."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
