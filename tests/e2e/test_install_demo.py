"""``make demo`` (``python -m tests.demo``) end to end, reading what a user reads.

The demo starts a local stack of its own, installs the chart, runs the example batch
and prints the result; with ``--keep`` it then waits for Ctrl-C, and stops everything.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


class Output:
    """The demo's output, read line by line in a thread so that waits are bounded."""

    def __init__(self, process: subprocess.Popen[str]):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen = ""
        assert process.stdout is not None
        stream = process.stdout

        def pump() -> None:
            for line in stream:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, marker: str, timeout: float) -> str:
        """Everything printed so far, once a line holding ``marker`` has come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen += line
            if marker in line:
                return self.seen
        raise AssertionError(f"the demo never printed {marker!r}; it printed:\n{self.seen}")


def test_demo_runs_the_example_and_stops_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.demo", "--keep"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = Output(process)
        shown = output.until("Ctrl-C stops everything", timeout=240)
        # kubectl get ib: the example batch, every image done.
        row = next(line for line in shown.splitlines() if line.startswith("spring-catalog "))
        assert row.split()[1:5] == ["Succeeded", "10/10", "0", "1/1"]
        # The first rows of the output CSV: the header gains the output column.
        assert "S. No.,Product Name,Input Image Urls,Output Image Urls" in shown
        assert re.search(r"^1,SKU1,\"http://127\.0\.0\.1:\d+/catalog/sku1-front\.jpg", shown, re.M)
        # Where the images are, and one of them is really there.
        assert "10 compressed images in s3://imagebatch/demo/spring-catalog/images/" in shown
        example = re.search(r"^e\.g\. (http://\S+\.jpg)$", shown, re.M)
        assert example is not None
        assert requests.get(example.group(1), timeout=10).content[:2] == b"\xff\xd8"
        kubeconfig = re.search(r"^export KUBECONFIG=(\S+)$", shown, re.M)
        assert kubeconfig is not None and Path(kubeconfig.group(1)).exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
    rest = output.until("stopped; nothing left running", timeout=60)
    assert process.wait(timeout=30) == 0, rest
    assert not Path(kubeconfig.group(1)).exists()  # the stack's folder is gone
