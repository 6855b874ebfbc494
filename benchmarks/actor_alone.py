"""segpipe's model actor alone in several layouts: images/s per number of threads per actor.

    python -m benchmarks.actor_alone --model lraspp_mobilenet_v3_large --threads 1 4 8 --count 2048 --device cuda

Each layout is :func:`benchmarks.throughput.actor_only` (the actor fed shards already in the
object store, after one warm-up shard per thread) on one corpus of photo JPEGs (1024x768 unless
``--size`` says otherwise), in one Ray instance; each prints one JSON line as it ends, so a time limit keeps the layouts before it.
It finds what holds an actor below its network: threads that do not raise the rate say that
something in the actor is serial. It uses only what the harness has offered since commit
``aa1676d``, so a copy of this file in an older tree times that tree's actor on the same machine
(HISTORY.md, twenty-third session: the bisect of lraspp's actor)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import throughput
from benchmarks.corpus import parse_size, write_jpegs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="threads per actor, one layout each")
    parser.add_argument("--count", type=int, default=2048, help="images (the actor alone takes up to 2048)")
    parser.add_argument("--size", type=parse_size, default=(1024, 768), help="WxH of the JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--files-per-shard", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"), help="JPEGs already there are reused")
    args = parser.parse_args(argv)
    width, height = args.size
    images = write_jpegs(args.workdir / "images", count=args.count, width=width, height=height)
    throughput.ensure_ray()
    for threads in args.threads:
        settings = {"files_per_shard": args.files_per_shard, "compile": "off", "threads_per_actor": threads}
        figures = throughput.actor_only(images, args.model, args.weights, device=args.device, batch_size=args.batch_size,
                                        settings=settings, profile=False)  # fmt: skip
        print(json.dumps({"model": args.model, **figures}), flush=True)


if __name__ == "__main__":
    main()
