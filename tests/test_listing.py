"""List stage: shard kinds, grouping, stable ids, --limit and a missing input."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.storage import delaying_proxy
from jobs.sample import encode, photos
from pipeline.errors import InputError
import pipeline.listing as listing_module
from pipeline.listing import ListingProgress, ProcessedSources, Shard, files_under, list_shards
from pipeline.storage import listing_filesystem


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    jpeg = encode(photos()["chelsea"], "JPEG")
    for index in range(5):
        (tmp_path / "loose" / f"{index:02d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "loose" / f"{index:02d}.jpg").write_bytes(jpeg)
    (tmp_path / "loose" / "notes.txt").write_text("not an image")
    (tmp_path / "loose" / ".hidden.jpg").write_bytes(jpeg)
    (tmp_path / "loose" / "_SUCCESS").write_text("")
    for hidden_folder in ("loose/.thumbnails", "_temporary/0"):  # Hive's and Spark's hidden folders, at any depth
        (tmp_path / hidden_folder).mkdir(parents=True)
        (tmp_path / hidden_folder / "10.jpg").write_bytes(jpeg)
    (tmp_path / "loose" / "UPPER.JPEG").write_bytes(jpeg)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name in ("k1.jpg", "k1.json", "k2.png", "k3.jpg"):
            member = tarfile.TarInfo(name)
            member.size = len(jpeg)
            tar.addfile(member, io.BytesIO(jpeg))
    pq.write_table(pa.table({"image": [jpeg] * 4}), tmp_path / "b.parquet")
    return tmp_path


def test_shard_kinds_and_grouping(archive: Path) -> None:
    listing = list_shards(str(archive), files_per_shard=4)
    kinds = [shard.kind for shard in listing.shards]
    assert kinds == ["files", "files", "tar", "parquet"]
    assert [len(shard.sources) for shard in listing.shards] == [4, 2, 1, 1]
    assert listing.ignored_files == 5  # notes.txt, .hidden.jpg, _SUCCESS and the images in .thumbnails/ and _temporary/0/
    uris = [source.uri for shard in listing.shards[:2] for source in shard.sources]
    assert uris == sorted(uris) and all(uri.startswith("file://") for uri in uris)
    assert any(uri.endswith("loose/UPPER.JPEG") for uri in uris)  # extensions match in any case


def test_sources_that_earlier_runs_processed_are_left_out_once_however_many_runs_processed_them(archive: Path) -> None:
    everything = [source for shard in list_shards(str(archive), files_per_shard=4).shards for source in shard.sources]
    tar = next(source for source in everything if source.uri.endswith("a.tar"))
    first_loose = next(source for source in everything if source.uri.endswith("00.jpg"))
    # two runs processed the tar (3 images) and one loose file; one of them also a file no longer there
    keys = [tar.key, first_loose.key, tar.key, "file:///gone.jpg\t1\t1"]
    processed = ProcessedSources(keys=pa.array(keys), images=pa.array([3, 1, 3, 1]), run_ids=("a", "b"))
    listing = list_shards(str(archive), files_per_shard=4, processed=processed)
    left = [source for shard in listing.shards for source in shard.sources]
    assert left == [source for source in everything if source not in (tar, first_loose)]
    assert (listing.skipped_files, listing.skipped_images) == (2, 4)


def test_jpegs_named_as_windows_and_old_cameras_name_them_are_images(tmp_path: Path) -> None:
    for name in ("saved.jfif", "DSC0001.JPE"):  # Windows saves a JPEG from a browser as .jfif
        (tmp_path / name).write_bytes(b"")
    listing = list_shards(str(tmp_path), files_per_shard=4)
    assert [len(shard.sources) for shard in listing.shards] == [2] and listing.ignored_files == 0


def test_shard_ids_are_stable_and_follow_content(archive: Path) -> None:
    first = list_shards(str(archive), files_per_shard=4).shards
    again = list_shards(str(archive), files_per_shard=4).shards
    assert [s.shard_id for s in first] == [s.shard_id for s in again]
    assert len({s.shard_id for s in first}) == len(first)
    time.sleep(0.01)
    (archive / "b.parquet").write_bytes((archive / "b.parquet").read_bytes())  # new mtime: a new version
    changed = list_shards(str(archive), files_per_shard=4).shards
    assert [s.shard_id for s in changed[:3]] == [s.shard_id for s in first[:3]]
    assert changed[3].shard_id != first[3].shard_id


def test_limit_takes_the_first_images(archive: Path) -> None:
    assert sum(len(s.sources) for s in list_shards(str(archive), files_per_shard=4, limit=3).shards) == 3
    limited = list_shards(str(archive), files_per_shard=4, limit=8).shards
    assert [s.kind for s in limited] == ["files", "files", "tar"]
    assert limited[2].max_images == 2  # 6 loose files, then 2 of the tar's 3 images
    assert [Shard.from_json(shard.to_json()) for shard in limited] == limited  # as the read tasks get them
    assert list_shards(str(archive), files_per_shard=4, limit=9).shards[2].max_images is None


def test_limit_counts_a_damaged_container_as_the_rows_it_will_give(archive: Path) -> None:
    tar = (archive / "a.tar").read_bytes()
    (archive / "a.tar").write_bytes(tar[: len(tar) // 2])  # cut within k2.png: k1.jpg, then an unreadable_archive row
    (archive / "b.parquet").write_bytes(b"PAR1 not a Parquet file PAR1")  # one unreadable_archive row
    shards = list_shards(str(archive), files_per_shard=4, limit=9).shards
    assert [(shard.kind, shard.max_images) for shard in shards] == [("files", None), ("files", None), ("tar", None), ("parquet", None)]
    assert list_shards(str(archive), files_per_shard=4, limit=7).shards[2].max_images == 1


def test_single_file_input(archive: Path) -> None:
    listing = list_shards(str(archive / "a.tar"), files_per_shard=4)
    assert [s.kind for s in listing.shards] == ["tar"]


def test_only_folders_below_the_input_can_hide_it(archive: Path) -> None:
    (archive / "loose").rename(archive / "_staging")
    listing = list_shards(str(archive / "_staging"), files_per_shard=4)
    assert [len(shard.sources) for shard in listing.shards] == [4, 2] and listing.ignored_files == 4
    assert list_shards(str(archive / "_staging" / "00.jpg"), files_per_shard=4).ignored_files == 0
    assert list_shards(str(archive / "_staging" / ".hidden.jpg"), files_per_shard=4).ignored_files == 1


def test_a_local_folder_lists_as_fsspecs_walk_lists_it_links_and_all(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # shard ids and --incremental's keys hash each file's uri, size and version: they must not change with the listing's code
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "target.jpg").write_bytes(b"x" * 1234)
    (archive / "loose" / "link.jpg").symlink_to(elsewhere / "target.jpg")
    (archive / "loose" / "broken.jpg").symlink_to(elsewhere / "gone.jpg")
    (archive / "folder-link").symlink_to(elsewhere, target_is_directory=True)
    (archive / "deep" / "er" / "est").mkdir(parents=True)
    (archive / "deep" / "er" / "est" / "ünïcode name #1.jpg").write_bytes(b"y")
    (archive / "deep" / "empty").mkdir()
    os.mkfifo(archive / "deep" / "pipe.jpg")
    fs, root = listing_filesystem(str(archive))
    fsspecs = [listing_module._source(fs, info) for _, _, files in fs.walk(root, detail=True) for info in files.values()]
    listed = files_under(fs, root)
    assert sorted(listed, key=lambda source: source.uri) == sorted(fsspecs, key=lambda source: source.uri)
    by_name = {source.uri.rsplit("/", 1)[1]: source for source in listed}
    assert by_name["link.jpg"].size == 1234 and by_name["broken.jpg"].size == 0 and "target.jpg" not in by_name
    assert {"folder-link", "pipe.jpg", "ünïcode name #1.jpg"} <= by_name.keys()
    assert files_under(fs, root + "/a.tar") == files_under(fs, root + "/nope") == []  # the caller asks about a file itself


def test_a_listing_leaves_the_garbage_collector_as_it_found_it(archive: Path) -> None:
    memory = fsspec.filesystem("memory")
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            assert len(files_under(*listing_filesystem(str(archive)))) == 13
            with pytest.raises(FileNotFoundError):
                files_under(memory, "/nowhere")
            assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input not found"):
        list_shards(str(tmp_path / "nope"), files_per_shard=4)
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"input not found: .*/\*\.jpg \(a folder, a prefix or one file: patterns such as \* are not"):
        list_shards(str(tmp_path / "*.jpg"), files_per_shard=4)


def test_an_object_store_input_lists_as_the_same_tree_on_disk_does(archive: Path, s3, bucket: str, monkeypatch) -> None:
    # files at the top and at three depths; 3 prefixes at the top, 17 one level down: those are listed in threads
    jpeg = (archive / "loose" / "00.jpg").read_bytes()
    for path in ["nested/2026/11/c.jpg", *(f"days/{day:02d}/e.jpg" for day in range(1, 17))]:
        (archive / path).parent.mkdir(parents=True, exist_ok=True)
        (archive / path).write_bytes(jpeg)
    s3.put(f"{archive}/", f"{bucket}/in", recursive=True)

    def relative(input_uri: str) -> tuple[list, int]:
        listing = list_shards(input_uri, files_per_shard=4)
        root = input_uri if "://" in input_uri else Path(input_uri).as_uri()
        return [(shard.kind, [source.uri.removeprefix(root) for source in shard.sources]) for shard in listing.shards], listing.ignored_files

    on_disk = relative(str(archive))
    assert relative(f"s3://{bucket}/in") == on_disk and len(on_disk[0]) == 6 + 2  # 23 loose images, a tar, a Parquet file
    monkeypatch.setattr(listing_module, "PREFIXES_LISTED_APART", 2)  # three at the top: listed as one
    assert relative(f"s3://{bucket}/in") == on_disk
    monkeypatch.undo()
    # new prefixes at the top and below: s3fs's cached listings of the earlier runs are not reused
    s3.pipe({f"{bucket}/in/fresh/d.jpg": jpeg, f"{bucket}/in/nested/2027/01/f.jpg": jpeg})
    shards, _ = relative(f"s3://{bucket}/in")
    assert {"/fresh/d.jpg", "/nested/2027/01/f.jpg"} <= {uri for _, uris in shards for uri in uris}
    assert [shard.kind for shard in list_shards(f"s3://{bucket}/in/a.tar", files_per_shard=4).shards] == ["tar"]
    with pytest.raises(InputError, match="input not found"):
        list_shards(f"s3://{bucket}/nothing-here", files_per_shard=4)


def test_a_folder_of_many_pages_is_listed_in_key_ranges_at_once_with_every_key_once(s3, bucket: str, monkeypatch) -> None:
    # names that S3 and SeaweedFS order differently around a folder (x/ against x-1.jpg, x.jpg), that
    # sort outside ASCII, and many hashed and numbered ones; a folder's marker; folders inside
    names = ["x", "x-1.jpg", "x.jpg", "x0.jpg", "x.jpg.txt", "B.jpg", "~.jpg", "é.jpg", "日.jpg", "😀.jpg", "a b.jpg"]
    names += ["x/in.jpg", "x.jpg/deep/a.jpg", "sub/", "sub/q.jpg"]
    names += [f"{hashlib.blake2b(str(index).encode(), digest_size=8).hexdigest()}.jpg" for index in range(120)]
    names += [f"{index:08d}.jpg" for index in range(60)]
    s3.pipe({f"{bucket}/in/{name}": b"x" * (index % 5) for index, name in enumerate(names)} | {f"{bucket}/in/": b""})
    fs, root = listing_filesystem(f"s3://{bucket}/in")
    expected = {listing_module._source(s3, info) for info in s3.find(f"{bucket}/in", detail=True, withdirs=False).values()}
    whole_pages = list_shards(f"s3://{bucket}/in", files_per_shard=16)
    for page_keys in (2, 3, 7):  # about 100, 66 and 28 pages: many ranges, split at many places
        monkeypatch.setattr(listing_module, "_PAGE_KEYS", page_keys)
        progress = ListingProgress()
        found = files_under(fs, root, progress)
        assert len(found) == len(expected) == progress.files and set(found) == expected
        assert list_shards(f"s3://{bucket}/in", files_per_shard=16) == whole_pages


def test_a_listing_in_key_ranges_that_meets_an_outage_lists_every_key_once_when_the_store_is_back(private_s3, monkeypatch) -> None:
    import s3fs

    environment = private_s3.environment()
    writer = s3fs.S3FileSystem(endpoint_url=private_s3.endpoint, key=environment["AWS_ACCESS_KEY_ID"],
                               secret=environment["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)  # fmt: skip
    writer.mkdir("archive")
    names = [f"{hashlib.blake2b(str(index).encode(), digest_size=8).hexdigest()}.jpg" for index in range(300)]
    writer.pipe({f"archive/flat/{name}": b"x" for name in names})
    monkeypatch.setattr(listing_module, "_PAGE_KEYS", 4)  # 75 pages, in up to 16 ranges
    progress = ListingProgress()
    listed_when_stopped = []

    def stop_mid_listing_and_start_again() -> None:
        deadline = time.monotonic() + 120  # a listing that failed early must not leave the test waiting
        while progress.files < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        private_s3.stop()
        listed_when_stopped.append(progress.files)
        time.sleep(5)  # s3fs's and botocore's retries of a request may ride it out, or segpipe's start the listing over
        private_s3.start()

    with delaying_proxy(private_s3.endpoint, 0.2) as endpoint:  # slow enough to be stopped part-way
        for name, value in {**environment, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        outage = threading.Thread(target=stop_mid_listing_and_start_again)
        outage.start()
        try:
            listing = list_shards("s3://archive/flat", files_per_shard=16, progress=progress)
        finally:
            outage.join()
            s3fs.S3FileSystem.clear_instance_cache()
    assert listed_when_stopped[0] < len(names), "the outage must land mid-listing"
    listed = [source.uri for shard in listing.shards for source in shard.sources]
    assert listed == [f"s3://archive/flat/{name}" for name in sorted(names)] and progress.files == len(names)


def test_more_prefixes_than_are_listed_apart_still_are_where_each_holds_many_keys(s3, bucket: str, monkeypatch) -> None:
    # scaled down: 2 threads, pages of 4 keys, more than 2 prefixes "many"; a page of keys under fewer prefixes
    # than threads means more keys each than a thread's share of a page: listing them apart takes fewer rounds
    monkeypatch.setattr(listing_module, "PREFIXES_LISTED_APART", 2)
    monkeypatch.setattr(listing_module, "_LISTING_THREADS", 2)
    monkeypatch.setattr(listing_module, "_PAGE_KEYS", 4)
    s3.pipe({f"{bucket}/hashed/{shard:02x}/{index}.jpg": b"x" for shard in range(4) for index in range(8)} | {f"{bucket}/hashed/top.jpg": b"x"})
    s3.pipe({f"{bucket}/sparse/{shard:02x}/0.jpg": b"x" for shard in range(12)})
    for name, prefixes_listed_apart in (("hashed", 4), ("sparse", 0)):
        progress = ListingProgress()
        found = files_under(*listing_filesystem(f"s3://{bucket}/{name}"), progress)
        expected = {listing_module._source(s3, info) for info in s3.find(f"{bucket}/{name}", detail=True).values()}
        assert set(found) == expected and len(found) == len(expected) == progress.files
        assert progress.prefixes == progress.prefixes_listed == prefixes_listed_apart


def test_a_range_of_keys_is_split_where_the_names_say_the_keys_are() -> None:
    # numbered names: about 8 more pages as dense as the last (counted in the 14 letters of the names,
    # not in decimal digits); names spread evenly: halfway to the end
    numbered = listing_module._split_key("in/00000000.jpg", "in/00000999.jpg", None, "in/", "0123456789.jpg")
    assert "in/00004" < numbered < "in/00012"
    hashed = listing_module._split_key("in/0003.jpg", "in/0fff.jpg", None, "in/", "0123456789abcdef.jpg")
    assert "in/6" < hashed < "in/a" and listing_module._split_key("in/0003.jpg", "in/0fff.jpg", hashed, "in/", "0123456789abcdef.jpg") < hashed
    assert listing_module._split_key("in/a", "in/b", "in/b", "in/", "ab") is None  # nothing between


def test_a_listing_counts_its_files_and_prefixes_as_it_goes(archive: Path, s3, bucket: str) -> None:
    for day in range(1, 17):
        (archive / "days" / f"{day:02d}").mkdir(parents=True)
        (archive / "days" / f"{day:02d}" / "e.jpg").write_bytes((archive / "loose" / "00.jpg").read_bytes())
    s3.put(f"{archive}/", f"{bucket}/in", recursive=True)
    files = sum(1 for path in archive.rglob("*") if path.is_file())
    on_disk, in_store = ListingProgress(), ListingProgress()
    list_shards(str(archive), files_per_shard=4, progress=on_disk)
    list_shards(f"s3://{bucket}/in", files_per_shard=4, progress=in_store)
    assert on_disk == ListingProgress(files=files)  # on disk, folder by folder
    # three prefixes at the top, so the 18 a level down are listed apart: 16 days, loose/.thumbnails and _temporary/0
    assert in_store == ListingProgress(files=files, prefixes=18, prefixes_listed=18)


@pytest.mark.parametrize(
    "path, suffix",
    [("s3://b/in/a.JPG", ".jpg"), ("in/photo.jpeg", ".jpeg"), ("in/x.tar.gz", ".gz"), ("in/x.TAR", ".tar"),
     ("in/dir.d/photo", ""), ("in/noext", ""), ("in/x.", "."), ("member.jfif", ".jfif")],
)  # fmt: skip
def test_a_file_is_known_by_its_extension_in_any_case(path: str, suffix: str) -> None:
    assert listing_module.extension(path) == suffix
