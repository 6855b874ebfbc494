"""Decode stage: awkward but valid images become RGB; broken ones get a specific error_type; the
actors' host threads decode plain JPEGs and WebPs to the pixels Pillow gives."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import torch
from PIL import Image

from jobs.sample import awkward_images, damaged_copies, encode, photos, truncated_jpeg
from pipeline.decode import DecodeError, decode_image, plain_rgb_jpeg, plain_webp
from pipeline.infer import decode_on_host

MAX_PIXELS = 100_000_000


@pytest.mark.parametrize("name", sorted(awkward_images()))
def test_awkward_images_decode_to_rgb(name: str) -> None:
    pixels = decode_image(awkward_images()[name], max_pixels=MAX_PIXELS)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.flags.writeable


def test_exif_orientation_is_applied() -> None:
    rocket = skimage.data.rocket()  # 427 x 640, landscape
    pixels = decode_image(awkward_images()["exif_rotated_rocket.jpg"], max_pixels=MAX_PIXELS)
    assert pixels.shape[:2] == (rocket.shape[1], rocket.shape[0])
    rotated = np.rot90(rocket, k=-1)  # orientation 6: rotate 90 degrees clockwise
    assert np.abs(pixels.astype(int) - rotated).mean() < 4


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    pixels = decode_image(awkward_images()["sixteen_bit_coins.png"], max_pixels=MAX_PIXELS)
    assert np.array_equal(pixels[:, :, 0], skimage.data.coins())
    assert np.array_equal(pixels[:, :, 0], pixels[:, :, 2])


def test_gray_palette_rgba_and_cmyk_keep_their_content() -> None:
    gray = decode_image(awkward_images()["gray_camera.png"], max_pixels=MAX_PIXELS)
    assert np.array_equal(gray[:, :, 1], skimage.data.camera())
    logo = decode_image(awkward_images()["rgba_logo.png"], max_pixels=MAX_PIXELS)
    assert np.array_equal(logo, skimage.data.logo()[:, :, :3])
    gif = decode_image(awkward_images()["palette_animated.gif"], max_pixels=MAX_PIXELS)
    assert gif.shape == skimage.data.coffee().shape  # the first frame, not the second (chelsea)
    cmyk = decode_image(awkward_images()["cmyk_chelsea.jpg"], max_pixels=MAX_PIXELS)
    assert np.abs(cmyk.astype(int) - skimage.data.chelsea()).mean() < 8


BROKEN = {
    "empty": (b"", "empty_file"),
    "random bytes": (np.random.default_rng(0).bytes(5000), "not_an_image"),
    "html error page": (b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>", "not_an_image"),
    "truncated jpeg": (truncated_jpeg(), "truncated_image"),
    "jpeg cut within its header": (truncated_jpeg()[:200], "truncated_image"),
    "truncated webp": (encode(photos()["chelsea"], "WEBP")[:5000], "truncated_image"),
    "webp cut within its header": (encode(photos()["chelsea"], "WEBP")[:40], "truncated_image"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_get_specific_error_types(case: str) -> None:
    data, error_type = BROKEN[case]
    with pytest.raises(DecodeError) as raised:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert raised.value.error_type == error_type
    assert str(raised.value)


def test_any_cut_or_corruption_of_any_supported_format_is_an_error_row_or_pixels_the_same_either_way() -> None:
    # what a shard's actor meets in a real archive: each such file gets its own row, never the shard's failure,
    # and the host's tensor decoders (libjpeg-turbo, libwebp) agree with Pillow on every one
    rng = np.random.default_rng(5)
    small = photos()["chelsea"][:96, :128]
    originals = [encode(small, image_format) for image_format in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")]
    originals += [encode(small, "JPEG", progressive=True), encode(small, "WEBP", lossless=True)]
    for original in originals:
        for data in damaged_copies(original, cuts=25, corruptions=25, rng=rng):
            try:
                expected: torch.Tensor | str = torch.from_numpy(decode_image(data, max_pixels=MAX_PIXELS)).permute(2, 0, 1)
            except DecodeError as error:
                expected = error.error_type
            on_host = decode_on_host(memoryview(data), max_pixels=MAX_PIXELS, device_can_decode=False)
            if isinstance(expected, str):
                assert isinstance(on_host, DecodeError) and on_host.error_type == expected
            else:
                assert isinstance(on_host, torch.Tensor) and torch.equal(on_host, expected)


def test_html_is_named_in_the_message() -> None:
    with pytest.raises(DecodeError, match="HTML"):
        decode_image(BROKEN["html error page"][0], max_pixels=MAX_PIXELS)


def test_too_many_pixels_is_refused_from_the_header() -> None:
    big = encode(Image.new("L", (4000, 3000)), "PNG")
    with pytest.raises(DecodeError) as raised:
        decode_image(big, max_pixels=10_000_000)
    assert raised.value.error_type == "too_many_pixels"
    assert decode_image(big, max_pixels=12_000_000).shape == (3000, 4000, 3)


def test_truncated_png_is_truncated_image() -> None:
    data = encode(skimage.data.astronaut(), "PNG")
    with pytest.raises(DecodeError) as raised:
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    assert raised.value.error_type == "truncated_image"


def test_plain_rgb_roundtrip() -> None:
    astronaut = skimage.data.astronaut()
    assert np.array_equal(decode_image(encode(astronaut, "PNG"), max_pixels=MAX_PIXELS), astronaut)
    assert Image.open(io.BytesIO(encode(astronaut, "PNG"))).mode == "RGB"


def test_only_complete_upright_rgb_jpegs_within_the_limits_go_to_the_gpu_decoder() -> None:
    astronaut = photos()["astronaut"]
    plain = encode(astronaut, "JPEG", quality=90)
    awkward = awkward_images()
    assert plain_rgb_jpeg(plain, max_pixels=10**8)
    assert plain_rgb_jpeg(encode(astronaut, "JPEG", progressive=True), max_pixels=10**8)
    refused = {
        "truncated": truncated_jpeg(),
        "trailing garbage": plain + b"\x00garbage",
        "exif rotation": awkward["exif_rotated_rocket.jpg"],
        "cmyk": awkward["cmyk_chelsea.jpg"],
        "grayscale": encode(astronaut[:, :, 0], "JPEG"),
        "png": awkward["gray_camera.png"],
        "empty": b"",
    }
    for name, data in refused.items():
        assert not plain_rgb_jpeg(data, max_pixels=10**8), name
    assert not plain_rgb_jpeg(plain, max_pixels=512 * 512 - 1)  # over --max-pixels: the host path refuses it
    # as the actors pass them: views of the bytes where the object store holds them, amid other files' bytes
    held = pa.py_buffer(b"\xff\xd9" + plain + refused["exif rotation"])
    assert plain_rgb_jpeg(memoryview(held)[2 : 2 + len(plain)], max_pixels=10**8)
    assert not plain_rgb_jpeg(memoryview(held)[2 + len(plain) :], max_pixels=10**8)


def _webps() -> dict[str, bytes]:
    """Still WebPs in each of libwebp's encodings: lossy, lossless, and both with alpha (a corner
    fully transparent, where a lossless encoder may rewrite the colours under it)."""
    chelsea = Image.fromarray(photos()["chelsea"])
    translucent = chelsea.convert("RGBA")
    translucent.putalpha(Image.linear_gradient("L").resize(chelsea.size).point(lambda alpha: 0 if alpha < 64 else alpha))
    return {
        "lossy": encode(chelsea, "WEBP", quality=80),
        "lossless": encode(chelsea, "WEBP", lossless=True),
        "lossy, alpha": encode(translucent, "WEBP", quality=80),
        "lossless, alpha": encode(translucent, "WEBP", lossless=True),
    }


def test_only_complete_still_upright_webps_within_the_limits_skip_pillow() -> None:
    webps = _webps()
    for name, data in webps.items():
        assert plain_webp(data, max_pixels=10**8), name
    chelsea = Image.fromarray(photos()["chelsea"])
    exif = Image.Exif()
    exif[0x0112] = 6
    refused = {
        "truncated": webps["lossy"][: len(webps["lossy"]) // 2],
        "trailing garbage": webps["lossy"] + b"\x00garbage",
        "animated": encode(chelsea, "WEBP", save_all=True, append_images=[chelsea.rotate(90)]),
        "exif rotation": encode(chelsea, "WEBP", exif=exif),
        "jpeg": encode(chelsea, "JPEG"),
        "empty": b"",
    }
    for name, data in refused.items():
        assert not plain_webp(data, max_pixels=10**8), name
    assert plain_webp(encode(chelsea, "WEBP", exif=Image.Exif()), max_pixels=10**8)  # EXIF without a rotation
    assert not plain_webp(webps["lossy"], max_pixels=chelsea.width * chelsea.height - 1)


def test_the_actors_host_threads_decode_plain_jpegs_and_webps_to_pillows_pixels() -> None:
    # libjpeg-turbo and libwebp straight into a tensor for plain JPEGs and WebPs, Pillow for the rest,
    # as views of the object store's bytes
    chelsea = photos()["chelsea"]
    plain = [encode(chelsea, "JPEG", quality=quality, subsampling=subsampling) for quality in (75, 95) for subsampling in (0, 2)]
    plain.append(encode(chelsea, "JPEG", progressive=True))
    awkward = awkward_images()
    others = [awkward[name] for name in ("cmyk_chelsea.jpg", "exif_rotated_rocket.jpg", "palette_animated.gif")]
    others += [encode(chelsea[:, :, 0], "JPEG"), *_webps().values()]
    for data in plain + others:
        pixels = decode_on_host(memoryview(pa.py_buffer(data)), max_pixels=MAX_PIXELS, device_can_decode=False)
        assert torch.equal(pixels, torch.from_numpy(decode_image(data, max_pixels=MAX_PIXELS)).permute(2, 0, 1))
    on_gpu = [decode_on_host(memoryview(data), max_pixels=MAX_PIXELS, device_can_decode=True) is None for data in plain + others]
    assert on_gpu == [True] * len(plain) + [False] * len(others)  # a GPU's nvjpeg takes only the plain JPEGs
    for broken in (truncated_jpeg(), _webps()["lossy"][:-100]):
        error = decode_on_host(memoryview(broken), max_pixels=MAX_PIXELS, device_can_decode=False)
        assert isinstance(error, DecodeError) and error.error_type == "truncated_image"
