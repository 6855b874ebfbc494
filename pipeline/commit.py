"""Commit stage (driver): the run manifest ``{output}/_runs/<run_id>.json``, written last.

The manifest records the run's configuration, model, weights checksum, library versions,
shards with their counts and output files, totals and timings. It is written only after every
shard's files are, so its presence means the run is complete. ``_runs`` starts with an
underscore, which Hive-style readers skip when they glob the tables.

Next to it, ``_runs/<run_id>.sources.parquet`` lists every source (file, tar or Parquet file)
the run processed completely, with its size, version and image count: what ``--incremental``
runs consult to leave out what is already done, without reading any table.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq

from pipeline.listing import ProcessedSources, Shard
from pipeline.storage import read_object, retrying, write_object

_READ_THREADS = 16
SOURCES_SCHEMA = pa.schema(
    [("uri", pa.string()), ("size", pa.int64()), ("version", pa.string()), ("shard_id", pa.string()), ("images", pa.int64())]
)


def manifest_uri(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_runs/{run_id}.json"


def write_manifest(output: str, run_id: str, manifest: dict) -> dict:
    """Commit the run: write its manifest (with its own ``manifest_uri``); returns it as written."""
    uri = manifest_uri(output, run_id)
    text = json.dumps({**manifest, "manifest_uri": uri}, indent=2, sort_keys=True, default=str)
    write_object(uri, text.encode())
    return json.loads(text)


def sources_uri(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_runs/{run_id}.sources.parquet"


def write_sources(output: str, run_id: str, shards: list[Shard], images_per_shard: dict[str, int]) -> str:
    """Record the sources of ``shards`` for later ``--incremental`` runs; returns the file's URI.

    A loose file holds one image; a tar or Parquet file holds its shard's images. Containers
    cut short by ``--limit`` were not processed completely and are left out."""
    rows = [
        {**source.as_dict(), "shard_id": shard.shard_id, "images": 1 if shard.kind == "files" else images_per_shard[shard.shard_id]}
        for shard in shards
        if shard.max_images is None
        for source in shard.sources
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA), sink, compression="zstd")
    uri = sources_uri(output, run_id)
    write_object(uri, sink.getvalue().to_pybytes())
    return uri


def read_manifests(output: str) -> list[dict]:
    """Every committed run manifest under ``output``, oldest run date first, then in commit order."""
    fs, path = fsspec.core.url_to_fs(output)
    paths = retrying(lambda: fs.glob(f"{path}/_runs/*.json"), f"listing {output}/_runs")
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        found = list(pool.map(lambda manifest_path: json.loads(read_object(fs.unstrip_protocol(manifest_path))), paths))
    return sorted(found, key=lambda manifest: (manifest["config"]["run_date"], manifest.get("committed_at", ""), manifest["run_id"]))


def processed_sources(output: str, *, model: str, weights_sha256: str, preprocessing: dict, exclude_run_id: str) -> ProcessedSources:
    """The sources that committed runs of ``model`` with the same weights and preprocessing
    processed under ``output`` (the run ``exclude_run_id`` itself aside)."""
    preprocessing = json.loads(json.dumps(preprocessing))  # as a manifest holds it: tuples are lists
    fs, _ = fsspec.core.url_to_fs(output)
    matching = [
        manifest
        for manifest in read_manifests(output)
        if manifest.get("status") == "complete"
        and manifest["run_id"] != exclude_run_id
        and manifest["model"]["name"] == model
        and manifest["weights"]["sha256"] == weights_sha256
        and manifest["model"]["preprocessing"] == preprocessing
        and manifest.get("sources_uri")
    ]
    if not matching:
        return ProcessedSources(keys=pa.array([], pa.string()), images=pa.array([], pa.int64()), run_ids=())
    paths = [fsspec.core.url_to_fs(manifest["sources_uri"])[1] for manifest in matching]
    columns = ["uri", "size", "version", "images"]
    table = retrying(
        lambda: pa_dataset.dataset(paths, filesystem=fs, format="parquet", schema=SOURCES_SCHEMA).to_table(columns=columns),
        f"reading the sources of {len(paths)} earlier runs",
    )
    return ProcessedSources(
        keys=pc.binary_join_element_wise(table["uri"], pc.cast(table["size"], pa.string()), table["version"], "\t").combine_chunks(),
        images=table["images"].combine_chunks(),
        run_ids=tuple(sorted(manifest["run_id"] for manifest in matching)),
    )


def read_manifest(output: str, run_id: str) -> dict | None:
    """The committed manifest of ``run_id``, or ``None`` if that run never committed."""
    try:
        return json.loads(read_object(manifest_uri(output, run_id)))
    except FileNotFoundError:
        return None
