"""Write stage (CPU tasks): one shard row of table rows -> one Parquet file per table.

File names are a function of the shard alone,
``{output}/{table}/run_date={YYYY-MM-DD}/model={name}/part-{shard_id}.parquet``, so a retried
or resumed shard replaces its files instead of adding a copy. Each file is written as one
complete object (object stores: one upload, visible only once complete; local disks: a hidden
temporary file renamed into place), so a reader never sees half a file. ``images`` is written
last: once it exists, the shard's other two files are complete.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import TABLE_SCHEMAS, unnest
from pipeline.storage import write_object

# images last: its file marks the shard as written.
WRITE_ORDER = ("masks", "class_stats", "images")


def partition_path(output: str, table: str, run_date: dt.date, model: str) -> str:
    return f"{output.rstrip('/')}/{table}/run_date={run_date.isoformat()}/model={model}"


def shard_file(output: str, table: str, run_date: dt.date, model: str, shard_id: str) -> str:
    return f"{partition_path(output, table, run_date, model)}/part-{shard_id}.parquet"


def write_shards(batch: pa.Table, *, output: str, run_date: dt.date, model: str) -> pa.Table:
    """Ray Data batch function: shard rows of nested table rows -> one summary row per shard.

    Summary columns: ``shard_id``, ``images``, ``ok``, ``bytes_written`` and the JSON objects
    ``errors`` (error_type -> images) and ``masks`` (label -> masks).
    """
    summaries = []
    for row in range(batch.num_rows):
        shard_id = batch.column("shard_id")[row].as_py()
        tables = {name: unnest(batch.column(name)[row], schema) for name, schema in TABLE_SCHEMAS.items()}
        written = sum(
            write_object(shard_file(output, name, run_date, model, shard_id), _parquet_bytes(tables[name]))
            for name in WRITE_ORDER
        )
        images = tables["images"].to_pydict()
        summaries.append(
            {
                "shard_id": shard_id,
                "images": tables["images"].num_rows,
                "ok": images["status"].count("ok"),
                "bytes_written": written,
                "errors": json.dumps(Counter(t for t in images["error_type"] if t is not None)),
                "masks": json.dumps(Counter(tables["masks"].column("label").to_pylist())),
            }
        )
    return pa.Table.from_pylist(summaries)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
