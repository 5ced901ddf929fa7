"""Re-encode one image: bytes in, smaller bytes out, no network and no storage.

``compress(data, params)`` is the whole codec path of the worker:

1. sniff the real format from the bytes (an explicit allow-list of Pillow plugins;
   Content-Type and file extensions are never consulted);
2. refuse decompression bombs from the header, before any pixel is decoded;
3. estimate from the header the memory the image will take (``memory_estimate``) and
   hold that much of the worker's memory budget until it is encoded (``reserve``);
4. decode, shrinking JPEGs already in the decoder (``draft``) when a max dimension
   asks for a much smaller image;
5. apply the EXIF orientation, convert an embedded ICC profile to sRGB, take the first
   frame of an animation, bring the colour mode to one the target format can hold:
   transparency of every kind (an alpha band, a palette's alpha, a PNG ``tRNS`` colour
   in a 1-bit, 2/4/8-bit grey, 16-bit grey or RGB image) becomes an alpha band for WebP
   and AVIF and is composited onto white for JPEG; 16-bit is scaled to 8-bit;
6. downscale to the longest-side limit (never up), drop all metadata, encode;
7. keep the source bytes when re-encoding to the same format made the file larger.

Failures raise ``ImageFailure`` with stage ``decode`` or ``encode`` and a reason.

Encoders write into an anonymous in-memory file (``memfd``) rather than ``io.BytesIO``:
Pillow releases the GIL while it encodes to a real file descriptor but holds it while
encoding to a Python buffer, and the worker compresses on several threads at once.
Every conversion lets go of its input once its output exists, and transparency is
composited by pasting with the image's own alpha band (no copy of the image or of the
band): a 7000x7000 RGBA PNG to JPEG peaked at 637 MB of pixels before, 392 MB now.

Importing this module loads Pillow and registers only the allowed plugins (~30 ms);
the worker imports it on its compression threads, after its first download started.
"""

from __future__ import annotations

import functools
import io
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import IO, Any, cast

from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from imagebatch_common.contract import Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_worker.formats import (
    CONTENT_TYPES,
    TARGET_FORMATS,
    CompressedImage,
    CompressParams,
    avif_available,
    target_format_problem,
)

__all__ = [
    "CONTENT_TYPES",
    "SOURCE_FORMATS",
    "TARGET_FORMATS",
    "CompressParams",
    "CompressedImage",
    "Reserve",
    "compress",
    "encoder_options",
    "header_estimate",
    "memory_estimate",
    "target_format_problem",
]

# Importing the allowed plugins registers them, so Image.open never falls back to
# importing all forty of Pillow's (which it does when a listed format is unknown).
_PLUGINS = (
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

# Holds ``bytes`` of the worker's memory budget for as long as the context is open.
Reserve = Callable[[int], AbstractContextManager[object]]


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

refuse_decompression_bomb_warnings()

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
# product catalogue should carry. AVIF joins when the build has it and the bytes are
# an ISO media file: loading its codec costs ~20 ms, paid only by a worker that meets one.
SOURCE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


@functools.cache
def _avif_plugin_loaded() -> bool:
    if not avif_available():
        return False
    from PIL import AvifImagePlugin  # importing it registers the AVIF opener

    return AvifImagePlugin is not None


def source_formats(data: bytes) -> tuple[str, ...]:
    """The plugins allowed to open ``data``: the list above, plus AVIF for ISO media."""
    if data[4:8] == b"ftyp" and _avif_plugin_loaded():
        return (*SOURCE_FORMATS, "AVIF")
    return SOURCE_FORMATS


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
# Targets without a colour key of their own: a tRNS colour must become an alpha band.
_ALPHA_BAND_TARGETS = frozenset({"jpeg", "webp", "avif"})
_WHITE = 255

# lcms colour space of a profile -> the image modes it can describe.
_PROFILE_MODES = {"RGB ": ("RGB", "RGBA"), "CMYK": ("CMYK",)}


# -- memory -------------------------------------------------------------------

# Bytes Pillow stores per pixel: one for 1-bit, grey and palette, two for 16-bit grey,
# four for everything else (RGB keeps a padding byte).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_FULL = 4.0  # an RGB, RGBA, LA, CMYK or 32-bit image
# Bytes per pixel a decoder holds beside the image it fills: libwebp decodes into a
# canvas of its own before Pillow copies it, libavif into YUV planes, libtiff a strip
# set; a progressive JPEG keeps all its DCT coefficients while it decodes.
_DECODER_EXTRA = {"jpeg-progressive": 6.0, "webp": 8.0, "avif": 8.0, "tiff": 4.0}
# Bytes per output pixel an encoder holds beside the pixels it reads: libjpeg's Huffman
# optimisation keeps every DCT coefficient (2 bytes each, 1.5 a pixel at 4:2:0, one
# for grey); libwebp YUV planes and its analysis buffers, much more when it compresses
# an alpha plane; libavif several frames of the AV1 encoder; PNG, GIF, BMP and TIFF
# only rows and zlib state.
_ENCODER_EXTRA = {
    "jpeg": 3.0,
    "jpeg-grey": 2.0,
    "webp": 8.0,
    "webp-alpha": 19.0,
    "avif": 27.0,
    "avif-alpha": 27.0,
}
# The estimate adds up every buffer the path allocates, as if none were reused: freed
# pixel blocks often stay in a thread's heap until the image is done (the worker keeps
# buffers up to 32 MiB in the heap for speed, ``compressors.reuse_image_memory``). The
# extras above and this factor come from measured peaks of every conversion path
# (tests/unit/test_worker_memory.py checks each stays under its estimate).
_SAFETY = 1.15
_FIXED = 8 * 1024 * 1024


def memory_estimate(
    width: int,
    height: int,
    mode: str,
    *,
    source_format: str,
    target: str,
    colour_key: bool = False,
    progressive: bool = False,
    icc_profile: bool = False,
    rotated: bool = False,
    output_size: tuple[int, int] | None = None,
) -> int:
    """Bytes the compression of one image holds at its peak, from its header alone.

    ``width`` x ``height`` and ``mode`` are what the decoder will produce (after a JPEG
    draft); ``colour_key`` is a PNG ``tRNS`` colour or palette transparency; ``target``
    is the output format. The terms follow the steps ``compress`` takes: the decoded
    image and the decoder's own buffers, each conversion's output, the resize, and
    the encoder's buffers for the final pixels.
    """
    pixels = width * height
    stored = float(_STORED_BYTES.get(mode, 4))
    decoder = "jpeg-progressive" if source_format == "jpeg" and progressive else source_format
    total = stored + _DECODER_EXTRA.get(decoder, 0.0)
    if rotated:
        total += stored  # transposing copies
    if icc_profile and mode in ("RGB", "RGBA", "CMYK"):
        total += _FULL
    high_bit = mode in _HIGH_BIT_MODES
    grey = mode in ("1", "L", "LA", "La") or high_bit
    keyed = colour_key and target in _ALPHA_BAND_TARGETS
    alpha = keyed or mode in _ALPHA_MODES
    if high_bit:
        total += _FULL + 1.0  # widened to 32 bits, then 8-bit grey
    elif mode == "1" and (keyed or target in ("jpeg", "webp", "avif", "gif")):
        total += 1.0  # 8-bit grey
    if keyed and mode != "P":
        total += _FULL + (1.0 if grey else 0.0)  # LA from grey and a mask; RGBA from RGB
    elif mode == "P" and target in ("jpeg", "webp", "avif"):
        total += _FULL  # RGB or RGBA
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "PA") and target != "tiff":
        total += _FULL
    if target == "jpeg" and alpha:
        total += 2.0 if grey else _FULL  # the white background (and a grey copy of LA)
    elif target in ("webp", "avif") and (grey or alpha):
        total += _FULL  # RGB or RGBA for the encoder
    scale = 1.0
    if output_size is not None and output_size[0] * output_size[1] < pixels:
        scale = output_size[0] * output_size[1] / pixels
        # The output, and the intermediate of a two-pass resample (new width, old height).
        total += _FULL * scale + _FULL * math.sqrt(scale)
    if target == "jpeg":
        encoder = _ENCODER_EXTRA["jpeg-grey" if grey and not alpha else "jpeg"]
    else:
        encoder = _ENCODER_EXTRA.get(f"{target}-alpha" if alpha else target, 1.0)
    total += encoder * scale
    return int(pixels * total * _SAFETY) + _FIXED


def _no_reserve(_bytes: int) -> AbstractContextManager[object]:
    return nullcontext()


# -- the whole path ---------------------------------------------------------------


def compress(
    data: bytes, params: CompressParams, reserve: Reserve | None = None
) -> CompressedImage:
    """Decode ``data``, apply ``params`` and encode; raise ``ImageFailure`` on failure.

    ``reserve(bytes)``, when given, is entered with the image's memory estimate before
    any pixel is decoded and left once it is encoded; it may wait for memory or raise
    ``ImageFailure`` for an image too large for the budget.
    """
    problem = target_format_problem(params.format)
    if problem is not None:
        raise problem
    refuse_decompression_bomb_warnings()
    image, rawmode = _open(data, params.max_pixels)
    source_format = _FORMAT_NAMES[image.format or ""]
    source_size = image.size
    target = source_format if params.format == "original" else params.format

    _draft(image, source_format, params.max_dimension)
    estimate = _estimate(image, source_format, target, params.max_dimension)
    with (reserve or _no_reserve)(estimate):
        # Hand the decoder all the bytes in one call: Pillow releases the GIL per call,
        # so one call instead of one per 64 KiB block lets other threads run meanwhile.
        image.decodermaxblock = max(image.decodermaxblock, len(data))
        _load(image)
        mode = image.mode
        try:
            converted = _prepare(image, target, rawmode, params.max_dimension)
        except Exception as error:
            raise ImageFailure(
                Stage.ENCODE,
                Reason.ENCODE_FAILED,
                f"cannot prepare a {mode} image for {target}: {_error_text(error)}",
            ) from error
        del image  # the decoded pixels go before the encoder allocates its buffers
        size = converted.size
        encoded = _encode(converted, target, params.quality)
        del converted  # and these before the memory is handed to the next image
    # Fewer pixels than the source (turning keeps the count): a JPEG draft or a resize
    # made it smaller, so a larger file is no reason to keep the source.
    downscaled = size[0] * size[1] < source_size[0] * source_size[1]

    if target == source_format and not downscaled and len(encoded) > len(data):
        # Same format, same pixels and still larger: the source was already tighter.
        # Its metadata stays with it; viewers apply its EXIF orientation themselves.
        return CompressedImage(data, target, *size, source_format, *source_size, kept_original=True)
    return CompressedImage(encoded, target, *size, source_format, *source_size)


def header_estimate(data: bytes, params: CompressParams) -> int:
    """``memory_estimate`` for ``data`` from its header alone; 0 if the header is unreadable.

    For a caller that must reserve memory before handing the image to another process;
    an unreadable header costs nothing to decode, and the compression reports why.
    """
    try:
        image, _rawmode = _open(data, params.max_pixels)
    except ImageFailure:
        return 0
    source_format = _FORMAT_NAMES[image.format or ""]
    target = source_format if params.format == "original" else params.format
    _draft(image, source_format, params.max_dimension)
    return _estimate(image, source_format, target, params.max_dimension)


def _draft(image: ImageFile.ImageFile, source_format: str, max_dimension: int | None) -> None:
    if max_dimension and source_format == "jpeg":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the output is that much
        # smaller: less work than decoding everything and resizing it away.
        width, height = image.size
        scale = max_dimension / max(width, height)
        if scale < 1:
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _estimate(
    image: ImageFile.ImageFile, source_format: str, target: str, max_dimension: int | None
) -> int:
    width, height = image.size
    output = None
    if max_dimension and max(width, height) > max_dimension:
        scale = max_dimension / max(width, height)
        output = (max(1, round(width * scale)), max(1, round(height * scale)))
    return memory_estimate(
        width,
        height,
        image.mode,
        source_format=source_format,
        target=target,
        colour_key="transparency" in image.info,
        progressive=bool(image.info.get("progressive") or image.info.get("progression")),
        icc_profile=bool(image.info.get("icc_profile")),
        rotated=_header_orientation(image) in range(2, 9),
        output_size=output,
    )


def _header_orientation(image: ImageFile.ImageFile) -> int:
    """The EXIF orientation if the header already carried it, without decoding.

    Pillow's ``getexif`` decodes a whole PNG to look for an eXIf chunk after the pixels;
    here only EXIF read with the header counts (JPEG APP1, WebP, a PNG eXIf before
    IDAT). A PNG whose eXIf follows its pixels is turned after decoding without having
    reserved the copy: writers put eXIf first, and the estimate's margin covers it.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return _orientation(image)


def _prepare(
    image: Image.Image, target: str, rawmode: str, max_dimension: int | None
) -> Image.Image:
    """Orientation, colour and size for ``target``; each step releases its input."""
    image = _orient(image)
    image = _to_srgb(image)
    image = _to_target_mode(image, target, rawmode)
    return _downscale(image, max_dimension)


# -- decode -------------------------------------------------------------------


def _open(data: bytes, max_pixels: int) -> tuple[ImageFile.ImageFile, str]:
    """Open the header; return the image and the decoder's raw mode (the bit depth)."""
    formats = source_formats(data)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageFailure(Stage.DECODE, Reason.DECOMPRESSION_BOMB, str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageFailure(
            Stage.DECODE,
            Reason.NOT_AN_IMAGE,
            f"not a {', '.join(formats)} image ({_describe_start(data)})",
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
    rawmode = ""
    if image.tile and len(image.tile[0]) > 3 and image.tile[0][3]:
        args = image.tile[0][3]
        rawmode = str(args[0] if isinstance(args, tuple) else args)
    return image, rawmode


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


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # broken EXIF: viewers ignore it too, and so do we
        return 1


def _orient(image: Image.Image) -> Image.Image:
    """Turn the pixels the way the EXIF orientation says, so dropping EXIF loses nothing."""
    if _orientation(image) not in range(2, 9):
        return image
    transposed = ImageOps.exif_transpose(image)
    return transposed if transposed is not None else image


@functools.cache
def _srgb_profile() -> Any:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB.

    Web browsers assume sRGB for an image without a profile, so once the profile is
    stripped the pixels must already be sRGB. Grey images keep their grey channel:
    a grey profile's tone curve differs too little to justify tripling the channels.
    A profile that cannot be used is ignored, as browsers ignore it. The colour
    engine is loaded by the first image that carries a profile (~15 ms).
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if image.mode not in _PROFILE_MODES.get(source.profile.xcolor_space, ()):
            return image
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(
            image, source, _srgb_profile(), outputMode=output_mode
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    return converted if converted is not None else image


def _to_eight_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit ``L`` by scaling, not by clipping at 255."""
    if image.mode.startswith("I;16"):
        # The format's full range, so a dark image stays dark; one lookup from the
        # 32-bit widening Pillow needs to read 16-bit values.
        return image.convert("I").point(_SIXTEEN_TO_EIGHT, "L")
    low, high = cast(tuple[float, float], image.getextrema())
    low = min(low, 0.0)
    high = max(high, low + 255.0)  # 8-bit data held in a wide mode is left as it is
    scale = 255.0 / (high - low)
    return image.point(lambda value: (value - low) * scale).convert("L")


_SIXTEEN_TO_EIGHT = [round(value * 255 / 65535) for value in range(65536)]


def colour_key(image: Image.Image, rawmode: str) -> int | tuple[int, int, int] | None:
    """The pixel value a non-palette image's ``tRNS`` chunk makes transparent, or ``None``.

    In the scale of the decoded pixels, which is not always the file's: Pillow widens
    2- and 4-bit grey to 8 bits (x85, x17) but leaves the key as written, and reads
    16-bit RGB as 8-bit (the high bytes) while the key stays 16-bit. 1-bit keys Pillow
    already maps to 0/255, and 16-bit grey stays 16-bit on both sides.
    """
    key = image.info.get("transparency")
    if image.mode == "P" or key is None or isinstance(key, bytes):
        return None
    if isinstance(key, tuple):
        if image.mode != "RGB" or len(key) != 3:
            return None
        if rawmode.startswith("RGB;16"):
            return (key[0] >> 8, key[1] >> 8, key[2] >> 8)
        return (int(key[0]), int(key[1]), int(key[2]))
    if not isinstance(key, int) or image.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
        return None
    widen = {"L;1": 255, "L;2": 85, "L;4": 17}.get(rawmode, 1)
    return key * widen


def _with_alpha_band(image: Image.Image, rawmode: str) -> Image.Image:
    """``image`` with its transparency (a tRNS colour or palette alpha) as an alpha band.

    Returns LA for grey sources and RGBA otherwise. Pixels equal to the colour key
    become fully transparent, all others opaque.
    """
    if image.mode == "P":
        return image.convert("RGBA")  # Pillow applies a palette's tRNS alpha values
    key = colour_key(image, rawmode)
    if key is None:
        return image
    if isinstance(key, tuple):
        image.info["transparency"] = key  # the key in the scale of the decoded pixels
        return image.convert("RGBA")  # Pillow's colour-key conversion
    if image.mode.startswith("I;16"):
        wide = image.convert("I")  # Pillow reads 16-bit values through 32 bits
        mask = wide.point([0 if value == key else 255 for value in range(65536)], "L")
        grey = wide.point(_SIXTEEN_TO_EIGHT, "L")
        del wide
    elif image.mode in _HIGH_BIT_MODES:
        mask = image.point([0 if value == key else 255 for value in range(65536)], "L")
        grey = _to_eight_bit_grey(image)
    else:
        grey = image.convert("L") if image.mode != "L" else image
        mask = grey.point([0 if value == key else 255 for value in range(256)])
    return Image.merge("LA", (grey, mask))


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite ``image`` (LA or RGBA) onto white: JPEG has no alpha channel.

    Pasting with the image itself as the mask uses its alpha band where it lies: no
    RGBA copy and no separate alpha band is made (measured: 8 bytes a pixel at the
    peak instead of 13).
    """
    if image.mode in ("La", "RGBa", "PA"):
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode == "LA":
        background = Image.new("L", image.size, _WHITE)
        background.paste(image.convert("L"), mask=image)
    else:
        background = Image.new("RGB", image.size, (_WHITE,) * 3)
        background.paste(image, mask=image)
    return background


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _to_target_mode(image: Image.Image, target: str, rawmode: str = "") -> Image.Image:
    """Bring ``image`` to a colour mode ``target`` stores correctly."""
    if target in _ALPHA_BAND_TARGETS and "transparency" in image.info:
        image = _with_alpha_band(image, rawmode)
        image.info.pop("transparency", None)
    elif (key := colour_key(image, rawmode)) is not None:
        image.info["transparency"] = key  # kept by PNG, now in the scale of the pixels
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
        if target == "jpeg":
            return _flatten_on_white(image)
        return image.convert("RGBA")  # gif: Pillow maps RGBA to a palette with transparency
    # P, CMYK, YCbCr, LAB, HSV, L for webp/avif ... all have an RGB reading.
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
