"""Seed architectures: output shapes and dtypes at odd input sizes, and gradients that reach the input."""

from __future__ import annotations

import pytest
import torch

from models import get_model_spec

SEMANTIC_SEEDS = ["unet", "pspnet", "linknet", "refinenet"]
ODD_SIZES = [(97, 131), (64, 65), (33, 200)]


@pytest.mark.parametrize("name", SEMANTIC_SEEDS)
@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_semantic_output_is_float_logits_at_input_size(name: str, size: tuple[int, int]) -> None:
    model = get_model_spec(name).build(num_classes=5)
    with torch.no_grad():
        output = model(torch.randn(2, 3, *size))
    assert output["out"].shape == (2, 5, *size) and output["out"].dtype == torch.float32
    assert set(output) == {"out"}  # no aux output at inference


def test_pspnet_has_an_auxiliary_head_in_training() -> None:
    model = get_model_spec("pspnet").build(num_classes=4).train()
    output = model(torch.randn(2, 3, 65, 97))
    assert output["aux"].shape == output["out"].shape == (2, 4, 65, 97)


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))


@pytest.mark.parametrize("name", SEMANTIC_SEEDS)
def test_gradients_reach_the_first_layer(name: str) -> None:
    model = get_model_spec(name).build(num_classes=3).train()
    output = model(torch.randn(2, 3, 64, 80))
    loss = torch.nn.functional.cross_entropy(output["out"], torch.randint(0, 3, (2, 64, 80)))
    loss.backward()
    gradient = _first_conv(model).weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


def test_small_mask_rcnn_trains_and_predicts_at_odd_sizes() -> None:
    model = get_model_spec("maskrcnn_mobilenet_v3_small_fpn").build(num_classes=4).train()
    masks = torch.zeros(1, 97, 131, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = model([torch.rand(3, 97, 131)], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    sum(losses.values()).backward()
    assert _first_conv(model.backbone).weight.grad.abs().sum() > 0
    with torch.no_grad():
        [output] = model.eval()([torch.rand(3, 97, 131)])
    assert output["masks"].shape[1:] == (1, 97, 131) and output["boxes"].dtype == torch.float32


def test_every_model_family_module_states_its_contract() -> None:
    import importlib
    import pkgutil

    import models

    support = {"registry", "blocks", "weights"}
    families = [m.name for m in pkgutil.iter_modules(models.__path__) if m.name not in support]
    assert len(families) >= 8
    for name in families:
        assert "Contract:" in importlib.import_module(f"models.{name}").__doc__, name
