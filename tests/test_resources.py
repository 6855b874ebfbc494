"""The model actors' Ray resources on GPU clusters, with the actors' models on this machine's CPU
(tests/gpu_layout_run.py): on a small GPU node they leave the read, encode and write tasks room
(four actors sharing the GPU of a node of 4 CPUs used to take every CPU between them, since an
actor that names no CPUs gets one anyway, and the run waited forever for its first read); on a
cluster whose GPU nodes scale from zero, ``--gpus`` asks the autoscaler for them and waits. On
CPUs, an actor alone on its node runs torch on all of the node's CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from jobs.run import ActorPlan, gpu_actors_and_threads, plan_actors
from jobs.sample import shape_pngs
from models import get_model_spec, resolve_weights
from pipeline.config import RunConfig
from pipeline.infer import SegmentShards

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, png in shape_pngs(32, seed=2, size=128).items():
        (archive / name).write_bytes(png)
    return archive


def _layout_run(scenario: str, archive: Path, output: Path) -> dict:
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_layout_run.py")), scenario, str(archive), str(output)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def test_on_a_node_of_four_cpus_and_one_gpu_the_default_actors_leave_the_tasks_half_the_cpus(archive: Path, tmp_path: Path) -> None:
    runs = _layout_run("small-node", archive, tmp_path)
    actors_alone = runs.pop("actors alone")
    for threads, run in runs.items():
        assert run["counts"]["images"] == run["counts"]["ok"] == 32, threads
        assert run["actors"] * run["resources"]["num_cpus"] <= 2, threads
    assert runs["1"]["actors"] == 4 and runs["4"]["actors"] == 1
    assert (runs["None"]["actors"], runs["None"]["threads"]) == (1, 4)  # by default, one actor of four threads per GPU
    # --actors alone shares the GPU's four shards among them: --actors 4 is four actors of one thread
    assert {actors: plan["threads"] for actors, plan in actors_alone.items()} == {"2": 2, "4": 1, "8": 1}
    assert all(plan["actors"] * plan["resources"]["num_cpus"] <= 2 for plan in actors_alone.values())


@pytest.mark.parametrize(
    ("gpus", "actors", "threads", "expected"),
    [
        (1, None, None, (1, 4)),  # the default: one actor of four threads per GPU
        (8, None, None, (8, 4)),
        (1, 4, None, (4, 1)),  # --actors alone share the GPU's four shards
        (1, 2, None, (2, 2)),
        (1, 8, None, (8, 1)),
        (8, 1, None, (1, 4)),  # one actor has one GPU, and that GPU's four shards
        (1, None, 1, (4, 1)),  # --threads-per-actor alone: four shards per GPU
        (2, None, 3, (4, 3)),
        (1, 3, 2, (3, 2)),  # both given: as given
    ],
)
def test_gpu_actors_and_threads_share_four_shards_per_gpu_unless_both_are_given(
    gpus: int, actors: int | None, threads: int | None, expected: tuple[int, int]
) -> None:
    assert gpu_actors_and_threads(gpus, actors=actors, threads=threads) == expected


def test_gpus_are_asked_of_the_autoscaler_and_waited_for(archive: Path, tmp_path: Path) -> None:
    runs = _layout_run("from-zero", archive, tmp_path)
    # asked for before the listing, so that the nodes boot while it runs
    assert runs["none_joins"]["request_while_listing"] == runs["one_joins"]["request_while_listing"] == [{"GPU": 1}]
    assert runs["joins_while_listing"]["request_while_listing"] == [{"GPU": 1}] * 2
    for run in runs.values():
        assert run["request_after"] == []  # a floor the autoscaler keeps until replaced, so cleared, whether the GPUs came or not
    assert "none joined in 3 s" in runs["none_joins"]["error"] and "autoscaler's log" in runs["none_joins"]["error"]
    for name in ("one_joins", "joins_while_listing"):
        counts = runs[name]["counts"]
        assert counts["images"] == counts["ok"] == 32
        plan = runs[name]["plan"]
        assert plan["actors"] == 1 and plan["resources"]["num_gpus"] == 1  # planned on the GPU(s) that joined
    assert runs["one_joins"]["waited"] > 0
    assert runs["joins_while_listing"]["waited"] == 0  # the nodes' boot hid behind the listing


class _TorchThreads(SegmentShards):
    def torch_threads(self) -> int:
        return torch.get_num_threads()


@pytest.mark.usefixtures("ray_local")
def test_a_cpu_actor_alone_on_its_node_runs_torch_on_all_of_its_cpus(archive: Path, tmp_path: Path) -> None:
    config = RunConfig(input=str(archive), output=str(tmp_path), model="unet", weights="shapes", device="cpu")
    alone = plan_actors(config)  # the tests' Ray: one node of 3 CPUs
    assert alone == ActorPlan("cpu", actors=1, resources={"num_cpus": 2.0}, threads=1, cpu_threads=3)
    # actors that share the nodes' CPUs run torch on their own share
    assert plan_actors(config.model_copy(update={"actors": 2})) == ActorPlan("cpu", actors=2, resources={"num_cpus": 1.0}, threads=1, cpu_threads=1)
    weights = ray.put(resolve_weights(config.weights, get_model_spec(config.model)))
    settings = {"configs": [config], "run_ids": ["test"], "device": "cpu", "weights": [weights], "pipeline_started_at": time.time()}
    # the threads planned, whatever the CPUs the actor asked Ray for, but never more than the process may run on
    usable = len(os.sched_getaffinity(0))
    for cpu_threads, expected in ((2, min(2, usable)), (64, usable), (None, 1)):
        actor = ray.remote(num_cpus=1)(_TorchThreads).remote(**settings, cpu_threads=cpu_threads)
        assert ray.get(actor.torch_threads.remote()) == expected, cpu_threads
        ray.kill(actor)
