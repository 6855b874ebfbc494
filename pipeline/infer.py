"""Infer stage: the model actor. One shard row of compressed bytes in, one of table rows out.

The model is built once per actor and loaded from the state_dict that the driver put in the
Ray object store. ``__call__`` is a pure batch -> batch function under
``torch.inference_mode()``: it decodes the shard's images a window at a time in a thread pool
(the next window decodes while the model runs), runs the model on batches of up to
``batch_size`` images of equal size, and encodes the results (:mod:`pipeline.encode`).

Preprocessing, as ARCHITECTURE.md fixes it:
- semantic: uint8 RGB, shorter side resized to 520 (bilinear, antialiased), scaled to [0, 1],
  ImageNet-normalised; logits resized bilinearly to the original size, then argmax;
- instance and detection: float RGB in [0, 1] at original size, torchvision resizes
  internally; detections scoring below ``score_threshold`` are dropped and mask
  probabilities thresholded at 0.5.

``predict_class_maps`` and ``predict_detections`` are what ``segpipe eval`` measures too.

A batch that runs out of device memory is split in halves and retried, down to single images;
an image that does not fit alone becomes an ``out_of_memory`` row. A batch that fails otherwise
is retried image by image, and an image that still fails becomes an ``inference_error`` row, so
one bad image never costs its neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as nn_functional
import torchvision.transforms.functional as tv_functional
from torch import nn

from models import Preprocessing, Weights, get_model_spec
from pipeline.config import RunConfig
from pipeline.decode import DecodeError, decode_image
from pipeline.encode import Detections, instance_rows, semantic_rows
from pipeline.schema import (
    CLASS_STATS_SCHEMA,
    ENCODED_IMAGE_SCHEMA,
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    nest,
    rows_to_table,
    unnest,
)

_DECODE_THREADS = 4
_MASK_PROBABILITY_THRESHOLD = 0.5


class SegmentShards:
    """Ray Data callable class for ``map_batches``: columns ``shard_id``, ``images`` ->
    ``shard_id``, ``images``, ``masks``, ``class_stats`` (one row per shard)."""

    def __init__(self, *, config: RunConfig, run_id: str, device: str, weights: ray.ObjectRef) -> None:
        self.config = config
        self.run_id = run_id
        self.spec = get_model_spec(config.model)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, round(cpus)))
        loaded: Weights = ray.get(weights)
        self.categories = loaded.categories
        self.preprocessing = loaded.preprocessing
        model = loaded.build(self.spec)
        if self.spec.task != "semantic":
            # torchvision drops boxes under its own 0.05 before ours; a lower --score-threshold must win.
            model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, config.score_threshold)
        self.model = model.to(self.device).eval()
        self.decoder = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="decode")

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns: dict[str, list[pa.Array]] = defaultdict(list)
        with torch.inference_mode():
            for shard_id, cell in zip(batch.column("shard_id").to_pylist(), batch.column("images")):
                images, masks, stats = self._segment_shard(shard_id, unnest(cell, ENCODED_IMAGE_SCHEMA).to_pylist())
                columns["images"].append(nest(rows_to_table(images, IMAGES_SCHEMA)))
                columns["masks"].append(nest(rows_to_table(masks, MASKS_SCHEMA)))
                columns["class_stats"].append(nest(rows_to_table(stats, CLASS_STATS_SCHEMA)))
        return pa.table({"shard_id": batch.column("shard_id"), **{k: pa.concat_arrays(v) for k, v in columns.items()}})

    def _segment_shard(self, shard_id: str, images: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
        """Rows of the three tables for one shard's images, ``images`` rows in input order."""
        outcome: dict[int, dict] = {}
        mask_rows: list[dict] = []
        stat_rows: list[dict] = []
        readable = []
        for index, image in enumerate(images):
            if image["error_type"] is None:
                readable.append(index)
            else:  # the read stage could not get its bytes
                outcome[index] = _error(image["error_type"], image["error_message"])
        window = 4 * self.config.batch_size
        windows = [readable[start : start + window] for start in range(0, len(readable), window)]
        pending = self._decode_async(images, windows[0]) if windows else []
        for number, indices in enumerate(windows):
            decoded = {index: future.result() for index, future in zip(indices, pending)}
            pending = self._decode_async(images, windows[number + 1]) if number + 1 < len(windows) else []
            pixels: dict[int, np.ndarray] = {}
            for index, result in decoded.items():
                if isinstance(result, DecodeError):
                    outcome[index] = _error(result.error_type, str(result))
                else:
                    pixels[index] = result
            for index, result in self._predict(pixels).items():
                if isinstance(result, Exception):
                    error_type = "out_of_memory" if isinstance(result, torch.OutOfMemoryError) else "inference_error"
                    outcome[index] = _error(error_type, f"{type(result).__name__}: {result}")
                    continue
                masks, stats = result
                height, width = pixels[index].shape[:2]
                outcome[index] = {"status": "ok", "width": width, "height": height, "n_masks": len(masks)}
                key = {"run_id": self.run_id, "image_id": images[index]["image_id"]}
                mask_rows += [{**key, "uri": images[index]["uri"], **row} for row in masks]
                stat_rows += [{**key, **row} for row in stats]
        image_rows = [
            {
                "run_id": self.run_id,
                "image_id": image["image_id"],
                "uri": image["uri"],
                "shard_id": shard_id,
                "size_bytes": image["size_bytes"],
                **outcome[index],
            }
            for index, image in enumerate(images)
        ]
        return image_rows, mask_rows, stat_rows

    def _decode_async(self, images: list[dict], indices: list[int]) -> list[Future]:
        return [self.decoder.submit(_decode_or_error, images[index]["data"], self.config.max_pixels) for index in indices]

    def _predict(self, pixels: dict[int, np.ndarray]) -> dict[int, tuple[list[dict], list[dict]] | Exception]:
        """Rows per image (or the exception it failed with), batching images of equal size."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, image in pixels.items():
            by_size[image.shape].append(index)
        results: dict[int, tuple[list[dict], list[dict]] | Exception] = {}
        for indices in by_size.values():
            for start in range(0, len(indices), self.config.batch_size):
                self._predict_isolating_failures(indices[start : start + self.config.batch_size], pixels, results)
        return results

    def _predict_isolating_failures(self, chunk: list[int], pixels: dict[int, np.ndarray], results: dict) -> None:
        try:
            results.update(zip(chunk, self._predict_batch([pixels[index] for index in chunk])))
        except Exception as error:  # noqa: BLE001 - isolate what fails, keep the rest
            if len(chunk) == 1:
                results[chunk[0]] = error
                return
            if isinstance(error, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                halves = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2 :]]
            else:
                halves = [[index] for index in chunk]
            for half in halves:
                self._predict_isolating_failures(half, pixels, results)

    def _predict_batch(self, images: list[np.ndarray]) -> list[tuple[list[dict], list[dict]]]:
        batch = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images]).to(self.device)
        if self.spec.task == "semantic":
            class_maps = predict_class_maps(self.model, batch, self.preprocessing)
            return [semantic_rows(class_map, self.categories) for class_map in class_maps]
        height, width = batch.shape[-2:]
        return [
            instance_rows(detections, self.categories, height=height, width=width)
            for detections in predict_detections(self.model, batch, self.config.score_threshold)
        ]


def model_input(batch: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Semantic models' input: uint8 ``(N, 3, H, W)`` resized and normalised as ``preprocessing`` says."""
    if preprocessing.resize_shorter is not None:
        batch = tv_functional.resize(
            batch, [preprocessing.resize_shorter], interpolation=tv_functional.InterpolationMode.BILINEAR, antialias=True
        )
    return tv_functional.normalize(tv_functional.convert_image_dtype(batch, torch.float32), preprocessing.mean, preprocessing.std)


def predict_class_maps(model: nn.Module, batch: torch.Tensor, preprocessing: Preprocessing) -> list[np.ndarray]:
    """Argmax class maps at original size of a uint8 ``(N, 3, H, W)`` batch."""
    height, width = batch.shape[-2:]
    logits = model(model_input(batch, preprocessing))["out"]
    return [
        nn_functional.interpolate(image_logits[None], size=(height, width), mode="bilinear", align_corners=False)
        .argmax(1)[0]
        .to(torch.uint8 if logits.shape[1] <= 256 else torch.int32)
        .cpu()
        .numpy()
        for image_logits in logits
    ]


def predict_detections(model: nn.Module, batch: torch.Tensor, score_threshold: float) -> list[Detections]:
    """Detections scoring at least ``score_threshold`` in a uint8 ``(N, 3, H, W)`` batch, in original
    pixels; masks (instance models only) are the probabilities above 0.5."""
    detections = []
    for output in model(list(tv_functional.convert_image_dtype(batch, torch.float32))):
        keep = output["scores"] >= score_threshold
        masks = output.get("masks")
        detections.append(
            Detections(
                boxes=output["boxes"][keep].cpu().numpy(),
                labels=output["labels"][keep].cpu().numpy(),
                scores=output["scores"][keep].cpu().numpy(),
                masks=None if masks is None else (masks[keep, 0] > _MASK_PROBABILITY_THRESHOLD).cpu().numpy(),
            )
        )
    return detections


def _decode_or_error(data: bytes, max_pixels: int) -> np.ndarray | DecodeError:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except DecodeError as error:
        return error


def _error(error_type: str, message: str) -> dict:
    return {"status": "error", "error_type": error_type, "error_message": message, "n_masks": 0}
