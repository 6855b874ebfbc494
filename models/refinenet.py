"""RefineNet (Lin, Milan, Shen and Reid, 2017, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation").

Contract: input float32 ``(N, 3, H, W)`` of any size, ImageNet-normalised; output
``{"out": logits (N, num_classes, H, W)}`` at the input size.

A ResNet-50 encoder and a cascade of four RefineNet blocks (RefineNet-4 to RefineNet-1), from
1/32 to 1/4 of the input resolution. Each block passes every input path through two residual
conv units (ReLU-conv-ReLU-conv plus identity), fuses the paths by multi-resolution fusion
(3x3 convolutions to a common width, upsampling to the largest resolution, sum), applies
chained residual pooling (a chain of 5x5 max-pool + 3x3 conv stages, each added back) and
one more residual conv unit. Simplified: 256 channels on every path (the paper uses 512 on
the coarsest), ResNet-50 rather than ResNet-101, two pooling stages per chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import ResNetEncoder, pad_to_multiple
from models.registry import register_model, seed_semantic_spec

WIDTH = 256


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), conv3x3(channels, channels), nn.ReLU(), conv3x3(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ChainedResidualPooling(nn.Module):
    def __init__(self, channels: int, stages: int = 2) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(5, stride=1, padding=2), conv3x3(channels, channels)) for _ in range(stages)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        path = x
        for stage in self.stages:
            path = stage(path)
            x = x + path
        return x


class RefineNetBlock(nn.Module):
    """Adaptive conv (2 RCUs per path) -> multi-resolution fusion -> chained residual pooling -> RCU."""

    def __init__(self, paths: int) -> None:
        super().__init__()
        self.adapt = nn.ModuleList(
            nn.Sequential(ResidualConvUnit(WIDTH), ResidualConvUnit(WIDTH)) for _ in range(paths)
        )
        self.fuse = nn.ModuleList(conv3x3(WIDTH, WIDTH) for _ in range(paths)) if paths > 1 else None
        self.pool = ChainedResidualPooling(WIDTH)
        self.out = ResidualConvUnit(WIDTH)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        adapted = [adapt(x) for adapt, x in zip(self.adapt, inputs)]
        if self.fuse is None:
            fused = adapted[0]
        else:
            size = adapted[0].shape[-2:]  # the finest path comes first: the encoder's feature, then the coarser path
            fused = sum(
                F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.fuse, adapted)
            )
        return self.out(self.pool(fused))


class RefineNet(nn.Module):
    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.encoder = ResNetEncoder("resnet50")
        self.reduce = nn.ModuleList(conv3x3(channels, WIDTH) for channels in self.encoder.channels)
        self.refine = nn.ModuleList([RefineNetBlock(1), RefineNetBlock(2), RefineNetBlock(2), RefineNetBlock(2)])
        self.head = nn.Sequential(ResidualConvUnit(WIDTH), ResidualConvUnit(WIDTH), nn.Conv2d(WIDTH, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        features = [reduce(f) for reduce, f in zip(self.reduce, self.encoder(pad_to_multiple(x, 32)))]
        path = self.refine[0](features[3])
        for block, feature in zip(self.refine[1:], reversed(features[:3])):
            path = block(feature, path)
        logits = F.interpolate(self.head(path), scale_factor=4, mode="bilinear", align_corners=False)
        return {"out": logits[..., :height, :width]}


def refinenet(*, num_classes: int) -> RefineNet:
    return RefineNet(num_classes=num_classes)


register_model(seed_semantic_spec("refinenet", refinenet, cpu_channels_last=True))
