"""Run the worker with a sampler that charges each thread's CPU time to its Python stack.

``python tests/bench/cpu_sampler.py OUT [worker arguments]`` runs
``imagebatch_worker.main.main`` in this interpreter (so it profiles whichever build that
interpreter imports). Every ``IMAGEBATCH_SAMPLE_MS`` (default 1 ms) a thread reads each
other thread's CPU clock (``pthread_getcpuclockid``) and charges the CPU it used since
the last look to the Python stack it is in now. A thread in C (the codec, a socket
call) is in the frame that called it. A thread that ran a short burst and then began
to wait is charged at its wait: the burst lands in the same thread and stage (a
download's work on the download's socket wait, a hand-over on the queue it waits on),
not always on the exact line. At exit it writes folded stacks, one
``frame;frame;... microseconds`` line each, frames as py-spy writes them
(``function (path/relative/to/sys.path.py:line)``).

py-spy's ``--gil`` mode was tried first: when no thread holds the GIL it charges the
thread that held it last, which put half of a shard on lines that take microseconds.
The sampler's own CPU (a few per cent) is left out of the stacks.

This file imports nothing of the project, so any build's interpreter can run it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import FrameType


def _relative(filename: str, roots: list[str]) -> str:
    for root in roots:
        if filename.startswith(root):
            return filename[len(root) :].lstrip("/")
    return filename


def _stack(frame: FrameType | None, roots: list[str]) -> tuple[str, ...]:
    frames: list[str] = []
    while frame is not None:
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        frames.append(f"{name} ({_relative(code.co_filename, roots)}:{frame.f_lineno})")
        frame = frame.f_back
    return tuple(reversed(frames))


class Sampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stacks: defaultdict[tuple[str, ...], float] = defaultdict(float)  # CPU seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._roots = sorted((p for p in sys.path if p), key=len, reverse=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        clocks: dict[int, int] = {}
        last: dict[int, float] = {}
        while not self._stop.wait(self.interval):
            self._sample(me, clocks, last)
        self._sample(me, clocks, last)

    def _sample(self, me: int, clocks: dict[int, int], last: dict[int, float]) -> None:
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            try:
                clock = clocks.get(ident)
                if clock is None:
                    clock = clocks[ident] = time.pthread_getcpuclockid(ident)
                used = time.clock_gettime(clock)
            except (OSError, OverflowError):  # the thread ended meanwhile
                continue
            # A thread first seen is charged all its CPU so far (the main thread: the
            # interpreter's start-up).
            spent = used - last.get(ident, 0.0)
            last[ident] = used
            if spent > 0:
                self.stacks[_stack(frame, self._roots)] += spent

    def write(self, out: Path) -> None:
        with out.open("w") as file:
            for stack, seconds in self.stacks.items():
                micros = round(seconds * 1e6)
                if micros:
                    file.write(f"{';'.join(stack)} {micros}\n")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    interval = float(os.environ.get("IMAGEBATCH_SAMPLE_MS", "1")) / 1000
    sampler = Sampler(interval)
    sampler.start()
    try:
        from imagebatch_worker.main import main as worker_main

        return worker_main(argv[1:])
    finally:
        sampler.stop()
        sampler.write(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
