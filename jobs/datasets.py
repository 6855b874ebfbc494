"""Labelled data in segpipe's layout (what ``segpipe synth`` writes), from any fsspec URI.

- ``instances.json``: COCO format. It lists the images (``file_name`` relative to the data
  root), names the categories (class id = COCO category id; 0 is background) and holds the
  instances (RLE or polygon segmentations). Always required.
- ``labels/<image stem>.png``: class per pixel, 255 ignored. Required for semantic models.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import pycocotools.mask as coco_mask
from PIL import Image

from pipeline.decode import decode_image
from pipeline.errors import InputError

IGNORE_INDEX = 255
_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Sample:
    """One image with its annotations: ``label`` (H, W) uint8 or None; ``masks`` (K, H, W) bool,
    ``classes`` (K,) and ``boxes`` (K, 4) x1, y1, x2, y2 in pixel-edge coordinates."""

    image_id: int
    image: np.ndarray
    label: np.ndarray | None
    classes: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


@dataclass(frozen=True)
class LabelledData:
    categories: tuple[str, ...]
    """Names by class id; index 0 is the background, gaps in the COCO ids are ``N/A``."""
    samples: list[Sample]
    coco: dict


def load_labelled(uri: str, *, with_labels: bool) -> LabelledData:
    """Every image of the dataset at ``uri``, decoded, with its instances (and label maps)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        coco = json.loads(fs.cat_file(f"{root}/instances.json"))
    except FileNotFoundError:
        raise InputError(f"{uri} has no instances.json: not a labelled dataset (see `segpipe synth`)") from None
    names = {category["id"]: category["name"] for category in coco["categories"]}
    categories = tuple(
        "background" if index == 0 else names.get(index, "N/A") for index in range(max(names, default=0) + 1)
    )
    paths = [f"{root}/{image['file_name']}" for image in coco["images"]]
    if with_labels:
        paths += [f"{root}/labels/{_stem(image['file_name'])}.png" for image in coco["images"]]
    contents = dict(zip(paths, fs.cat_ranges(paths, None, None, on_error="raise")))  # cat would read "[1].jpg" as a glob
    annotations: dict[int, list[dict]] = {}
    for annotation in coco["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    samples = []
    for entry in coco["images"]:
        image = decode_image(contents[f"{root}/{entry['file_name']}"], max_pixels=_MAX_PIXELS)
        label = None
        if with_labels:
            label = np.array(Image.open(io.BytesIO(contents[f"{root}/labels/{_stem(entry['file_name'])}.png"])))
        samples.append(_sample(entry, image, label, annotations.get(entry["id"], [])))
    return LabelledData(categories=categories, samples=samples, coco=coco)


def _sample(entry: dict, image: np.ndarray, label: np.ndarray | None, annotations: list[dict]) -> Sample:
    height, width = entry["height"], entry["width"]
    masks = np.zeros((len(annotations), height, width), dtype=bool)
    for index, annotation in enumerate(annotations):
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            segmentation = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        masks[index] = coco_mask.decode(segmentation).astype(bool)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    masks = masks[keep]
    classes = np.array([a["category_id"] for a in annotations], dtype=np.int64)[keep]
    return Sample(entry["id"], image, label, classes, masks, masks_to_boxes(masks))


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight x1, y1, x2, y2 boxes (pixel edges) of non-empty boolean ``(K, H, W)`` masks."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[index] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


def _stem(file_name: str) -> str:
    return posixpath.splitext(posixpath.basename(file_name))[0]
