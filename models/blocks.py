"""Building blocks shared by the seed architectures: ResNet encoders and size padding.

Encoders return the feature maps of a torchvision ResNet at strides 4, 8, 16 and 32 (or 8, 8,
8, 8 when dilated), always randomly initialised: segpipe never downloads backbone weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns ``[layer1, ..., layer4]``."""

    def __init__(self, name: str, *, dilated: bool = False) -> None:
        super().__init__()
        network = RESNETS[name](weights=None, replace_stride_with_dilation=[False, True, True] if dilated else None)
        self.stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
        self.layers = nn.ModuleList([network.layer1, network.layer2, network.layer3, network.layer4])
        expansion = 4 if name == "resnet50" else 1
        self.channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of ``(N, C, H, W)`` so H and W are multiples of ``multiple``."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, -width % multiple, 0, -height % multiple))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
