"""How much memory the worker may give to pixels, and which image gets it when.

A small compressed file can decode to a huge image: a 208 KB PNG of 7000x7000 with
transparency peaked at 720-820 MiB, and two at once (two compression threads) went past
the chart's 1 GiB limit, so the pod was killed, retried and killed again. So the worker
admits an image to decoding only when the memory its header says it will need
(``compress.memory_estimate``) fits a budget:

* ``memory_limit`` is the pod's limit: the cgroup's ``memory.max`` (v2) or
  ``memory.limit_in_bytes`` (v1), or ``IMAGEBATCH_MEMORY_LIMIT`` (the Job sets it from
  the chart's worker memory limit); the smallest of those that are set.
* ``budget_for`` leaves room for what is not pixels: the process itself and the codec
  libraries, downloaded bodies waiting for a compression thread, and allocator slack.
* ``MemoryBudget.reserve`` is a semaphore counted in bytes, shared by the compression
  threads: an image waits until its estimate fits beside the ones running, in arrival
  order (a large image is not overtaken forever by small ones), and an image larger
  than the whole budget fails at once with ``too-large-for-memory``.

After an image that took a large share of the budget the allocator is asked to hand
its freed pages back to the kernel (``malloc_trim``): glibc keeps a thread's freed
blocks in that thread's arena, where another compression thread cannot reuse them, and
the pod's usage would otherwise be the sum of each thread's largest image instead of
what runs at once.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason

MIB = 1024 * 1024
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
_UNLIMITED = 1 << 60
# What the process holds besides pixels, measured on the worker benchmark: ~60 MiB of
# interpreter, libraries and codecs, plus downloads in flight and the block cache.
_RESERVED = 96 * MIB
# A share of the limit kept back for allocator slack and Python objects.
_SLACK = 0.10
# An image holding more than this share of the budget is followed by a malloc_trim.
# Smaller images leave their buffers in the heap for the next one: trimming after every
# 12 MP image (124 MB estimated) cost it ~9,000 page faults, a fifth of its CPU.
_TRIM_SHARE = 0.25


def _cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """This process's cgroup path per hierarchy ("" is v2), from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def memory_limit(
    configured: int | None = None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """The pod's memory limit in bytes (the smallest known), or ``None`` if unlimited.

    ``configured`` is ``IMAGEBATCH_MEMORY_LIMIT``. The cgroup files are read at the
    mount's root (a container's own cgroup namespace) and at this process's cgroup
    path below it (a host view), v2 ``memory.max`` and v1 ``memory.limit_in_bytes``.
    """
    limits = [configured] if configured else []
    try:
        paths = _cgroup_paths(proc_cgroup.read_text())
    except OSError:
        paths = {}
    v2, v1 = paths.get("", "/").lstrip("/"), paths.get("memory", "/").lstrip("/")
    candidates = (
        cgroup_root / "memory.max",
        cgroup_root / v2 / "memory.max",
        cgroup_root / "memory" / "memory.limit_in_bytes",
        cgroup_root / "memory" / v1 / "memory.limit_in_bytes",
    )
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits) if limits else None


def budget_for(limit: int | None) -> int | None:
    """Bytes of pixels the compression threads may hold at once under ``limit``."""
    if limit is None:
        return None
    return max(limit - _RESERVED - int(limit * _SLACK), limit // 4)


def _mib(size: int) -> str:
    return f"{size / MIB:,.0f} MiB"


def _malloc_trim() -> None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)


class MemoryBudget:
    """A byte-counted semaphore for decoded images. Thread-safe.

    ``total`` ``None`` means unlimited: ``reserve`` then only counts.
    """

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.used = 0
        self.peak = 0  # the most reserved at once, for the shard's summary
        self.waited = 0  # how many images had to wait for memory
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes for the duration; wait for them in arrival order.

        Raises ``ImageFailure`` (``too-large-for-memory``) when ``size`` is more than
        the whole budget: no amount of waiting would make it fit.
        """
        total = self.total
        if total is not None and size > total:
            raise ImageFailure(
                Stage.DECODE,
                Reason.TOO_LARGE_FOR_MEMORY,
                f"decoding it needs about {_mib(size)} at its peak, more than the worker's "
                f"{_mib(total)} memory budget for images",
            )
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            waited = False
            while self._queue[0] != ticket or (total is not None and self.used + size > total):
                waited = True
                self._cond.wait()
            self._queue.popleft()
            self.used += size
            self.peak = max(self.peak, self.used)
            self.waited += waited
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            if total is not None and size > total * _TRIM_SHARE:
                _malloc_trim()  # before the next image may start in another thread's heap
            with self._cond:
                self.used -= size
                self._cond.notify_all()
