"""Write stage (CPU tasks): one shard row of table rows -> one Parquet file per table.

File names are a function of the shard alone,
``{output}/{table}/run_date={YYYY-MM-DD}/model={name}/part-{shard_id}.parquet``, so a retried
or resumed shard replaces its files instead of adding a copy. Each file is written as one
complete object (object stores: one upload, visible only once complete; local disks: a hidden
temporary file renamed into place), so a reader never sees half a file. ``images`` is written
last: once it exists, the shard's other two files are complete. Each file carries the
``run_id`` that wrote it in its Parquet metadata, so a resumed run knows its own shards.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.listing import files_under
from pipeline.schema import TABLE_SCHEMAS, unnest, with_stage_seconds
from pipeline.storage import listing_filesystem, retrying, write_object

# images last: its file marks the shard as written.
WRITE_ORDER = ("masks", "class_stats", "images")
RUN_ID_KEY = "segpipe.run_id"


def partition_path(output: str, table: str, run_date: dt.date, model: str) -> str:
    return f"{output.rstrip('/')}/{table}/run_date={run_date.isoformat()}/model={model}"


def shard_file(output: str, table: str, run_date: dt.date, model: str, shard_id: str) -> str:
    return f"{partition_path(output, table, run_date, model)}/part-{shard_id}.parquet"


def write_shards(batch: pa.Table, *, output: str, run_date: dt.date) -> pa.Table:
    """Ray Data batch function: rows of one shard's nested table rows for one run (columns
    ``shard_id``, ``run_id``, ``model``, ``stage_seconds`` and the tables) -> one summary row
    each (see :func:`shard_summary`, plus ``run_id`` and ``stage_seconds``, to which the
    seconds of writing are added as ``write``). Every file is stamped with its ``run_id`` in
    its Parquet metadata."""
    summaries = []
    for row in range(batch.num_rows):
        started = time.perf_counter()
        shard_id, run_id, model = (batch.column(name)[row].as_py() for name in ("shard_id", "run_id", "model"))
        tables = {name: unnest(batch.column(name)[row], schema) for name, schema in TABLE_SCHEMAS.items()}
        written = sum(
            write_object(
                shard_file(output, name, run_date, model, shard_id),
                _parquet_bytes(tables[name].replace_schema_metadata({RUN_ID_KEY: run_id})),
            )
            for name in WRITE_ORDER
        )
        summary = shard_summary(shard_id, tables["images"], tables["masks"], written)
        stages = with_stage_seconds(batch.column("stage_seconds")[row].as_py(), "write", time.perf_counter() - started)
        summaries.append({"run_id": run_id, **summary, "stage_seconds": stages})
    return pa.Table.from_pylist(summaries)


def shard_summary(shard_id: str, images: pa.Table, masks: pa.Table, bytes_written: int) -> dict:
    """``shard_id``, ``images``, ``ok``, ``bytes_written`` and the JSON objects ``errors``
    (error_type -> images) and ``masks`` (label -> masks) of one written shard."""
    statuses, error_types = images.column("status").to_pylist(), images.column("error_type").to_pylist()
    return {
        "shard_id": shard_id,
        "images": images.num_rows,
        "ok": statuses.count("ok"),
        "bytes_written": bytes_written,
        "errors": json.dumps(Counter(t for t in error_types if t is not None)),
        "masks": json.dumps(Counter(masks.column("label").to_pylist())),
    }


def written_shard_summary(output: str, run_date: dt.date, model: str, shard_id: str, run_id: str) -> dict | None:
    """The summary of a shard that run ``run_id`` already wrote completely, else ``None``.

    ``images`` is written last, so its presence with this run's stamp means all three files are there.
    """
    return retrying(
        lambda: _written_shard_summary(output, run_date, model, shard_id, run_id), f"checking shard {shard_id} in {output}"
    )


def shard_ids_written(output: str, run_date: dt.date, model: str) -> set[str]:
    """The shards whose ``images`` file is in the partition of ``run_date`` and ``model``, whichever
    run wrote them: one listing, where asking for each shard's file would take a request per shard."""
    return retrying(lambda: _shard_ids_written(output, run_date, model), f"listing the shards written to {output}")


def _shard_ids_written(output: str, run_date: dt.date, model: str) -> set[str]:
    fs, directory = listing_filesystem(partition_path(output, "images", run_date, model))
    try:  # a run of millions of images has a flat folder of thousands of shards here, listed in key ranges on S3
        names = [posixpath.basename(source.uri) for source in files_under(fs, directory)]
    except FileNotFoundError:
        return set()
    return {name.removeprefix("part-").removesuffix(".parquet") for name in names if name.startswith("part-") and name.endswith(".parquet")}


def _written_shard_summary(output: str, run_date: dt.date, model: str, shard_id: str, run_id: str) -> dict | None:
    fs, _ = fsspec.core.url_to_fs(output)
    paths = {name: fsspec.core.url_to_fs(shard_file(output, name, run_date, model, shard_id))[1] for name in WRITE_ORDER}
    try:
        stamp = (pq.read_schema(paths["images"], filesystem=fs).metadata or {}).get(RUN_ID_KEY.encode())
    except FileNotFoundError:
        return None
    if stamp != run_id.encode():
        return None
    return shard_summary(
        shard_id,
        pq.read_table(paths["images"], filesystem=fs, columns=["status", "error_type"]),
        pq.read_table(paths["masks"], filesystem=fs, columns=["label"]),
        sum(fs.size(path) for path in paths.values()),
    )


def remove_stale_shards(output: str, run_date: dt.date, model: str, run_id: str, keep: set[str]) -> int:
    """Delete the shards that an earlier attempt at run ``run_id`` wrote but that are not in
    ``keep`` (the input changed between the attempts), so no image is in the run twice.
    Other runs' files in the same partition stay. Returns how many shards were deleted."""
    return retrying(
        lambda: _remove_stale_shards(output, run_date, model, run_id, keep), f"removing stale shards of run {run_id}"
    )


def _remove_stale_shards(output: str, run_date: dt.date, model: str, run_id: str, keep: set[str]) -> int:
    fs = fsspec.core.url_to_fs(output)[0]
    candidates = [shard_id for shard_id in _shard_ids_written(output, run_date, model) if shard_id not in keep]

    def stamped_by_this_run(shard_id: str) -> bool:
        path = fsspec.core.url_to_fs(shard_file(output, "images", run_date, model, shard_id))[1]
        return (pq.read_schema(path, filesystem=fs).metadata or {}).get(RUN_ID_KEY.encode()) == run_id.encode()

    with ThreadPoolExecutor(max_workers=16) as pool:
        stale = [shard_id for shard_id, stale in zip(candidates, pool.map(stamped_by_this_run, candidates)) if stale]
    for shard_id in stale:
        for table in reversed(WRITE_ORDER):  # images first: without it the shard no longer counts as written
            try:
                fs.rm_file(fsspec.core.url_to_fs(shard_file(output, table, run_date, model, shard_id))[1])
            except FileNotFoundError:
                pass  # the attempt died before writing it
    return len(stale)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
