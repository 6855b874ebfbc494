"""Encode stage: RLE round trips through pycocotools; boxes, areas and statistics add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pycocotools.mask as coco_mask
import pytest
import torch

from pipeline import encode
from pipeline.encode import (
    encode_class_map,
    encode_mask,
    encode_masks,
    encode_shards,
    instance_rows,
    map_runs,
    mask_count,
    model_outputs,
    results_table,
    semantic_rows,
    summarize_detections,
    union_pixels_of_classes,
)
from pipeline.schema import CLASS_STATS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, RESULTS_SCHEMA, nest, rows_to_table, unnest

CATEGORIES = tuple(f"c{i}" for i in range(6))
ROOT = Path(__file__).resolve().parents[1]


def _decode(rle: str, height: int, width: int) -> np.ndarray:
    return coco_mask.decode({"size": [height, width], "counts": rle}).astype(bool)


def _class_maps() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    maps = [rng.integers(0, 6, size=shape) for shape in [(1, 1), (1, 17), (17, 1), (31, 29), (64, 48)]]
    maps.append(np.kron(rng.integers(0, 4, size=(6, 8)), np.ones((9, 7), dtype=int)))  # blocky regions
    maps.append(np.zeros((20, 30), dtype=int))  # one class everywhere
    single = np.zeros((20, 30), dtype=int)
    single[19, 29] = 5  # one pixel in the last position
    maps.append(single)
    large = np.zeros((1500, 1100), dtype=int)  # runs longer than 2^20 pixels and deltas of either sign
    large[700:, 600:] = 1
    large[3, 3] = 2
    maps.append(large)
    return maps


@pytest.mark.parametrize("class_map", _class_maps(), ids=lambda m: "x".join(map(str, m.shape)))
def test_class_masks_match_pycocotools(class_map: np.ndarray) -> None:
    height, width = class_map.shape
    for class_id, encoded in encode_class_map(class_map).items():
        mask = class_map == class_id
        reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert encoded.rle == reference["counts"].decode()
        assert np.array_equal(_decode(encoded.rle, height, width), mask)
        assert encoded.area == mask.sum() == coco_mask.area(reference)
        rows, columns = np.nonzero(mask)
        assert encoded.bbox == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)


def test_random_binary_masks_round_trip() -> None:
    rng = np.random.default_rng(3)
    for density in (0.01, 0.5, 0.99):
        mask = rng.random((97, 131)) < density
        encoded = encode_mask(mask)
        assert encoded is not None
        assert np.array_equal(_decode(encoded.rle, 97, 131), mask)
    assert encode_mask(np.zeros((5, 5), dtype=bool)) is None


def test_masks_encoded_together_equal_pycocotools_one_by_one() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((12, 61, 47)) < rng.random((12, 1, 1))
    masks[3] = False  # empty
    masks[4] = True  # full
    masks[5, :, 20:] = True  # a block, then the zeros after it: no tail count
    encoded = encode_masks(map_runs(torch.from_numpy(masks)))
    assert encoded[3] is None
    for mask, one in zip(masks, encoded):
        if mask.any():
            assert one.rle == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
            assert one.area == mask.sum()


def test_runs_of_a_batch_are_each_maps_own() -> None:
    rng = np.random.default_rng(5)
    maps = rng.integers(0, 3, size=(4, 13, 9)).astype(np.uint8)
    maps[2] = 1  # a map with a single run
    for class_map, runs in zip(maps, map_runs(torch.from_numpy(maps))):
        column_major = class_map.T.ravel()
        assert runs.starts[0] == 0 and (runs.height, runs.width) == (13, 9)
        assert np.array_equal(np.repeat(runs.values, np.diff(np.append(runs.starts, column_major.size))), column_major)
    assert map_runs(torch.zeros((0, 5, 5), dtype=torch.uint8)) == []


def test_semantic_rows_partition_the_image() -> None:
    class_map = np.kron(np.arange(6).reshape(2, 3), np.ones((10, 10), dtype=int))
    masks, stats = semantic_rows(map_runs(torch.from_numpy(class_map)[None])[0], CATEGORIES)
    assert [row["class_id"] for row in masks] == list(range(6))
    assert all(row["kind"] == "class" and row["score"] is None for row in masks)
    decoded = np.stack([_decode(row["mask_rle"], 20, 30) for row in masks])
    assert (decoded.sum(axis=0) == 1).all()  # every pixel in exactly one class mask
    assert sum(row["pixel_count"] for row in stats) == 20 * 30
    assert sum(row["pixel_fraction"] for row in stats) == pytest.approx(1.0)
    assert masks[4]["bbox_x1"] == 10 and masks[4]["bbox_y1"] == 10 and masks[4]["bbox_x2"] == 20


def test_instance_rows_count_union_pixels_and_scores() -> None:
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, :5, :5] = True
    masks[1, 3:8, 3:8] = True  # overlaps the first by 4 pixels
    masks[2, 9, 9] = True
    boxes = np.array([[0, 0, 5, 5], [3, 3, 8, 8], [9, 9, 10, 10]], dtype=np.float32)
    labels = np.array([1, 1, 4])
    scores = np.array([0.9, 0.7, 0.6], dtype=np.float32)
    detections = summarize_detections(*map(torch.from_numpy, (boxes, labels, scores, masks)), height=10, width=10)
    rows, stats = instance_rows(detections, CATEGORIES)
    assert [(row["kind"], row["label"], row["area"]) for row in rows] == [
        ("instance", "c1", 25), ("instance", "c1", 25), ("instance", "c4", 1),
    ]  # fmt: skip
    assert rows[1]["bbox_x1"] == 3.0 and rows[1]["score"] == pytest.approx(0.7)
    by_class = {row["class_id"]: row for row in stats}
    assert by_class[1]["pixel_count"] == 46 and by_class[1]["instance_count"] == 2
    assert by_class[1]["mean_score"] == pytest.approx(0.8)
    assert by_class[4]["pixel_fraction"] == pytest.approx(0.01)


def test_union_areas_of_many_overlapping_masks_equal_numpys() -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((40, 30, 20)) > 0.8
    labels = rng.choice([1, 3, 5], size=40)
    boxes, scores = torch.zeros((40, 4)), torch.ones(40)
    detections = summarize_detections(boxes, torch.from_numpy(labels), scores, torch.from_numpy(masks), height=30, width=20)
    assert detections.class_pixels == {label: int(masks[labels == label].any(0).sum()) for label in (1, 3, 5)}


@pytest.mark.parametrize("by_product", [False, True], ids=["maximum (CPUs)", "product (GPUs)"])
def test_both_ways_to_the_union_areas_agree_with_numpy(by_product: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "_UNION_PIXELS_PER_STEP", 256)  # several steps of the product
    rng = np.random.default_rng(6)
    masks = rng.random((60, 37, 29)) > 0.7
    class_of_mask = rng.integers(0, 7, size=60)
    class_of_mask[class_of_mask == 4] = 5  # a class without masks
    union = union_pixels_of_classes(
        torch.from_numpy(masks).reshape(60, -1), torch.from_numpy(class_of_mask), 7, by_product=by_product
    )
    assert union.dtype == torch.int64
    assert union.tolist() == [int(masks[class_of_mask == c].any(0).sum()) for c in range(7)]
    no_masks, no_classes = torch.zeros((0, 50), dtype=torch.bool), torch.zeros(0, dtype=torch.int64)
    nothing = union_pixels_of_classes(no_masks, no_classes, 0, by_product=by_product)
    assert nothing.tolist() == []


def test_detection_rows_are_boxes_without_masks() -> None:
    boxes = np.array([[0, 0, 4, 5], [2, 2, 6, 6], [1.5, 0.5, 3.5, 2.5]], dtype=np.float32)
    labels, scores = torch.tensor([2, 2, 3]), torch.tensor([0.9, 0.8, 0.7])
    detections = summarize_detections(torch.from_numpy(boxes), labels, scores, None, height=10, width=10)
    rows, stats = instance_rows(detections, CATEGORIES)
    assert [(row["kind"], row["mask_rle"], row["area"]) for row in rows] == [("box", None, 20), ("box", None, 16), ("box", None, 4)]
    assert rows[2]["bbox_x1"] == 1.5 and rows[2]["bbox_y2"] == 2.5
    by_class = {row["class_id"]: row for row in stats}
    assert by_class[2]["pixel_count"] == 20 + 16 - 6  # the union of two overlapping boxes
    assert by_class[3]["pixel_count"] == 4 and by_class[3]["instance_count"] == 1


def test_model_outputs_cross_from_the_actors_to_the_encode_tasks_unchanged() -> None:
    rng = np.random.default_rng(11)
    class_map = map_runs(torch.from_numpy(rng.integers(0, 6, size=(31, 29))).to(torch.uint8)[None])[0]
    masks = torch.from_numpy(rng.random((3, 12, 10)) > 0.6)
    boxes = torch.tensor([[0, 0, 5, 5], [1, 2, 8, 9], [3, 3, 4, 4]], dtype=torch.float32)
    labels, scores = torch.tensor([1, 1, 4]), torch.tensor([0.9, 0.7, 0.6])
    instances = summarize_detections(boxes, labels, scores, masks, height=12, width=10)
    box_only = summarize_detections(boxes, labels, scores, None, height=12, width=10)
    nothing = summarize_detections(boxes[:0], labels[:0], scores[:0], masks[:0], height=12, width=10)
    outputs = [("a", "u/a", class_map), ("b", "u/b", instances), ("c", "u/c", box_only), ("d", "u/d", nothing)]

    results = unnest(nest(results_table(outputs))[0], RESULTS_SCHEMA)
    assert results.schema == RESULTS_SCHEMA
    read_back = model_outputs(results)
    assert [(image_id, uri) for image_id, uri, _ in read_back] == [(image_id, uri) for image_id, uri, _ in outputs]
    assert semantic_rows(read_back[0][2], CATEGORIES) == semantic_rows(class_map, CATEGORIES)
    for (_, _, sent), (_, _, received) in zip(outputs[1:], read_back[1:]):
        assert instance_rows(received, CATEGORIES) == instance_rows(sent, CATEGORIES)
        assert (received.masks is None) == (sent.masks is None)
    assert [mask_count(output) for _, _, output in read_back] == [len(np.unique(class_map.values)), 3, 3, 0]


def test_encode_tasks_turn_results_into_mask_and_statistics_rows() -> None:
    class_map = map_runs(torch.tensor([[[0, 0, 2], [2, 2, 2]]], dtype=torch.uint8))[0]
    image = {"run_id": "r", "image_id": "a", "uri": "u/a", "shard_id": "s", "size_bytes": 9, "width": 3, "height": 2,
             "status": "ok", "n_masks": 2}  # fmt: skip
    batch = pa.table({
        "shard_id": ["s", "s"],
        "run_id": ["r", "r"],
        "model": ["m", "m"],
        "stage_seconds": ['{"model": 1.0}', "{}"],
        "images": pa.concat_arrays([nest(rows_to_table([image], IMAGES_SCHEMA)), nest(IMAGES_SCHEMA.empty_table())]),
        "results": pa.concat_arrays([nest(results_table([("a", "u/a", class_map)])), nest(RESULTS_SCHEMA.empty_table())]),
    })  # fmt: skip
    encoded = encode_shards(batch, categories={"r": CATEGORIES})
    assert encoded.column_names == ["shard_id", "run_id", "model", "images", "stage_seconds", "masks", "class_stats"]
    masks = unnest(encoded.column("masks")[0], MASKS_SCHEMA).to_pylist()
    assert [(row["image_id"], row["uri"], row["label"], row["area"]) for row in masks] == [("a", "u/a", "c0", 2), ("a", "u/a", "c2", 4)]
    stats = unnest(encoded.column("class_stats")[0], CLASS_STATS_SCHEMA).to_pylist()
    assert [(row["run_id"], row["pixel_count"]) for row in stats] == [("r", 2), ("r", 4)]
    assert unnest(encoded.column("masks")[1], MASKS_SCHEMA).num_rows == 0
    assert set(json.loads(encoded.column("stage_seconds")[0].as_py())) == {"model", "encode"}


def test_the_cpu_tasks_do_not_load_torch() -> None:
    # Each of their worker processes would grow by some 480 MiB and start a second or two later.
    check = "import sys, pipeline.read, pipeline.encode, pipeline.write; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
