"""JPEG corpora for the benchmarks: photo-like crops and rescales of scikit-image's photos, or
synthetic shapes (what the shipped ``shapes`` weights segment correctly).

Decode cost depends on content, so the photos are real photo content, not smooth noise; the
same ``seed`` gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample import encode, photos
from jobs.synth import render


def write_jpegs(directory: Path, *, count: int, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    """``count`` JPEGs of ``width`` x ``height`` under ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = list(photos().values())
    rng = np.random.default_rng(seed)
    for index in range(count):
        source = sources[index % len(sources)]
        scale = rng.uniform(0.6, 1.0)
        crop_height, crop_width = int(source.shape[0] * scale), int(source.shape[1] * scale)
        top = rng.integers(0, source.shape[0] - crop_height + 1)
        left = rng.integers(0, source.shape[1] - crop_width + 1)
        crop = Image.fromarray(source[top : top + crop_height, left : left + crop_width])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = crop.resize((width, height), Image.Resampling.BILINEAR)
        (directory / f"image-{index:06d}.jpg").write_bytes(encode(image, "JPEG", quality=quality))
    return directory


def write_shapes(directory: Path, *, count: int, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    """``count`` JPEGs of synthetic shapes, ``width`` x ``height``, under ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels, _, _ = render(np.random.default_rng([seed, index]), max(width, height))
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        (directory / f"shapes-{index:06d}.jpg").write_bytes(encode(image, "JPEG", quality=quality))
    return directory


CORPORA = {"photos": write_jpegs, "shapes": write_shapes}


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)
