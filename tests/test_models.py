"""Registry and weights: listing, errors that name the choices, every weights source."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models import ModelError, get_model_spec, list_models, resolve_weights

ISSUE_MODELS = {
    "fcn_resnet50": ("semantic", 21), "fcn_resnet101": ("semantic", 21), "deeplabv3_resnet50": ("semantic", 21),
    "deeplabv3_resnet101": ("semantic", 21), "deeplabv3_mobilenet_v3_large": ("semantic", 21),
    "lraspp_mobilenet_v3_large": ("semantic", 21), "maskrcnn_resnet50_fpn": ("instance", 91),
    "maskrcnn_resnet50_fpn_v2": ("instance", 91),
}  # fmt: skip
SMALL = "lraspp_mobilenet_v3_large"


def test_registry_has_the_torchvision_models_with_their_categories() -> None:
    registered = {spec.name: (spec.task, spec.num_classes) for spec in list_models()}
    assert ISSUE_MODELS.items() <= registered.items()
    assert get_model_spec("deeplabv3_resnet50").categories[15] == "person"  # VOC
    assert get_model_spec("maskrcnn_resnet50_fpn").categories[1] == "person"  # COCO, torchvision's 91 ids
    assert get_model_spec("maskrcnn_resnet50_fpn").categories[18] == "dog"


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ModelError, match="choose one of: .*deeplabv3_resnet50"):
        get_model_spec("deeplab")


def test_random_weights_are_deterministic_and_load() -> None:
    spec = get_model_spec(SMALL)
    first, second = resolve_weights("random", spec), resolve_weights("random", spec)
    assert first.sha256 == second.sha256
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)


def test_every_model_builds_from_its_weights_alone() -> None:
    """Models are built on the meta device and take their tensors from the weights: nothing may
    be left that the weights do not hold (a non-persistent buffer would be)."""
    for spec in list_models():
        weights = resolve_weights("random", spec)
        module = weights.build(spec)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        assert not [name for name, tensor in tensors.items() if tensor.is_meta], spec.name
        assert all(tensor.device.type == "cpu" for tensor in tensors.values()), spec.name


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ModelError, match="choose one of: random, COCO_WITH_VOC_LABELS_V1, DEFAULT"):
        resolve_weights("IMAGENET", get_model_spec(SMALL))


def test_torchvision_preset_offline_and_uncached_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as raised:
        resolve_weights("DEFAULT", get_model_spec(SMALL))
    message = str(raised.value)
    assert "\n" not in message
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth" in message and "--weights" in message


def test_torchvision_preset_from_the_hub_cache_with_aux_keys(tmp_path: Path, monkeypatch) -> None:
    """A torchvision checkpoint in the cache loads, aux_classifier keys and all."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models.segmentation import fcn_resnet50

    checkpoint = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    assert any(key.startswith("aux_classifier.") for key in checkpoint)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(checkpoint, cache / "fcn_resnet50_coco-1167a1af.pth")
    for spec in ("DEFAULT", "COCO_WITH_VOC_LABELS_V1", "FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1"):
        weights = resolve_weights(spec, get_model_spec("fcn_resnet50"))
        assert not any(key.startswith("aux_classifier.") for key in weights.state_dict)
        assert weights.sha256 == hashlib.sha256((cache / "fcn_resnet50_coco-1167a1af.pth").read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Path]:
    state_dict = get_model_spec(SMALL).build().state_dict()
    paths = {"pt": tmp_path / "model.pt", "safetensors": tmp_path / "model.safetensors", "ddp": tmp_path / "ddp.pth"}
    torch.save(state_dict, paths["pt"])
    safetensors.torch.save_file(state_dict, paths["safetensors"])
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, paths["ddp"])
    return paths


@pytest.mark.parametrize("kind", ["pt", "safetensors", "ddp"])
def test_state_dict_files_load_with_a_sha256_pin(saved: dict[str, Path], kind: str) -> None:
    digest = hashlib.sha256(saved[kind].read_bytes()).hexdigest()
    weights = resolve_weights(f"{saved[kind]}#sha256={digest}", get_model_spec(SMALL))
    assert weights.sha256 == digest


def test_a_half_precision_checkpoint_loads_into_the_models_own_dtype(tmp_path: Path) -> None:
    spec = get_model_spec(SMALL)
    state_dict = {key: value.half() if value.is_floating_point() else value for key, value in spec.build().state_dict().items()}
    safetensors.torch.save_file(state_dict, tmp_path / "half.safetensors")
    module = resolve_weights(str(tmp_path / "half.safetensors"), spec).build(spec)
    assert {tensor.dtype for tensor in module.parameters()} == {torch.float32}
    with torch.inference_mode():
        assert module(torch.rand(1, 3, 64, 64))["out"].dtype == torch.float32


def test_a_wrong_sha256_pin_is_refused(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="not the pinned"):
        resolve_weights(f"{saved['pt']}#sha256={'0' * 64}", get_model_spec(SMALL))


def test_weights_of_another_model_are_refused(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="do not fit deeplabv3_resnet50"):
        resolve_weights(str(saved["pt"]), get_model_spec("deeplabv3_resnet50"))


def test_a_description_whose_std_has_a_zero_is_refused_naming_it(saved: dict[str, Path]) -> None:
    card = {"model": SMALL, "preprocessing": {"resize_shorter": 64, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}}
    saved["safetensors"].with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"model\.json of weights .*std \[0\.2, 0\.0, 0\.2\] has a zero"):
        resolve_weights(str(saved["safetensors"]), get_model_spec(SMALL))


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read weights"):
        resolve_weights(str(tmp_path / "nope.pt"), get_model_spec(SMALL))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "payload-ran"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"weight": payload}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": payload}, protocol=2))
    with pytest.raises(ModelError, match="refusing weights"):
        resolve_weights(str(path), get_model_spec(SMALL))
    assert not marker.exists()
