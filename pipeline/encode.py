"""Encode stage: class maps and instance masks -> COCO RLE, boxes and per-class statistics.

Masks are run-length encoded column-major, exactly as pycocotools does, and ``mask_rle`` is
the compressed ``counts`` string: ``pycocotools.mask.decode({"size": [height, width],
"counts": mask_rle})`` returns the mask. Boxes are x1, y1, x2, y2 in pixel-edge coordinates of
the original image (a mask covering columns 3 to 5 has x1 = 3, x2 = 6); instance boxes are the
model's own. Rows come back without run_id/image_id/uri, which the caller adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncodedMask:
    """One binary mask of an ``height`` x ``width`` image: its area, bounding box and RLE
    (``None`` for a detection model's box, which has no mask)."""

    area: int
    bbox: tuple[float, float, float, float]
    rle: str | None


def rle_string(counts: np.ndarray) -> str:
    """COCO's compressed form of run lengths (``rleToString`` in pycocotools' maskApi.c)."""
    deltas = counts.astype(np.int64)
    deltas[3:] -= counts[1:-2]
    out = bytearray()
    for value in deltas.tolist():
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            out.append((chunk | 0x20 if more else chunk) + 48)
    return out.decode("ascii")


def encode_class_map(class_map: np.ndarray) -> dict[int, EncodedMask]:
    """One mask per class present in an ``(H, W)`` integer class map, keyed by class id."""
    height, width = class_map.shape
    flat = np.ascontiguousarray(class_map.T).ravel()  # column-major pixel order, as COCO's RLE
    total = flat.size
    boundaries = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [total]))
    values = flat[starts]
    encoded: dict[int, EncodedMask] = {}
    for class_id in np.unique(values).tolist():
        selected = values == class_id
        run_starts, run_ends = starts[selected], ends[selected]
        counts = np.empty(2 * run_starts.size + 1, dtype=np.int64)
        counts[0] = run_starts[0]
        counts[2:-1:2] = run_starts[1:] - run_ends[:-1]
        counts[1::2] = run_ends - run_starts
        counts[-1] = total - run_ends[-1]
        if counts[-1] == 0:
            counts = counts[:-1]
        encoded[class_id] = EncodedMask(
            area=int((run_ends - run_starts).sum()),
            bbox=_runs_bbox(run_starts, run_ends, height),
            rle=rle_string(counts),
        )
    return encoded


def encode_mask(mask: np.ndarray) -> EncodedMask | None:
    """A binary ``(H, W)`` mask, or ``None`` when it is empty."""
    return encode_class_map(mask.astype(np.uint8, copy=False)).get(1)


def _runs_bbox(starts: np.ndarray, ends: np.ndarray, height: int) -> tuple[float, float, float, float]:
    first_column, last_column = starts // height, (ends - 1) // height
    one_column = first_column == last_column
    # A run that wraps into the next column covers the bottom of one and the top of the other.
    top = np.where(one_column, starts % height, 0)
    bottom = np.where(one_column, (ends - 1) % height, height - 1)
    return (
        float(first_column.min()),
        float(top.min()),
        float(last_column.max() + 1),
        float(bottom.max() + 1),
    )


def semantic_rows(class_map: np.ndarray, categories: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """``masks`` and ``class_stats`` rows of one image: one ``class`` mask per class present."""
    height, width = class_map.shape
    masks, stats = [], []
    for index, (class_id, encoded) in enumerate(sorted(encode_class_map(class_map).items())):
        label = categories[class_id]
        masks.append(_mask_row(index, "class", class_id, label, None, encoded.bbox, encoded, height, width))
        stats.append(_stats_row(class_id, label, encoded.area, height * width, None, None))
    return masks, stats


@dataclass(frozen=True)
class Detections:
    """One image's kept detections: boxes ``(K, 4)`` x1, y1, x2, y2, labels ``(K,)``, scores
    ``(K,)`` and, for instance models, boolean masks ``(K, H, W)`` (``None`` for detection models)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None


def instance_rows(
    detections: Detections, categories: tuple[str, ...], *, height: int, width: int
) -> tuple[list[dict], list[dict]]:
    """``masks`` and ``class_stats`` rows of one image from its kept detections.

    Instance models give ``instance`` rows with RLE masks; detection models ``box`` rows whose
    ``mask_rle`` is null and whose ``area`` is the box's. ``class_stats.pixel_count`` counts the
    pixels covered by the union of a class's masks (or boxes).
    """
    covered = detections.masks if detections.masks is not None else _box_masks(detections.boxes, height, width)
    mask_rows = []
    for index, class_id in enumerate(detections.labels.tolist()):
        box = tuple(float(v) for v in detections.boxes[index])
        if detections.masks is None:
            x1, y1, x2, y2 = box
            encoded = EncodedMask(area=round((x2 - x1) * (y2 - y1)), bbox=box, rle=None)
        else:
            encoded = encode_mask(detections.masks[index]) or _empty_mask(height * width)
        kind = "box" if detections.masks is None else "instance"
        score = float(detections.scores[index])
        mask_rows.append(_mask_row(index, kind, class_id, categories[class_id], score, box, encoded, height, width))
    stats = []
    for class_id in sorted(set(detections.labels.tolist())):
        of_class = detections.labels == class_id
        pixels = int(np.logical_or.reduce(covered[of_class], axis=0).sum())
        instances, mean_score = int(of_class.sum()), float(detections.scores[of_class].mean())
        stats.append(_stats_row(class_id, categories[class_id], pixels, height * width, instances, mean_score))
    return mask_rows, stats


def _box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boxes rasterised to boolean ``(K, H, W)`` masks: the pixels whose centres they contain."""
    rows = np.arange(height)[None, :, None] + 0.5
    columns = np.arange(width)[None, None, :] + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    return (columns >= x1) & (columns < x2) & (rows >= y1) & (rows < y2)


def _empty_mask(pixels: int) -> EncodedMask:
    return EncodedMask(area=0, bbox=(0.0, 0.0, 0.0, 0.0), rle=rle_string(np.array([pixels], dtype=np.int64)))


def _mask_row(
    index: int,
    kind: str,
    class_id: int,
    label: str,
    score: float | None,
    bbox: tuple[float, float, float, float],
    encoded: EncodedMask,
    height: int,
    width: int,
) -> dict:
    x1, y1, x2, y2 = bbox
    return {
        "mask_index": index,
        "kind": kind,
        "class_id": class_id,
        "label": label,
        "score": score,
        "bbox_x1": x1,
        "bbox_y1": y1,
        "bbox_x2": x2,
        "bbox_y2": y2,
        "area": encoded.area,
        "height": height,
        "width": width,
        "mask_rle": encoded.rle,
    }


def _stats_row(
    class_id: int, label: str, pixels: int, total: int, instances: int | None, mean_score: float | None
) -> dict:
    return {
        "class_id": class_id,
        "label": label,
        "pixel_count": pixels,
        "pixel_fraction": pixels / total,
        "instance_count": instances,
        "mean_score": mean_score,
    }
