"""The worker's memory budget: the limit it finds, the budget it derives, the order in
which images get memory, and estimates that stay above what images really take."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_worker.compress import header_estimate, memory_estimate
from imagebatch_worker.formats import CompressParams
from imagebatch_worker.memory import MIB, MemoryBudget, budget_for, memory_limit
from tests.bench.images import photo
from tests.bench.local_http import wait_until

pytestmark = pytest.mark.timeout(120)  # real processes: never hang

GIB = 1024 * MIB
UNLIMITED_V1 = "9223372036854771712"


def cgroup_tree(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / "cg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    (root / "cgroup").write_text(proc)
    return root / "cg", root / "cgroup"


LIMITS = {
    "v2-in-its-namespace": ({"memory.max": str(GIB)}, "0::/\n", None, GIB),
    "v2-unlimited": ({"memory.max": "max"}, "0::/\n", None, None),
    "v2-host-view": (
        {"kubepods/pod1/c1/memory.max": str(2 * GIB)},
        "0::/kubepods/pod1/c1\n",
        None,
        2 * GIB,
    ),
    "v1-container-root": ({"memory/memory.limit_in_bytes": str(GIB)}, "4:memory:/\n", None, GIB),
    "v1-unlimited": ({"memory/memory.limit_in_bytes": UNLIMITED_V1}, "4:memory:/\n", None, None),
    "v1-host-view": (
        {"memory/docker/abc/memory.limit_in_bytes": str(3 * GIB)},
        "4:memory:/docker/abc\n",
        None,
        3 * GIB,
    ),
    "setting-alone": ({}, "", GIB, GIB),
    "smaller-of-setting-and-cgroup": ({"memory.max": str(GIB)}, "0::/\n", 2 * GIB, GIB),
    "setting-smaller-than-cgroup": ({"memory.max": str(2 * GIB)}, "0::/\n", GIB, GIB),
    "nothing-known": ({}, "", None, None),
}


@pytest.mark.parametrize(
    ("files", "proc", "configured", "expected"), LIMITS.values(), ids=LIMITS.keys()
)
def test_memory_limit(
    tmp_path: Path, files: dict[str, str], proc: str, configured: int | None, expected: int | None
) -> None:
    root, proc_file = cgroup_tree(tmp_path, files, proc)

    assert memory_limit(configured, root, proc_file) == expected


@pytest.mark.parametrize(
    ("limit", "budget"),
    [
        (None, None),
        (GIB, GIB - 96 * MIB - GIB // 10),
        (4 * GIB, 4 * GIB - 96 * MIB - (4 * GIB) // 10),
        (128 * MIB, 32 * MIB),  # never below a quarter of the limit
    ],
    ids=["unlimited", "1GiB", "4GiB", "tiny"],
)
def test_budget_leaves_room_for_the_rest_of_the_process(
    limit: int | None, budget: int | None
) -> None:
    assert budget_for(limit) == budget


def test_an_image_larger_than_the_whole_budget_fails_at_once() -> None:
    budget = MemoryBudget(100 * MIB)

    with pytest.raises(ImageFailure) as caught, budget.reserve(300 * MIB):
        pass

    assert (caught.value.stage, caught.value.reason) == (Stage.DECODE, Reason.TOO_LARGE_FOR_MEMORY)
    assert "300 MiB" in caught.value.message and "100 MiB" in caught.value.message
    assert caught.value.error.startswith("too-large-for-memory: ")
    assert budget.used == 0


def test_unlimited_budget_only_counts() -> None:
    budget = MemoryBudget(None)

    with budget.reserve(10 * GIB), budget.reserve(10 * GIB):
        assert budget.used == 20 * GIB

    assert (budget.used, budget.peak, budget.waited) == (0, 20 * GIB, 0)


def test_images_wait_for_memory_in_arrival_order() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []
    release_first = threading.Event()

    def hold(name: str, size: int, until: threading.Event | None = None) -> None:
        with budget.reserve(size):
            order.append(name)
            if until is not None:
                until.wait(30)

    first = threading.Thread(target=hold, args=("first", 60, release_first))
    first.start()
    assert wait_until(lambda: budget.used == 60)
    large = threading.Thread(target=hold, args=("large", 60))
    large.start()
    assert wait_until(lambda: len(budget._queue) == 1)  # the large image waits
    small = threading.Thread(target=hold, args=("small", 10))
    small.start()
    # The small one would fit now, but it came after the large one: it waits too.
    assert wait_until(lambda: len(budget._queue) == 2)
    assert order == ["first"]

    release_first.set()
    for thread in (first, large, small):
        thread.join(30)

    assert order == ["first", "large", "small"]
    assert (budget.used, budget.waited) == (0, 2)


# -- estimates ------------------------------------------------------------------


def test_estimate_grows_with_what_the_path_allocates() -> None:
    def estimate(**kwargs: object) -> int:
        values: dict[str, object] = {"source_format": "png", "target": "jpeg"}
        values.update(kwargs)
        return memory_estimate(4000, 3000, str(values.pop("mode", "RGB")), **values)  # type: ignore[arg-type]

    rgb = estimate()
    assert estimate(mode="L") < rgb < estimate(mode="RGBA") < estimate(mode="RGBA", target="webp")
    assert estimate(mode="P") < estimate(mode="P", colour_key=True)
    assert estimate(mode="I;16") < estimate(mode="I;16", colour_key=True)
    assert estimate(output_size=(1000, 750)) < rgb < estimate(rotated=True)
    assert rgb < estimate(source_format="jpeg", progressive=True)
    # A colour key that the target keeps as it is costs nothing extra.
    assert estimate(mode="P", target="png") == estimate(mode="P", target="png", colour_key=True)


def test_estimate_reads_the_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A PNG that claims 4000x3000 but holds almost no pixel data: decoding it would fail,
    # as would a header check that decoded (Pillow's getexif loads a whole PNG).
    width, height = 4000, 3000
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 16)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4)
        + idat
        + struct.pack(">I", zlib.crc32(idat))
    )

    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy(image: ImageFile.ImageFile) -> object:
        loads.append(image)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)

    estimate = header_estimate(png, CompressParams())

    assert loads == []
    assert estimate == memory_estimate(width, height, "RGBA", source_format="png", target="jpeg")


# Each conversion path, compressed once in a process of its own (tests.bench.memory_probe):
# the process's peak resident memory above its start must stay under the estimate.
SIZE = 1500


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _rgba() -> Image.Image:
    image = photo(SIZE, SIZE, seed=3).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((SIZE, SIZE)))
    return image


def _keyed_palette() -> bytes:
    palette = photo(SIZE, SIZE, seed=4).convert("P", palette=Image.Palette.ADAPTIVE)
    return _save(palette, "PNG", transparency=0)


def _sixteen_bit_keyed() -> bytes:
    wide = photo(SIZE, SIZE, seed=5).convert("L").convert("I").point(lambda v: v * 257)
    return _save(wide.convert("I;16"), "PNG", transparency=0)


PATHS: dict[str, tuple[Callable[[], bytes], str]] = {
    "jpeg-to-jpeg": (lambda: _save(photo(SIZE, SIZE, seed=1), "JPEG", quality=90), "jpeg"),
    "jpeg-to-webp": (lambda: _save(photo(SIZE, SIZE, seed=1), "JPEG", quality=90), "webp"),
    "cmyk-jpeg-to-jpeg": (lambda: _save(photo(SIZE, SIZE).convert("CMYK"), "JPEG"), "jpeg"),
    "rgba-png-to-jpeg": (lambda: _save(_rgba(), "PNG", compress_level=1), "jpeg"),
    "rgba-png-to-webp": (lambda: _save(_rgba(), "PNG", compress_level=1), "webp"),
    "keyed-palette-png-to-jpeg": (_keyed_palette, "jpeg"),
    "keyed-16-bit-png-to-jpeg": (_sixteen_bit_keyed, "jpeg"),
    "keyed-rgb-png-to-webp": (
        lambda: _save(photo(SIZE, SIZE, seed=6), "PNG", transparency=(0, 0, 0)),
        "webp",
    ),
    "rgba-webp-to-jpeg": (lambda: _save(_rgba(), "WEBP", quality=80), "jpeg"),
}


@pytest.mark.parametrize(("make", "target"), PATHS.values(), ids=PATHS.keys())
def test_estimate_covers_the_measured_peak(
    tmp_path: Path, make: Callable[[], bytes], target: str
) -> None:
    source = tmp_path / "image"
    source.write_bytes(make())
    # A small image of the same kind, compressed first, loads the codecs.
    warm = Image.open(source)
    warm.load()
    options = {str(name): value for name, value in warm.info.items()}
    warm.crop((0, 0, 32, 32)).save(source.with_suffix(".warm"), warm.format, **options)

    finished = subprocess.run(
        [sys.executable, "-m", "tests.bench.memory_probe", str(source), target],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(finished.stdout)

    assert measured["peak"] > SIZE * SIZE  # the probe saw the image being decoded
    assert measured["peak"] <= measured["estimate"]
