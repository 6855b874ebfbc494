"""Shared fixtures: a real S3 server (SeaweedFS), a real local Ray, and the test images.

The S3 server is started once per session on free loopback ports; its credentials and
endpoint are exported the standard way (AWS_* variables), before Ray starts, so that Ray's
workers find them exactly as they would on a cluster node.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
S3_ACCESS_KEY = "segpipe-test-access"
S3_SECRET_KEY = "segpipe-test-secret-f00d"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers), each worker and every process it starts
    gets a temporary directory of its own: Ray records the address of the last cluster started
    (``ray.cluster_utils.Cluster``) in ``$TMPDIR/ray/ray_current_cluster``, and a ``segpipe run``
    of the other worker would join that cluster instead of starting its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        directory = Path(f"/tmp/segpipe-{worker}")  # short: Ray's socket paths must fit in 107 bytes
        directory.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(directory)
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again


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


class SeaweedFS:
    """A SeaweedFS server (``weed mini``) on free loopback ports, storing under ``directory``;
    it can be stopped and started again on the same ports and data."""

    names = ("master", "volume", "filer", "s3", "webdav", "admin")
    grpc_names = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, directory: Path, identities: list[dict] | None = None) -> None:
        self.directory = directory
        self.identities = identities
        ports = _free_ports(len(self.names) + len(self.grpc_names))
        self.flags = [f"-{name}.port={port}" for name, port in zip(self.names, ports)]
        self.flags += [f"-{name}.port.grpc={port}" for name, port in zip(self.grpc_names, ports[len(self.names) :])]
        self.endpoint = f"http://127.0.0.1:{ports[self.names.index('s3')]}"
        self.log = directory / "weed.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        environment = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        flags = list(self.flags)
        if self.identities is not None:  # the test's own key is the admin, next to the identities given
            admin = {"name": "admin", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                     "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
            config = self.directory / "s3.json"
            config.write_text(json.dumps({"identities": [admin, *self.identities]}))
            flags.append(f"-s3.config={config}")
        with open(self.log, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    WEED, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags,
                    "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                ],
                stdout=log_file, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
            )  # fmt: skip
        _wait_for_s3(self.endpoint, self.process, self.log)

    def stop(self, *, grace_seconds: float = 20) -> None:
        """Stops the server, killing it if it has not stopped after ``grace_seconds``."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint; AWS_* variables point s3fs (and Ray workers) at it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        os.environ.update(server.environment())
        yield server.endpoint
    finally:
        server.stop(grace_seconds=2)  # the data is not read again; its shutdown sometimes hangs


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

    # "local": a new instance even if a `ray start` on this machine left its address in /tmp/ray
    ray.init(address="local", num_cpus=3, object_store_memory=1 << 30, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def private_s3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS server of this test's own, which the test may stop and start again; with
    ``@pytest.mark.parametrize("private_s3", [IDENTITIES], indirect=True)``, one that also
    knows those S3 identities (SeaweedFS's ``-s3.config`` format)."""
    directory = tmp_path / "seaweedfs"
    directory.mkdir()
    server = SeaweedFS(directory, getattr(request, "param", None))
    try:
        server.start()
        yield server
    finally:
        server.stop(grace_seconds=2)  # the data is not read again; its shutdown sometimes hangs
