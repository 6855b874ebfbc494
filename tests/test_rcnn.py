"""The R-CNN family without torchvision's per-mask loop gives torchvision's own results: the
same boxes, labels and scores, and masks that differ from its pasted masks by no more than
float rounding at the 0.5 threshold. In bf16, boxes and masks stay within about a pixel of
float32's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou

from jobs.synth import render
from models import get_model_spec, resolve_weights
from models.rcnn import paste_masks
from pipeline.encode import map_runs
from pipeline.infer import kept_detections, predict_detections

MOST_DIFFERING_PIXELS = 1e-5
"""Share of pixels on which the batched paste may differ from torchvision's: those whose
probability lands within float rounding of the threshold."""


def _boxes_in(generator: torch.Generator, count: int, height: int, width: int, *, largest: float) -> torch.Tensor:
    """Boxes inside the image, as detectors clip them; up to ``largest`` of the image per side."""
    size = torch.tensor([width, height])
    corner = torch.rand(count, 2, generator=generator) * size
    extent = torch.rand(count, 2, generator=generator) * size * largest
    return torch.cat([corner, (corner + extent).minimum(size)], dim=1)


@pytest.mark.parametrize("largest", [0.02, 0.2, 1.0])
def test_batched_paste_equals_torchvisions_paste(largest: float) -> None:
    generator = torch.Generator().manual_seed(0)
    height, width = 97, 131
    probabilities = torch.rand(200, 28, 28, generator=generator)
    boxes = _boxes_in(generator, 200, height, width, largest=largest)
    boxes[0] = torch.tensor([0.0, 0.0, width, height])  # the whole image
    boxes[1] = torch.tensor([5.0, 7.0, 5.0, 7.0])  # a point
    expected = paste_masks_in_image(probabilities[:, None], boxes, (height, width))[:, 0] > 0.5
    pasted = paste_masks(probabilities, boxes, height=height, width=width, threshold=0.5)
    assert pasted.shape == expected.shape and pasted.dtype == torch.bool
    assert (pasted != expected).float().mean().item() <= MOST_DIFFERING_PIXELS


def test_no_masks_paste_to_an_empty_batch() -> None:
    pasted = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), height=5, width=6, threshold=0.5)
    assert pasted.shape == (0, 5, 6)


def test_detections_equal_torchvisions_forward_on_images_of_different_sizes() -> None:
    spec = get_model_spec("maskrcnn_mobilenet_v3_small_fpn")
    model = resolve_weights("shapes", spec).build(spec).eval()
    images = [
        torch.from_numpy(render(np.random.default_rng(seed), size)[0]).permute(2, 0, 1)
        for seed, size in [(1, 192), (2, 256)]
    ]
    with torch.inference_mode():
        expected = model([image.float() / 255 for image in images])
        detected = predict_detections(model, images, 0.0)
    for image, ours, theirs in zip(images, detected, expected):
        assert len(ours.labels) > 0
        np.testing.assert_array_equal(ours.labels, theirs["labels"].numpy())
        np.testing.assert_allclose(ours.scores, theirs["scores"].numpy())
        np.testing.assert_allclose(ours.boxes, theirs["boxes"].numpy())
        for runs, theirs_runs in zip(ours.masks, map_runs(theirs["masks"][:, 0] > 0.5)):
            assert (runs.height, runs.width) == tuple(image.shape[-2:])
            np.testing.assert_array_equal(runs.starts, theirs_runs.starts)
            np.testing.assert_array_equal(runs.values, theirs_runs.values)


def test_in_bf16_boxes_and_masks_stay_within_about_a_pixel_of_float32s() -> None:
    """bf16 keeps 8 bits of a number: a box edge near pixel 1000 would land on a 4-pixel grid, so
    the box arithmetic stays float32 while the network's layers run in bf16."""
    spec = get_model_spec("maskrcnn_mobilenet_v3_small_fpn")
    model = resolve_weights("shapes", spec).build(spec).eval()
    edge_shifts, mask_overlaps = [], []
    for seed in range(3):
        image = torch.from_numpy(render(np.random.default_rng(seed), 1024)[0]).permute(2, 0, 1)
        with torch.inference_mode():
            ((boxes, _, _, masks),) = kept_detections(model, [image], 0.5)
            ((bf16_boxes, _, _, bf16_masks),) = kept_detections(model, [image], 0.5, bf16=True)
        assert bf16_boxes.dtype == torch.float32
        overlap, match = box_iou(boxes, bf16_boxes).max(dim=1)
        assert (overlap > 0.5).all(), "every float32 detection has its bf16 counterpart"
        edge_shifts += (boxes - bf16_boxes[match]).abs().flatten().tolist()
        intersections = (masks & bf16_masks[match]).flatten(1).sum(1)
        mask_overlaps += (intersections / (masks | bf16_masks[match]).flatten(1).sum(1)).tolist()
    assert len(mask_overlaps) >= 10
    assert np.median(edge_shifts) <= 1.0 and np.percentile(edge_shifts, 90) <= 3.0
    assert np.median(mask_overlaps) >= 0.98 and min(mask_overlaps) >= 0.85
