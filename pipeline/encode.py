"""Encode stage: class maps and instance masks -> COCO RLE, boxes and per-class statistics.

Masks are run-length encoded column-major, exactly as pycocotools does, and ``mask_rle`` is
the compressed ``counts`` string: ``pycocotools.mask.decode({"size": [height, width],
"counts": mask_rle})`` returns the mask. Boxes are x1, y1, x2, y2 in pixel-edge coordinates of
the original image (a mask covering columns 3 to 5 has x1 = 3, x2 = 6); instance boxes are the
model's own. Rows come back without run_id/image_id/uri, which the caller adds.

The pixel work happens where the model's tensors are (the GPU in a GPU actor): :func:`map_runs`
finds the runs of whole batches of class maps or masks, and :func:`summarize_detections` the
runs and per-class union areas of an image's instance masks, so that only run starts and values
cross to the host, never a full-resolution map. The actors hand those on as
:data:`~pipeline.schema.RESULTS_SCHEMA` rows (:func:`results_table`), and :func:`encode_shards`,
a CPU task beside the write, turns them into RLE strings, boxes and table rows: the actors'
host time goes to feeding the GPU, and the string building to the CPUs the actors leave idle.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.schema import (
    CLASS_STATS_SCHEMA, MASKS_SCHEMA, RESULTS_SCHEMA, nest, rows_to_table, single_array, unnest, with_stage_seconds,
)  # fmt: skip

# The functions that take tensors import torch themselves: they run in the model actors, while
# the encode tasks only build strings and rows, and a worker process that imports torch grows by
# about 480 MiB and takes a second or two longer to start.
if TYPE_CHECKING:
    import torch

# torch calls the API beta once per process; the union areas rely only on its documented "amax".
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta", category=UserWarning)

_UNION_PIXELS_PER_STEP = 2**20
"""Pixels of an image's masks that the union's product takes at once: its bf16 copy of them stays
within 200 MB for 100 masks, whatever the image's size."""


@dataclass(frozen=True)
class Runs:
    """The column-major runs of one ``height`` x ``width`` integer map: the flat index where
    each run starts (int64, ascending, the first 0) and the value it holds."""

    starts: np.ndarray
    values: np.ndarray
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """The map's ``(height, width)``, as :attr:`Detections.shape` gives an image's."""
        return self.height, self.width


@dataclass(frozen=True)
class EncodedMask:
    """One binary mask of an ``height`` x ``width`` image: its area, bounding box and RLE
    (``None`` for a detection model's box, which has no mask)."""

    area: int
    bbox: tuple[float, float, float, float]
    rle: str | None


def map_runs(maps: torch.Tensor) -> list[Runs]:
    """Runs of each map of an integer or boolean ``(N, H, W)`` tensor, found on its device."""
    import torch

    count, height, width = maps.shape
    flat = maps.transpose(1, 2).reshape(count, height * width)
    starts_run = torch.ones_like(flat, dtype=torch.bool)
    torch.ne(flat[:, 1:], flat[:, :-1], out=starts_run[:, 1:])
    map_index, starts = starts_run.nonzero(as_tuple=True)
    map_index, starts, values = to_host(map_index, starts, flat[map_index, starts])
    values = values.astype(np.int64)
    bounds = np.searchsorted(map_index, np.arange(count + 1))
    return [Runs(starts[first:last], values[first:last], height, width) for first, last in zip(bounds[:-1], bounds[1:])]


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """The tensors' values on the host, copied together: from a GPU, one wait for the device
    rather than one per tensor (each wait may also wait for other processes' time on the GPU)."""
    import torch

    copies = [tensor.to("cpu", non_blocking=True) for tensor in tensors]
    device = next((tensor.device for tensor in tensors if tensor.is_cuda), None)
    if device is not None:
        torch.cuda.current_stream(device).synchronize()
    return [copy.numpy() for copy in copies]


def rle_string(counts: np.ndarray) -> str:
    """COCO's compressed form of run lengths (``rleToString`` in pycocotools' maskApi.c): each
    count (from the third on, its difference to the count two before) in 5-bit groups, least
    significant first, with a continuation bit, as characters from 48."""
    return _rle_strings(counts, np.zeros(1, dtype=np.int64))[0]


def _rle_strings(counts: np.ndarray, offsets: np.ndarray) -> list[str]:
    """:func:`rle_string` of several masks at once: their counts concatenated, each mask's
    starting at its entry of ``offsets``."""
    deltas = counts.astype(np.int64)
    from_third = np.flatnonzero(_positions_within(np.diff(np.append(offsets, counts.size))) >= 3)
    deltas[from_third] -= counts[from_third - 2]
    # Characters per count: enough 5-bit groups to hold it and its sign bit.
    magnitude = np.where(deltas < 0, ~deltas, deltas)
    most = int(magnitude.max()).bit_length() // 5 + 1
    emitted = np.ones(deltas.size, dtype=np.int64) + sum(magnitude >= 1 << (5 * groups - 1) for groups in range(1, most))
    of_count = np.repeat(np.arange(deltas.size), emitted)
    group = _positions_within(emitted)
    codes = (deltas[of_count] >> (5 * group)) & 0x1F | np.where(group < emitted[of_count] - 1, 0x20, 0)
    text = (codes + 48).astype(np.uint8).tobytes().decode("ascii")
    bounds = np.append(0, np.cumsum(np.add.reduceat(emitted, offsets))).tolist()
    return [text[first:last] for first, last in zip(bounds[:-1], bounds[1:])]


def _positions_within(lengths: np.ndarray) -> np.ndarray:
    """For consecutive segments of these ``lengths``, each element's position in its segment."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def encode_runs(runs: Runs) -> dict[int, EncodedMask]:
    """One mask per value present in a map's runs, keyed by value."""
    ends = np.append(runs.starts[1:], runs.height * runs.width)
    by_value = np.argsort(runs.values, kind="stable")
    return _encode_keyed_runs(runs.values[by_value], runs.starts[by_value], ends[by_value], height=runs.height, width=runs.width)


def encode_masks(masks: list[Runs]) -> list[EncodedMask | None]:
    """Each binary mask's (``None`` where it is empty), encoded together: one pass for all of
    an image's instances rather than one per instance."""
    if not masks:
        return []
    height, width = masks[0].height, masks[0].width
    starts = np.concatenate([mask.starts for mask in masks])
    ends = np.concatenate([np.append(mask.starts[1:], height * width) for mask in masks])
    of_mask = np.repeat(np.arange(len(masks)), [len(mask.starts) for mask in masks])
    ones = np.concatenate([mask.values for mask in masks]) == 1
    encoded = _encode_keyed_runs(of_mask[ones], starts[ones], ends[ones], height=height, width=width)
    return [encoded.get(index) for index in range(len(masks))]


def _encode_keyed_runs(keys: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, height: int, width: int) -> dict[int, EncodedMask]:
    """One mask per key from the runs that it covers: ``keys`` grouped, and each key's runs in
    column-major order."""
    if keys.size == 0:
        return {}
    total = height * width
    first = np.flatnonzero(np.append(True, keys[1:] != keys[:-1]))
    last = np.append(first[1:], keys.size) - 1
    lengths = ends - starts
    gaps = starts - np.append(0, ends[:-1])
    gaps[first] = starts[first]
    tails = total - ends[last]
    # Per key: gap, length for each run, then the zeros after the last run unless there are none.
    counts = np.insert(np.stack([gaps, lengths], axis=1).ravel(), 2 * last[tails > 0] + 2, tails[tails > 0])
    counts_per_key = 2 * (last - first + 1) + (tails > 0)
    strings = _rle_strings(counts, np.append(0, np.cumsum(counts_per_key)[:-1]))
    first_column, last_column = starts // height, (ends - 1) // height
    one_column = first_column == last_column
    # A run that wraps into the next column covers the bottom of one and the top of the other.
    top = np.where(one_column, starts % height, 0)
    bottom = np.where(one_column, (ends - 1) % height, height - 1)
    boxes = np.stack([
        np.minimum.reduceat(first_column, first),
        np.minimum.reduceat(top, first),
        np.maximum.reduceat(last_column, first) + 1,
        np.maximum.reduceat(bottom, first) + 1,
    ], axis=1).astype(float).tolist()  # fmt: skip
    areas = np.add.reduceat(lengths, first).tolist()
    return {
        key: EncodedMask(area=area, bbox=tuple(box), rle=rle)
        for key, area, box, rle in zip(keys[first].tolist(), areas, boxes, strings)
    }


def encode_class_map(class_map: np.ndarray) -> dict[int, EncodedMask]:
    """One mask per class present in an ``(H, W)`` integer class map, keyed by class id."""
    import torch

    return encode_runs(map_runs(torch.from_numpy(np.ascontiguousarray(class_map))[None])[0])


def encode_mask(mask: np.ndarray) -> EncodedMask | None:
    """A binary ``(H, W)`` mask, or ``None`` when it is empty."""
    return encode_class_map(mask.astype(np.uint8, copy=False)).get(1)


def semantic_rows(runs: Runs, categories: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """``masks`` and ``class_stats`` rows of one image from its class map's runs: one ``class``
    mask per class present."""
    height, width = runs.height, runs.width
    masks, stats = [], []
    for index, (class_id, encoded) in enumerate(sorted(encode_runs(runs).items())):
        label = categories[class_id]
        masks.append(_mask_row(index, "class", class_id, label, None, encoded.bbox, encoded, height, width))
        stats.append(_stats_row(class_id, label, encoded.area, height * width, None, None))
    return masks, stats


@dataclass(frozen=True)
class Detections:
    """One image's kept detections, on the host: boxes ``(K, 4)`` x1, y1, x2, y2, labels ``(K,)``,
    scores ``(K,)``, for instance models the runs of each binary mask (``None`` for detection
    models), and the pixels covered by the union of each class's masks (or boxes)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: list[Runs] | None
    class_pixels: dict[int, int]
    shape: tuple[int, int]
    """The image's ``(height, width)``."""


def summarize_detections(
    boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor | None, *, height: int, width: int
) -> Detections:
    """:class:`Detections` of one image from its tensors (``masks``: boolean ``(K, H, W)``), with
    the runs and the union areas computed on the tensors' device."""
    covered = masks if masks is not None else _box_masks(boxes, height, width)
    classes, class_of_mask = labels.unique(return_inverse=True)
    covered = covered.reshape(len(labels), height * width)
    union_pixels = union_pixels_of_classes(covered, class_of_mask, len(classes), by_product=covered.is_cuda)
    boxes, labels, scores, classes, union_pixels = to_host(boxes, labels, scores, classes, union_pixels)
    return Detections(
        boxes=boxes,
        labels=labels,
        scores=scores,
        masks=None if masks is None else map_runs(masks),
        class_pixels=dict(zip(classes.tolist(), union_pixels.tolist())),
        shape=(height, width),
    )


def union_pixels_of_classes(covered: torch.Tensor, class_of_mask: torch.Tensor, classes: int, *, by_product: bool) -> torch.Tensor:
    """Per class, the pixels that at least one of its masks covers: int64 ``(classes,)`` from
    boolean ``(K, P)`` masks and each one's class (``(K,)``, in ``range(classes)``).

    ``by_product`` (for GPUs): the product of the classes' one-hot rows with the masks counts
    each pixel's masks per class, on tensor cores in bf16 (a sum of 0/1 products cannot round to
    zero), with no atomics. Otherwise (for CPUs): the per-class maximum over bytes that view the
    booleans in place, which copies nothing (on the 2-core machine 6.6 ms, where a float copy of
    every mask cost 111); on a GPU its scatter retries a compare-and-swap on the word around each
    byte wherever masks of a class overlap, since there is no atomic maximum of a byte."""
    import torch

    if not by_product:
        union = covered.new_zeros((classes, covered.shape[1]), dtype=torch.uint8)
        union.index_reduce_(0, class_of_mask, covered.view(torch.uint8), "amax")
        return union.sum(1, dtype=torch.int64)
    dtype = torch.bfloat16 if covered.is_cuda else torch.float32
    members = (class_of_mask[None, :] == torch.arange(classes, device=covered.device)[:, None]).to(dtype)
    counts = [((members @ pixels.to(dtype)) > 0).sum(1) for pixels in covered.split(_UNION_PIXELS_PER_STEP, dim=1)]
    return torch.stack(counts).sum(0)


def instance_rows(detections: Detections, categories: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """``masks`` and ``class_stats`` rows of one image from its kept detections.

    Instance models give ``instance`` rows with RLE masks; detection models ``box`` rows whose
    ``mask_rle`` is null and whose ``area`` is the box's. ``class_stats.pixel_count`` counts the
    pixels covered by the union of a class's masks (or boxes).
    """
    height, width = detections.shape
    mask_rows = []
    encoded_masks = encode_masks(detections.masks) if detections.masks is not None else []
    for index, class_id in enumerate(detections.labels.tolist()):
        box = tuple(float(v) for v in detections.boxes[index])
        if detections.masks is None:
            x1, y1, x2, y2 = box
            encoded = EncodedMask(area=round((x2 - x1) * (y2 - y1)), bbox=box, rle=None)
        else:
            encoded = encoded_masks[index] or _empty_mask(height * width)
        kind = "box" if detections.masks is None else "instance"
        score = float(detections.scores[index])
        mask_rows.append(_mask_row(index, kind, class_id, categories[class_id], score, box, encoded, height, width))
    stats = []
    for class_id, pixels in sorted(detections.class_pixels.items()):
        of_class = detections.labels == class_id
        instances, mean_score = int(of_class.sum()), float(detections.scores[of_class].mean())
        stats.append(_stats_row(class_id, categories[class_id], pixels, height * width, instances, mean_score))
    return mask_rows, stats


def _box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes rasterised to boolean ``(K, H, W)`` masks: the pixels whose centres they contain."""
    import torch

    rows = torch.arange(height, device=boxes.device)[None, :, None] + 0.5
    columns = torch.arange(width, device=boxes.device)[None, None, :] + 0.5
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


def mask_count(output: Runs | Detections) -> int:
    """The ``masks`` rows an image's model output gives: one per class present, or one per detection."""
    if isinstance(output, Runs):
        return int(np.count_nonzero(np.bincount(output.values)))
    return len(output.labels)


def results_table(outputs: list[tuple[str, str, Runs | Detections]]) -> pa.Table:
    """:data:`~pipeline.schema.RESULTS_SCHEMA` rows of ``(image_id, uri, model output)`` of ok
    images: a class map's :class:`Runs`, or :class:`Detections`."""
    maps = [[output] if isinstance(output, Runs) else output.masks or [] for _, _, output in outputs]
    detections = [None if isinstance(output, Runs) else output for _, _, output in outputs]
    shapes = [output.shape for _, _, output in outputs]
    # Each list cell is given as the parts that it concatenates: an image's runs are those of all its maps.
    columns = {
        "image_id": pa.array([image_id for image_id, _, _ in outputs], pa.string()),
        "uri": pa.array([uri for _, uri, _ in outputs], pa.string()),
        "height": pa.array([height for height, _ in shapes], pa.int32()),
        "width": pa.array([width for _, width in shapes], pa.int32()),
        "run_starts": [[runs.starts for runs in image_maps] for image_maps in maps],
        "run_values": [[runs.values for runs in image_maps] for image_maps in maps],
        "runs_per_map": [
            None if found is None or found.masks is None else [[len(runs.starts) for runs in image_maps]]
            for found, image_maps in zip(detections, maps)
        ],
        "boxes": [None if found is None else [found.boxes.ravel()] for found in detections],
        "labels": [None if found is None else [found.labels] for found in detections],
        "scores": [None if found is None else [found.scores] for found in detections],
        "class_ids": [None if found is None else [list(found.class_pixels)] for found in detections],
        "class_pixels": [None if found is None else [list(found.class_pixels.values())] for found in detections],
    }
    return pa.table(
        {
            name: column if isinstance(column, pa.Array) else _list_array(column, RESULTS_SCHEMA.field(name).type)
            for name, column in columns.items()
        },
        schema=RESULTS_SCHEMA,
    )


def model_outputs(results: pa.Table) -> list[tuple[str, str, Runs | Detections]]:
    """The ``(image_id, uri, model output)`` of each :data:`~pipeline.schema.RESULTS_SCHEMA` row:
    :func:`results_table` read back."""
    lists = {name: _list_values(results.column(name)) for name in RESULTS_SCHEMA.names[4:]}
    outputs = []
    for row, (image_id, uri, height, width) in enumerate(
        zip(*(results.column(name).to_pylist() for name in ("image_id", "uri", "height", "width")))
    ):
        starts, values = lists["run_starts"][row], lists["run_values"][row]
        if lists["boxes"][row] is None:
            outputs.append((image_id, uri, Runs(starts, values, height, width)))
            continue
        runs_per_map = lists["runs_per_map"][row]
        masks = None
        if runs_per_map is not None:
            bounds = np.append(0, np.cumsum(runs_per_map))
            masks = [Runs(starts[first:last], values[first:last], height, width) for first, last in zip(bounds[:-1], bounds[1:])]
        detections = Detections(
            boxes=lists["boxes"][row].reshape(-1, 4),
            labels=lists["labels"][row],
            scores=lists["scores"][row],
            masks=masks,
            class_pixels=dict(zip(lists["class_ids"][row].tolist(), lists["class_pixels"][row].tolist())),
            shape=(height, width),
        )
        outputs.append((image_id, uri, detections))
    return outputs


def _list_array(rows: list[list[Sequence] | None], list_type: pa.LargeListType) -> pa.LargeListArray:
    """A list array whose cells are the concatenated parts of ``rows`` (``None`` for a null),
    without a Python loop over the values, which are copied once."""
    lengths = np.array([0 if row is None else sum(len(part) for part in row) for row in rows], dtype=np.int64)
    dtype = list_type.value_type.to_pandas_dtype()  # also for empty parts: a float64 one would make the values float64
    parts = [np.asarray(part, dtype=dtype) for row in rows if row is not None for part in row]
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    nulls = pa.array([row is None for row in rows]) if any(row is None for row in rows) else None
    return pa.LargeListArray.from_arrays(
        np.append(0, np.cumsum(lengths)), pa.array(values, type=list_type.value_type), type=list_type, mask=nulls
    )


def _list_values(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Each row of a list column as a numpy view of its values, ``None`` for a null."""
    array = column.combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy()
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [values[first:last] if is_valid else None for first, last, is_valid in zip(offsets[:-1], offsets[1:], valid)]


def encode_shards(batch: pa.Table, *, categories: dict[str, tuple[str, ...]]) -> pa.Table:
    """Ray Data batch function (CPU tasks): rows of one shard's model results per run (columns
    ``shard_id``, ``run_id``, ``model``, ``stage_seconds``, ``images`` and ``results``) -> the
    same rows with ``masks`` and ``class_stats`` in place of ``results``; ``categories``: the
    category names by run id. Its seconds are added to ``stage_seconds`` as ``encode``."""
    masks_cells, stats_cells, seconds = [], [], []
    for row in range(batch.num_rows):
        started = time.perf_counter()
        run_id = batch.column("run_id")[row].as_py()
        masks, stats = [], []
        for image_id, uri, output in model_outputs(unnest(batch.column("results")[row], RESULTS_SCHEMA)):
            rows_of = semantic_rows if isinstance(output, Runs) else instance_rows
            image_masks, image_stats = rows_of(output, categories[run_id])
            key = {"run_id": run_id, "image_id": image_id}
            masks += [{**key, "uri": uri, **mask} for mask in image_masks]
            stats += [{**key, **stat} for stat in image_stats]
        masks_cells.append(nest(rows_to_table(masks, MASKS_SCHEMA)))
        stats_cells.append(nest(rows_to_table(stats, CLASS_STATS_SCHEMA)))
        seconds.append(with_stage_seconds(batch.column("stage_seconds")[row].as_py(), "encode", time.perf_counter() - started))
    kept = batch.drop_columns(["results", "stage_seconds"])
    return kept.append_column("stage_seconds", pa.array(seconds, pa.string())).append_column(
        "masks", single_array(masks_cells)
    ).append_column("class_stats", single_array(stats_cells))
