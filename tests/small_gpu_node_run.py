"""Run by tests/test_resources.py in a process of its own: a local Ray that declares the smallest
common GPU node (4 CPUs and one GPU, as AWS's g4dn.xlarge and g5.xlarge have), and ``segpipe run``
with the model actors that segpipe plans for that node, in number and Ray resources, but with
their model on this machine's CPU, which is all it has.

Usage: ``python tests/small_gpu_node_run.py ARCHIVE OUTPUT``; runs once with one thread per actor
and once with four, and prints a line ``RESULT {json}``: per run, the actors' resources and the
run's counts.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import ray

import jobs.run as run_module
from pipeline.config import RunConfig


def main(archive: Path, output: Path) -> None:
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    plan_for_gpus = run_module._plan_actors
    planned: dict[int, tuple[int, dict]] = {}

    def plan_on_this_cpu(config: RunConfig) -> tuple[str, int, dict]:
        _, actors, resources = plan_for_gpus(config.model_copy(update={"device": "cuda"}))
        planned[config.threads_per_actor] = (actors, resources)
        return "cpu", actors, resources

    run_module._plan_actors = plan_on_this_cpu
    result = {}
    for threads in (1, 4):
        manifest = run_module.run(RunConfig(input=str(archive), output=str(output / f"threads-{threads}"), model="unet",
                                            weights="shapes", files_per_shard=4, threads_per_actor=threads,
                                            run_date=dt.date(2026, 11, 27)))  # fmt: skip
        actors, resources = planned[threads]
        result[threads] = {"actors": actors, "resources": resources, "counts": manifest["counts"]}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
