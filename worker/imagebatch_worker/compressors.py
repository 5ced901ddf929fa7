"""Where ``compress()`` runs: on the runner's compression threads, or in a pool of processes.

The runner's download and upload threads spend most of their time waiting on the
network; compression is the CPU work, bounded to the CPUs the pod may use (the number
of compression threads) and to the memory it may use: every image holds its estimated
peak of the shared ``MemoryBudget`` while it decodes and encodes. Two ways, chosen by
``WorkerSettings.compress_in`` and compared by ``tests/bench/bench_worker.py``:

* ``threads`` (the default): each compression thread compresses in place. Pillow
  releases the GIL while it decodes, resizes and encodes into a file descriptor, so
  threads use every core; no image bytes are copied between processes, and on a two-core
  machine this measured faster and cheaper in CPU per image than the pool below. Pillow
  is imported by the first compression, while the first downloads are under way.
* ``processes``: a pool of worker processes. No GIL is shared with the threads doing
  HTTP and storage requests, and a decoder that crashes or is killed for memory takes
  one pool down, not the pod: the image is tried once more on a fresh pool and, if it
  kills that one too, recorded as failed while the shard goes on. The memory is
  reserved in the parent from the image's header before the image is sent.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING, Protocol

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_worker.formats import CompressedImage, CompressParams
from imagebatch_worker.memory import MemoryBudget

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

COMPRESS_MODES = ("processes", "threads")

_MIB = 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters, from <malloc.h>
_M_MMAP_THRESHOLD = -3


def reuse_image_memory(workers: int) -> None:
    """Keep the large buffers of one image around for the next, instead of faulting them in.

    Decoding a 1920x1080 JPEG needs ~8 MiB of pixels and libjpeg another ~6 MiB to
    optimise its Huffman tables. By default Pillow returns its blocks to malloc at once,
    and glibc serves and returns anything over 128 KiB with mmap/munmap, so every image
    paid ~2,500 page faults: measured, a quarter of the worker's CPU per image. Pillow
    caches a few blocks per compression slot, and glibc keeps buffers up to 32 MiB in
    its heap (a no-op where the C library is not glibc). Peak memory is unchanged; only
    a few image-sized buffers stay reserved between images.
    """
    from PIL import _imaging as pillow_core  # what PIL.Image.core is; holds the block cache

    pillow_core.set_blocks_max(max(pillow_core.get_blocks_max(), 2 * workers))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 32 * _MIB)
    mallopt(_M_TRIM_THRESHOLD, 64 * _MIB)


class Compressor(Protocol):
    """Runs ``compress`` with bounded parallelism and memory. Thread-safe."""

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage: ...

    def close(self) -> None: ...


class ThreadCompressor:
    """Compresses on the calling thread; the caller runs ``workers`` such threads.

    The runner's compression threads are dedicated to it (``runner._Pipeline``): glibc
    gives each thread that allocates its own heap, and image-sized buffers kept for
    reuse should sit in ``workers`` heaps, not in one per download thread. Compressing
    on the caller's thread rather than handing the image to a pool spares two thread
    wake-ups per image.
    """

    def __init__(self, workers: int, budget: MemoryBudget | None = None) -> None:
        self._workers = workers
        self._budget = budget or MemoryBudget(None)
        self._ready = False
        self._lock = threading.Lock()

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage:
        if not self._ready:
            with self._lock:
                if not self._ready:
                    reuse_image_memory(self._workers)  # imports Pillow: the first image pays
                    self._ready = True
        from imagebatch_worker.compress import compress

        return compress(data, params, self._budget.reserve)

    def close(self) -> None:
        pass


def _compress_in_process(data: bytes, params: CompressParams) -> CompressedImage:
    from imagebatch_worker.compress import compress

    return compress(data, params)


class ProcessCompressor:
    """Compresses in ``workers`` processes; survives a process that dies mid-image."""

    def __init__(self, workers: int, budget: MemoryBudget | None = None) -> None:
        import multiprocessing  # only this mode needs it: 5 ms of start-up otherwise

        self._workers = workers
        self._budget = budget or MemoryBudget(None)
        self._lock = threading.Lock()
        # forkserver, not fork: the runner already has threads, and forking a threaded
        # process can copy a lock held by another thread. The server process imports
        # Pillow once, so each worker process starts warm.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["imagebatch_worker.compress"])
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            self._workers,
            mp_context=self._context,
            initializer=reuse_image_memory,
            initargs=(1,),
        )

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
                broken.shutdown(wait=False, cancel_futures=True)

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage:
        from imagebatch_worker.compress import header_estimate

        with self._budget.reserve(header_estimate(data, params)):
            return self._compress(data, params)

    def _compress(self, data: bytes, params: CompressParams) -> CompressedImage:
        # A dead process breaks the whole pool and every image in it; the innocent ones
        # succeed on the fresh pool, the image that kills that one too is the culprit.
        from concurrent.futures.process import BrokenProcessPool

        for attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(_compress_in_process, data, params).result()
            except BrokenProcessPool as error:
                self._replace(pool)
                if attempt == 2:
                    raise ImageFailure(
                        Stage.DECODE,
                        Reason.CORRUPT,
                        "the image crashed the decoder or exhausted its memory",
                    ) from error
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)


def make_compressor(mode: str, workers: int, budget: MemoryBudget | None = None) -> Compressor:
    if mode == "threads":
        return ThreadCompressor(workers, budget)
    if mode == "processes":
        return ProcessCompressor(workers, budget)
    raise ValueError(f"compress mode {mode!r} is not one of {', '.join(COMPRESS_MODES)}")
