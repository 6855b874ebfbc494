"""The ``segpipe`` command line: ``run``, ``submit``, ``status``, ``logs``, ``query``, ``report``,
``models``, ``synth``, ``train`` and ``eval``.

``segpipe run`` takes its flags from :class:`pipeline.config.RunConfig` (``files_per_shard``
is ``--files-per-shard``), so the CLI, YAML job specs (``--spec FILE``; flags given on the
command line win) and the run manifest share one set of names, defaults and meanings.
``segpipe train`` takes its flags from :class:`jobs.train.TrainConfig` the same way. Bad
arguments, a missing input, an unknown model or unreadable weights end the command with
exit code 2 and a one-line reason; object storage that stays down past segpipe's retries, with
exit code 3 (the same command resumes the run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence

import pydantic
import yaml

from jobs import evaluate as evaluate_job
from jobs import query as query_job
from jobs import report as report_job
from jobs import submit as submit_job
from jobs import synth as synth_job
from jobs import train as train_job
from jobs.run import error_rate_exceeded, run_all
from jobs.summary import format_summary
from models import ModelError, list_models
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
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ModelError, InputError, SpecError) as error:
        print(f"segpipe: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from_worker = _worker_error(error)
        if from_worker is None:
            raise
        print(f"segpipe: error: {from_worker}", file=sys.stderr)
        return 3 if isinstance(from_worker, StorageUnavailable) else 2


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
    name = str(problem["loc"][0]) if problem["loc"] else "spec"
    flag = "--" + name.replace("_", "-")
    if problem["type"] == "missing":
        return f"{flag} is required"
    if problem["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (valid: {', '.join(config_type.model_fields)})"
    return f"{flag}: {problem['msg']}"


def _run(args: argparse.Namespace) -> int:
    code = 0
    for manifest in run_all(load_run_configs(args.spec, _config_flags(args, RunConfig))):
        print(format_summary(manifest))
        too_many_errors = error_rate_exceeded(manifest)
        if too_many_errors:
            print(f"segpipe: error: {manifest['model']['name']}: {too_many_errors}", file=sys.stderr)
            code = 1
    return code


def _synth(args: argparse.Namespace) -> int:
    coco = synth_job.synthesize(args.out, count=args.count, seed=args.seed, size=args.size)
    print(f"segpipe synth: {len(coco['images'])} images, {len(coco['annotations'])} instances under {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    card = train_job.train(load_config(None, _config_flags(args, train_job.TrainConfig), train_job.TrainConfig))
    losses = card["metrics"]["loss_per_epoch"]
    print(f"segpipe train: {card['model']} trained {len(losses)} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  weights  {args.output.rstrip('/')}/model.safetensors (with model.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
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
    print(submit_job.describe(args.address, args.job_id))
    return 0


def _logs(args: argparse.Namespace) -> int:
    if args.follow:
        return submit_job.follow(args.address, args.job_id)
    sys.stdout.write(submit_job.logs(args.address, args.job_id))
    return 0


def _query(args: argparse.Namespace) -> int:
    query_job.write(query_job.query(args.output, args.sql), args.format, args.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    manifest = report_job.write_report(args.output, args.out, run_date=args.run_date, model=args.model)
    print(f"segpipe report: run {manifest['run_id']} ({manifest['model']['name']}, {manifest['config']['run_date']}) -> {args.out}")
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
    rows += [(spec.name, spec.task, str(spec.num_classes), spec.default_weights or "-") for spec in specs]
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
    _add_flags(run_parser, RunConfig)
    run_parser.set_defaults(handler=_run)

    address_help = "the Ray dashboard address, http://HEAD:8265 (default: $RAY_ADDRESS)"
    submit_parser = _documented(commands, "submit", "submit a segpipe run to a Ray cluster (Ray Job Submission API)", submit_job)
    submit_parser.add_argument("--address", help=address_help)
    submit_parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its outcome")
    submit_parser.add_argument("--spec", metavar="FILE", help="YAML job spec with the same keys as the run flags")
    _add_flags(submit_parser, RunConfig)
    submit_parser.set_defaults(handler=_submit)

    status_parser = commands.add_parser("status", help="the status of a submitted job")
    status_parser.add_argument("job_id", metavar="JOB_ID")
    status_parser.add_argument("--address", help=address_help)
    status_parser.set_defaults(handler=_status)

    logs_parser = commands.add_parser("logs", help="the logs of a submitted job")
    logs_parser.add_argument("job_id", metavar="JOB_ID")
    logs_parser.add_argument("--address", help=address_help)
    logs_parser.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its outcome")
    logs_parser.set_defaults(handler=_logs)

    synth_parser = _documented(commands, "synth", "write a deterministic labelled dataset of shapes", synth_job)
    synth_parser.add_argument("--out", required=True, metavar="URI", help="where images/, labels/ and instances.json go")
    synth_parser.add_argument("--count", required=True, type=int, help="number of images")
    synth_parser.add_argument("--seed", required=True, type=int, help="the same seed gives the same bytes")
    synth_parser.add_argument("--size", type=int, default=192, metavar="PX", help="image side in pixels (default: 192)")
    synth_parser.set_defaults(handler=_synth)

    train_parser = _documented(commands, "train", "train a model on a labelled dataset with Ray Train", train_job)
    _add_flags(train_parser, train_job.TrainConfig)
    train_parser.set_defaults(handler=_train)

    eval_parser = _documented(commands, "eval", "measure a model on a labelled dataset", evaluate_job)
    eval_parser.add_argument("--model", required=True, help="registered model name")
    eval_parser.add_argument("--weights", required=True, metavar="SPEC", help="as `segpipe run --weights` takes them")
    eval_parser.add_argument("--data", required=True, metavar="URI", help="a labelled dataset (see `segpipe synth`)")
    eval_parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    eval_parser.add_argument(
        "--score-threshold", type=float, default=0.05,
        help="instance/detection: lowest score kept for the precision-recall curve (default: 0.05)",
    )  # fmt: skip
    eval_parser.add_argument("--json", action="store_true", help="print one JSON object")
    eval_parser.set_defaults(handler=_eval)

    query_parser = _documented(commands, "query", "run SQL over a segpipe output with DuckDB", query_job)
    _add_output(query_parser)
    query_parser.add_argument("sql", metavar="SQL", help="a query over the views images, masks, class_stats and runs")
    query_parser.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                              help="aligned table (default), CSV, a JSON array of objects, or Parquet")  # fmt: skip
    query_parser.add_argument("--out", metavar="URI", help="write the result here instead of stdout")
    query_parser.set_defaults(handler=_query)

    report_parser = _documented(commands, "report", "write a self-contained HTML report of a run", report_job)
    _add_output(report_parser)
    report_parser.add_argument("--run-date", metavar="YYYY-MM-DD", help="the run's date (default: the latest run)")
    report_parser.add_argument("--model", help="the run's model (default: the latest run's)")
    report_parser.add_argument("--out", required=True, metavar="FILE", help="where the HTML goes (any fsspec URI)")
    report_parser.set_defaults(handler=_report)

    models_parser = commands.add_parser("models", help="list the registered models")
    models_parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models_parser.set_defaults(handler=_models)
    return parser


def _documented(commands: argparse._SubParsersAction, name: str, summary: str, module: object) -> argparse.ArgumentParser:
    """A sub-command whose --help shows ``summary`` and then ``module``'s docstring."""
    return commands.add_parser(
        name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )


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
