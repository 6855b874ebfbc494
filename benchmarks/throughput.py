"""End-to-end throughput against the model alone and against a plain Ray Data script.

``python -m benchmarks.throughput --model NAME --count N --size WxH --device cpu|cuda [--json]``
writes N photo-like JPEGs (:mod:`benchmarks.corpus`; ``--corpus shapes`` for synthetic shapes)
to local disk and measures, in one run, with random weights (or ``--weights``):

- **model-only**: forward passes (plus the argmax for semantic models) on tensors already on
  the device, with the shapes, batch size and precision the pipeline uses (3 warm-up batches,
  at most 10 timed); on CUDA also in float32 and in eager bf16 autocast with and without
  channels_last, to compare. Semantic models run torchvision's whole forward here, upsampling
  included, as the issue's ceilings were measured;
- **model step** (semantic models): the network as segpipe runs it, without its final
  upsampling (:func:`models.without_final_upsampling`), and its class maps at the images' size
  (:func:`pipeline.class_maps.class_maps`), with the run's ``--compile``: the device's work for
  the model stage, decoding and resizing aside;
- **class maps only** (semantic models): the post-processing alone, the logits that the network
  as segpipe runs it gives for the benchmark's images made into class maps at the images' size
  as the pipeline does; on CUDA also in PyTorch's operators (the network's upsampling, then
  interpolating where corners disagree: the pipeline's way until 2026-11-28);
- **decode only**: the benchmark's JPEGs decoded a window at a time, as the model actor takes
  them (:data:`pipeline.infer.DECODE_WINDOW_BATCHES` batches), by TorchCodec's ``decode_jpeg``:
  on CUDA in one batched nvjpeg call (on the GPU's hardware decoder where it has one, else
  Huffman decoding on the host image by image), on CPUs one image at a time on one core
  (libjpeg-turbo); also from four threads at once, each on a CUDA stream of its own, as a
  threaded actor's threads decode, and with torchvision's decoder (segpipe's before TorchCodec;
  one per process behind a lock), one thread and four;
- **end-to-end**: ``segpipe run`` from the JPEG files to the committed manifest, wall clock,
  Ray start-up excluded (reported on its own); also the seconds until the first shard was
  written (the driver's listing, actor start-up, model load, the first shard's work) and the
  steady rate after it, from the written files' times, and from the manifest the listing's
  seconds, when (after the listing) the slowest actor was ready, its
  constructor's seconds, and the seconds per stage (the actors' decode, model and tables; the
  CPU tasks' encode and write), of the first shard and of all;
- **baseline**: a plain Ray Data script written the way Ray's batch-inference documentation
  shows it (``read_images``, CPU preprocessing, ``map_batches`` with a model class, CPU
  post-processing, class maps written as raw arrays); semantic models only (``--skip-baseline``
  leaves it out);
- with ``--compile MODE``: the model-only figure once more with the network compiled in that
  mode, and the end-to-end run with ``segpipe run --compile MODE``;
- with ``--actor-only``: segpipe's model actor alone (:class:`pipeline.infer.SegmentShards`),
  in a Ray actor of its own called on up to 2048 images whose shards are already read into the
  object store, from as many threads as segpipe's actor is called from: its decoding, model and
  post-processing without Ray Data, reading, encoding or writing. Between model-only and end-to-end, it says what the actor's
  own work costs beyond the network; ``--profile`` also prints PyTorch's profile of it (the
  operators and kernels that took the most device time, or host time on a CPU);

and reports images/s for each, the ratios, output bytes per image, how the RLE masks compare
with raw uint8 class maps, and on CUDA the peak GPU memory and mean GPU utilisation during the
end-to-end run (sampled with ``nvidia-smi``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import ray
import ray.data
import torch
import torchvision.transforms.functional as tv_functional
from torchcodec.decoders import decode_jpeg

from benchmarks.corpus import CORPORA, parse_size
from jobs.run import ensure_ray, plan_actors, run
from models import Preprocessing, get_model_spec, resolve_weights
from pipeline.class_maps import class_maps, eager_class_maps
from pipeline.config import RunConfig
from pipeline.infer import (
    DECODE_WINDOW_BATCHES,
    SegmentShards,
    execution,
    fold_batch_norms,
    kept_detections,
    model_input,
    prepared_network,
)
from pipeline.listing import list_shards
from pipeline.read import read_shards

_WARMUP_STEPS = 3
_MAX_TIMED_STEPS = 10
_AS_THE_PIPELINE_RUNS_IT = "as the pipeline runs it"  # the class maps variant that is the pipeline's own
_ACTOR_ONLY_IMAGES = 2048
_PROFILED_SHARDS = 4
_PROFILE_ROWS = 30
_VARIANTS = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "bf16_channels_last": (True, True, False),
    "fp32_channels_last": (False, True, False),
    "bf16_channels_last_batch_norms_folded": (True, True, True),
    "bf16_batch_norms_folded": (True, False, True),  # the MobileNets' own layout: never folded on a GPU before 2026-11-28
}
"""Model-only variants measured on CUDA besides the pipeline's own: name -> (bf16, channels_last,
batch norms folded into the convolutions, as on CPUs; eager GPUs keep them)."""


def model_only(
    model_name: str, weights_spec: str, *, count: int, width: int, height: int, device: str, batch_size: int,
    bf16: bool, channels_last: bool, torchvision_forward: bool = False, compile_mode: str = "off", fold: bool = False,
    model_step: bool = False,
) -> dict:  # fmt: skip
    """Images/s of the model alone on device-resident inputs, and its peak device memory.

    Semantic models run torchvision's whole forward and the argmax of its logits at the input
    size; with ``model_step``, the network as segpipe runs it (without its final upsampling) and
    the class maps at the images' ``width`` x ``height`` instead.

    Instance and detection models run as the pipeline runs them (:func:`pipeline.infer.kept_detections`:
    the network, then the kept masks pasted in one batch); ``torchvision_forward`` times torchvision's own forward
    instead, which pastes every mask one at a time. ``compile_mode`` compiles the network as
    ``--compile`` does (the compilation happens in the untimed warm-up). ``fold`` folds a semantic
    model's batch norms into its convolutions on any device (the pipeline does so on CPUs only)."""
    spec = get_model_spec(model_name)
    weights = resolve_weights(weights_spec, spec)
    network = fold_batch_norms(weights.build(spec)) if fold else weights.build(spec)
    model = prepared_network(
        network, spec.task, torch.device(device), channels_last=channels_last, compile_mode=compile_mode, final_upsampling=not model_step
    )
    if spec.task == "semantic":
        inputs = torch.randn(batch_size, 3, *weights.preprocessing.resized(height, width), device=device)
        inputs = inputs.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def step() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(inputs)["out"]
            if model_step:
                class_maps(logits, height, width, input_size=inputs.shape[-2:])
            else:
                logits.argmax(1)
    elif torchvision_forward:
        images = [torch.rand(3, height, width, device=device) for _ in range(batch_size)]

        def step() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                model(images)
    else:
        images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device) for _ in range(batch_size)]
        threshold = RunConfig.model_fields["score_threshold"].default

        def step() -> None:
            for _ in kept_detections(model, images, threshold, bf16=bf16):
                pass  # each image's masks pasted, then dropped, as the pipeline takes them

    torch.backends.cudnn.benchmark = device == "cuda"  # as the pipeline's actors run
    ips = _images_per_second(step, count=count, batch_size=batch_size, device=device)
    return {"ips": ips, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def _images_per_second(step: Callable[[], object], *, count: int, batch_size: int, device: str) -> float:
    """Images/s of ``step`` (one batch) under ``torch.inference_mode()``, timed over enough batches
    for ``count`` images (at most ``_MAX_TIMED_STEPS``) after ``_WARMUP_STEPS`` untimed ones; on
    CUDA the peak memory statistics count from the timed batches on."""
    steps = min(_MAX_TIMED_STEPS, math.ceil(count / batch_size))
    with torch.inference_mode():
        for _ in range(_WARMUP_STEPS):
            step()
        _synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def class_maps_only(
    model_name: str, weights_spec: str, images: Path, *, count: int, width: int, height: int, device: str, batch_size: int,
    bf16: bool, channels_last: bool, make_maps: Callable[..., torch.Tensor] = class_maps,
) -> dict:  # fmt: skip
    """Images/s of a semantic model's post-processing alone: the logits that its network, as
    segpipe runs it, gives for the benchmark's first images (in its precision and memory format,
    on the device) made into class maps at the images' size by ``make_maps`` (called as
    :func:`pipeline.class_maps.class_maps` is). Real logits, not noise: how many pixels are
    interpolated depends on the class borders."""
    spec = get_model_spec(model_name)
    weights = resolve_weights(weights_spec, spec)
    network = prepared_network(weights.build(spec), spec.task, torch.device(device), channels_last=channels_last, compile_mode="off")
    batch = torch.stack([decode_jpeg(encoded) for encoded in _encoded_jpegs(images, batch_size)]).to(device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        inputs = model_input(batch, weights.preprocessing)
        logits = network(inputs.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))["out"]
    step = functools.partial(make_maps, logits, height, width, input_size=inputs.shape[-2:])
    return {"ips": _images_per_second(step, count=count, batch_size=batch_size, device=device)}


def decode_only(
    images: Path, *, count: int, device: str, window: int, threads: int = 1, decode: Callable[..., object] = decode_jpeg
) -> dict:
    """Images/s of decoding ``window`` of the benchmark's JPEGs at a time to RGB with ``decode``
    as the model actor does: on CUDA one batched nvjpeg call per window, on CPUs one image after
    another; with ``threads`` above 1, a window in each of that many threads at once, each on a
    CUDA stream of its own, as a threaded actor's threads decode."""
    data = _encoded_jpegs(images, window)

    def one_window(stream: torch.cuda.Stream | None) -> None:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if device == "cuda":
                decode(data, mode="RGB", device=device)
            else:
                for encoded in data:
                    decode(encoded, mode="RGB")

    streams = [torch.cuda.Stream() if device == "cuda" else None for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        step = functools.partial(one_window, streams[0]) if threads == 1 else lambda: list(pool.map(one_window, streams))
        return {"ips": _images_per_second(step, count=count, batch_size=window * threads, device=device)}


def _decode_variants() -> dict[str, tuple[Callable[..., object], int]]:
    """JPEG decoders timed beside segpipe's own (TorchCodec's, one thread): name -> (decoder,
    threads). torchvision's, which segpipe used before TorchCodec, is one per process behind a
    lock; TorchCodec's gives each thread a decoder of its own."""
    variants = {"4 threads": (decode_jpeg, 4)}
    try:
        from torchvision.io import decode_jpeg as torchvision_decode_jpeg  # deprecated since torchvision 0.29
    except ImportError:  # a torchvision without its decoders
        return variants
    return variants | {"torchvision": (torchvision_decode_jpeg, 1), "torchvision, 4 threads": (torchvision_decode_jpeg, 4)}


def _encoded_jpegs(images: Path, count: int) -> list[torch.Tensor]:
    """The bytes of the benchmark's first ``count`` JPEGs, the first ones again where it has fewer."""
    paths = sorted(images.glob("*.jpg"))[:count]
    return [torch.frombuffer(bytearray(paths[index % len(paths)].read_bytes()), dtype=torch.uint8) for index in range(count)]


class _ActorAlone(SegmentShards):
    """segpipe's model actor, called shard by shard, and profiled, from the benchmark's driver."""

    def segment(self, batch: pa.Table) -> int:
        """The actor's work on one shard; the number of images in it."""
        self(batch)
        return len(batch.column("images")[0])

    def profile(self, batches: list[ray.ObjectRef], *, device: str) -> str:
        """PyTorch's profile of the actor's work on ``batches``, as a table of the operators and
        kernels that took the most device time (host time on a CPU)."""
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profiler:
            for batch in ray.get(batches):
                self(batch)
        sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        return profiler.key_averages().table(sort_by=sort_by, row_limit=_PROFILE_ROWS)


def actor_only(directory: Path, model_name: str, weights: str, *, device: str, batch_size: int, settings: dict,
               profile: bool) -> dict:  # fmt: skip
    """Images/s of segpipe's model actor alone, in a Ray actor of its own as segpipe plans one (a
    GPU and its threads, or the CPUs and torch threads of segpipe's one CPU actor), on up to :data:`_ACTOR_ONLY_IMAGES` images whose shards
    are already read into the object store, after one warm-up shard per thread (kernel searches,
    first allocations, compilation). ``profile`` prints PyTorch's profile of a second pass over a
    few shards."""
    config = RunConfig(input=str(directory), output=str(directory.parent / "actor-only"), model=model_name, weights=weights,
                       device=device, batch_size=batch_size, run_date=dt.date(2026, 1, 1), **settings)  # fmt: skip
    shards = list_shards(config.input, files_per_shard=config.files_per_shard, limit=_ACTOR_ONLY_IMAGES).shards
    batches = [ray.put(read_shards(pa.table({"shard": [shard.to_json()]}), image_column=config.image_column)) for shard in shards]
    # segpipe's own plan for one actor: its threads and resources, and on CPUs its torch threads
    alone = plan_actors(config.model_copy(update={"actors": None if device == "cpu" else 1}))
    actor = (
        ray.remote(_ActorAlone)
        .options(max_concurrency=alone.threads, **alone.resources)
        .remote(configs=[config], run_ids=["actor-only"], device=device,
                weights=[ray.put(resolve_weights(weights, get_model_spec(model_name)))], pipeline_started_at=time.time(),
                calling_threads=alone.threads, cpu_threads=alone.cpu_threads)
    )  # fmt: skip
    ray.get([actor.segment.remote(batch) for batch in batches[: alone.threads]])
    started = time.perf_counter()
    images = sum(ray.get([actor.segment.remote(batch) for batch in batches]))
    seconds = time.perf_counter() - started
    if profile:
        print(ray.get(actor.profile.remote(batches[:_PROFILED_SHARDS], device=device)), file=sys.stderr, flush=True)
    ray.kill(actor)
    return {"ips": images / seconds, "images": images, "threads": alone.threads}


def _one_actor_resources(device: str) -> dict:
    """Ray resources of the baseline's lone model actor: one GPU, or on CPUs all but the one that
    segpipe leaves to the read and write tasks."""
    if device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": max(1.0, ray.cluster_resources().get("CPU", 2) - 1)}


class GpuSampler:
    """Samples GPU utilisation and memory with ``nvidia-smi`` while a block runs."""

    def __init__(self) -> None:
        self.utilisation: list[float] = []
        self.memory_mib: list[float] = []
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            utilisation, memory = (float(value) for value in line.split(",")[:2])
            self.utilisation.append(utilisation)
            self.memory_mib.append(memory)

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait()

    def summary(self) -> dict:
        if not self.utilisation:
            return {"gpu_busy_percent": None, "peak_gpu_memory_mib": None}
        return {"gpu_busy_percent": float(np.mean(self.utilisation)), "peak_gpu_memory_mib": max(self.memory_mib)}


def end_to_end(
    directory: Path, output: Path, model_name: str, weights: str, *, device: str, batch_size: int, settings: dict
) -> dict:
    """Images/s of ``segpipe run`` from the files to the committed manifest (Ray already started);
    ``settings``: more of its :class:`RunConfig` fields. ``output`` starts empty: a run committed
    there before would be skipped, and its files would be taken for this run's."""
    shutil.rmtree(output, ignore_errors=True)
    config = RunConfig(input=str(directory), output=str(output), model=model_name, weights=weights, device=device,
                       batch_size=batch_size, run_date=dt.date(2026, 1, 1), max_error_rate=1.0, **settings)  # fmt: skip
    sampler = GpuSampler() if device == "cuda" and shutil.which("nvidia-smi") else None
    started, wall_started = time.perf_counter(), time.time()
    if sampler is not None:
        with sampler:
            manifest = run(config)
    else:
        manifest = run(config)
    seconds = time.perf_counter() - started
    counts = manifest["counts"]
    images = pa_dataset.dataset(output / "images", partitioning="hive").to_table(columns=["width", "height"])
    raw_class_map_bytes = pc.sum(pc.multiply(images["width"].cast("int64"), images["height"].cast("int64"))).as_py() or 0
    masks = pa_dataset.dataset(output / "masks", partitioning="hive").to_table(columns=["mask_rle"])
    rle_bytes = pc.sum(pc.binary_length(masks["mask_rle"])).as_py() or 0
    shard_files = sorted((output / "images").rglob("*.parquet"), key=lambda path: path.stat().st_mtime)
    first_written, last_written = shard_files[0].stat().st_mtime, shard_files[-1].stat().st_mtime
    after_first = counts["images"] - pa_dataset.dataset(shard_files[0]).count_rows()
    return {
        "ips": counts["images"] / seconds,
        "seconds": seconds,
        "first_shard_seconds": first_written - wall_started,
        "steady_ips": after_first / (last_written - first_written) if last_written > first_written else None,
        "images": counts["images"],
        "ok": counts["ok"],
        "bytes_per_image": counts["bytes_written"] / counts["images"],
        "raw_class_map_bytes_per_rle_byte": raw_class_map_bytes / rle_bytes if rle_bytes else None,
        "actors": manifest["actors"],
        **{
            figure: manifest["timings"][figure]
            for figure in ("listing_seconds", "actors_ready_seconds", "actor_process_started_seconds", "actor_import_started_seconds",
                           "actor_imported_seconds", "actor_startup_seconds", "first_shard_stage_seconds", "stage_seconds")
        },
        **(sampler.summary() if sampler is not None else {"gpu_busy_percent": None, "peak_gpu_memory_mib": None}),
    }


def _baseline_preprocess(batch: dict[str, np.ndarray], *, preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """CPU task: HWC uint8 images -> normalised CHW float32 model inputs, as the docs' transforms do."""
    images = torch.from_numpy(np.stack(batch["image"])).permute(0, 3, 1, 2)
    return {"input": model_input(images, preprocessing).numpy(), "height": np.full(len(images), images.shape[2]),
            "width": np.full(len(images), images.shape[3])}  # fmt: skip


class BaselinePredictor:
    """The docs' predictor class: model built once, argmax on the device, predictions to numpy."""

    def __init__(self, model_name: str, weights: str, device: str) -> None:
        spec = get_model_spec(model_name)
        self.device = device
        self.model = resolve_weights(weights, spec).build(spec).to(device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(torch.as_tensor(batch["input"], device=self.device))["out"]
            return {"class_map": logits.argmax(1).to(torch.uint8).cpu().numpy(), "height": batch["height"], "width": batch["width"]}


def _baseline_postprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU task: class maps back to the original size."""
    maps = torch.tensor(batch["class_map"])[:, None]
    height, width = int(batch["height"][0]), int(batch["width"][0])
    return {"mask": tv_functional.resize(maps, [height, width], interpolation=tv_functional.InterpolationMode.NEAREST)[:, 0].numpy()}


def baseline(directory: Path, output: Path, model_name: str, weights: str, *, device: str, batch_size: int) -> dict | None:
    """Images/s of a plain Ray Data batch-inference script on the same files, or ``None`` for
    instance and detection models (not written)."""
    spec = get_model_spec(model_name)
    if spec.task != "semantic":
        return None
    preprocessing = resolve_weights(weights, spec).preprocessing
    actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if device == "cuda" else 1
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    (
        ray.data.read_images(str(directory), mode="RGB")
        .map_batches(_baseline_preprocess, fn_kwargs={"preprocessing": preprocessing}, batch_size=batch_size)
        .map_batches(BaselinePredictor, fn_constructor_kwargs={"model_name": model_name, "weights": weights, "device": device},
                     compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, **_one_actor_resources(device))  # fmt: skip
        .map_batches(_baseline_postprocess, batch_size=batch_size)
        .write_parquet(str(output))
    )
    seconds = time.perf_counter() - started
    count = sum(1 for _ in directory.glob("*.jpg"))
    return {"ips": count / seconds, "seconds": seconds}


def _class_maps_variants(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    """How the class maps step is timed: name -> function. As the pipeline runs it; on CUDA also
    in PyTorch's operators (``eager``: the network's own upsampling, then interpolating where the
    corners disagree, the pipeline's way from the twelfth session until the Triton kernel).
    Upsampling every class, eager and compiled, was timed until then: HISTORY.md."""
    variants = {_AS_THE_PIPELINE_RUNS_IT: class_maps}
    if device == "cuda":
        variants["eager"] = eager_class_maps
    return variants


def _reported(phase: str, figures: dict | None) -> dict | None:
    print(f"benchmark {phase}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    return figures


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    model_name: str, *, weights: str, corpus: str, count: int, width: int, height: int, device: str, batch_size: int,
    settings: dict, skip_baseline: bool, skip_variants: bool, actor_alone: bool, profile: bool, workdir: Path,
) -> dict:  # fmt: skip
    """Every figure of one benchmark run, as the ``--json`` object. Each phase's figures also go
    to stderr as it ends, so that a run stopped by a time limit keeps those it finished."""
    images = CORPORA[corpus](workdir / "images", count=count, width=width, height=height)
    ray_startup = ensure_ray()
    # Ray Data's per-operator stats (tasks, wall and CPU time, backpressure) go to stderr after each run.
    ray.data.DataContext.get_current().enable_auto_log_stats = True
    shape = {"count": count, "width": width, "height": height, "device": device, "batch_size": batch_size}
    spec = get_model_spec(model_name)
    bf16, channels_last = execution(spec, "auto", torch.device(device))
    own = (bf16, channels_last, False)
    compared = [flags for flags in _VARIANTS.values()
                if device == "cuda" and not skip_variants and (spec.task == "semantic" or not (flags[1] or flags[2]))]
    # (bf16, channels_last, folded) -> figures: the pipeline's own setting is timed once, also where it is a variant
    timings = {flags: model_only(model_name, weights, **shape, bf16=flags[0], channels_last=flags[1], fold=flags[2])
               for flags in dict.fromkeys([own, *compared])}  # fmt: skip
    only = _reported("model-only", timings[own])
    variants = _reported(
        "model-only variants", {name: timings[flags]["ips"] for name, flags in _VARIANTS.items() if flags in compared}
    )
    compiled = None if settings["compile"] == "off" else _reported(
        "model-only, compiled",
        model_only(model_name, weights, **shape, bf16=bf16, channels_last=channels_last, compile_mode=settings["compile"]),
    )
    step = None if spec.task != "semantic" else _reported("model step", model_only(
        model_name, weights, **shape, bf16=bf16, channels_last=channels_last, compile_mode=settings["compile"], model_step=True
    ))  # fmt: skip
    class_maps_ips = {} if spec.task != "semantic" else _reported("class maps only", {
        name: class_maps_only(model_name, weights, images, **shape, bf16=bf16, channels_last=channels_last, make_maps=make_maps)["ips"]
        for name, make_maps in _class_maps_variants(device).items()
    })  # fmt: skip
    window = DECODE_WINDOW_BATCHES * batch_size
    decoded = _reported("decode only", decode_only(images, count=count, device=device, window=window))
    decoded_variants = _reported("decode only variants", {
        name: decode_only(images, count=count, device=device, window=window, threads=threads, decode=decode)["ips"]
        for name, (decode, threads) in _decode_variants().items()
    })  # fmt: skip
    torchvision_forward = None if spec.task == "semantic" else _reported(
        "model-only, torchvision's forward", model_only(model_name, weights, **shape, bf16=bf16, channels_last=False, torchvision_forward=True)
    )
    alone = None if not (actor_alone or profile) else _reported(
        "actor-only", actor_only(images, model_name, weights, device=device, batch_size=batch_size, settings=settings, profile=profile)
    )
    whole = _reported("end-to-end", end_to_end(images, workdir / "segpipe-out", model_name, weights, device=device,
                                               batch_size=batch_size, settings=settings))  # fmt: skip
    plain = None if skip_baseline else _reported(
        "baseline", baseline(images, workdir / "baseline-out", model_name, weights, device=device, batch_size=batch_size)
    )
    return {
        "model": model_name,
        "weights": weights,
        "corpus": corpus,
        "count": count,
        "size": f"{width}x{height}",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "batch_size": batch_size,
        "model_only_ips": only["ips"],
        "model_only_precision": ("bf16" if bf16 else "fp32") + (" channels_last" if channels_last else ""),
        "model_only_variants_ips": variants,
        "torchvision_forward_ips": torchvision_forward["ips"] if torchvision_forward else None,
        "segpipe_settings": settings,
        "model_only_compiled_ips": compiled["ips"] if compiled else None,
        "model_step_ips": step["ips"] if step else None,
        "class_maps_only_ips": class_maps_ips.get(_AS_THE_PIPELINE_RUNS_IT),
        "class_maps_only_variants_ips": {name: ips for name, ips in class_maps_ips.items() if name != _AS_THE_PIPELINE_RUNS_IT},
        "decode_only_ips": decoded["ips"],
        "decode_only_variants_ips": decoded_variants,
        "actor_only_ips": alone["ips"] if alone else None,
        "end_to_end_ips": whole["ips"],
        "end_to_end_steady_ips": whole["steady_ips"],
        "end_to_end_first_shard_seconds": whole["first_shard_seconds"],
        "end_to_end_listing_seconds": whole["listing_seconds"],
        "end_to_end_actors_ready_seconds": whole["actors_ready_seconds"],
        "end_to_end_actor_process_started_seconds": whole["actor_process_started_seconds"],
        "end_to_end_actor_import_started_seconds": whole["actor_import_started_seconds"],
        "end_to_end_actor_imported_seconds": whole["actor_imported_seconds"],
        "end_to_end_actor_startup_seconds": whole["actor_startup_seconds"],
        "end_to_end_first_shard_stage_seconds": whole["first_shard_stage_seconds"],
        "end_to_end_stage_seconds": whole["stage_seconds"],
        "end_to_end_actors": whole["actors"],
        "baseline_ips": plain["ips"] if plain else None,
        "ratio_model": whole["ips"] / only["ips"],
        "ratio_model_step": whole["ips"] / step["ips"] if step else None,
        "ratio_baseline": whole["ips"] / plain["ips"] if plain else None,
        "bytes_per_image": whole["bytes_per_image"],
        "raw_class_map_bytes_per_rle_byte": whole["raw_class_map_bytes_per_rle_byte"],
        "ok_images": whole["ok"],
        "end_to_end_seconds": whole["seconds"],
        "ray_startup_seconds": ray_startup,
        "model_only_peak_gpu_bytes": only["peak_gpu_bytes"],
        "gpu_busy_percent": whole["gpu_busy_percent"],
        "peak_gpu_memory_mib": whole["peak_gpu_memory_mib"],
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "torchcodec", "ray", "pyarrow")},
        "date": dt.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--count", type=int, required=True, help="number of JPEGs")
    parser.add_argument("--size", type=parse_size, default=(1024, 768), metavar="WxH", help="image size (default 1024x768)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: segpipe's for the model and device)")
    parser.add_argument("--files-per-shard", type=int, default=64,
                        help="images per shard in the end-to-end run (default 64: enough shards to keep every actor busy)")
    parser.add_argument("--actors", type=int, help="model actors of the end-to-end run (default: segpipe's)")
    parser.add_argument("--threads-per-actor", type=int, help="shards each actor works on at once (default: segpipe's)")
    parser.add_argument("--skip-baseline", action="store_true", help="leave the plain Ray Data script out (baseline_ips null)")
    parser.add_argument("--skip-variants", action="store_true",
                        help="time the model alone only at the pipeline's own precision, not in every variant "
                             "(the comparison takes about a minute for DeepLabV3 on an H100)")
    parser.add_argument("--actor-only", action="store_true",
                        help="time segpipe's model actor alone too, in a Ray actor called on shards already in the object store")
    parser.add_argument("--profile", action="store_true",
                        help="print PyTorch's profile of the actor alone (implies --actor-only)")
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune"], default="off",
                        help="time the model compiled in this mode too, and run segpipe with --compile MODE "
                             "(compilation is not timed in model-only)")
    parser.add_argument("--weights", default="random", help="as segpipe run takes them (default: random)")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="photos", help="photos (default) or synthetic shapes")
    parser.add_argument("--workdir", type=Path, help="where the JPEGs and outputs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-bench-"))
    width, height = args.size
    batch_size = args.batch_size or get_model_spec(args.model).default_batch_size(args.device)
    # With --json, stdout holds the one object: segpipe's progress lines go to stderr with the phases' figures.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = measure(args.model, weights=args.weights, corpus=args.corpus, count=args.count, width=width, height=height,
                         device=args.device, batch_size=batch_size, skip_baseline=args.skip_baseline,
                         skip_variants=args.skip_variants, actor_alone=args.actor_only, profile=args.profile, workdir=workdir,
                         settings={"files_per_shard": args.files_per_shard, "compile": args.compile, "actors": args.actors,
                                   "threads_per_actor": args.threads_per_actor})  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:34} {value:.3f}" if isinstance(value, float) else f"{key:34} {value}")


if __name__ == "__main__":
    main()
