"""Class maps from a semantic network's logits, on the logits' device: the semantic contract's last step.

Contract: logits ``(N, K, h, w)`` in any float dtype and memory format, read as torchvision's
networks define their output: bilinearly upsampled (``align_corners=False``) to the network's
input size, which the networks that segpipe runs without that last step
(:func:`models.without_final_upsampling`) leave to this module; cropped to the part of the input
that holds the image (the top left: :func:`pipeline.infer.predict_class_maps` pads inputs on the
right and bottom); bilinearly upsampled to the image's own ``H x W``; then the argmax over the K
classes. Out: ``(N, H, W)`` class indices, uint8 for up to 256 classes, else int32.

Neither upsampling is made for every class. Each output pixel is a weighted mean, with weights
at least zero, of a few logit pixels; where those agree on their argmax, so does the mean, and
only the pixels where they disagree (class borders) are interpolated, in float32. On CUDA one
Triton kernel (:mod:`pipeline.class_maps_kernel`) does both upsamplings at once for those pixels,
reading the logits as the network left them; elsewhere the network's upsampling to its input size is made as the network made it,
and only the second is spared (:func:`eager_class_maps`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as nn_functional

try:
    from pipeline import class_maps_kernel
except ImportError:  # no Triton for this platform (PyTorch's wheels bring it to Linux): PyTorch's operators then
    class_maps_kernel = None

_OUTPUT_PIXELS_PER_STEP = 2**25
"""Class map pixels made at once by :func:`eager_class_maps`: at most 10 bytes of device memory each."""
_GATHERED_LOGITS_PER_CHUNK = 2**26
"""Corner logits interpolated at once by :func:`eager_class_maps`: 256 MiB in float32."""
_MOST_TAPS = 4
"""Most logit rows (and columns) one output pixel may mix for the kernel: 3 where the network's
logits are upsampled to its input size, 2 where they are at its size already."""
_logger = logging.getLogger("segpipe.class_maps")
_kernel_unusable: str | None = None if class_maps_kernel else "no Triton for this platform"
"""Why Triton could not build the kernel in this process (a node without a C compiler, say),
once its first launch failed: the class maps then take PyTorch's operators."""
_kernel_ran = False
"""Whether the kernel has run in this process: from then on its errors are the batch's, not Triton's."""


def upsampled_class_maps(
    logits: torch.Tensor, height: int, width: int, *, input_size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(n, height, width)`` class maps of ``(n, classes, h, w)`` logits by definition: bilinear
    upsampling to ``input_size`` and cropping to ``crop`` as in :func:`class_maps`, bilinear
    upsampling to ``height`` x ``width``, then argmax; uint8 for up to 256 classes, else int32.
    :func:`class_maps` gives the same maps without upsampling every class at every pixel."""
    logits = _cropped_at_input_size(logits, input_size, crop)
    upsampled = nn_functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return upsampled.max(1).indices.to(_class_type(logits))  # max's indices are argmax's, and on CPUs 4x faster over the channels


def class_maps(
    logits: torch.Tensor, height: int, width: int, *, input_size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(n, height, width)`` class maps of ``(n, classes, h, w)`` logits, as the module's contract
    reads them: upsampled to ``input_size`` (default: their own size, no upsampling), cropped to
    its top-left ``crop`` (default: all of it), then upsampled to ``height`` x ``width``.

    Equal to :func:`upsampled_class_maps` of the cropped input-size logits in float32, but where
    two classes tie within float rounding (a few pixels in a million); eager bf16 upsampling rounds
    each upsampled logit to bf16 first, which makes more ties. The upsampled logits (21 per pixel for
    DeepLabV3, 33 MB per 1024x768 image in bf16) are never made: on this repository's CPU 1.6 to
    6x faster than upsampling them (see benchmarks/HISTORY.md)."""
    input_size = input_size or (logits.shape[-2], logits.shape[-1])
    crop = crop or input_size
    if logits.is_cuda and _kernel_unusable is None:
        rows, columns = (
            _composed_taps(size, crop_size, input_side, logit_side, logits.device)
            for size, crop_size, input_side, logit_side in zip((height, width), crop, input_size, logits.shape[-2:])
        )
        if max(rows.weights.shape[0], columns.weights.shape[0]) <= _MOST_TAPS:
            maps = _fused_class_maps(logits, rows, columns)
            if maps is not None:
                return maps
    return eager_class_maps(logits, height, width, input_size=input_size, crop=crop)


@dataclass(frozen=True)
class _Taps:
    """Per output index along one axis, the consecutive logit indices that bilinear upsampling to
    the input size and then to the output size mix into it, with their weights."""

    first: torch.Tensor
    """``(size,)`` int32: the lowest logit index."""
    weights: torch.Tensor
    """``(taps, size)`` float32: the weight of logit index ``first + tap`` (0 past the logits' end); they sum to 1."""


@functools.lru_cache(maxsize=64)
def _composed_taps(size: int, crop_size: int, input_size: int, logit_size: int, device: torch.device) -> _Taps:
    """:class:`_Taps` of upsampling ``logit_size`` logits to ``input_size``, keeping the first
    ``crop_size``, and upsampling those to ``size``: two bilinear upsamplings compose into one
    linear map with at most four weights per output index. Made once per sizes, on the host."""
    second = _bilinear_sources(size, crop_size, torch.device("cpu"))
    first = _bilinear_sources(input_size, logit_size, torch.device("cpu"))
    indices = first.indices[:, second.indices]  # (first-stage tap, second-stage tap, output index)
    weights = first.weights[:, second.indices].double() * second.weights.double()
    lowest = indices.amin((0, 1))
    offsets = (indices - lowest).view(4, size)
    taps = torch.zeros(int(offsets.max()) + 1, size, dtype=torch.float64).scatter_add_(0, offsets, weights.view(4, size))
    used = int(taps.gt(0).any(1).nonzero().max()) + 1  # logits already at the input size: the last offset's weights are all 0
    on_device = _Taps(lowest.int().to(device), taps[:used].float().to(device))
    if device.type == "cuda":
        # a threaded actor's other threads may take them from the cache on streams of their own
        torch.cuda.current_stream(device).synchronize()
    return on_device


def _fused_class_maps(logits: torch.Tensor, rows: _Taps, columns: _Taps) -> torch.Tensor | None:
    """The class maps by :mod:`pipeline.class_maps_kernel`; ``None`` where Triton cannot build it."""
    global _kernel_unusable, _kernel_ran
    maps = torch.empty((len(logits), len(rows.first), len(columns.first)), dtype=_class_type(logits), device=logits.device)
    if maps.numel() == 0:
        return maps
    coarse = logits.max(1).indices.to(maps.dtype).contiguous()
    try:
        class_maps_kernel.fill(maps, logits, coarse, rows.first, rows.weights, columns.first, columns.weights)
        _kernel_ran = True
    except Exception as error:  # noqa: BLE001 - whatever stops Triton building it, PyTorch's operators give the same maps
        if _kernel_ran or isinstance(error, torch.OutOfMemoryError):
            raise
        _kernel_unusable = f"{type(error).__name__}: {error}"
        _logger.warning("class maps in PyTorch's operators: Triton could not build its kernel here (%s)", _kernel_unusable[:500])
        return None
    return maps


def eager_class_maps(
    logits: torch.Tensor, height: int, width: int, *, input_size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None
) -> torch.Tensor:
    """:func:`class_maps` in PyTorch's own operators, where there is no Triton kernel (on CPUs;
    on CUDA the benchmarks' comparison): logits not at ``input_size`` are upsampled to it as the
    network would have, and cropped; then the argmax is taken at their resolution, and each output
    pixel takes its four corners' class, except where they disagree (along class borders, 0 to 6%
    of the pixels of the models' maps measured) and the corners' logits are interpolated in
    float32 there."""
    logits = _cropped_at_input_size(logits, input_size, crop)
    images_per_step = max(1, _OUTPUT_PIXELS_PER_STEP // (height * width))
    steps = [_class_maps_of_step(step, height, width) for step in logits.split(images_per_step)]
    return steps[0] if len(steps) == 1 else torch.cat(steps)  # a batch is mostly one step: no copy of its maps


def _cropped_at_input_size(logits: torch.Tensor, input_size: tuple[int, int] | None, crop: tuple[int, int] | None) -> torch.Tensor:
    """``logits`` upsampled to ``input_size`` as the network would have (not where they are at
    that size already), and cropped to its top-left ``crop``."""
    if input_size is not None and input_size != logits.shape[-2:]:
        logits = nn_functional.interpolate(logits, size=input_size, mode="bilinear", align_corners=False)
    return logits if crop is None else logits[..., : crop[0], : crop[1]]


def _class_maps_of_step(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if logits.is_cuda:
        # A GPU's argmax over channels_last logits' innermost classes (DeepLabV3's, FCN's) reads one
        # pixel's 21 classes per thread, far below the memory's bandwidth: from NCHW logits the step
        # ran 1.45x (H100 and H200, three runs), for a copy of 15 MB per 1024x768 image in bf16.
        # On CPUs NHWC is the faster layout.
        logits = logits.contiguous()
    _, classes, logit_height, logit_width = logits.shape
    coarse = logits.max(1).indices.to(_class_type(logits))
    rows, columns = _bilinear_sources(height, logit_height, logits.device), _bilinear_sources(width, logit_width, logits.device)

    def at_top_left_corner(per_logit_pixel: torch.Tensor) -> torch.Tensor:
        return per_logit_pixel.index_select(1, rows.indices[0]).index_select(2, columns.indices[0])

    maps = at_top_left_corner(coarse)
    pixels = at_top_left_corner(_disagreeing_corners(coarse)).flatten().nonzero().squeeze(1)
    logits_by_pixel = logits.permute(0, 2, 3, 1)  # (n, h, w, classes): a view, whatever the memory format
    flat_maps = maps.view(-1)
    chunk_size = max(1, _GATHERED_LOGITS_PER_CHUNK // (4 * classes))
    for first in range(0, len(pixels), chunk_size):
        chunk = pixels[first : first + chunk_size]
        image, row, column = chunk // (height * width), chunk // width % height, chunk % width
        # (k, 4) corners in the order top left, top right, bottom left, bottom right
        corner_rows = rows.indices[:, row].T.repeat_interleave(2, dim=1)
        corner_columns = columns.indices[:, column].T.repeat(1, 2)
        corners = logits_by_pixel[image[:, None], corner_rows, corner_columns].float()  # (k, 4, classes)
        weights = rows.weights[:, row].T[:, :, None] * columns.weights[:, column].T[:, None, :]  # (k, 2, 2)
        upsampled = torch.bmm(weights.view(-1, 1, 4), corners)[:, 0]  # (k, classes) in float32
        flat_maps[chunk] = upsampled.max(1).indices.to(maps.dtype)
    return maps


@dataclass(frozen=True)
class _Sources:
    """Per output index along one axis, its two source indices and their bilinear weights, as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` takes them."""

    indices: torch.Tensor
    """``(2, size)`` int64: the lower and the higher source index (equal at the last one)."""
    weights: torch.Tensor
    """``(2, size)`` float32: their weights, which sum to 1."""


def _bilinear_sources(size: int, source_size: int, device: torch.device) -> _Sources:
    position = ((torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (source_size / size) - 0.5).clamp_(min=0)
    low = position.long().clamp_(max=source_size - 1)
    high_weight = position - low
    return _Sources(torch.stack([low, (low + 1).clamp_(max=source_size - 1)]), torch.stack([1 - high_weight, high_weight]))


def _disagreeing_corners(coarse: torch.Tensor) -> torch.Tensor:
    """Whether the classes of ``(n, h, w)`` class maps differ within each pixel's 2x2 block of it
    and its neighbours below and to the right (the last row and column their own neighbours)."""
    below = torch.cat([coarse[:, 1:], coarse[:, -1:]], 1)
    right = torch.cat([coarse[:, :, 1:], coarse[:, :, -1:]], 2)
    below_right = torch.cat([below[:, :, 1:], below[:, :, -1:]], 2)
    return (coarse != below) | (coarse != right) | (coarse != below_right)


def _class_type(logits: torch.Tensor) -> torch.dtype:
    return torch.uint8 if logits.shape[1] <= 256 else torch.int32
