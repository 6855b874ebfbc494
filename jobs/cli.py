"""The ``segpipe`` command line: ``segpipe run`` and ``segpipe models``.

``segpipe run`` takes its flags from :class:`pipeline.config.RunConfig` (``files_per_shard``
is ``--files-per-shard``), so the CLI, YAML job specs (``--spec FILE``; flags given on the
command line win) and the run manifest share one set of names, defaults and meanings.
Bad arguments, a missing input, an unknown model or unreadable weights end the command
with exit code 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence

import pydantic
import yaml

from jobs.run import run
from jobs.summary import format_summary
from models import ModelError, list_models
from pipeline.config import RunConfig
from pipeline.errors import InputError


class SpecError(ValueError):
    """A job spec or flag value that does not make a valid :class:`RunConfig`."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ModelError, InputError, SpecError) as error:
        print(f"segpipe: error: {error}", file=sys.stderr)
        return 2


def load_config(spec_path: str | None, flags: dict[str, object]) -> RunConfig:
    """The run's configuration: the YAML spec's keys, overridden by the flags given."""
    values: dict[str, object] = {}
    if spec_path is not None:
        try:
            with open(spec_path) as file:
                values = yaml.safe_load(file) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SpecError(f"cannot read job spec {spec_path}: {error}") from None
        if not isinstance(values, dict):
            raise SpecError(f"job spec {spec_path} must be a mapping of settings, not {type(values).__name__}")
    values.update(flags)
    try:
        return RunConfig.model_validate(values)
    except pydantic.ValidationError as error:
        raise SpecError("; ".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: dict) -> str:
    name = str(problem["loc"][0]) if problem["loc"] else "spec"
    flag = "--" + name.replace("_", "-")
    if problem["type"] == "missing":
        return f"{flag} is required"
    if problem["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (valid: {', '.join(RunConfig.model_fields)})"
    return f"{flag}: {problem['msg']}"


def _run(args: argparse.Namespace) -> int:
    flags = {name: value for name, value in vars(args).items() if name in RunConfig.model_fields}
    manifest = run(load_config(args.spec, flags))
    print(format_summary(manifest))
    return 0


def _models(args: argparse.Namespace) -> int:
    specs = list_models()
    if args.json:
        entries = [
            {
                "name": spec.name,
                "task": spec.task,
                "num_classes": spec.num_classes,
                "categories": list(spec.categories),
                "weights": list(spec.weight_presets),
                "default_weights": spec.default_weights,
            }
            for spec in specs
        ]
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("NAME", "TASK", "CLASSES", "DEFAULT WEIGHTS")]
    rows += [(spec.name, spec.task, str(spec.num_classes), spec.default_weights) for spec in specs]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe", description="Distributed batch image segmentation on Ray: object storage in, Parquet out."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run_parser = commands.add_parser(
        "run",
        help="segment every image under an input URI and write Parquet tables",
        description="Segment every image under --input on Ray and write the images, masks and class_stats "
        "tables plus a run manifest under --output. Object-storage credentials come from the standard "
        "AWS variables (AWS_ENDPOINT_URL for S3-compatible servers), config files or instance roles.",
    )
    run_parser.add_argument("--spec", metavar="FILE", help="YAML job spec with the same keys as these flags")
    for name, field in RunConfig.model_fields.items():
        options: dict = {"dest": name, "default": argparse.SUPPRESS, "metavar": name.upper()}
        help_text = field.description or ""
        if not field.is_required() and field.default_factory is None and field.default is not None:
            help_text += f" (default: {field.default})"
        choices = _literal_choices(field.annotation)
        if choices:
            options["choices"] = choices
            del options["metavar"]
        run_parser.add_argument("--" + name.replace("_", "-"), help=help_text, **options)
    run_parser.set_defaults(handler=_run)

    models_parser = commands.add_parser("models", help="list the registered models")
    models_parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models_parser.set_defaults(handler=_models)
    return parser


def _literal_choices(annotation: object) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return None


if __name__ == "__main__":
    sys.exit(main())
