"""torchvision's Mask R-CNN instance segmentation models (ResNet-50 FPN, v1 and v2).

Contract: input a list of float32 ``(3, H, W)`` RGB tensors in [0, 1] at original size (the
model resizes internally, shorter side 800, and maps results back); output per image a dict
with ``boxes`` (K, 4) x1, y1, x2, y2 in original pixels, ``labels`` (K,) indices into the
91-entry torchvision COCO list (its ``N/A`` entries are unused ids), ``scores`` (K,) and
``masks`` (K, 1, H, W) probabilities. The region proposal network and NMS are torchvision's.
"""

from torchvision.models import detection as tv

from models.registry import DETECTION_PREPROCESSING, CudaExecution, register_model, torchvision_spec

# torchvision's 91 COCO ids, with "N/A" at the unused ones: the default of segpipe's own instance models too.
COCO_CATEGORIES: tuple[str, ...] = tuple(tv.MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])

for _builder, _weights in [
    (tv.maskrcnn_resnet50_fpn, tv.MaskRCNN_ResNet50_FPN_Weights),
    (tv.maskrcnn_resnet50_fpn_v2, tv.MaskRCNN_ResNet50_FPN_V2_Weights),
]:
    register_model(
        torchvision_spec(
            _builder, _weights, task="instance", preprocessing=DETECTION_PREPROCESSING, cuda=CudaExecution(bf16=True)
        )
    )
