"""Resolve a ``--weights`` spec to a verified state_dict, once, on the driver.

Spec grammar:

- ``random``: the model's own initialisation under a fixed seed (0), so every actor and every
  rerun gets the same parameters. Explicitly untrained: for smoke tests and benchmarks.
- a member of the model's torchvision weights enum (``DEFAULT``, ``COCO_WITH_VOC_LABELS_V1``,
  or the qualified ``DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1``): read from the torch
  hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded into it when the driver is online.
- any fsspec URI or local path to a ``.safetensors`` file or a torch state_dict, optionally
  pinned as ``URI#sha256=HEX``. Torch files load with ``weights_only=True``: no code they
  carry ever runs.

- a preset that segpipe ships (``shapes`` for ``unet``): a file under ``models/presets``.

A state_dict loads whether or not it carries ``aux_classifier.*`` keys (aux heads only serve
training) and whether or not it was saved from a ``DistributedDataParallel`` wrapper. A
``.json`` sidecar beside a weights file may name its model, categories and preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import urllib.error
from dataclasses import dataclass

import fsspec
import safetensors.torch
import torch
from torch import nn

from models.registry import ModelError, ModelSpec, Preprocessing
from pipeline.storage import display_uri

RANDOM_SEED = 0
_SHA256_PIN = "#sha256="


@dataclass(frozen=True)
class Weights:
    """A state_dict that fits its model, what its outputs mean, and the checksum the manifest records.

    ``categories`` and ``preprocessing`` are the model spec's, unless the weights file has a
    ``.json`` sidecar (``model.safetensors`` -> ``model.json``, as ``segpipe train`` writes)
    that says otherwise: fine-tuned weights bring their own category list.
    """

    state_dict: dict[str, torch.Tensor]
    sha256: str
    source: str
    categories: tuple[str, ...]
    preprocessing: Preprocessing

    def build(self, model: ModelSpec) -> nn.Module:
        """``model`` with these weights loaded, in eval mode on the CPU, for inference: its
        parameters are this state_dict's tensors, not copies. The model is built on the meta
        device, so no time goes into initialising parameters that the weights replace."""
        with torch.device("meta"):
            module = model.build(num_classes=len(self.categories))
        load_state_dict_into(module, self.state_dict, model_name=model.name)
        return module


def resolve_weights(spec: str, model: ModelSpec) -> Weights:
    """Fetch, verify and load-test the weights that ``spec`` names for ``model``."""
    if spec == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            state_dict = model.build().state_dict()
        sha256 = hashlib.sha256(safetensors.torch.save(state_dict)).hexdigest()
        return Weights(state_dict, sha256, f"random (seed {RANDOM_SEED})", model.categories, model.preprocessing)
    if spec == "DEFAULT" and model.torchvision_weights is None:
        if model.default_weights is None:
            raise ModelError(
                f"{model.name} has no trained weights of its own; pass --weights random, "
                "or a path/URI to a .safetensors or .pt state_dict (see `segpipe train`)"
            )
        spec = model.default_weights
    if spec in model.presets:
        return _from_file(str(model.presets[spec]), model, source=f"segpipe preset {spec}")
    preset = _torchvision_preset(spec, model)
    if preset is not None:
        path = _torchvision_file(preset, model)
        return _from_file(path, model, source=f"torchvision {type(preset).__name__}.{preset.name}")
    if "/" not in spec and "." not in spec:
        raise ModelError(
            f"unknown weights {spec!r} for {model.name}; choose one of: {', '.join(model.weight_presets)}, "
            "or a path/URI to a .safetensors or .pt state_dict"
        )
    return _from_file(spec, model, source=display_uri(spec.split(_SHA256_PIN)[0]))


def load_state_dict_into(module: nn.Module, state_dict: dict[str, torch.Tensor], *, model_name: str) -> None:
    """Strictly load ``state_dict`` (aux heads and a DDP ``module.`` prefix tolerated), its
    tensors becoming the module's (``assign``), as a module built on the meta device needs.
    Tensors saved in another dtype (a half-precision checkpoint) take the module's."""
    expected = module.state_dict()
    state_dict = {
        key: value.to(expected[key].dtype) if key in expected else value for key, value in _normalise_keys(state_dict).items()
    }
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        first_problem = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ModelError(f"weights do not fit {model_name}: {first_problem}") from None


def _normalise_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return {key: value for key, value in state_dict.items() if not key.startswith("aux_classifier.")}


def _torchvision_preset(spec: str, model: ModelSpec):
    if model.torchvision_weights is None:
        return None
    enum_name, _, member = spec.rpartition(".")
    if enum_name not in ("", model.torchvision_weights.__name__):
        return None
    return model.torchvision_weights.__members__.get(member)


def _torchvision_file(preset, model: ModelSpec) -> str:
    """The preset's file in the torch hub cache, downloaded there first if it is missing."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(preset.url))
    if not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(preset.url, cached, progress=False)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ModelError(
                f"{model.name} weights {preset.name} are not in the torch hub cache and could not be "
                f"downloaded ({reason}); copy {preset.url} to {cached} on the driver, "
                "or pass --weights PATH_OR_URI to a copy of the file"
            ) from None
    return cached


def _from_file(spec: str, model: ModelSpec, *, source: str) -> Weights:
    uri, _, pinned = spec.partition(_SHA256_PIN)
    try:
        with fsspec.open(uri, "rb") as file:
            data = file.read()
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read weights {source}: {type(error).__name__}: {error}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    if pinned and pinned.lower() != sha256:
        raise ModelError(f"weights {source} have sha256 {sha256}, not the pinned {pinned.lower()}; refusing them")
    state_dict = _normalise_keys(_parse_state_dict(data, source))
    categories, preprocessing = _sidecar(uri, model, source)
    weights = Weights(state_dict, sha256, source, categories, preprocessing)
    weights.build(model)  # fails here, on the driver, if the weights do not fit
    return weights


def sidecar_uri(weights_uri: str) -> str:
    """Where the description of a weights file lives: ``model.safetensors`` -> ``model.json``."""
    stem, dot, extension = weights_uri.rpartition(".")
    return f"{stem}.json" if dot and "/" not in extension else f"{weights_uri}.json"


def _sidecar(uri: str, model: ModelSpec, source: str) -> tuple[tuple[str, ...], Preprocessing]:
    try:
        with fsspec.open(sidecar_uri(uri), "r") as file:
            card = json.load(file)
    except FileNotFoundError:
        return model.categories, model.preprocessing
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the description {display_uri(sidecar_uri(uri))} of weights {source}: {error}") from None
    if card.get("model", model.name) != model.name:
        raise ModelError(f"weights {source} were trained for {card['model']}, not {model.name}")
    categories = tuple(card.get("categories", model.categories))
    try:
        preprocessing = Preprocessing.from_dict(card["preprocessing"]) if card.get("preprocessing") else model.preprocessing
    except ModelError as error:
        raise ModelError(f"the description {display_uri(sidecar_uri(uri))} of weights {source}: {error}") from None
    return categories, preprocessing


def _parse_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    if data[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            return safetensors.torch.load(data)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"weights {source} are not a valid safetensors file: {error}") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"refusing weights {source}: not a plain torch state_dict or safetensors file "
            f"(torch.load with weights_only=True said: {reason})"
        ) from None
    if isinstance(loaded, dict) and not _is_tensor_dict(loaded):
        loaded = next((loaded[key] for key in ("state_dict", "model") if _is_tensor_dict(loaded.get(key))), None)
    if not _is_tensor_dict(loaded):
        raise ModelError(f"weights {source} hold no state_dict (a mapping of parameter names to tensors)")
    return loaded


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())
