"""Run by tests/test_faults.py in a process of its own: a Ray cluster of a head and two worker
nodes on this machine (``ray.cluster_utils.Cluster``); one segpipe run loses a worker node once
three shards are written, then a clean run follows on the surviving nodes.

Usage: ``python tests/multinode_run.py ARCHIVE OUTPUT``; prints a line ``RESULT {json}`` with the shards
written when the node was removed and both runs' counts.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from jobs.run import run
from pipeline.config import RunConfig


def main(archive: str, output: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 << 20})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=300 << 20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    written_at_kill: list[int] = []

    def remove_a_worker_node_part_way() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            written = len(list((output / "faulty" / "images").rglob("part-*.parquet")))
            if written >= 3:
                cluster.remove_node(workers[0])
                written_at_kill.append(written)
                return
            time.sleep(0.05)

    settings = {"input": archive, "model": "lraspp_mobilenet_v3_large", "weights": "random", "files_per_shard": 1,
                "run_date": dt.date(2026, 11, 22), "actors": 2}  # fmt: skip
    killer = threading.Thread(target=remove_a_worker_node_part_way)
    killer.start()
    faulty = run(RunConfig(output=str(output / "faulty"), **settings))
    killer.join()
    clean = run(RunConfig(output=str(output / "clean"), **{**settings, "actors": 1}))
    print("RESULT", json.dumps({"written_at_kill": written_at_kill, "faulty": faulty["counts"], "clean": clean["counts"]}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
