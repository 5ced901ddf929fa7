"""compress(): the codec path, over generated images of every kind the worker meets.

Each case builds its input in memory, runs ``compress`` and decodes the output again
to check what a viewer would see: format, size, orientation, colour mode, colours, and
that no metadata survived.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import pytest
from PIL import ExifTags, Image, ImageCms

from imagebatch_common.contract import Compression, Stage
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_worker import formats
from imagebatch_worker.compress import CompressedImage, CompressParams, compress
from tests.bench.images import photo, photo_jpeg

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def close_to(pixel: object, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    values = pixel if isinstance(pixel, tuple) else (pixel,)
    return len(values) == len(expected) and all(
        abs(int(a) - b) <= tolerance for a, b in zip(values, expected, strict=True)
    )


# -- inputs -------------------------------------------------------------------


def rgba_png() -> bytes:
    """Left half opaque red, right half fully transparent (red underneath)."""
    image = Image.new("RGBA", (64, 32), (*RED, 0))
    image.paste((*RED, 255), (0, 0, 32, 32))
    return encode(image, "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([*RED, *(0, 0, 255)] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 16, 32))  # left half red (index 0), right half index 1
    return encode(image, "PNG", transparency=1)  # index 1 is transparent


def cmyk_jpeg() -> bytes:
    # C=0 M=255 Y=255 K=0 is red in every CMYK reading.
    return encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)


def sixteen_bit_png() -> bytes:
    ramp = Image.frombytes("L", (256, 1), bytes(range(256))).resize((256, 64)).convert("I")
    return encode(ramp.point(lambda value: value * 257).convert("I;16"), "PNG")


def grey_alpha_png() -> bytes:
    image = Image.new("LA", (32, 32), (0, 0))
    image.paste((0, 255), (0, 0, 16, 32))  # left black opaque, right transparent
    return encode(image, "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 200x100 with a red block top-left; Orientation 6 means "turn 90 deg clockwise"."""
    image = Image.new("RGB", (200, 100), WHITE)
    image.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in (RED, (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def webp_photo() -> bytes:
    return encode(photo(320, 240, seed=7), "WEBP", quality=90)


def one_bit_png() -> bytes:
    image = Image.new("1", (32, 32), 0)
    image.paste(1, (0, 0, 16, 32))
    return encode(image, "PNG")


def _icc_tag(signature: bytes, body: bytes) -> tuple[bytes, bytes]:
    return signature, body + b"\0" * (-len(body) % 4)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def linear_rgb_profile() -> bytes:
    """An ICC v2 RGB profile: sRGB primaries, gamma 1.0 (linear light).

    A pixel value of 51 (20 % linear light) is about 124 once converted to sRGB, so
    the output tells whether the profile was applied or just dropped.
    """
    linear = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0100)
    description = b"linear sRGB\0"
    tags = [
        _icc_tag(
            b"desc",
            b"desc\0\0\0\0"
            + struct.pack(">I", len(description))
            + description
            + b"\0" * 8
            + b"\0" * 3
            + b"\0" * 67,
        ),
        _icc_tag(b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        _icc_tag(b"rXYZ", _xyz(0.4361, 0.2225, 0.0139)),
        _icc_tag(b"gXYZ", _xyz(0.3851, 0.7169, 0.0971)),
        _icc_tag(b"bXYZ", _xyz(0.1431, 0.0606, 0.7141)),
        _icc_tag(b"rTRC", linear),
        _icc_tag(b"gTRC", linear),
        _icc_tag(b"bTRC", linear),
        _icc_tag(b"cprt", b"text\0\0\0\0no copyright\0"),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table = struct.pack(">I", len(tags))
    bodies = b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(bodies), len(body))
        bodies += body
    size = 128 + table_size + len(bodies)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0" * 4
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + table + bodies


def linear_profile_jpeg() -> bytes:
    grey = Image.new("RGB", (32, 32), (51, 51, 51))
    return encode(grey, "PNG", icc_profile=linear_rgb_profile())


def tagged_jpeg() -> bytes:
    """A JPEG carrying EXIF (camera, GPS), an ICC profile and a comment."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "ExampleCam"
    exif[ExifTags.Base.Model] = "X100"
    exif[ExifTags.Base.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N"}
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(
        photo(400, 300, seed=3),
        "JPEG",
        quality=95,
        exif=exif.tobytes(),
        icc_profile=srgb,
        comment=b"shot by someone at a private address",
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4)
        + idat
        + struct.pack(">I", zlib.crc32(idat))
    )


# -- successful conversions ---------------------------------------------------


@dataclass(frozen=True)
class Case:
    make: Callable[[], bytes]
    params: CompressParams
    format: str  # expected output format
    size: tuple[int, int]
    mode: str  # expected mode of the decoded output
    check: Callable[[Image.Image, CompressedImage], bool] = lambda image, result: True


JPEG50 = CompressParams(quality=50, format="jpeg")

CASES = {
    "jpeg-photo-smaller-at-q50": Case(
        lambda: photo_jpeg(800, 600, seed=1),
        JPEG50,
        "jpeg",
        (800, 600),
        "RGB",
        lambda image, result: len(result.data) < len(photo_jpeg(800, 600, seed=1)) * 0.7,
    ),
    "png-alpha-composited-on-white": Case(
        rgba_png,
        JPEG50,
        "jpeg",
        (64, 32),
        "RGB",
        lambda image, result: (
            close_to(image.getpixel((8, 16)), RED) and close_to(image.getpixel((56, 16)), WHITE)
        ),
    ),
    "palette-transparency-on-white": Case(
        palette_with_transparency,
        JPEG50,
        "jpeg",
        (32, 32),
        "RGB",
        lambda image, result: (
            close_to(image.getpixel((4, 16)), RED) and close_to(image.getpixel((28, 16)), WHITE)
        ),
    ),
    "cmyk-to-rgb": Case(
        cmyk_jpeg,
        JPEG50,
        "jpeg",
        (64, 64),
        "RGB",
        lambda image, result: close_to(image.getpixel((32, 32)), RED, 20),
    ),
    "16-bit-scaled-not-clipped": Case(
        sixteen_bit_png,
        JPEG50,
        "jpeg",
        (256, 64),
        "L",
        lambda image, result: (
            close_to(image.getpixel((2, 32)), (0,), 8)
            and close_to(image.getpixel((128, 32)), (128,), 8)
            and close_to(image.getpixel((253, 32)), (255,), 8)
        ),
    ),
    "grey-alpha-stays-grey-on-white": Case(
        grey_alpha_png,
        JPEG50,
        "jpeg",
        (32, 32),
        "L",
        lambda image, result: (
            close_to(image.getpixel((4, 16)), (0,)) and close_to(image.getpixel((28, 16)), (255,))
        ),
    ),
    "one-bit-to-grey": Case(
        one_bit_png,
        JPEG50,
        "jpeg",
        (32, 32),
        "L",
        lambda image, result: (
            close_to(image.getpixel((4, 16)), (255,)) and close_to(image.getpixel((28, 16)), (0,))
        ),
    ),
    "exif-orientation-applied": Case(
        exif_rotated_jpeg,
        JPEG50,
        "jpeg",
        (100, 200),  # turned upright: portrait
        "RGB",
        # The block that was top-left is top-right once turned clockwise.
        lambda image, result: (
            close_to(image.getpixel((80, 20)), RED, 30)
            and close_to(image.getpixel((20, 20)), WHITE, 30)
        ),
    ),
    "animated-gif-first-frame": Case(
        animated_gif,
        JPEG50,
        "jpeg",
        (40, 40),
        "RGB",
        lambda image, result: (
            close_to(image.getpixel((20, 20)), RED, 20) and getattr(image, "n_frames", 1) == 1
        ),
    ),
    "webp-input": Case(webp_photo, JPEG50, "jpeg", (320, 240), "RGB"),
    "webp-output-keeps-alpha": Case(
        rgba_png,
        CompressParams(quality=50, format="webp"),
        "webp",
        (64, 32),
        "RGBA",
        lambda image, result: image.getpixel((56, 16))[3] == 0,  # type: ignore[index]
    ),
    "avif-output": Case(
        lambda: photo_jpeg(320, 240, seed=2),
        CompressParams(quality=50, format="avif"),
        "avif",
        (320, 240),
        "RGB",
    ),
    "icc-profile-converted-to-srgb": Case(
        linear_profile_jpeg,
        JPEG50,
        "jpeg",
        (32, 32),
        "RGB",
        # Linear 51 is sRGB ~124; had the profile been dropped unconverted it would stay 51.
        lambda image, result: close_to(image.getpixel((16, 16)), (124, 124, 124), 10),
    ),
    "max-dimension-downscales-longest-side": Case(
        lambda: photo_jpeg(1920, 1080, seed=4),
        CompressParams(quality=50, format="jpeg", max_dimension=800),
        "jpeg",
        (800, 450),
        "RGB",
    ),
    "max-dimension-never-upscales": Case(
        lambda: photo_jpeg(640, 480, seed=5),
        CompressParams(quality=50, format="jpeg", max_dimension=1000),
        "jpeg",
        (640, 480),
        "RGB",
    ),
    "max-dimension-on-portrait-exif": Case(
        exif_rotated_jpeg,
        CompressParams(quality=50, format="jpeg", max_dimension=50),
        "jpeg",
        (25, 50),
        "RGB",
    ),
    "original-png-stays-png": Case(
        rgba_png,
        CompressParams(quality=50, format="original"),
        "png",
        (64, 32),
        "RGBA",
    ),
    "original-gif-first-frame-only": Case(
        animated_gif,
        CompressParams(quality=50, format="original"),
        "gif",
        (40, 40),
        "P",
        lambda image, result: getattr(image, "n_frames", 1) == 1,
    ),
    "original-webp-stays-webp": Case(
        webp_photo,
        CompressParams(quality=40, format="original"),
        "webp",
        (320, 240),
        "RGB",
    ),
    "original-16-bit-png-keeps-depth": Case(
        sixteen_bit_png,
        CompressParams(quality=50, format="original"),
        "png",
        (256, 64),
        "I;16",
    ),
    "original-bmp": Case(
        lambda: encode(photo(64, 48, seed=6), "BMP"),
        CompressParams(quality=50, format="original"),
        "bmp",
        (64, 48),
        "RGB",
    ),
    "original-tiff": Case(
        lambda: encode(photo(64, 48, seed=6), "TIFF"),
        CompressParams(quality=50, format="original"),
        "tiff",
        (64, 48),
        "RGB",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_compress_converts(case: Case) -> None:
    result = compress(case.make(), case.params)
    image = decode(result.data)

    assert result.format == case.format
    assert (image.format or "").lower() == case.format
    assert image.size == case.size == (result.width, result.height)
    assert image.mode == case.mode
    assert case.check(image, result)


@pytest.mark.parametrize(
    ("make", "target"),
    [
        (tagged_jpeg, "jpeg"),
        (tagged_jpeg, "webp"),
        (exif_rotated_jpeg, "jpeg"),
        (linear_profile_jpeg, "original"),
    ],
    ids=["jpeg-to-jpeg", "jpeg-to-webp", "rotated-jpeg", "profiled-png-original"],
)
def test_metadata_is_stripped(make: Callable[[], bytes], target: str) -> None:
    source = make()
    result = compress(source, CompressParams(quality=50, format=target))
    image = decode(result.data)

    assert not result.kept_original
    assert len(image.getexif()) == 0
    for key in ("exif", "icc_profile", "comment", "xmp", "XML:com.adobe.xmp"):
        assert key not in image.info, key
    assert b"ExampleCam" not in result.data
    assert b"private address" not in result.data


def test_source_kept_when_reencoding_is_larger() -> None:
    # Already squeezed at quality 20: re-encoding at 90 can only grow it.
    source = photo_jpeg(320, 240, seed=8, quality=20)

    result = compress(source, CompressParams(quality=90, format="jpeg"))

    assert result.kept_original
    assert result.data == source
    assert (result.format, result.width, result.height) == ("jpeg", 320, 240)


@pytest.mark.parametrize(
    ("params", "why"),
    [
        (CompressParams(quality=90, format="webp"), "another format"),
        (CompressParams(quality=90, format="jpeg", max_dimension=100), "downscaled"),
    ],
    ids=["different-format", "downscaled"],
)
def test_source_not_kept(params: CompressParams, why: str) -> None:
    source = photo_jpeg(320, 240, seed=8, quality=20)

    result = compress(source, params)

    assert not result.kept_original, why
    assert result.data != source


def test_params_from_run_compression() -> None:
    params = CompressParams.from_compression(
        Compression(quality=70, format="webp", max_dimension=512), max_pixels=1000
    )

    assert params == CompressParams(quality=70, format="webp", max_dimension=512, max_pixels=1000)


# -- transparency in every form a PNG can carry ------------------------------------

BAND = 16  # each sample value fills a 16x16 block, so JPEG's blocks keep it exact enough


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def keyed_png(
    bit_depth: int,
    colour_type: int,
    pixels: list[tuple[int, ...]],
    trns: bytes,
    palette: bytes = b"",
) -> bytes:
    """A PNG written chunk by chunk: one 16x16 block per entry of ``pixels``.

    Pillow cannot write most of these forms (1-bit with a key, 16-bit grey with a key,
    2-bit grey...), so the test builds the file itself: IHDR, PLTE, tRNS, IDAT, IEND.
    """
    width = BAND * len(pixels)
    samples = [value for pixel in pixels for value in pixel for _ in range(1)]
    channels = len(pixels[0])
    row_samples: list[int] = []
    for index in range(len(pixels)):
        row_samples += list(samples[index * channels : (index + 1) * channels]) * BAND
    if bit_depth < 8:
        bits = "".join(format(value, f"0{bit_depth}b") for value in row_samples)
        bits += "0" * (-len(bits) % 8)
        row = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    elif bit_depth == 8:
        row = bytes(row_samples)
    else:
        row = b"".join(struct.pack(">H", value) for value in row_samples)
    raw = (b"\0" + row) * BAND
    header = struct.pack(">IIBBBBB", width, BAND, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + (png_chunk(b"PLTE", palette) if palette else b"")
        + png_chunk(b"tRNS", trns)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class Keyed:
    png: Callable[[], bytes]
    on_white: tuple[int, ...]  # the JPEG's grey value (or RGB) in each block, in order
    alpha: tuple[int, ...]  # the WebP's alpha in each block


K16 = struct.pack(">H", 0)
KEYED = {
    "1-bit-black-key": Keyed(  # the case drawn black before: the key colour is black
        lambda: keyed_png(1, 0, [(0,), (1,)], K16), on_white=(255, 255), alpha=(0, 255)
    ),
    "1-bit-white-key": Keyed(
        lambda: keyed_png(1, 0, [(0,), (1,)], struct.pack(">H", 1)),
        on_white=(0, 255),
        alpha=(255, 0),
    ),
    "2-bit-grey-key-is-widened": Keyed(  # key 1 is the pixel Pillow widens to 85
        lambda: keyed_png(2, 0, [(0,), (1,), (2,), (3,)], struct.pack(">H", 1)),
        on_white=(0, 255, 170, 255),
        alpha=(255, 0, 255, 255),
    ),
    "4-bit-grey-key-is-widened": Keyed(
        lambda: keyed_png(4, 0, [(5,), (6,)], struct.pack(">H", 5)),
        on_white=(255, 102),
        alpha=(0, 255),
    ),
    "8-bit-grey-black-key": Keyed(
        lambda: keyed_png(8, 0, [(0,), (100,)], K16), on_white=(255, 100), alpha=(0, 255)
    ),
    "16-bit-grey-key-is-exact": Keyed(  # 1/65535 is black to the eye, but not the key
        lambda: keyed_png(16, 0, [(0,), (1,), (0x8000,)], K16),
        on_white=(255, 0, 128),
        alpha=(0, 255, 255),
    ),
    "8-bit-rgb-black-key": Keyed(
        lambda: keyed_png(8, 2, [(0, 0, 0), (200, 0, 0)], K16 * 3),
        on_white=(255, 200),  # the red channel
        alpha=(0, 255),
    ),
    "16-bit-rgb-key": Keyed(
        lambda: keyed_png(16, 2, [(0, 0, 0), (0xC800, 0, 0)], K16 * 3),
        on_white=(255, 200),
        alpha=(0, 255),
    ),
    "palette-alpha-per-entry": Keyed(
        lambda: keyed_png(
            8, 3, [(0,), (1,), (2,)], bytes([255, 0, 128]), palette=bytes([0, 0, 0]) * 3
        ),
        on_white=(0, 255, 127),
        alpha=(255, 0, 128),
    ),
    "1-bit-palette-key": Keyed(
        lambda: keyed_png(1, 3, [(0,), (1,)], bytes([0]), palette=bytes([0, 0, 0, 90, 90, 90])),
        on_white=(255, 90),
        alpha=(0, 255),
    ),
}


def block_values(image: Image.Image, blocks: int) -> list[tuple[int, ...]]:
    """The value in the middle of each 16x16 block, as a tuple of the image's bands."""
    values = []
    for index in range(blocks):
        pixel = image.getpixel((index * BAND + BAND // 2, BAND // 2))
        values.append(pixel if isinstance(pixel, tuple) else (int(cast(int, pixel)),))
    return values


@pytest.mark.parametrize("case", KEYED.values(), ids=KEYED.keys())
def test_png_transparency_is_composited_on_white_for_jpeg(case: Keyed) -> None:
    image = decode(compress(case.png(), JPEG50).data)

    for got, want in zip(block_values(image, len(case.on_white)), case.on_white, strict=True):
        assert close_to(got[:1], (want,)), (got, want)


@pytest.mark.parametrize("case", KEYED.values(), ids=KEYED.keys())
def test_png_transparency_becomes_alpha_for_webp(case: Keyed) -> None:
    image = decode(compress(case.png(), CompressParams(quality=90, format="webp")).data)

    assert image.mode == "RGBA"
    got = [pixel[3] for pixel in block_values(image, len(case.alpha))]
    assert all(abs(a - b) <= 2 for a, b in zip(got, case.alpha, strict=True)), got


@pytest.mark.parametrize("case", KEYED.values(), ids=KEYED.keys())
def test_png_transparency_survives_original_format(case: Keyed) -> None:
    source = case.png()
    result = compress(source, CompressParams(format="original"))
    if result.kept_original:  # 1-, 2- and 4-bit files are smaller than any re-encoding
        assert result.data == source
        return
    flattened = decode(result.data).convert("RGBA")

    got = [pixel[3] for pixel in block_values(flattened, len(case.alpha))]
    assert got == list(case.alpha)


# -- failures -----------------------------------------------------------------

FAILURES = {
    "truncated-jpeg": (
        lambda: photo_jpeg(640, 480, seed=9)[:20_000],
        CompressParams(),
        Stage.DECODE,
        Reason.CORRUPT,
        "truncated",
    ),
    "text-pretending-to-be-jpeg": (
        lambda: b"<html><body>Not Found</body></html>",
        CompressParams(),
        Stage.DECODE,
        Reason.NOT_AN_IMAGE,
        "starts with text",
    ),
    "jpeg-magic-then-garbage": (
        lambda: b"\xff\xd8\xff\xe0" + b"garbage" * 50,
        CompressParams(),
        Stage.DECODE,
        None,
        "",
    ),
    "empty-body": (lambda: b"", CompressParams(), Stage.DECODE, Reason.NOT_AN_IMAGE, "empty"),
    "format-outside-allow-list": (
        lambda: encode(Image.new("RGB", (8, 8)), "PCX"),
        CompressParams(),
        Stage.DECODE,
        Reason.NOT_AN_IMAGE,
        "",
    ),
    "bomb-over-the-worker-cap": (
        lambda: png_header_only(10_000, 10_000),
        CompressParams(max_pixels=50_000_000),
        Stage.DECODE,
        Reason.DECOMPRESSION_BOMB,
        "100000000 pixels",
    ),
    "bomb-over-pillow-hard-limit": (
        lambda: png_header_only(30_000, 30_000),
        CompressParams(max_pixels=10**10),
        Stage.DECODE,
        Reason.DECOMPRESSION_BOMB,
        "decompression bomb",
    ),
    "bomb-in-pillow-warning-band": (
        # Between Pillow's MAX_IMAGE_PIXELS and twice it Pillow only warns; the worker
        # makes that warning an error even when its own cap is set higher.
        lambda: png_header_only(10_000, 10_000),
        CompressParams(max_pixels=10**10),
        Stage.DECODE,
        Reason.DECOMPRESSION_BOMB,
        "decompression bomb",
    ),
    "tiny-cap": (
        lambda: photo_jpeg(100, 100),
        CompressParams(max_pixels=9_999),
        Stage.DECODE,
        Reason.DECOMPRESSION_BOMB,
        "over the 9999-pixel limit",
    ),
    "unknown-target": (
        lambda: photo_jpeg(32, 32),
        CompressParams(format="heic"),
        Stage.ENCODE,
        Reason.FORMAT_UNAVAILABLE,
        "heic",
    ),
}


@pytest.mark.parametrize(
    ("make", "params", "stage", "reason", "words"), FAILURES.values(), ids=FAILURES.keys()
)
def test_compress_failures_name_stage_and_reason(
    make: Callable[[], bytes],
    params: CompressParams,
    stage: Stage,
    reason: Reason | None,
    words: str,
) -> None:
    with pytest.raises(ImageFailure) as caught:
        compress(make(), params)

    assert caught.value.stage == stage
    if reason is not None:
        assert caught.value.reason == reason
    else:
        assert caught.value.reason in (Reason.CORRUPT, Reason.NOT_AN_IMAGE)
    assert words.lower() in caught.value.message.lower()
    assert caught.value.error.startswith(f"{caught.value.reason.value}: ")


def test_avif_unavailable_is_a_clear_encode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "avif_available", lambda: False)

    with pytest.raises(ImageFailure) as caught:
        compress(photo_jpeg(32, 32), CompressParams(format="avif"))

    assert caught.value.stage == Stage.ENCODE
    assert caught.value.reason == Reason.FORMAT_UNAVAILABLE
    assert "AVIF" in caught.value.message


def test_unusable_icc_profile_is_ignored() -> None:
    source = encode(Image.new("RGB", (16, 16), RED), "PNG", icc_profile=b"not a profile")

    result = compress(source, JPEG50)

    assert close_to(decode(result.data).getpixel((8, 8)), RED, 20)
    assert "icc_profile" not in decode(result.data).info
