"""Commit stage (driver): the run manifest ``{output}/_runs/<run_id>.json``, written last.

The manifest records the run's configuration, model, weights checksum, library versions,
shards with their counts and output files, totals and timings. It is written only after every
shard's files are, so its presence means the run is complete. ``_runs`` starts with an
underscore, which Hive-style readers skip when they glob the tables.
"""

from __future__ import annotations

import json

from pipeline.storage import write_object


def manifest_uri(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_runs/{run_id}.json"


def write_manifest(output: str, run_id: str, manifest: dict) -> str:
    uri = manifest_uri(output, run_id)
    write_object(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return uri

