"""Rerunning a run: a committed run does nothing, an interrupted one does only what is missing,
--force redoes everything, and --max-error-rate fails a committed run with too many errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pytest

from jobs.cli import main
from jobs.run import run
from jobs.sample import encode, photos, truncated_jpeg
from jobs.summary import format_summary
from pipeline.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    directory.mkdir()
    for index, (name, pixels) in enumerate(photos().items()):
        for copy in range(2):
            (directory / f"{index}-{copy}-{name}.jpg").write_bytes(encode(pixels[::4, ::4], "JPEG", quality=80 + copy))
    return directory


def _config(archive: Path, output: Path, **overrides) -> RunConfig:
    settings = {"input": str(archive), "output": str(output), "model": "lraspp_mobilenet_v3_large",
                "weights": "random", "files_per_shard": 2, "run_date": dt.date(2026, 11, 20), **overrides}  # fmt: skip
    return RunConfig(**settings)


def _tables(output: Path) -> dict[str, list[tuple]]:
    """Every row of the three tables, less run_id (which differs between two outputs)."""
    return {
        table: sorted(duckdb.sql(f"SELECT * EXCLUDE (run_id) FROM read_parquet('{output}/{table}/**/*.parquet')").fetchall(), key=str)
        for table in ("images", "masks", "class_stats")
    }


def _all_runs(output: Path) -> dict[str, list[tuple]]:
    """Every row of the three tables of all runs together, less what differs between runs of the same images."""
    return {
        table: sorted(
            duckdb.sql(f"SELECT * EXCLUDE (run_id, run_date{', shard_id' if table == 'images' else ''}) "
                       f"FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)").fetchall(), key=str)
        for table in ("images", "masks", "class_stats")
    }  # fmt: skip


def test_rerunning_a_committed_run_does_nothing(archive: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    first = run(_config(archive, output))
    files = {path: path.stat().st_mtime_ns for path in output.rglob("*.parquet")}
    again = run(_config(archive, output))
    assert "already committed; nothing to do" in capsys.readouterr().out
    assert again == first
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*.parquet")} == files


def test_an_interrupted_run_resumes_with_only_the_missing_shards(archive: Path, tmp_path: Path) -> None:
    clean, interrupted = tmp_path / "clean", tmp_path / "interrupted"
    run(_config(archive, clean))
    first = run(_config(archive, interrupted))
    # the tests' Ray: one node of 3 CPUs, of which the actor takes 2 and runs torch on all 3 (at most the machine's)
    assert first["actors"] == {"device": "cpu", "actors": 1, "resources": {"num_cpus": 2.0}, "threads": 1, "cpu_threads": 3}
    timings = first["timings"]
    assert set(timings["stage_seconds"]) == {"decode", "model", "tables", "encode", "write"} and timings["actor_startup_seconds"] > 0
    assert set(timings["first_shard_stage_seconds"]) == set(timings["stage_seconds"])
    # the actor was ready (worker process started, torch imported, constructor done) before it wrote a shard
    assert timings["actor_startup_seconds"] < timings["actors_ready_seconds"] < timings["first_shard_seconds"] <= timings["seconds"]
    # and its wait before the constructor splits into the process starting, then importing segpipe, torch and the models
    constructor_began = timings["actors_ready_seconds"] - timings["actor_startup_seconds"]
    assert timings["actor_process_started_seconds"] < timings["actor_import_started_seconds"] < timings["actor_imported_seconds"]
    assert timings["actor_imported_seconds"] < constructor_began
    # the driver's listing before the pipeline is apart from it, and the summary's first line says it
    assert 0 <= timings["listing_seconds"] < 60  # rounded to milliseconds: a few local files list in less
    assert f"(plus {timings['listing_seconds']:.1f} s listing, " in format_summary(first)
    # as if the driver died after three shards: the manifest and one shard's images file are missing
    Path(first["manifest_uri"].removeprefix("file://")).unlink()
    lost = first["shards"][1]["files"]["images"].removeprefix("file://")
    Path(lost).unlink()
    resumed = run(_config(archive, interrupted))
    assert resumed["resumed_shards"] == 3 and len(resumed["shards"]) == 4 and resumed["actors"] == first["actors"]
    assert resumed["counts"] == first["counts"]
    assert _tables(interrupted) == _tables(clean)


def test_force_redoes_every_shard(archive: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(_config(archive, output))
    redone = run(_config(archive, output, force=True))
    assert redone["resumed_shards"] == 0


def test_shards_written_by_another_run_are_not_taken_for_this_one(archive: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = run(_config(archive, output))
    other = run(_config(archive, output, score_threshold=0.7))  # another run id, same partition and files
    assert other["run_id"] != first["run_id"] and other["resumed_shards"] == 0
    runs = duckdb.sql(f"SELECT DISTINCT run_id FROM read_parquet('{output}/images/**/*.parquet')").fetchall()
    assert runs == [(other["run_id"],)]  # replaced, not duplicated


def test_too_many_errors_fail_the_command_after_committing(archive: Path, tmp_path: Path, capsys) -> None:
    (archive / "broken.jpg").write_bytes(truncated_jpeg())
    (archive / "empty.jpg").write_bytes(b"")
    arguments = ["run", "--input", str(archive), "--output", str(tmp_path / "out"), "--model",
                 "lraspp_mobilenet_v3_large", "--weights", "random", "--run-date", "2026-11-20"]  # fmt: skip
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "2 of 10 images failed (20%), above --max-error-rate 0.05" in error
    assert "truncated_image 1" in error and "empty_file 1" in error
    assert list((tmp_path / "out" / "_runs").glob("*.json"))  # committed all the same
    assert main([*arguments, "--max-error-rate", "0.25", "--force"]) == 0


def test_incremental_runs_process_only_new_and_changed_images(archive: Path, tmp_path: Path) -> None:
    output, full = tmp_path / "out", tmp_path / "full"
    first = run(_config(archive, output, incremental=True))
    pictures = photos()
    for index, name in enumerate(["astronaut", "coffee", "rocket"]):
        (archive / f"new-{index}-{name}.jpg").write_bytes(encode(pictures[name][::5, ::5], "JPEG"))
    second = run(_config(archive, output, incremental=True, run_date=dt.date(2026, 11, 21)))
    assert second["counts"]["images"] == 3
    assert second["skipped"] == {"files": 8, "images": 8, "processed_by_runs": [first["run_id"]]}
    assert "skipped     8 images in 8 files that earlier runs processed" in format_summary(second)
    run(_config(archive, full))
    assert _all_runs(output) == _all_runs(full)

    changed = sorted(archive.glob("new-*.jpg"))[0]
    changed.write_bytes(encode(pictures["chelsea"][::6, ::6], "JPEG"))
    third = run(_config(archive, output, incremental=True, run_date=dt.date(2026, 11, 22)))
    assert third["counts"]["images"] == 1 and third["skipped"]["files"] == 10
    nothing_new = run(_config(archive, output, incremental=True, run_date=dt.date(2026, 11, 23)))
    assert nothing_new["counts"]["images"] == 0 and nothing_new["shards"] == []
    assert nothing_new["skipped"]["images"] == 11


def test_a_run_whose_input_changed_after_an_interruption_keeps_no_stale_shard(archive: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = run(_config(archive, output))
    Path(first["manifest_uri"].removeprefix("file://")).unlink()  # interrupted before committing
    sorted(archive.glob("*.jpg"))[0].unlink()  # the regrouped files make new shards
    again = run(_config(archive, output))
    assert again["counts"]["images"] == 7
    (count,) = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/images/**/*.parquet')").fetchall()[0]
    assert count == 7
