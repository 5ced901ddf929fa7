"""Where compression runs: both executors give the same results and the same failures.

The process pool must hand failures back whole (stage and reason survive pickling) and
must outlive a worker process that dies, so one bad image cannot sink a shard.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_worker.compress import CompressParams
from imagebatch_worker.compressors import (
    Compressor,
    ProcessCompressor,
    ThreadCompressor,
    make_compressor,
)
from tests.bench.images import photo_jpeg

pytestmark = pytest.mark.timeout(60)  # real sockets and processes: never hang

IMAGE = photo_jpeg(320, 240, seed=31)


@pytest.fixture(params=["processes", "threads"])
def compressor(request: pytest.FixtureRequest) -> Iterator[Compressor]:
    running = make_compressor(request.param, 2)
    yield running
    running.close()


def test_compresses(compressor: Compressor) -> None:
    result = compressor.compress(IMAGE, CompressParams(quality=50, max_dimension=160))

    assert (result.format, result.width, result.height) == ("jpeg", 160, 120)


def test_failures_arrive_whole(compressor: Compressor) -> None:
    with pytest.raises(ImageFailure) as caught:
        compressor.compress(b"<html>not an image</html>", CompressParams())

    assert (caught.value.stage, caught.value.reason) == (Stage.DECODE, Reason.NOT_AN_IMAGE)
    assert "starts with text" in caught.value.message


def test_process_pool_survives_a_killed_worker() -> None:
    compressor = ProcessCompressor(1)
    try:
        compressor.compress(IMAGE, CompressParams())  # the pool's process is up
        for pid in list(compressor._pool._processes or {}):
            os.kill(pid, signal.SIGKILL)

        result = compressor.compress(IMAGE, CompressParams())

        assert result.format == "jpeg"
    finally:
        compressor.close()


@pytest.mark.parametrize(
    ("mode", "kind"),
    [("processes", ProcessCompressor), ("threads", ThreadCompressor)],
    ids=["processes", "threads"],
)
def test_make_compressor(mode: str, kind: type) -> None:
    made = make_compressor(mode, 1)
    try:
        assert isinstance(made, kind)
    finally:
        made.close()


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="fibers"):
        make_compressor("fibers", 1)
