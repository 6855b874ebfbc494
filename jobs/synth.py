"""``segpipe synth``: a deterministic labelled dataset of shapes, for training and evaluation.

Each image shows 2 to 5 overlapping circles, squares and triangles (rotated, in random
colours) on a textured background. Written under the output URI:

- ``images/NNNNN.png``: RGB, ``size`` x ``size`` pixels;
- ``labels/NNNNN.png``: class per pixel (0 background, 1 circle, 2 square, 3 triangle), with
  255 on a one-pixel band along every shape's visible outline (ignored, as in Pascal VOC);
- ``instances.json``: COCO format, one annotation per visible instance, RLE segmentation.

Image ``i`` depends only on ``(seed, i)``: the same seed gives the same bytes, and a larger
``count`` only adds images.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.encode import encode_mask
from pipeline.storage import write_object

CATEGORIES = ("background", "circle", "square", "triangle")
IGNORE = 255
_MIN_VISIBLE_FRACTION = 0.4


def synthesize(output: str, *, count: int, seed: int, size: int = 192) -> dict:
    """Write ``count`` images under ``output``; returns the COCO ``instances`` document."""
    root = output.rstrip("/")
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": index, "name": name} for index, name in enumerate(CATEGORIES) if index],
    }
    for index in range(count):
        image, labels, instances = render(np.random.default_rng([seed, index]), size)
        name = f"{index:05d}.png"
        write_object(f"{root}/images/{name}", _png(image))
        write_object(f"{root}/labels/{name}", _png(labels))
        coco["images"].append({"id": index + 1, "file_name": f"images/{name}", "height": size, "width": size})
        for class_id, mask in instances:
            encoded = encode_mask(mask)
            x1, y1, x2, y2 = encoded.bbox
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index + 1,
                    "category_id": class_id,
                    "segmentation": {"size": [size, size], "counts": encoded.rle},
                    "area": encoded.area,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    write_object(f"{root}/instances.json", json.dumps(coco).encode())
    return coco


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image: RGB pixels, the label map, and (class id, visible mask) per instance."""
    while True:
        image = _background(rng, size)
        owner = np.zeros((size, size), dtype=np.int32)  # which instance (1-based) is on top
        shapes = []
        for number in range(1, int(rng.integers(2, 6)) + 1):
            class_id = int(rng.integers(1, 4))
            mask = _shape_mask(rng, class_id, size)
            colour = rng.integers(0, 256, size=3)
            shade = rng.normal(0, 12, size=(size, size, 1))
            image = np.where(mask[..., None], np.clip(colour + shade, 0, 255), image)
            owner[mask] = number
            shapes.append((class_id, mask))
        visible = [(class_id, owner == number) for number, (class_id, _) in enumerate(shapes, start=1)]
        if all(v.sum() >= _MIN_VISIBLE_FRACTION * full.sum() for (_, v), (_, full) in zip(visible, shapes)):
            break  # every instance stays recognisable; otherwise draw the layout again
    labels = np.zeros((size, size), dtype=np.uint8)
    for class_id, mask in visible:
        labels[mask] = class_id
    for _, mask in visible:
        labels[mask & ~ndimage.binary_erosion(mask)] = IGNORE
    return image.astype(np.uint8), labels, visible


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour noise plus faint stripes: texture, not a flat colour."""
    cells = int(rng.integers(3, 9))
    coarse = rng.integers(0, 256, size=(cells, cells, 3)).astype(np.float64)
    smooth = ndimage.zoom(coarse, (size / cells, size / cells, 1), order=1)[:size, :size]
    y, x = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    stripes = 20 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(smooth + stripes[..., None] + rng.normal(0, 8, size=(size, size, 3)), 0, 255)


def _shape_mask(rng: np.random.Generator, class_id: int, size: int) -> np.ndarray:
    radius = rng.uniform(0.08, 0.22) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    canvas = Image.new("1", (size, size))
    draw = ImageDraw.Draw(canvas)
    if CATEGORIES[class_id] == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        corners = 4 if CATEGORIES[class_id] == "square" else 3
        rotation = rng.uniform(0, 2 * np.pi)
        angles = rotation + np.arange(corners) * 2 * np.pi / corners
        draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=1)
    return np.array(canvas, dtype=bool)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
