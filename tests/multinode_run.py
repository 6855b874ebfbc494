"""Run by tests/test_faults.py in a process of its own: a Ray cluster of a head and two worker
nodes on this machine (``ray.cluster_utils.Cluster``). One segpipe run loses its model actor's
process, a second loses a whole worker node, each once three shards are written; then a clean
run follows on the surviving nodes. Every run plans its CPU actors as segpipe does by default
(one on each of the largest nodes: once, a single actor asked for the whole cluster's CPUs less
one, which no node had, and waited forever). The runs' 16 shards reach Ray Data in 4 blocks of
4, as a run of 4,096 or more shards reaches it in blocks of several, so that losing a node loses
read tasks part-way through their shards.

Usage: ``python tests/multinode_run.py ARCHIVE OUTPUT``; writes the runs under
``OUTPUT/{actor_killed,node_lost,clean}`` and prints a line ``RESULT {json}`` with the actors
planned on the whole cluster, the shards written when each fault struck and each run's counts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import jobs.run
from jobs.run import plan_actors, run
from pipeline.config import RunConfig


def model_actor_pids() -> list[int]:
    """Processes whose title Ray set to the model actor's (``ray::MapWorker(...SegmentShards...)``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and "SegmentShards" in title:
                pids.append(int(entry.name))
    return pids


def run_with_fault(config: RunConfig, fault: Callable[[], None]) -> tuple[dict, int | None]:
    """``run(config)`` while ``fault()`` strikes once three shards are written; returns the
    manifest and how many shards were written when it struck."""
    images = Path(config.output) / "images"
    struck: list[int] = []

    def strike_part_way() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            written = len(list(images.rglob("part-*.parquet")))
            if written >= 3:
                fault()
                struck.append(written)
                return
            time.sleep(0.05)

    striker = threading.Thread(target=strike_part_way)
    striker.start()
    manifest = run(config)
    striker.join()
    return manifest, (struck[0] if struck else None)


def main(archive: str, output: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 << 20})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=300 << 20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    settings = {"input": archive, "model": "lraspp_mobilenet_v3_large", "weights": "random", "files_per_shard": 1,
                "run_date": dt.date(2026, 11, 22)}  # fmt: skip

    def kill_the_model_actors() -> None:
        for pid in model_actor_pids():
            os.kill(pid, signal.SIGKILL)

    jobs.run._INPUT_BLOCKS = 4
    report = {"plan": dataclasses.asdict(plan_actors(RunConfig(output=str(output / "plan"), **settings)))}
    for name, fault in (("actor_killed", kill_the_model_actors), ("node_lost", lambda: cluster.remove_node(workers[0]))):
        manifest, struck_at = run_with_fault(RunConfig(output=str(output / name), **settings), fault)
        report[name] = {"struck_at": struck_at, "counts": manifest["counts"]}
    clean = run(RunConfig(output=str(output / "clean"), **settings))
    report["clean"] = {"counts": clean["counts"]}
    print("RESULT", json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
