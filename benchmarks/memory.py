"""Does a run stream or accumulate? Peak memory of ``segpipe run`` at growing image counts.

``python -m benchmarks.memory --counts 500 2000 --size 320x240 [--model NAME] [--json]`` runs
``segpipe run`` once per count, each in a fresh process with its own local Ray, on photo-like
JPEGs (:mod:`benchmarks.corpus`), and samples the proportional set size (PSS: shared pages,
such as Ray's object store, counted once) of the whole process tree (driver, Ray's GCS,
raylet and workers) every half second. A streaming run's peak does not grow with the count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.corpus import parse_size, write_jpegs

_SAMPLE_SECONDS = 0.5


def tree_pss(root: psutil.Process) -> int:
    """Bytes of PSS of ``root`` and all its descendants (processes that vanish are skipped)."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def peak_memory(images: Path, output: Path, model: str) -> dict:
    """Peak PSS and wall time of one ``segpipe run`` over ``images``."""
    command = [str(Path(sys.executable).with_name("segpipe")), "run", "--input", str(images), "--output", str(output),
               "--model", model, "--weights", "random", "--run-date", "2026-01-01", "--max-error-rate", "1"]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_pss(root))
        time.sleep(_SAMPLE_SECONDS)
    if process.returncode != 0:
        raise RuntimeError(f"segpipe run exited {process.returncode}: {' '.join(command)}")
    return {"peak_pss_bytes": peak, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000], help="image counts (default 500 2000)")
    parser.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH", help="image size (default 320x240)")
    parser.add_argument("--model", default="lraspp_mobilenet_v3_large", help="registered model name")
    parser.add_argument("--workdir", type=Path, help="where the JPEGs and outputs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-memory-"))
    width, height = args.size
    runs = {}
    for count in args.counts:
        images = write_jpegs(workdir / f"images-{count}", count=count, width=width, height=height)
        runs[count] = peak_memory(images, workdir / f"out-{count}", args.model)
    smallest, largest = min(args.counts), max(args.counts)
    growth = runs[largest]["peak_pss_bytes"] / runs[smallest]["peak_pss_bytes"] - 1
    result = {"model": args.model, "size": f"{width}x{height}", "runs": runs, "growth": growth}
    if args.json:
        print(json.dumps(result))
        return
    for count, figures in runs.items():
        print(f"{count:6} images: peak {figures['peak_pss_bytes'] / 2**20:8.0f} MiB PSS, {figures['seconds']:.0f} s")
    print(f"peak grows {growth:+.1%} from {smallest} to {largest} images")


if __name__ == "__main__":
    main()
