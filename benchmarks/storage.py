"""An object store behind a round trip per request: listing an input, and reading a shard of loose files.

``python -m benchmarks.storage [--endpoint URL] [--layouts 20000x40,36000x3x12,20000x1,20000x1:hashed] [--shard-files 256]
[--delays 0,0.025,0.1] [--json]``
puts a TCP proxy in front of the S3 endpoint that holds every request DELAY seconds, the round
trip that a store on loopback lacks (credentials from the AWS_* variables; without
``--endpoint``, a SeaweedFS server of its own, started as the tests start one), and measures,
best of two each:

- **listing**: per layout OBJECTSxPREFIXES[xSUBPREFIXES][:hashed], that many one-byte ``.jpg``
  objects spread over that many prefixes (and SUBPREFIXES under each, as months under years),
  named by number (``00001234.jpg``) or, with ``:hashed``, by a hash of it, listed
  with fsspec's ``find`` as one listing, prefix by prefix (:func:`pipeline.listing.files_under`),
  and as segpipe lists an input (the same, on :func:`pipeline.storage.listing_filesystem`'s
  client), after checking that each found every object; a store answers a listing 1,000 keys
  at a time, one request after another, and segpipe lists a prefix of many pages in key ranges at once;
- **reading**: a shard of ``--shard-files`` 1024x768 photo JPEGs read by segpipe's read stage
  (:func:`pipeline.read.read_shards`, which fetches a shard's files at once) with segpipe's
  S3 connections per client (:data:`pipeline.storage.S3_CONNECTIONS`) and with botocore's 10.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import fsspec
import pyarrow as pa
import s3fs

from benchmarks.corpus import write_jpegs
from pipeline.listing import files_under, list_shards
from pipeline.read import read_shards
from pipeline.storage import S3_CONNECTIONS, listing_filesystem


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(1 << 16):
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _serve_proxy(target_host: str, target_port: int, delay: float, ports: multiprocessing.Queue) -> None:
    """Forward connections to ``target_host:target_port``, holding what clients send ``delay`` seconds."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        await asyncio.gather(_pump(client_reader, server_writer, delay), _pump(server_reader, client_writer, 0.0))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


@contextmanager
def delaying_proxy(endpoint: str, delay: float) -> Iterator[str]:
    """An endpoint that reaches ``endpoint`` with ``delay`` seconds added to every request."""
    host, _, port = endpoint.removeprefix("http://").partition(":")
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_serve_proxy, args=(host, int(port), delay, ports), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=60)}"
    finally:
        process.kill()
        process.join()


def measure_listing(endpoint: str, layouts: list[str], delays: list[float]) -> list[dict]:
    """Seconds to list each layout (``OBJECTSxPREFIXES[xSUBPREFIXES][:hashed]``) at each delay, as one listing and prefix by prefix."""
    writer = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint)
    roots = {}
    for layout in layouts:
        counts, _, names = layout.partition(":")
        objects, prefixes, subprefixes = (*map(int, counts.split("x")), 1)[:3]
        bucket = f"listing-{uuid.uuid4().hex[:12]}"
        writer.mkdir(bucket)

        def name(index: int) -> str:
            return hashlib.blake2b(str(index).encode(), digest_size=8).hexdigest() if names == "hashed" else f"{index:08d}"

        keys = [f"p{index % prefixes:04d}/s{index // prefixes % subprefixes:04d}/{name(index)}.jpg" for index in range(objects)]
        writer.pipe({f"{bucket}/in/{key}": b"x" for key in keys}, batch_size=256)
        roots[layout] = f"{bucket}/in"
    rows = []
    for delay in delays:
        with delaying_proxy(endpoint, delay) as delayed, _s3_clients(delayed, S3_CONNECTIONS):
            fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=delayed)
            for layout, root in roots.items():
                counts, _, names = layout.partition(":")
                objects, *prefixes = map(int, counts.split("x"))
                seconds = {"one_listing": float("inf"), "prefixes_apart": float("inf"), "segpipe": float("inf")}
                for _ in range(2):
                    for way, list_files in (("one_listing", lambda: fs.find(root, detail=True).values()),
                                            ("prefixes_apart", lambda: files_under(fs, root)),
                                            ("segpipe", lambda: files_under(*listing_filesystem(f"s3://{root}")))):  # fmt: skip
                        fs.invalidate_cache()
                        started = time.perf_counter()
                        found = list(list_files())
                        seconds[way] = min(seconds[way], time.perf_counter() - started)
                        assert len(found) == objects, (way, len(found), objects)
                rows.append({"objects": objects, "prefixes": "x".join(map(str, prefixes)), "names": names or "numbered",
                             "delay_ms": delay * 1000, **seconds})  # fmt: skip
    for root in roots.values():
        writer.rm(root.split("/")[0], recursive=True)
    return rows


@contextmanager
def _s3_clients(endpoint: str, connections: int) -> Iterator[None]:
    """The S3 clients that segpipe's stages make go to ``endpoint`` and keep at most
    ``connections`` connections open (botocore's ``max_pool_connections``)."""
    settings = fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})
    saved_settings, saved_endpoint = dict(settings), os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"], settings["max_pool_connections"] = endpoint, connections
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        settings.clear()
        settings.update(saved_settings)
        if saved_endpoint is None:
            del os.environ["AWS_ENDPOINT_URL"]
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved_endpoint
        s3fs.S3FileSystem.clear_instance_cache()


def measure_reading(endpoint: str, files: int, delays: list[float]) -> list[dict]:
    """Seconds to read a shard of ``files`` photo JPEGs at each delay, with segpipe's S3 connections and botocore's."""
    bucket = f"reading-{uuid.uuid4().hex[:12]}"
    writer = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint)
    writer.mkdir(bucket)
    photos = sorted(write_jpegs(Path(tempfile.mkdtemp(prefix="segpipe-storage-")), count=16, width=1024, height=768).iterdir())
    writer.pipe({f"{bucket}/in/{index:06d}.jpg": photos[index % len(photos)].read_bytes() for index in range(files)})
    with _s3_clients(endpoint, S3_CONNECTIONS):
        shard = pa.table({"shard": [list_shards(f"s3://{bucket}/in", files_per_shard=files).shards[0].to_json()]})
    rows = []
    for delay in delays:
        with delaying_proxy(endpoint, delay) as delayed:
            seconds = {}
            for name, connections in (("segpipe_connections", S3_CONNECTIONS), ("botocore_connections", 10)):
                with _s3_clients(delayed, connections):
                    seconds[name] = min(_timed(lambda: read_shards(shard, image_column="image")) for _ in range(2))
            rows.append({"files": files, "delay_ms": delay * 1000, **seconds})
    writer.rm(bucket, recursive=True)
    return rows


def _timed(operation: Callable[[], object]) -> float:
    started = time.perf_counter()
    operation()
    return time.perf_counter() - started


@contextmanager
def _own_server() -> Iterator[str]:
    from tests.conftest import SeaweedFS  # the tests' server: weed mini on free loopback ports

    server = SeaweedFS(Path(tempfile.mkdtemp(prefix="segpipe-listing-")))
    server.start()
    os.environ.update(server.environment())
    try:
        yield server.endpoint
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--endpoint", help="an S3 endpoint (default: a SeaweedFS server of its own)")
    parser.add_argument("--layouts", default="20000x40,36000x3x12,20000x1,20000x1:hashed",
                        help="OBJECTSxPREFIXES[xSUBPREFIXES][:hashed], comma-separated")
    parser.add_argument("--shard-files", type=int, default=256, help="files in the shard read (default 256, segpipe's)")
    parser.add_argument("--delays", default="0,0.025,0.1", help="seconds added to each request, comma-separated")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    delays = [float(delay) for delay in args.delays.split(",")]
    with _own_server() if args.endpoint is None else nullcontext(args.endpoint) as endpoint:
        listing, reading = measure_listing(endpoint, layouts, delays), measure_reading(endpoint, args.shard_files, delays)
    if args.json:
        print(json.dumps({"listing": listing, "reading": reading}))
        return
    for row in listing:
        print(f"{row['objects']} objects in {row['prefixes']} prefixes ({row['names']} names), {row['delay_ms']:.0f} ms per request: "
              f"one listing {row['one_listing']:.2f} s, prefixes apart {row['prefixes_apart']:.2f} s, "
              f"as segpipe lists {row['segpipe']:.2f} s")  # fmt: skip
    for row in reading:
        print(f"a shard of {row['files']} photos, {row['delay_ms']:.0f} ms per request: read in "
              f"{row['segpipe_connections']:.2f} s with {S3_CONNECTIONS} connections, "
              f"{row['botocore_connections']:.2f} s with 10")


if __name__ == "__main__":
    main()
