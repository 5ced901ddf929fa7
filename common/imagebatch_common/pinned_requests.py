"""Address pinning for a requests session: the operator's webhook POSTs use it.

A requests adapter whose connections all go to the one address ``urlguard`` checked,
for one origin, with the Host header, TLS server name and certificate check still on
the URL's host. The image fetcher does the same without requests (``httpconn``); this
module exists so a caller that wants requests' API gets the same guarantee.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.urlguard import DEFAULT_PORTS, Target


def _connect_pinned(connection: HTTPConnection, address: str) -> socket.socket:
    """Open the TCP connection to the checked ``address``; never resolve the host again."""
    try:
        return urllib3.util.connection.create_connection(
            (address, connection.port),
            connection.timeout,
            source_address=connection.source_address,
            socket_options=connection.socket_options,
        )
    except TimeoutError as error:
        raise ConnectTimeoutError(connection, f"connect to {address} timed out") from error
    except OSError as error:
        raise NewConnectionError(connection, f"cannot connect to {address}: {error}") from error


class _PinnedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, pinned_address: str, **kwargs: Any) -> None:
        self.pinned_address = pinned_address
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        return _connect_pinned(self, self.pinned_address)


class _PinnedHTTPSConnection(HTTPSConnection):
    def __init__(self, *args: Any, pinned_address: str, **kwargs: Any) -> None:
        self.pinned_address = pinned_address
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        # TLS is layered on this socket by HTTPSConnection.connect with the URL's host
        # as server name and certificate name, so pinning the IP loses no verification.
        return _connect_pinned(self, self.pinned_address)


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose connections all go to one checked address of one origin."""

    def __init__(self, target: Target, pool_size: int) -> None:
        super().__init__(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.origin = target.origin
        self.address = target.address
        pool_class = _PinnedHTTPSPool if target.scheme == "https" else _PinnedHTTPPool
        self.pool: HTTPConnectionPool = pool_class(
            target.host,
            target.port,
            maxsize=pool_size,
            block=False,
            pinned_address=target.address,
        )

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> HTTPConnectionPool:
        # urllib3 parses the URL again; if it reads another origin than the guard did
        # (a parser differential), refuse rather than send the request anywhere.
        parsed = urllib3.util.parse_url(request.url or "")
        scheme = (parsed.scheme or "").lower()
        origin = (
            scheme,
            (parsed.host or "").strip("[]").lower(),
            parsed.port or DEFAULT_PORTS.get(scheme, 0),
        )
        if origin != self.origin:
            raise ImageFailure(
                Stage.FETCH, Reason.URL_INVALID, "URL is read differently by the HTTP client"
            )
        return self.pool

    def close(self) -> None:
        super().close()
        self.pool.close()
