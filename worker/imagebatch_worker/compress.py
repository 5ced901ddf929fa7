"""Re-encode one image: bytes in, smaller bytes out, no network and no storage.

``compress(data, params)`` is the whole codec path of the worker:

1. sniff the real format from the bytes (an explicit allow-list of Pillow plugins;
   Content-Type and file extensions are never consulted);
2. refuse decompression bombs from the header, before any pixel is decoded;
3. decode, shrinking JPEGs already in the decoder (``draft``) when a max dimension
   asks for a much smaller image;
4. apply the EXIF orientation, convert an embedded ICC profile to sRGB, take the first
   frame of an animation, bring the colour mode to one the target format can hold
   (transparency is composited onto white for JPEG, 16-bit is scaled to 8-bit);
5. downscale to the longest-side limit (never up), drop all metadata, encode;
6. keep the source bytes when re-encoding to the same format made the file larger.

Failures raise ``ImageFailure`` with stage ``decode`` or ``encode`` and a reason.

Encoders write into an anonymous in-memory file (``memfd``) rather than ``io.BytesIO``:
Pillow releases the GIL while it encodes to a real file descriptor but holds it while
encoding to a Python buffer, and the worker compresses on several threads at once.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, cast

from PIL import (
    ExifTags,
    Image,
    ImageCms,
    ImageFile,
    ImageOps,
    UnidentifiedImageError,
    features,
)

from imagebatch_common.contract import FORMAT_EXTENSIONS, Compression, Stage
from imagebatch_common.failures import ImageFailure, Reason


def refuse_decompression_bomb_warnings() -> None:
    """Make Pillow's ``DecompressionBombWarning`` an exception; idempotent and cheap.

    Pillow only warns between MAX_IMAGE_PIXELS and twice that, and a warning lets the
    image through. The worker checks its own pixel cap before decoding as well, but a
    bomb warning Pillow still raises must stop the image, not scroll by. Checked on
    every call because anything that resets the warning filters (a test harness, an
    embedding program) would otherwise silently undo it.
    """
    for action, _message, category, _module, _line in warnings.filters:
        if issubclass(Image.DecompressionBombWarning, category):
            if action == "error":
                return
            break
    warnings.simplefilter("error", Image.DecompressionBombWarning)


refuse_decompression_bomb_warnings()

AVIF_AVAILABLE = features.check("avif") is True

# Pillow plugin name -> the worker's format name. MPO is how Pillow names a JPEG that
# carries extra pictures (many cameras write them); it is a JPEG for every purpose here.
_FORMAT_NAMES = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "AVIF": "avif",
}
# Formats sniffed from input bytes. Everything else Pillow can read (PSD, EPS, ICO,
# PCX, ...) is refused: each plugin is attack surface, and none is an image a
# product catalogue should carry.
SOURCE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF") + (
    ("AVIF",) if AVIF_AVAILABLE else ()
)
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

# Colour modes each output format stores as they are; anything else is converted.
_NATIVE_MODES = {
    "jpeg": ("L", "RGB"),
    "webp": ("RGB", "RGBA"),
    "avif": ("RGB", "RGBA"),
    "png": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "gif": ("L", "P"),
    "bmp": ("1", "L", "P", "RGB", "RGBA"),
    "tiff": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"),
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_RESIZABLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"})
_WHITE = 255

_SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# lcms colour space of a profile -> the image modes it can describe.
_PROFILE_MODES = {"RGB ": ("RGB", "RGBA"), "CMYK": ("CMYK",)}


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
    if target == "avif" and not AVIF_AVAILABLE:
        return ImageFailure(
            Stage.ENCODE,
            Reason.FORMAT_UNAVAILABLE,
            "AVIF output is not available: this Pillow build has no AVIF encoder",
        )
    return None


def compress(data: bytes, params: CompressParams) -> CompressedImage:
    """Decode ``data``, apply ``params`` and encode; raise ``ImageFailure`` on failure."""
    problem = target_format_problem(params.format)
    if problem is not None:
        raise problem
    refuse_decompression_bomb_warnings()
    image = _open(data, params.max_pixels)
    source_format = _FORMAT_NAMES[image.format or ""]
    source_size = image.size
    target = source_format if params.format == "original" else params.format

    if params.max_dimension and source_format == "jpeg":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the output is that much
        # smaller: less work than decoding everything and resizing it away.
        scale = params.max_dimension / max(source_size)
        if scale < 1:
            wanted = (math.ceil(source_size[0] * scale), math.ceil(source_size[1] * scale))
            image.draft(image.mode, wanted)
    # Hand the decoder all the bytes in one call: Pillow releases the GIL per call, so
    # one call instead of one per 64 KiB block lets other threads' Python run meanwhile.
    image.decodermaxblock = max(image.decodermaxblock, len(data))
    _load(image)

    try:
        converted = _orient(image)
        converted = _to_srgb(converted)
        converted = _to_target_mode(converted, target)
        downscaled = bool(params.max_dimension) and max(converted.size) > (
            params.max_dimension or 0
        )
        converted = _downscale(converted, params.max_dimension)
    except Exception as error:
        raise ImageFailure(
            Stage.ENCODE,
            Reason.ENCODE_FAILED,
            f"cannot prepare a {image.mode} image for {target}: {_error_text(error)}",
        ) from error
    encoded = _encode(converted, target, params.quality)

    if target == source_format and not downscaled and len(encoded) > len(data):
        # Same format, same pixels and still larger: the source was already tighter.
        # Its metadata stays with it; viewers apply its EXIF orientation themselves.
        return CompressedImage(
            data, target, *converted.size, source_format, *source_size, kept_original=True
        )
    return CompressedImage(encoded, target, *converted.size, source_format, *source_size)


# -- decode -------------------------------------------------------------------


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    try:
        image = Image.open(io.BytesIO(data), formats=SOURCE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageFailure(Stage.DECODE, Reason.DECOMPRESSION_BOMB, str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageFailure(
            Stage.DECODE,
            Reason.NOT_AN_IMAGE,
            f"not a {', '.join(SOURCE_FORMATS)} image ({_describe_start(data)})",
        ) from error
    except Exception as error:
        # Pillow's parsers raise many types (SyntaxError, struct.error, ...) on
        # malformed headers; to the product they all mean "corrupt".
        raise ImageFailure(
            Stage.DECODE, Reason.CORRUPT, f"unreadable image header: {_error_text(error)}"
        ) from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageFailure(
            Stage.DECODE,
            Reason.DECOMPRESSION_BOMB,
            f"{width}x{height} is {width * height} pixels, over the {max_pixels}-pixel limit",
        )
    if width <= 0 or height <= 0:
        raise ImageFailure(Stage.DECODE, Reason.CORRUPT, f"image has no pixels ({width}x{height})")
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()  # the first frame only, which is all the worker keeps
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageFailure(Stage.DECODE, Reason.DECOMPRESSION_BOMB, str(error)) from error
    except Exception as error:
        raise ImageFailure(
            Stage.DECODE, Reason.CORRUPT, f"image data is broken: {_error_text(error)}"
        ) from error


def _describe_start(data: bytes) -> str:
    if not data:
        return "the body is empty"
    head = data[:16]
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head):
        return "the body starts with text"
    return f"the body starts with bytes {head[:8].hex()}"


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- pixels -------------------------------------------------------------------


def _orient(image: Image.Image) -> Image.Image:
    """Turn the pixels the way the EXIF orientation says, so dropping EXIF loses nothing."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # broken EXIF: viewers ignore it too, and so do we
        return image
    if orientation not in range(2, 9):
        return image
    transposed = ImageOps.exif_transpose(image)
    return transposed if transposed is not None else image


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB.

    Web browsers assume sRGB for an image without a profile, so once the profile is
    stripped the pixels must already be sRGB. Grey images keep their grey channel:
    a grey profile's tone curve differs too little to justify tripling the channels.
    A profile that cannot be used is ignored, as browsers ignore it.
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if image.mode not in _PROFILE_MODES.get(source.profile.xcolor_space, ()):
            return image
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, _SRGB_PROFILE, outputMode=output_mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    return converted if converted is not None else image


def _to_eight_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit ``L`` by scaling, not by clipping at 255."""
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0  # the format's full range: a dark image stays dark
        image = image.convert("I")
    else:
        low, high = cast(tuple[float, float], image.getextrema())
        low = min(low, 0.0)
        high = max(high, low + 255.0)  # 8-bit data held in a wide mode is left as it is
    scale = 255.0 / (high - low)
    return image.point(lambda value: (value - low) * scale).convert("L")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white: JPEG has no alpha channel."""
    grey = image.mode in ("LA", "La")
    with_alpha = image.convert("LA" if grey else "RGBA")
    background = Image.new("L" if grey else "RGB", image.size, _WHITE if grey else (255,) * 3)
    background.paste(with_alpha, mask=with_alpha.getchannel("A"))
    return background


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _to_target_mode(image: Image.Image, target: str) -> Image.Image:
    """Bring ``image`` to a colour mode ``target`` stores correctly."""
    native = _NATIVE_MODES[target]
    if image.mode in native and not (target == "jpeg" and _has_alpha(image)):
        return image
    if image.mode in _HIGH_BIT_MODES:
        image = _to_eight_bit_grey(image)
        return image if image.mode in native else image.convert("RGB")
    if image.mode == "1":
        image = image.convert("L")
        return image if image.mode in native else image.convert("RGB")
    if _has_alpha(image):
        if "RGBA" in native:
            return image.convert("RGBA")
        if target == "jpeg":
            return _flatten_on_white(image)
        return image.convert("RGBA")  # gif: Pillow maps RGBA to a palette with transparency
    if image.mode == "L" and "RGB" in native:
        return image.convert("RGB")
    # P, CMYK, YCbCr, LAB, HSV, LA without alpha use... all have an RGB reading.
    return image.convert("RGB")


def _downscale(image: Image.Image, max_dimension: int | None) -> Image.Image:
    if not max_dimension or max(image.size) <= max_dimension:
        return image
    scale = max_dimension / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if image.mode in _HIGH_BIT_MODES:
        image = _to_eight_bit_grey(image)
    elif image.mode not in _RESIZABLE_MODES:
        # Palette and 1-bit images only resize by nearest neighbour; resample in colour.
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# -- encode -------------------------------------------------------------------


def encoder_options(target: str, quality: int) -> dict[str, Any]:
    """Pillow save options for ``target``; the benchmark uses them for its codec ceiling."""
    if target == "jpeg":
        return {"quality": quality, "optimize": True}
    if target in ("webp", "avif"):
        return {"quality": quality}
    if target == "png":
        return {"optimize": True}
    if target == "tiff":
        return {"compression": "tiff_adobe_deflate"}
    return {}


@contextmanager
def _memory_file() -> Iterator[IO[bytes]]:
    """A file backed by memory, with a real file descriptor Pillow can encode into."""
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("imagebatch-encode", os.MFD_CLOEXEC)
        with open(descriptor, "w+b") as memory:
            yield memory
    else:  # not Linux: a temporary file is the next best real descriptor
        with tempfile.TemporaryFile() as temporary:
            yield temporary


def _encode(image: Image.Image, target: str, quality: int) -> bytes:
    # Metadata goes: EXIF (already applied), ICC (already applied), XMP, comments, DPI,
    # text chunks. Only a palette's transparent index is pixel data worth keeping.
    keep: dict[str | tuple[int, int], Any] = (
        {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    )
    if target == "tiff" and type(image) is not Image.Image:
        # Still the decoder's object: the TIFF encoder copies tags (resolution, XMP,
        # IPTC) from a source TIFF file object itself, so hand it a plain image.
        image = image.copy()
    image.info = keep
    try:
        with _memory_file() as memory:
            image.save(memory, format=target.upper(), **encoder_options(target, quality))
            memory.flush()
            size = os.fstat(memory.fileno()).st_size
            return os.pread(memory.fileno(), size, 0)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ImageFailure(
            Stage.ENCODE, Reason.ENCODE_FAILED, f"{target} encoder failed: {_error_text(error)}"
        ) from error
