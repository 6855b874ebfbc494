"""Photo-like JPEG corpora for the benchmarks: crops and rescales of scikit-image's photos.

Decode cost depends on content, so the images are real photo content, not smooth noise; the
same ``seed`` gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample import encode, photos


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


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)
