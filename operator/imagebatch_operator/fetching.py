"""The operator's outbound HTTP: a CSV URL and the webhook, under the shared address guard.

A CSV ``source.url`` and a webhook URL are user input just like image URLs: the same
rules apply (http/https only, non-global addresses refused unless allowed, the checked
address is the one connected to, every redirect checked again, bytes and time capped).
A webhook attempt is one POST that never raises for what the network or the receiver
does; what it means for the delivery is ``webhook.next_record``'s to decide.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import requests

from imagebatch_common.envread import parse_networks
from imagebatch_common.failures import ImageFailure
from imagebatch_common.fetch import Fetcher, FetchSettings, PinnedAdapter
from imagebatch_common.redact import redact_text
from imagebatch_common.retry import retry_after_seconds
from imagebatch_common.urlguard import AddressPolicy, parse_endpoints, resolve_target
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import CHUNK, SourceUnavailable, UrlOpener
from imagebatch_operator.webhook import Attempt, classify


def cluster_endpoints(settings: Settings, api_server: str) -> str:
    """The endpoints no fetcher may reach, resolved now: ``address:port,...``.

    The object store's, the Kubernetes API server's (``api_server`` is its URL) and any
    the settings add. An allowed network never opens them (a URL naming the store
    could otherwise read or write with a worker's credential, or probe the API).
    """
    parsed = urlsplit(api_server)
    api_port = parsed.port or (443 if parsed.scheme == "https" else 80)
    names = [settings.storage.endpoint, f"{parsed.hostname}:{api_port}"]
    names += [n for n in settings.deny_endpoints.replace(" ", ",").split(",") if n]
    endpoints = parse_endpoints(",".join(names))
    return ",".join(
        f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        for address, port in sorted(endpoints)
    )


def csv_url_opener(settings: Settings) -> UrlOpener:
    """Download a CSV under the guard, capped at the CSV byte limit."""
    fetch_settings = FetchSettings(
        allow_nets=parse_networks(settings.allow_nets),
        deny=parse_endpoints(settings.deny_endpoints),
        max_bytes=settings.csv_limits.max_bytes,
        total_timeout=120.0,
        pool_size=1,
        user_agent="imagebatch-operator",
    )

    def open_url(url: str) -> Iterator[bytes]:
        # Spooled: a small CSV stays in memory, a big one goes to disk as it arrives.
        spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115
        try:
            with Fetcher(fetch_settings) as fetcher:
                fetcher.fetch_to(url, spool)
        except ImageFailure as failure:
            spool.close()
            raise SourceUnavailable(failure.error) from failure
        spool.seek(0)

        def chunks() -> Iterator[bytes]:
            with spool:
                while chunk := spool.read(CHUNK):
                    yield chunk

        return chunks()

    return open_url


class GuardedPoster:
    """POSTs to a URL only after its address passed the guard, connecting to that address."""

    def __init__(self, allow_nets: str, deny_endpoints: str = ""):
        self.policy = AddressPolicy(parse_networks(allow_nets), parse_endpoints(deny_endpoints))

    def post(
        self, url: str, data: bytes, headers: Mapping[str, str], timeout: float
    ) -> requests.Response:
        try:
            target = resolve_target(url, self.policy)
        except ImageFailure as failure:
            raise Refused(failure.error) from failure
        with requests.Session() as session:
            session.trust_env = False  # a proxy would connect to an address we did not check
            session.mount(f"{target.scheme}://", PinnedAdapter(target, 1))
            return session.post(
                url, data=data, headers=dict(headers), timeout=timeout, allow_redirects=False
            )


class Refused(Exception):
    """The URL may not be called at all (e.g. its address is not allowed): never retried."""


class Poster(Protocol):
    """What sends one POST (``fetching.GuardedPoster`` in the operator)."""

    def post(
        self, url: str, data: bytes, headers: Mapping[str, str], timeout: float
    ) -> requests.Response: ...


def attempt_delivery(
    poster: Poster,
    url: str,
    body: bytes,
    hdrs: Mapping[str, str],
    number: int,
    timeout: float,
    now: Callable[[], str],
) -> Attempt:
    """POST once; never raises for what the network or the receiver does.

    Errors are described without the URL: a webhook URL may carry a token.
    """
    try:
        response = poster.post(url, body, hdrs, timeout)
    except Refused as refusal:
        return Attempt(
            number, now(), None, f"refused: {redact_text(str(refusal))}"[:300], False, False
        )
    except requests.RequestException as failure:
        why = f"{type(failure).__name__}: {_network_cause(failure)}"[:300]
        return Attempt(number, now(), None, why, False, True)
    delivered, retry = classify(response.status_code)
    return Attempt(
        number,
        now(),
        response.status_code,
        "" if delivered else f"HTTP {response.status_code}",
        delivered,
        retry,
        retry_after_seconds(response.headers.get("Retry-After"))
        if response.status_code in (429, 503)
        else None,
    )


def _network_cause(failure: requests.RequestException) -> str:
    """What went wrong on the wire, in a few words, never the URL."""
    if isinstance(failure, requests.ConnectTimeout):
        return "connecting timed out"
    if isinstance(failure, requests.ReadTimeout):
        return "no answer in time"
    if isinstance(failure, requests.ConnectionError):
        text = str(failure).lower()
        if "refused" in text:
            return "connection refused"
        if "reset" in text:
            return "connection reset"
        return "connection failed"
    return "request failed"
