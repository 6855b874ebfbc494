"""A corpus of broken, hostile and awkward files through ``segpipe run``: each file ends as
exactly one ``images`` row with the outcome it should have, the run goes on, and a
decompression bomb costs no memory. The corpus is made here, from scikit-image's photos."""

from __future__ import annotations

import datetime as dt
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from jobs.run import run
from jobs.sample import awkward_images, encode, photos, tar_of, truncated_jpeg
from pipeline.config import RunConfig
from pipeline.read import largest_image_bytes

pytestmark = pytest.mark.slow


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black grayscale PNG of ``width`` x ``height``, built without holding its pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    compressed = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(encode(photos()["astronaut"][::8, ::8], "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def hostile_corpus() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected outcome: ``ok`` or the error_type)."""
    astronaut = photos()["astronaut"]
    small = astronaut[::8, ::8]
    png = encode(small, "PNG")
    broken_crc = bytearray(png)
    broken_crc[png.index(b"IDAT") + 10] ^= 0xFF
    zero_width = bytearray(png)
    zero_width[16:20] = struct.pack(">I", 0)
    exif = Image.Exif()
    exif[0x0112] = 99  # an orientation that does not exist
    members = tar_of({"good.jpg": encode(small, "JPEG"), "empty.jpg": b""})
    corpus = {
        "empty.jpg": (b"", "empty_file"),
        "random-bytes.jpg": (np.random.default_rng(7).bytes(20_000), "not_an_image"),
        "error-page.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not_an_image"),
        "truncated.jpg": (truncated_jpeg(), "truncated_image"),
        "truncated.png": (encode(astronaut, "PNG")[:40_000], "truncated_image"),
        "cut-within-its-header.jpg": (truncated_jpeg()[:200], "truncated_image"),
        "truncated.webp": (encode(astronaut, "WEBP")[:10_000], "truncated_image"),
        "animated.webp": (encode(Image.fromarray(small), "WEBP", save_all=True, append_images=[Image.fromarray(small[::-1])]), "ok"),
        "broken-crc.png": (bytes(broken_crc), "truncated_image"),
        "zero-width.png": (bytes(zero_width), "decode_error"),
        "bomb-png-900-megapixels.png": (png_bomb(30_000, 30_000), "too_many_pixels"),
        "bomb-jpeg-header-65000x65000.jpg": (jpeg_claiming(65_000, 65_000), "too_many_pixels"),
        "strip-4000x8.png": (encode(np.zeros((8, 4000, 3), np.uint8), "PNG"), "extreme_aspect_ratio"),
        "postscript-as.jpg": (encode(Image.fromarray(small), "EPS"), "unsupported_format"),
        "icon-as.png": (encode(Image.fromarray(small), "ICO"), "unsupported_format"),
        "png-named.jpg": (png, "ok"),
        "trailing-garbage.jpg": (encode(small, "JPEG") + b"\x00garbage" * 1000, "ok"),
        "one-pixel.png": (encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), "ok"),
        "bad-exif-orientation.jpg": (encode(small, "JPEG", exif=exif), "ok"),
        "cmyk.jpg": (awkward_images()["cmyk_chelsea.jpg"], "ok"),
        "sixteen-bit.png": (awkward_images()["sixteen_bit_coins.png"], "ok"),
        "animated.gif": (awkward_images()["palette_animated.gif"], "ok"),
        "unicode name é 写真.jpg": (encode(small, "JPEG"), "ok"),
        "cut.tar": (members[:700], "unreadable_archive"),
    }
    return corpus


def expected_outcomes(corpus: dict[str, tuple[bytes, str]]) -> dict[str, str]:
    """The outcome per image name; ``members.tar``'s images are named ``members.tar#MEMBER``."""
    return {**{name: outcome for name, (_, outcome) in corpus.items()}, "members.tar#good.jpg": "ok",
            "members.tar#empty.jpg": "empty_file"}  # fmt: skip


@pytest.mark.usefixtures("ray_local")
def test_every_file_of_the_hostile_corpus_gets_its_outcome_and_the_run_goes_on(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    corpus = hostile_corpus()
    for name, (data, _) in corpus.items():
        (archive / name).write_bytes(data)
    (archive / "members.tar").write_bytes(tar_of({"good.jpg": encode(photos()["coffee"][::8, ::8], "JPEG"), "empty.jpg": b""}))
    with open(archive / "a-video-named.jpg", "wb") as video:  # larger than any image within --max-pixels: not read
        video.truncate(largest_image_bytes(RunConfig.model_fields["max_pixels"].default) + 1)  # sparse: costs no disk
    manifest = run(RunConfig(input=str(archive), output=str(tmp_path / "out"), model="lraspp_mobilenet_v3_large",
                             weights="random", files_per_shard=6, run_date=dt.date(2026, 11, 25), max_error_rate=1.0))  # fmt: skip
    rows = duckdb.sql(
        f"SELECT uri, status, error_type, error_message FROM read_parquet('{tmp_path}/out/images/**/*.parquet')"
    ).fetchall()
    expected = expected_outcomes(corpus) | {"a-video-named.jpg": "file_too_large"}
    assert len(rows) == len(expected) == manifest["counts"]["images"]
    outcomes = {Path(uri).name: (error_type or status) for uri, status, error_type, _ in rows}
    assert outcomes == expected
    assert all(message for _, status, _, message in rows if status == "error")


BOMB_PROBE = """
import resource, sys
from pipeline.decode import DecodeError, decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data, max_pixels=100_000_000)
except DecodeError as error:
    print(error.error_type, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize(("width", "height"), [(30_000, 30_000), (12_000, 9_000)])
def test_a_decompression_bomb_does_not_raise_peak_memory(tmp_path: Path, width: int, height: int) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(width, height))
    assert bomb.stat().st_size < 2_000_000  # hundreds of megapixels in a small file
    probe = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(bomb)], capture_output=True, text=True,
                           cwd=Path(__file__).parents[1], check=True)  # fmt: skip
    error_type, grown_kib = probe.stdout.split()
    assert error_type == "too_many_pixels"
    assert int(grown_kib) < 200 * 1024  # ru_maxrss is in KiB on Linux


RUNNER = {"name": "runner", "credentials": [{"accessKey": "segpipe-runner", "secretKey": "runner-secret-5eed"}],
          "actions": ["List:archive", "Read:archive/photos/open/*", "List:results", "Read:results", "Write:results"]}  # fmt: skip


@pytest.mark.parametrize("private_s3", [[RUNNER]], indirect=True)
def test_objects_the_job_may_not_read_are_read_error_rows(private_s3, tmp_path: Path) -> None:
    import s3fs

    admin = s3fs.S3FileSystem(endpoint_url=private_s3.endpoint, key=private_s3.environment()["AWS_ACCESS_KEY_ID"],
                              secret=private_s3.environment()["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)  # fmt: skip
    admin.mkdir("archive")
    admin.mkdir("results")
    for folder in ("open", "closed"):
        admin.pipe(f"archive/photos/{folder}/coffee.jpg", encode(photos()["coffee"][::8, ::8], "JPEG"))
    admin.pipe("archive/photos/closed/shard.tar", tar_of({"chelsea.jpg": encode(photos()["chelsea"][::8, ::8], "JPEG")}))
    runner = {**private_s3.environment(), "AWS_ACCESS_KEY_ID": "segpipe-runner", "AWS_SECRET_ACCESS_KEY": "runner-secret-5eed"}
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))} | runner
    result = subprocess.run(
        [str(Path(sys.executable).with_name("segpipe")), "run", "--input", "s3://archive/photos", "--output", "s3://results/out",
         "--model", "lraspp_mobilenet_v3_large", "--weights", "random", "--max-error-rate", "0.7"],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runner-secret-5eed" not in result.stdout + result.stderr
    connection = duckdb.connect()
    connection.register_filesystem(admin)
    rows = connection.sql("SELECT uri, status, error_type, error_message FROM read_parquet('s3://results/out/images/**/*.parquet') ORDER BY uri").fetchall()
    (closed, closed_tar, opened) = rows
    assert closed[:3] == ("s3://archive/photos/closed/coffee.jpg", "error", "read_error") and "PermissionError" in closed[3]
    assert closed_tar[:3] == ("s3://archive/photos/closed/shard.tar", "error", "read_error") and "PermissionError" in closed_tar[3]
    assert opened[:2] == ("s3://archive/photos/open/coffee.jpg", "ok")
