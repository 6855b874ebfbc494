"""Model registry: a name maps to a task, a builder, category names and a preprocessing contract.

A builder takes keyword-only ``num_classes`` and returns an ``nn.Module`` with freshly
initialised parameters; it never downloads anything. Weights are resolved separately
(:mod:`models.weights`) so that the driver fetches them once for the whole cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from torch import nn
from torchvision.models import WeightsEnum

Task = Literal["semantic", "instance", "detection"]

PRESETS = Path(__file__).resolve().parent / "presets"
"""Weights that segpipe trained and ships (``segpipe train``; see the README for how)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model or weights choice that cannot be honoured; the message says what to do instead."""


@dataclass(frozen=True)
class Preprocessing:
    """How decoded RGB uint8 pixels become model input.

    ``resize_shorter``: the shorter side is resized to this many pixels (bilinear, antialiased)
    and the input is normalised with ``mean``/``std``; ``None`` means the model takes float RGB
    in [0, 1] at original size and resizes internally (torchvision's detection models).
    """

    resize_shorter: int | None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.std is not None and 0 in self.std:
            raise ModelError(f"preprocessing std {list(self.std)} has a zero: the model input would be infinite")

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of an image after the shorter-side resize, computed as torchvision's
        ``resize`` computes it (the longer side rounded down)."""
        if self.resize_shorter is None:
            return height, width
        short, long = sorted((height, width))
        resized_long = int(self.resize_shorter * long / short)
        return (self.resize_shorter, resized_long) if height <= width else (resized_long, self.resize_shorter)

    @classmethod
    def from_dict(cls, fields: dict) -> Preprocessing:
        """The inverse of ``dataclasses.asdict``, for JSON that turned tuples into lists."""
        return cls(
            resize_shorter=fields.get("resize_shorter"),
            mean=tuple(fields["mean"]) if fields.get("mean") else None,
            std=tuple(fields["std"]) if fields.get("std") else None,
        )


# Pascal VOC's 21 classes as torchvision names them: the default of the seed architectures too.
VOC_CATEGORIES: tuple[str, ...] = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class CudaExecution:
    """How a model runs fastest on a CUDA GPU, as ``benchmarks/throughput.py`` measured it on an
    H100: ``bf16`` runs it under bfloat16 autocast (``--precision auto``), ``channels_last``
    hands it NHWC input. Both differ by model: channels_last speeds up ResNets and slows
    MobileNets. On the CPU every model runs in float32 (see :attr:`ModelSpec.cpu_channels_last`)."""

    bf16: bool = False
    channels_last: bool = False


GPU_BATCH_SIZES: Mapping[Task, int] = {"semantic": 32, "instance": 8, "detection": 8}
"""Images per forward pass on GPUs where ``--batch-size`` is not given: the batches that every
GPU figure in benchmarks/BENCHMARKS.md was measured with. The R-CNN family's inputs (shorter
side 800) hold 2.4 times the pixels of the semantic models' (520), and its masks more memory."""
CPU_BATCH_SIZE = 8
"""Images per forward pass on CPUs where ``--batch-size`` is not given."""

SEMANTIC_PREPROCESSING = Preprocessing(resize_shorter=520, mean=IMAGENET_MEAN, std=IMAGENET_STD)
DETECTION_PREPROCESSING = Preprocessing(resize_shorter=None)


@dataclass(frozen=True)
class ModelSpec:
    """Everything segpipe needs to know about one registered model."""

    name: str
    task: Task
    builder: Callable[..., nn.Module]
    categories: tuple[str, ...]
    preprocessing: Preprocessing
    torchvision_weights: type[WeightsEnum] | None = None
    presets: Mapping[str, Path] = field(default_factory=dict)
    """Weights files shipped with segpipe, by preset name (each with its ``.json`` sidecar)."""
    cuda: CudaExecution = CudaExecution()
    cpu_channels_last: bool = False
    """Whether the model runs on NHWC input on CPUs, where oneDNN's NHWC convolutions measured
    faster for it (``benchmarks/HISTORY.md``, 2-core x86 machine): 1.1x to 1.6x for
    DeepLabV3 (ResNets and MobileNet), LR-ASPP and segpipe's U-Net, LinkNet and RefineNet; not
    for FCN, PSPNet or the R-CNN family."""

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def weight_presets(self) -> tuple[str, ...]:
        """Named ``--weights`` choices: ``random``, segpipe's shipped presets, torchvision's enum members."""
        members = tuple(self.torchvision_weights.__members__) if self.torchvision_weights else ()
        return ("random", *self.presets, *members)

    @property
    def default_weights(self) -> str | None:
        """The preset ``--weights DEFAULT`` resolves to: torchvision's default, else segpipe's
        first shipped preset; ``None`` for an architecture with no trained weights."""
        if self.torchvision_weights is not None:
            return self.torchvision_weights.DEFAULT.name
        return next(iter(self.presets), None)

    def default_batch_size(self, device_type: str) -> int:
        """Images per forward pass where ``--batch-size`` is not given, on a ``device_type``
        (``"cuda"`` or ``"cpu"``) device."""
        return GPU_BATCH_SIZES[self.task] if device_type == "cuda" else CPU_BATCH_SIZE

    def build(self, *, num_classes: int | None = None) -> nn.Module:
        """A fresh model in eval mode with ``num_classes`` outputs (default: this spec's categories)."""
        return self.builder(num_classes=num_classes or self.num_classes).eval()


def _build_torchvision(torchvision_builder: Callable[..., nn.Module], *, num_classes: int) -> nn.Module:
    return torchvision_builder(weights=None, weights_backbone=None, num_classes=num_classes)


def torchvision_spec(
    torchvision_builder: Callable[..., nn.Module],
    weights: type[WeightsEnum],
    *,
    task: Task,
    preprocessing: Preprocessing,
    cuda: CudaExecution,
    cpu_channels_last: bool = False,
) -> ModelSpec:
    """A spec for a torchvision builder, named and labelled as torchvision names and labels it."""
    return ModelSpec(
        name=torchvision_builder.__name__,
        task=task,
        builder=partial(_build_torchvision, torchvision_builder),
        categories=tuple(weights.DEFAULT.meta["categories"]),
        preprocessing=preprocessing,
        torchvision_weights=weights,
        cuda=cuda,
        cpu_channels_last=cpu_channels_last,
    )


def seed_semantic_spec(name: str, builder: Callable[..., nn.Module], *, cpu_channels_last: bool, **presets: Path) -> ModelSpec:
    """A spec for one of segpipe's own semantic architectures: VOC categories and torchvision's
    semantic preprocessing until trained weights bring their own (``presets``: name -> file)."""
    return ModelSpec(
        name=name,
        task="semantic",
        builder=builder,
        categories=VOC_CATEGORIES,
        preprocessing=SEMANTIC_PREPROCESSING,
        presets=presets,
        cpu_channels_last=cpu_channels_last,
    )


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
