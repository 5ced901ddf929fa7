"""Generated photograph-like images, so tests and benchmarks need no image files.

Smooth gradients give the large soft areas of a photo, blurred noise its grain and a few
shapes its edges; a JPEG of that compresses about like a real photo (roughly 0.2-0.3
bytes per pixel at quality 90), unlike flat colour, which compresses to almost nothing
and would flatter every codec.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFilter


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with gradients, grain and edges; the same ``seed`` gives the same image."""
    rng = random.Random(seed)
    horizontal = Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270)))
    radial = Image.radial_gradient("L")
    grain = Image.frombytes("L", (width, height), rng.randbytes(width * height))
    grain = grain.filter(ImageFilter.GaussianBlur(0.8))
    channels = (
        horizontal.resize((width, height)),
        radial.resize((width, height)),
        Image.blend(horizontal.resize((width, height)), grain, 0.5),
    )
    offset = rng.randrange(3)
    image = Image.merge("RGB", channels[offset:] + channels[:offset])
    image = Image.blend(image, Image.merge("RGB", (grain, grain, grain)), 0.25)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        size = rng.randrange(max(width, height) // 20, max(width, height) // 5)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x, y, x + size, y + size // 2), fill=colour)
    return image.filter(ImageFilter.SMOOTH)


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """``photo`` encoded as a baseline JPEG, as a camera or CMS export would be."""
    out = io.BytesIO()
    photo(width, height, seed).save(out, "JPEG", quality=quality)
    return out.getvalue()
