"""Class maps from a semantic network's logits (:mod:`pipeline.class_maps`): the argmax of the
logits upsampled to the network's input size, cropped to the image and upsampled to its size, in
float32, but for ties within float rounding (none in these cases). On the CPU through PyTorch's
operators, and the GPU's Triton kernel through Triton's interpreter (and compiled for A100s and
H100s, which needs no GPU); without Triton, segpipe still imports and makes them; the
torchvision networks that segpipe runs without their final upsampling give the class maps of the
whole network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nn_functional
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from class_maps_interpreted import between_two_classes_a_third_wins
from jobs.sample import photos
from models import get_model_spec, resolve_weights, without_final_upsampling
from pipeline import class_maps as class_maps_module
from pipeline import class_maps_kernel
from pipeline.class_maps import class_maps, upsampled_class_maps
from pipeline.infer import predict_class_maps


def _unet_logits_of_photos() -> torch.Tensor:
    """The shapes U-Net's NHWC logits for crops of the photos: maps of several classes with borders."""
    spec = get_model_spec("unet")
    network = resolve_weights("shapes", spec).build(spec).eval().to(memory_format=torch.channels_last)
    batch = torch.stack([torch.from_numpy(pixels[:120, :160].copy()).permute(2, 0, 1) for pixels in photos().values()])
    with torch.inference_mode():
        return network((batch / 255).contiguous(memory_format=torch.channels_last))["out"]


@pytest.mark.parametrize(
    ("make_logits", "height", "width"),
    [
        pytest.param(_unet_logits_of_photos, 377, 501, id="trained-unet-upsampled"),
        pytest.param(_unet_logits_of_photos, 71, 90, id="trained-unet-downsampled"),
        pytest.param(lambda: torch.randn(3, 21, 37, 53, generator=torch.Generator().manual_seed(8)), 100, 150, id="noise"),
        pytest.param(lambda: torch.randn(2, 300, 9, 13, generator=torch.Generator().manual_seed(9)), 40, 41, id="300-classes"),
        pytest.param(lambda: torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(10)), 5, 7, id="one-logit-pixel"),
        pytest.param(between_two_classes_a_third_wins, 1, 4, id="a-third-class-wins-between-two"),
    ],
)
def test_class_maps_are_the_argmax_of_the_upsampled_logits(make_logits: Callable[[], torch.Tensor], height: int, width: int) -> None:
    logits = make_logits()
    with torch.inference_mode():
        maps, expected = class_maps(logits, height, width), upsampled_class_maps(logits, height, width)
    assert maps.dtype == expected.dtype == (torch.uint8 if logits.shape[1] <= 256 else torch.int32)
    assert maps.shape == expected.shape == (len(logits), height, width)
    assert logits[0, 0].numel() == 1 or len(torch.unique(expected)) > 1  # class borders, where the corners disagree
    # float rounding may break a near tie differently: about a pixel in a million, none in these
    assert torch.equal(maps, expected)
    if logits.shape[1] == 3:  # the class between the two is no corner's argmax, yet it wins
        assert maps[0, 0].tolist() == [0, 2, 2, 1]


def test_class_maps_of_bf16_logits_are_those_of_float32_upsampling() -> None:
    logits = _unet_logits_of_photos().to(torch.bfloat16)
    with torch.inference_mode():
        maps = class_maps(logits, 377, 501)
        exact, rounded = upsampled_class_maps(logits.float(), 377, 501), upsampled_class_maps(logits, 377, 501)
    # eager bf16 upsampling rounds each upsampled logit to bf16, which ties near ones; class_maps interpolates in float32
    assert torch.equal(maps, exact) and not torch.equal(rounded, exact)


def test_class_maps_in_many_small_steps_and_chunks_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(5, 21, 20, 30, generator=torch.Generator().manual_seed(11)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = class_maps(logits, 40, 50)
        monkeypatch.setattr(class_maps_module, "_OUTPUT_PIXELS_PER_STEP", 2 * 40 * 50)  # steps of two images, then one
        monkeypatch.setattr(class_maps_module, "_GATHERED_LOGITS_PER_CHUNK", 4 * 21 * 100)  # a hundred pixels interpolated at once
        assert torch.equal(class_maps(logits, 40, 50), whole)


def test_coarse_logits_are_upsampled_to_the_input_then_cropped_then_upsampled_to_the_image() -> None:
    coarse = nn_functional.avg_pool2d(_unet_logits_of_photos(), 8)  # (n, 4, 15, 20): borders at a network's stride
    with torch.inference_mode():
        maps = class_maps(coarse, 150, 190, input_size=(120, 160), crop=(118, 150))
        expected = upsampled_class_maps(coarse, 150, 190, input_size=(120, 160), crop=(118, 150))
    assert len(torch.unique(expected)) > 1 and torch.equal(maps, expected)


@pytest.mark.parametrize(("model", "stride"), [("fcn_resnet50", 8), ("deeplabv3_mobilenet_v3_large", 16), ("lraspp_mobilenet_v3_large", 8)])
def test_a_torchvision_network_without_its_final_upsampling_gives_the_whole_networks_class_maps(model: str, stride: int) -> None:
    spec = get_model_spec(model)
    weights = resolve_weights("random", spec)
    network = weights.build(spec).eval()
    coarse_network = without_final_upsampling(network)
    images = [torch.randint(0, 256, (2, 3, 120, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))]
    inputs = torch.zeros(1, 3, 96, 128)  # padded, as images of several sizes share a batch
    with torch.inference_mode():
        assert coarse_network(inputs)["out"].shape == (1, spec.num_classes, 96 // stride, 128 // stride)
        whole, coarse = (predict_class_maps(net, images, weights.preprocessing, pad_to_multiple=32)[0] for net in (network, coarse_network))
    assert coarse.shape == (2, 120, 150) and torch.equal(coarse, whole)
    assert dict(coarse_network.named_parameters()).keys() <= dict(network.named_parameters()).keys()


def test_the_gpu_kernel_interpreted_on_the_cpu_gives_the_class_maps_of_float32_upsampling() -> None:
    script = Path(__file__).with_name("class_maps_interpreted.py")
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(script.parent.parent)}
    result = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert {name: case["differ"] for name, case in cases.items()} == dict.fromkeys(cases, 0)
    assert cases["300-classes"]["dtype"] == "torch.int32" and cases["noise"]["dtype"] == "torch.uint8"
    assert cases["one-class-everywhere"]["classes"] == [5] and cases["a-third-class-wins-between-two"]["classes"] == [0, 1, 2]
    assert all(len(case["classes"]) > 1 for name, case in cases.items() if name != "one-class-everywhere")


@pytest.mark.parametrize("architecture", [80, 90])
@pytest.mark.parametrize(("logit_type", "class_type", "nhwc"), [("bf16", "u8", True), ("bf16", "u8", False), ("fp32", "i32", False)])
def test_the_gpu_kernel_compiles_for_ampere_and_hopper_without_a_gpu(architecture: int, logit_type: str, class_type: str, nhwc: bool) -> None:
    # Triton's compiler, which its interpreter skips, to the machine code of an A100 or an H100
    kernel = class_maps_kernel.fill_tile
    pointers = {"logits": logit_type, "coarse": class_type, "maps": class_type, "row_first": "i32", "row_weights": "fp32",
                "column_first": "i32", "column_weights": "fp32"}  # fmt: skip
    constants = {"ROW_TAPS": 3, "COLUMN_TAPS": 3, "BLOCK_ROWS": class_maps_kernel.BLOCK_ROWS,
                 "BLOCK_COLUMNS": class_maps_kernel.BLOCK_COLUMNS, **({} if nhwc else {"stride_column": 1})}  # fmt: skip
    signature = {name: f"*{pointers[name]}" if name in pointers else "constexpr" if name in constants else "i32" for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", architecture, 32), options={"num_warps": class_maps_kernel.WARPS})
    assert compiled.asm["cubin"]


def test_without_triton_segpipe_imports_and_makes_class_maps_in_pytorchs_operators() -> None:
    # PyTorch's wheels bring Triton to Linux only: on a Mac, say, `import triton` fails
    code = """
import sys
sys.modules["triton"] = None
import torch
import pipeline.infer
from pipeline import class_maps as module
logits, sizes = torch.randn(2, 5, 9, 12, generator=torch.Generator().manual_seed(13)), {"input_size": (36, 48), "crop": (36, 45)}
equal = torch.equal(module.class_maps(logits, 30, 40, **sizes), module.eager_class_maps(logits, 30, 40, **sizes))
print("RESULT", module._kernel_unusable, equal)
"""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("RESULT ", 1)[1].strip() == "no Triton for this platform True"
