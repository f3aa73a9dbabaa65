"""Image checks shared by every stage: cheap validation, RGB conversion and corpus normalisation.

Web-crawled shards hold every kind of broken image. ``inspect_image`` classifies one image's bytes without
decoding the pixels in the common case (header parse plus a trailer check for truncation); a full decode is only
paid when the cheap check is inconclusive. Every failure is a ``BadImage`` whose ``reason`` becomes a counted drop.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Above this many pixels an image is treated as a decompression bomb (PIL's own default limit, 89.5 MP).
DEFAULT_MAX_PIXELS = 89_478_485
# Modes that every consumer (PIL, datasets, image processors) turns into RGB without surprises.
PLAIN_MODES = ("RGB", "L")
JPEG_QUALITY = 95

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image must fail, never be silently padded with grey
# What PIL raises on data it cannot read (SyntaxError: some malformed PNG/GIF headers).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError)


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is the drop reason counted by the stages."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    width: int
    height: int


def _looks_complete(data: bytes, fmt: str) -> bool | None:
    """Trailer check for truncation: True/False when the format tells, None when only a decode can."""
    tail = data[-1024:].rstrip(b"\x00")
    if fmt == "JPEG":
        return b"\xff\xd9" in tail  # EOI marker; entropy-coded data never contains FF D9
    if fmt == "PNG":
        return b"IEND" in tail[-64:]
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)  # RIFF size field
    if fmt == "GIF":
        return tail.endswith(b";")
    return None


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily) and size-check an image; raises ``BadImage`` for empty, unreadable or oversized data."""
    if not data:
        raise BadImage("image_empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadImage("image_too_large", str(error)) from None
    except DECODE_ERRORS as error:
        raise BadImage("image_undecodable", str(error)) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage("image_undecodable", f"size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage("image_too_large", f"{width}x{height} > {max_pixels} pixels")
    return image


@contextlib.contextmanager
def strict_decoding():
    """PIL's global ``LOAD_TRUNCATED_IMAGES`` off for the block: another library in the process may have switched it
    on (lmms-eval does when imported), which pads a cut-short or corrupt image with grey instead of failing."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _full_decode(image: Image.Image) -> None:
    try:
        with strict_decoding():
            image.load()
    except OSError as error:
        reason = "image_truncated" if "truncat" in str(error).lower() else "image_undecodable"
        raise BadImage(reason, str(error)) from None
    except (SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as error:
        raise BadImage("image_undecodable", str(error)) from None


# Start-of-frame markers (baseline, extended, progressive, lossless...; not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MODES = {1: "L", 3: "RGB"}


def _plain_jpeg_info(data: bytes) -> ImageInfo | None:
    """Size of an 8-bit grey/colour JPEG read from its frame header (a few microseconds), or None when the file is
    anything else, so that PIL decides. Web shards are mostly such JPEGs; PIL's parser costs ~10x more."""
    if data[:2] != b"\xff\xd8":
        return None
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 10 > end or data[i + 4] != 8:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            mode = _JPEG_MODES.get(data[i + 9])
            return ImageInfo("JPEG", mode, width, height) if mode and width and height else None
        if marker == 0xDA or length < 2:  # scan data before a frame header: malformed, let PIL judge
            return None
        i += 2 + length
    return None


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = False) -> ImageInfo:
    """Format, mode and size of an image, or ``BadImage``.

    Without ``full_decode`` the pixels are decoded only when the trailer check cannot vouch for completeness, so a
    valid JPEG/PNG/WebP/GIF costs a header parse. ``full_decode=True`` always decodes (catches corrupt scan data too).
    """
    if not full_decode:
        fast = _plain_jpeg_info(data)
        if fast is not None and fast.width * fast.height <= max_pixels and _looks_complete(data, "JPEG"):
            return fast
    image = open_image(data, max_pixels=max_pixels)
    fmt = image.format or ""
    if full_decode or not _looks_complete(data, fmt):
        _full_decode(image)
    return ImageInfo(fmt, image.mode, image.width, image.height)


def _alpha_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB for any PIL mode: alpha composited on white, 16/32-bit and float scaled, CMYK/P/LA converted.

    ``Image.convert("RGB")`` alone clips 16-bit images to white and turns transparent pixels black.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return _alpha_on_white(image)
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        high = array.max() if array.size else 0.0
        if mode == "F":
            low = array.min() if array.size else 0.0
            array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        elif high > 255:
            array = array / (257.0 if high <= 65535 else high / 255.0)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded 8-bit RGB image, or ``BadImage``."""
    image = open_image(data, max_pixels=max_pixels)
    _full_decode(image)
    return to_rgb(image)


def normalize_for_corpus(data: bytes, info: ImageInfo, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, bool]:
    """Bytes fit for a ``.jpg`` field: RGB/L JPEGs pass through untouched; anything else is decoded, converted to RGB
    and re-encoded as JPEG (quality 95). Returns (bytes, re-encoded?)."""
    if info.format == "JPEG" and info.mode in PLAIN_MODES:
        return data, False
    image = decode_rgb(data, max_pixels=max_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), True
