"""``segpipe eval``: how good a model and its weights are on a labelled dataset.

The model runs exactly as in ``segpipe run`` on a CPU (:func:`pipeline.infer.prepared_network`,
and the same preprocessing and post-processing, :func:`pipeline.infer.predict_class_maps` and
:func:`pipeline.infer.predict_detections`).
Semantic models: ``miou``, the mean intersection over union over the classes present in the
ground truth or the prediction, ``pixel_accuracy``, and ``iou_per_class``; pixels labelled 255
are ignored. Instance and detection models: COCO average precision from pycocotools'
COCOeval against ``instances.json``: ``box_ap`` and ``box_ap50``, plus ``mask_ap`` and
``mask_ap50`` for instance models.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.datasets import IGNORE_INDEX, LabelledData, load_labelled
from models import get_model_spec, resolve_weights
from pipeline.encode import encode_masks
from pipeline.infer import execution, predict_class_maps, predict_detections, prepared_network


def evaluate(model: str, weights: str, data: str, *, batch_size: int = 8, score_threshold: float = 0.05) -> dict:
    spec = get_model_spec(model)
    loaded = resolve_weights(weights, spec)
    _, channels_last = execution(spec, "auto", torch.device("cpu"))
    module = prepared_network(loaded.build(spec), spec.task, torch.device("cpu"), channels_last=channels_last, compile_mode="off")
    dataset = load_labelled(data, with_labels=spec.task == "semantic")
    with torch.inference_mode():
        if spec.task == "semantic":
            return _semantic_metrics(module, loaded, dataset, batch_size, channels_last=channels_last)
        return _coco_metrics(module, dataset, batch_size, score_threshold, with_masks=spec.task == "instance")


def semantic_scores(confusion: np.ndarray, categories: tuple[str, ...]) -> dict:
    """Metrics from a ``(C, C)`` confusion matrix of ground truth (rows) against prediction."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    present = union > 0
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=present)
    return {
        "miou": float(iou[present].mean()),
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
        "iou_per_class": {categories[c]: round(float(iou[c]), 5) for c in np.flatnonzero(present)},
    }


def _semantic_metrics(module, weights, dataset: LabelledData, batch_size: int, *, channels_last: bool) -> dict:
    classes = len(weights.categories)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for batch in _batches(dataset, batch_size):
        images = torch.stack([torch.from_numpy(sample.image).permute(2, 0, 1) for sample in batch])
        class_maps = predict_class_maps(module, [images], weights.preprocessing, channels_last=channels_last)[0]
        for sample, predicted in zip(batch, class_maps.numpy()):
            valid = sample.label != IGNORE_INDEX
            pairs = sample.label[valid].astype(np.int64) * classes + predicted[valid]
            confusion += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
    return {**semantic_scores(confusion, weights.categories), "images": len(dataset.samples)}


def _coco_metrics(module, dataset: LabelledData, batch_size: int, score_threshold: float, *, with_masks: bool) -> dict:
    results = []
    for batch in _batches(dataset, batch_size):
        images = torch.stack([torch.from_numpy(sample.image).permute(2, 0, 1) for sample in batch])
        for sample, detections in zip(batch, predict_detections(module, images, score_threshold)):
            encoded_masks = encode_masks(detections.masks) if with_masks else []
            for index, class_id in enumerate(detections.labels.tolist()):
                x1, y1, x2, y2 = (float(v) for v in detections.boxes[index])
                result = {
                    "image_id": sample.image_id,
                    "category_id": class_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(detections.scores[index]),
                }
                if with_masks:
                    encoded = encoded_masks[index]
                    if encoded is None:
                        continue
                    runs = detections.masks[index]
                    result["segmentation"] = {"size": [runs.height, runs.width], "counts": encoded.rle}
                results.append(result)
    metrics = {"images": len(dataset.samples), "detections": len(results)}
    for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
        prefix = "box" if iou_type == "bbox" else "mask"
        ap, ap50 = _coco_ap(dataset.coco, results, iou_type)
        metrics[f"{prefix}_ap"], metrics[f"{prefix}_ap50"] = ap, ap50
    return metrics


def _coco_ap(ground_truth: dict, results: list[dict], iou_type: str) -> tuple[float, float]:
    """COCOeval's AP@[.50:.95] and AP@.50 (0 where nothing was detected)."""
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        coco = COCO()
        coco.dataset = {**ground_truth, "annotations": [dict(a) for a in ground_truth["annotations"]]}
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def _batches(dataset: LabelledData, batch_size: int):
    """Samples in batches of equal image size (the model is batched like ``segpipe run``)."""
    by_size: dict[tuple[int, ...], list] = {}
    for sample in dataset.samples:
        by_size.setdefault(sample.image.shape, []).append(sample)
    for samples in by_size.values():
        for start in range(0, len(samples), batch_size):
            yield samples[start : start + batch_size]
