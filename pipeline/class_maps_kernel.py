"""The Triton kernel of :mod:`pipeline.class_maps` on CUDA devices: both bilinear upsamplings and
the argmax in one pass, without making the upsampled logits. Imported only where Triton is
(PyTorch's wheels bring it to Linux).

Contract of :func:`fill`: ``logits`` ``(N, K, h, w)`` in any float dtype and strides; ``coarse``
their argmax, contiguous ``(N, h, w)``; per output row (and column) the first logit row (column)
it mixes, int32 ``(H,)``, and the weights of that row and the next ones, float32 ``(taps, H)``
(at most 4 taps), which sum to 1; ``maps`` contiguous ``(N, H, W)``, uint8 or int32, filled with
the argmax over the K classes of the logits so mixed, on the tensors' device and stream.
"""

import threading

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_COLUMNS, WARPS = 2, 128, 4
"""Output pixels per Triton program, and its warps: two pixels per thread, which leaves the kernel
40 registers for sm_90a (ptxas), room for 48 warps per SM to hide its gathers' latency; four per
thread (8x64) took 111, room for 16."""
_LAUNCH = threading.Lock()
"""Triton's first launch of a kernel compiles it, which its runtime does not guard against a
threaded actor's other threads doing at once."""


def fill(
    maps: torch.Tensor, logits: torch.Tensor, coarse: torch.Tensor,
    row_first: torch.Tensor, row_weights: torch.Tensor, column_first: torch.Tensor, column_weights: torch.Tensor,
) -> None:  # fmt: skip
    """Fill ``maps`` as the module's contract says."""
    images, classes, logit_height, logit_width = logits.shape
    height, width = maps.shape[-2:]
    grid = (triton.cdiv(height, BLOCK_ROWS), triton.cdiv(width, BLOCK_COLUMNS), images)  # CUDA allows 65,535 tiles on y and z, 2**31 on x
    with _LAUNCH:
        fill_tile[grid](
            logits, coarse, maps, row_first, row_weights, column_first, column_weights,
            classes, logit_height, logit_width, height, width, *logits.stride(),
            ROW_TAPS=row_weights.shape[0], COLUMN_TAPS=column_weights.shape[0], BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS,
            num_warps=WARPS,
        )  # fmt: skip


@triton.jit(do_not_specialize=["classes", "logit_height", "logit_width", "height", "width", "stride_image", "stride_class", "stride_row"])
def fill_tile(
    logits, coarse, maps, row_first, row_weights, column_first, column_weights,
    classes, logit_height, logit_width, height, width, stride_image, stride_class, stride_row, stride_column,
    ROW_TAPS: tl.constexpr, COLUMN_TAPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):  # fmt: skip
    """One ``BLOCK_ROWS x BLOCK_COLUMNS`` tile of one image's class map. Each output pixel takes
    the class of its first tap where every tap of positive weight has that class in ``coarse``
    (the logits' own argmax); where the tile has a pixel whose taps disagree, the tile's pixels
    whose taps disagree are interpolated over every class and take the argmax."""
    image = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    row_inside, column_inside = rows < height, columns < width
    inside = row_inside[:, None] & column_inside[None, :]
    first_row = tl.load(row_first + rows, mask=row_inside, other=0)
    first_column = tl.load(column_first + columns, mask=column_inside, other=0)
    coarse_image = coarse + image * logit_height * logit_width
    reference = tl.load(coarse_image + first_row[:, None] * logit_width + first_column[None, :], mask=inside, other=0)
    disagree = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.int32)
    for row_tap in tl.static_range(ROW_TAPS):
        row = tl.minimum(first_row + row_tap, logit_height - 1)
        row_used = tl.load(row_weights + row_tap * height + rows, mask=row_inside, other=0.0) > 0
        for column_tap in tl.static_range(COLUMN_TAPS):
            column = tl.minimum(first_column + column_tap, logit_width - 1)
            column_used = tl.load(column_weights + column_tap * width + columns, mask=column_inside, other=0.0) > 0
            tap = tl.load(coarse_image + row[:, None] * logit_width + column[None, :], mask=inside, other=0)
            used = row_used[:, None] & column_used[None, :]
            disagree = tl.where(used & (tap != reference), 1, disagree)
    result = reference.to(tl.int32)
    if tl.sum(tl.sum(disagree, axis=1), axis=0) > 0:
        logits_image = logits + image * stride_image
        best = tl.full([BLOCK_ROWS, BLOCK_COLUMNS], float("-inf"), dtype=tl.float32)
        best_class = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.int32)
        for class_index in range(classes):
            logits_class = logits_image + class_index * stride_class
            value = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.float32)
            for row_tap in tl.static_range(ROW_TAPS):
                row = tl.minimum(first_row + row_tap, logit_height - 1)
                row_weight = tl.load(row_weights + row_tap * height + rows, mask=row_inside, other=0.0)
                across = tl.zeros([BLOCK_ROWS, BLOCK_COLUMNS], dtype=tl.float32)
                for column_tap in tl.static_range(COLUMN_TAPS):
                    column = tl.minimum(first_column + column_tap, logit_width - 1)
                    column_weight = tl.load(column_weights + column_tap * width + columns, mask=column_inside, other=0.0)
                    logit = tl.load(logits_class + row[:, None] * stride_row + column[None, :] * stride_column, mask=inside, other=0.0)
                    across += column_weight[None, :] * logit.to(tl.float32)
                value += row_weight[:, None] * across
            better = value > best
            best = tl.where(better, value, best)
            best_class = tl.where(better, class_index, best_class)
        result = tl.where(disagree > 0, best_class, result)
    tl.store(maps + image * height * width + rows[:, None] * width + columns[None, :], result.to(maps.dtype.element_ty), mask=inside)
