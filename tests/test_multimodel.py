"""A job spec with several models over one input: one pipeline reads and decodes each image
once, and every model's tables, manifest and run id are those it would have had alone."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from jobs.cli import SpecError, load_run_configs, main
from jobs.run import run, run_all
from jobs.sample import encode, photos, shape_pngs, truncated_jpeg

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
MODELS = ("unet", "maskrcnn_mobilenet_v3_small_fpn", "lraspp_mobilenet_v3_large")


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, data in shape_pngs(4, seed=91, size=160).items():
        (archive / name).write_bytes(data)
    (archive / "chelsea.jpg").write_bytes(encode(photos()["chelsea"][::3, ::3], "JPEG"))
    (archive / "broken.jpg").write_bytes(truncated_jpeg())
    path = tmp_path / "job.yaml"
    path.write_text(
        f"input: {archive}\noutput: {tmp_path / 'together'}\nrun_date: 2026-11-24\nfiles_per_shard: 3\n"
        "max_error_rate: 0.5\nmodels:\n"
        "  - {model: unet, weights: shapes}\n"
        "  - {model: maskrcnn_mobilenet_v3_small_fpn, weights: shapes, score_threshold: 0.6}\n"
        "  - {model: lraspp_mobilenet_v3_large, weights: random, batch_size: 2}\n"
    )
    return path


def _rows(output: Path, table: str, model: str) -> list[tuple]:
    query = (f"SELECT * EXCLUDE (run_id) FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true) "
             f"WHERE model = '{model}'")  # fmt: skip
    return sorted(duckdb.sql(query).fetchall(), key=str)


def test_models_of_one_spec_run_together_and_equal_separate_runs(spec: Path, tmp_path: Path) -> None:
    configs = load_run_configs(str(spec), {})
    assert [config.model for config in configs] == list(MODELS)
    assert configs[1].score_threshold == 0.6 and configs[2].batch_size == 2 and configs[0].files_per_shard == 3
    together = run_all(configs)
    run_ids = [manifest["run_id"] for manifest in together]
    for manifest in together:
        assert manifest["counts"]["images"] == 6 and manifest["counts"]["errors_by_type"] == {"truncated_image": 1}
        assert sorted(manifest["decoded_with_runs"]) == sorted(set(run_ids) - {manifest["run_id"]})
    for config in configs:
        alone = run(config.model_copy(update={"output": str(tmp_path / "alone")}))
        assert alone["decoded_with_runs"] == []
        for table in ("images", "masks", "class_stats"):
            assert _rows(tmp_path / "together", table, config.model) == _rows(tmp_path / "alone", table, config.model), (config.model, table)


def test_an_actor_working_on_shards_in_threads_writes_what_it_writes_one_shard_at_a_time(spec: Path, tmp_path: Path, capsys) -> None:
    configs = [config.model_copy(update={"files_per_shard": 1}) for config in load_run_configs(str(spec), {})]
    one_at_a_time = run_all(configs)
    threaded = run_all([config.model_copy(update={"output": str(tmp_path / "threads"), "threads_per_actor": 3}) for config in configs])
    assert "on 1 cpu actor(s) of 3 threads" in capsys.readouterr().out
    for config, alone, manifest in zip(configs, one_at_a_time, threaded):
        assert manifest["counts"] == alone["counts"] and manifest["counts"]["images"] == 6
        assert manifest["timings"]["actors_ready_seconds"] > 0 and manifest["timings"]["stage_seconds"]["model"] > 0
        for table in ("images", "masks", "class_stats"):
            assert _rows(tmp_path / "threads", table, config.model) == _rows(tmp_path / "together", table, config.model), (config.model, table)


def test_a_spec_rerun_resumes_each_model_where_it_stopped(spec: Path, tmp_path: Path, capsys) -> None:
    first = run_all(load_run_configs(str(spec), {}))
    Path(first[2]["manifest_uri"].removeprefix("file://")).unlink()  # the third model never committed
    again = run_all(load_run_configs(str(spec), {}))
    printed = capsys.readouterr().out
    assert printed.count("is already committed; nothing to do") == 2
    assert again[2]["resumed_shards"] == 2 and again[2]["counts"] == first[2]["counts"]
    assert again[2]["actors"] is None and first[2]["actors"]["device"] == "cpu"  # every shard was written: no actor ran this time
    assert again[:2] == first[:2]


def test_spec_mistakes_are_one_line(spec: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SpecError, match="--model and --weights cannot replace them"):
        load_run_configs(str(spec), {"model": "unet"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("batch_size: 2", "colour: blue"))
    assert main(["run", "--spec", str(bad)]) == 2
    assert "models[2]: unknown setting 'colour' (valid: model, weights, score_threshold, batch_size, precision, pad_to_multiple, compile)" in capsys.readouterr().err
