"""torchvision's semantic segmentation models: FCN, DeepLabV3 and LR-ASPP.

Contract: input float32 ``(N, 3, H, W)``, ImageNet-normalised, shorter side resized to 520;
output ``{"out": logits (N, 21, H, W)}`` over the 21 Pascal VOC categories (index 0 is
``__background__``). Auxiliary heads are not built: they only serve training, and an
``aux_classifier.*`` block in a state_dict is dropped on load (:mod:`models.weights`).
"""

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
