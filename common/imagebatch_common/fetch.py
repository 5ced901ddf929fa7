"""Download one image safely: checked addresses, pinned connections, caps and retries.

``Fetcher.fetch(url)`` returns the body or raises ``ImageFailure`` with stage ``fetch``.
What it guarantees, and why:

* Every hop (the URL and each redirect) is checked by ``urlguard`` first, and the TCP
  connection goes to the address that was checked, not to whatever DNS says a moment
  later (``httpconn``). The Host header and, for https, the TLS server name and
  certificate check still use the URL's host name. The request is built from the same
  parse of the URL that the guard checked, so no second parser can read another host.
* Redirects are followed here, each target checked; at most ``max_redirects`` of them.
* Bytes, connect time, silence between bytes and the image's whole wall time are
  capped; a body is streamed and abandoned as soon as it passes the byte cap, and a
  declared Content-Length over the cap fails before the body is read. A body sent
  gzip- or deflate-encoded although identity was asked for is decoded here, its
  decoded bytes counted against the cap.
* Connection resets, timeouts, 429 and 5xx are retried with exponential backoff and
  jitter (a 429's Retry-After is honoured up to a bound); a 4xx never is.
* Environment proxies are never used: a proxy would connect on our behalf to an
  address we did not check.

It speaks HTTP through ``httpconn`` (the standard library's ``http.client``), not
requests or urllib3: measured, a third of the client CPU per image and none of their
import time at worker start-up. ``PinnedAdapter``, the same pinning for a requests
session (the operator's webhook), lives in ``pinned_requests`` and is imported from
here only on demand.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

from imagebatch_common import httpconn
from imagebatch_common.contract import Stage
from imagebatch_common.envread import IPNetwork
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.retry import backoff, retry_after_seconds
from imagebatch_common.urlguard import (
    AddressPolicy,
    Resolver,
    Target,
    resolve_target,
    system_resolver,
)

if TYPE_CHECKING:
    from imagebatch_common.pinned_requests import PinnedAdapter

__all__ = ["FetchSettings", "FetchedImage", "Fetcher", "PinnedAdapter"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
SUCCESS_STATUSES = frozenset({200, 203})
READ_CHUNK_BYTES = 1024 * 1024
_ORIGINS_KEPT = 32  # distinct (origin, address) pairs whose idle connections are kept
# Characters left as they are in a request path and query: RFC 3986 reserved and
# unreserved ones and "%" (already-encoded octets); everything else is percent-encoded.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


def __getattr__(name: str) -> object:
    # The requests-based adapter is for the operator; importing requests here would
    # cost every worker start-up its import time.
    if name == "PinnedAdapter":
        from imagebatch_common.pinned_requests import PinnedAdapter

        return PinnedAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def request_target(url: str) -> str:
    """The request line's target for ``url``: path and query, percent-encoded, no fragment."""
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe=_URL_SAFE)
    return f"{path}?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else path


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
        if isinstance(current, http.client.IncompleteRead):
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
        self._pool = httpconn.ConnectionPool(settings.pool_size, _ORIGINS_KEPT)
        self._tls: ssl.SSLContext | None = None  # made at the first https request
        self._lock = threading.Lock()
        self._headers = {
            "User-Agent": settings.user_agent,
            "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
            # A compressed transfer encoding buys nothing for images and would let a
            # small body inflate; the byte cap counts decoded bytes either way.
            "Accept-Encoding": "identity",
        }

    def close(self) -> None:
        self._pool.close()

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

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                # Loading the CA bundle costs milliseconds: once per fetcher, and only
                # when an https URL comes.
                self._tls = httpconn.tls_context(self.settings.ca_bundle)
            return self._tls

    def _connect(
        self, target: Target, connect_timeout: float, read_timeout: float
    ) -> httpconn.Connection:
        """A new connection to the checked address, connected (and TLS done) now."""
        connection: httpconn.Connection
        if target.scheme == "https":
            connection = httpconn.TLSConnection(
                target.host,
                target.port,
                target.address,
                connect_timeout,
                read_timeout,
                self._tls_context(),
            )
        else:
            connection = httpconn.Connection(
                target.host, target.port, target.address, connect_timeout, read_timeout
            )
        try:
            connection.connect()
        except TimeoutError as error:
            connection.close()
            raise ImageFailure(
                Stage.FETCH,
                Reason.TIMEOUT,
                f"connecting to {target.host} took longer than {connect_timeout:g}s",
                transient=True,
            ) from error
        except (ssl.SSLError, ssl.CertificateError) as error:
            connection.close()
            raise ImageFailure(
                Stage.FETCH, Reason.TLS, f"TLS with {target.host} failed: {_tls_cause(error)}"
            ) from error
        except OSError as error:
            connection.close()
            raise ImageFailure(
                Stage.FETCH,
                Reason.CONNECTION,
                f"{target.host}: {_root_cause(error)}",
                transient=True,
            ) from error
        return connection

    def _attempt(self, url: str, deadline: float, sink: IO[bytes] | None) -> bytes | _Redirect:
        target = resolve_target(url, self.policy, self.resolver)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._out_of_time()
        connect_timeout = min(self.settings.connect_timeout, remaining)
        read_timeout = min(self.settings.read_timeout, remaining)
        try:
            path = request_target(url)
        except ValueError as error:
            raise ImageFailure(
                Stage.FETCH, Reason.URL_INVALID, f"URL cannot be requested: {error}"
            ) from error
        key = (target.scheme, target.host, target.port, target.address)
        try:
            connection, response = httpconn.send(
                self._pool,
                key,
                lambda: self._connect(target, connect_timeout, read_timeout),
                "GET",
                path,
                self._headers,
                read_timeout=read_timeout,
            )
        except TimeoutError as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TIMEOUT,
                f"no response from {target.host} within {read_timeout:g}s",
                transient=True,
            ) from error
        except (http.client.HTTPException, OSError) as error:
            raise ImageFailure(
                Stage.FETCH,
                Reason.CONNECTION,
                f"{target.host}: {_root_cause(error)}",
                transient=True,
            ) from error
        reusable = False
        try:
            outcome = self._handle_response(response, target, deadline, read_timeout, sink)
            reusable = not isinstance(outcome, _Redirect) and not response.will_close
            return outcome
        finally:
            if reusable:
                response.close()  # marks the exchange done; the socket stays open
                self._pool.give_back(key, connection)
            else:
                connection.close()

    def _handle_response(
        self,
        response: http.client.HTTPResponse,
        target: Target,
        deadline: float,
        read_timeout: float,
        sink: IO[bytes] | None,
    ) -> bytes | _Redirect:
        status = response.status
        if status in REDIRECT_STATUSES:
            location = (response.getheader("Location") or "").strip()
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
                    retry_after_seconds(response.getheader("Retry-After")) if transient else None
                ),
            )
        return self._read_body(response, target, deadline, read_timeout, sink)

    def _read_body(
        self,
        response: http.client.HTTPResponse,
        target: Target,
        deadline: float,
        read_timeout: float,
        sink: IO[bytes] | None,
    ) -> bytes:
        cap = self.settings.max_bytes
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > cap:
            raise ImageFailure(
                Stage.FETCH,
                Reason.TOO_LARGE,
                f"server declares {int(declared)} bytes, over the {cap}-byte limit",
            )
        decoder = _content_decoder(response.getheader("Content-Encoding"))
        chunks: list[bytes] = []
        size = 0
        if sink is not None:
            sink.seek(0)
            sink.truncate()
        while True:
            if time.monotonic() > deadline:
                raise self._out_of_time()
            if self.stop.is_set():
                raise ImageFailure(Stage.FETCH, Reason.CANCELLED, "the shard was stopped")
            try:
                # read1 returns what one socket read brings, so a server that trickles
                # bytes cannot keep us inside one call past the deadline check above.
                raw = response.read1(READ_CHUNK_BYTES)
            except TimeoutError as error:
                raise ImageFailure(
                    Stage.FETCH,
                    Reason.TIMEOUT,
                    f"{target.host} sent nothing for {read_timeout:g}s",
                    transient=True,
                ) from error
            except (http.client.HTTPException, OSError) as error:
                raise ImageFailure(
                    Stage.FETCH,
                    Reason.CONNECTION,
                    f"{target.host}: {_root_cause(error)}",
                    transient=True,
                ) from error
            if not raw:
                if response.length:  # http.client counts down a declared length
                    raise ImageFailure(
                        Stage.FETCH,
                        Reason.CONNECTION,
                        f"{target.host}: connection closed before the whole body arrived",
                        transient=True,
                    )
                return b"".join(chunks)
            chunk = raw if decoder is None else _decode(decoder, raw, cap - size)
            size += len(chunk)
            if size > cap:
                raise ImageFailure(
                    Stage.FETCH, Reason.TOO_LARGE, f"body is larger than the {cap}-byte limit"
                )
            if sink is None:
                chunks.append(chunk)
            else:
                sink.write(chunk)

    def _out_of_time(self) -> ImageFailure:
        return ImageFailure(
            Stage.FETCH,
            Reason.TIMEOUT,
            f"download took longer than {self.settings.total_timeout:g}s",
        )


def _tls_cause(error: BaseException) -> str:
    reason = getattr(error, "verify_message", None) or getattr(error, "reason", None)
    return str(reason) if reason else _root_cause(error)


def _content_decoder(encoding: str | None) -> zlib._Decompress | None:
    """A decoder for a body the server encoded although identity was asked for."""
    name = (encoding or "identity").strip().lower()
    if name in ("identity", ""):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj()
    raise ImageFailure(
        Stage.FETCH,
        Reason.CONNECTION,
        f"response body is {_printable(name, 20)}-encoded, which cannot be decoded",
    )


def _decode(decoder: zlib._Decompress, chunk: bytes, room: int) -> bytes:
    """Decode ``chunk``, producing at most ``room + 1`` bytes: enough to see the cap passed.

    Output short of that limit means all of ``chunk`` was consumed; reaching it means the
    body is over the cap, and the caller stops.
    """
    try:
        data = decoder.decompress(chunk, max(room, 0) + 1)
    except zlib.error as error:
        raise ImageFailure(
            Stage.FETCH, Reason.CONNECTION, "response body could not be decoded (Content-Encoding)"
        ) from error
    return data
