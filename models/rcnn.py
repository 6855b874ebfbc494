"""Inference of torchvision's R-CNN family (Faster R-CNN, Mask R-CNN) without its per-mask loop.

torchvision's forward pastes every detected mask into a full-image canvas one at a time, with
several host round trips per mask, and before any score threshold: at 100 detections per image
that loop, not the network, is what keeps a GPU waiting. Here the network runs as torchvision
runs it (its transform, backbone, region proposals, RoI heads and NMS), boxes are mapped back
to original pixels as torchvision maps them, and the masks that the caller keeps are pasted all
at once.

Contract:
- :func:`input_size`: the padded size an image becomes inside the model; images of one such
  size batch together without changing each other's results (torchvision pads a batch to its
  largest image).
- :func:`detect`: a list of float ``(3, H, W)`` RGB tensors in [0, 1] in; per image a dict with
  ``boxes`` (K, 4) x1, y1, x2, y2 in original pixels, ``labels`` (K,), ``scores`` (K,) and, for
  instance models, ``masks`` (K, 1, M, M): the mask head's probabilities over each box.
- :func:`paste_masks`: those probabilities and boxes -> boolean ``(K, H, W)`` masks at original
  size, equal to torchvision's ``paste_masks_in_image`` thresholded (up to float rounding of
  the bilinear weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as nn_functional
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import resize_boxes

_PASTED_ELEMENTS_PER_STEP = 2**26
"""Mask pixels interpolated at once: 256 MiB of float32, whatever the image size."""


def detect(model: GeneralizedRCNN, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``model``'s inference on ``images``, with masks left as probabilities over their boxes."""
    original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    for detection, resized, original in zip(detections, batch.image_sizes, original_sizes):
        detection["boxes"] = resize_boxes(detection["boxes"], resized, original)
    return detections


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
