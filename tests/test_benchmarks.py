"""The benchmark harness runs end to end and reports what BENCHMARKS.md records (speed itself is
measured there, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks import actor_alone, corpus
from benchmarks.corpus import write_jpegs
from benchmarks.storage import measure_listing, measure_reading
from benchmarks.long_run import best_model_only_ips, images_needed, main as long_run_main
from benchmarks.memory import tree_pss
from benchmarks.tables import shard_outputs, tables_microseconds

ROOT = Path(__file__).resolve().parents[1]


def test_corpora_are_deterministic_photo_content(tmp_path: Path) -> None:
    first = write_jpegs(tmp_path / "a", count=3, width=160, height=120)
    second = write_jpegs(tmp_path / "b", count=3, width=160, height=120)
    assert [path.read_bytes() for path in sorted(first.iterdir())] == [path.read_bytes() for path in sorted(second.iterdir())]
    assert len({path.read_bytes() for path in first.iterdir()}) == 3


def test_large_corpora_repeat_their_distinct_images_as_hard_links(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "DISTINCT_IMAGES", 2)
    files = sorted(write_jpegs(tmp_path, count=5, width=32, height=24).iterdir())
    assert len(files) == 5 and len({path.stat().st_ino for path in files}) == 2
    assert files[4].read_bytes() == files[0].read_bytes()


def test_a_reused_folder_gives_exactly_the_images_asked_for(tmp_path: Path) -> None:
    larger = write_jpegs(tmp_path, count=5, width=32, height=24)
    smaller = write_jpegs(tmp_path, count=3, width=32, height=24)
    assert smaller == larger and len(list(smaller.iterdir())) == 3  # a run reads the whole folder
    other_size = write_jpegs(tmp_path, count=2, width=16, height=12)
    assert other_size != smaller and {Image.open(path).size for path in other_size.iterdir()} == {(16, 12)}


def test_tree_pss_counts_this_process() -> None:
    assert tree_pss(os.getpid()) > 10 << 20


def test_tables_benchmark_times_a_shard_of_the_runs_it_asks_for() -> None:
    outputs = shard_outputs(3, 50, 16, 12)
    assert [len(runs.starts) for _, _, runs in outputs] == [50] * 3
    assert all(runs.starts[0] == 0 and np.all(np.diff(runs.starts) > 0) and runs.starts[-1] < 16 * 12 for _, _, runs in outputs)
    assert tables_microseconds(outputs, repeat=1) > 0


def _throughput(model: str, workdir: Path, *flags: str) -> dict:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--model", model, "--weights", "shapes", "--corpus", "shapes",
         "--count", "8", "--size", "128x96", "--device", "cpu", "--files-per-shard", "4", "--workdir", str(workdir),
         "--json", *flags],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # nothing but the object: scripts pipe it


@pytest.mark.slow
def test_throughput_harness_prints_the_documented_keys(tmp_path: Path) -> None:
    # a reused --workdir: an earlier benchmark's output must be neither found committed nor taken for this run's
    stale = tmp_path / "segpipe-out" / "images" / "run_date=2026-01-01" / "model=unet" / "part-stale.parquet"
    stale.parent.mkdir(parents=True)
    pq.write_table(pa.table({"width": [5], "height": [5]}), stale)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    figures = _throughput("unet", tmp_path, "--actor-only")
    for key in ("model_only_ips", "model_step_ips", "class_maps_only_ips", "decode_only_ips", "actor_only_ips", "end_to_end_ips",
                "baseline_ips", "ratio_model", "ratio_model_step", "ratio_baseline", "bytes_per_image"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["ok_images"] == 8 and figures["raw_class_map_bytes_per_rle_byte"] > 1
    # the decoders beside segpipe's: its own from four threads at once, and torchvision's, which this torchvision still has
    assert set(figures["decode_only_variants_ips"]) == {"4 threads", "torchvision", "torchvision, 4 threads"}
    assert figures["segpipe_settings"] == {"files_per_shard": 4, "compile": "off", "actors": None, "threads_per_actor": None}
    assert figures["end_to_end_actors"]["threads"] == 1 and figures["end_to_end_actors"]["device"] == "cpu"  # segpipe's own plan
    # where the wait before the first shard went: the driver's listing, getting the actor up, then the shard's own stages
    assert 0 < figures["end_to_end_actors_ready_seconds"] < figures["end_to_end_first_shard_seconds"]
    assert 0 <= figures["end_to_end_listing_seconds"] < figures["end_to_end_first_shard_seconds"]
    assert set(figures["end_to_end_first_shard_stage_seconds"]) == set(figures["end_to_end_stage_seconds"])


@pytest.mark.slow
def test_throughput_harness_times_instance_models_as_the_pipeline_and_as_torchvision_run_them(tmp_path: Path) -> None:
    figures = _throughput("maskrcnn_mobilenet_v3_small_fpn", tmp_path)
    assert figures["model_only_ips"] > 0 and figures["torchvision_forward_ips"] > 0 and figures["model_step_ips"] is None
    assert figures["ok_images"] == 8 and figures["baseline_ips"] is None


@pytest.mark.usefixtures("ray_local")
def test_actor_alone_prints_a_line_per_layout_as_each_ends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    actor_alone.main(["--model", "unet", "--threads", "1", "2", "--count", "4", "--size", "64x48", "--batch-size", "2",
                      "--files-per-shard", "2", "--device", "cpu", "--workdir", str(tmp_path)])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["model"], line["threads"], line["images"]) for line in lines] == [("unet", 1, 4), ("unet", 2, 4)]
    assert all(line["ips"] > 0 for line in lines)


def test_a_long_run_is_sized_from_a_short_runs_start_up_and_steady_rate() -> None:
    short = {"count": 30000, "end_to_end_first_shard_seconds": 18.0, "end_to_end_listing_seconds": 0.6,
             "end_to_end_steady_ips": 2000.0, "model_only_ips": 2100.0}  # fmt: skip
    count, reason = images_needed(short, target_ips=1500, seconds_left=600, overhead_seconds=60)
    assert count % 4096 == 0, reason
    # the driver's work before the first shard grows with the count: twice the short run's listing per image
    prelude = 2 * 0.6 / 30000
    seconds = 18.0 + prelude * (count - 30000) + count / 2000
    assert 1500 * 1.03 <= count / seconds < 1500 * 1.03 * 1.05
    assert images_needed(short, target_ips=1990, seconds_left=600, overhead_seconds=60)[0] == 0  # not above it with the margin
    assert images_needed(short, target_ips=1500, seconds_left=100, overhead_seconds=60)[0] == 0  # no time for it
    variants = {**short, "model_only_variants_ips": {"fp32": 900.0, "bf16, folded batch norms": 2400.0}}
    assert best_model_only_ips(variants) == 2400.0 and best_model_only_ips(short) == 2100.0


def test_a_long_run_is_not_sized_from_a_short_run_that_printed_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "stopped.json").write_text("")  # gpu.sh's redirect of a benchmark stopped at its limit
    long_run_main([str(tmp_path / "stopped.json"), "--target-ips", "1500", "--seconds-left", "400"])
    printed = capsys.readouterr()
    assert printed.out == "0\n" and "printed none" in printed.err


def test_storage_benchmark_lists_and_reads_both_ways_behind_a_delay(s3_endpoint: str) -> None:
    (listed,) = measure_listing(s3_endpoint, ["40x2x3:hashed"], [0.01])
    assert listed["objects"] == 40 and listed["prefixes"] == "2x3" and listed["names"] == "hashed" and listed["delay_ms"] == 10
    assert min(listed["one_listing"], listed["prefixes_apart"], listed["segpipe"]) > 0.01  # every request waited
    (read,) = measure_reading(s3_endpoint, 4, [0.01])
    assert read["files"] == 4 and read["segpipe_connections"] > 0.01 and read["botocore_connections"] > 0.01
