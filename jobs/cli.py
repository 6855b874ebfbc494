"""The ``segpipe`` command line: ``run``, ``submit``, ``status``, ``logs``, ``query``, ``report``,
``models``, ``synth``, ``train`` and ``eval``.

``segpipe run`` takes its flags from :class:`pipeline.config.RunConfig` (``files_per_shard``
is ``--files-per-shard``), so the CLI, YAML job specs (``--spec FILE``; flags given on the
command line win) and the run manifest share one set of names, defaults and meanings.
``segpipe train`` takes its flags from :class:`jobs.train.TrainConfig` the same way. Bad
arguments, a missing input, an unknown model or unreadable weights end the command with
exit code 2 and a one-line reason; object storage that stays down past segpipe's retries, with
exit code 3 (the same command resumes the run).

A command imports what runs it (torch, Ray Data, DuckDB) only once it is the command given: on
the development machine ``segpipe --help`` answers in 0.2 s and ``status`` in about 1 s (Ray's
client), against 6.5 s when every command's modules were imported first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from types import ModuleType

import pydantic
import yaml

from pipeline.config import RunConfig, split_spec
from pipeline.errors import CompileFailed, InputError, StorageUnavailable


Config = typing.TypeVar("Config", bound=pydantic.BaseModel)


class SpecError(ValueError):
    """A job spec or flag values that do not make a valid configuration."""


class _StderrHandler(logging.Handler):
    """Writes segpipe's log lines (storage retries, ...) to whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("segpipe")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    _log_to_stderr()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(next((arg for arg in argv if not arg.startswith("-")), None)).parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:
        if isinstance(error, _one_line_errors()):
            print(f"segpipe: error: {error}", file=sys.stderr)
            return 2
        from_worker = _worker_error(error)
        if from_worker is None:
            raise
        print(f"segpipe: error: {from_worker}", file=sys.stderr)
        return 3 if isinstance(from_worker, StorageUnavailable) else 2


def _one_line_errors() -> tuple[type[Exception], ...]:
    """The errors that end a command with their message alone. Only a command that imported the
    models can raise their ``ModelError``, so the other commands need not import the models (and
    torch) to catch it."""
    models = sys.modules.get("models")
    return (InputError, SpecError) + ((models.ModelError,) if models is not None else ())


def _worker_error(error: BaseException | None) -> StorageUnavailable | CompileFailed | None:
    """The job-ending error behind ``error``, which Ray may have wrapped on its way from a worker."""
    while error is not None:
        cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError keeps the worker's exception here
        for candidate in (cause, error):
            if isinstance(candidate, (StorageUnavailable, CompileFailed)):
                return candidate
        error = error.__cause__ or error.__context__
    return None


def load_config(spec_path: str | None, flags: dict[str, object], config_type: type[Config] = RunConfig) -> Config:
    """A job's configuration: the YAML spec's keys, overridden by the flags given."""
    values = _read_spec(spec_path)
    values.update(flags)
    return _validate(values, config_type)


def load_run_configs(spec_path: str | None, flags: dict[str, object]) -> list[RunConfig]:
    """The runs of a ``segpipe run`` or ``submit``: one, or one per entry of the spec's ``models``."""
    values = _read_spec(spec_path)
    if "models" in values and {"model", "weights"} & set(flags):
        raise SpecError(f"job spec {spec_path} lists its models; --model and --weights cannot replace them")
    try:
        runs = split_spec(values)
    except ValueError as error:
        raise SpecError(f"job spec {spec_path}: {error}") from None
    return [_validate({**run, **flags}, RunConfig) for run in runs]


def _read_spec(spec_path: str | None) -> dict[str, object]:
    if spec_path is None:
        return {}
    try:
        with open(spec_path) as file:
            values = yaml.safe_load(file) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SpecError(f"cannot read job spec {spec_path}: {error}") from None
    if not isinstance(values, dict):
        raise SpecError(f"job spec {spec_path} must be a mapping of settings, not {type(values).__name__}")
    return values


def _validate(values: dict[str, object], config_type: type[Config]) -> Config:
    try:
        return config_type.model_validate(values)
    except pydantic.ValidationError as error:
        raise SpecError("; ".join(_describe(problem, config_type) for problem in error.errors())) from None


def _describe(problem: dict, config_type: type[pydantic.BaseModel]) -> str:
    # a ValueError raised by a validator: its own message, without pydantic's "Value error, " before it
    message = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
    if not problem["loc"]:  # a check across settings names them in its message
        return message
    name = str(problem["loc"][0])
    flag = "--" + name.replace("_", "-")
    if problem["type"] == "missing":
        return f"{flag} is required"
    if problem["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (valid: {', '.join(config_type.model_fields)})"
    return f"{flag}: {message}"


def _run(args: argparse.Namespace) -> int:
    from jobs.run import error_rate_exceeded, run_all
    from jobs.summary import format_summary

    code = 0
    for manifest in run_all(load_run_configs(args.spec, _config_flags(args, RunConfig))):
        print(format_summary(manifest))
        too_many_errors = error_rate_exceeded(manifest)
        if too_many_errors:
            print(f"segpipe: error: {manifest['model']['name']}: {too_many_errors}", file=sys.stderr)
            code = 1
    return code


def _synth(args: argparse.Namespace) -> int:
    from jobs import synth as synth_job

    coco = synth_job.synthesize(args.out, count=args.count, seed=args.seed, size=args.size)
    print(f"segpipe synth: {len(coco['images'])} images, {len(coco['annotations'])} instances under {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from jobs import train as train_job

    card = train_job.train(load_config(None, _config_flags(args, train_job.TrainConfig), train_job.TrainConfig))
    losses = card["metrics"]["loss_per_epoch"]
    print(f"segpipe train: {card['model']} trained {len(losses)} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  weights  {args.output.rstrip('/')}/model.safetensors (with model.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jobs import evaluate as evaluate_job

    metrics = evaluate_job.evaluate(
        args.model, args.weights, args.data, batch_size=args.batch_size, score_threshold=args.score_threshold
    )
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:16} {value:.4f}" if isinstance(value, float) else f"{name:16} {value}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from jobs import submit as submit_job

    configs = load_run_configs(args.spec, _config_flags(args, RunConfig))
    job_id = submit_job.submit(args.address, configs)
    models = ", ".join(config.model for config in configs)
    print(f"segpipe: submitted job {job_id} ({models}, run date {configs[0].run_date})", flush=True)
    if not args.wait:
        print(f"  segpipe status {job_id}    segpipe logs {job_id} --follow")
        return 0
    code = submit_job.follow(args.address, job_id)
    print(submit_job.describe(args.address, job_id))
    return code


def _status(args: argparse.Namespace) -> int:
    from jobs import submit as submit_job

    print(submit_job.describe(args.address, args.job_id))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from jobs import submit as submit_job

    if args.follow:
        return submit_job.follow(args.address, args.job_id)
    sys.stdout.write(submit_job.logs(args.address, args.job_id))
    return 0


def _query(args: argparse.Namespace) -> int:
    from jobs import query as query_job

    query_job.write(query_job.query(args.output, args.sql), args.format, args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from jobs import report as report_job

    manifest = report_job.write_report(args.output, args.out, run_date=args.run_date, model=args.model)
    print(f"segpipe report: run {manifest['run_id']} ({manifest['model']['name']}, {manifest['config']['run_date']}) -> {args.out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from models import list_models

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
    rows += [(spec.name, spec.task, str(spec.num_classes), spec.default_weights or "-") for spec in specs]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """segpipe's parser, with the arguments of ``command`` alone: a command's arguments come with
    the modules that run it (torch, Ray), which ``--help`` and the other commands need not import."""
    parser = argparse.ArgumentParser(
        prog="segpipe", description="Distributed batch image segmentation on Ray: object storage in, Parquet out."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, (summary, add_arguments) in _COMMANDS.items():
        command_parser = commands.add_parser(name, help=summary)
        if name == command:
            add_arguments(command_parser)
    return parser


_ADDRESS_HELP = "the Ray dashboard address, http://HEAD:8265 (default: $RAY_ADDRESS)"


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Segment every image under --input on Ray and write the images, masks and class_stats "
        "tables plus a run manifest under --output. Object-storage credentials come from the standard "
        "AWS variables (AWS_ENDPOINT_URL for S3-compatible servers), config files or instance roles."
    )
    parser.add_argument("--spec", metavar="FILE", help="YAML job spec with the same keys as these flags")
    _add_flags(parser, RunConfig)
    parser.set_defaults(handler=_run)


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    _documented(parser, "jobs.submit")
    parser.add_argument("--address", help=_ADDRESS_HELP)
    parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its outcome")
    parser.add_argument("--spec", metavar="FILE", help="YAML job spec with the same keys as the run flags")
    _add_flags(parser, RunConfig)
    parser.set_defaults(handler=_submit)


def _job_arguments(handler: Callable[[argparse.Namespace], int], *, follow: bool = False) -> Callable[[argparse.ArgumentParser], None]:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job_id", metavar="JOB_ID")
        parser.add_argument("--address", help=_ADDRESS_HELP)
        if follow:
            parser.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its outcome")
        parser.set_defaults(handler=handler)

    return add_arguments


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    _documented(parser, "jobs.synth")
    parser.add_argument("--out", required=True, metavar="URI", help="where images/, labels/ and instances.json go")
    parser.add_argument("--count", required=True, type=int, help="number of images")
    parser.add_argument("--seed", required=True, type=int, help="the same seed gives the same bytes")
    parser.add_argument("--size", type=int, default=192, metavar="PX", help="image side in pixels (default: 192)")
    parser.set_defaults(handler=_synth)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_flags(parser, _documented(parser, "jobs.train").TrainConfig)
    parser.set_defaults(handler=_train)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _documented(parser, "jobs.evaluate")
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--weights", required=True, metavar="SPEC", help="as `segpipe run --weights` takes them")
    parser.add_argument("--data", required=True, metavar="URI", help="a labelled dataset (see `segpipe synth`)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.05,
        help="instance/detection: lowest score kept for the precision-recall curve (default: 0.05)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_eval)


def _query_arguments(parser: argparse.ArgumentParser) -> None:
    _documented(parser, "jobs.query")
    _add_output(parser)
    parser.add_argument("sql", metavar="SQL", help="a query over the views images, masks, class_stats and runs")
    parser.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                        help="aligned table (default), CSV, a JSON array of objects, or Parquet")  # fmt: skip
    parser.add_argument("--out", metavar="URI", help="write the result here instead of stdout")
    parser.set_defaults(handler=_query)


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    _documented(parser, "jobs.report")
    _add_output(parser)
    parser.add_argument("--run-date", metavar="YYYY-MM-DD", help="the run's date (default: the latest run)")
    parser.add_argument("--model", help="the run's model (default: the latest run's)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where the HTML goes (any fsspec URI)")
    parser.set_defaults(handler=_report)


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(handler=_models)


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "run": ("segment every image under an input URI and write Parquet tables", _run_arguments),
    "submit": ("submit a segpipe run to a Ray cluster (Ray Job Submission API)", _submit_arguments),
    "status": ("the status of a submitted job", _job_arguments(_status)),
    "logs": ("the logs of a submitted job", _job_arguments(_logs, follow=True)),
    "synth": ("write a deterministic labelled dataset of shapes", _synth_arguments),
    "train": ("train a model on a labelled dataset with Ray Train", _train_arguments),
    "eval": ("measure a model on a labelled dataset", _eval_arguments),
    "query": ("run SQL over a segpipe output with DuckDB", _query_arguments),
    "report": ("write a self-contained HTML report of a run", _report_arguments),
    "models": ("list the registered models", _models_arguments),
}
"""Each command's one-line summary and what adds its arguments (importing what it needs)."""


def _documented(parser: argparse.ArgumentParser, module_name: str) -> ModuleType:
    """The module that runs a command, imported; the command's --help shows its docstring as written."""
    module = importlib.import_module(module_name)
    parser.description = module.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return module


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="the --output of segpipe run (any fsspec URI)")


def _add_flags(parser: argparse.ArgumentParser, config_type: type[pydantic.BaseModel]) -> None:
    """One ``--flag-name`` per field of ``config_type``, explained by the field's description."""
    for name, field in config_type.model_fields.items():
        options: dict = {"dest": name, "default": argparse.SUPPRESS}
        help_text = field.description or ""
        if not field.is_required() and field.default_factory is None and field.default is not None:
            help_text += f" (default: {field.default})"
        if field.annotation is bool:
            options["action"] = "store_true"
        elif choices := _literal_choices(field.annotation):
            options["choices"] = choices
        else:
            options["metavar"] = name.upper()
        parser.add_argument("--" + name.replace("_", "-"), help=help_text, **options)


def _config_flags(args: argparse.Namespace, config_type: type[pydantic.BaseModel]) -> dict[str, object]:
    return {name: value for name, value in vars(args).items() if name in config_type.model_fields}


def _literal_choices(annotation: object) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return None


if __name__ == "__main__":
    sys.exit(main())
