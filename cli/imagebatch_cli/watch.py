"""Waiting for a batch: one ``kubectl get --watch`` read as a stream of JSON events.

``kubectl get --watch --output-watch-events -o json`` prints each event as an indented
JSON object, ``{"type": "MODIFIED", "object": {...}}``, one after the other. ``JsonStream``
cuts that stream into objects (pure, unit-tested); ``Watcher`` runs kubectl, hands the
events over through a queue so the caller can wake up to redraw or time out, and starts
a new watch when the API server ends one (watches are closed every few minutes).
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from imagebatch_cli.kubectl import Kubectl, KubectlFailed
from imagebatch_cli.names import RESOURCE


class JsonStream:
    """Concatenated JSON objects in, whole objects out, however the text is split."""

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[Any]:
        self._buffer += text
        found: list[Any] = []
        while True:
            stripped = self._buffer.lstrip()
            if not stripped:
                self._buffer = ""
                return found
            try:
                obj, end = self._decoder.raw_decode(stripped)
            except json.JSONDecodeError:
                self._buffer = stripped
                return found  # incomplete: wait for more
            found.append(obj)
            self._buffer = stripped[end:]


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED; "ENDED" when the watch closed
    object: dict[str, Any]
    error: str = ""  # kubectl's stderr when a watch ended with an error


class Watcher:
    """Events of one ImageBatch, from a background thread, until ``close()``."""

    def __init__(self, kubectl: Kubectl, name: str):
        self.kubectl = kubectl
        self.name = name
        self.events: queue.Queue[WatchEvent] = queue.Queue()
        self._process: subprocess.Popen[str] | None = None
        self._closed = threading.Event()

    def start(self) -> Watcher:
        self._process = self.kubectl.popen(
            "get", RESOURCE, self.name, "--watch", "--output-watch-events", "-o", "json"
        )
        thread = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        thread.start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None and process.stderr is not None
        stream = JsonStream()
        for line in process.stdout:
            for event in stream.feed(line):
                if isinstance(event, dict) and isinstance(event.get("object"), dict):
                    self.events.put(WatchEvent(str(event.get("type")), event["object"]))
        process.wait()
        error = process.stderr.read().strip() if process.returncode else ""
        if not self._closed.is_set():
            self.events.put(WatchEvent("ENDED", {}, error))

    def restart(self) -> None:
        self.close()
        self._closed.clear()
        self.start()

    def close(self) -> None:
        self._closed.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()


def ended_error(event: WatchEvent) -> KubectlFailed | None:
    """A watch that ended because kubectl failed (the batch is gone, no access)."""
    if event.type != "ENDED" or not event.error:
        return None
    reason = "NotFound" if "NotFound" in event.error or "not found" in event.error else ""
    return KubectlFailed(event.error, reason)
