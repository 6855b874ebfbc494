"""Decode stage: encoded image bytes -> RGB uint8 ``(H, W, 3)`` at original resolution.

Only the formats the listing accepts by extension are decoded: JPEG, PNG, WebP, BMP,
TIFF and GIF, whatever a file's name says. Other formats Pillow knows are refused as
``unsupported_format`` from their header: some of them run external programs (EPS calls
Ghostscript) or parse rarely-audited containers, which an archive of untrusted files must not
reach. EXIF orientation is applied. Grayscale, palette, RGBA/LA (alpha dropped), CMYK, YCbCr and
1-bit images are converted to RGB; 16-bit images are scaled to 8 bits (divided by 257, not
clipped); GIF and other animations give their first frame. Images with more than
``max_pixels`` pixels are refused from their header, before any pixel is decoded, so a
decompression bomb costs no memory; so are images more than ``MAX_ASPECT_RATIO`` times longer
than wide (a 1 x 20000 strip would become 520 x 10,400,000 pixels once the semantic models
resize its shorter side to 520). Every failure is a :class:`DecodeError` whose
``error_type`` goes into the ``images`` table.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# segpipe enforces its own --max-pixels limit below; Pillow's global guard would override it.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
MAX_ASPECT_RATIO = 20
_EXIF_ORIENTATION = 0x0112
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_MAGIC_NUMBERS = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class DecodeError(Exception):
    """An image that cannot be decoded; ``error_type`` is a stable, queryable category."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)`` pixels of the encoded image ``data``."""
    if not data:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    # Whatever Pillow's parsers raise for a malformed file is that file's error row, never the shard's failure.
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise _unopenable(data) from None
    except Exception as error:  # noqa: BLE001 - a recognised format whose header Pillow cannot read
        raise _unreadable_header(data, error) from None
    refusal = _refusal(*image.size, max_pixels=max_pixels)
    if refusal is not None:
        raise refusal
    try:
        image.load()
        image = _upright(image)
        return _to_rgb(image)
    except Exception as error:  # noqa: BLE001 - see above
        if "truncated" in str(error).lower() or "broken data stream" in str(error):  # "Truncated File Read" too
            raise DecodeError("truncated_image", f"{image.format} data ends early: {error}") from None
        raise DecodeError("decode_error", f"{image.format} {image.mode} image cannot be decoded: {error}") from None


def plain_rgb_jpeg(data: bytes | memoryview, *, max_pixels: int) -> bool:
    """Whether a JPEG decoder that writes tensors (libjpeg-turbo on the host, nvjpeg on a GPU) may
    take ``data`` in place of :func:`decode_image`: a complete (ending in the end-of-image
    marker), three-channel, upright (no EXIF rotation) JPEG within the limits, which they turn
    into Pillow's pixels (nvjpeg up to its rounding). Anything else, every broken file included,
    goes to :func:`decode_image` for its conversions, checks and error rows. ``data`` may be a
    view of bytes held elsewhere."""
    data = memoryview(data).cast("B")
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    return _plain_header(data, image_format="JPEG", modes=("RGB",), max_pixels=max_pixels)


def plain_webp(data: bytes | memoryview, *, max_pixels: int) -> bool:
    """Whether libwebp may write ``data``'s pixels straight into a tensor in place of
    :func:`decode_image`: a complete (its RIFF size is the file's), still (not animated), upright
    WebP within the limits, lossy or lossless, with or without alpha (dropped, as Pillow drops
    it); libwebp gives Pillow's pixels for it. The rest goes to :func:`decode_image`."""
    data = memoryview(data).cast("B")
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or _riff_length(data) != len(data):
        return False
    return _plain_header(data, image_format="WEBP", modes=("RGB", "RGBA"), max_pixels=max_pixels)


def _plain_header(data: memoryview, *, image_format: str, modes: tuple[str, ...], max_pixels: int) -> bool:
    """Whether ``data``'s header (read by Pillow, no pixel decoded) is of one still, upright image
    of ``image_format`` in one of ``modes``, within the limits."""
    try:
        # BytesIO's copy (3 us for a 145 KB photo) holds the GIL; a pyarrow.BufferReader, read 37
        # times per JPEG header, released and retook it each time, and a thread that gives the GIL
        # up among busy threads waits for it: lraspp's GPU actor alone made 952 img/s, against 1531.
        with Image.open(io.BytesIO(data), formats=(image_format,)) as image:
            return (
                image.mode in modes
                and not getattr(image, "is_animated", False)
                and _refusal(*image.size, max_pixels=max_pixels) is None
                and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
            )
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _refusal(width: int, height: int, *, max_pixels: int) -> DecodeError | None:
    """Why an image of this size is refused before decoding, or ``None``."""
    if width * height > max_pixels:
        return DecodeError("too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds --max-pixels {max_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return DecodeError(
            "extreme_aspect_ratio", f"{width}x{height} is more than {MAX_ASPECT_RATIO} times longer than it is wide"
        )
    return None


def _unopenable(data: bytes) -> DecodeError:
    """Why ``data`` is no image of a supported format: another format, a broken header, or no image."""
    try:
        with Image.open(io.BytesIO(data)) as other:  # reads the header only: nothing of it is decoded
            other_format = other.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        other_format = None
    if other_format is not None:
        return DecodeError(
            "unsupported_format", f"{other_format} images are not decoded (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    claimed = _claimed_format(data)
    if claimed is not None:
        return DecodeError("decode_error", f"starts like a {claimed} file, but its header is invalid")
    return DecodeError("not_an_image", f"not a recognised image format ({_describe_start(data)})")


def _unreadable_header(data: bytes, error: Exception) -> DecodeError:
    """Why Pillow took ``data`` for a supported format but could not read its header: a file cut
    short within it (Pillow's JPEG parser says so; a WebP's RIFF size says more bytes follow), or
    an invalid one."""
    claimed = _claimed_format(data) or "image"
    if "truncated" in str(error).lower() or (claimed == "WEBP" and _riff_length(data) > len(data)):
        return DecodeError("truncated_image", f"{claimed} data ends early: {error}")
    return DecodeError("decode_error", f"starts like a {claimed} file, but its header is invalid: {error}")


def _riff_length(data: bytes | memoryview) -> int:
    """The file length that a RIFF container's (a WebP's) header announces: its size field plus the 8 bytes before it."""
    return int.from_bytes(data[4:8], "little") + 8


def _claimed_format(data: bytes) -> str | None:
    """The supported format whose magic number ``data`` starts with, whatever follows it."""
    if data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC_NUMBERS.items() if data.startswith(magic)), None)


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
