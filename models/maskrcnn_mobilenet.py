"""A small Mask R-CNN of segpipe's design: MobileNetV3-Small with a 64-channel FPN.

Mask R-CNN (He, Gkioxari, Dollar and Girshick, 2017) with torchvision's region proposal
network, RoIAlign, NMS and losses, made small enough to train in minutes on a CPU: the
MobileNetV3-Small backbone (Howard et al., 2019), a feature pyramid of 64 channels over its
stride-8, 16 and 32 stages plus a max-pooled level, anchors from 16 to 192 pixels (two sizes
and three aspect ratios per level), a 256-wide box head
and a four-layer, 64-channel mask head; 300 proposals after NMS in training (150 at
inference), 128 sampled RoIs per image and at most 50 detections. Images are resized
internally to a shorter side of 192 (at most 384 on the longer): the resolution it is
trained at. Meant for scenes with a few objects, such as ``segpipe synth``'s shapes.

Contract: as torchvision's Mask R-CNN (:mod:`models.torchvision_instance`): a list of float32
``(3, H, W)`` RGB tensors in [0, 1] in; per image ``boxes``, ``labels``, ``scores`` and
``masks`` (K, 1, H, W) probabilities at original size out.
"""

from __future__ import annotations

from torchvision.models import mobilenet_v3_small
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.registry import DETECTION_PREPROCESSING, PRESETS, ModelSpec, register_model
from models.torchvision_instance import COCO_CATEGORIES

FPN_CHANNELS = 64
BOX_HEAD_WIDTH = 256


def _backbone() -> BackboneWithFPN:
    features = mobilenet_v3_small(weights=None).features
    # A block marked _is_cn starts a new, coarser stage: the block before it ends the previous one.
    stage_ends = [index - 1 for index, block in enumerate(features) if getattr(block, "_is_cn", False)]
    returned = [*stage_ends[-2:], len(features) - 1]  # strides 8, 16 and 32
    return BackboneWithFPN(
        features,
        return_layers={str(layer): str(level) for level, layer in enumerate(returned)},
        in_channels_list=[features[layer].out_channels for layer in returned],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )


def maskrcnn_mobilenet_v3_small_fpn(*, num_classes: int) -> MaskRCNN:
    anchors = AnchorGenerator(sizes=((16, 24), (32, 48), (64, 96), (128, 192)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    return MaskRCNN(
        _backbone(),
        min_size=192,
        max_size=384,
        rpn_anchor_generator=anchors,
        # A few objects per image: far fewer proposals and sampled RoIs than COCO's defaults.
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=128,
        box_detections_per_img=50,
        box_head=TwoMLPHead(FPN_CHANNELS * 7 * 7, BOX_HEAD_WIDTH),
        box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes),
        mask_head=MaskRCNNHeads(FPN_CHANNELS, (FPN_CHANNELS,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(FPN_CHANNELS, FPN_CHANNELS, num_classes),
    )


register_model(
    ModelSpec(
        name="maskrcnn_mobilenet_v3_small_fpn",
        task="instance",
        builder=maskrcnn_mobilenet_v3_small_fpn,
        categories=COCO_CATEGORIES,
        preprocessing=DETECTION_PREPROCESSING,
        presets={"shapes": PRESETS / "maskrcnn_mobilenet_v3_small_fpn-shapes.safetensors"},
    )
)
