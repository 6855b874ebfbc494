"""U-Net (Ronneberger, Fischer and Brox, 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation").

Contract: input float32 ``(N, 3, H, W)`` of any size, normalised as the preprocessing says;
output ``{"out": logits (N, num_classes, H, W)}`` at the input size.

A contracting path of double 3x3 convolution blocks and 2x2 max pooling, an expanding path of
2x2 ``ConvTranspose2d`` up-convolutions whose outputs are concatenated with the contracting
path's features. Simplified: padded convolutions with batch norm (features keep their size,
so skips need no cropping), and a quarter of the paper's width (16 channels at the top, not
64) so it trains in minutes on a CPU. Any input size works: the input is zero-padded to a
multiple of 16 and the logits are cropped back.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import conv_bn_relu, pad_to_multiple
from models.registry import PRESETS, register_model, seed_semantic_spec


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


class UNet(nn.Module):
    def __init__(self, *, num_classes: int, base_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(3, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        self.multiple = 2**depth

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return {"out": self.classifier(x)[..., :height, :width]}


def unet(*, num_classes: int) -> UNet:
    return UNet(num_classes=num_classes)


register_model(seed_semantic_spec("unet", unet, cpu_channels_last=True, shapes=PRESETS / "unet-shapes.safetensors"))
