"""synth, train and eval: determinism, a short training run that learns, and metrics checked
against hand computations and pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.evaluate import _coco_ap, semantic_scores
from jobs.synth import CATEGORIES, synthesize


def _files(fs, root: str) -> dict[str, bytes]:
    return {path.removeprefix(root): fs.cat_file(path) for path in sorted(fs.find(root))}


def test_synth_is_deterministic(tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    synthesize(str(tmp_path / "a"), count=5, seed=7, size=96)
    synthesize(str(tmp_path / "b"), count=5, seed=7, size=96)
    synthesize(str(tmp_path / "c"), count=6, seed=7, size=96)
    synthesize(str(tmp_path / "d"), count=5, seed=8, size=96)
    a, b = _files(fs, str(tmp_path / "a")), _files(fs, str(tmp_path / "b"))
    assert a == b and len(a) == 11  # 5 images, 5 label maps, instances.json
    c = _files(fs, str(tmp_path / "c"))
    assert all(c[name] == data for name, data in a.items() if name.endswith(".png"))  # more images, same first five
    d = _files(fs, str(tmp_path / "d"))
    assert d["/images/00000.png"] != a["/images/00000.png"]


def test_synth_labels_and_instances_agree(tmp_path) -> None:
    import pycocotools.mask as coco_mask
    from PIL import Image

    coco = synthesize(str(tmp_path), count=4, seed=3, size=96)
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES[1:])
    for image in coco["images"]:
        label = np.array(Image.open(tmp_path / image["file_name"].replace("images/", "labels/")))
        assert set(np.unique(label)) <= {0, 1, 2, 3, 255}
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert 2 <= len(annotations) <= 5
        for annotation in annotations:
            mask = coco_mask.decode(annotation["segmentation"]).astype(bool)
            assert mask.sum() == annotation["area"]
            inside = label[mask]
            assert set(np.unique(inside)) <= {annotation["category_id"], 255}  # its class, or its outline


def test_semantic_scores_match_a_hand_computed_case() -> None:
    # ground truth (rows) x prediction (columns) for classes 0, 1, 2
    confusion = np.array([[6, 2, 0], [1, 3, 0], [0, 0, 0]])
    scores = semantic_scores(confusion, ("background", "circle", "square"))
    # IoU(0) = 6 / (6 + 2 + 1) = 2/3; IoU(1) = 3 / (3 + 1 + 2) = 1/2; class 2 is absent from both
    assert scores["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(9 / 12)
    assert set(scores["iou_per_class"]) == {"background", "circle"}


def test_coco_ap_of_perfect_and_partial_detections(tmp_path) -> None:
    coco = synthesize(str(tmp_path), count=3, seed=4, size=96)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
         "segmentation": a["segmentation"]}
        for a in coco["annotations"]
    ]  # fmt: skip
    assert _coco_ap(coco, perfect, "segm") == pytest.approx((1.0, 1.0))
    assert _coco_ap(coco, perfect, "bbox") == pytest.approx((1.0, 1.0))
    half = perfect[::2]
    recall = len(half) / len(perfect)
    ap, ap50 = _coco_ap(coco, half, "segm")
    assert ap50 < 1.0 and ap50 == pytest.approx(ap) and ap50 <= recall + 0.05
    assert _coco_ap(coco, [], "segm") == (0.0, 0.0)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_train_on_s3_lowers_the_loss_and_run_uses_the_weights(s3, bucket: str, tmp_path) -> None:
    from jobs.evaluate import evaluate
    from jobs.run import run
    from jobs.train import TrainConfig, train
    from pipeline.config import RunConfig

    synthesize(f"s3://{bucket}/shapes", count=12, seed=11, size=64)
    card = train(
        TrainConfig(model="unet", data=f"s3://{bucket}/shapes", output=f"s3://{bucket}/trained", epochs=3,
                    batch_size=4, resize_shorter=64, learning_rate=3e-3)
    )  # fmt: skip
    losses = card["metrics"]["loss_per_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert card["categories"] == list(CATEGORIES) and card["preprocessing"]["resize_shorter"] == 64
    assert json.loads(s3.cat(f"{bucket}/trained/model.json")) == card
    assert s3.find(f"{bucket}/trained/checkpoints")  # Ray Train checkpoints in object storage
    weights = f"s3://{bucket}/trained/model.safetensors"
    manifest = run(RunConfig(input=f"s3://{bucket}/shapes/images", output=f"s3://{bucket}/out", model="unet", weights=weights))
    assert manifest["counts"]["ok"] == 12
    assert set(manifest["counts"]["masks_by_label"]) <= set(CATEGORIES)
    assert manifest["model"]["categories"] == list(CATEGORIES)
    metrics = evaluate("unet", weights, f"s3://{bucket}/shapes")
    assert 0 <= metrics["miou"] <= 1 and metrics["images"] == 12


def test_fine_tuning_keeps_the_backbone_and_replaces_the_head(tmp_path) -> None:
    import torch

    from jobs.train import _starting_model
    from models import get_model_spec, resolve_weights

    spec = get_model_spec("lraspp_mobilenet_v3_large")
    torchvision_file = tmp_path / "lraspp.pth"
    torch.save(spec.build().state_dict(), torchvision_file)  # a checkpoint as torchvision ships it: 21 classes
    initial = resolve_weights(str(torchvision_file), spec)
    model = _starting_model(spec, initial, num_classes=len(CATEGORIES))
    state = model.state_dict()
    assert state["classifier.high_classifier.weight"].shape[0] == 4
    backbone = [key for key in state if key.startswith("backbone.") and state[key].is_floating_point()]
    assert backbone and all(torch.equal(state[key], initial.state_dict[key]) for key in backbone)
