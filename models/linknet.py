"""LinkNet (Chaurasia and Culurciello, 2017, "LinkNet: Exploiting Encoder Representations for
Efficient Semantic Segmentation").

Contract: input float32 ``(N, 3, H, W)`` of any size, ImageNet-normalised; output
``{"out": logits (N, num_classes, H, W)}`` at the input size.

A ResNet-18 encoder; four decoder blocks (1x1 convolution to a quarter of the channels, 3x3
transposed convolution with stride 2, 1x1 convolution) whose outputs are *added* to the
encoder features of the same resolution, which is what keeps LinkNet light, from 1/32 of the
input resolution up to 1/2; then a 3x3 convolution and a 2x2 transposed convolution to the
classes at full resolution. Simplified: the ResNet stem reaches 1/4 before layer1, so the
paper's final block loses its first transposed convolution. The input is zero-padded to a
multiple of 32 and the logits cropped back, so odd sizes work.
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import ResNetEncoder, conv_bn_relu, pad_to_multiple
from models.registry import register_model, seed_semantic_spec


def up_conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 transposed convolution with stride 2: exactly doubles height and width."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Sequential):
    """1x1 conv (m -> m/4), 3x3 transposed conv with stride 2, 1x1 conv (m/4 -> n): doubles resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        middle = in_channels // 4
        super().__init__(
            conv_bn_relu(in_channels, middle, 1), up_conv_bn_relu(middle, middle), conv_bn_relu(middle, out_channels, 1)
        )


class LinkNet(nn.Module):
    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.encoder = ResNetEncoder("resnet18")
        channels = self.encoder.channels  # 64, 128, 256, 512
        self.decoders = nn.ModuleList(
            [DecoderBlock(channels[3], channels[2]), DecoderBlock(channels[2], channels[1]),
             DecoderBlock(channels[1], channels[0]), DecoderBlock(channels[0], channels[0])]
        )  # fmt: skip
        self.head = nn.Sequential(conv_bn_relu(channels[0], 32), nn.ConvTranspose2d(32, num_classes, 2, stride=2))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        features = self.encoder(pad_to_multiple(x, 32))
        x = features[3]
        for decoder, skip in zip(self.decoders, [features[2], features[1], features[0], None]):
            x = decoder(x)
            if skip is not None:
                x = x + skip
        return {"out": self.head(x)[..., :height, :width]}


def linknet(*, num_classes: int) -> LinkNet:
    return LinkNet(num_classes=num_classes)


register_model(seed_semantic_spec("linknet", linknet, cpu_channels_last=True))
