"""JPEG corpora for the benchmarks: photo-like crops and rescales of scikit-image's photos, or
synthetic shapes (what the shipped ``shapes`` weights segment correctly).

Decode cost depends on content, so the photos are real photo content, not smooth noise; the
same ``seed`` gives the same bytes, so files already there are kept (a second benchmark in the
same ``--workdir`` reuses them: each size, seed and quality has a folder of its own, which holds
exactly the images asked for), and the rest are made by one process per CPU. Corpora larger
than :data:`DISTINCT_IMAGES` repeat them through hard links, so that runs long enough to
amortise start-up cost seconds to set up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample import encode, photos
from jobs.synth import render


DISTINCT_IMAGES = 4096
"""Images made per corpus; files beyond them are hard links to them, which cost a read and a
decode each like any other file, but no time or disk to make."""


@cache
def _photo_sources() -> tuple[np.ndarray, ...]:
    """scikit-image's photos, read once per process (each image is cut from one)."""
    return tuple(photos().values())


def _photo(rng: np.random.Generator, index: int, width: int, height: int) -> Image.Image:
    sources = _photo_sources()
    source = sources[index % len(sources)]
    scale = rng.uniform(0.6, 1.0)
    crop_height, crop_width = int(source.shape[0] * scale), int(source.shape[1] * scale)
    top = rng.integers(0, source.shape[0] - crop_height + 1)
    left = rng.integers(0, source.shape[1] - crop_width + 1)
    crop = Image.fromarray(source[top : top + crop_height, left : left + crop_width])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize((width, height), Image.Resampling.BILINEAR)


def _shapes(rng: np.random.Generator, index: int, width: int, height: int) -> Image.Image:
    pixels, _, _ = render(rng, max(width, height))
    return Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)


def _write_all(prefix: str, make: Callable[..., Image.Image], directory: Path, *, count: int, width: int, height: int,
               seed: int, quality: int) -> Path:  # fmt: skip
    directory = directory / f"{prefix}-{width}x{height}-seed{seed}-quality{quality}"
    directory.mkdir(parents=True, exist_ok=True)
    made = min(count, DISTINCT_IMAGES)
    missing = [index for index in range(made) if not _path(directory, prefix, index).exists()]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(partial(_write_one, directory, prefix, make, width, height, seed, quality), missing, chunksize=16))
    for index in range(made, count):
        link = _path(directory, prefix, index)
        if not link.exists():
            os.link(_path(directory, prefix, index % made), link)
    for path in directory.glob(f"{prefix}-*.jpg"):  # left by a larger count: the runs read the whole folder
        if int(path.stem.rpartition("-")[2]) >= count:
            path.unlink()
    return directory


def _write_one(directory: Path, prefix: str, make: Callable[..., Image.Image], width: int, height: int, seed: int,
               quality: int, index: int) -> None:  # fmt: skip
    image = make(np.random.default_rng([seed, index]), index, width, height)
    _path(directory, prefix, index).write_bytes(encode(image, "JPEG", quality=quality))


def _path(directory: Path, prefix: str, index: int) -> Path:
    return directory / f"{prefix}-{index:06d}.jpg"


def write_jpegs(directory: Path, *, count: int, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    """A folder under ``directory`` (one per size, seed and quality) holding exactly ``count``
    JPEGs of ``width`` x ``height``; returns it."""
    return _write_all("image", _photo, directory, count=count, width=width, height=height, seed=seed, quality=quality)


def write_shapes(directory: Path, *, count: int, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    """As :func:`write_jpegs`, of synthetic shapes."""
    return _write_all("shapes", _shapes, directory, count=count, width=width, height=height, seed=seed, quality=quality)


CORPORA = {"photos": write_jpegs, "shapes": write_shapes}


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)
