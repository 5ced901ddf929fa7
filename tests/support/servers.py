"""Real HTTP servers for tests: sample images and a webhook receiver, on 127.0.0.1.

Both run in a background thread of the test process and stop with ``close()``.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
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
    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ImageServer(_Server):
    """Serves ``files`` by path; anything else is 404. ``hits`` counts requests per path.

    ``failures`` maps a path to a status code answered instead of its file (an image host
    that is down, or a file not published yet), for as long as the entry is there.
    """

    def __init__(self, files: dict[str, tuple[bytes, str]]):
        self.files = files
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
                self.wfile.write(body)

        super().__init__(Handler)


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Records every POST; ``answers`` gives the status code for the n-th POST (default 200)."""

    answers: Callable[[int], int] = lambda n: 200
    deliveries: list[Delivery] = field(default_factory=list)
    server: _Server | None = None

    def start(self) -> WebhookReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                outer.deliveries.append(
                    Delivery({k.lower(): v for k, v in self.headers.items()}, body)
                )
                code = outer.answers(len(outer.deliveries))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = _Server(Handler)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url + "/hook"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
