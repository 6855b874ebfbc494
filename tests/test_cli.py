"""The command line: listing models, help, one-line errors with exit code 2, and a real run."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pyarrow.parquet as pq
import pytest

import jobs.run as run_module
from jobs.cli import main
from jobs.sample import build_sample
from pipeline.config import RunConfig
from pipeline.listing import ListingProgress

SEGPIPE = str(Path(sys.executable).with_name("segpipe"))


def test_models_json_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    entries = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    deeplab = entries["deeplabv3_resnet50"]
    assert deeplab["task"] == "semantic" and deeplab["num_classes"] == 21 == len(deeplab["categories"])
    assert deeplab["weights"] == ["random", "COCO_WITH_VOC_LABELS_V1", "DEFAULT"]
    assert entries["maskrcnn_resnet50_fpn_v2"]["default_weights"] == "COCO_V1"


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TASK", "CLASSES", "DEFAULT", "WEIGHTS"]
    assert any(line.split()[:3] == ["maskrcnn_resnet50_fpn", "instance", "91"] for line in lines)


@pytest.mark.parametrize("command", ["synth", "train", "eval"])
def test_job_commands_have_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and "--" in capsys.readouterr().out


def test_architectures_without_trained_weights_need_an_explicit_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "pspnet"]) == 2
    assert "pspnet has no trained weights of its own; pass --weights random" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_directory_that_is_no_dataset_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    arguments = ["--model", "unet", "--data", str(tmp_path)]
    arguments += ["--output", str(tmp_path / "o")] if command == "train" else ["--weights", "random"]
    assert main([command, *arguments]) == 2
    assert "has no instances.json" in capsys.readouterr().err


def test_run_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name in RunConfig.model_fields:
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["--output", "o", "--model", "fcn_resnet50"], "--input is required"),
        (["--input", "{tmp}/nowhere", "--output", "{tmp}/out", "--model", "fcn_resnet50", "--weights", "random"],
         "input not found"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "segformer"], "unknown model 'segformer'; choose one of"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "fcn_resnet50", "--weights", "{tmp}/w.pt"],
         "cannot read weights"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "fcn_resnet50", "--batch-size", "0"],
         "--batch-size: Input should be greater than 0"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "fcn_resnet50", "--run-date", "yesterday"],
         "--run-date"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "fcn_resnet50", "--gpus", "4", "--device", "cpu"],
         "gpus asks the cluster for GPUs, but device is cpu"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out[1]", "--model", "fcn_resnet50"], "holds *, ? or [ ]"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "lraspp_mobilenet_v3_large", "--weights", "random"],
         "no images"),
        (["--input", "{tmp}/in", "--output", "{tmp}/out", "--model", "lraspp_mobilenet_v3_large", "--weights", "random",
          "--spec", "{tmp}/spec.yaml"], "unknown setting 'colour'"),
    ],  # fmt: skip
)
def test_bad_arguments_give_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], reason: str
) -> None:
    (tmp_path / "spec.yaml").write_text("colour: blue\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    assert main(["run", *(argument.format(tmp=tmp_path) for argument in arguments)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segpipe: error: ") and error.count("\n") == 1
    assert reason in error


def test_output_inside_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_sample(tmp_path / "archive")
    arguments = ["--input", str(tmp_path / "archive"), "--model", "lraspp_mobilenet_v3_large", "--weights", "random"]
    assert main(["run", *arguments, "--output", str(tmp_path / "archive" / "out")]) == 2
    assert "lies inside input" in capsys.readouterr().err


@pytest.mark.slow
def test_segpipe_run_with_a_job_spec_prints_a_summary(tmp_path: Path) -> None:
    """What `make run` does, in a fresh process with its own local Ray instance."""
    build_sample(tmp_path / "sample")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"input: {tmp_path / 'sample'}\noutput: {tmp_path / 'out'}\nmodel: lraspp_mobilenet_v3_large\n"
        "weights: random\nrun_date: 2026-11-24\nfiles_per_shard: 2\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    result = subprocess.run(
        [SEGPIPE, "run", "--spec", str(spec), "--limit", "6"],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout
    assert "images      6 in: 6 ok, 0 failed" in summary
    assert "throughput" in summary and "_runs/" in summary
    assert "stages      first shard written after" in summary and "time per stage: model " in summary
    query = summary.split("try in DuckDB:")[1].strip().splitlines()[0]
    rows = duckdb.sql(query).fetchall()
    assert sum(count for _, count, _ in rows) > 0
    images = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{tmp_path}/out/images/**/*.parquet', hive_partitioning=true) "
        "WHERE run_date = DATE '2026-11-24' AND model = 'lraspp_mobilenet_v3_large'"
    ).fetchall()
    assert images == [(6,)]
    # stdout is no terminal: progress lines for the first and the last shard (and every 10 s between), with the pace after the first
    progress = [line for line in summary.splitlines() if re.match(r"segpipe: \d+/3 shards written", line)]
    assert progress[0].startswith("segpipe: 1/3 shards written (2 images, 2 ok) after ") and "images/s" not in progress[0]
    assert progress[-1].startswith("segpipe: 3/3 shards written (6 images, 6 ok) after ")
    assert all(re.search(r"\d+ ok\) after \d+ s(; [\d.]+ images/s, about \d+ s left)?$", line) for line in progress[1:])
    _check_query(tmp_path / "out", tmp_path)


@pytest.mark.slow
def test_a_network_that_cannot_compile_stops_the_run_without_blaming_images(tmp_path: Path) -> None:
    """--compile on a node without a working C++ compiler: one error line and exit 2, not a failed row per image."""
    build_sample(tmp_path / "sample")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    # Inductor's cache could serve an earlier compilation without the compiler
    environment |= {"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    result = subprocess.run(
        [SEGPIPE, "run", "--input", str(tmp_path / "sample"), "--output", str(tmp_path / "out"), "--model", "unet",
         "--weights", "shapes", "--compile", "default", "--limit", "4"],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "compiled (default) on each actor's first batch: the first shard comes later" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("segpipe: error: ")]
    assert len(errors) == 1 and errors[0].startswith("segpipe: error: --compile default could not compile unet: ")
    assert "C++ compiler" in errors[0] and "run without --compile" in errors[0]
    assert not list((tmp_path / "out").rglob("*.parquet")) and not list((tmp_path / "out").rglob("_runs/*.json"))


def test_progress_lines_count_an_image_that_several_models_share_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = itertools.count(step=10)  # ten seconds per look at the clock: the start, then one per written row
    monkeypatch.setattr(run_module, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    rows = [{"images": 10, "ok": 10}] * 6  # two shards of ten images, each written by three models' runs
    assert list(run_module._with_progress(iter(rows), 2, runs=3)) == rows
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "segpipe: 1/6 shards written (10 images, 10 ok) after 10 s"
    # a row every ten seconds, and each of a shard's three rows brings a third of its ten images
    assert lines[1] == "segpipe: 2/6 shards written (20 images, 20 ok) after 20 s; 0.3 images/s, about 40 s left"
    assert lines[5].endswith("after 60 s; 0.3 images/s, about 0 s left")


def test_progress_lines_give_no_pace_for_shards_written_together_with_the_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # four actors write their first shards within milliseconds: a pace over that would be 100,000 images/s
    clock = iter([0.0, 15.0, 15.001, 15.002, 25.0, 26.0])
    monkeypatch.setattr(run_module, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    rows = [{"images": 64, "ok": 64}] * 5
    assert list(run_module._with_progress(iter(rows), 5, runs=1)) == rows
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" shards")[0] for line in lines] == ["segpipe: 1/5", "segpipe: 4/5", "segpipe: 5/5"]  # a line per 10 s, and the last
    assert lines[1].endswith("after 25 s; 19.2 images/s, about 3 s left")  # the three shards since the first, in its ten seconds
    assert lines[2].endswith("after 26 s; 23.3 images/s, about 0 s left")


def test_a_long_listing_prints_how_far_it_has_come(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(run_module, "_PROGRESS_LINE_SECONDS", 0.05)
    progress = ListingProgress(files=120_000, prefixes=64, prefixes_listed=12)
    with run_module._progress_lines_while_listing("s3://user:secret@archive/photos?X-Amz-Signature=abc", progress):
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and re.fullmatch(
        r"segpipe: listing s3://archive/photos: 120000 files so far \(12 of 64 prefixes done\), after \d+ s", lines[0]
    )
    time.sleep(0.2)
    assert capsys.readouterr().out == ""  # no line once the listing is over
    with run_module._progress_lines_while_listing("s3://archive/photos", ListingProgress()):  # one listing: counted at its end
        time.sleep(0.2)
    assert capsys.readouterr().out.splitlines()[0].startswith("segpipe: listing s3://archive/photos: still listing, after ")


def _check_query(output: Path, tmp_path: Path) -> None:
    """`segpipe query` over a finished run: every view, every format, and a bad query."""
    sql = ("SELECT r.run_id, count(*) AS images, sum(i.n_masks) AS masks, any_value(i.run_date) AS run_date "
           "FROM images i JOIN runs r USING (run_id) GROUP BY r.run_id")  # fmt: skip
    for output_format in ("csv", "json", "parquet"):
        assert main(["query", str(output), sql, "--format", output_format, "--out", str(tmp_path / f"q.{output_format}")]) == 0
    (row,) = json.loads((tmp_path / "q.json").read_text())
    assert row["images"] == 6 and row["run_date"] == "2026-11-24" and row["run_id"].startswith("20261124-")
    assert (tmp_path / "q.csv").read_text().splitlines()[0] == '"run_id","images","masks","run_date"'
    assert pq.read_table(tmp_path / "q.parquet").to_pylist()[0]["images"] == 6
    counts = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/class_stats/**/*.parquet')").fetchall()[0][0]
    assert main(["query", str(output), "SELECT count(*) AS n FROM class_stats", "--format", "json", "--out", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text()) == [{"n": counts}]


def test_query_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", str(tmp_path / "nothing"), "SELECT 1"]) == 2
    assert capsys.readouterr().err.startswith("segpipe: error: no segpipe output at ")
    (tmp_path / "empty").mkdir()
    assert main(["query", str(tmp_path / "empty"), "SELECT count(*) AS n FROM masks"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "-", "0", "(1 row)"]
    assert main(["query", str(tmp_path / "empty"), "SELECT nope FROM images"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segpipe: error: query failed: ") and error.count("\n") == 1


def test_a_job_spec_fills_in_the_run_date_and_flags_win(tmp_path: Path) -> None:
    from jobs.cli import load_config

    config = load_config("jobs/nightly.yaml", {"run_date": "2026-11-24"})
    assert config.input == "s3://example-archive/uploads/2026/11/24/"
    assert config.run_date.isoformat() == "2026-11-24" and config.incremental and config.model == "deeplabv3_resnet50"
    assert config.gpus == 4  # the cluster's GPU nodes scale from zero
    spec = tmp_path / "spec.yaml"
    spec.write_text("input: in/{run_date}\noutput: out\nmodel: unet\nrun_date: 2026-01-02\nbatch_size: 4\n")
    overridden = load_config(str(spec), {"batch_size": 2})
    assert (overridden.input, overridden.batch_size) == ("in/2026-01-02", 2)
