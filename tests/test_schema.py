"""Schemas: explicit, plain Arrow types, identical in every file, and shard rows round-trip."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import (
    ENCODED_IMAGE_SCHEMA,
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    TABLE_SCHEMAS,
    binary_views,
    nest,
    rows_to_table,
    unnest,
)
from pipeline.write import shard_file, write_shards

ARCHITECTURE_COLUMNS = {
    "images": "run_id image_id uri width height status error_type error_message n_masks",
    "masks": "run_id image_id uri kind class_id label score bbox_x1 bbox_y1 bbox_x2 bbox_y2 area height width mask_rle",
    "class_stats": "run_id image_id class_id label pixel_count pixel_fraction instance_count mean_score",
}


def test_tables_have_the_architecture_columns_in_plain_types() -> None:
    for table, columns in ARCHITECTURE_COLUMNS.items():
        schema = TABLE_SCHEMAS[table]
        assert set(columns.split()) <= set(schema.names)
        assert not any(isinstance(field.type, pa.ExtensionType) for field in schema)
        assert "run_date" not in schema.names and "model" not in schema.names  # Hive partition columns


def test_nest_round_trip_keeps_rows_and_empty_shards() -> None:
    rows = [
        {"image_id": "a", "uri": "s3://b/a.jpg", "size_bytes": 3, "data": b"abc", "error_type": None, "error_message": None},
        {"image_id": "b", "uri": "s3://b/b.jpg", "size_bytes": None, "data": None, "error_type": "read_error", "error_message": "gone"},
    ]
    cell = nest(rows_to_table(rows, ENCODED_IMAGE_SCHEMA))
    assert unnest(cell[0], ENCODED_IMAGE_SCHEMA).to_pylist() == rows
    empty = nest(ENCODED_IMAGE_SCHEMA.empty_table())
    assert unnest(empty[0], ENCODED_IMAGE_SCHEMA).schema == ENCODED_IMAGE_SCHEMA


def test_binary_views_give_each_value_without_copying_it() -> None:
    rows = [{"image_id": str(index), "uri": "", "size_bytes": None, "data": data, "error_type": None, "error_message": None}
            for index, data in enumerate([b"abc", None, b"", b"\xff\xd8\xff\xd9"])]  # fmt: skip
    shard = unnest(nest(rows_to_table(rows, ENCODED_IMAGE_SCHEMA))[0], ENCODED_IMAGE_SCHEMA).slice(1)
    column = pa.chunked_array([*shard.column("data").chunks, pa.array([b"q"], pa.large_binary())])
    views = binary_views(column)
    assert [None if view is None else bytes(view) for view in views] == [None, b"", b"\xff\xd8\xff\xd9", b"q"]
    assert all(isinstance(view.obj, pa.Buffer) for view in views if view is not None)  # the column's memory, not copies


def test_written_files_have_the_exact_schema_even_when_empty(tmp_path: Path) -> None:
    image = {"run_id": "r", "image_id": "i", "uri": "u", "shard_id": "s1", "size_bytes": 0, "status": "error",
             "error_type": "empty_file", "error_message": "the file is empty (0 bytes)", "n_masks": 0}  # fmt: skip
    batch = pa.table(
        {
            "shard_id": ["s1"],
            "run_id": ["r"],
            "model": ["m"],
            "stage_seconds": ['{"model": 0.0}'],
            "images": nest(rows_to_table([image], IMAGES_SCHEMA)),
            "masks": nest(MASKS_SCHEMA.empty_table()),
            "class_stats": nest(TABLE_SCHEMAS["class_stats"].empty_table()),
        }
    )
    date = dt.date(2026, 1, 2)
    summary = write_shards(batch, output=str(tmp_path), run_date=date).to_pylist()
    assert summary[0]["images"] == 1 and summary[0]["ok"] == 0 and summary[0]["run_id"] == "r"
    for table, schema in TABLE_SCHEMAS.items():
        path = shard_file(str(tmp_path), table, date, "m", "s1")
        assert path.endswith(f"/{table}/run_date=2026-01-02/model=m/part-s1.parquet")
        written = pq.read_schema(path)
        assert written.equals(schema) and written.metadata[b"segpipe.run_id"] == b"r"
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind
