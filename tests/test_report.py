"""``segpipe report``: one self-contained HTML file per run, checked for its structure and
opened in headless Chromium, where every sample image must render."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.run import run
from jobs.sample import encode, photos, shape_pngs, truncated_jpeg
from pipeline.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


class Structure(HTMLParser):
    """What a reader sees: sample images, summary rows, legend entries, charts, failed rows, and
    every URL the page would fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[str] = []
        self.summary: dict[str, str] = {}
        self.legend: list[str] = []
        self.charts = 0
        self.failed_rows: list[list[str]] = []
        self.external: list[str] = []
        self._table = ""
        self._cells: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("src", "href"):
            if attributes.get(name) and not attributes[name].startswith("data:"):
                self.external.append(attributes[name])
        if tag == "img" and attributes.get("class") == "sample":
            self.samples.append(attributes["src"])
        if tag == "svg" and attributes.get("class") == "chart":
            self.charts += 1
        if tag == "table":
            self._table = attributes.get("class") or ""
        if tag == "tr":
            self._cells = []
        if tag in ("th", "td", "li"):
            self._in = tag
            self._cells.append("")

    def handle_data(self, data: str) -> None:
        if self._in:
            self._cells[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td", "li"):
            self._in = None
        if tag == "li":
            self.legend.append(self._cells[-1])
        if tag == "tr" and self._table == "summary":
            self.summary[self._cells[0]] = self._cells[1]
        if tag == "tr" and self._table == "failed" and self._cells[0] != "uri":
            self.failed_rows.append(self._cells)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output with one instance and one semantic run over shapes, photos and a broken file."""
    root = tmp_path_factory.mktemp("report")
    archive = root / "archive"
    archive.mkdir()
    for name, data in shape_pngs(5, seed=77, size=192).items():
        (archive / name).write_bytes(data)
    (archive / "coffee.jpg").write_bytes(encode(photos()["coffee"][::2, ::2], "JPEG"))
    (archive / "broken.jpg").write_bytes(truncated_jpeg())
    for model in ("maskrcnn_mobilenet_v3_small_fpn", "unet"):
        run(RunConfig(input=str(archive), output=str(root / "out"), model=model, weights="shapes",
                      run_date=dt.date(2026, 11, 24), max_error_rate=1.0))  # fmt: skip
    return root / "out"


@pytest.mark.parametrize(("model", "task_marks"), [("maskrcnn_mobilenet_v3_small_fpn", "Instances by class"), ("unet", "Share of image pixels")])
def test_the_report_shows_the_run_its_samples_and_its_failures(shapes_run: Path, tmp_path: Path, model: str, task_marks: str) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(shapes_run), "--run-date", "2026-11-24", "--model", model, "--out", str(out)]) == 0
    page = out.read_text()
    structure = Structure()
    structure.feed(page)
    assert len(structure.samples) == 6 and all(src.startswith("data:image/jpeg;base64,") for src in structure.samples)
    assert structure.external == []  # self-contained: nothing to fetch
    assert structure.summary["images"] == "7 in: 6 ok, 1 failed"
    assert structure.summary["errors by type"] == "truncated_image 1"
    assert structure.summary["model"].startswith(model)
    assert structure.summary["stages"].startswith("first shard written after") and "time per stage: model " in structure.summary["stages"]
    assert re.fullmatch(r"segpipe preset shapes, sha256 [0-9a-f]{64}", structure.summary["weights"])
    assert structure.charts >= 1 and task_marks in page
    assert set(structure.legend) <= {"circle", "square", "triangle"} and structure.legend
    assert [row[:2] for row in structure.failed_rows] == [[f"file://{shapes_run.parent}/archive/broken.jpg", "truncated_image"]]


def test_the_report_renders_in_headless_chromium(shapes_run: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (make test installs it when it can)")
    out = tmp_path / "report.html"
    assert main(["report", str(shapes_run), "--out", str(out)]) == 0
    opened = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--enable-logging=stderr", "--v=0", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert 'data-samples-rendered="6/6"' in opened.stdout
    assert "Uncaught" not in opened.stderr
    screenshot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={screenshot}", out.as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600) and len(set(image.convert("RGB").getdata())) > 1000  # photos, not a blank page


def test_a_run_that_does_not_exist_is_one_line(shapes_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(shapes_run), "--model", "deeplabv3_resnet50", "--out", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segpipe: error: no committed run matches") and "2026-11-24 unet" in error


def test_a_report_opens_only_its_run_s_partition(shapes_run: Path, tmp_path: Path) -> None:
    # after many nights, reading every file's footer to find one run's rows would take the most time
    output = tmp_path / "out"
    shutil.copytree(shapes_run, output)
    for table in ("images", "masks", "class_stats"):
        night = output / table / "run_date=2099-01-01" / "model=unet"
        night.mkdir(parents=True)
        (night / "part-0000000000000000.parquet").write_bytes(b"not a Parquet file: opening it fails")
    assert main(["report", str(output), "--run-date", "2026-11-24", "--model", "unet", "--out", str(tmp_path / "r.html")]) == 0
