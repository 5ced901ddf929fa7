"""Measure what compressing one image costs in memory, in a process of its own.

``python -m tests.bench.memory_probe FILE FORMAT [MAX_DIMENSION]`` compresses the file
once with the worker's ``compress`` and prints one JSON line: the header's
``memory_estimate`` and the process's peak resident memory above what it held just
before (Linux: the peak is reset through ``/proc/self/clear_refs`` first). The codecs
are loaded and warmed on a small image of the same kind before the peak is reset, so
the figure is the image's own. The memory unit tests and the worker benchmark use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str]) -> int:
    from imagebatch_worker.compress import compress, header_estimate
    from imagebatch_worker.compressors import reuse_image_memory
    from imagebatch_worker.formats import CompressParams

    path, target = argv[0], argv[1]
    max_dimension = int(argv[2]) if len(argv) > 2 and argv[2] else None
    data = Path(path).read_bytes()
    params = CompressParams(format=target, max_dimension=max_dimension, max_pixels=10**9)
    reuse_image_memory(1)  # as the worker runs: Pillow's block cache and glibc thresholds
    warm = Path(path).with_suffix(".warm")
    if warm.exists():
        compress(warm.read_bytes(), params)
    estimate = header_estimate(data, params)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = compress(data, params)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "estimate": estimate,
                "peak": (peak - before) * 1024,
                "format": result.format,
                "size": [result.width, result.height],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
