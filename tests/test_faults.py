"""Faults: a driver killed with SIGKILL part-way, then the same command again; on a three-node
Ray cluster (tests/multinode_run.py), a model actor killed and a worker node removed mid-run;
the S3 server stopped mid-run for less than segpipe's retries, and for longer (exit 3, then
the same command): each gives the tables of an undisturbed run, with no row twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from jobs.sample import encode, photos

pytestmark = pytest.mark.slow

SEGPIPE = str(Path(sys.executable).with_name("segpipe"))


def _command(archive: Path | str, output: Path | str) -> list[str]:
    return [SEGPIPE, "run", "--input", str(archive), "--output", str(output), "--model", "lraspp_mobilenet_v3_large",
            "--weights", "random", "--files-per-shard", "1", "--run-date", "2026-11-21"]  # fmt: skip


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}


def _photo_archive(directory: Path, *, copies: int) -> Path:
    """``copies`` x the four photos as distinct JPEG files (one shard each with --files-per-shard 1)."""
    directory.mkdir()
    for copy in range(copies):
        for name, pixels in photos().items():
            (directory / f"{copy}-{name}.jpg").write_bytes(encode(pixels, "JPEG", quality=70 + copy))
    return directory


def _rows(output: Path, table: str) -> list[tuple]:
    query = f"SELECT * EXCLUDE (run_id) FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)"
    return sorted(duckdb.sql(query).fetchall(), key=str)


def test_driver_killed_part_way_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    archive = _photo_archive(tmp_path / "archive", copies=4)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # the driver and the local Ray it started, as one process group: SIGKILL takes them all
    process = subprocess.Popen(_command(archive, killed), env=_environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    images = killed / "images"
    deadline = time.monotonic() + 240
    while len(list(images.rglob("part-*.parquet"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(images.rglob("part-*.parquet")))
    assert 3 <= written < 16 and not (killed / "_runs").exists(), "the kill must land part-way"
    resumed = subprocess.run(_command(archive, killed), env=_environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # A write task that was under way when the driver died may still land its shard: that one counts as written too.
    already = re.search(r"resumed     (\d+) of 16 shards were already written", resumed.stdout)
    assert already and written <= int(already.group(1)) < 16, resumed.stdout
    undisturbed = subprocess.run(_command(archive, clean), env=_environment(), capture_output=True, text=True, timeout=300)
    assert undisturbed.returncode == 0, undisturbed.stderr[-3000:]
    for table in ("images", "masks", "class_stats"):
        assert _rows(killed, table) == _rows(clean, table), table
    uris = [row[1] for row in _rows(killed, "images")]
    assert len(uris) == len(set(uris)) == 16


def test_s3_outages_mid_run_a_short_one_ridden_out_a_long_one_resumed_lose_nothing(private_s3, tmp_path: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=private_s3.endpoint, key=private_s3.environment()["AWS_ACCESS_KEY_ID"],
                           secret=private_s3.environment()["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)  # fmt: skip
    fs.mkdir("archive")
    fs.mkdir("results")
    fs.put(str(_photo_archive(tmp_path / "archive", copies=3)), "archive/photos", recursive=True)
    environment = {**_environment(), **private_s3.environment()}

    def stop_the_server_mid_run(output: str, environment: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(_command("s3://archive/photos", f"s3://results/{output}"), env=environment,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            fs.invalidate_cache()
            if len(fs.glob(f"results/{output}/images/**/part-*.parquet")) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the outage must land mid-run"
        private_s3.stop()
        return process

    process = stop_the_server_mid_run("outage", environment)
    time.sleep(2)  # down for that, plus the server's stop and restart
    private_s3.start()
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert "retrying in" in output, "the run must have met the outage"

    # an outage longer than the retries (3 s here): exit 3 and one line, wherever it struck; then the same command resumes
    process = stop_the_server_mid_run("long-outage", {**environment, "SEGPIPE_STORAGE_RETRY_SECONDS": "3"})
    output, _ = process.communicate(timeout=400)
    private_s3.start()
    assert process.returncode == 3, output[-3000:]
    assert re.search(r"^segpipe: error: .*: object storage still failing after \d+ s of retries .*rerun the same command", output, re.M)
    resumed = subprocess.run(_command("s3://archive/photos", "s3://results/long-outage"), env=environment,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already written by an interrupted attempt" in resumed.stdout

    clean = subprocess.run(_command("s3://archive/photos", "s3://results/clean"), env=environment,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-3000:]
    fs.invalidate_cache()
    connection = duckdb.connect()
    connection.register_filesystem(fs)
    for table in ("images", "masks", "class_stats"):
        rows = {
            name: sorted(connection.sql(f"SELECT * EXCLUDE (run_id) FROM read_parquet('s3://results/{name}/{table}/**/*.parquet')")
                         .fetchall(), key=str)
            for name in ("outage", "long-outage", "clean")
        }  # fmt: skip
        assert rows["outage"] == rows["long-outage"] == rows["clean"], table
    for name in ("outage", "long-outage"):
        query = f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('s3://results/{name}/images/**/*.parquet')"
        assert connection.sql(query).fetchall() == [(12, 12)]


def test_on_a_three_node_cluster_a_lost_actor_or_worker_node_costs_time_not_data(tmp_path: Path) -> None:
    import json

    archive = _photo_archive(tmp_path / "archive", copies=4)
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_run.py")), str(archive), str(tmp_path)],
                            env={**_environment(), "PYTHONPATH": str(Path(__file__).parents[1])},
                            capture_output=True, text=True, timeout=500)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    # a head of 1 CPU and two workers of 2: one actor on each worker, each leaving a CPU to the read and write tasks, torch on both
    assert report["plan"] == {"device": "cpu", "actors": 2, "resources": {"num_cpus": 1.0}, "threads": 1, "cpu_threads": 2}
    for faulty in ("actor_killed", "node_lost"):
        assert report[faulty]["struck_at"] is not None and report[faulty]["struck_at"] < 16, f"{faulty}: must strike part-way"
        assert report[faulty]["counts"]["images"] == report[faulty]["counts"]["ok"] == 16
        for table in ("images", "masks", "class_stats"):
            assert _rows(tmp_path / faulty, table) == _rows(tmp_path / "clean", table), (faulty, table)
