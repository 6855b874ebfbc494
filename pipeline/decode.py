"""Decode stage: encoded image bytes -> RGB uint8 ``(H, W, 3)`` at original resolution.

EXIF orientation is applied. Grayscale, palette, RGBA/LA (alpha dropped), CMYK, YCbCr and
1-bit images are converted to RGB; 16-bit images are scaled to 8 bits (divided by 257, not
clipped); GIF and other animations give their first frame. Images with more than
``max_pixels`` pixels are refused from their header, before any pixel is decoded. Every
failure is a :class:`DecodeError` whose ``error_type`` goes into the ``images`` table.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# segpipe enforces its own --max-pixels limit below; Pillow's global guard would override it.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class DecodeError(Exception):
    """An image that cannot be decoded; ``error_type`` is a stable, queryable category."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)`` pixels of the encoded image ``data``."""
    if not data:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"not a recognised image format ({_describe_start(data)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels}"
        )
    try:
        image.load()
        image = _upright(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if "truncated" in str(error) or "broken data stream" in str(error):
            raise DecodeError("truncated_image", f"{image.format} data ends early: {error}") from None
        raise DecodeError("decode_error", f"{image.format} {image.mode} image cannot be decoded: {error}") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (KeyError, ValueError, TypeError, SyntaxError):
        return image  # unreadable EXIF: keep the stored orientation rather than lose the image


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32) / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays


def _describe_start(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "it looks like HTML/XML text, perhaps an error page saved under an image name"
    return f"{len(data)} bytes starting {data[:8].hex(' ')}"
