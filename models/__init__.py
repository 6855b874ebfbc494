"""segpipe's model zoo: a registry of segmentation models and the loading of their weights."""

# Importing a family's module registers its models.
from models import (  # noqa: F401
    linknet,
    maskrcnn_mobilenet,
    pspnet,
    refinenet,
    torchvision_detection,
    torchvision_instance,
    torchvision_semantic,
    unet,
)
from models.registry import ModelError, ModelSpec, Preprocessing, Task, get_model_spec, list_models
from models.torchvision_semantic import without_final_upsampling
from models.weights import Weights, resolve_weights, sidecar_uri

__all__ = [
    "ModelError",
    "ModelSpec",
    "Preprocessing",
    "Task",
    "Weights",
    "get_model_spec",
    "list_models",
    "resolve_weights",
    "sidecar_uri",
    "without_final_upsampling",
]
