"""Shared fixtures: a real S3 server (SeaweedFS), a real local Ray, and the test images.

The S3 server is started once per session on free loopback ports; its credentials and
endpoint are exported the standard way (AWS_* variables), before Ray starts, so that Ray's
workers find them exactly as they would on a cluster node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
S3_ACCESS_KEY = "segpipe-test-access"
S3_SECRET_KEY = "segpipe-test-secret-f00d"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_s3(endpoint: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early:\n{log.read_text()[-3000:]}")
        try:
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=S3_ACCESS_KEY, secret=S3_SECRET_KEY, skip_instance_cache=True)
            bucket = f"probe-{uuid.uuid4().hex[:8]}"
            fs.mkdir(bucket)
            fs.pipe(f"{bucket}/probe", b"ok")
            fs.rm(bucket, recursive=True)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS did not answer on {endpoint} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint; AWS_* variables point s3fs (and Ray workers) at it."""
    data = tmp_path_factory.mktemp("seaweedfs")
    names = ["master", "volume", "filer", "s3", "webdav", "admin"]
    grpc_names = ["master", "volume", "filer", "s3", "admin"]
    ports = _free_ports(len(names) + len(grpc_names))
    flags = [f"-{name}.port={port}" for name, port in zip(names, ports)]
    flags += [f"-{name}.port.grpc={port}" for name, port in zip(grpc_names, ports[len(names) :])]
    environment = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    log = data / "weed.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                WEED, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags,
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            ],
            stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports[names.index('s3')]}"
    try:
        _wait_for_s3(endpoint, process, log)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID=S3_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY,
            AWS_DEFAULT_REGION="us-east-1",
        )
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def s3(s3_endpoint: str):
    """An s3fs filesystem on the test server."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def bucket(s3) -> Iterator[str]:
    """A fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    yield name
    s3.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """A local Ray instance started after the S3 variables are set, so its workers inherit them."""
    import ray

    ray.init(num_cpus=3, object_store_memory=1 << 30, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
