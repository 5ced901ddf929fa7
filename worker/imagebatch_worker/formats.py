"""What the worker can be asked to produce, and how: without loading any codec.

The runner checks a manifest's compression settings and refuses an impossible target
before it downloads anything; none of that needs Pillow, so this module imports
nothing of it, and the worker reaches its first download before Pillow is loaded
(``compress`` imports it on the compression threads). Whether this Pillow build can
encode AVIF is found out only when a run asks for AVIF.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from imagebatch_common.contract import FORMAT_EXTENSIONS, Compression, Stage
from imagebatch_common.failures import ImageFailure, Reason

TARGET_FORMATS = ("jpeg", "webp", "avif", "original")

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "avif": "image/avif",
}


@functools.cache
def avif_available() -> bool:
    """Whether this Pillow build has an AVIF codec (loads it: tens of milliseconds)."""
    from PIL import features

    return features.check("avif") is True


@dataclass(frozen=True)
class CompressParams:
    """How to compress: the run's ``Compression`` plus the worker's pixel cap."""

    quality: int = 50  # 1-100, the encoder's quality scale
    format: str = "jpeg"  # jpeg | webp | avif | original
    max_dimension: int | None = None  # longest side in pixels; never upscales
    max_pixels: int = 50_000_000  # width * height above which decoding is refused

    @classmethod
    def from_compression(cls, compression: Compression, max_pixels: int) -> CompressParams:
        return cls(
            quality=compression.quality,
            format=compression.format,
            max_dimension=compression.max_dimension,
            max_pixels=max_pixels,
        )


@dataclass(frozen=True)
class CompressedImage:
    """The encoded image and what it is."""

    data: bytes
    format: str  # output format: jpeg, webp, avif, png, gif, bmp, tiff
    width: int
    height: int
    source_format: str  # the sniffed input format
    source_width: int
    source_height: int
    kept_original: bool = False  # re-encoding was larger: ``data`` is the input

    @property
    def extension(self) -> str:
        return FORMAT_EXTENSIONS[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def target_format_problem(target: str) -> ImageFailure | None:
    """Why images cannot be encoded to ``target`` at all, or ``None`` if they can.

    The runner asks before downloading anything: no point fetching a shard's images
    for an encoder this build lacks.
    """
    if target not in TARGET_FORMATS:
        return ImageFailure(
            Stage.ENCODE, Reason.FORMAT_UNAVAILABLE, f"unknown output format {target!r}"
        )
    if target == "avif" and not avif_available():
        return ImageFailure(
            Stage.ENCODE,
            Reason.FORMAT_UNAVAILABLE,
            "AVIF output is not available: this Pillow build has no AVIF encoder",
        )
    return None
