"""Where ``compress()`` runs: in the image's own thread, or in a pool of processes.

The runner's threads spend most of their time waiting on the network; compression is
the CPU work, bounded here to the CPUs the pod may use. Two ways, chosen by
``WorkerSettings.compress_in`` and compared by ``tests/bench/bench_worker.py``:

* ``threads`` (the default): compress in the calling thread under a semaphore. Pillow
  releases the GIL while it decodes, resizes and encodes into a file descriptor, so
  threads use every core; no image bytes are copied between processes, and on a
  two-core machine this measured a few per cent faster and ~10 % cheaper in CPU per
  image than the pool below.
* ``processes``: a pool of worker processes. No GIL is shared with the threads doing
  HTTP and MinIO requests, and a decoder that crashes or is killed for memory takes one
  pool down, not the pod: the image is tried once more on a fresh pool and, if it kills
  that one too, recorded as failed while the shard goes on.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from imagebatch_worker.compress import CompressedImage, CompressParams, compress
from imagebatch_worker.contract import Stage
from imagebatch_worker.failures import ImageFailure, Reason

COMPRESS_MODES = ("processes", "threads")


class Compressor(Protocol):
    """Runs ``compress`` with bounded parallelism. Thread-safe."""

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage: ...

    def close(self) -> None: ...


class ThreadCompressor:
    """Compresses in the caller's thread, at most ``workers`` at once."""

    def __init__(self, workers: int) -> None:
        self._slots = threading.BoundedSemaphore(workers)

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage:
        with self._slots:
            return compress(data, params)

    def close(self) -> None:
        pass


class ProcessCompressor:
    """Compresses in ``workers`` processes; survives a process that dies mid-image."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._lock = threading.Lock()
        # forkserver, not fork: the runner already has threads, and forking a threaded
        # process can copy a lock held by another thread. The server process imports
        # Pillow once, so each worker process starts warm.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["imagebatch_worker.compress"])
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self._workers, mp_context=self._context)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
                broken.shutdown(wait=False, cancel_futures=True)

    def compress(self, data: bytes, params: CompressParams) -> CompressedImage:
        # A dead process breaks the whole pool and every image in it; the innocent ones
        # succeed on the fresh pool, the image that kills that one too is the culprit.
        for attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(compress, data, params).result()
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


def make_compressor(mode: str, workers: int) -> Compressor:
    if mode == "threads":
        return ThreadCompressor(workers)
    if mode == "processes":
        return ProcessCompressor(workers)
    raise ValueError(f"compress mode {mode!r} is not one of {', '.join(COMPRESS_MODES)}")
