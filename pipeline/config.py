"""The one configuration object of a run, shared by the CLI, YAML job specs and the manifest.

Every field is a ``segpipe run`` flag (``files_per_shard`` is ``--files-per-shard``) and a key of
a job spec; unknown keys are an error. A job spec may list several models over the same input
under ``models``, each entry setting only :data:`MODEL_FIELDS`; that is one run per model, which
``segpipe run`` executes together so that each image is decoded once. ``{run_date}`` in ``input`` or ``output`` becomes the
run date, ``2026-11-24``; ``{run_date:%Y/%m/%d}`` takes any ``strftime`` format. Credentials are
never configuration: they come from the standard AWS variables, config files or instance roles
of each machine.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

MODEL_FIELDS = ("model", "weights", "score_threshold", "batch_size", "precision", "pad_to_multiple", "compile")
"""What a ``models`` entry of a job spec may set; the rest is shared by all its runs."""
_RUN_DATE_FIELD = re.compile(r"\{run_date(?::([^}]*))?\}")
_TEMPLATED = ("input", "output")


class RunConfig(BaseModel):
    """What one ``segpipe run`` reads, computes and writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(
        description="fsspec URI or local path of the images: a prefix of loose image files, "
        "WebDataset-style .tar shards and/or Parquet files with an image-bytes column, or one such file"
    )
    output: str = Field(description="fsspec URI or local path under which the tables and run manifests go")
    model: str = Field(description="registered model name (see `segpipe models`)")
    weights: str = Field(
        "DEFAULT",
        description="'random', a torchvision weights name of the model (DEFAULT, COCO_WITH_VOC_LABELS_V1, ...), "
        "or a URI/path to a .safetensors or torch state_dict file, optionally pinned as URI#sha256=HEX",
    )
    run_date: dt.date = Field(
        default_factory=dt.date.today, description="partition date of the output tables, YYYY-MM-DD (default: today)"
    )
    files_per_shard: PositiveInt = Field(256, description="loose image files grouped into one shard (unit of work)")
    image_column: str = Field("image", description="column holding the encoded image bytes in Parquet inputs")
    batch_size: PositiveInt | None = Field(
        None,
        description="most images per model forward pass (default: on GPUs 32 for semantic models and 8 for the R-CNN "
        "family, on CPUs 8); a batch that runs out of device memory is halved, and later batches keep to what fitted",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="arithmetic of the model on a GPU: 'auto' takes what measured fastest for the model (bf16 autocast for "
        "torchvision's models, fp32 for segpipe's own); CPUs always run fp32",
    )
    pad_to_multiple: PositiveInt = Field(
        1,
        description="semantic models: pad each resized image on the right and bottom up to a multiple of this many pixels, "
        "so that images of similar sizes share batches (their logits are cropped back); changes results near those "
        "borders slightly; 1 pads nothing",
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="compile the network with torch.compile in each actor, in this mode ('reduce-overhead' adds CUDA "
        "graphs on GPUs): the first batch of each input size waits for the compiler (up to minutes), later ones may run "
        "faster; see BENCHMARKS.md before turning it on",
    )
    score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="instance and detection models: keep detections scoring at least this"
    )
    limit: PositiveInt | None = Field(None, description="process only the first N images (for trying things)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses GPUs when the Ray cluster has any, else CPUs"
    )
    gpus: PositiveInt | None = Field(
        None,
        description="GPUs to wait for before the run starts: when the Ray cluster has fewer (GPU nodes that scale from "
        "zero), ask its autoscaler for them before listing the input and wait up to wait_for_gpus_seconds, then run on the "
        "GPUs that have joined (an error if none has); implies device cuda",
    )
    wait_for_gpus_seconds: PositiveInt = Field(
        900, description="how long gpus waits for GPU nodes to join, counted from asking for them, before the listing"
    )
    actors: PositiveInt | None = Field(
        None,
        description="model actors in the pool (default: on GPUs, four per GPU divided by threads_per_actor, rounded up, "
        "so that four shards share each GPU and one's host work (decoding, copying results to the host) overlaps the "
        "others' GPU work: one per GPU unless threads_per_actor is given; on CPU-only clusters, one on each of the "
        "largest nodes)",
    )
    threads_per_actor: PositiveInt | None = Field(
        None,
        description="shards each model actor works on at once, each in a thread of its own with its own CUDA stream, "
        "sharing the actor's copy of the models (default: on GPUs four shards per GPU shared among the actors, so 4 in "
        "the default one actor per GPU, and 1 for --actors 4 on one GPU; on CPUs 1, where torch's own threads fill the "
        "cores)",
    )
    max_pixels: PositiveInt = Field(
        100_000_000, description="images with more pixels are refused from their header, before decoding"
    )
    max_error_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="exit non-zero (after committing) when more images than this fraction fail"
    )
    incremental: bool = Field(
        False,
        description="skip images that earlier committed runs into the same output already processed with the same "
        "model, weights and preprocessing (same URI, size and ETag/mtime)",
    )
    force: bool = Field(False, description="redo a run that is already committed, every shard of it")

    @field_validator("output")
    @classmethod
    def _output_is_no_pattern(cls, output: str) -> str:
        if any(character in output for character in "*?[]"):
            raise ValueError(f"{output!r} holds *, ? or [ ], which fsspec and DuckDB would read as patterns when they list and query the tables")
        return output

    @model_validator(mode="after")
    def _gpus_need_a_gpu_device(self) -> RunConfig:
        if self.gpus is not None and self.device == "cpu":
            raise ValueError("gpus asks the cluster for GPUs, but device is cpu (use cuda or auto)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _fill_in_the_run_date(cls, values: Any) -> Any:
        """``{run_date}`` (or ``{run_date:FORMAT}``) in the URIs becomes the run's date."""
        if not isinstance(values, dict) or not any(_RUN_DATE_FIELD.search(str(values.get(key, ""))) for key in _TEMPLATED):
            return values
        run_date = values.get("run_date") or dt.date.today()
        if isinstance(run_date, str):
            try:
                run_date = dt.date.fromisoformat(run_date)
            except ValueError:
                return values  # the run_date field's own validation reports it
        filled = {key: _RUN_DATE_FIELD.sub(lambda match: format(run_date, match.group(1) or "%Y-%m-%d"), values[key])
                  for key in _TEMPLATED if isinstance(values.get(key), str)}  # fmt: skip
        return {**values, **filled}


def split_spec(values: dict[str, Any]) -> list[dict[str, Any]]:
    """A job spec's settings -> the settings of each run: one, or one per ``models`` entry
    (the entry's keys over the shared ones)."""
    if "models" not in values:
        return [values]
    shared = {key: value for key, value in values.items() if key != "models"}
    entries = values["models"]
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError("models: a list of mappings, each with at least a model")
    for number, entry in enumerate(entries):
        unknown = set(entry) - set(MODEL_FIELDS)
        if unknown:
            raise ValueError(f"models[{number}]: unknown setting {sorted(unknown)[0]!r} (valid: {', '.join(MODEL_FIELDS)})")
    return [{**shared, **entry} for entry in entries]


def join_spec(configs: list[RunConfig]) -> dict[str, Any]:
    """The job spec of ``configs`` (runs that differ only in :data:`MODEL_FIELDS`), as YAML-ready values."""
    values = [config.model_dump(mode="json", exclude_none=True) for config in configs]
    if len(values) == 1:
        return values[0]
    shared = {key: value for key, value in values[0].items() if key not in MODEL_FIELDS}
    return {**shared, "models": [{key: run[key] for key in MODEL_FIELDS if key in run} for run in values]}
