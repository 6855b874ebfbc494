"""Every registered model runs through `segpipe run` with random weights (up to four of a task
in one pipeline, as a job spec's `models` runs them), and Faster R-CNN writes box rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pytest
import torch

from jobs.run import run, run_all
from jobs.sample import encode, photos
from models import get_model_spec, list_models
from pipeline.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("two-images")
    for name in ("chelsea", "coffee"):
        (directory / f"{name}.jpg").write_bytes(encode(photos()[name][::2, ::2], "JPEG"))
    return directory


def _rows(output: Path, table: str) -> list[dict]:
    query = f"SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)"
    return duckdb.sql(query).fetch_arrow_table().to_pylist()


def _groups(most: int) -> list[list[str]]:
    """The registered models by task, ``most`` to a group, in the registry's order."""
    by_task: dict[str, list[str]] = {}
    for spec in list_models():
        by_task.setdefault(spec.task, []).append(spec.name)
    return [names[first : first + most] for names in by_task.values() for first in range(0, len(names), most)]


# Four models through one pipeline, as a job spec's `models` runs them: one actor start for four.
@pytest.mark.parametrize("names", _groups(4), ids="+".join)
def test_every_model_runs_with_random_weights(names: list[str], two_images: Path, tmp_path: Path) -> None:
    # one image: on two cores the larger networks take 3 to 6 s per image
    configs = [RunConfig(input=str(two_images), output=str(tmp_path), model=name, weights="random", limit=1) for name in names]
    manifests = run_all(configs)
    images, masks = _rows(tmp_path, "images"), _rows(tmp_path, "masks")
    for name, manifest in zip(names, manifests):
        assert [row["status"] for row in images if row["model"] == name] == ["ok"], name
        assert manifest["counts"]["ok"] == 1 and manifest["model"]["task"] == get_model_spec(name).task, name
        expected_kind = {"semantic": "class", "instance": "instance", "detection": "box"}[manifest["model"]["task"]]
        assert {row["kind"] for row in masks if row["model"] == name} <= {expected_kind}, name


def test_faster_rcnn_writes_box_rows_without_masks(two_images: Path, tmp_path: Path) -> None:
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = get_model_spec(name).build()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[3] = 8.0  # "car": confident boxes
    weights = tmp_path / "frcnn.pt"
    torch.save(model.state_dict(), weights)
    output = tmp_path / "out"
    run(RunConfig(input=str(two_images), output=str(output), model=name, weights=str(weights), run_date=dt.date(2026, 1, 1)))
    masks = _rows(output, "masks")
    assert masks and all(row["kind"] == "box" and row["mask_rle"] is None and row["label"] == "car" for row in masks)
    assert all(row["bbox_x2"] > row["bbox_x1"] and row["area"] > 0 and row["score"] >= 0.5 for row in masks)
    stats = _rows(output, "class_stats")
    assert sum(row["instance_count"] for row in stats) == len(masks)
    assert all(0 < row["pixel_fraction"] <= 1 for row in stats)
    assert sum(row["n_masks"] for row in _rows(output, "images")) == len(masks)
