"""The completion webhook: payload, Standard Webhooks signature, bounded delivery.

A run's webhook carries a stable ``webhook-id`` (batch uid + run), so a receiver can
drop a repeat after an operator crash. With a secret it is signed as the Standard
Webhooks specification says (``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``id.timestamp.body``), by the ``standardwebhooks`` package. Delivery retries network
errors, 429 (honouring ``Retry-After``) and 5xx with exponential backoff and jitter, a
bounded number of times; 3xx and other 4xx are failures, and 410 means the receiver
wants no more. The URL goes through the same address guard as image fetches.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from standardwebhooks.webhooks import Webhook

EVENT_COMPLETED = "imagebatch.completed"


class Refused(Exception):
    """The URL may not be called at all (e.g. its address is not allowed): never retried."""


class Poster(Protocol):
    """What sends one POST (``fetching.GuardedPoster`` in the operator)."""

    def post(
        self, url: str, data: bytes, headers: Mapping[str, str], timeout: float
    ) -> requests.Response: ...


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


def backoff(attempt: int, base: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before the next attempt: exponential with full jitter, capped."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), 300.0)
    ceiling = min(base * 2.0 ** (attempt - 1), 300.0)
    jitter: float = rng.uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def attempt_delivery(
    poster: Poster,
    url: str,
    body: bytes,
    hdrs: Mapping[str, str],
    number: int,
    timeout: float,
    now: Callable[[], str],
) -> Attempt:
    """POST once; never raises for what the network or the receiver does."""
    try:
        response = poster.post(url, body, hdrs, timeout)
    except Refused as refusal:
        return Attempt(number, now(), None, f"refused: {refusal}"[:300], False, False)
    except requests.RequestException as failure:
        why = f"{type(failure).__name__}: {failure}"[:300]
        return Attempt(number, now(), None, why, False, True)
    delivered, retry = classify(response.status_code)
    return Attempt(
        number,
        now(),
        response.status_code,
        "" if delivered else f"HTTP {response.status_code}",
        delivered,
        retry,
        _retry_after(response.headers.get("Retry-After")) if response.status_code == 429 else None,
    )
