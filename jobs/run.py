"""The ``segpipe run`` job: compose the pipeline stages into one Ray Data pipeline and commit.

list (driver) -> read (CPU tasks) -> decode + infer (model actor pool) -> encode + write (CPU
tasks) -> manifest (driver). Rows between stages are whole shards (after the actors, one row
per shard and run), so the shard stays the unit of work, retry and commit. Several runs over
the same shards (a job spec's ``models``) share one pipeline: one read and one decode per
image. The weights are resolved once on the driver and reach the actors through the Ray object
store; credentials never travel: each node reads its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import ray
import ray.data
from ray.autoscaler.sdk import request_resources

from models import ModelSpec, Weights, get_model_spec, resolve_weights
from pipeline.commit import processed_sources, read_manifest, write_manifest, write_sources
from pipeline.config import RunConfig
from pipeline.encode import encode_shards
from pipeline.errors import InputError
from pipeline.infer import SegmentShards
from pipeline.listing import Listing, ListingProgress, ProcessedSources, Shard, list_shards
from pipeline.read import largest_image_bytes, read_shards
from pipeline.schema import TABLE_SCHEMAS
from pipeline.storage import absolute_uri, display_uri
from pipeline.write import partition_path, remove_stale_shards, shard_file, shard_ids_written, write_shards, written_shard_summary

# Read and write tasks mostly wait on storage: half a CPU each lets more of them overlap, and
# keeps them from being fused into the model actors, which must not wait on I/O. Encode tasks
# ask the same, so that Ray Data fuses each with its shard's write into one task.
_IO_TASK_CPUS = 0.5
_CHECK_THREADS = 16
_SHARDS_PER_GPU = 4
"""Shards that a pool works on at once on each GPU unless both ``--actors`` and
``--threads-per-actor`` say otherwise: by default one actor of four threads. On the H200
(2026-11-28, same code), that ran lraspp at 1413 img/s once running against 1259 for four actors
of one thread; against the last four-actor figures (older code), DeepLabV3 549 against 307 and
Mask R-CNN 130 against 84.5 (benchmarks/BENCHMARKS.md)."""
_INPUT_BLOCKS = 1024
"""Ray Data input blocks that a run of twice as many shards or more is grouped into (about; fewer shards: one per block)."""
_MOST_SHARDS_PER_BLOCK = 8
_GPU_POLL_SECONDS = 2.0
_GPU_PROGRESS_SECONDS = 30.0
_SECONDS_BEFORE_A_PACE = 1.0  # after the first shard: progress lines give no pace before it
_PROGRESS_LINE_SECONDS = 10.0
"""Without a terminal, the least time between two progress lines: a line per shard would be
20,000 lines for a nightly run of 5 million images."""
_RUN_ID_FIELDS = (
    "input", "output", "model", "run_date", "files_per_shard", "image_column", "score_threshold", "limit", "max_pixels",
    "incremental", "precision", "pad_to_multiple", "compile",
)  # fmt: skip
_PIPELINE_FIELDS = {
    "output", "run_date", "image_column", "max_pixels", "device", "gpus", "wait_for_gpus_seconds", "actors", "threads_per_actor"
}  # fmt: skip
"""What runs over the same shards must share to go through one pipeline."""


@dataclass
class _Run:
    """One run, resolved: its model, verified weights and run id."""

    config: RunConfig
    spec: ModelSpec
    weights: Weights
    run_id: str


@dataclass(frozen=True)
class ActorPlan:
    """The model actors of a run: their ``device`` type, how many ``actors``, the Ray
    ``resources`` each asks for, the shards each works on at once (``threads``, each in a
    thread Ray calls it from), and on CPUs the threads each runs torch on."""

    device: str
    actors: int
    resources: dict[str, float]
    threads: int = 1
    cpu_threads: int | None = None


@dataclass
class _Plan(_Run):
    """One run to do: its listing, what an interrupted attempt already wrote, and the seconds
    that finding both took the driver before the pipeline could start."""

    listing: Listing
    processed: ProcessedSources | None
    written: dict[str, dict]
    listing_seconds: float


def run(config: RunConfig) -> dict:
    """Run the job ``config`` describes and return its committed manifest."""
    return run_all([config])[0]


def run_all(configs: list[RunConfig]) -> list[dict]:
    """Run the jobs ``configs`` describe (one per model over the same input, as a job spec's
    ``models`` lists them) and return their committed manifests, in order.

    Runs whose shards are the same go through one pipeline: each shard is read and each image
    decoded once, then every model that still needs the shard runs on it. Each run keeps its
    own run id, partition and manifest, exactly as if it had run alone."""
    manifests: dict[int, dict] = {}
    runs: dict[int, _Run] = {}
    for position, config in enumerate(configs):
        outcome = _resolve(config)
        if isinstance(outcome, dict):
            manifests[position] = outcome
        else:
            runs[position] = outcome
    gpus = max((run.config.gpus for run in runs.values() if run.config.gpus is not None), default=None)
    # GPU nodes boot while the input lists: both can take minutes.
    ray_startup_seconds = ensure_ray() if gpus is not None else 0.0
    gpus_asked_at = _ask_for_gpus(gpus) if gpus is not None else None
    try:
        listings: dict[tuple, Listing] = {}  # runs over the same input list it once (unless --incremental)
        plans = {position: _plan(run, listings) for position, run in runs.items()}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, plan in plans.items():
            shared = plan.config.model_dump(include=_PIPELINE_FIELDS)
            groups[(tuple(shard.shard_id for shard in plan.listing.shards), *shared.values())].append(position)
        for positions in groups.values():
            together = _run_together([plans[position] for position in positions], ray_startup_seconds, gpus_asked_at)
            for position, manifest in zip(positions, together):
                manifests[position] = manifest
    finally:
        if gpus_asked_at is not None:
            request_resources(bundles=[])  # every shard was written already, or the listing failed
    return [manifests[position] for position in range(len(configs))]


def _resolve(config: RunConfig) -> _Run | dict:
    """The run ``config`` describes, or its manifest when it is already committed (and not ``force``d)."""
    config = config.model_copy(update={"input": absolute_uri(config.input), "output": absolute_uri(config.output)})
    _refuse_output_inside_input(config)
    spec = get_model_spec(config.model)
    weights = resolve_weights(config.weights, spec)
    run_id = _run_id(config, weights.sha256)
    committed = read_manifest(config.output, run_id)
    if committed is not None and not config.force:
        print(f"segpipe: run {run_id} ({spec.name}) is already committed; nothing to do (--force redoes it)", flush=True)
        return committed
    return _Run(config, spec, weights, run_id)


def _plan(run: _Run, listings: dict[tuple, Listing]) -> _Plan:
    """The run's listing and what is already written of it. ``listings`` holds the full listings
    made so far, by input, shard size and limit."""
    config, spec, weights, run_id = run.config, run.spec, run.weights, run.run_id
    started = time.monotonic()
    processed = (
        processed_sources(
            config.output,
            model=spec.name,
            weights_sha256=weights.sha256,
            preprocessing=asdict(weights.preprocessing),
            exclude_run_id=run_id,
        )
        if config.incremental
        else None
    )
    key = (config.input, config.files_per_shard, config.limit)
    if processed is None and key in listings:
        listing = listings[key]
    else:
        progress = ListingProgress()
        with _progress_lines_while_listing(config.input, progress):
            listing = list_shards(
                config.input, files_per_shard=config.files_per_shard, limit=config.limit, processed=processed, progress=progress
            )
        if processed is None:
            listings[key] = listing
    if not listing.shards and not listing.skipped_files:
        raise InputError(f"no images, .tar or .parquet files under {display_uri(config.input)}")
    written = {} if config.force else _written_shards(config, run_id, listing.shards)
    return _Plan(**vars(run), listing=listing, processed=processed, written=written, listing_seconds=time.monotonic() - started)


@contextmanager
def _progress_lines_while_listing(input_uri: str, progress: ListingProgress) -> Iterator[None]:
    """Every :data:`_PROGRESS_LINE_SECONDS` while the block lists ``input_uri``, a line of how far
    it has come: millions of objects take minutes to list."""
    started = time.monotonic()
    done = threading.Event()

    def report() -> None:
        while not done.wait(_PROGRESS_LINE_SECONDS):
            so_far = f"{progress.files} files so far" if progress.files else "still listing"  # one listing counts at its end
            if progress.prefixes:
                so_far += f" ({progress.prefixes_listed} of {progress.prefixes} prefixes done)"
            print(f"segpipe: listing {display_uri(input_uri)}: {so_far}, after {time.monotonic() - started:.0f} s", flush=True)

    reporter = threading.Thread(target=report, name="listing-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def _run_together(plans: list[_Plan], ray_startup_seconds: float, gpus_asked_at: float | None) -> list[dict]:
    """Run ``plans`` (same shards) through one pipeline and commit each; returns their manifests.
    ``ray_startup_seconds``: what starting Ray before the listing took; ``gpus_asked_at``: when
    GPUs were asked for then (``time.monotonic()``)."""
    shards = plans[0].listing.shards
    todo = [shard for shard in shards if any(shard.shard_id not in plan.written for plan in plans)]
    ray_startup_seconds += ensure_ray() if todo else 0.0
    waited_for_gpus_seconds = _wait_for_gpus(plans[0].config, gpus_asked_at) if todo else 0.0
    started, started_at = time.monotonic(), time.time()
    first_shard: tuple[float, dict] | None = None
    rows: dict[str, dict[str, dict]] = {plan.run_id: dict(plan.written) for plan in plans}
    actor_plan = plan_actors(plans[0].config) if todo else None
    if actor_plan is not None:
        for plan in plans:
            resumed = f" ({len(plan.written)} already written by an interrupted attempt)" if plan.written else ""
            print(
                f"segpipe: run {plan.run_id}: {len(todo)} shards to do{resumed} from {display_uri(plan.config.input)}, "
                f"{plan.spec.name} ({plan.weights.source}) on {actor_plan.actors} {actor_plan.device} actor(s)"
                + (f" of {actor_plan.threads} threads" if actor_plan.threads > 1 else "")
                + f", batches of up to {plan.config.batch_size or plan.spec.default_batch_size(actor_plan.device)}"
                + (f", torch on {actor_plan.cpu_threads} CPU thread(s) each" if actor_plan.cpu_threads is not None else "")
                + (f", compiled ({plan.config.compile}) on each actor's first batch: the first shard comes later"
                   if plan.config.compile != "off" else ""),
                flush=True,
            )
        for row in _execute(plans, todo, actor_plan, started_at):
            rows[row["run_id"]][row["shard_id"]] = row
            first_shard = first_shard or (time.monotonic() - started, row)
    timings = {
        "seconds": round(time.monotonic() - started, 3),
        "ray_startup_seconds": round(ray_startup_seconds, 3),
        "waited_for_gpus_seconds": round(waited_for_gpus_seconds, 3),
        "first_shard_seconds": first_shard and round(first_shard[0], 3),
        "first_shard_stage_seconds": first_shard and _summed_stages([json.loads(first_shard[1]["stage_seconds"])]),
    }
    return [
        _commit(plan, rows[plan.run_id], timings, actor_plan, [other.run_id for other in plans if other is not plan]) for plan in plans
    ]


def _commit(
    plan: _Plan, shard_rows: dict[str, dict], timings: dict, actor_plan: ActorPlan | None, decoded_with: list[str]
) -> dict:
    """Commits ``plan``'s run: its manifest, with this attempt's ``actor_plan`` (``None`` where
    an interrupted attempt had written every shard) and the runs it shared its decoding with."""
    config, listing = plan.config, plan.listing
    remove_stale_shards(config.output, config.run_date, config.model, plan.run_id, keep={shard.shard_id for shard in listing.shards})
    manifest = _manifest(config, plan.run_id, plan.spec, plan.weights, listing.shards, shard_rows)
    manifest["ignored_files"] = listing.ignored_files
    manifest["resumed_shards"] = len(plan.written)
    manifest["decoded_with_runs"] = decoded_with
    manifest["actors"] = actor_plan and asdict(actor_plan)
    manifest["skipped"] = {
        "files": listing.skipped_files,
        "images": listing.skipped_images,
        "processed_by_runs": list(plan.processed.run_ids) if plan.processed else [],
    }
    manifest["sources_uri"] = write_sources(
        config.output, plan.run_id, listing.shards, {shard_id: row["images"] for shard_id, row in shard_rows.items()}
    )
    manifest["timings"] = timings | {"listing_seconds": round(plan.listing_seconds, 3)} | _stage_timings(shard_rows.values())
    manifest["committed_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return write_manifest(config.output, plan.run_id, manifest)


_ACTOR_START_FIGURES = ("startup", "ready", "imported", "import_started", "process")
"""What an actor's first shard carries besides its stages (see :class:`pipeline.infer.SegmentShards`)."""


def _stage_timings(shard_rows: Iterable[dict]) -> dict:
    """When the slowest actor was ready and how long its constructor took, and the seconds
    per stage summed over the shards that this attempt processed."""
    per_shard = [json.loads(row["stage_seconds"]) for row in shard_rows if row.get("stage_seconds")]
    slowest = {
        figure: max((seconds[figure] for seconds in per_shard if figure in seconds), default=None) for figure in _ACTOR_START_FIGURES
    }
    return {
        "actor_startup_seconds": slowest["startup"] and round(slowest["startup"], 3),
        "actors_ready_seconds": slowest["ready"] and round(slowest["ready"], 3),
        "actor_process_started_seconds": slowest["process"] and round(slowest["process"], 3),
        "actor_import_started_seconds": slowest["import_started"] and round(slowest["import_started"], 3),
        "actor_imported_seconds": slowest["imported"] and round(slowest["imported"], 3),
        "stage_seconds": _summed_stages(per_shard),
    }


def _summed_stages(per_shard: Iterable[dict[str, float]]) -> dict[str, float]:
    """Seconds per stage summed over shards' ``stage_seconds``: the actors' (decode, model,
    tables), then the encode and write tasks', most first."""
    stages: Counter[str] = Counter()
    for seconds in per_shard:
        stages.update({stage: seconds[stage] for stage in seconds.keys() - set(_ACTOR_START_FIGURES)})
    return {stage: round(total, 3) for stage, total in stages.most_common()}


def error_rate_exceeded(manifest: dict) -> str | None:
    """Why the run must exit non-zero although it committed, or ``None``: too many images failed."""
    counts, limit = manifest["counts"], manifest["config"]["max_error_rate"]
    if counts["images"] == 0 or counts["error"] / counts["images"] <= limit:
        return None
    top = ", ".join(f"{kind} {n}" for kind, n in list(counts["errors_by_type"].items())[:3])
    return (
        f"{counts['error']} of {counts['images']} images failed ({counts['error'] / counts['images']:.0%}), "
        f"above --max-error-rate {limit}; most often: {top}"
    )


def _written_shards(config: RunConfig, run_id: str, shards: list[Shard]) -> dict[str, dict]:
    """Summaries of the shards that an interrupted attempt at this run already wrote."""
    present = shard_ids_written(config.output, config.run_date, config.model)
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        summaries = pool.map(
            lambda shard: written_shard_summary(config.output, config.run_date, config.model, shard.shard_id, run_id),
            [shard for shard in shards if shard.shard_id in present],
        )
        return {summary["shard_id"]: summary for summary in summaries if summary is not None}


def _refuse_output_inside_input(config: RunConfig) -> None:
    if f"{config.output}/".startswith(f"{config.input}/"):
        raise InputError(
            f"output {display_uri(config.output)} lies inside input {display_uri(config.input)}; "
            "segpipe never writes into the archive it reads"
        )


def _run_id(config: RunConfig, weights_sha256: str) -> str:
    identity = json.dumps({**config.model_dump(mode="json", include=set(_RUN_ID_FIELDS)), "weights": weights_sha256})
    return f"{config.run_date:%Y%m%d}-{hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()}"


def ensure_ray() -> float:
    """Connect to ``RAY_ADDRESS`` or start a local Ray; returns the seconds it took."""
    if ray.is_initialized():
        return 0.0
    started = time.monotonic()
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="WARNING")
    return time.monotonic() - started


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _ask_for_gpus(gpus: int) -> float | None:
    """Ask the Ray cluster's autoscaler for ``gpus`` GPUs where it has fewer; returns when
    (``time.monotonic()``), or ``None`` when it has enough.

    The request is a floor that the autoscaler keeps until it is replaced, so it is cleared once
    the wait ends (:func:`_wait_for_gpus`) or the run ends: from then on the run's actors keep the
    nodes busy, and once the run is over the autoscaler can scale them down again."""
    if (joined := _cluster_gpus()) >= gpus:
        return None
    print(f"segpipe: the Ray cluster has {joined} of {gpus} GPU(s); asked its autoscaler for them, "
          "listing the input meanwhile", flush=True)  # fmt: skip
    request_resources(bundles=[{"GPU": 1}] * gpus)
    return time.monotonic()


def _wait_for_gpus(config: RunConfig, asked_at: float | None) -> float:
    """Wait until the Ray cluster has ``config.gpus`` GPUs, for at most
    ``config.wait_for_gpus_seconds`` from ``asked_at``, when they were asked for (or from now,
    asking now, when they were not); clears the request; returns the seconds waited here."""
    if config.gpus is None or (gpus := _cluster_gpus()) >= config.gpus:
        if asked_at is not None:
            request_resources(bundles=[])  # they joined while the input listed
        return 0.0
    started = time.monotonic()
    request_resources(bundles=[{"GPU": 1}] * config.gpus)  # again: a run before this one may have cleared it
    deadline = (asked_at or started) + config.wait_for_gpus_seconds
    print(f"segpipe: waiting for GPUs, up to {max(0.0, deadline - started):.0f} s more", flush=True)
    next_report = started + _GPU_PROGRESS_SECONDS
    try:
        while (gpus := _cluster_gpus()) < config.gpus and time.monotonic() < deadline:
            if time.monotonic() >= next_report:
                print(f"segpipe: {gpus} of {config.gpus} GPU(s) after {time.monotonic() - started:.0f} s", flush=True)
                next_report += _GPU_PROGRESS_SECONDS
            time.sleep(_GPU_POLL_SECONDS)
    finally:
        request_resources(bundles=[])
    waited = time.monotonic() - started
    if gpus == 0:
        raise InputError(
            f"asked the Ray cluster's autoscaler for {config.gpus} GPU(s), and none joined in {config.wait_for_gpus_seconds} s; "
            "the autoscaler's log on the head says why (/tmp/ray/session_latest/logs/monitor.*, or on KubeRay the "
            "autoscaler container's log)"
        )
    short = f" (of {config.gpus} asked for; running on those)" if gpus < config.gpus else ""
    print(f"segpipe: {gpus} GPU(s) after {waited:.0f} s more{short}", flush=True)
    return waited


def plan_actors(config: RunConfig) -> ActorPlan:
    """The run's model actors, as the Ray cluster's nodes allow."""
    gpus = _cluster_gpus()
    wants_gpus = config.device == "cuda" or config.gpus is not None
    if wants_gpus and gpus == 0:
        raise InputError(
            "--device cuda, but the Ray cluster has no GPUs (where its GPU nodes scale from zero, --gpus N asks its "
            "autoscaler for N and waits for them)"
        )
    if wants_gpus or (config.device == "auto" and gpus > 0):
        actors, threads = gpu_actors_and_threads(gpus, actors=config.actors, threads=config.threads_per_actor)
        resources = {"num_gpus": min(1.0, gpus / actors), "num_cpus": _gpu_actor_cpus(threads, actors / gpus)}
        return ActorPlan("cuda", actors, resources, threads=threads)
    return _cpu_actors(config.actors, threads=config.threads_per_actor or 1)


def gpu_actors_and_threads(gpus: int, *, actors: int | None, threads: int | None) -> tuple[int, int]:
    """How many GPU actors, and the shards each works on at once, for ``--actors`` and
    ``--threads-per-actor`` (``None`` where not given): four shards per GPU unless both are given.
    By default one actor of four threads per GPU; ``actors`` alone share their GPUs' shards in
    threads (an actor has at most one GPU); ``threads`` alone, four per GPU divided by it, rounded up."""
    if threads is None:
        actors = actors or gpus
        return actors, max(1, min(_SHARDS_PER_GPU, _SHARDS_PER_GPU * gpus // actors))
    return actors or gpus * math.ceil(_SHARDS_PER_GPU / threads), threads


def _cpu_actors(asked: int | None, *, threads: int) -> ActorPlan:
    """CPU actors: on every node, the read and write tasks keep a CPU (half of a node of one) and
    the actors share the rest. By default one actor on each of the largest nodes, taking its rest
    and running torch on all of the node's CPUs: the read, encode and write tasks use little of
    the CPU they keep (encoding and writing took 0.7 s of a 52-s U-Net run on this repository's
    2-core machine), where the actor's second thread made U-Net's steady rate 1.4x and lraspp's
    1.6x. ``asked`` actors share all nodes' rests, none larger than the largest, each on the CPUs
    it asks for. (An actor larger than every node would wait forever: the whole cluster's CPUs
    less one, as they were once, never fit a cluster of several nodes.)"""
    node_cpus = [resources["CPU"] for resources in _alive_node_resources() if resources.get("CPU")] or [1.0]
    rests = [cpus - (1.0 if cpus >= 2 else _IO_TASK_CPUS) for cpus in node_cpus]
    largest = max(rests)
    if asked is None:
        return ActorPlan("cpu", rests.count(largest), {"num_cpus": largest}, threads, cpu_threads=max(1, int(max(node_cpus))))
    cpus = _resource_amount(max(_IO_TASK_CPUS, min(largest, sum(rests) / asked)))
    return ActorPlan("cpu", asked, {"num_cpus": cpus}, threads, cpu_threads=max(1, round(cpus)))


def _alive_node_resources() -> list[dict[str, float]]:
    """Each live node's Ray resources."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def _resource_amount(amount: float) -> float:
    """``amount`` rounded down to Ray's resource granularity."""
    return math.floor(amount * 10_000) / 10_000


def _gpu_actor_cpus(threads: int, actors_per_gpu: float) -> float:
    """CPUs for each GPU actor: one per shard it works on at once, within half the CPUs per GPU of
    the GPU node with the fewest, so that the read, encode and write tasks keep the other half.

    The CPUs must be named: Ray places an actor that names none on a CPU of its own, which Ray
    Data does not count, so four of them on a node of 4 CPUs and one GPU took every CPU, the read
    tasks never ran, and the run waited forever."""
    cpus_per_gpu = min(resources.get("CPU", 0.0) / resources["GPU"] for resources in _alive_node_resources() if resources.get("GPU"))
    return _resource_amount(min(float(threads), cpus_per_gpu / 2 / max(1.0, actors_per_gpu)))


def _execute(plans: list[_Plan], shards: list[Shard], actor_plan: ActorPlan, started_at: float) -> Iterator[dict]:
    """Run read -> infer -> encode -> write over ``shards`` for every plan; yields one summary
    row per (shard, run), as each is written. ``started_at``: ``time.time()`` as the pipeline started."""
    config = plans[0].config
    # so that a worker's job-ending error (storage down, --compile failing) reaches the CLI as itself
    ray.data.DataContext.get_current().raise_original_map_exception = True
    dataset = (
        shard_input(shards)
        .map_batches(
            read_shards,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=_IO_TASK_CPUS,
            fn_kwargs={"image_column": config.image_column, "max_file_bytes": largest_image_bytes(config.max_pixels)},
        )
        .map_batches(
            SegmentShards,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=actor_plan.actors,
                max_concurrent_calls_per_actor=actor_plan.threads,
                enable_true_multi_threading=actor_plan.threads > 1,
            ),
            fn_constructor_kwargs={
                "configs": [plan.config for plan in plans],
                "run_ids": [plan.run_id for plan in plans],
                "device": actor_plan.device,
                "weights": [ray.put(plan.weights) for plan in plans],
                "pipeline_started_at": started_at,
                "calling_threads": actor_plan.threads,
                "cpu_threads": actor_plan.cpu_threads,
            },
            **actor_plan.resources,
        )
        .map_batches(
            encode_shards,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=_IO_TASK_CPUS,
            fn_kwargs={"categories": {plan.run_id: plan.weights.categories for plan in plans}},
        )
        .map_batches(
            write_shards,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=_IO_TASK_CPUS,
            fn_kwargs={"output": config.output, "run_date": config.run_date},
        )
    )
    return _with_progress(dataset.iter_rows(), len(shards), runs=len(plans))


def shard_input(shards: list[Shard]) -> ray.data.Dataset:
    """The run's shards as Ray Data's input: one row each (column ``shard``, its JSON), in about
    :data:`_INPUT_BLOCKS` blocks of up to :data:`_MOST_SHARDS_PER_BLOCK` shards (one each in a
    smaller run), with each stage's batch handed on as a block of its own.

    The driver puts every input block into the object store before the first shard is read,
    about 1 ms each: one block per shard was a minute of that at 5 million images in shards of
    64. The stages still take one shard at a time, since their batches are single shards and no
    stage merges them (Ray Data's would, up to 128 MiB a block, and an actor would then work
    through eight shards in one call). Small runs keep one shard per read task, so that their
    first shards are read side by side."""
    per_block = min(_MOST_SHARDS_PER_BLOCK, max(1, len(shards) // _INPUT_BLOCKS))
    dataset = ray.data.from_items([{"shard": shard.to_json()} for shard in shards], override_num_blocks=math.ceil(len(shards) / per_block))
    dataset.context.target_max_block_size = 1  # bytes: every batch a block of its own
    return dataset


def _with_progress(rows: Iterator[dict], shards: int, *, runs: int) -> Iterator[dict]:
    """``rows`` (one per shard and run); when stdout is no terminal (a log file, a scheduler),
    progress lines stand in for Ray Data's progress bars: for the first written row, the last,
    and at most one every :data:`_PROGRESS_LINE_SECONDS` between them, each with the rows
    written so far and their images (per run, where a job spec runs several models), and once
    a second has passed since the first row, the images/s since it (start-up left out; an image
    that several runs share counts once) and the time left at that pace. Actors that started
    together write their first shards together, so a pace over less time would count that burst
    as the rate."""
    total = shards * runs
    log_lines = not sys.stdout.isatty()
    started = time.monotonic()
    first_written_at: float | None = None
    last_line_at = -math.inf
    images_since_first = 0.0
    images = ok = 0
    for done, row in enumerate(rows, start=1):
        images, ok = images + row["images"], ok + row["ok"]
        if log_lines:
            now = time.monotonic()
            if first_written_at is None:
                first_written_at = now
            else:
                images_since_first += row["images"] / runs
            if done in (1, total) or now - last_line_at >= _PROGRESS_LINE_SECONDS:
                last_line_at = now
                line = f"segpipe: {done}/{total} shards written ({images} images, {ok} ok) after {now - started:.0f} s"
                if now - first_written_at >= _SECONDS_BEFORE_A_PACE:
                    seconds_per_shard = (now - first_written_at) / (done - 1)
                    line += (f"; {images_since_first / (now - first_written_at):.1f} images/s, "
                             f"about {_duration(seconds_per_shard * (total - done))} left")  # fmt: skip
                print(line, flush=True)
        yield row


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _manifest(
    config: RunConfig,
    run_id: str,
    spec: ModelSpec,
    weights: Weights,
    shards: list[Shard],
    shard_rows: dict[str, dict],
) -> dict:
    errors: Counter[str] = Counter()
    masks: Counter[str] = Counter()
    shard_entries = []
    for shard in shards:
        row = shard_rows[shard.shard_id]
        errors.update(json.loads(row["errors"]))
        masks.update(json.loads(row["masks"]))
        shard_entries.append(
            {
                "shard_id": shard.shard_id,
                "kind": shard.kind,
                "sources": len(shard.sources),
                "first_uri": display_uri(shard.sources[0].uri),
                "images": row["images"],
                "ok": row["ok"],
                "bytes_written": row["bytes_written"],
                "files": {table: shard_file(config.output, table, config.run_date, config.model, shard.shard_id) for table in TABLE_SCHEMAS},
            }
        )
    images = sum(entry["images"] for entry in shard_entries)
    ok = sum(entry["ok"] for entry in shard_entries)
    return {
        "run_id": run_id,
        "status": "complete",
        "config": config.model_dump(mode="json"),
        "model": {
            "name": spec.name,
            "task": spec.task,
            "categories": list(weights.categories),
            "preprocessing": asdict(weights.preprocessing),
        },
        "weights": {"source": weights.source, "sha256": weights.sha256},
        "versions": {
            "python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in ("segpipe", "torch", "torchvision", "ray", "pyarrow")},
        },
        "tables": {table: partition_path(config.output, table, config.run_date, config.model) for table in TABLE_SCHEMAS},
        "counts": {
            "images": images,
            "ok": ok,
            "error": images - ok,
            "errors_by_type": dict(errors.most_common()),
            "masks": sum(masks.values()),
            "masks_by_label": dict(masks.most_common()),
            "bytes_written": sum(entry["bytes_written"] for entry in shard_entries),
        },
        "shards": shard_entries,
    }
