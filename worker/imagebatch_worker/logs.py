"""Structured log lines: one JSON object per line on stdout.

The worker writes one line per image and one summary per shard, so ``kubectl logs``
piped to ``jq`` answers "which images failed and why". URLs are logged without userinfo,
query string or fragment, since a presigned URL carries its signature there; nothing
in this module ever sees a MinIO credential.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO


class JsonLog:
    """Writes one JSON object per line; safe to call from many threads."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: object) -> None:
        record: dict[str, object] = {"ts": _timestamp(), "event": event}
        record.update(fields)
        line = _encode(record) + "\n"
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            stream.write(line)
            stream.flush()


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _timestamp() -> str:
    """Now in UTC as ``2025-01-31T12:34:56.789+00:00``, as isoformat would write it."""
    now = time.time()
    seconds = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{int((now - seconds) * 1000):03d}+00:00"
    )
