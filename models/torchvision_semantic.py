"""torchvision's semantic segmentation models: FCN, DeepLabV3 and LR-ASPP.

Contract: input float32 ``(N, 3, H, W)``, ImageNet-normalised, shorter side resized to 520;
output ``{"out": logits (N, 21, H, W)}`` over the 21 Pascal VOC categories (index 0 is
``__background__``). Auxiliary heads are not built: they only serve training, and an
``aux_classifier.*`` block in a state_dict is dropped on load (:mod:`models.weights`).
segpipe runs them without their last step (:func:`without_final_upsampling`): logits
``(N, 21, h, w)`` at the backbone's output stride (8; 16 for DeepLabV3's MobileNet), read as
upsampled to the input size.
"""

import torch
from torch import nn
from torchvision.models import segmentation as tv

from models.registry import SEMANTIC_PREPROCESSING, CudaExecution, register_model, torchvision_spec

_RESNET = CudaExecution(bf16=True, channels_last=True)
_MOBILENET = CudaExecution(bf16=True, channels_last=False)

# the last column: NHWC input on CPUs, where it measured at least 1.1x faster (FCN: 0.98x to 1.06x)
for _builder, _weights, _cuda, _cpu_channels_last in [
    (tv.fcn_resnet50, tv.FCN_ResNet50_Weights, _RESNET, False),
    (tv.fcn_resnet101, tv.FCN_ResNet101_Weights, _RESNET, False),
    (tv.deeplabv3_resnet50, tv.DeepLabV3_ResNet50_Weights, _RESNET, True),
    (tv.deeplabv3_resnet101, tv.DeepLabV3_ResNet101_Weights, _RESNET, True),
    (tv.deeplabv3_mobilenet_v3_large, tv.DeepLabV3_MobileNet_V3_Large_Weights, _MOBILENET, True),
    (tv.lraspp_mobilenet_v3_large, tv.LRASPP_MobileNet_V3_Large_Weights, _MOBILENET, True),
]:
    register_model(
        torchvision_spec(
            _builder, _weights, task="semantic", preprocessing=SEMANTIC_PREPROCESSING, cuda=_cuda, cpu_channels_last=_cpu_channels_last
        )
    )


class WithoutFinalUpsampling(nn.Module):
    """A torchvision FCN, DeepLabV3 or LR-ASPP network without its last step, the bilinear
    upsampling of its logits to the input's size: ``{"out": (N, classes, h, w)}`` at the
    backbone's output stride (65x87 for a 520x693 input), which :mod:`pipeline.class_maps` reads
    as upsampled to the input's size while it makes the class maps. On the H200 that upsampling
    took 12% of lraspp's device time, to write 15 MB of bf16 per 1024x768 image that the class
    maps then read again. The parameters are the network's own."""

    def __init__(self, network: tv.FCN | tv.DeepLabV3 | tv.LRASPP) -> None:
        super().__init__()
        self.backbone, self.classifier = network.backbone, network.classifier
        self.head_takes_every_feature = isinstance(network, tv.LRASPP)  # LR-ASPP's head mixes low and high features

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(inputs)
        return {"out": self.classifier(features if self.head_takes_every_feature else features["out"])}


def without_final_upsampling(network: nn.Module) -> nn.Module:
    """``network`` as :class:`WithoutFinalUpsampling` where it is a torchvision FCN, DeepLabV3 or
    LR-ASPP; any other network as it is (its logits at the input's size)."""
    return WithoutFinalUpsampling(network) if isinstance(network, tv.FCN | tv.DeepLabV3 | tv.LRASPP) else network
