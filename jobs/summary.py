"""The short, human-readable summary that ends every ``segpipe run``, built from its manifest."""

from __future__ import annotations

import datetime as dt

from pipeline.storage import display_uri
from pipeline.write import partition_path

_TOP_LABELS = 8


def format_summary(manifest: dict) -> str:
    counts = manifest["counts"]
    timings = manifest["timings"]
    seconds = timings["seconds"]
    failed = f"{counts['error']} failed"
    if counts["errors_by_type"]:
        failed += " (" + ", ".join(f"{kind}: {n}" for kind, n in counts["errors_by_type"].items()) + ")"
    labels = list(counts["masks_by_label"].items())
    shown = ", ".join(f"{label} {n}" for label, n in labels[:_TOP_LABELS])
    if len(labels) > _TOP_LABELS:
        shown += f", ... {len(labels) - _TOP_LABELS} more labels"
    config = manifest["config"]
    output = display_uri(config["output"])
    run_date = dt.date.fromisoformat(config["run_date"])
    # the run's partition only: a glob over the whole table lists every night's files first
    query = (
        f"SELECT label, count(*) AS masks, sum(area) AS pixels "
        f"FROM read_parquet('{partition_path(output, 'masks', run_date, config['model'])}/*.parquet', hive_partitioning=true) "
        f"WHERE run_id = '{manifest['run_id']}' GROUP BY label ORDER BY masks DESC"
    )
    lines = [
        "",
        f"segpipe run {manifest['run_id']} committed in {seconds:.1f} s (plus {before_the_pipeline(timings)})",
        f"  images      {counts['images']} in: {counts['ok']} ok, {failed}",
        f"  masks       {counts['masks']}" + (f": {shown}" if shown else ""),
        f"  throughput  {counts['images'] / seconds if seconds else 0.0:.2f} images/s",
        f"  tables      {partition_path(output, '{images,masks,class_stats}', run_date, config['model'])}/",
        f"  manifest    {display_uri(manifest['manifest_uri'])}",
        f"  try in DuckDB:  {query}",
        f"  report:         segpipe report {output} --run-date {config['run_date']} --model {config['model']} --out report.html",
    ]
    if timings.get("stage_seconds"):
        lines.insert(5, f"  stages      {stage_line(timings)}")
    if manifest.get("resumed_shards"):
        lines.insert(3, f"  resumed     {manifest['resumed_shards']} of {len(manifest['shards'])} shards were already written")
    skipped = manifest.get("skipped") or {}
    if skipped.get("files"):
        lines.insert(
            3,
            f"  skipped     {skipped['images']} images in {skipped['files']} files that earlier runs processed "
            f"(--incremental; runs {', '.join(skipped['processed_by_runs'])})",
        )
    if manifest["ignored_files"]:
        lines.insert(3, f"  ignored     {manifest['ignored_files']} files that are not images, .tar or .parquet")
    return "\n".join(lines)


_ACTOR_STEPS = (
    ("process started", "actor_process_started_seconds"),
    ("imports began", "actor_import_started_seconds"),
    ("torch imported", "actor_imported_seconds"),
)
"""How an actor's wait before its constructor splits: (label, the manifest's timings key)."""


def _actor_step(label: str, seconds: float) -> str:
    if seconds < 0:  # a worker process that Ray started ahead of the run and gave the actor
        return f"{label} by Ray {-seconds:.1f} s before the run"
    return f"{label} after {seconds:.1f} s"


def before_the_pipeline(timings: dict) -> str:
    """The driver's seconds before the pipeline started, which the run's own seconds leave out."""
    listing, waited_for_gpus = timings.get("listing_seconds"), timings.get("waited_for_gpus_seconds")  # absent from older manifests
    parts = [f"{listing:.1f} s listing"] if listing is not None else []
    parts.append(f"{timings['ray_startup_seconds']:.1f} s Ray start-up")
    parts += [f"{waited_for_gpus:.1f} s waiting for GPUs"] if waited_for_gpus else []
    return ", ".join(parts)


def stage_line(timings: dict) -> str:
    """Where the time went, so that a slow run says what to look at."""
    stages = timings["stage_seconds"]
    total = sum(stages.values()) or 1.0
    shares = ", ".join(f"{stage} {seconds / total:.0%}" for stage, seconds in sorted(stages.items(), key=lambda item: -item[1]))
    # absent from older manifests; the process start also on hosts without /proc
    steps = [_actor_step(label, timings[key]) for label, key in _ACTOR_STEPS if timings.get(key) is not None]
    actor_steps = ", ".join([*steps, f"constructor {timings['actor_startup_seconds']:.1f} s"])
    return (
        f"first shard written after {timings['first_shard_seconds']:.1f} s (actors ready after {timings['actors_ready_seconds']:.1f} s: "
        f"{actor_steps}); "
        f"time per stage: {shares}"
    )
