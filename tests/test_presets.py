"""The weights segpipe ships: they load offline, label the shape classes, and still reach the
quality the README records on a held-out set (a seed no training run used)."""

from __future__ import annotations

import pytest

from jobs.evaluate import evaluate
from jobs.synth import CATEGORIES, synthesize
from models import get_model_spec, resolve_weights

HELD_OUT_SEED = 2


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("held-out")
    synthesize(str(directory), count=100, seed=HELD_OUT_SEED)  # the README's held-out set
    return str(directory)


@pytest.mark.parametrize("model", ["unet", "maskrcnn_mobilenet_v3_small_fpn"])
def test_presets_load_with_their_categories(model: str) -> None:
    spec = get_model_spec(model)
    assert spec.default_weights == "shapes"
    weights = resolve_weights("DEFAULT", spec)
    assert weights.categories[: len(CATEGORIES)] == CATEGORIES and weights.source == "segpipe preset shapes"
    assert spec.presets["shapes"].stat().st_size + spec.presets["shapes"].with_suffix(".json").stat().st_size < 20e6


def test_unet_shapes_segments_held_out_shapes(held_out: str) -> None:
    assert evaluate("unet", "shapes", held_out)["miou"] >= 0.90


def test_maskrcnn_shapes_finds_held_out_instances(held_out: str) -> None:
    assert evaluate("maskrcnn_mobilenet_v3_small_fpn", "shapes", held_out)["mask_ap50"] >= 0.80
