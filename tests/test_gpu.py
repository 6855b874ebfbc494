"""The CUDA path gives what the CPU path gives: nvjpeg decodes what Pillow decodes, from several
threads at once too, the device's
run finding, union areas and batched mask paste equal the host's and torchvision's, class maps
(the Triton kernel, from logits at the input size or as the networks leave them without their
final upsampling, from several threads at once) equal float32 upsampling's but for ties, the
semantic models' input is made without waiting for the
device, a threaded actor's network thread queues its kernels on
each caller's stream, an actor on half a GPU keeps to half its memory, and ``segpipe run`` on a
GPU, with one thread per actor or several, accounts for every image with the CPU run's outcome
and, with trained weights, its masks.

Skipped where there is no GPU (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as pa_dataset
import pytest
import ray
import torch
import torch.nn.functional as nn_functional
from torch import nn
from torchcodec.decoders import decode_jpeg

from jobs.run import run
from jobs.sample import awkward_images, encode, photos, shape_pngs, truncated_jpeg
from jobs.synth import render
from models import get_model_spec, resolve_weights
from pipeline.config import RunConfig
from pipeline.decode import decode_image, plain_rgb_jpeg
from pipeline.encode import map_runs, summarize_detections
from pipeline.class_maps import class_maps, upsampled_class_maps
from pipeline.infer import OneNetworkThread, SegmentShards, model_input, predict_detections

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def _plain_jpegs() -> list[bytes]:
    jpegs = [encode(photo, "JPEG", quality=quality) for photo in photos().values() for quality in (75, 95)]
    jpegs.append(encode(photos()["chelsea"], "JPEG", progressive=True))
    assert all(plain_rgb_jpeg(data, max_pixels=10**8) for data in jpegs)
    return jpegs


def _assert_pillows_pixels(pixels: torch.Tensor, data: bytes) -> None:
    reference = torch.from_numpy(decode_image(data, max_pixels=10**8)).permute(2, 0, 1)
    assert pixels.shape == reference.shape
    assert (pixels.cpu().int() - reference.int()).abs().float().mean() < 1.5  # the decoders' rounding differs


def test_nvjpeg_decodes_what_pillow_decodes() -> None:
    jpegs = _plain_jpegs()
    on_device = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs], mode="RGB", device="cuda")
    for data, pixels in zip(jpegs, on_device):
        _assert_pillows_pixels(pixels, data)


def test_nvjpeg_in_four_threads_at_once_on_their_own_streams_decodes_what_pillow_decodes() -> None:
    # as a threaded actor's threads decode their windows: each takes a decoder of its own from TorchCodec's pool
    jpegs = _plain_jpegs()

    def decode_window(seed: int) -> list[tuple[bytes, torch.Tensor]]:
        window = [jpegs[index] for index in np.random.default_rng(seed).permutation(len(jpegs))]
        with torch.cuda.stream(torch.cuda.Stream()):
            encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in window]
            decoded = decode_jpeg(encoded, mode="RGB", device="cuda")
            return [(data, pixels.cpu()) for data, pixels in zip(window, decoded)]

    with ThreadPoolExecutor(4) as threads:
        for window in threads.map(decode_window, range(12)):
            for data, pixels in window:
                _assert_pillows_pixels(pixels, data)


def test_model_input_on_the_gpu_waits_for_nothing_and_equals_torchvisions_preset_transforms() -> None:
    spec = get_model_spec("lraspp_mobilenet_v3_large")
    batch = torch.stack([torch.from_numpy(photos()["chelsea"]).permute(2, 0, 1)] * 4).cuda()
    reference = spec.torchvision_weights.DEFAULT.transforms()(batch)
    model_input(batch, spec.preprocessing)  # the mean and deviation's first copy to the device waits for it, once
    torch.cuda.set_sync_debug_mode("error")  # any wait for the device raises
    try:
        made = model_input(batch, spec.preprocessing)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(made, reference)


def test_runs_and_union_areas_on_the_gpu_equal_the_hosts() -> None:
    generator = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 21, (4, 97, 131), generator=generator, dtype=torch.uint8)
    maps[:, 20:60, 30:90] = 7
    for on_gpu, on_host in zip(map_runs(maps.cuda()), map_runs(maps)):
        assert np.array_equal(on_gpu.starts, on_host.starts) and np.array_equal(on_gpu.values, on_host.values)
    masks = torch.rand((5, 40, 50), generator=generator) > 0.7
    boxes, labels, scores = torch.rand((5, 4), generator=generator) * 40, torch.tensor([1, 1, 2, 3, 3]), torch.rand(5)
    on_gpu = summarize_detections(boxes.cuda(), labels.cuda(), scores.cuda(), masks.cuda(), height=40, width=50)
    on_host = summarize_detections(boxes, labels, scores, masks, height=40, width=50)
    assert on_gpu.class_pixels == on_host.class_pixels
    assert all(np.array_equal(a.starts, b.starts) for a, b in zip(on_gpu.masks, on_host.masks))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_class_maps_on_the_gpu_are_those_of_float32_upsampling_but_for_ties(memory_format: torch.memory_format) -> None:
    # as DeepLabV3 (NHWC) and LRASPP (NCHW) hand them on under bf16: 21 classes at 520x693 for 1024x768
    # photos, smooth as the networks' own upsampling from stride 8 makes them
    coarse = torch.randn(5, 21, 65, 87, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    logits = nn_functional.interpolate(coarse, size=(520, 693), mode="bilinear").to(torch.bfloat16).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        maps, exact = class_maps(logits, 768, 1024), upsampled_class_maps(logits.float(), 768, 1024)
    assert maps.dtype == torch.uint8 and maps.shape == (5, 768, 1024)
    assert (maps != exact).float().mean() < 1e-5


def _coarse_logits(images: int, seed: int) -> torch.Tensor:
    """Logits as DeepLabV3 and LR-ASPP leave them without their final upsampling for 1024x768
    photos: 21 classes at stride 8 of a 520x693 input padded to 520x704, in a few regions each."""
    generator = torch.Generator("cuda").manual_seed(seed)
    regions = torch.randn(images, 21, 5, 6, device="cuda", generator=generator) * 5
    noise = torch.randn(images, 21, 65, 88, device="cuda", generator=generator) * 0.3
    return (nn_functional.interpolate(regions, size=(65, 88), mode="bilinear") + noise).to(torch.bfloat16)


def _upsampled_twice(coarse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return upsampled_class_maps(coarse.float(), height, width, input_size=(520, 704), crop=(520, 693))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_class_maps_of_coarse_logits_on_the_gpu_are_those_of_float32_upsampling_twice_but_for_ties(
    memory_format: torch.memory_format,
) -> None:
    coarse = _coarse_logits(5, seed=5).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        maps, exact = class_maps(coarse, 768, 1024, input_size=(520, 704), crop=(520, 693)), _upsampled_twice(coarse, 768, 1024)
    assert maps.dtype == torch.uint8 and maps.shape == (5, 768, 1024) and len(torch.unique(exact)) > 2
    assert (maps != exact).float().mean() < 1e-5


def test_class_maps_from_threads_on_streams_of_their_own_are_each_threads_own() -> None:
    # each thread's first sizes make the kernel's weights anew, on its own stream, while the others launch
    sizes = [(768 + step, 1024 - step) for step in range(4)]
    coarse = [_coarse_logits(2, seed=6 + thread) for thread in range(4)]
    torch.cuda.synchronize()  # made on the default stream, read on the threads' own

    def call(thread: int) -> torch.Tensor:
        with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
            maps = class_maps(coarse[thread], *sizes[thread], input_size=(520, 704), crop=(520, 693))
            torch.cuda.current_stream().synchronize()
            return maps

    with ThreadPoolExecutor(4) as pool:
        maps = list(pool.map(call, range(4)))
    with torch.inference_mode():
        for thread in range(4):
            assert (maps[thread] != _upsampled_twice(coarse[thread], *sizes[thread])).float().mean() < 1e-5


def test_class_maps_take_pytorchs_operators_where_triton_cannot_build_its_kernel(tmp_path: Path) -> None:
    # a node without a C compiler: Triton builds its launcher with $CC, and its cache here is empty
    code = """
import json, torch
from pipeline import class_maps as module
coarse = torch.randn(2, 21, 65, 88, device="cuda").to(torch.bfloat16)
with torch.inference_mode():
    maps = module.class_maps(coarse, 768, 1024, input_size=(520, 704), crop=(520, 693))
    eager = module.eager_class_maps(coarse, 768, 1024, input_size=(520, 704), crop=(520, 693))
print("RESULT " + json.dumps({"equal": torch.equal(maps, eager), "unusable": module._kernel_unusable}))
"""
    environment = {**os.environ, "CC": "/nonexistent/cc", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert outcome["equal"], outcome
    if outcome["unusable"] is None:
        pytest.skip("this Triton built the kernel without a C compiler")
    assert "Triton could not build its kernel" in result.stderr


class ReportsItsStream(nn.Module):
    """A network that says which CUDA stream its kernels went to."""

    def forward(self, inputs: torch.Tensor) -> dict:
        return {"out": inputs + 1, "stream": torch.cuda.current_stream(inputs.device)}


def test_a_threaded_actors_network_queues_its_kernels_on_each_calling_threads_stream() -> None:
    network = OneNetworkThread(ReportsItsStream())

    def call(_: int) -> tuple[torch.cuda.Stream, dict]:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # the caller's later kernels read the logits in this stream's order
            return stream, network(torch.zeros(4, device="cuda"))

    with ThreadPoolExecutor(4) as callers:
        for stream, output in callers.map(call, range(8)):
            assert output["stream"] == stream
            stream.synchronize()
            assert output["out"].tolist() == [1.0] * 4


def test_batched_mask_paste_on_the_gpu_equals_torchvisions_forward() -> None:
    spec = get_model_spec("maskrcnn_mobilenet_v3_small_fpn")
    model = resolve_weights("shapes", spec).build(spec).cuda().eval()
    images = [torch.from_numpy(render(np.random.default_rng(seed), size)[0]).permute(2, 0, 1).cuda() for seed, size in [(1, 192), (2, 256)]]
    with torch.inference_mode():
        expected = model([image.float() / 255 for image in images])
        detected = predict_detections(model, images, 0.0)
    for ours, theirs in zip(detected, expected):
        assert len(ours.labels) > 0 and np.array_equal(ours.labels, theirs["labels"].cpu().numpy())
        theirs_runs = map_runs((theirs["masks"][:, 0] > 0.5).cpu())
        differing = sum(not np.array_equal(a.starts, b.starts) for a, b in zip(ours.masks, theirs_runs))
        assert differing <= max(2, 0.02 * len(theirs_runs))  # float rounding at the 0.5 threshold, on a mask or two at most


@pytest.fixture(scope="module")
def ray_with_gpu():
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _archive(directory: Path) -> Path:
    """Trained-for shapes as JPEGs (decoded on the GPU) and PNGs, plus files the host must decode or refuse."""
    directory.mkdir()
    for name, png in shape_pngs(12, seed=5, size=320).items():
        (directory / name).write_bytes(png)
        pixels = decode_image(png, max_pixels=10**8)
        (directory / name.replace(".png", ".jpg")).write_bytes(encode(pixels, "JPEG", quality=95))
    for name, data in awkward_images().items():
        (directory / name).write_bytes(data)
    (directory / "truncated.jpg").write_bytes(truncated_jpeg())
    (directory / "empty.jpg").write_bytes(b"")
    return directory


def _read(output: Path, table: str, columns: list[str]) -> list[dict]:
    return pa_dataset.dataset(output / table, partitioning="hive").to_table(columns=columns).to_pylist()


@pytest.mark.usefixtures("ray_with_gpu")
def test_a_gpu_run_matches_the_cpu_run(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    # one actor's four threads on four CUDA streams (the default), as well as four actors of one thread each
    settings = {"cpu": {"device": "cpu"}, "cuda": {"device": "cuda", "threads_per_actor": 1}, "cuda threads": {"device": "cuda"}}
    outputs = {}
    for name, setting in settings.items():
        outputs[name] = tmp_path / name.replace(" ", "-")
        run(RunConfig(input=str(archive), output=str(outputs[name]), model="unet", weights="shapes", files_per_shard=10,
                      run_date=dt.date(2026, 11, 26), max_error_rate=1.0, **setting))  # fmt: skip
    images = {name: {row["uri"]: (row["status"], row["error_type"]) for row in _read(path, "images", ["uri", "status", "error_type"])}
              for name, path in outputs.items()}  # fmt: skip
    assert images["cuda"] == images["cpu"] and images["cuda threads"] == images["cpu"]
    assert len(images["cuda"]) == len(list(archive.iterdir()))
    pixels = {}
    for name, path in outputs.items():
        for row in _read(path, "class_stats", ["image_id", "class_id", "pixel_count"]):
            pixels[name, row["image_id"], row["class_id"]] = row["pixel_count"]
    keys = {key[1:] for key in pixels}
    total = sum(pixels.get(("cpu", *key), 0) for key in keys)
    for name in ("cuda", "cuda threads"):
        differing = sum(abs(pixels.get(("cpu", *key), 0) - pixels.get((name, *key), 0)) for key in keys)
        assert differing <= 0.01 * total, name  # the same masks, up to decoder rounding at region borders


class _AllocatingActor(SegmentShards):
    """The model actor, asked to allocate a fraction of its GPU's memory besides its models."""

    def allocates(self, fraction: float) -> bool:
        try:
            torch.empty(int(fraction * torch.cuda.get_device_properties(self.device).total_memory), dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            return False
        return True


@pytest.mark.usefixtures("ray_with_gpu")
def test_an_actor_on_half_a_gpu_keeps_to_half_its_memory() -> None:
    config = RunConfig(input="unused", output="unused", model="unet", weights="shapes", run_date=dt.date(2026, 11, 27))
    weights = ray.put(resolve_weights("shapes", get_model_spec("unet")))
    actor = ray.remote(num_gpus=0.5)(_AllocatingActor).remote(
        configs=[config], run_ids=["test"], device="cuda", weights=[weights], pipeline_started_at=time.time()
    )
    try:
        assert ray.get(actor.allocates.remote(0.4))
        assert not ray.get(actor.allocates.remote(0.6))  # the other half is its neighbour's
    finally:
        ray.kill(actor)  # its half of the GPU is free for the next test's actors


@pytest.mark.usefixtures("ray_with_gpu")
@pytest.mark.parametrize("model", ["lraspp_mobilenet_v3_large", "maskrcnn_resnet50_fpn"])
def test_torchvision_models_run_on_the_gpu_in_bf16(tmp_path: Path, model: str) -> None:
    archive = _archive(tmp_path / "archive")
    manifest = run(RunConfig(input=str(archive), output=str(tmp_path / "out"), model=model, weights="random", device="cuda",
                             score_threshold=0.0, run_date=dt.date(2026, 11, 26), max_error_rate=1.0))  # fmt: skip
    assert manifest["counts"]["images"] == len(list(archive.iterdir()))
    errors = [row for row in _read(tmp_path / "out", "images", ["uri", "status", "error_message"]) if row["status"] == "error"]
    assert sorted(Path(row["uri"]).name for row in errors) == ["empty.jpg", "truncated.jpg"], errors
