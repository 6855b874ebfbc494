"""Run by tests/test_resources.py in a process of its own: ``segpipe run`` with the model actors
that segpipe plans for a Ray cluster's GPUs, in number and Ray resources, but with their model on
this machine's CPU, which is all it has.

Usage: ``python tests/gpu_layout_run.py SCENARIO ARCHIVE OUTPUT``; prints a line ``RESULT {json}``.

- ``small-node``: a local Ray that declares the smallest common GPU node (4 CPUs and one GPU, as
  AWS's g4dn.xlarge and g5.xlarge have); runs with segpipe's default threads per actor, with one
  and with four. Per run: the actors' plan and the run's counts; and the plans for two, four and
  eight actors with no threads named.
- ``from-zero``: a cluster of a CPU-only head (``ray.cluster_utils.Cluster``) and three runs
  that ask for GPUs: one for one GPU that waits 3 s with no GPU node coming (its error), one for
  one GPU whose node joins after the listing, during the wait, and one for two GPUs whose second
  node joins while the input lists. Per run: the autoscaler request seen as the listing started
  and left after the run, and the run's error, or its counts and seconds waited.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.cluster_utils import Cluster
from ray.experimental.internal_kv import _internal_kv_get

import jobs.run as run_module
from pipeline.config import RunConfig
from pipeline.errors import InputError

planned: dict[int | None, dict] = {}
"""threads_per_actor -> the actors (as :class:`jobs.run.ActorPlan`'s fields) that segpipe planned for the GPUs."""


def _plan_for_gpus_on_this_cpu() -> None:
    plan_for_gpus = run_module.plan_actors

    def plan_on_this_cpu(config: RunConfig) -> run_module.ActorPlan:
        plan = plan_for_gpus(config.model_copy(update={"device": "cuda"}))
        planned[config.threads_per_actor] = dataclasses.asdict(plan)
        return dataclasses.replace(plan, device="cpu")

    run_module.plan_actors = plan_on_this_cpu


def _config(archive: Path, output: Path, **settings: object) -> RunConfig:
    return RunConfig(input=str(archive), output=str(output), model="unet", weights="shapes", files_per_shard=4,
                     run_date=dt.date(2026, 11, 27), **settings)  # fmt: skip


def small_node(archive: Path, output: Path) -> dict:
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    result = {}
    for threads in (None, 1, 4):
        manifest = run_module.run(_config(archive, output / f"threads-{threads}", threads_per_actor=threads))
        result[str(threads)] = {**planned[threads], "counts": manifest["counts"]}
    # --actors alone: the GPU's four shards shared among them (planned only)
    result["actors alone"] = {actors: dataclasses.asdict(run_module.plan_actors(_config(archive, output, actors=actors))) for actors in (2, 4, 8)}
    return result


def _autoscaler_request() -> list[dict]:
    """What the (v1) autoscaler is asked to keep room for, as ``request_resources`` left it."""
    return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")


def from_zero(archive: Path, output: Path) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    ray.init(address=cluster.address, logging_level="WARNING")
    list_shards = run_module.list_shards
    result = {}
    runs = (("none_joins", 1, 3, None), ("one_joins", 1, 120, "after listing"), ("joins_while_listing", 2, 120, "while listing"))
    for name, gpus, wait, joins in runs:  # GPUs the run asks for, seconds it waits, when a node of one GPU joins
        outcome: dict = {}
        listing, listed = threading.Event(), threading.Event()

        def list_noting_the_request(*args: object, **kwargs: object) -> object:
            outcome["request_while_listing"] = _autoscaler_request()
            listing.set()
            if joins == "while listing":  # a listing that lasts until the node has joined
                while run_module._cluster_gpus() < gpus:
                    time.sleep(0.1)
            shards = list_shards(*args, **kwargs)
            listed.set()
            return shards

        def run_waiting_for_gpus() -> None:
            try:
                config = _config(archive, output / name, gpus=gpus, wait_for_gpus_seconds=wait, actors=1)
                manifest = run_module.run(config)
                outcome.update(counts=manifest["counts"], waited=manifest["timings"]["waited_for_gpus_seconds"], plan=planned[None])
            except InputError as error:
                outcome.update(error=str(error))
            finally:  # should the run have failed before or in its listing
                listing.set()
                listed.set()

        run_module.list_shards = list_noting_the_request
        # the run waits in a thread: Ray adds nodes from the main thread only
        running = threading.Thread(target=run_waiting_for_gpus)
        running.start()
        if joins is not None:
            (listing if joins == "while listing" else listed).wait()
            cluster.add_node(num_cpus=2, num_gpus=1)
        running.join()
        result[name] = {**outcome, "request_after": _autoscaler_request()}
    ray.shutdown()
    cluster.shutdown()
    return result


if __name__ == "__main__":
    scenario, archive, output = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    _plan_for_gpus_on_this_cpu()
    print("RESULT " + json.dumps({"small-node": small_node, "from-zero": from_zero}[scenario](archive, output)), flush=True)
