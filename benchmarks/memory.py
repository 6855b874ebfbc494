"""Does a run stream or accumulate? Peak memory of ``segpipe run`` at growing image counts.

``python -m benchmarks.memory --counts 500 2000 --size 320x240 [--model unet --weights shapes] [--json]`` runs
``segpipe run`` once per count, each in a fresh process with its own local Ray, on photo-like
JPEGs (:mod:`benchmarks.corpus`), and samples the proportional set size (PSS: shared pages,
such as Ray's object store, counted once) of the whole process tree (driver, Ray's GCS,
raylet and workers) every second. A streaming run's peak does not grow with the count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.corpus import parse_size, write_jpegs

_SAMPLE_SECONDS = 1.0


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def tree_pss(root: int) -> int:
    """Bytes of PSS of process ``root`` and all its descendants (Linux; vanished processes are skipped)."""
    parents = _parents()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


def peak_memory(images: Path, output: Path, model: str, weights: str) -> dict:
    """Peak PSS and wall time of one ``segpipe run`` over ``images``."""
    command = [str(Path(sys.executable).with_name("segpipe")), "run", "--input", str(images), "--output", str(output),
               "--model", model, "--weights", weights, "--run-date", "2026-01-01", "--max-error-rate", "1"]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_pss(process.pid))
        time.sleep(_SAMPLE_SECONDS)
    if process.returncode != 0:
        raise RuntimeError(f"segpipe run exited {process.returncode}: {' '.join(command)}")
    return {"peak_pss_bytes": peak, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000], help="image counts (default 500 2000)")
    parser.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH", help="image size (default 320x240)")
    parser.add_argument("--model", default="unet", help="registered model name (default: unet)")
    parser.add_argument("--weights", default="shapes", help="as segpipe run takes them (default: shapes, 128-pixel input: fast on CPUs)")
    parser.add_argument("--workdir", type=Path, help="where the JPEGs and outputs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segpipe-memory-"))
    width, height = args.size
    runs = {}
    for count in args.counts:
        images = write_jpegs(workdir / f"images-{count}", count=count, width=width, height=height)
        runs[count] = peak_memory(images, workdir / f"out-{count}", args.model, args.weights)
    smallest, largest = min(args.counts), max(args.counts)
    growth = runs[largest]["peak_pss_bytes"] / runs[smallest]["peak_pss_bytes"] - 1
    result = {"model": args.model, "weights": args.weights, "size": f"{width}x{height}", "runs": runs, "growth": growth}
    if args.json:
        print(json.dumps(result))
        return
    for count, figures in runs.items():
        print(f"{count:6} images: peak {figures['peak_pss_bytes'] / 2**20:8.0f} MiB PSS, {figures['seconds']:.0f} s")
    print(f"peak grows {growth:+.1%} from {smallest} to {largest} images")


if __name__ == "__main__":
    main()
