"""torchvision's Faster R-CNN detection models (ResNet-50 FPN v1 and v2, MobileNetV3-Large FPN).

Contract: input a list of float32 ``(3, H, W)`` RGB tensors in [0, 1] at original size (the
model resizes internally); output per image a dict with ``boxes`` (K, 4) x1, y1, x2, y2 in
original pixels, ``labels`` (K,) indices into torchvision's 91-entry COCO list and ``scores``
(K,). No masks: segpipe writes ``box`` rows with a null ``mask_rle``. The region proposal
network and NMS are torchvision's.
"""

from torchvision.models import detection as tv

from models.registry import DETECTION_PREPROCESSING, CudaExecution, register_model, torchvision_spec

for _builder, _weights in [
    (tv.fasterrcnn_resnet50_fpn, tv.FasterRCNN_ResNet50_FPN_Weights),
    (tv.fasterrcnn_resnet50_fpn_v2, tv.FasterRCNN_ResNet50_FPN_V2_Weights),
    (tv.fasterrcnn_mobilenet_v3_large_fpn, tv.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
]:
    register_model(
        torchvision_spec(
            _builder, _weights, task="detection", preprocessing=DETECTION_PREPROCESSING, cuda=CudaExecution(bf16=True)
        )
    )
