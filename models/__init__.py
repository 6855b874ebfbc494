"""segpipe's model zoo: a registry of segmentation models and the loading of their weights."""

from models import linknet, pspnet, refinenet, torchvision_instance, torchvision_semantic, unet  # noqa: F401 - they register models
from models.registry import ModelError, ModelSpec, Preprocessing, Task, get_model_spec, list_models
from models.weights import Weights, display_uri, load_state_dict_into, resolve_weights

__all__ = [
    "ModelError",
    "ModelSpec",
    "Preprocessing",
    "Task",
    "Weights",
    "display_uri",
    "get_model_spec",
    "list_models",
    "load_state_dict_into",
    "resolve_weights",
]
