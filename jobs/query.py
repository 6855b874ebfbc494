"""``segpipe query OUTPUT "SQL"``: DuckDB over a segpipe output, with its tables as views.

Views ``images``, ``masks`` and ``class_stats`` read every Parquet file of the table with the
Hive partitions ``run_date`` (DATE) and ``model`` as columns; ``runs`` holds one row per
committed run manifest. Reading goes through fsspec (DuckDB's ``register_filesystem``), so
``s3://`` and other object stores work with the same credentials as ``segpipe run`` and no
DuckDB extension.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.commit import read_manifests
from pipeline.errors import InputError
from pipeline.schema import TABLE_SCHEMAS
from pipeline.storage import absolute_uri, retrying

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_date", pa.date32()),
        ("model", pa.string()),
        ("task", pa.string()),
        ("input", pa.string()),
        ("weights_source", pa.string()),
        ("weights_sha256", pa.string()),
        ("images", pa.int64()),
        ("ok", pa.int64()),
        ("error", pa.int64()),
        ("errors_by_type", pa.string()),
        ("masks", pa.int64()),
        ("bytes_written", pa.int64()),
        ("seconds", pa.float64()),
        ("images_per_second", pa.float64()),
        ("skipped_images", pa.int64()),
        ("manifest_uri", pa.string()),
    ]
)


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``images``, ``masks``, ``class_stats`` and ``runs`` of ``output``."""
    output = absolute_uri(output)
    fs, root = fsspec.core.url_to_fs(output)
    if not retrying(lambda: fs.exists(root), f"opening {output}"):
        raise InputError(f"no segpipe output at {output}")
    connection = duckdb.connect()
    if not isinstance(fs, LocalFileSystem):
        connection.register_filesystem(fs)
    location = output if not isinstance(fs, LocalFileSystem) else root
    for table, schema in TABLE_SCHEMAS.items():
        try:  # DuckDB lists the files as it makes the view (a listing of our own first would double that)
            connection.sql(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{location}/{table}/*/*/*.parquet', "
                "hive_partitioning = true, hive_types = {'run_date': DATE, 'model': VARCHAR})"
            )
        except duckdb.IOException as error:
            if "No files found" not in str(error):
                raise
            # no run wrote this table yet: an empty view with its columns
            empty = schema.empty_table().append_column("run_date", pa.array([], pa.date32())).append_column("model", pa.array([], pa.string()))
            connection.register(f"_{table}_empty", empty)
            connection.sql(f"CREATE VIEW {table} AS SELECT * FROM _{table}_empty")
    connection.register("_runs_table", runs_table(output))
    connection.sql("CREATE VIEW runs AS SELECT * FROM _runs_table")
    return connection


def runs_table(output: str) -> pa.Table:
    rows = []
    for manifest in read_manifests(output):
        counts, seconds = manifest["counts"], manifest["timings"]["seconds"]
        rows.append(
            {
                "run_id": manifest["run_id"],
                "run_date": dt.date.fromisoformat(manifest["config"]["run_date"]),
                "model": manifest["model"]["name"],
                "task": manifest["model"]["task"],
                "input": manifest["config"]["input"],
                "weights_source": manifest["weights"]["source"],
                "weights_sha256": manifest["weights"]["sha256"],
                "images": counts["images"],
                "ok": counts["ok"],
                "error": counts["error"],
                "errors_by_type": json.dumps(counts["errors_by_type"]),
                "masks": counts["masks"],
                "bytes_written": counts["bytes_written"],
                "seconds": seconds,
                "images_per_second": counts["images"] / seconds if seconds else None,
                "skipped_images": (manifest.get("skipped") or {}).get("images", 0),
                "manifest_uri": manifest["manifest_uri"],
            }
        )
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def query(output: str, sql: str) -> pa.Table:
    """The result of ``sql`` over ``output``'s views, as an Arrow table."""
    connection = connect(output)
    try:
        return connection.sql(sql).fetch_arrow_table()
    except duckdb.Error as error:
        raise InputError(f"query failed: {str(error).splitlines()[0]}") from None


def render(table: pa.Table, output_format: str) -> bytes:
    """``table`` as an aligned text table, CSV, a JSON array of objects, or Parquet bytes."""
    if output_format == "csv":
        sink = io.BytesIO()
        pa_csv.write_csv(table, sink)
        return sink.getvalue()
    if output_format == "json":
        return (json.dumps(table.to_pylist(), default=str, indent=1) + "\n").encode()
    if output_format == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    return _aligned(table).encode()


def _aligned(table: pa.Table) -> str:
    cells = [[_cell(value) for value in row.values()] for row in table.to_pylist()]
    header = table.column_names
    widths = [max([len(name), *(len(row[column]) for row in cells)]) for column, name in enumerate(header)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write(table: pa.Table, output_format: str, out: str | None) -> None:
    data = render(table, output_format)
    if out is None:
        if output_format == "parquet" and sys.stdout.isatty():
            raise InputError("--format parquet writes binary: give --out FILE or redirect stdout")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        with fsspec.open(out, "wb") as file:
            file.write(data)
