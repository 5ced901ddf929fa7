"""Download one image safely: checked addresses, pinned connections, caps and retries.

``Fetcher.fetch(url)`` returns the body or raises ``ImageFailure`` with stage ``fetch``.
What it guarantees, and why:

* Every hop (the URL and each redirect) is checked by ``urlguard`` first, and the TCP
  connection goes to the address that was checked, not to whatever DNS says a moment
  later (``PinnedAdapter``). The Host header and, for https, the TLS server name and
  certificate check still use the URL's host name.
* Redirects are followed here, not by requests, so each target is checked; at most
  ``max_redirects`` of them.
* Bytes, connect time, silence between bytes and the image's whole wall time are
  capped; a body is streamed and abandoned as soon as it passes the byte cap, and a
  declared Content-Length over the cap fails before the body is read.
* Connection resets, timeouts, 429 and 5xx are retried with exponential backoff and
  jitter (a 429's Retry-After is honoured up to a bound); a 4xx never is.
* Environment proxies are never used: a proxy would connect on our behalf to an
  address we did not check.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from imagebatch_common.contract import Stage
from imagebatch_common.envread import IPNetwork
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.retry import backoff, retry_after_seconds
from imagebatch_common.urlguard import (
    DEFAULT_PORTS,
    AddressPolicy,
    Resolver,
    Target,
    resolve_target,
    system_resolver,
)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SUCCESS_STATUSES = frozenset({200, 203})
READ_CHUNK_BYTES = 1024 * 1024
_ADAPTER_CACHE_SIZE = 32  # distinct (origin, address) pairs kept for connection reuse


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


@dataclass(frozen=True)
class FetchSettings:
    """The limits of one download. The worker fills them from ``IMAGEBATCH_*`` variables;
    the operator uses the same client for a CSV URL with its own limits."""

    # Largest body accepted, in bytes. A declared Content-Length above it fails before
    # the body is read; a body that grows past it is cut off as it streams.
    max_bytes: int = 50 * 1024 * 1024
    # Seconds to open a TCP (and TLS) connection.
    connect_timeout: float = 5.0
    # Seconds the server may stay silent while we wait for bytes.
    read_timeout: float = 15.0
    # Wall-clock seconds for one download, redirects, retries and backoff included: a
    # server trickling one byte at a time cannot hold a worker longer than this.
    total_timeout: float = 60.0
    # Redirects followed; each target is checked like the first URL.
    max_redirects: int = 5
    # Extra attempts after a transient failure (reset, timeout, 429, 5xx); never a 4xx.
    retries: int = 3
    # First backoff delay in seconds; doubles per attempt, with jitter.
    retry_backoff: float = 0.5
    # Longest Retry-After honoured, in seconds.
    max_retry_after: float = 10.0
    # Networks reachable although not global (loopback, private, ...). Empty: public only.
    allow_nets: tuple[IPNetwork, ...] = ()
    # Connections kept per origin: as many as downloads run at once.
    pool_size: int = 8
    # Endpoints (address, port) refused whatever allow_nets says: the object store's
    # and the Kubernetes API server's.
    deny: frozenset[tuple[str, int]] = frozenset()
    # CA bundle (file or directory) for https; empty means the system default.
    ca_bundle: str = ""
    # User-Agent sent with every request.
    user_agent: str = "imagebatch/0.1"


@dataclass(frozen=True)
class FetchedImage:
    """A downloaded body and how it was obtained."""

    data: bytes
    final_url: str  # after redirects; may carry a signature, never log it
    redirects: int
    attempts: int  # HTTP attempts in all, retries included


@dataclass(frozen=True)
class _Redirect:
    location: str


def _root_cause(error: BaseException) -> str:
    """Say what went wrong on the wire, without the URL a library message would carry."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(current, http.client.RemoteDisconnected):
            return "server closed the connection without a response"
        if isinstance(current, http.client.IncompleteRead | urllib3.exceptions.IncompleteRead):
            return "connection closed before the whole body arrived"
        if isinstance(current, TimeoutError | socket.timeout):
            return "timed out"
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno).lower()
        nested: list[BaseException] = [
            arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)
        ]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            nested.append(reason)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                nested.append(linked)
        pending.extend(nested)
    return type(error).__name__


def _printable(text: str, limit: int = 80) -> str:
    """Server-chosen text, made safe for one log line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


class Fetcher:
    """Downloads under ``FetchSettings`` limits. Thread-safe; share one per shard."""

    def __init__(
        self,
        settings: FetchSettings,
        *,
        resolver: Resolver = system_resolver,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.policy = AddressPolicy(settings.allow_nets, settings.deny)
        self.resolver = resolver
        self.stop = stop or threading.Event()
        self._verify: bool | str = settings.ca_bundle or True
        self._adapters: OrderedDict[tuple[str, str, int, str], PinnedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._headers = {
            "User-Agent": settings.user_agent,
            "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
            # A compressed transfer encoding buys nothing for images and would let a
            # small body inflate; the byte cap counts decoded bytes either way.
            "Accept-Encoding": "identity",
        }

    def close(self) -> None:
        with self._lock:
            adapters = list(self._adapters.values())
            self._adapters.clear()
        for adapter in adapters:
            adapter.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public ---------------------------------------------------------------

    def fetch(self, url: str) -> FetchedImage:
        """Download ``url``; raise ``ImageFailure`` (stage fetch) when it cannot be had."""
        return self._fetch(url, None)

    def fetch_to(self, url: str, sink: IO[bytes]) -> FetchedImage:
        """Like ``fetch``, but the body streams into ``sink`` instead of memory.

        For bodies too big to hold (a CSV of a hundred thousand rows). ``sink`` is
        rewound and truncated before each attempt, so a retried download leaves only
        its own bytes; the returned ``data`` is empty.
        """
        return self._fetch(url, sink)

    def _fetch(self, url: str, sink: IO[bytes] | None) -> FetchedImage:
        deadline = time.monotonic() + self.settings.total_timeout
        current = url
        attempts = 0
        for redirects in range(self.settings.max_redirects + 1):
            outcome, tries = self._fetch_hop(current, deadline, sink)
            attempts += tries
            if isinstance(outcome, bytes):
                return FetchedImage(outcome, current, redirects, attempts)
            current = urljoin(current, outcome.location)
        raise ImageFailure(
            Stage.FETCH,
            Reason.TOO_MANY_REDIRECTS,
            f"more than {self.settings.max_redirects} redirects",
        )

    # -- one hop, with retries ------------------------------------------------

    def _fetch_hop(
        self, url: str, deadline: float, sink: IO[bytes] | None
    ) -> tuple[bytes | _Redirect, int]:
        attempt = 0
        while True:
            attempt += 1
            if self.stop.is_set():
                raise ImageFailure(Stage.FETCH, Reason.CANCELLED, "the shard was stopped")
            try:
                return self._attempt(url, deadline, sink), attempt
            except ImageFailure as failure:
                if not failure.transient:
                    raise
                if attempt > self.settings.retries:
                    if attempt == 1:
                        raise
                    raise ImageFailure(
                        failure.stage,
                        failure.reason,
                        f"{failure.message} (gave up after {attempt} attempts)",
                    ) from failure
                delay = self._retry_delay(failure, attempt)
                if time.monotonic() + delay >= deadline:
                    raise ImageFailure(
                        failure.stage,
                        failure.reason,
                        f"{failure.message} (no time left for another attempt within "
                        f"{self.settings.total_timeout:g}s)",
                    ) from failure
                if self.stop.wait(delay):
                    raise ImageFailure(
                        Stage.FETCH, Reason.CANCELLED, "the shard was stopped"
                    ) from failure

    def _retry_delay(self, failure: ImageFailure, attempt: int) -> float:
        if failure.retry_after is not None:
            return min(failure.retry_after, self.settings.max_retry_after)
        return backoff(self.settings.retry_backoff, attempt)

    def _adapter_for(self, target: Target) -> PinnedAdapter:
        key = (target.scheme, target.host, target.port, target.address)
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is not None:
                self._adapters.move_to_end(key)
                return adapter
            adapter = PinnedAdapter(target, pool_size=self.settings.pool_size)
            self._adapters[key] = adapter
            evicted = (
                self._adapters.popitem(last=False)[1]
                if len(self._adapters) > _ADAPTER_CACHE_SIZE
                else None
            )
        if evicted is not None:
            evicted.close()  # a request still using it finishes; its connection is dropped
        return adapter

    def _attempt(self, url: str, deadline: float, sink: IO[bytes] | None) -> bytes | _Redirect:
        target = resolve_target(url, self.policy, self.resolver)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._out_of_time()
        try:
            request = requests.Request("GET", url, headers=self._headers).prepare()
        except requests.RequestException as error:
            raise ImageFailure(
                Stage.FETCH, Reason.URL_INVALID, f"URL cannot be requested: {type(error).__name__}"
            ) from error
        timeout = (
            min(self.settings.connect_timeout, remaining),
            min(self.settings.read_timeout, remaining),
        )
        try:
            response = self._adapter_for(target).send(
                request, stream=True, timeout=timeout, verify=self._verify
            )
        except requests.ConnectTimeout as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TIMEOUT,
                f"connecting to {target.host} took longer than {timeout[0]:g}s",
                transient=True,
            ) from error
        except requests.ReadTimeout as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TIMEOUT,
                f"no response from {target.host} within {timeout[1]:g}s",
                transient=True,
            ) from error
        except requests.exceptions.SSLError as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TLS,
                f"TLS with {target.host} failed: {_root_cause(error)}",
            ) from error
        except requests.ConnectionError as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.CONNECTION,
                f"{target.host}: {_root_cause(error)}",
                transient=True,
            ) from error
        except requests.RequestException as error:
            raise ImageFailure(
                Stage.FETCH, Reason.URL_INVALID, f"request failed: {type(error).__name__}"
            ) from error
        try:
            return self._handle_response(response, target, deadline, timeout[1], sink)
        finally:
            response.close()

    def _handle_response(
        self,
        response: requests.Response,
        target: Target,
        deadline: float,
        read_timeout: float,
        sink: IO[bytes] | None,
    ) -> bytes | _Redirect:
        status = response.status_code
        if status in REDIRECT_STATUSES:
            location = response.headers.get("Location", "").strip()
            if not location:
                raise ImageFailure(
                    Stage.FETCH, Reason.BAD_REDIRECT, f"HTTP {status} without a Location header"
                )
            return _Redirect(location)
        if status not in SUCCESS_STATUSES:
            transient = status == 429 or status >= 500
            raise ImageFailure(
                Stage.FETCH,
                Reason.HTTP_STATUS,
                f"HTTP {status} {_printable(response.reason or '')}".rstrip(),
                transient=transient,
                retry_after=(
                    retry_after_seconds(response.headers.get("Retry-After")) if transient else None
                ),
            )
        return self._read_body(response, target, deadline, read_timeout, sink)

    def _read_body(
        self,
        response: requests.Response,
        target: Target,
        deadline: float,
        read_timeout: float,
        sink: IO[bytes] | None,
    ) -> bytes:
        cap = self.settings.max_bytes
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TOO_LARGE,
                f"server declares {int(declared)} bytes, over the {cap}-byte limit",
            )
        body = bytearray()
        size = 0
        if sink is not None:
            sink.seek(0)
            sink.truncate()
        raw = response.raw
        while True:
            if time.monotonic() > deadline:
                raise self._out_of_time()
            if self.stop.is_set():
                raise ImageFailure(Stage.FETCH, Reason.CANCELLED, "the shard was stopped")
            try:
                # read1 returns what one socket read brings, so a server that trickles
                # bytes cannot keep us inside one call past the deadline check above.
                chunk = raw.read1(READ_CHUNK_BYTES, decode_content=True)
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as error:
                raise ImageFailure(
                    Stage.FETCH,
                    Reason.TIMEOUT,
                    f"{target.host} sent nothing for {read_timeout:g}s",
                    transient=True,
                ) from error
            except urllib3.exceptions.DecodeError as error:
                raise ImageFailure(
                    Stage.FETCH,
                    Reason.CONNECTION,
                    "response body could not be decoded (Content-Encoding)",
                ) from error
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise ImageFailure(
                    Stage.FETCH,
                    Reason.CONNECTION,
                    f"{target.host}: {_root_cause(error)}",
                    transient=True,
                ) from error
            if not chunk:
                return bytes(body)
            size += len(chunk)
            if sink is None:
                body += chunk
            else:
                sink.write(chunk)
            if size > cap:
                raise ImageFailure(
                    Stage.FETCH, Reason.TOO_LARGE, f"body is larger than the {cap}-byte limit"
                )

    def _out_of_time(self) -> ImageFailure:
        return ImageFailure(
            Stage.FETCH,
            Reason.TIMEOUT,
            f"download took longer than {self.settings.total_timeout:g}s",
        )
