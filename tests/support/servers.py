"""Real HTTP servers for tests: sample images and a webhook receiver, on 127.0.0.1.

Both run in a background thread of the test process and stop with ``close()``. The image
server can answer slowly (``latency`` before every answer, ``pace`` to spread one file's
body over seconds), so a fault drill has a window to act in. The webhook receiver answers
as a script says (status, headers such as ``Retry-After``, a delay before answering),
records when each delivery arrived and was answered, lets a test wait for either, and
can stop listening and listen again on the same port (a receiver that is down).
"""

from __future__ import annotations

import errno
import io
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


def photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A photograph-like image: smooth gradients plus a little structure."""
    image = Image.new("RGB", (width, height))
    pixels = [
        (
            (x * 255 // max(width - 1, 1) + seed * 37) % 256,
            (y * 255 // max(height - 1, 1) + seed * 91) % 256,
            ((x ^ y) + seed * 13) % 256,
        )
        for y in range(height)
        for x in range(width)
    ]
    image.putdata(pixels)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0):
        self.httpd = _bind(handler, port)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        port: int = self.httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _bind(handler: type[BaseHTTPRequestHandler], port: int) -> ThreadingHTTPServer:
    """Listen on 127.0.0.1:``port``; a port just given up may take a moment to be free."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or port == 0 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class ImageServer(_Server):
    """Serves ``files`` by path; anything else is 404. ``hits`` counts requests per path.

    ``latency`` (seconds) is waited before every answer; ``pace`` maps a path to the
    seconds over which its body is sent, in small pieces; ``failures`` maps a path to a
    status code answered instead of its file (an image host that is down, or a file not
    published yet), for as long as the entry is there. All may be changed while the
    server runs.
    """

    PIECES = 20  # a paced body goes out in this many pieces

    def __init__(self, files: dict[str, tuple[bytes, str]], latency: float = 0.0):
        self.files = files
        self.latency = latency
        self.pace: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with lock:
                    outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if outer.latency > 0:
                    time.sleep(outer.latency)
                try:
                    self._answer()
                except OSError:
                    pass  # the client went away (a killed worker or operator)

            def _answer(self) -> None:
                failure = outer.failures.get(self.path)
                if failure is not None:
                    self.send_error(failure)
                    return
                entry = outer.files.get(self.path)
                if entry is None:
                    self.send_error(404)
                    return
                body, ctype = entry
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                spread = outer.pace.get(self.path, 0.0)
                if spread <= 0:
                    self.wfile.write(body)
                    return
                piece = -(-len(body) // outer.PIECES)
                for start in range(0, len(body), piece):
                    self.wfile.write(body[start : start + piece])
                    self.wfile.flush()
                    time.sleep(spread / outer.PIECES)

        super().__init__(Handler)

    def hits_snapshot(self) -> dict[str, int]:
        """A copy of ``hits``, to count what one test fetched: ``hits_since(snapshot)``."""
        return dict(self.hits)

    def hits_since(self, snapshot: Mapping[str, int]) -> dict[str, int]:
        """Requests per path since ``snapshot`` was taken (paths not requested left out)."""
        return {
            path: count - snapshot.get(path, 0)
            for path, count in list(self.hits.items())
            if count > snapshot.get(path, 0)
        }


@dataclass(frozen=True)
class Answer:
    """What the receiver answers one delivery with."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds the request is held before the answer


@dataclass
class Delivery:
    """One POST the receiver got: what came, when, and what it answered."""

    headers: dict[str, str]
    body: bytes
    arrived: float = 0.0  # time.monotonic() once the body was read
    answered: float | None = None  # time.monotonic() once the answer was sent
    status: int | None = None  # the status answered (None: not yet, or never)

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Records every POST and answers it as ``answers`` says for the n-th POST (from 1).

    ``answers`` returns a status code (answered at once) or an ``Answer``. ``on_arrival``
    and ``on_answer`` run in the request's thread, the instant a delivery is read and
    the instant its answer is sent: for a test that must act at exactly that moment.
    ``stop()`` closes the port (connections are refused); ``start()`` listens again on
    the same port.
    """

    answers: Callable[[int], int | Answer] = lambda n: 200
    on_arrival: Callable[[Delivery], None] | None = None
    on_answer: Callable[[Delivery], None] | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    server: _Server | None = None
    port: int = 0  # 0 until first started; then kept, so a restart listens on it again
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> WebhookReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                delivery = Delivery(
                    {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()
                )
                with outer.changed:
                    outer.deliveries.append(delivery)
                    number = len(outer.deliveries)
                    outer.changed.notify_all()
                if outer.on_arrival is not None:
                    outer.on_arrival(delivery)
                scripted = outer.answers(number)
                answer = scripted if isinstance(scripted, Answer) else Answer(scripted)
                if answer.delay > 0:
                    time.sleep(answer.delay)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self.wfile.flush()
                except OSError:
                    return  # the sender went away while the request was held
                with outer.changed:
                    delivery.answered, delivery.status = time.monotonic(), answer.status
                    outer.changed.notify_all()
                if outer.on_answer is not None:
                    outer.on_answer(delivery)

        self.server = _Server(Handler, self.port)
        self.port = self.server.port
        return self

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the receiver has not been started")
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def ids(self) -> list[str]:
        """The ``webhook-id`` of every delivery, in arrival order."""
        with self.changed:
            return [d.id for d in self.deliveries]

    def wait_for(self, condition: Callable[[list[Delivery]], bool], timeout: float) -> bool:
        """Wait until ``condition(deliveries)`` holds (re-checked as deliveries come and
        are answered); False if it still does not after ``timeout`` seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: condition(self.deliveries), timeout)

    def stop(self) -> None:
        """Stop listening: from now on a delivery meets a refused connection."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def close(self) -> None:
        self.stop()
