"""A local HTTP server on 127.0.0.1 that serves images and misbehaves on request.

The worker's tests and its benchmark point image URLs here instead of the internet.
Besides plain files it has the servers a fetcher must survive: one that drops the
connection, one that stalls past the read timeout, one that trickles, one that streams
2 GB of zeros, a redirect loop, flaky 503s and 429s with Retry-After, and redirects to
anywhere. Every route that waits or streams stops when the server closes, so a test
that fails never leaves a thread spinning.

It only ever binds 127.0.0.1.
"""

from __future__ import annotations

import gzip
import multiprocessing
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HUGE_BYTES = 2 * 1024**3  # what /huge and /huge-declared would send if nobody stopped them
_ZEROS = bytes(64 * 1024)


@dataclass(frozen=True)
class SeenRequest:
    path: str
    host: str  # the Host header as the server received it


class LocalHTTPServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 (HTTPS with ``tls``). Use as a context manager.

    Routes (``url(path)`` builds the full URL):

    ``/img/<name>``               the bytes in ``files[name]`` (Content-Type deliberately
                                  ``application/octet-stream``: the worker must sniff),
                                  after ``latency`` seconds
    ``/status/<code>``            that status code
    ``/redirect?to=<url>``        302 to ``url``
    ``/loop/<n>``                 302 to ``/loop/<n+1>``, forever
    ``/drop``                     closes the connection without answering (RST)
    ``/cut/<name>``               declares the whole file, sends half, closes
    ``/slow``                     sends headers, then nothing for ``stall_seconds``
    ``/slow-headers/<name>``      says nothing for ``stall_seconds``, then the file
    ``/trickle``                  one byte every 0.2 s, forever
    ``/huge``                     2 GB of zeros, no Content-Length (read until close)
    ``/huge-declared``            2 GB of zeros with Content-Length
    ``/flaky/<n>/<name>``         503 for the first ``n`` requests, then the file
    ``/ratelimited/<s>/<name>``   429 with ``Retry-After: s`` once, then the file
    ``/gzip/<name>``              the file gzip-encoded (``Content-Encoding: gzip``),
                                  whatever the client asked for
    ``/gzip-zeros/<n>``           ``n`` zero bytes gzip-encoded: a tiny body, a big one
    ``/then-close/<name>``        the file as a keep-alive answer, then the connection
                                  closed, as a server's idle timeout does
    """

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        stall_seconds: float = 30.0,
        tls: ssl.SSLContext | None = None,
        latency: float = 0.0,
    ):
        self.files: dict[str, bytes] = dict(files or {})
        self.latency = latency  # seconds before each file is answered, like a far server
        self.scheme = "https" if tls is not None else "http"
        self.stall_seconds = stall_seconds
        self.requests: list[SeenRequest] = []
        self.closed_connections = 0  # connections the server has closed so far
        self.stopping = threading.Event()
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def image_url(self, name: str) -> str:
        return self.url(f"img/{name}")

    def count(self, path: str) -> int:
        """How many requests ``path`` has had so far."""
        with self._lock:
            return self._counts.get(path, 0)

    def _record(self, path: str, host: str) -> int:
        with self._lock:
            self.requests.append(SeenRequest(path, host))
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]

    def start(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _handler_for(server: LocalHTTPServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def finish(self) -> None:
            super().finish()
            with server._lock:
                server.closed_connections += 1

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            segments = [s for s in parts.path.split("/") if s]
            count = server._record(parts.path, self.headers.get("Host", ""))
            route = segments[0] if segments else ""
            try:
                ROUTES.get(route, _not_found)(self, server, segments, parts.query, count)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as a good client of these routes should

        def send_bytes(
            self, body: bytes, status: int = 200, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def reset(self) -> None:
            # SO_LINGER 0: close with RST, the "connection reset by peer" a client sees
            # when a load balancer or a crashing server drops it.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler


_Route = Callable[[Any, LocalHTTPServer, list[str], str, int], None]


def _not_found(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    handler.send_bytes(b"not found\n", 404)


def _image(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    body = server.files.get("/".join(segments[1:]))
    if server.latency:
        server.stopping.wait(server.latency)
    if body is None:
        _not_found(handler, server, segments, query, n)
    else:
        handler.send_bytes(body)


def _status(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    handler.send_bytes(b"status\n", int(segments[1]))


def _redirect(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    handler.redirect(parse_qs(query)["to"][0])


def _loop(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    step = int(segments[1]) if len(segments) > 1 else 0
    handler.redirect(f"/loop/{step + 1}")


def _drop(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    handler.reset()


def _cut(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    body = server.files["/".join(segments[1:])]
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    handler.wfile.flush()
    handler.reset()


def _slow(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"\xff\xd8")
    handler.wfile.flush()
    server.stopping.wait(server.stall_seconds)
    handler.close_connection = True


def _slow_headers(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    if not server.stopping.wait(server.stall_seconds):
        _image(handler, server, segments, query, n)


def _trickle(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    handler.send_response(200)
    handler.send_header("Connection", "close")  # no length: the body ends when we stop
    handler.end_headers()
    while not server.stopping.wait(0.2):
        handler.wfile.write(b"\0")
        handler.wfile.flush()
    handler.close_connection = True


def _stream_zeros(handler: Any, server: LocalHTTPServer, declared: bool) -> None:
    handler.send_response(200)
    if declared:
        handler.send_header("Content-Length", str(HUGE_BYTES))
    else:
        handler.send_header("Connection", "close")
    handler.end_headers()
    sent = 0
    while sent < HUGE_BYTES and not server.stopping.is_set():
        handler.wfile.write(_ZEROS)
        sent += len(_ZEROS)
    handler.close_connection = True


def _huge(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    _stream_zeros(handler, server, declared=False)


def _huge_declared(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    _stream_zeros(handler, server, declared=True)


def _flaky(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    if n <= int(segments[1]):
        handler.send_bytes(b"try later\n", 503)
    else:
        _image(handler, server, segments[1:], query, n)


def _ratelimited(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    if n == 1:
        handler.send_bytes(b"slow down\n", 429, {"Retry-After": segments[1]})
    else:
        _image(handler, server, segments[1:], query, n)


def _gzip(handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int) -> None:
    body = server.files.get("/".join(segments[1:]))
    if body is None:
        _not_found(handler, server, segments, query, n)
    else:
        handler.send_bytes(gzip.compress(body), extra={"Content-Encoding": "gzip"})


def _gzip_zeros(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    body = gzip.compress(bytes(int(segments[1])))
    handler.send_bytes(body, extra={"Content-Encoding": "gzip"})


def _then_close(
    handler: Any, server: LocalHTTPServer, segments: list[str], query: str, n: int
) -> None:
    _image(handler, server, segments, query, n)
    handler.close_connection = True


ROUTES: dict[str, _Route] = {
    "img": _image,
    "status": _status,
    "redirect": _redirect,
    "loop": _loop,
    "drop": _drop,
    "cut": _cut,
    "slow": _slow,
    "slow-headers": _slow_headers,
    "trickle": _trickle,
    "huge": _huge,
    "huge-declared": _huge_declared,
    "flaky": _flaky,
    "ratelimited": _ratelimited,
    "gzip": _gzip,
    "gzip-zeros": _gzip_zeros,
    "then-close": _then_close,
}


# -- a file server in its own process, for the benchmark ------------------------


def _serve_directory(directory: str, ports: Any, latency: float, count: int) -> None:
    files = {path.name: path.read_bytes() for path in Path(directory).iterdir()}
    servers = [LocalHTTPServer(files, latency=latency).start() for _ in range(count)]
    ports.put([server.port for server in servers])
    servers[0].stopping.wait()


@dataclass
class FileServers:
    """``count`` HTTP servers in one separate process serving one directory's files."""

    urls: list[str]  # one base URL per server, each its own host:port
    pid: int  # the serving process, for its CPU time


@contextmanager
def file_servers_process(
    directory: Path, latency: float = 0.0, count: int = 1
) -> Iterator[FileServers]:
    """Serve ``directory``'s files as ``/img/<name>`` on ``count`` ports of another process.

    A separate process keeps the servers' Python off the measured process's GIL.
    ``latency`` delays each answer, as a server across the internet would; ``count``
    servers stand for that many image hosts (each port is its own origin to a client).
    """
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(
        target=_serve_directory, args=(str(directory), ports, latency, count), daemon=True
    )
    process.start()
    try:
        numbers = ports.get(timeout=120)
        assert process.pid is not None
        yield FileServers([f"http://127.0.0.1:{port}" for port in numbers], process.pid)
    finally:
        process.terminate()
        process.join(timeout=10)


@contextmanager
def directory_server_process(directory: Path, latency: float = 0.0) -> Iterator[str]:
    """Like ``file_servers_process`` with one server; yields its base URL."""
    with file_servers_process(directory, latency) as servers:
        yield servers.urls[0]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until true or ``timeout``; return whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()
