"""The model actors' Ray resources leave the read, encode and write tasks room on a small GPU
node: four actors sharing the GPU of a node of 4 CPUs used to take every CPU between them (an
actor that names no CPUs gets one anyway), and the run waited forever for its first read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.sample import shape_pngs


def test_on_a_node_of_four_cpus_and_one_gpu_the_default_actors_leave_the_tasks_half_the_cpus(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, png in shape_pngs(32, seed=2, size=128).items():
        (archive / name).write_bytes(png)
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("small_gpu_node_run.py")), str(archive), str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    for threads, run in runs.items():
        assert run["counts"]["images"] == run["counts"]["ok"] == 32, threads
        assert run["actors"] * run["resources"]["num_cpus"] <= 2, threads
    assert runs["1"]["actors"] == 4 and runs["4"]["actors"] == 1
