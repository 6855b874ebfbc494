"""PSPNet (Zhao, Shi, Qi, Wang and Jia, 2017, "Pyramid Scene Parsing Network").

Contract: input float32 ``(N, 3, H, W)``, ImageNet-normalised; output ``{"out": logits
(N, num_classes, H, W)}`` at the input size, plus ``"aux"`` (same shape) in training mode.

A dilated ResNet-50 backbone (output stride 8), the pyramid pooling module (average pooling
to 1x1, 2x2, 3x3 and 6x6 bins, 1x1 convolutions to a quarter of the channels, upsampled and
concatenated with the features), a 3x3 convolution head, and the auxiliary head on layer3
that the paper uses for deep supervision (weight 0.4 in training). Simplified: ResNet-50
rather than the paper's ResNet-101, and the standard ResNet stem rather than the deep stem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import ResNetEncoder, conv_bn_relu
from models.registry import register_model, seed_semantic_spec

PYRAMID_BINS = (1, 2, 3, 6)


class PyramidPooling(nn.Module):
    def __init__(self, in_channels: int, bins: tuple[int, ...] = PYRAMID_BINS) -> None:
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), conv_bn_relu(in_channels, branch_channels, 1)) for size in bins
        )
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    def __init__(self, *, num_classes: int, backbone: str = "resnet50") -> None:
        super().__init__()
        self.encoder = ResNetEncoder(backbone, dilated=True)
        channels = self.encoder.channels
        self.pyramid = PyramidPooling(channels[3])
        self.head = nn.Sequential(
            conv_bn_relu(self.pyramid.out_channels, 512), nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1)
        )
        self.aux_head = nn.Sequential(conv_bn_relu(channels[2], 256), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        _, _, layer3, layer4 = self.encoder(x)
        result = {"out": F.interpolate(self.head(self.pyramid(layer4)), size=size, mode="bilinear", align_corners=False)}
        if self.training:
            result["aux"] = F.interpolate(self.aux_head(layer3), size=size, mode="bilinear", align_corners=False)
        return result


def pspnet(*, num_classes: int) -> PSPNet:
    return PSPNet(num_classes=num_classes)


register_model(seed_semantic_spec("pspnet", pspnet, cpu_channels_last=False))
