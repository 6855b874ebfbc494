"""``segpipe submit --wait``, ``status`` and ``logs`` against a real Ray head with its dashboard
(``ray start --head --block``, started here on free ports): the job runs to completion, its
tables are there, and its runtime_env carries no credential."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.query import query
from jobs.sample import encode, photos

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(s3_endpoint: str, tmp_path: Path) -> Iterator[str]:
    """The dashboard address of a one-node Ray cluster whose nodes hold the S3 credentials.

    Its own --temp-dir keeps its address out of /tmp/ray/ray_current_cluster, where a plain
    ``ray.init()`` in later tests would find it."""
    from jobs.submit import client

    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = _free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    environment["PATH"] = f"{Path(sys.executable).parent}:{environment['PATH']}"  # the nodes' python has segpipe's dependencies
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", f"--object-store-memory={512 << 20}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"],
        env=environment, stdout=open(tmp_path / "ray-head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((tmp_path / "ray-head.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            # an idle head stops in about 3 s; one that ran a job waits out grace periods (30 s).
            # Its processes share one process group, so none outlives the kill.
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_submitted_job_runs_to_completion_and_its_tables_are_there(ray_head: str, s3, bucket: str, capsys) -> None:
    from ray.job_submission import JobSubmissionClient

    for name, pixels in photos().items():
        s3.pipe(f"{bucket}/archive/{name}.jpg", encode(pixels[::4, ::4], "JPEG"))
    output = f"s3://{bucket}/results"
    code = main(["submit", "--address", ray_head, "--wait", "--input", f"s3://{bucket}/archive", "--output", output,
                 "--model", "lraspp_mobilenet_v3_large", "--weights", "random", "--run-date", "2026-11-24"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    job_id = printed.split("submitted job ")[1].split()[0]
    assert "images      4 in: 4 ok, 0 failed" in printed  # the job's own summary, streamed
    assert f"job {job_id}: SUCCEEDED" in printed
    rows = query(output, "SELECT count(*) AS images, any_value(run_date) AS day FROM images").to_pylist()
    assert rows == [{"images": 4, "day": dt.date(2026, 11, 24)}]

    assert main(["status", job_id, "--address", ray_head]) == 0
    assert f"job {job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", job_id, "--address", ray_head]) == 0
    assert "committed in" in capsys.readouterr().out

    info = JobSubmissionClient(ray_head).get_job_info(job_id)
    assert set(info.runtime_env) <= {"working_dir", "_ray_commit"}, info.runtime_env
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.runtime_env) + str(info.metadata) + info.entrypoint


def test_an_unreachable_cluster_is_one_line(capsys) -> None:
    assert main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segpipe: error: cannot reach a Ray cluster's job API at http://127.0.0.1:") and error.count("\n") == 1
