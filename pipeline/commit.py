"""Commit stage (driver): the run manifest ``{output}/_runs/<run_id>.json``, written last.

The manifest records the run's configuration, model, weights checksum, library versions,
shards with their counts and output files, totals and timings. It is written only after every
shard's files are, so its presence means the run is complete. ``_runs`` starts with an
underscore, which Hive-style readers skip when they glob the tables.
"""

from __future__ import annotations

import json

import fsspec

from pipeline.storage import write_object


def manifest_uri(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_runs/{run_id}.json"


def write_manifest(output: str, run_id: str, manifest: dict) -> dict:
    """Commit the run: write its manifest (with its own ``manifest_uri``); returns it as written."""
    uri = manifest_uri(output, run_id)
    text = json.dumps({**manifest, "manifest_uri": uri}, indent=2, sort_keys=True, default=str)
    write_object(uri, text.encode())
    return json.loads(text)



def read_manifest(output: str, run_id: str) -> dict | None:
    """The committed manifest of ``run_id``, or ``None`` if that run never committed."""
    fs, path = fsspec.core.url_to_fs(manifest_uri(output, run_id))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
