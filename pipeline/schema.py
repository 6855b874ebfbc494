"""Explicit Arrow schemas: the three output tables and the shard rows passed between stages.

Every Parquet file of a table has exactly its schema here, whatever a shard holds (an all-error
shard writes an empty ``masks`` file with the same columns). Plain Arrow types only, so
DuckDB, pandas, Polars and Spark read the tables with no segpipe code. The Hive partition
columns ``run_date`` and ``model`` live in the path, not in the files.

Between stages a shard travels as one row whose list<struct> columns hold its per-image rows:
Ray Data may split or merge blocks, but never a row, so a shard is never torn apart.
"""

from __future__ import annotations

import json

import pyarrow as pa

IMAGES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("shard_id", pa.string()),
        ("size_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("n_masks", pa.int32()),
    ]
)

MASKS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("mask_index", pa.int32()),
        ("kind", pa.string()),
        ("class_id", pa.int32()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("bbox_x1", pa.float32()),
        ("bbox_y1", pa.float32()),
        ("bbox_x2", pa.float32()),
        ("bbox_y2", pa.float32()),
        ("area", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_rle", pa.string()),
    ]
)

CLASS_STATS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("class_id", pa.int32()),
        ("label", pa.string()),
        ("pixel_count", pa.int64()),
        ("pixel_fraction", pa.float64()),
        ("instance_count", pa.int32()),
        ("mean_score", pa.float32()),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES_SCHEMA,
    "masks": MASKS_SCHEMA,
    "class_stats": CLASS_STATS_SCHEMA,
}

# One input image as the read stage hands it to the model actors: compressed bytes, or why not.
ENCODED_IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("size_bytes", pa.int64()),
        ("data", pa.large_binary()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
    ]
)


# One ok image's model output as the actors hand it to the encode stage: the column-major runs
# of its class map (semantic models) or of each instance mask, concatenated (``runs_per_map``:
# how many runs each map has; null for semantic and detection models), and for instance and
# detection models its kept detections (``boxes``: x1, y1, x2, y2 of each, flattened; null for
# semantic models) and the pixels of each class's union of masks or boxes.
RESULTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("run_starts", pa.large_list(pa.int64())),
        ("run_values", pa.large_list(pa.int64())),
        ("runs_per_map", pa.large_list(pa.int64())),
        ("boxes", pa.large_list(pa.float32())),
        ("labels", pa.large_list(pa.int64())),
        ("scores", pa.large_list(pa.float32())),
        ("class_ids", pa.large_list(pa.int64())),
        ("class_pixels", pa.large_list(pa.int64())),
    ]
)


def nest(table: pa.Table) -> pa.Array:
    """A one-element list<struct> array holding all rows of ``table`` (one cell of a shard row),
    on ``table``'s buffers where it is in one chunk."""
    return pa.LargeListArray.from_arrays(pa.array([0, table.num_rows], type=pa.int64()), single_array(table.to_struct_array()))


def single_array(arrays: pa.ChunkedArray | list[pa.Array]) -> pa.Array:
    """The arrays as one: the only one as it is (Arrow's concatenation copies even one), more
    concatenated."""
    if isinstance(arrays, pa.ChunkedArray):
        return arrays.chunk(0) if arrays.num_chunks == 1 else arrays.combine_chunks()
    return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)


def unnest(cell: pa.Scalar, schema: pa.Schema) -> pa.Table:
    """The rows of one list<struct> cell made by :func:`nest`, as a table with ``schema``."""
    values = cell.values
    if values is None or len(values) == 0:
        return schema.empty_table()
    return pa.Table.from_struct_array(values).cast(schema)


def binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """The values of a ``large_binary`` column as views of the column's own data buffer (``None``
    for nulls): ``to_pylist`` copies each value into a new ``bytes`` object, 100 KB and more for
    an image, where a view costs nothing. The views keep the buffer (in the object store, say) alive."""
    views: list[memoryview | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        bounds = memoryview(offsets).cast("q")[chunk.offset : chunk.offset + len(chunk) + 1].tolist()
        values = memoryview(data if data is not None else b"").cast("B")
        valid = chunk.is_valid().to_pylist()
        views += [values[start:end] if ok else None for start, end, ok in zip(bounds, bounds[1:], valid)]
    return views


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def with_stage_seconds(stage_seconds: str, stage: str, seconds: float) -> str:
    """A shard row's ``stage_seconds`` (a JSON object of seconds per stage, which each stage
    after the actors adds to) with ``stage``'s ``seconds``."""
    return json.dumps(json.loads(stage_seconds) | {stage: round(seconds, 4)})
