"""``segpipe train``: data-parallel training with Ray Train's ``TorchTrainer``.

Each worker reads the labelled data (:mod:`jobs.datasets`) from object storage and trains a
replica under DistributedDataParallel. Losses: per-pixel cross-entropy (label 255 ignored)
for semantic models, plus 0.4 x the auxiliary head's where the model has one (PSPNet);
torchvision's multi-task loss (RPN objectness and box regression, classification, box
regression, and mask for instance models) for instance and detection models. Training
applies the same preprocessing as ``segpipe run`` (:func:`pipeline.infer.model_input`).

Under ``--output``: ``checkpoints/`` (a Ray Train checkpoint per epoch), then
``model.safetensors`` and its sidecar ``model.json`` (model, categories, preprocessing,
training settings, loss per epoch), which ``segpipe run --weights OUTPUT/model.safetensors``
reads. Starting from other weights (``--weights``, a torchvision file say) with the data's
own category list replaces the classifier heads whose shape no longer fits: fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import fsspec
import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jobs.datasets import IGNORE_INDEX, LabelledData, Sample, load_labelled, masks_to_boxes
from jobs.run import ensure_ray
from models import ModelSpec, Preprocessing, Weights, get_model_spec, resolve_weights
from pipeline.errors import InputError
from pipeline.infer import model_input
from pipeline.storage import absolute_uri, write_object

AUX_LOSS_WEIGHT = 0.4


class TrainConfig(BaseModel):
    """What one ``segpipe train`` reads, trains and writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="registered model name (see `segpipe models`)")
    data: str = Field(description="URI of a labelled dataset: instances.json, images/ and (semantic) labels/")
    output: str = Field(description="URI for checkpoints/, model.safetensors and model.json")
    epochs: PositiveInt = Field(10, description="passes over the data")
    batch_size: PositiveInt = Field(8, description="images per step on each worker")
    workers: PositiveInt = Field(1, description="data-parallel training workers (Ray Train)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    learning_rate: PositiveFloat = Field(1e-3, description="AdamW learning rate (cosine decay to zero)")
    weights: str = Field("random", description="starting weights, as `segpipe run --weights` takes them")
    resize_shorter: PositiveInt | None = Field(
        None, description="semantic models: shorter side to train and run at (default: the model's preprocessing)"
    )
    seed: int = Field(0, description="seed for initialisation, shuffling and augmentation")


def train(config: TrainConfig) -> dict:
    """Train as ``config`` says; returns the model card written beside the weights."""
    config = config.model_copy(update={"data": absolute_uri(config.data), "output": absolute_uri(config.output)})
    fs, data_path = fsspec.core.url_to_fs(config.data)
    if not fs.exists(f"{data_path}/instances.json"):
        raise InputError(f"{config.data} has no instances.json: not a labelled dataset (see `segpipe synth`)")
    spec = get_model_spec(config.model)
    initial = resolve_weights(config.weights, spec)
    preprocessing = initial.preprocessing
    if spec.task == "semantic" and config.resize_shorter is not None:
        preprocessing = dataclasses.replace(preprocessing, resize_shorter=config.resize_shorter)
    output = config.output
    storage_path, storage_filesystem = _storage(f"{output}/checkpoints")
    ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // config.workers)
    trainer = ray.train.torch.TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(), "initial": ray.put(initial), "preprocessing": preprocessing},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=ray.train.RunConfig(
            name=f"{spec.name}-train",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "model.safetensors"), "rb") as file:
            weights_bytes = file.read()
        with open(os.path.join(directory, "categories.json")) as file:
            categories = json.load(file)
    card = {
        "model": spec.name,
        "task": spec.task,
        "categories": categories,
        "preprocessing": dataclasses.asdict(preprocessing),
        "training": {**config.model_dump(), "initial_weights_sha256": initial.sha256},
        "metrics": {"loss_per_epoch": result.metrics["losses"], "final_loss": result.metrics["loss"]},
    }
    card_json = json.dumps(card, indent=2)
    write_object(f"{output}/model.safetensors", weights_bytes)
    write_object(f"{output}/model.json", card_json.encode())
    return json.loads(card_json)


def _storage(uri: str) -> tuple[str, pyarrow.fs.FileSystem]:
    """Ray Train's storage for ``uri``, through fsspec so that every protocol and endpoint works."""
    fs, path = fsspec.core.url_to_fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _train_worker(settings: dict) -> None:
    config = TrainConfig.model_validate(settings["config"])
    preprocessing: Preprocessing = settings["preprocessing"]
    spec = get_model_spec(config.model)
    context = ray.train.get_context()
    torch.manual_seed(config.seed)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, round(cpus)))
    data = load_labelled(config.data, with_labels=spec.task == "semantic")
    model = _starting_model(spec, ray.get(settings["initial"]), len(data.categories))
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    samples = _SemanticSamples(data) if spec.task == "semantic" else _InstanceSamples(data)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(samples, batch_size=config.batch_size, shuffle=True, collate_fn=list, generator=generator)
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    losses: list[float] = []
    for epoch in range(config.epochs):
        if context.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        total, steps = torch.zeros((), device=device), 0
        for batch in loader:
            loss = _semantic_loss(model, batch, preprocessing, device) if spec.task == "semantic" else _instance_loss(model, batch, device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
            steps += 1
        if context.get_world_size() > 1:
            torch.distributed.all_reduce(total)
            total /= context.get_world_size()
        losses.append(round(float(total) / max(steps, 1), 5))
        if context.get_world_rank() == 0:
            print(f"segpipe train: epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if context.get_world_rank() == 0:
                state_dict = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
                safetensors.torch.save_file(state_dict, os.path.join(directory, "model.safetensors"))
                with open(os.path.join(directory, "categories.json"), "w") as file:
                    json.dump(list(data.categories), file)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({"epoch": epoch + 1, "loss": losses[-1], "losses": list(losses)}, checkpoint=checkpoint)


def _starting_model(spec: ModelSpec, initial: Weights, num_classes: int) -> nn.Module:
    """``spec`` with ``num_classes`` outputs, from ``initial`` wherever the shapes still fit."""
    model = spec.build(num_classes=num_classes)
    own = model.state_dict()
    fitting = {k: v for k, v in initial.state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    fresh = [key for key in own if key not in fitting]
    if fresh:
        print(f"segpipe train: {len(fresh)} tensors start fresh (heads for {num_classes} classes)", flush=True)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _SemanticSamples(Dataset):
    def __init__(self, data: LabelledData) -> None:
        self.samples = data.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image, label = torch.from_numpy(sample.image).permute(2, 0, 1), torch.from_numpy(sample.label)
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


class _InstanceSamples(Dataset):
    def __init__(self, data: LabelledData) -> None:
        self.samples = [sample for sample in data.samples if len(sample.classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample: Sample = self.samples[index]
        image, masks = sample.image, sample.masks
        if torch.rand(()) < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(masks)),
            "labels": torch.from_numpy(sample.classes),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)).to(torch.uint8),
        }
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), target


def _semantic_loss(model: nn.Module, batch: list, preprocessing: Preprocessing, device: torch.device) -> torch.Tensor:
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    images = torch.stack([_pad(image, height, width, 0) for image, _ in batch]).to(device)
    labels = torch.stack([_pad(label, height, width, IGNORE_INDEX) for _, label in batch]).to(device)
    inputs = model_input(images, preprocessing)
    if inputs.shape[-2:] != labels.shape[-2:]:
        labels = F.interpolate(labels[:, None].float(), size=inputs.shape[-2:], mode="nearest")[:, 0]
    labels = labels.long()
    outputs = model(inputs)
    loss = F.cross_entropy(outputs["out"], labels, ignore_index=IGNORE_INDEX)
    if "aux" in outputs:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(outputs["aux"], labels, ignore_index=IGNORE_INDEX)
    return loss


def _instance_loss(model: nn.Module, batch: list, device: torch.device) -> torch.Tensor:
    images = [image.to(device).float() / 255 for image, _ in batch]
    targets = [{key: value.to(device) for key, value in target.items()} for _, target in batch]
    return sum(model(images, targets).values())


def _pad(tensor: torch.Tensor, height: int, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)
