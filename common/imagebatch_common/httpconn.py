"""HTTP/1.1 connections that go to the address they are given, and a small pool of them.

Both the image fetcher and the storage client speak HTTP through this module, on the
standard library's ``http.client``: one request and one response per call, keep-alive
connections reused per origin. What it guarantees:

* A connection opens a TCP socket to exactly the ``address`` it was built with; the
  host name is used only for the Host header and, for https, as the TLS server name
  and the name the certificate must carry. The fetcher passes the address its guard
  checked, so no second DNS lookup can move the request (DNS rebinding).
* ``connect_timeout`` bounds the TCP connect and the TLS handshake; ``read_timeout``
  bounds every wait for bytes afterwards (``http.client`` also caps header count and
  line length).
* A pooled connection is reused only when its previous response was read to the end
  and the socket shows no pending bytes or EOF. With ``retry_stale``, a request that
  fails on a reused connection before any response arrived is sent once more on a
  fresh one (the server closed an idle keep-alive connection at that moment); the
  fetcher does not ask for it, so every request it sends counts as an attempt.

Measured on the worker's 640x480 benchmark: a GET through requests cost 300 us of client
CPU, through urllib3 150 us, through this module 80 us; and the worker no longer imports
either library at start-up (tests/bench/bench_worker.py).
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ssl is imported only when an https connection is made
    import ssl

# Errors that mean "the server closed this keep-alive connection before our request".
STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


class Connection(http.client.HTTPConnection):
    """A plain HTTP/1.1 connection whose socket goes to ``address``, never a DNS answer."""

    def __init__(
        self, host: str, port: int, address: str, connect_timeout: float, read_timeout: float
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.address = address
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), self.connect_timeout)
        # Requests are written in one or two sends and answered at once: Nagle's delay
        # would only add latency.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def connect(self) -> None:
        self.sock = self._open_socket()
        self.sock.settimeout(self.read_timeout)

    def set_read_timeout(self, seconds: float) -> None:
        """Bound every later wait for bytes on this connection by ``seconds``."""
        self.read_timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)


class TLSConnection(Connection):
    """An https connection: TLS on a socket to ``address``, verified for ``host``."""

    default_port = http.client.HTTPS_PORT  # the Host header omits :443

    def __init__(
        self,
        host: str,
        port: int,
        address: str,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, address, connect_timeout, read_timeout)
        self.context = context

    def connect(self) -> None:
        raw = self._open_socket()  # still under connect_timeout for the handshake
        try:
            # server_hostname is the URL's host: it is sent as SNI and, with the
            # context's check_hostname, is the name the certificate must carry.
            self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(self.read_timeout)


def tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """A client context that verifies certificates and host names (system CAs by default)."""
    import os
    import ssl

    if not ca_bundle:
        return ssl.create_default_context()
    if os.path.isdir(ca_bundle):
        return ssl.create_default_context(capath=ca_bundle)
    return ssl.create_default_context(cafile=ca_bundle)


def _dropped(connection: Connection) -> bool:
    """Whether an idle connection was closed by its server (EOF or stray bytes pending)."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


PoolKey = tuple[str, str, int, str]  # scheme, host, port, address


class ConnectionPool:
    """Idle keep-alive connections by (scheme, host, port, address). Thread-safe.

    At most ``per_origin`` idle connections are kept per key and ``origins`` keys in
    all (least recently used first out), so a shard with images on thousands of hosts
    holds a bounded number of sockets.
    """

    def __init__(self, per_origin: int, origins: int = 32) -> None:
        self.per_origin = per_origin
        self.origins = origins
        self._idle: OrderedDict[PoolKey, deque[Connection]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: PoolKey) -> Connection | None:
        """An idle connection for ``key`` that still looks usable, or ``None``."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                connection = idle.pop()
            if not _dropped(connection):
                return connection
            connection.close()

    def give_back(self, key: PoolKey, connection: Connection) -> None:
        """Keep ``connection`` for the next request to ``key`` (its response was read)."""
        evicted: list[Connection] = []
        with self._lock:
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = deque()
            else:
                self._idle.move_to_end(key)
            if len(idle) < self.per_origin:
                idle.append(connection)
            else:
                evicted.append(connection)
            while len(self._idle) > self.origins:
                evicted.extend(self._idle.popitem(last=False)[1])
        for old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for connection in connections:
            connection.close()


def send(
    pool: ConnectionPool,
    key: PoolKey,
    new_connection: Callable[[], Connection],
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes | None = None,
    read_timeout: float | None = None,
    retry_stale: bool = False,
) -> tuple[Connection, http.client.HTTPResponse]:
    """Send one request on a pooled (or new) connection and read the response head.

    The caller reads the body and then either closes the response and gives the
    connection back to ``pool`` (body read to the end, ``response.will_close`` false)
    or closes the connection. Errors of the
    connection or the server propagate as ``OSError`` / ``http.client`` exceptions.
    """
    connection = pool.take(key)
    reused = connection is not None
    while True:
        if connection is None:
            connection = new_connection()
        if read_timeout is not None:
            connection.set_read_timeout(read_timeout)
        try:
            connection.request(method, target, body=body, headers=dict(headers))
            return connection, connection.getresponse()
        except STALE_CONNECTION_ERRORS:
            connection.close()
            if not (reused and retry_stale):
                raise
            connection, reused = None, False  # once more, on a fresh connection
        except BaseException:
            connection.close()
            raise
