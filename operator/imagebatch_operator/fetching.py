"""The operator's outbound HTTP goes through the shared address guard.

A CSV ``source.url`` and a webhook URL are user input just like image URLs: the same
rules apply (http/https only, non-global addresses refused unless allowed, the checked
address is the one connected to, every redirect checked again, bytes and time capped).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping

import requests

from imagebatch_common.envread import parse_networks
from imagebatch_common.failures import ImageFailure
from imagebatch_common.fetch import Fetcher, FetchSettings, PinnedAdapter
from imagebatch_common.urlguard import AddressPolicy, resolve_target
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import CHUNK, SourceUnavailable, UrlOpener
from imagebatch_operator.webhook import Refused


def csv_url_opener(settings: Settings) -> UrlOpener:
    """Download a CSV under the guard, capped at the CSV byte limit."""
    fetch_settings = FetchSettings(
        allow_nets=parse_networks(settings.allow_nets),
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

    def __init__(self, allow_nets: str):
        self.policy = AddressPolicy(parse_networks(allow_nets))

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
