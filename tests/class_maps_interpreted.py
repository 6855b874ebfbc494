"""Run by tests/test_class_maps.py in a process of its own, with ``TRITON_INTERPRET=1`` set before
Triton is imported: :mod:`pipeline.class_maps`'s CUDA kernel run by Triton's interpreter on this
machine's CPU, on each case's logits, against float32 upsampling to the input size, cropping,
upsampling to the output size and argmax. tests/test_class_maps.py also imports a case's logits.

Usage: ``TRITON_INTERPRET=1 python tests/class_maps_interpreted.py``; prints one line ``RESULT {json}``:
per case, the maps' dtype, their pixels and how many of them differ from the float32 maps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as nn_functional

from pipeline.class_maps import _composed_taps, _fused_class_maps, upsampled_class_maps

def _smooth(images: int, classes: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Logits of a few regions each, with noise at the borders, as a network's coarse logits look."""
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(images, classes, 3, 4, generator=generator) * 5
    return nn_functional.interpolate(regions, size=(height, width), mode="bilinear") + torch.randn(images, classes, height, width, generator=generator) * 0.3


def between_two_classes_a_third_wins() -> torch.Tensor:
    """Two logit pixels whose argmaxes are classes 0 and 1; class 2, second at both, wins between them."""
    return torch.tensor([[10.0, 0.0], [0.0, 10.0], [9.0, 9.0]])[None, :, None, :]


CASES: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    # name: (logits, network input size, crop, output size)
    "coarse-cropped-upsampled": (lambda: _smooth(2, 5, 9, 12, seed=1), (72, 96), (72, 90), (60, 80)),
    "coarse-nhwc-bf16": (lambda: _smooth(1, 21, 9, 12, seed=2).to(torch.bfloat16).contiguous(memory_format=torch.channels_last), (72, 96), (70, 96), (90, 120)),
    "coarse-then-downsampled": (lambda: _smooth(1, 21, 9, 12, seed=3), (72, 96), (72, 96), (50, 60)),
    "noise": (lambda: torch.randn(1, 21, 7, 9, generator=torch.Generator().manual_seed(4)), (56, 72), (56, 72), (40, 50)),
    "at-input-size": (lambda: _smooth(2, 4, 30, 40, seed=5), (30, 40), (30, 40), (61, 83)),
    "one-class-everywhere": (lambda: torch.arange(6.0)[None, :, None, None].expand(2, 6, 8, 10).contiguous(), (64, 80), (60, 80), (75, 100)),
    "300-classes": (lambda: torch.randn(1, 300, 3, 3, generator=torch.Generator().manual_seed(6)), (24, 24), (24, 20), (8, 16)),
    "a-third-class-wins-between-two": (between_two_classes_a_third_wins, (1, 2), (1, 2), (1, 4)),
}  # fmt: skip


def _compare(logits: torch.Tensor, input_size: tuple[int, int], crop: tuple[int, int], size: tuple[int, int]) -> dict:
    rows, columns = (_composed_taps(*sides, torch.device("cpu")) for sides in zip(size, crop, input_size, logits.shape[-2:]))
    maps = _fused_class_maps(logits, rows, columns)
    exact = upsampled_class_maps(logits.float(), *size, input_size=input_size, crop=crop)
    assert maps.shape == exact.shape
    return {"dtype": str(maps.dtype), "pixels": maps.numel(), "differ": int((maps != exact).sum()), "classes": sorted(maps.unique().tolist())[:4]}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "Triton runs kernels on the CPU only in its interpreter"
    with torch.inference_mode():
        print("RESULT " + json.dumps({name: _compare(make(), *sizes) for name, (make, *sizes) in CASES.items()}), flush=True)
