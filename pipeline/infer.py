"""Infer stage: the model actor. One shard row of compressed bytes in, one row of model results per model out.

The models (one per run; a job spec may list several over the same input) are built once per
actor from the state_dicts that the driver put in the Ray object store. ``__call__`` is a pure
batch -> batch function under ``torch.inference_mode()``: it decodes the shard's images a
window at a time in a thread pool (the next window decodes while the models run), once for all
models, runs each model on batches of up to its ``batch_size`` images that enter its network
at one size (so that no image's results depend on its neighbours; ``pad_to_multiple`` rounds
semantic inputs up to share more batches), and hands on each image's runs and detections, which
the encode stage (:mod:`pipeline.encode`, CPU tasks) turns into RLE strings and table rows.
With ``calling_threads`` above 1 (``threads_per_actor``: four on GPUs by default), Ray calls it
from that many threads at once, a shard each, each thread on a CUDA stream of its own; a
semantic network's forward passes then run on one thread of their own
(:class:`OneNetworkThread`), so that cuDNN searches each shape's kernels once.

On a GPU, compressed bytes are what crosses the object store and the host: complete RGB JPEGs
are decoded a window at a time on the device (nvjpeg, through TorchCodec's ``decode_jpeg``),
other images on the host threads, and resizing, normalising, the model (bf16 autocast and
channels_last as the model's :class:`~models.registry.CudaExecution` says, under
``--precision auto``; ``--compile`` for ``torch.compile``), the class maps (:mod:`pipeline.class_maps`),
Mask R-CNN's mask paste (:mod:`models.rcnn`) and the run finding of RLE all stay on the device.

Preprocessing, as ARCHITECTURE.md fixes it:
- semantic: uint8 RGB, shorter side resized to 520 (bilinear, antialiased), scaled to [0, 1],
  ImageNet-normalised; the argmax of the logits resized bilinearly to the original size;
- instance and detection: float RGB in [0, 1] at original size, torchvision resizes
  internally; detections scoring below ``score_threshold`` are dropped and mask
  probabilities thresholded at 0.5.

``predict_class_maps`` and ``predict_detections`` are what ``segpipe eval`` measures too.

An actor on a fraction of a GPU (``--actors`` above the GPUs) caps its CUDA memory at that
fraction, so that the actors sharing a GPU cannot starve each other: one that reaches its share
runs out of memory alone. A batch that runs out of device memory is split in halves and retried,
down to single images; an image that does not fit alone becomes an ``out_of_memory`` row. The
actor then keeps the pixels per batch that fit as the model's budget, and later batches are cut
to it: the batch size follows the images' size and the device's memory, rather than running out
again. A batch that fails otherwise is retried image by image, and an image that still fails
becomes an ``inference_error`` row, so one bad image never costs its neighbours. A network that
``--compile`` cannot compile (no C++ compiler on a CPU node, say) raises
:class:`~pipeline.errors.CompileFailed` instead, which stops the run: no image is to blame.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import torch
import torch.fx.experimental.optimization as fx_optimization
import torchvision.transforms.functional as tv_functional
from torch import nn
from torchcodec.decoders import decode_jpeg, decode_webp

from models import ModelSpec, Preprocessing, Weights, get_model_spec, without_final_upsampling
from models.rcnn import detect, input_size, paste_masks
from pipeline import IMPORT_STARTED_AT
from pipeline.class_maps import class_maps
from pipeline.config import RunConfig
from pipeline.decode import DecodeError, decode_image, plain_rgb_jpeg, plain_webp
from pipeline.encode import Detections, Runs, map_runs, mask_count, results_table, summarize_detections
from pipeline.errors import CompileFailed
from pipeline.schema import ENCODED_IMAGE_SCHEMA, IMAGES_SCHEMA, binary_views, nest, rows_to_table, single_array, unnest

# The JPEG decoder only reads the bytes it is given, which may be the object store's read-only memory.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

_logger = logging.getLogger("segpipe.infer")
_IMPORTED_AT = time.time()
"""When this process had imported torch, torchvision and segpipe's models (an actor's ``imported`` figure)."""
_DECODE_THREADS = 4
DECODE_WINDOW_BATCHES = 4
"""An actor decodes its shard's images this many of its largest batches at a time."""
_MASK_PROBABILITY_THRESHOLD = 0.5


@dataclass
class LoadedModel:
    """One model in the actor, with what it needs to turn pixels into model outputs."""

    config: RunConfig
    run_id: str
    spec: ModelSpec
    preprocessing: Preprocessing
    model: nn.Module
    bf16: bool
    channels_last: bool
    batch_size: int
    """Most images per forward pass: ``--batch-size``, or the model's default on the actor's device."""
    pixel_budget: int | None = None
    """Most decoded pixels per batch known to fit on the device, once a batch has run out of memory."""


def _usable_cpus() -> int:
    """The CPUs this process may run on: more torch threads than those would only take turns."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _process_started_at() -> float | None:
    """When this process started, as a ``time.time()``, from Linux's ``/proc`` (to a clock tick);
    ``None`` where there is no ``/proc``."""
    try:
        since_boot = float(Path("/proc/uptime").read_text().split()[0])
        # /proc/self/stat: after the command name in parentheses, field 22 (starttime, in clock ticks after boot) is the 20th
        started_after_boot = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (since_boot - started_after_boot)


class SegmentShards:
    """Ray Data callable class for ``map_batches``: columns ``shard_id``, ``images`` -> one row
    per (shard, model) with ``shard_id``, ``run_id``, ``model``, ``stage_seconds``, ``images``
    (the ``images`` table's rows) and ``results`` (:data:`~pipeline.schema.RESULTS_SCHEMA` rows
    of the ok images). Each image is decoded once, whatever the number of models; the runs
    share ``input``, ``max_pixels`` and the device.

    ``stage_seconds`` is a JSON object of where the actor's time on the shard went: ``decode``
    (waiting for pixels: the host threads decode the next window while the models run, so only
    what they could not hide counts, plus the device's JPEG decoding), ``model`` (the forward
    pass and the device's post-processing, until the runs and boxes are on the host) and
    ``tables`` (Arrow); the actor's first shard also carries ``startup``, the seconds its
    constructor took (weights from the object store, model build, move to the device), and
    ``ready``, the seconds from ``pipeline_started_at`` (the driver's ``time.time()`` as the
    pipeline started) until the constructor returned: the actor's scheduling, its worker
    process starting and importing torch, then the constructor. Three more split that wait:
    on Linux, ``process``, the seconds from then until the process started; ``import_started``,
    until it began importing segpipe's stages (Ray's scheduling of the actor ends about there);
    and ``imported``, until it had imported this module (torch, torchvision, the models). Each
    is below zero for a worker that Ray had started, or that had imported, before the pipeline.
    They are host times: queued device work counts in the stage that waits for it.

    With ``calling_threads`` above 1, Ray calls the actor from that many threads at once: each
    works on its own shard, on a CUDA stream of its own, so that one thread's host work and its
    waits for its results overlap the others' kernels inside one process and one copy of the
    models, where separate actors would time-share the GPU between their processes.

    On CPUs, torch runs on ``cpu_threads`` threads (by default, the CPUs Ray assigned the actor),
    at most the CPUs the process may run on."""

    def __init__(
        self,
        *,
        configs: list[RunConfig],
        run_ids: list[str],
        device: str,
        weights: list[ray.ObjectRef],
        pipeline_started_at: float,
        calling_threads: int = 1,
        cpu_threads: int | None = None,
    ) -> None:
        started = time.perf_counter()
        self.device = torch.device(device)
        assigned = ray.get_runtime_context().get_assigned_resources()
        if self.device.type == "cpu":
            torch.set_num_threads(min(cpu_threads or max(1, round(assigned.get("CPU", 1))), _usable_cpus()))
        else:
            torch.backends.cudnn.benchmark = True  # a kernel search per batch shape, repaid where shapes recur
            gpu_share = assigned.get("GPU", 1.0)
            if gpu_share < 1:
                # Ray leaves actors on a fraction of a GPU to keep to that fraction of its memory.
                torch.cuda.set_per_process_memory_fraction(gpu_share)  # on the one GPU Ray made visible
        self.calling_threads = calling_threads
        self.models = [self._load(config, run_id, ray.get(ref)) for config, run_id, ref in zip(configs, run_ids, weights)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the weights are on the device before any calling thread's stream reads them
        self.max_pixels = configs[0].max_pixels
        self.window = DECODE_WINDOW_BATCHES * max(loaded.batch_size for loaded in self.models)
        self.decoder = ThreadPoolExecutor(max_workers=_DECODE_THREADS * calling_threads, thread_name_prefix="decode")
        self.calling_thread = threading.local()
        """Per thread that Ray calls the actor from: ``seconds`` (per stage, of the shard in hand) and ``stream``."""
        self.start_figures = {
            "startup": time.perf_counter() - started,
            "ready": time.time() - pipeline_started_at,
            "imported": _IMPORTED_AT - pipeline_started_at,
            "import_started": IMPORT_STARTED_AT - pipeline_started_at,
        }
        """Until the first shard takes them."""
        if (process_started_at := _process_started_at()) is not None:
            self.start_figures["process"] = process_started_at - pipeline_started_at
        self.start_figures_lock = threading.Lock()
        self.device_decoder_refused = False

    def _load(self, config: RunConfig, run_id: str, weights: Weights) -> LoadedModel:
        spec = get_model_spec(config.model)
        model = weights.build(spec)
        if spec.task != "semantic":
            # torchvision drops boxes under its own 0.05 before ours; a lower --score-threshold must win.
            model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, config.score_threshold)
        bf16, channels_last = execution(spec, config.precision, self.device)
        model = prepared_network(model, spec.task, self.device, channels_last=channels_last, compile_mode=config.compile)
        if spec.task == "semantic" and self.device.type == "cuda" and self.calling_threads > 1:
            model = OneNetworkThread(model)
        batch_size = config.batch_size or spec.default_batch_size(self.device.type)
        return LoadedModel(config, run_id, spec, weights.preprocessing, model, bf16, channels_last, batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns: dict[str, list] = defaultdict(list)
        with self.start_figures_lock:
            seconds = self.calling_thread.seconds = Counter(self.start_figures)
            self.start_figures = {}
        with torch.inference_mode(), self._own_stream():
            for shard_id, cell in zip(batch.column("shard_id").to_pylist(), batch.column("images")):
                per_model = self._segment_shard(shard_id, _shard_images(cell))
                for loaded, (images, outputs) in zip(self.models, per_model):
                    columns["shard_id"].append(shard_id)
                    columns["run_id"].append(loaded.run_id)
                    columns["model"].append(loaded.config.model)
                    with self._timed("tables"):
                        columns["images"].append(nest(rows_to_table(images, IMAGES_SCHEMA)))
                        columns["results"].append(nest(results_table(outputs)))
                # Every model's row carries the shard's seconds: the stages serve all models at once.
                columns["stage_seconds"] += [json.dumps({stage: round(s, 4) for stage, s in seconds.items()})] * len(per_model)
                seconds.clear()
        tables = {name: single_array(columns[name]) for name in ("images", "results")}
        return pa.table({name: columns[name] for name in ("shard_id", "run_id", "model", "stage_seconds")} | tables)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.calling_thread.seconds[stage] += time.perf_counter() - started

    def _own_stream(self) -> AbstractContextManager:
        """On a GPU, the calling thread's CUDA stream as the current one: a thread waiting for its
        results waits for its own kernels only."""
        if self.device.type != "cuda":
            return nullcontext()
        if not hasattr(self.calling_thread, "stream"):
            self.calling_thread.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.calling_thread.stream)

    def _segment_shard(self, shard_id: str, images: list[dict]) -> list[tuple[list[dict], list[tuple[str, str, Runs | Detections]]]]:
        """Per model, the ``images`` table's rows of one shard's images, in input order, and the
        ``(image_id, uri, model output)`` of those that are ok."""
        outcomes: list[dict[int, dict]] = [{} for _ in self.models]
        ok_outputs: list[list[tuple[str, str, Runs | Detections]]] = [[] for _ in self.models]
        readable = []
        for index, image in enumerate(images):
            if image["error_type"] is None:
                readable.append(index)
            else:  # the read stage could not get its bytes
                for outcome in outcomes:
                    outcome[index] = _error(image["error_type"], image["error_message"])
        windows = [readable[start : start + self.window] for start in range(0, len(readable), self.window)]
        pending = self._decode_async(images, windows[0]) if windows else []
        for number, indices in enumerate(windows):
            with self._timed("decode"):
                decoded = {index: future.result() for index, future in zip(indices, pending)}
                pending = self._decode_async(images, windows[number + 1]) if number + 1 < len(windows) else []
                decoded |= self._decode_on_device(images, [index for index, result in decoded.items() if result is None])
            pixels: dict[int, torch.Tensor] = {}
            for index, result in decoded.items():
                if isinstance(result, DecodeError):
                    for outcome in outcomes:
                        outcome[index] = _error(result.error_type, str(result))
                else:
                    pixels[index] = result
            for loaded, outcome, outputs_of_model in zip(self.models, outcomes, ok_outputs):
                for index, result in self._predict(loaded, pixels).items():
                    if isinstance(result, Exception):
                        error_type = "out_of_memory" if isinstance(result, torch.OutOfMemoryError) else "inference_error"
                        outcome[index] = _error(error_type, f"{type(result).__name__}: {result}")
                        continue
                    height, width = pixels[index].shape[-2:]
                    outcome[index] = {"status": "ok", "width": width, "height": height, "n_masks": mask_count(result)}
                    outputs_of_model.append((images[index]["image_id"], images[index]["uri"], result))
        return [
            (
                [
                    {
                        "run_id": loaded.run_id,
                        "image_id": image["image_id"],
                        "uri": image["uri"],
                        "shard_id": shard_id,
                        "size_bytes": image["size_bytes"],
                        **outcome[index],
                    }
                    for index, image in enumerate(images)
                ],
                outputs_of_model,
            )
            for loaded, outcome, outputs_of_model in zip(self.models, outcomes, ok_outputs)
        ]

    def _decode_async(self, images: list[dict], indices: list[int], *, device_can_decode: bool = True) -> list[Future]:
        """Per image, a future of its ``(3, H, W)`` pixels, its :class:`DecodeError`, or ``None``
        where the device is to decode it."""
        on_device = device_can_decode and self.device.type == "cuda"
        return [self.decoder.submit(decode_on_host, images[index]["data"], max_pixels=self.max_pixels, device_can_decode=on_device)
                for index in indices]  # fmt: skip

    def _decode_on_device(self, images: list[dict], indices: list[int]) -> dict[int, torch.Tensor | DecodeError]:
        """``indices``' JPEGs decoded in one batch on the device; on the host threads, should the
        device refuse the batch, so that a file nvjpeg rejects gets its own error row (the first
        refusal is logged: a device that refuses every batch leaves all decoding to the host).

        TorchCodec's decoder writes on the calling thread's stream and returns once its pixels
        are there, so it is called once the thread's previous window's results are on the host:
        it then waits for nothing but the decoding. Each calling thread (``calling_threads``)
        takes a decoder of its own from TorchCodec's pool, where torchvision's (deprecated since
        0.29) had one per process behind a lock, writing on a stream of its own without waiting
        for the caller's (pytorch/vision#9606)."""
        if not indices:
            return {}
        data = [torch.frombuffer(images[index]["data"], dtype=torch.uint8) for index in indices]
        try:
            return dict(zip(indices, decode_jpeg(data, mode="RGB", device=self.device)))
        except RuntimeError as error:
            if not self.device_decoder_refused:
                self.device_decoder_refused = True
                _logger.warning("segpipe: the GPU's JPEG decoder refused a batch of %d (%s); decoding it on the host "
                                "(logged once per actor)", len(indices), str(error).strip().splitlines()[0])  # fmt: skip
            on_host = self._decode_async(images, indices, device_can_decode=False)
            return {index: future.result() for index, future in zip(indices, on_host)}

    def _predict(self, loaded: LoadedModel, pixels: dict[int, torch.Tensor]) -> dict[int, Runs | Detections | Exception]:
        """Each image's model output (or the exception it failed with), batching images of one
        model input size: an image's results never depend on what else is in its batch."""
        results: dict[int, Runs | Detections | Exception] = {}
        for same_input in _indices_by(pixels, lambda image: model_input_size(loaded, *image.shape[-2:])).values():
            self._predict_isolating_failures(loaded, same_input, pixels, results)
        return results

    def _predict_isolating_failures(self, loaded: LoadedModel, same_input: list[int], pixels: dict[int, torch.Tensor], results: dict) -> None:
        """Predicts ``same_input`` (images of one model input size) in batches of at most the
        model's batch size and pixel budget; halves a batch that runs out of memory, retries one
        that fails otherwise image by image."""
        image_pixels = [pixels[index][0].numel() for index in same_input]
        batches = _batches(same_input, image_pixels, most_images=loaded.batch_size, most_pixels=loaded.pixel_budget)
        if len(batches) > 1:
            for batch in batches:
                self._predict_isolating_failures(loaded, batch, pixels, results)
            return
        try:
            results.update(zip(same_input, self._predict_batch(loaded, [pixels[index] for index in same_input])))
        except torch._dynamo.exc.BackendCompilerFailed as error:  # the node's compiler, not the images: no image row blames them
            message = str(error).strip().splitlines()[0]
            raise CompileFailed(
                f"--compile {loaded.config.compile} could not compile {loaded.spec.name}: {message} "
                "(no image was marked failed; run without --compile, or fix the node's compiler)"
            ) from None
        except Exception as error:  # noqa: BLE001 - isolate what fails, keep the rest
            if len(same_input) == 1:
                results[same_input[0]] = error
                return
            if isinstance(error, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = sum(image_pixels) // 2
                loaded.pixel_budget = half if loaded.pixel_budget is None else min(loaded.pixel_budget, half)
                self._predict_isolating_failures(loaded, same_input, pixels, results)
            else:
                for index in same_input:
                    self._predict_isolating_failures(loaded, [index], pixels, results)

    def _predict_batch(self, loaded: LoadedModel, images: list[torch.Tensor]) -> list[Runs | Detections]:
        """The model output of each of ``images``, which share their model input size, from one
        forward pass: its class map's runs, or its detections."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        with self._timed("model"):
            if loaded.spec.task != "semantic":
                return predict_detections(loaded.model, images, loaded.config.score_threshold, bf16=loaded.bf16)
            same_size = list(_indices_by(dict(enumerate(images)), lambda image: image.shape).values())
            maps_per_size = predict_class_maps(
                loaded.model,
                [torch.stack([images[index] for index in indices]) for indices in same_size],
                loaded.preprocessing,
                pad_to_multiple=loaded.config.pad_to_multiple,
                bf16=loaded.bf16,
                channels_last=loaded.channels_last,
            )
            runs = {index: image_runs for indices, maps in zip(same_size, maps_per_size) for index, image_runs in zip(indices, map_runs(maps))}
            return [runs[index] for index in range(len(images))]


def _indices_by(items: dict[int, torch.Tensor], key: Callable[[torch.Tensor], Hashable]) -> dict[Hashable, list[int]]:
    """``items``' keys grouped by ``key`` of their values, in order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in items.items():
        groups[key(item)].append(index)
    return groups


def _batches(indices: list[int], pixels: list[int], *, most_images: int, most_pixels: int | None) -> list[list[int]]:
    """``indices`` cut in order into batches of at most ``most_images`` images and ``most_pixels``
    pixels (an image over the budget alone)."""
    batches: list[list[int]] = []
    batch_pixels = 0
    for index, count in zip(indices, pixels):
        if not batches or len(batches[-1]) == most_images or (most_pixels is not None and batch_pixels + count > most_pixels):
            batches.append([])
            batch_pixels = 0
        batches[-1].append(index)
        batch_pixels += count
    return batches


def model_input_size(loaded: LoadedModel, height: int, width: int) -> tuple[int, int]:
    """The size an image of ``height`` x ``width`` has when it enters ``loaded``'s network."""
    if loaded.spec.task == "semantic":
        return tuple(_rounded_up(side, loaded.config.pad_to_multiple) for side in loaded.preprocessing.resized(height, width))
    return input_size(loaded.model, height, width)


def _rounded_up(side: int, multiple: int) -> int:
    return math.ceil(side / multiple) * multiple


def prepared_network(
    model: nn.Module, task: str, device: torch.device, *, channels_last: bool, compile_mode: str, final_upsampling: bool = False
) -> nn.Module:
    """``model`` as segpipe infers with it on ``device``: in eval mode; a semantic model without its
    final upsampling of the logits to the input's size (:func:`models.without_final_upsampling`:
    :func:`class_maps` makes the maps from the logits as the network left them) unless
    ``final_upsampling``, and with its batch norms folded on CPUs (:func:`fold_batch_norms`;
    compiling folds them itself); on the device in channels_last or its own memory format;
    compiled in ``compile_mode`` unless that is ``"off"``."""
    model = model.eval()
    if task == "semantic" and not final_upsampling:
        model = without_final_upsampling(model)
    if device.type == "cpu" and task == "semantic" and compile_mode == "off":
        model = fold_batch_norms(model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return model if compile_mode == "off" else compile_network(model, task, compile_mode)


def compile_network(model: nn.Module, task: str, mode: str) -> nn.Module:
    """``model`` with its network compiled by ``torch.compile`` in ``mode``: the whole model for
    semantic models; the backbone for the R-CNN family, whose proposal and NMS stages change
    shape with every image. The batch size is dynamic from the first batch on, so that a shard's
    last, partial batch needs no second compilation (which stopped each DeepLabV3 actor for 20 s
    at the end of a run on the H200); other input sizes are made dynamic once a second one is
    seen. Inductor freezes the weights as constants (segpipe only infers), so that each batch
    norm folds into the convolution before it instead of costing a pass over its activations
    (see benchmarks/HISTORY.md)."""
    from torch._inductor import list_mode_options  # the compiler loads only where it is asked for

    options = {**list_mode_options(mode), "freezing": True}
    if task == "semantic":
        return _AnyBatchSize(torch.compile(model, options=options))
    model.backbone = _AnyBatchSize(torch.compile(model.backbone, options=options))
    return model


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Semantic ``model`` with each batch norm that follows a convolution folded into that
    convolution's weights and bias (``torch.fx``: the model is traced, so its forward must not
    branch on tensor values). On CPUs oneDNN adds the bias inside the convolution, so each batch
    norm's own pass over the activations goes: on this repository's CPU lraspp's network ran
    1.35x, the U-Net's 1.15x and DeepLabV3's 1.03x, with the same class maps. On GPUs cuDNN
    adds the bias in a pass of its own, so they keep the model as it is (folded, DeepLabV3's
    network ran 473 img/s on the H100 against 522; ``--compile`` folds them there)."""
    return fx_optimization.fuse(model.eval())


class _AnyBatchSize(nn.Module):
    """A compiled function whose first argument's first dimension is dynamic from its first call:
    one compilation serves every batch of two images or more (a batch of one is compiled apart)."""

    def __init__(self, compiled: Callable) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, batch: torch.Tensor, *rest: object) -> object:
        torch._dynamo.maybe_mark_dynamic(batch, 0)
        return self.compiled(batch, *rest)


class OneNetworkThread(nn.Module):
    """A semantic network whose forward passes, whichever threads call it, run on one thread of
    its own, on the calling thread's CUDA stream and under its inference and autocast modes.

    PyTorch keeps cuDNN's kernel choices (``cudnn.benchmark``) per thread, so each of a threaded
    actor's threads would search kernels for every input shape, all of them at once on the first
    shard, each timing its candidates among the others' kernels. On one thread each shape is
    searched once. Semantic networks queue their kernels without waiting for the device, so one
    thread queues all the forward passes while the callers' kernels run on their own streams."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="network")

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        device_type = inputs.device.type
        # all three are the calling thread's own: the network's thread must take them on
        stream = torch.cuda.current_stream(inputs.device) if device_type == "cuda" else None
        autocast = {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type)}
        inference = torch.is_inference_mode_enabled()

        def forward_here() -> dict[str, torch.Tensor]:
            on_stream = torch.cuda.stream(stream) if stream is not None else nullcontext()
            with torch.inference_mode(inference), on_stream, torch.autocast(device_type, **autocast):
                return self.network(inputs)

        return self.thread.submit(forward_here).result()


def execution(spec: ModelSpec, precision: str, device: torch.device) -> tuple[bool, bool]:
    """Whether ``spec``'s model runs under bf16 autocast, and on channels_last input, with
    ``--precision precision`` on ``device``."""
    on_cuda = device.type == "cuda"
    bf16 = on_cuda and (precision == "bf16" or (precision == "auto" and spec.cuda.bf16))
    return bf16, spec.cuda.channels_last if on_cuda else spec.cpu_channels_last


def model_input(batch: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Semantic models' input: uint8 ``(N, 3, H, W)`` resized and normalised as ``preprocessing`` says,
    to the same values as torchvision's ``resize``, ``convert_image_dtype`` and ``normalize``."""
    if preprocessing.resize_shorter is not None:
        batch = tv_functional.resize(
            batch, [preprocessing.resize_shorter], interpolation=tv_functional.InterpolationMode.BILINEAR, antialias=True
        )
    mean, std = _normalization(preprocessing, batch.device)
    return tv_functional.convert_image_dtype(batch, torch.float32).sub_(mean).div_(std)


@functools.cache
def _normalization(preprocessing: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``preprocessing``'s mean and standard deviation as float32 ``(3, 1, 1)`` tensors on ``device``,
    made once. torchvision's ``normalize`` copies them to the device for every batch and checks the
    deviation on the host, and on a GPU each of the three waits for the stream's queued work (the
    batch's decoding and resizing) before the host can queue the network; it also copies the batch
    first, which on this repository's CPU made the normalisation 1.5x as long."""
    with torch.inference_mode(False):  # usable where gradients are recorded too (segpipe train)
        mean, std = (torch.tensor(values, dtype=torch.float32, device=device) for values in (preprocessing.mean, preprocessing.std))
        return mean.view(-1, 1, 1), std.view(-1, 1, 1)


def predict_class_maps(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    preprocessing: Preprocessing,
    *,
    pad_to_multiple: int = 1,
    bf16: bool = False,
    channels_last: bool = False,
) -> list[torch.Tensor]:
    """Argmax class maps at original size of uint8 ``(n, 3, H, W)`` batches whose images differ in
    size but not in model input size: one forward pass for all, and per batch an ``(n, H, W)``
    tensor on its device, uint8 for up to 256 classes, else int32 (:func:`class_maps`).

    With ``pad_to_multiple`` above 1, each resized input is padded on the right and bottom (with
    zeros: the mean colour, once normalised) up to a multiple of it, so that batches of similar
    sizes enter together; the padding's logits are cropped away before upsampling. A network
    run without its final upsampling (:func:`prepared_network`) leaves that to :func:`class_maps`."""
    resized = [model_input(batch, preprocessing) for batch in batches]
    height, width = (_rounded_up(side, pad_to_multiple) for side in resized[0].shape[-2:])
    inputs = resized[0].new_zeros((sum(len(batch) for batch in batches), 3, height, width))
    for batch, first in zip(resized, itertools.accumulate((len(batch) for batch in resized), initial=0)):
        inputs[first : first + len(batch), :, : batch.shape[-2], : batch.shape[-1]] = batch
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)["out"]
    return [
        class_maps(batch_logits, *batch.shape[-2:], input_size=(height, width), crop=batch_input.shape[-2:])
        for batch, batch_input, batch_logits in zip(batches, resized, logits.split([len(batch) for batch in batches]))
    ]


def predict_detections(
    model: nn.Module, images: Sequence[torch.Tensor], score_threshold: float, *, bf16: bool = False
) -> list[Detections]:
    """Detections scoring at least ``score_threshold`` in each uint8 ``(3, H, W)`` image (a list,
    or a stacked batch), in original pixels; masks (instance models only) are the probabilities
    above 0.5, pasted and run-length encoded on the images' device."""
    return [
        summarize_detections(boxes, labels, scores, masks, height=image.shape[-2], width=image.shape[-1])
        for image, (boxes, labels, scores, masks) in zip(images, kept_detections(model, images, score_threshold, bf16=bf16))
    ]


def kept_detections(
    model: nn.Module, images: Sequence[torch.Tensor], score_threshold: float, *, bf16: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per image, the boxes, labels and scores of the detections scoring at least
    ``score_threshold`` and, for instance models, their boolean ``(K, H, W)`` masks, all of an
    image's pasted in one batched product: the model's part of :func:`predict_detections`, on the
    images' device. The network runs on the whole batch at once; each image's masks are pasted
    as it is asked for, so that a caller done with one image before taking the next holds one
    image's masks at a time."""
    outputs = detect(model, [tv_functional.convert_image_dtype(image, torch.float32) for image in images], bf16=bf16)
    for image, output in zip(images, outputs):
        keep = (output["scores"] >= score_threshold).nonzero().squeeze(1)  # one wait for the device; indices select the rest
        boxes = output["boxes"][keep]
        masks = output.get("masks")
        if masks is not None:
            height, width = image.shape[-2:]
            masks = paste_masks(masks[keep, 0], boxes, height=height, width=width, threshold=_MASK_PROBABILITY_THRESHOLD)
        yield boxes, output["labels"][keep], output["scores"][keep], masks


def decode_on_host(data: memoryview, *, max_pixels: int, device_can_decode: bool) -> torch.Tensor | DecodeError | None:
    """RGB uint8 ``(3, H, W)`` pixels or the :class:`DecodeError`; ``None`` for a JPEG that the
    device decodes instead, when it can.

    Complete, upright RGB JPEGs (:func:`~pipeline.decode.plain_rgb_jpeg`) and still WebPs
    (:func:`~pipeline.decode.plain_webp`) are decoded by libjpeg-turbo and libwebp straight into a
    tensor (TorchCodec's ``decode_jpeg`` and ``decode_webp``: the same pixels as Pillow's; JPEGs
    at 1.9x its rate on one thread of this repository's CPU and 2.4x on two, WebPs at 1.1x to 1.6x
    and 1.2x to 1.8x, since they hold the GIL for none of it); the rest, and any file those
    decoders refuse, by :func:`~pipeline.decode.decode_image`, with its conversions and error rows."""
    if plain_rgb_jpeg(data, max_pixels=max_pixels):
        if device_can_decode:
            return None
        decode_to_tensor = decode_jpeg
    elif plain_webp(data, max_pixels=max_pixels):
        decode_to_tensor = decode_webp
    else:
        decode_to_tensor = None
    if decode_to_tensor is not None:
        try:
            return decode_to_tensor(torch.frombuffer(data, dtype=torch.uint8), mode="RGB")
        except Exception:  # noqa: BLE001 - decode_image says what is wrong with it
            pass
    try:
        return torch.from_numpy(decode_image(bytes(data), max_pixels=max_pixels)).permute(2, 0, 1)
    except DecodeError as error:
        return error


def _shard_images(cell: pa.Scalar) -> list[dict]:
    """One shard's images as rows, each ``data`` a view of its encoded bytes where the batch
    holds them (in the object store), not a copy."""
    table = unnest(cell, ENCODED_IMAGE_SCHEMA)
    rows = table.drop_columns(["data"]).to_pylist()
    for row, data in zip(rows, binary_views(table.column("data"))):
        row["data"] = data
    return rows


def _error(error_type: str, message: str) -> dict:
    return {"status": "error", "error_type": error_type, "error_message": message, "n_masks": 0}
