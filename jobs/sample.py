"""Build the small sample archive that ``make run`` segments: ``python -m jobs.sample DIR``.

Real photos bundled with scikit-image, as loose JPEGs, a WebDataset-style ``.tar`` shard and a
Parquet file with an image-bytes column; awkward but valid images (grayscale, palette GIF,
RGBA, CMYK, 16-bit, EXIF-rotated, WebP, BMP, TIFF); one truncated JPEG, which becomes an error
row; and synthetic shape images (``segpipe synth``'s renderer, a seed no training set used) on
which the shipped ``shapes`` presets show correct masks. The tests reuse these makers.
Everything is deterministic: same bytes every time.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.synth import render

_EXIF_ORIENTATION = 0x0112
SHAPES_SEED = 1000  # no training or evaluation set uses it
SHAPE_IMAGES = 8


def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled RGB photos, by name."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


def encode(pixels: np.ndarray | Image.Image, image_format: str, **options: object) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def awkward_images() -> dict[str, bytes]:
    """Valid images in the modes and containers that need converting to RGB, by file name."""
    import skimage.data

    chelsea = skimage.data.chelsea()
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    first, second = Image.fromarray(skimage.data.coffee()).convert("P"), Image.fromarray(chelsea).convert("P")
    return {
        "gray_camera.png": encode(skimage.data.camera(), "PNG"),
        "palette_animated.gif": encode(first, "GIF", save_all=True, append_images=[second]),
        "rgba_logo.png": encode(skimage.data.logo(), "PNG"),
        "cmyk_chelsea.jpg": encode(Image.fromarray(chelsea).convert("CMYK"), "JPEG", quality=90),
        "sixteen_bit_coins.png": encode(Image.fromarray(skimage.data.coins().astype(np.uint16) * 257), "PNG"),
        "exif_rotated_rocket.jpg": encode(skimage.data.rocket(), "JPEG", quality=90, exif=exif),
        "chelsea.webp": encode(chelsea, "WEBP", quality=80),
        "chelsea.bmp": encode(chelsea, "BMP"),
        "chelsea.tiff": encode(chelsea, "TIFF"),
    }


def tar_of(members: dict[str, bytes]) -> bytes:
    """A WebDataset-style tar holding ``members`` (name -> bytes), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def shape_pngs(count: int, *, seed: int, size: int) -> dict[str, bytes]:
    """``count`` synthetic shape images (``segpipe synth``'s renderer), PNG by file name."""
    return {
        f"shapes-{index:02d}.png": encode(render(np.random.default_rng([seed, index]), size)[0], "PNG")
        for index in range(count)
    }


def truncated_jpeg() -> bytes:
    data = encode(photos()["astronaut"], "JPEG", quality=90)
    return data[: len(data) // 3]


def damaged_copies(data: bytes, *, cuts: int, corruptions: int, rng: np.random.Generator) -> list[bytes]:
    """``cuts`` copies of ``data`` cut short at random places, then ``corruptions`` copies with one
    to eight of its bytes overwritten at random: what interrupted uploads and bad disks leave."""
    damaged = [data[:cut] for cut in rng.integers(1, len(data), cuts)]
    for _ in range(corruptions):
        corrupted = np.frombuffer(data, dtype=np.uint8).copy()
        positions = rng.integers(0, len(data), rng.integers(1, 9))
        corrupted[positions] = rng.integers(0, 256, len(positions))
        damaged.append(corrupted.tobytes())
    return damaged


def build_sample(directory: Path) -> None:
    """Write the sample archive under ``directory`` (replacing files of the same names)."""
    loose = directory / "photos"
    loose.mkdir(parents=True, exist_ok=True)
    jpegs = {f"{name}.jpg": encode(pixels, "JPEG", quality=90) for name, pixels in photos().items()}
    for name, data in {**jpegs, **awkward_images(), "truncated.jpg": truncated_jpeg()}.items():
        (loose / name).write_bytes(data)
    shards = directory / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "photos-000000.tar").write_bytes(tar_of({f"sample-{name}": data for name, data in jpegs.items()}))
    table = pa.table({"key": list(jpegs), "image": pa.array(list(jpegs.values()), type=pa.binary())})
    pq.write_table(table, shards / "photos-000001.parquet")
    shapes = directory / "shapes"
    shapes.mkdir(exist_ok=True)
    for name, data in shape_pngs(SHAPE_IMAGES, seed=SHAPES_SEED, size=192).items():
        (shapes / name).write_bytes(data)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "sample")
    build_sample(target)
    print(f"sample archive written to {target}/")
