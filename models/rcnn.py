"""Inference of torchvision's R-CNN family (Faster R-CNN, Mask R-CNN) without its per-mask loop.

torchvision's forward pastes every detected mask into a full-image canvas one at a time, with
several host round trips per mask, and before any score threshold: at 100 detections per image
that loop, not the network, is what keeps a GPU waiting. Here the network runs as torchvision
runs it (its transform, backbone, region proposals, RoI heads and NMS, step by step so that each
runs in the precision it needs), boxes are mapped back to original pixels as torchvision maps
them, and the masks that the caller keeps are pasted all at once.

Contract:
- :func:`input_size`: the padded size an image becomes inside the model; images of one such
  size batch together without changing each other's results (torchvision pads a batch to its
  largest image).
- :func:`detect`: a list of float ``(3, H, W)`` RGB tensors in [0, 1] in; per image a dict with
  ``boxes`` (K, 4) x1, y1, x2, y2 in original pixels, ``labels`` (K,), ``scores`` (K,) and, for
  instance models, ``masks`` (K, 1, M, M): the mask head's probabilities over each box, all
  float32. With ``bf16``, the network's layers run under bf16 autocast, but anchors, box
  decoding, NMS and the boxes stay float32: bf16 keeps 8 bits of a coordinate, so a box edge
  near pixel 1000 would land on a 4-pixel grid and masks would be pasted off their objects.
- :func:`paste_masks`: those probabilities and boxes -> boolean ``(K, H, W)`` masks at original
  size, equal to torchvision's ``paste_masks_in_image`` thresholded (up to float rounding of
  the bilinear weights).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch.nn.functional as nn_functional
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes

_PASTED_ELEMENTS_PER_STEP = 2**26
"""Mask pixels interpolated at once: 256 MiB of float32, whatever the image size."""
_MASK_ROIS_MULTIPLE = 64
"""On GPUs, the mask head's batch of RoIs is padded up to a multiple of this many."""


def detect(model: GeneralizedRCNN, images: list[torch.Tensor], *, bf16: bool = False) -> list[dict[str, torch.Tensor]]:
    """``model``'s inference on ``images``, with masks left as probabilities over their boxes; with
    ``bf16``, its layers in bf16 and its box arithmetic in float32."""
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    batch, _ = model.transform(images)
    autocast = functools.partial(torch.autocast, batch.tensors.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast():
        features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    # Float features give float anchors; RoI pooling computes in float32 in any case.
    features = OrderedDict((name, feature.float()) for name, feature in features.items())
    rpn, heads = model.rpn, model.roi_heads
    levels = list(features.values())
    with autocast():
        objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(batch, levels)
    anchors_per_level = [level[0].numel() for level in objectness]
    objectness, deltas = concat_box_prediction_layers([level.float() for level in objectness], [level.float() for level in deltas])
    proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    proposals, _ = rpn.filter_proposals(proposals, objectness, batch.image_sizes, anchors_per_level)
    with autocast():
        class_logits, box_deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes)))
    boxes, scores, labels = heads.postprocess_detections(class_logits.float(), box_deltas.float(), proposals, batch.image_sizes)
    detections = [{"boxes": kept, "labels": label, "scores": score} for kept, label, score in zip(boxes, labels, scores)]
    if heads.has_mask():
        rois = heads.mask_roi_pool(features, boxes, batch.image_sizes)
        with autocast():
            mask_logits = heads.mask_predictor(heads.mask_head(_padded_on_gpus(rois)))[: len(rois)]
        for detection, probabilities in zip(detections, maskrcnn_inference(mask_logits.float(), labels)):
            detection["masks"] = probabilities
    for detection, resized, original in zip(detections, batch.image_sizes, original_sizes):
        detection["boxes"] = resize_boxes(detection["boxes"], resized, original)
    return detections


def _padded_on_gpus(rois: torch.Tensor) -> torch.Tensor:
    """On a GPU, ``rois`` followed by zero RoIs up to a multiple of ``_MASK_ROIS_MULTIPLE``. The mask
    head's batch is the batch's detection count, which changes from batch to batch, and cuDNN's
    autotuning (on in the model actors) searches kernels afresh for every new input shape: padded,
    the head meets a dozen batch sizes instead of up to 800. Each RoI is convolved on its own,
    so the padding changes no result beyond the rounding of the kernels chosen."""
    if not rois.is_cuda:
        return rois
    return nn_functional.pad(rois, (0, 0, 0, 0, 0, 0, 0, -len(rois) % _MASK_ROIS_MULTIPLE))


def input_size(model: GeneralizedRCNN, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` of the padded tensor that ``model``'s transform makes of an image: images
    that share it give the same results batched together as alone."""
    transform = model.transform
    # As GeneralizedRCNNTransform.resize computes its scale: in float32, then a Python float.
    sides = torch.tensor([height, width], dtype=torch.float32)
    scale = torch.min(transform.min_size[-1] / sides.min(), transform.max_size / sides.max()).item()
    stride = transform.size_divisible
    return tuple(math.ceil(math.floor(side * scale) / stride) * stride for side in (height, width))


def paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, *, height: int, width: int, threshold: float) -> torch.Tensor:
    """Boolean ``(K, H, W)`` masks: the ``(K, M, M)`` mask probabilities, resized bilinearly onto
    their boxes as torchvision pastes them (one pixel of padding around the mask, the box grown
    to match, then whole pixels), above ``threshold``.

    Bilinear resizing is separable, so each mask is ``rows @ mask @ columns.T`` with ``rows``
    (H, M + 2) and ``columns`` (W, M + 2) holding the interpolation weights of the pixels inside
    its box and zeros outside: one batched matrix product for all masks, whatever their box sizes.
    """
    count, size = probabilities.shape[0], probabilities.shape[-1]
    if count == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=probabilities.device)
    padded = nn_functional.pad(probabilities.float(), (1, 1, 1, 1))
    boxes = _expand_boxes(boxes.float(), (size + 2) / size).to(torch.int64)
    per_step = max(1, _PASTED_ELEMENTS_PER_STEP // (height * width))
    return torch.cat([
        (
            _interpolation_weights(box_step[:, 1], box_step[:, 3], height, size + 2)
            @ mask_step
            @ _interpolation_weights(box_step[:, 0], box_step[:, 2], width, size + 2).transpose(1, 2)
        ) > threshold
        for mask_step, box_step in zip(padded.split(per_step), boxes.split(per_step))
    ])  # fmt: skip


def _expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Boxes grown about their centres by ``scale`` (torchvision's ``expand_boxes``)."""
    centres = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    halves = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    return torch.cat([centres - halves, centres + halves], dim=1)


def _interpolation_weights(first: torch.Tensor, last: torch.Tensor, length: int, source: int) -> torch.Tensor:
    """``(K, length, source)`` weights that resize a ``source``-long axis onto pixels ``first`` to
    ``last`` (inclusive) of a ``length``-long one, as ``interpolate(mode="bilinear",
    align_corners=False)`` does; rows outside the box, or outside the image, are zero."""
    pixels = torch.arange(length, device=first.device)
    box_length = (last - first + 1).clamp(min=1)
    inside = (pixels >= first[:, None]) & (pixels <= last[:, None])
    scale = source / box_length.float()
    position = ((pixels - first[:, None] + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    lower = position.floor().long().clamp(max=source - 1)
    upper = (lower + 1).clamp(max=source - 1)
    upper_weight = (position - lower).where(inside, 0.0)
    weights = torch.zeros((first.shape[0], length, source), device=first.device)
    weights.scatter_add_(2, lower[..., None], (inside.float() - upper_weight)[..., None])
    weights.scatter_add_(2, upper[..., None], upper_weight[..., None])
    return weights
