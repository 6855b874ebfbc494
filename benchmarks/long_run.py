"""How many images a run needs for its end-to-end rate to reach a target, from a shorter run's figures.

A run that writes its first shard T0 seconds after it starts and then writes R images/s averages
N / (T0 + N / R) over N images: start-up decides short runs, and a target just under R needs a
long one. ``python -m benchmarks.long_run RESULT.json (--target-ips IPS | --target-model-ratio F)
--seconds-left S`` reads a :mod:`benchmarks.throughput` result (its ``count``,
``end_to_end_first_shard_seconds``, ``end_to_end_listing_seconds`` and ``end_to_end_steady_ips``)
and prints the image count, a multiple of 4096, that reaches the target with a margin, or 0 (and
the reason, on stderr) where the steady rate does not clear it or the run would not finish in S
seconds. ``benchmarks/gpu.sh`` uses it to size the long runs within the call that measured the
short ones, since a GPU machine's start costs minutes of a session's device time.

The driver's work before the pipeline starts grows with the image count (the listing, and Ray
Data's one block per shard, which costs about as much again: benchmarks/HISTORY.md, thirteenth
session), so T0 grows by twice the short run's listing seconds per image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

MARGIN = 1.03
"""The steady rate varies a few percent between runs: the count aims that much above the target."""

COUNT_STEP = 4096
"""Counts are rounded up to whole repeats of the benchmark corpus's distinct images."""


def images_needed(figures: dict, *, target_ips: float, seconds_left: float, overhead_seconds: float) -> tuple[int, str]:
    """The count whose run averages ``target_ips`` (times :data:`MARGIN`) end to end, and why, or 0
    and why not: the steady rate is not above it, or the run and ``overhead_seconds`` (Ray's
    start, the model alone, the corpus) would not fit in ``seconds_left``."""
    steady, first_shard = figures["end_to_end_steady_ips"], figures["end_to_end_first_shard_seconds"]
    goal = target_ips * MARGIN
    if not steady:
        return 0, "no steady rate: the run wrote its shards all at once (too few images?)"
    if steady <= goal:
        return 0, f"steady rate {steady:.0f} img/s does not clear {goal:.0f} (the target {target_ips:.0f} with a margin)"
    prelude_per_image = 2 * max(figures["end_to_end_listing_seconds"] or 0.0, 0.0) / figures["count"]
    spare_per_image = 1 / goal - 1 / steady - prelude_per_image
    if spare_per_image <= 0:
        return 0, f"the driver's work before the pipeline ({prelude_per_image * 1e6:.0f} us per image) outgrows what the steady rate gains"
    fixed = first_shard - prelude_per_image * figures["count"]
    count = max(COUNT_STEP, math.ceil(fixed / spare_per_image / COUNT_STEP) * COUNT_STEP)
    seconds = first_shard + prelude_per_image * (count - figures["count"]) + count / steady
    if seconds + overhead_seconds > seconds_left:
        return 0, f"{count} images would take about {seconds + overhead_seconds:.0f} s, more than the {seconds_left:.0f} s left"
    return count, (f"{count} images for {target_ips:.0f} img/s: first shard after about {first_shard:.1f} s, "
                   f"then {steady:.0f} img/s, about {seconds:.0f} s in all")  # fmt: skip


def best_model_only_ips(figures: dict) -> float:
    """The fastest model-only figure of the run: the pipeline's own and every variant timed."""
    return max([figures["model_only_ips"], *(figures.get("model_only_variants_ips") or {}).values()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("result", type=Path, help="a benchmarks.throughput --json result")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-ips", type=float, help="images/s end to end")
    target.add_argument("--target-model-ratio", type=float,
                        help="a share of the result's best model-only figure (0.9: 90%% of the model alone)")
    parser.add_argument("--seconds-left", type=float, required=True, help="what the run may take, its overhead included")
    parser.add_argument("--overhead-seconds", type=float, default=60.0,
                        help="the benchmark's time beside segpipe's run: Ray's start, the model alone, the corpus (default 60)")
    args = parser.parse_args(argv)
    text = args.result.read_text() if args.result.is_file() else ""
    if not text.strip():  # the short run stopped at its time limit before printing its figures
        print(f"no figures in {args.result}: its benchmark printed none (stopped at its time limit?)", file=sys.stderr)
        print(0)
        return
    figures = json.loads(text)
    target_ips = args.target_ips or args.target_model_ratio * best_model_only_ips(figures)
    count, reason = images_needed(figures, target_ips=target_ips, seconds_left=args.seconds_left,
                                  overhead_seconds=args.overhead_seconds)  # fmt: skip
    print(reason, file=sys.stderr)
    print(count)


if __name__ == "__main__":
    main()
