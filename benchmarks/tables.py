"""Host time of the model actor's ``tables`` stage: one shard's class-map runs into Arrow.

``python -m benchmarks.tables [--images 64] [--runs 19000] [--size 1024x768] [--repeat 20] [--json]``
times what :class:`pipeline.infer.SegmentShards` does per shard once the runs are on the host:
:func:`pipeline.encode.results_table`, :func:`pipeline.schema.nest` and the shard row's
:func:`pipeline.schema.single_array`, in microseconds per image. A random-weight DeepLabV3
class map of a 1024x768 photo has about 19,000 runs; trained weights give far fewer. In an
actor of several threads this is host time that the threads share with launching kernels, so
it bounds the rate of a fast model such as lraspp.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.corpus import parse_size
from pipeline.encode import Runs, results_table
from pipeline.schema import nest, single_array


def shard_outputs(images: int, runs: int, width: int, height: int, *, seed: int = 0) -> list[tuple[str, str, Runs]]:
    """``(image_id, uri, runs)`` of ``images`` class maps of ``runs`` runs each over 21 classes."""
    rng = np.random.default_rng(seed)
    outputs = []
    for index in range(images):
        starts = np.sort(rng.choice(np.arange(1, width * height), runs - 1, replace=False))
        runs_of_map = Runs(np.append(0, starts).astype(np.int64), rng.integers(0, 21, runs).astype(np.int64), height, width)
        outputs.append((f"{index:016x}", f"s3://bucket/images/{index}.jpg", runs_of_map))
    return outputs


def tables_microseconds(outputs: list[tuple[str, str, Runs]], repeat: int) -> float:
    """Microseconds per image of the actor's tables stage for one shard's ``outputs`` (best of ``repeat``)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        single_array([nest(results_table(outputs))])
        best = min(best, time.perf_counter() - started)
    return best / len(outputs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per shard")
    parser.add_argument("--runs", type=int, default=19_000, help="runs per class map")
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the class maps")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = parse_size(args.size)
    microseconds = tables_microseconds(shard_outputs(args.images, args.runs, width, height), args.repeat)
    result = {"images": args.images, "runs": args.runs, "size": args.size, "tables_us_per_image": round(microseconds, 1)}
    summary = f"tables stage: {microseconds:.1f} us per image ({args.images} images of {args.runs} runs)"
    print(json.dumps(result) if args.json else summary)


if __name__ == "__main__":
    main()
