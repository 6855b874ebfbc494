"""The model actor and its inference steps. Under memory pressure a batch that runs out of device
memory is split and retried down to single images; only an image that does not fit alone becomes
an error row. Images batch by the size they enter the network at; compiled, folded and
channels_last networks give the eager ones' results; a threaded actor's network on one thread
of its own gives a one-thread actor's rows; a batch of JPEGs that the batched decoder refuses is
decoded image by image, the bad file alone an error.

No GPU here: ``DeviceWithRoomFor`` stands in for one by raising ``torch.OutOfMemoryError``, the
error CUDA raises, when a forward pass needs more than its capacity.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from torch import nn
from torch._dynamo.utils import counters

from jobs.sample import encode, photos, shape_pngs
from models import Weights, get_model_spec, list_models, resolve_weights
from pipeline.config import RunConfig
from pipeline.decode import decode_image
from pipeline.encode import encode_shards
from pipeline import infer
from pipeline.infer import (
    OneNetworkThread,
    SegmentShards,
    compile_network,
    execution,
    fold_batch_norms,
    model_input,
    predict_class_maps,
)
from pipeline.listing import list_shards
from pipeline.read import read_shards
from pipeline.schema import IMAGES_SCHEMA, MASKS_SCHEMA, unnest

pytestmark = pytest.mark.usefixtures("ray_local")
SQUARE_PIXELS = 520 * 520  # what a square image becomes after the semantic models' resize
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


class DeviceWithRoomFor(nn.Module):
    """``model`` on a device with room for ``capacity`` input pixels per forward pass."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.batch_sizes: list[int] = []

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batch_sizes.append(batch.shape[0])
        if batch.shape[0] * batch.shape[-2] * batch.shape[-1] > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(batch)


class MemoryLimitedSegmentShards(SegmentShards):
    """The model actor with its model on a :class:`DeviceWithRoomFor` ``capacity`` pixels
    (semantic models, whose forward pass takes one batch tensor; others run as they are)."""

    def __init__(self, *, capacity: int, weights: Weights, **kwargs) -> None:
        # Ray hands an actor the value of an ObjectRef argument; the pipeline's actor expects refs
        super().__init__(weights=[ray.put(weights)], **kwargs)
        if self.models[0].spec.task == "semantic":
            self.models[0].model = DeviceWithRoomFor(self.models[0].model, capacity)

    def batch_sizes(self) -> list[int]:
        return getattr(self.models[0].model, "batch_sizes", [])


def _shard_batch(directory: Path, config: RunConfig) -> pa.Table:
    listing = list_shards(str(directory), files_per_shard=100)
    return read_shards(pa.table({"shard": [listing.shards[0].to_json()]}), image_column=config.image_column)


def _segment(config: RunConfig, batch: pa.Table, capacity: int | None, *, calls: int = 1) -> tuple[list[dict], list[dict], list[int]]:
    """The last of ``calls`` calls' rows, and the batch sizes the model saw over all of them."""
    weights = resolve_weights(config.weights, get_model_spec(config.model))
    actor = ray.remote(num_cpus=1)(MemoryLimitedSegmentShards).remote(
        capacity=capacity or 1 << 62, configs=[config], run_ids=["test"], device="cpu", weights=ray.put(weights),
        pipeline_started_at=time.time(),
    )
    for _ in range(calls):
        out = ray.get(actor.__call__.remote(batch))
    return *_rows(out, weights), ray.get(actor.batch_sizes.remote())


def _rows(out: pa.Table, weights: Weights) -> tuple[list[dict], list[dict]]:
    """The ``images`` and ``masks`` rows of the actor's row for one shard."""
    out = encode_shards(out, categories={"test": weights.categories})
    return unnest(out.column("images")[0], IMAGES_SCHEMA).to_pylist(), unnest(out.column("masks")[0], MASKS_SCHEMA).to_pylist()


def test_semantic_model_input_equals_torchvisions_preset_transforms() -> None:
    spec = get_model_spec("lraspp_mobilenet_v3_large")
    batch = torch.stack([torch.from_numpy(photos()["chelsea"]).permute(2, 0, 1)] * 2)
    with torch.inference_mode():
        assert torch.equal(model_input(batch, spec.preprocessing), spec.torchvision_weights.DEFAULT.transforms()(batch))


def test_out_of_memory_splits_the_batch_down_to_one_image_and_later_batches_fit(tmp_path: Path) -> None:
    astronaut = photos()["astronaut"][::4, ::4]
    for copy in range(8):
        (tmp_path / f"square-{copy}.jpg").write_bytes(encode(astronaut, "JPEG", quality=60 + copy))
    (tmp_path / "wide.png").write_bytes(encode(astronaut[:32], "PNG"))  # 128x32 -> 2080x520: 4 squares' worth
    config = RunConfig(input=str(tmp_path), output="unused", model="lraspp_mobilenet_v3_large", weights="random",
                       batch_size=8, run_date=dt.date(2026, 11, 25))  # fmt: skip
    batch = _shard_batch(tmp_path, config)

    images, masks, batch_sizes = _segment(config, batch, capacity=2 * SQUARE_PIXELS, calls=2)
    first, second = batch_sizes[:7], batch_sizes[7:]
    assert first == [8, 4, 2, 2, 2, 2, 1]  # the squares halve until they fit; the wide image alone does not
    assert second == [2, 2, 2, 2, 1]  # the next shard's batches are cut to what fitted
    by_uri = {Path(row["uri"]).name: row for row in images}
    assert by_uri["wide.png"]["status"] == "error" and by_uri["wide.png"]["error_type"] == "out_of_memory"
    assert "CUDA out of memory" in by_uri["wide.png"]["error_message"]
    assert [by_uri[f"square-{copy}.jpg"]["status"] for copy in range(8)] == ["ok"] * 8

    roomy_images, roomy_masks, roomy_sizes = _segment(config, batch, capacity=None)
    assert roomy_sizes == [8, 1]
    assert [row for row in masks] == [row for row in roomy_masks if not row["uri"].endswith("wide.png")]


def test_without_a_batch_size_each_model_takes_its_default_for_the_device(tmp_path: Path) -> None:
    for name, png in shape_pngs(10, seed=4, size=64).items():
        (tmp_path / name).write_bytes(png)
    config = RunConfig(input=str(tmp_path), output="unused", model="unet", weights="shapes", run_date=dt.date(2026, 11, 28))
    _, _, batch_sizes = _segment(config, _shard_batch(tmp_path, config), capacity=None)
    assert batch_sizes == [8, 2]  # on CPUs, 8
    # on GPUs, the batches that the GPU figures were measured with
    on_gpus = {name: get_model_spec(name).default_batch_size("cuda") for name in ("deeplabv3_resnet50", "unet", "maskrcnn_resnet50_fpn")}
    assert on_gpus == {"deeplabv3_resnet50": 32, "unet": 32, "maskrcnn_resnet50_fpn": 8}


def test_images_of_different_sizes_that_enter_the_model_at_one_size_share_a_batch(tmp_path: Path) -> None:
    astronaut = photos()["astronaut"]
    for side in (64, 128, 256):  # all squares: 520x520 inside the model
        (tmp_path / f"square-{side}.jpg").write_bytes(encode(astronaut[:: 512 // side, :: 512 // side], "JPEG"))
    (tmp_path / "wide.png").write_bytes(encode(astronaut[:32:4, ::4], "PNG"))
    config = RunConfig(input=str(tmp_path), output="unused", model="lraspp_mobilenet_v3_large", weights="random",
                       batch_size=8, run_date=dt.date(2026, 11, 25))  # fmt: skip
    batch = _shard_batch(tmp_path, config)

    images, masks, batch_sizes = _segment(config, batch, capacity=None)
    assert sorted(batch_sizes) == [1, 3]
    assert sorted((row["width"], row["height"]) for row in images) == [(64, 64), (128, 8), (128, 128), (256, 256)]
    alone_images, alone_masks, alone_sizes = _segment(config.model_copy(update={"batch_size": 1}), batch, capacity=None)
    assert alone_sizes == [1, 1, 1, 1]
    assert masks == alone_masks and images == alone_images


def test_padding_to_a_multiple_batches_similar_sizes_and_crops_back(tmp_path: Path) -> None:
    astronaut = photos()["astronaut"]
    (tmp_path / "a.jpg").write_bytes(encode(astronaut[:48, :64], "JPEG"))  # 520x693 inside the model
    (tmp_path / "b.jpg").write_bytes(encode(astronaut[:52, :70], "JPEG"))  # 520x700
    config = RunConfig(input=str(tmp_path), output="unused", model="lraspp_mobilenet_v3_large", weights="random",
                       batch_size=8, run_date=dt.date(2026, 11, 26))  # fmt: skip
    batch = _shard_batch(tmp_path, config)

    exact_images, exact_masks, exact_sizes = _segment(config, batch, capacity=None)
    padded_images, padded_masks, padded_sizes = _segment(config.model_copy(update={"pad_to_multiple": 32}), batch, capacity=None)
    assert exact_sizes == [1, 1] and padded_sizes == [2]  # both become 520x704
    assert padded_images == exact_images
    assert [(row["label"], row["area"], row["width"]) for row in padded_masks] == [
        (row["label"], row["area"], row["width"]) for row in exact_masks
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "weights"), [("unet", "shapes"), ("maskrcnn_mobilenet_v3_small_fpn", "shapes")])
def test_a_compiled_network_writes_the_rows_of_the_eager_one(tmp_path: Path, model: str, weights: str) -> None:
    for name, data in shape_pngs(2, seed=5, size=96).items():
        (tmp_path / name).write_bytes(data)
    config = RunConfig(input=str(tmp_path), output="unused", model=model, weights=weights, batch_size=2,
                       run_date=dt.date(2026, 11, 26))  # fmt: skip
    batch = _shard_batch(tmp_path, config)
    eager_images, eager_masks, _ = _segment(config, batch, capacity=None)
    images, masks, _ = _segment(config.model_copy(update={"compile": "default"}), batch, capacity=None)
    assert images == eager_images and [row["status"] for row in images] == ["ok", "ok"]
    assert [(row["label"], row["area"]) for row in masks] == [(row["label"], row["area"]) for row in eager_masks]


@pytest.mark.slow
def test_a_compiled_network_takes_a_shards_last_partial_batch_without_compiling_again() -> None:
    spec = get_model_spec("unet")
    weights = resolve_weights("shapes", spec)
    model = compile_network(weights.build(spec).eval(), spec.task, "default")
    torch._dynamo.reset()
    counters.clear()
    images = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full, partial = (predict_class_maps(model, [batch], weights.preprocessing) for batch in (images, images[:2]))
    # one compilation: a second would stop the actor as long again
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(partial[0], full[0][:2])


@pytest.mark.parametrize("model", [spec.name for spec in list_models() if spec.task == "semantic"])
def test_folding_batch_norms_keeps_every_semantic_models_logits(model: str) -> None:
    spec = get_model_spec(model)
    network = resolve_weights("random", spec).build(spec).eval()
    batch_norms = sum(isinstance(module, nn.BatchNorm2d) for module in network.modules())
    inputs = torch.randn(2, 3, 96, 131, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = network(inputs)["out"]
        folded = fold_batch_norms(network)
        logits = folded(inputs)["out"]
    # LinkNet keeps the four that follow a transposed convolution
    assert sum(isinstance(module, nn.BatchNorm2d) for module in folded.modules()) <= min(4, batch_norms - 1)
    # random weights make ResNet-101's logits large: the tolerance scales with them
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize(
    ("model", "precision", "device", "expected"),
    [
        ("deeplabv3_resnet50", "auto", "cuda", (True, True)),  # ResNets: bf16 and channels_last
        ("lraspp_mobilenet_v3_large", "auto", "cuda", (True, False)),  # channels_last slows MobileNets
        ("maskrcnn_resnet50_fpn", "auto", "cuda", (True, False)),
        ("unet", "auto", "cuda", (False, False)),  # segpipe's own: fp32 until measured otherwise
        ("unet", "bf16", "cuda", (True, False)),
        ("deeplabv3_resnet50", "fp32", "cuda", (False, True)),
        ("deeplabv3_resnet50", "bf16", "cpu", (False, True)),  # CPUs always run fp32
        ("lraspp_mobilenet_v3_large", "auto", "cpu", (False, True)),  # NHWC per model on CPUs too, but not as on GPUs
        ("fcn_resnet50", "auto", "cpu", (False, False)),
        ("unet", "auto", "cpu", (False, True)),
    ],
)
def test_precision_picks_autocast_and_memory_format_per_model(model: str, precision: str, device: str, expected: tuple) -> None:
    assert execution(get_model_spec(model), precision, torch.device(device)) == expected


def test_channels_last_on_the_cpu_gives_the_class_maps_of_nchw() -> None:
    spec = get_model_spec("unet")
    loaded = resolve_weights("shapes", spec)  # trained: maps of several classes, not one class everywhere
    network = loaded.build(spec)
    batch = torch.stack([torch.from_numpy(pixels[:240, :320].copy()).permute(2, 0, 1) for pixels in photos().values()])
    assert execution(spec, "auto", torch.device("cpu")) == (False, True)
    with torch.inference_mode():
        nchw = predict_class_maps(network, [batch], loaded.preprocessing)[0]
        nhwc = predict_class_maps(network.to(memory_format=torch.channels_last), [batch], loaded.preprocessing, channels_last=True)[0]
    assert len(torch.unique(nchw)) > 1 and torch.equal(nhwc, nchw)


class ReportsItsThreadAndModes(nn.Module):
    """A network that says which thread ran it and under which modes; out of memory for an empty input."""

    def forward(self, inputs: torch.Tensor) -> dict:
        if not inputs.numel():
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        modes = (torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return {"out": inputs.sum(), "thread": threading.get_ident(), "modes": modes}


def test_a_threaded_actors_network_runs_on_one_thread_in_each_callers_modes() -> None:
    network = OneNetworkThread(ReportsItsThreadAndModes())

    def call(bf16: bool) -> dict:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return network(torch.ones(3))

    with ThreadPoolExecutor(4) as callers:
        outputs = list(callers.map(call, [True, False] * 4))
    assert len({output["thread"] for output in outputs}) == 1  # one cuDNN kernel search per shape on a GPU
    assert [output["modes"] for output in outputs] == [(True, True, torch.bfloat16), (True, False, torch.bfloat16)] * 4
    assert all(output["out"].item() == 3 for output in outputs)
    with pytest.raises(torch.OutOfMemoryError):  # what makes the actor halve the batch
        network(torch.ones(0))


class NetworkOnOneThread(SegmentShards):
    """The model actor with its networks on one thread of their own, as a threaded actor runs
    semantic networks on a GPU (:class:`OneNetworkThread`), here on the CPU."""

    def __init__(self, *, weights: Weights, **kwargs) -> None:
        super().__init__(weights=[ray.put(weights)], **kwargs)
        for loaded in self.models:
            loaded.model = OneNetworkThread(loaded.model)


@pytest.mark.parametrize("compile_mode", ["off", pytest.param("default", marks=pytest.mark.slow)])
def test_a_threaded_actor_with_its_network_on_one_thread_writes_the_rows_of_a_one_thread_actor(tmp_path: Path, compile_mode: str) -> None:
    for name, png in shape_pngs(16, seed=3, size=96).items():
        (tmp_path / name).write_bytes(png)
    config = RunConfig(input=str(tmp_path), output="unused", model="unet", weights="shapes", batch_size=2,
                       run_date=dt.date(2026, 11, 27))  # fmt: skip
    batches = [read_shards(pa.table({"shard": [shard.to_json()]}), image_column=config.image_column)
               for shard in list_shards(str(tmp_path), files_per_shard=4).shards]  # fmt: skip
    weights = resolve_weights(config.weights, get_model_spec(config.model))
    settings = {"run_ids": ["test"], "device": "cpu", "weights": ray.put(weights), "pipeline_started_at": time.time()}
    # the threads share one network (compiled once, on its own thread, with --compile) as a GPU actor's do
    threaded = ray.remote(num_cpus=1, max_concurrency=4)(NetworkOnOneThread).remote(
        configs=[config.model_copy(update={"compile": compile_mode})], calling_threads=4, **settings
    )
    alone = ray.remote(num_cpus=1)(MemoryLimitedSegmentShards).remote(capacity=1 << 62, configs=[config], **settings)
    at_once = [_rows(out, weights) for out in ray.get([threaded.__call__.remote(batch) for batch in batches])]  # four shards in four threads
    one_by_one = [_rows(ray.get(alone.__call__.remote(batch)), weights) for batch in batches]
    if compile_mode == "off":
        assert at_once == one_by_one
    else:  # compiled kernels round differently: compared as test_a_compiled_network_writes_the_rows_of_the_eager_one does
        assert [images for images, _ in at_once] == [images for images, _ in one_by_one]
        assert [[(row["label"], row["area"]) for row in masks] for _, masks in at_once] == [
            [(row["label"], row["area"]) for row in masks] for _, masks in one_by_one
        ]
    assert sum(len(masks) for _, masks in at_once) >= 16


class DecodesInOneBatch(SegmentShards):
    """The model actor, asked to decode a shard's images in one batch as a GPU's nvjpeg does
    (here TorchCodec's CPU decoder takes the batch, and refuses it as nvjpeg would)."""

    def decode_in_one_batch(self, batch: pa.Table) -> tuple[dict[str, object], bool]:
        images = infer._shard_images(batch.column("images")[0])
        decoded = self._decode_on_device(images, list(range(len(images))))
        by_name = {Path(images[index]["uri"]).name: getattr(result, "error_type", result) for index, result in decoded.items()}
        return by_name, self.device_decoder_refused


def test_a_batch_the_jpeg_decoder_refuses_is_decoded_on_the_host_image_by_image(tmp_path: Path) -> None:
    chelsea = photos()["chelsea"]
    for quality in (70, 90):
        (tmp_path / f"chelsea-{quality}.jpg").write_bytes(encode(chelsea, "JPEG", quality=quality))
    (tmp_path / "cut-short.jpg").write_bytes(encode(chelsea, "JPEG")[:2000])
    config = RunConfig(input=str(tmp_path), output="unused", model="unet", weights="shapes", run_date=dt.date(2026, 11, 27))
    weights = resolve_weights(config.weights, get_model_spec(config.model))
    actor = ray.remote(num_cpus=1)(DecodesInOneBatch).remote(configs=[config], run_ids=["test"], device="cpu",
                                                             weights=[ray.put(weights)], pipeline_started_at=time.time())  # fmt: skip
    outcomes, refused = ray.get(actor.decode_in_one_batch.remote(_shard_batch(tmp_path, config)))
    assert refused  # and logged once, so that an operator sees a device that refuses every batch
    assert outcomes["cut-short.jpg"] == "truncated_image"  # the one bad file gets its error row, the rest their pixels
    for quality in (70, 90):
        expected = torch.from_numpy(decode_image(encode(chelsea, "JPEG", quality=quality), max_pixels=10**8)).permute(2, 0, 1)
        assert torch.equal(outcomes[f"chelsea-{quality}.jpg"], expected)
