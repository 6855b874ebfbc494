"""Read stage: compressed bytes per image, member URIs, and error rows for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import jobs.run
from jobs.run import shard_input
from jobs.sample import damaged_copies, encode, photos, tar_of
from pipeline.listing import list_shards
from pipeline.read import image_id, largest_image_bytes, read_image_bytes, read_shards
from pipeline.schema import ENCODED_IMAGE_SCHEMA, unnest

JPEG = encode(photos()["chelsea"], "JPEG")


def _read(path: Path, image_column: str = "image") -> list[list[dict]]:
    shards = list_shards(str(path), files_per_shard=2).shards
    batch = pa.table({"shard": [shard.to_json() for shard in shards]})
    result = read_shards(batch, image_column=image_column)
    assert result.column("shard_id").to_pylist() == [shard.shard_id for shard in shards]
    return [unnest(cell, ENCODED_IMAGE_SCHEMA).to_pylist() for cell in result.column("images")]


def test_loose_files_keep_their_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "b.png").write_bytes(b"")
    [images] = _read(tmp_path)
    assert [row["data"] for row in images] == [JPEG, b""]
    assert images[0]["uri"] == f"file://{tmp_path}/a.jpg" and images[0]["image_id"] == image_id(images[0]["uri"])
    assert images[0]["size_bytes"] == len(JPEG) and images[0]["error_type"] is None


def test_a_file_deleted_after_listing_is_a_read_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "b.jpg").write_bytes(JPEG)
    shards = list_shards(str(tmp_path), files_per_shard=2).shards
    (tmp_path / "b.jpg").unlink()
    result = read_shards(pa.table({"shard": [shards[0].to_json()]}), image_column="image")
    images = unnest(result.column("images")[0], ENCODED_IMAGE_SCHEMA).to_pylist()
    assert [row["error_type"] for row in images] == [None, "read_error"]
    assert "FileNotFoundError" in images[1]["error_message"]


def test_tar_members_are_images_with_member_uris(tmp_path: Path) -> None:
    # a tar made on macOS holds an AppleDouble file of attributes beside each image: hidden, not an image
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    (tmp_path / "s.tar").write_bytes(tar_of({"k1.jpg": JPEG, "._k1.jpg": apple_double, "k1.json": b"{}", "k2.png": JPEG,
                                             "d/._k3.jpg": apple_double, ".cache/k4.jpg": JPEG}))  # fmt: skip
    [images] = _read(tmp_path)
    assert [row["uri"].rsplit("#", 1)[1] for row in images] == ["k1.jpg", "k2.png"]
    assert all(row["data"] == JPEG for row in images)


K2_HEADER = 512 + -(-len(JPEG) // 512) * 512  # k1's header and padded data come first


@pytest.mark.parametrize(
    "cut", [K2_HEADER, K2_HEADER + 100, K2_HEADER + 512 + 100], ids=["at a header", "inside a header", "inside data"]
)
def test_a_tar_cut_short_keeps_the_images_before_the_cut_and_says_so(tmp_path: Path, cut: int) -> None:
    data = tar_of({"k1.jpg": JPEG, "k2.jpg": JPEG, "k3.jpg": JPEG})
    (tmp_path / "s.tar").write_bytes(data[:cut])
    [images] = _read(tmp_path)
    assert images[0]["data"] == JPEG and len(images) == 2
    assert images[-1]["error_type"] == "unreadable_archive" and images[-1]["uri"].endswith("s.tar")


def test_parquet_rows_plain_and_struct_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": [JPEG, None]}), tmp_path / "a.parquet")
    # Hugging Face datasets' Image feature: struct<bytes, path>, the bytes null where only the path was kept
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    struct = pa.array([{"bytes": JPEG, "path": "x.jpg"}, {"bytes": None, "path": "y.jpg"}, None], hf_type)
    pq.write_table(pa.table({"img": struct}), tmp_path / "b.parquet")
    plain, hf_style = _read(tmp_path / "a.parquet")[0], _read(tmp_path / "b.parquet", image_column="img")[0]
    assert [row["uri"].rsplit("#", 1)[1] for row in plain] == ["0", "1"]
    assert plain[0]["data"] == JPEG and plain[1]["error_type"] == "empty_file"
    assert hf_style[0]["data"] == JPEG and [row["error_type"] for row in hf_style] == [None, "empty_file", "empty_file"]
    assert hf_style[1]["error_message"] == "row 1 has no image bytes (null); its path: y.jpg"
    assert hf_style[2]["error_message"] == "row 2 has no image bytes (null)"


def test_parquet_without_the_image_column_names_the_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"pixels": [JPEG, JPEG]}), tmp_path / "a.parquet")
    [images] = _read(tmp_path)
    assert [row["error_type"] for row in images] == ["missing_image_column"] * 2
    assert "pixels" in images[0]["error_message"] and "--image-column" in images[0]["error_message"]


def test_a_tar_with_a_damaged_member_header_keeps_the_images_before_it_and_says_so(tmp_path: Path) -> None:
    # tarfile ends quietly at a header whose checksum fails, as at the end of the archive: the images after it
    # were dropped without a word before segpipe looked at what follows
    data = bytearray(tar_of({"k1.jpg": JPEG, "k2.jpg": JPEG, "k3.jpg": JPEG}))
    data[K2_HEADER + 3] ^= 0xFF  # k2's name
    (tmp_path / "s.tar").write_bytes(bytes(data))
    [images] = _read(tmp_path)
    assert [row["error_type"] for row in images] == [None, "unreadable_archive"] and images[0]["data"] == JPEG
    assert f"byte {K2_HEADER}" in images[1]["error_message"]


def test_concatenated_tars_are_not_taken_for_the_first_one_alone(tmp_path: Path) -> None:
    (tmp_path / "s.tar").write_bytes(tar_of({"k1.jpg": JPEG}) + tar_of({"k2.jpg": JPEG}))
    [images] = _read(tmp_path)
    assert [row["error_type"] for row in images] == [None, "unreadable_archive"]


def test_any_cut_or_corruption_of_a_container_keeps_what_it_can_and_names_the_rest(tmp_path: Path) -> None:
    # never a failed shard, never images missing without a row that says so, and what the storage did not
    # fail to deliver is never a read_error
    rng = np.random.default_rng(11)
    members = {f"k{index}.jpg": encode(photos()["chelsea"][:48, :64], "JPEG", quality=50 + index) for index in range(4)}
    parquet = pa.BufferOutputStream()
    pq.write_table(pa.table({"image": list(members.values())}), parquet)
    for suffix, whole in ((".tar", tar_of(members)), (".parquet", parquet.getvalue().to_pybytes())):
        for number, data in enumerate(damaged_copies(whole, cuts=20, corruptions=40, rng=rng)):
            path = tmp_path / f"{number}{suffix}"
            path.write_bytes(data)
            [images] = _read(path)
            errors = [row["error_type"] for row in images if row["error_type"] is not None]
            assert errors in ([], ["unreadable_archive"]), errors
            assert len(images) - len(errors) == len(members) or errors == ["unreadable_archive"]


def test_every_uri_in_the_tables_reads_back_its_bytes_whatever_hashes_the_names_hold(tmp_path: Path) -> None:
    # "#" separates a container from its member in a uri, and paths and member names may hold one too
    folder = tmp_path / "dir#x"
    folder.mkdir()
    (folder / "a#1.jpg").write_bytes(JPEG)
    (folder / "t#1.tar").write_bytes(tar_of({"m#1.jpg": JPEG, "n.jpg": JPEG[:-1]}))
    pq.write_table(pa.table({"image": [JPEG[:-2]]}), folder / "p#1.parquet")
    images = [row for shard in _read(tmp_path) for row in shard]
    assert len(images) == 4
    for row in images:
        assert read_image_bytes(row["uri"]) == row["data"], row["uri"]


def test_members_of_a_tar_that_share_a_name_each_get_a_uri_and_an_image_id(tmp_path: Path) -> None:
    # tar -r appends a new version of a file under the same name; both are in the archive
    first, second = tar_of({"a.jpg": JPEG}), tar_of({"a.jpg": JPEG[:-1], "b.jpg": JPEG[:-2]})
    (tmp_path / "t.tar").write_bytes(first[:K2_HEADER] + second)  # the first tar without its end-of-archive blocks
    [images] = _read(tmp_path)
    assert [row["uri"].rsplit("/", 1)[1] for row in images] == ["t.tar#a.jpg", "t.tar#a.jpg#2", "t.tar#b.jpg"]
    assert len({row["image_id"] for row in images}) == 3 and all(row["error_type"] is None for row in images)
    assert [read_image_bytes(row["uri"]) for row in images] == [JPEG, JPEG[:-1], JPEG[:-2]]


def test_a_file_or_member_larger_than_an_image_within_max_pixels_can_be_is_not_read(tmp_path: Path) -> None:
    # a video or a disk image named like a photo: read whole, it could take more memory than the read task has
    limit = largest_image_bytes(1000)  # 8 bytes per pixel and 16 MiB of metadata
    with open(tmp_path / "huge.tif", "wb") as huge:
        huge.truncate(limit + 1)  # sparse: nothing to read, were it read
    (tmp_path / "small.jpg").write_bytes(JPEG)
    (tmp_path / "s.tar").write_bytes(tar_of({"big.jpg": bytes(limit + 1), "k1.jpg": JPEG}))
    shards = list_shards(str(tmp_path), files_per_shard=4).shards
    result = read_shards(pa.table({"shard": [shard.to_json() for shard in shards]}), image_column="image", max_file_bytes=limit)
    rows = [row for cell in result.column("images") for row in unnest(cell, ENCODED_IMAGE_SCHEMA).to_pylist()]
    outcome = {row["uri"].rsplit("/", 1)[1]: row["error_type"] or len(row["data"]) for row in rows}
    assert outcome == {"huge.tif": "file_too_large", "small.jpg": len(JPEG), "s.tar#big.jpg": "file_too_large", "s.tar#k1.jpg": len(JPEG)}
    assert rows[0]["error_message"] == f"{limit + 1} bytes, more than an image within --max-pixels can take ({limit}); not read"


def test_files_named_like_glob_patterns_are_read_as_named(tmp_path: Path) -> None:
    # fsspec's cat takes "[r].jpg" for a pattern matching "r.jpg"; the read stage reads each file by its own name
    named = {"[r].jpg": JPEG, "r.jpg": JPEG[:-1], "s*t.jpg": JPEG[:-2], "st.jpg": JPEG[:-3], "b?.jpg": JPEG[:-4]}
    for name, data in named.items():
        (tmp_path / name).write_bytes(data)
    images = [row for shard in _read(tmp_path) for row in shard]
    assert {row["uri"].rsplit("/", 1)[1]: row["data"] for row in images} == named


def test_an_image_column_of_another_type_names_its_type_and_large_binary_is_read(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": ["photos/a.jpg", "photos/b.jpg"]}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"image": pa.array([{"path": "a.jpg"}], pa.struct([("path", pa.string())]))}), tmp_path / "no-bytes.parquet")
    pq.write_table(pa.table({"image": pa.array([JPEG], pa.large_binary())}), tmp_path / "large.parquet")
    paths, no_bytes, large = (_read(tmp_path / name)[0] for name in ("paths.parquet", "no-bytes.parquet", "large.parquet"))
    assert [row["error_type"] for row in paths] == ["missing_image_column"] * 2
    assert "holds string, not image bytes" in paths[0]["error_message"] and "--image-column" in paths[0]["error_message"]
    assert no_bytes[0]["error_type"] == "missing_image_column" and "holds struct<path: string>" in no_bytes[0]["error_message"]
    assert large[0]["data"] == JPEG and large[0]["error_type"] is None


@pytest.mark.usefixtures("ray_local")
def test_shards_grouped_into_input_blocks_leave_the_read_stage_one_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as a run of 8,192 shards or more reaches Ray Data: blocks of 8, each read into 8 blocks of one shard for the actors
    for number in range(40):
        (tmp_path / f"{number:02d}.jpg").write_bytes(JPEG)
    shards = list_shards(str(tmp_path), files_per_shard=1).shards
    monkeypatch.setattr(jobs.run, "_INPUT_BLOCKS", 5)
    dataset = shard_input(shards)
    assert dataset.num_blocks() == 5
    read = dataset.map_batches(read_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"image_column": "image"}).materialize()
    blocks = [ray.get(ref) for ref in read.to_arrow_refs()]
    assert [block.num_rows for block in blocks] == [1] * 40
    assert sorted(block["shard_id"][0].as_py() for block in blocks) == sorted(shard.shard_id for shard in shards)
