"""List stage (driver): expand an input URI into shards, the unit of work, retry and commit.

A shard is one WebDataset-style ``.tar`` file, one Parquet file with an image-bytes column,
or a group of up to ``files_per_shard`` loose image files in sorted order. Its ``shard_id`` is
a hash of its kind and its sources' URIs, sizes and versions (ETag, or mtime where the store
has none), so the same input always yields the same shards and the same output file names.
Listing reads no object bytes, except under ``--limit``, where tar headers and Parquet footers
are read to count images. For ``--incremental`` runs, sources that earlier runs already
processed (:class:`ProcessedSources`, matched by URI, size and version) are left out before
the loose files are grouped.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import hashlib
import itertools
import json
import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError
from pipeline.storage import display_uri, is_transient, listing_filesystem, retrying

PREFIXES_LISTED_APART = 64
"""The most prefixes under an input that are listed in threads of their own (see :func:`files_under`)."""
_LISTING_THREADS = 16
_LOCAL_URI_PREFIX = "file://"
_LISTINGS_PER_YOUNG_PASS = 64
"""Pages (folders on disk, prefixes listed whole) listed between the garbage collector's young passes while listing."""
_PAGE_KEYS = 1000
"""Keys per S3 listing request: the most that S3 gives."""
_PAGES_SPLIT_OFF = 8
_KEYS_AT_ONCE = 100_000
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Windows saves JPEGs from browsers as ``.jfif``; what a file holds is decided by its bytes, not its name."""
ShardKind = Literal["files", "tar", "parquet"]


@dataclass(frozen=True, slots=True)
class Source:
    """One listed object: its full URI, size in bytes and version (ETag or mtime). Without an
    instance dict (a run holds one per listed file, millions of them)."""

    uri: str
    size: int
    version: str

    def as_dict(self) -> dict[str, str | int]:
        """The fields by name, for JSON and Arrow rows."""
        return {"uri": self.uri, "size": self.size, "version": self.version}

    @property
    def key(self) -> str:
        """What identifies this exact content for ``--incremental``: ``uri<TAB>size<TAB>version``."""
        return f"{self.uri}\t{self.size}\t{self.version}"


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: str
    kind: ShardKind
    sources: tuple[Source, ...]
    max_images: int | None = None

    def to_json(self) -> str:
        # not dataclasses.asdict, which deep-copies every source: three times as fast over a long listing
        sources = [source.as_dict() for source in self.sources]
        return json.dumps({"kind": self.kind, "max_images": self.max_images, "shard_id": self.shard_id, "sources": sources})

    @classmethod
    def from_json(cls, text: str) -> Shard:
        fields = json.loads(text)
        return cls(
            shard_id=fields["shard_id"],
            kind=fields["kind"],
            sources=tuple(Source(**source) for source in fields["sources"]),
            max_images=fields["max_images"],
        )


@dataclass(frozen=True)
class ProcessedSources:
    """Sources that committed runs processed completely: ``keys`` (:attr:`Source.key`) and the
    number of ``images`` each held, from the runs ``run_ids``. A source that several runs
    processed is there once for each: the same content, so the same images."""

    keys: pa.Array
    images: pa.Array
    run_ids: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    shards: list[Shard]
    ignored_files: int
    """Files under the prefix that are neither images, tars nor Parquet, or are hidden (``.x``, ``_x``, or in such a folder)."""
    skipped_files: int = 0
    """Images, tars and Parquet files left out because earlier runs processed them (``--incremental``)."""
    skipped_images: int = 0


@dataclass
class ListingProgress:
    """How far a listing under way has come, for progress lines: files listed so far and, where
    an object store's prefixes are listed apart, how many of them are done."""

    files: int = 0
    prefixes: int = 0
    prefixes_listed: int = 0


def extension(path: str) -> str:
    """The extension of the file or tar member ``path`` in lower case (``".jpg"``), or ``""``: what
    follows the last dot of its name. A hidden name's (``.jpg``) is the whole name; its callers
    leave hidden names out before asking."""
    name = path[path.rfind("/") + 1 :]
    return name[name.rfind(".") :].lower() if "." in name else ""


def image_member(member: tarfile.TarInfo) -> bool:
    """Whether a tar member is an image to segment: a file with an image extension, not hidden.
    A tar made on macOS holds an AppleDouble file (``._photo.jpg``, the attributes of
    ``photo.jpg``) beside each image; as images they would each be a ``not_an_image`` row."""
    return member.isfile() and extension(member.name) in IMAGE_EXTENSIONS and "/." not in "/" + member.name


def list_shards(
    input_uri: str,
    *,
    files_per_shard: int,
    limit: int | None = None,
    processed: ProcessedSources | None = None,
    progress: ListingProgress | None = None,
) -> Listing:
    """All shards under ``input_uri`` in a stable order, less the ``processed`` sources; with
    ``limit``, just enough for N images. ``progress`` is kept up to date as the files are listed."""
    fs, root = listing_filesystem(input_uri)
    found = retrying(lambda: _find(fs, root, progress), f"listing {input_uri}")
    if found is None:
        pattern = " (a folder, a prefix or one file: patterns such as * are not expanded)" if set("*?[") & set(input_uri) else ""
        raise InputError(f"input not found: {display_uri(input_uri)}{pattern}")
    root_uri = fs.unstrip_protocol(root)
    loose: list[Source] = []
    containers: list[tuple[ShardKind, Source]] = []
    ignored = 0
    for source in sorted(found, key=lambda source: source.uri):
        suffix = extension(source.uri)
        if _hidden(source.uri, root_uri):
            ignored += 1
        elif suffix in (".tar", ".parquet"):
            containers.append(("tar" if suffix == ".tar" else "parquet", source))
        elif suffix in IMAGE_EXTENSIONS:
            loose.append(source)
        else:
            ignored += 1
    skipped = skipped_images = 0
    if processed is not None:
        done, skipped_images = _processed(loose + [source for _, source in containers], processed)
        skipped = done.count(True)
        loose, containers = (
            [source for source, is_done in zip(loose, done) if not is_done],
            [container for container, is_done in zip(containers, done[len(loose) :]) if not is_done],
        )
    groups: list[tuple[ShardKind, list[Source]]] = [
        ("files", loose[start : start + files_per_shard]) for start in range(0, len(loose), files_per_shard)
    ]
    groups += [(kind, [source]) for kind, source in containers]
    shards = [_shard(kind, sources) for kind, sources in groups]
    if limit is not None:
        shards = _limit(fs, shards, limit)
    return Listing(shards=shards, ignored_files=ignored, skipped_files=skipped, skipped_images=skipped_images)


def _hidden(uri: str, root_uri: str) -> bool:
    """Whether ``uri`` (a file under ``root_uri``, or ``root_uri`` itself) is hidden: its name, or a
    folder's between ``root_uri`` and it, starts with "." or "_", as Hive, Spark and Arrow take
    them (``_SUCCESS``, ``_temporary/``, ``.thumbnails/``). Folders above ``root_uri`` do not count."""
    below_root = "/" + (uri.removeprefix(root_uri.rstrip("/") + "/") if uri != root_uri else posixpath.basename(uri))
    return "/." in below_root or "/_" in below_root


def _find(fs: fsspec.AbstractFileSystem, root: str, progress: ListingProgress | None) -> list[Source] | None:
    """The files under ``root`` (or ``root`` itself, a file), or ``None`` if nothing is there.

    Listing comes first: on object stores, asking about a prefix as if it were an object can be
    refused (403) to a job that may list the bucket but read only some of it."""
    try:
        found = files_under(fs, root, progress)
        if found and not (len(found) == 1 and found[0].uri.rstrip("/") == fs.unstrip_protocol(root).rstrip("/")):
            return found
        info = fs.info(root)
    except FileNotFoundError:
        return None
    except PermissionError as error:
        raise InputError(f"not allowed to list {display_uri(fs.unstrip_protocol(root))}: {error}") from None
    return [_source(fs, info)] if info.get("type") == "file" else None


def files_under(fs: fsspec.AbstractFileSystem, root: str, progress: ListingProgress | None = None) -> list[Source]:
    """The files under ``root``. An object store lists a prefix 1,000 keys per request, one
    request after another, so ``root``'s prefixes (``2026/``, ``camera-7/``) are listed in
    threads of their own: where there are fewer than the threads, one level deeper (``2026/11/``)
    while that gives at most :data:`PREFIXES_LISTED_APART`. Where ``root`` itself holds more,
    most would be listed in a request or two, so ``root`` is listed as one, unless on S3 a page of
    its keys shows many keys per prefix (:func:`_s3_keys_per_prefix_are_many`: 256 hash prefixes
    of thousands of keys). On S3, a level of many pages (``images/<uuid>.jpg``) is listed in key
    ranges at once (:func:`_s3_level`). The file systems' infos (a dict of about 1 KB per file)
    are made :class:`Source` records as each prefix (each folder on disk) is listed, so that they
    are not all held at once; ``progress`` counts them.

    Python's garbage collector makes only young passes meanwhile (:func:`_young_passes_only`)."""
    with _young_passes_only() as after_a_listing:
        return _files_under(fs, root, progress or ListingProgress(), after_a_listing)


@contextmanager
def _young_passes_only() -> Iterator[Callable[[], None]]:
    """Python's automatic garbage collection paused, and left on or off as it was found, with a
    function that passes over the young generations every :data:`_LISTINGS_PER_YOUNG_PASS` calls.

    A listing makes about 7 short-lived objects per key (the XML tree of each S3 page, botocore's
    and aiohttp's per request, some in reference cycles) and keeps one, each of which counts
    towards the collector's next pass; the passes that set off over every object of a driver
    that has imported torch and Ray (about 440,000) took a third of the listing's CPU time. The
    young passes, over what was made since the last, still collect the cycles that requests leave
    (about 340 objects per page, 5 MB per 100,000 keys otherwise kept until the listing ends)."""
    collecting = gc.isenabled()
    gc.disable()
    calls = itertools.count(1)

    def after_a_listing() -> None:
        if next(calls) % _LISTINGS_PER_YOUNG_PASS == 0:
            gc.collect(1)

    try:
        yield after_a_listing
    finally:
        if collecting:
            gc.enable()


def _files_under(
    fs: fsspec.AbstractFileSystem, root: str, progress: ListingProgress, after_a_listing: Callable[[], None]
) -> list[Source]:
    progress.files = progress.prefixes = progress.prefixes_listed = 0  # a retried listing starts over

    def sources(infos: Iterable[dict]) -> list[Source]:
        return [_source(fs, info) for info in infos if info.get("type") != "directory"]

    counting = threading.Lock()  # levels are listed in threads at once

    def counted(listed: list[Source]) -> list[Source]:
        with counting:
            progress.files += len(listed)
        after_a_listing()
        return listed

    def tree(prefix: str) -> list[Source]:
        return sources(fs.find(prefix, detail=True, withdirs=False).values())

    on_s3 = "s3" in fs.protocol and hasattr(fs, "call_s3") and not getattr(fs, "version_aware", False)

    def too_many(prefixes: list[str]) -> bool:
        return len(prefixes) > PREFIXES_LISTED_APART and not (on_s3 and _s3_keys_per_prefix_are_many(fs, prefixes))

    def level(prefix: str) -> tuple[list[Source], list[str]]:
        """The files directly under ``prefix``, counted, and the prefixes below it."""
        if on_s3:
            return _s3_level(fs, prefix, counted)
        fs.invalidate_cache(prefix)  # an earlier listing in this process may be cached, and stale
        infos = fs.ls(prefix, detail=True)
        names = [info["name"] for info in infos if info.get("type") == "directory"]
        # a store may list a prefix's marker in it
        return counted(sources(infos)), [name for name in names if name.rstrip("/") != prefix.rstrip("/")]

    if isinstance(fs, LocalFileSystem):
        return _local_files(root, counted)
    found, prefixes = level(root)
    if too_many(prefixes):
        progress.files = 0  # the top level's files are listed again, with the rest
        return counted(tree(root))
    with ThreadPoolExecutor(max_workers=_LISTING_THREADS) as pool:
        while 0 < len(prefixes) < _LISTING_THREADS:
            levels = list(pool.map(level, prefixes))
            deeper = [prefix for _, below in levels for prefix in below]
            if too_many(deeper):
                progress.files -= sum(len(files) for files, _ in levels)  # listed again, with their prefixes' trees
                break
            found += [source for files, _ in levels for source in files]
            prefixes = deeper
        progress.prefixes = len(prefixes)
        for listed in as_completed([pool.submit(tree, prefix) for prefix in prefixes]):
            found += counted(listed.result())
            progress.prefixes_listed += 1
        return found


def _local_files(root: str, counted: Callable[[list[Source]], list[Source]]) -> list[Source]:
    """The files under the local folder ``root`` (``counted`` folder by folder), as fsspec's
    ``LocalFileSystem.walk`` gives them, from ``os.scandir``'s entries: fsspec made each an info
    dict of a dozen fields and normalised its path twice, 8 of the 13 us per file that the listing
    took on this repository's CPU. Equal to fsspec's: anything but a folder is a file; a symbolic
    link is never followed into a folder, its size is its target's (0 where the target is gone)
    and its version the link's own mtime; a folder that cannot be listed, or is gone, is left out
    (``root`` itself too, which the caller then asks about as a file)."""
    found: list[Source] = []
    folders = [root]
    while folders:
        files = []
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif (source := _local_source(entry)) is not None:
                        files.append(source)
        except OSError:
            continue
        found += counted(files)
    return found


def _local_source(entry: os.DirEntry) -> Source | None:
    """``entry``'s record, ``None`` where it is gone."""
    try:
        status = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    size = status.st_size
    if entry.is_symlink():
        try:
            size = entry.stat().st_size
        except OSError:
            size = 0
    return Source(uri=_LOCAL_URI_PREFIX + entry.path, size=size, version=str(status.st_mtime))


def _s3_keys_per_prefix_are_many(fs: fsspec.AbstractFileSystem, prefixes: list[str]) -> bool:
    """Whether a page of the keys from the first of the S3 folders ``prefixes`` (folders side by
    side) on falls under fewer folders than there are listing threads, so about 60 keys each or
    more: then listing them apart, a request for each at least, takes fewer rounds of requests
    than one listing of all. The page starts after the folder's name, so that the files beside
    the folders, which may sort before them, do not fill it."""
    bucket, parent = _s3_folder(fs, posixpath.dirname(prefixes[0].rstrip("/")))
    first = fs.split_path(prefixes[0])[1].rstrip("/")
    answer = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=parent, StartAfter=first, MaxKeys=_PAGE_KEYS)
    keys = [content["Key"].removeprefix(parent) for content in answer.get("Contents", [])]
    return bool(answer.get("IsTruncated")) and len({key.split("/")[0] for key in keys if "/" in key}) < _LISTING_THREADS


def _s3_folder(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    """The bucket of the S3 folder ``path`` and the prefix of its keys (``""`` for a bucket's top, else ending in "/")."""
    bucket, key, _ = fs.split_path(path)
    return bucket, f"{key.rstrip('/')}/" if key else ""


@dataclass
class _KeyRange:
    """The part of an S3 listing with keys (and folders' names) in ``(after, until]``, ``None``
    meaning no bound; ``token`` goes on from the last page listed."""

    after: str | None = None
    until: str | None = None
    token: str | None = None

    def reaches(self, name: str) -> bool:
        """Whether ``name`` is not past the range's end."""
        return self.until is None or name <= self.until

    def holds(self, key: str) -> bool:
        """Whether the object ``key`` is this range's: within both bounds, so that a store that
        ignored ``StartAfter`` would list the keys before the range again, but not keep them twice."""
        return (self.after is None or key > self.after) and self.reaches(key)


def _s3_level(fs: fsspec.AbstractFileSystem, path: str, counted: Callable[[list[Source]], list[Source]]) -> tuple[list[Source], list[str]]:
    """The objects directly in the S3 folder ``path`` (``counted`` page by page) and the folders
    in it, as ``fs.ls`` has them. A page holds 1,000 keys and the next page can only be asked for
    after it, so a folder of many pages is listed in key ranges at once: while fewer than
    :data:`_LISTING_THREADS` ranges are under way, each page that does not end its range splits
    off the range's rest beyond :func:`_split_key`, a key guessed from the page's names, as a
    range of its own. A folder of one page takes one request, as before.

    Why every key is listed exactly once, also on stores whose order is not S3's: a listing with
    ``Delimiter="/"`` holds one folder level, whose keys every store orders as S3 does (SeaweedFS
    orders a deeper listing folder by folder, and puts a folder by its name, ``x``, where S3 puts
    it by ``x/``), and each range keeps the keys within its bounds, so the ranges share no key.
    A folder can come back in two ranges, and is kept once."""
    bucket, prefix = _s3_folder(fs, path)
    bucket_uri = fs.unstrip_protocol(bucket) + "/"
    found: list[Source] = []
    folders: set[str] = set()

    def listing_page(part: _KeyRange) -> asyncio.Task:
        start = {"ContinuationToken": part.token} if part.token else {"StartAfter": part.after} if part.after else {}
        request = fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=_PAGE_KEYS, **start)
        return asyncio.ensure_future(request)

    async def list_ranges() -> None:
        under_way = {listing_page(first := _KeyRange()): first}
        try:
            while under_way:
                done, _ = await asyncio.wait(under_way, return_when=asyncio.FIRST_COMPLETED)
                for answer_of in done:
                    part, answer = under_way.pop(answer_of), answer_of.result()
                    contents = answer.get("Contents", [])
                    keys = [content["Key"] for content in contents]
                    folder_keys = [common["Prefix"] for common in answer.get("CommonPrefixes", [])]
                    folder_names = [folder.rstrip("/") for folder in folder_keys]
                    found.extend(counted([
                        Source(uri=bucket_uri + key, size=content["Size"], version=_version(content))
                        for key, content in zip(keys, contents) if part.holds(key)
                    ]))  # fmt: skip
                    # a folder has no lower bound: S3 can give folder q/ to the range after the one that holds the name q
                    folders.update(name for name in folder_names if part.reaches(name))
                    names = keys + folder_names
                    if not answer.get("IsTruncated") or not all(map(part.reaches, names)):
                        continue
                    part.token = answer["NextContinuationToken"]
                    if names and len(under_way) + 1 < _LISTING_THREADS:
                        letters = "".join(names).replace(prefix, "").replace("/", "")
                        split = _split_key(min(names), max(keys + folder_keys), part.until, prefix, letters)
                        if split is not None:
                            upper = _KeyRange(after=split, until=part.until)
                            under_way[listing_page(upper)] = upper
                            part.until = split
                    under_way[listing_page(part)] = part
        finally:
            for request in under_way:  # after an error: the other ranges' requests stop with it
                request.cancel()

    fsspec.asyn.sync(fs.loop, list_ranges)
    return found, sorted(f"{bucket}/{folder}" for folder in folders if folder != prefix.rstrip("/"))


def _split_key(page_first: str, page_last: str, until: str | None, prefix: str, letters: str) -> str | None:
    """Where the rest of a range, (``page_last``, ``until``], is split, spelled after ``prefix`` in
    ``letters``: halfway to ``until`` (``None``: past every key under ``prefix``), or as far as
    :data:`_PAGES_SPLIT_OFF` more pages as dense as the one from ``page_first`` to ``page_last``
    would reach, whichever is nearer. Halfway finds the middle of names spread evenly
    (``<uuid>.jpg``), the pages' density the end of numbered ones (``00001234.jpg``). ``None``
    where no key is found between."""
    digits = sorted(set(letters))
    if len(digits) < 2:
        return None
    width = max(len(page_first), len(page_last), len(until or "")) - len(prefix) + 1

    def number(key: str) -> int:
        value = 0
        for letter in key[len(prefix) :].ljust(width, digits[0])[:width]:
            value = value * len(digits) + max(0, bisect.bisect_right(digits, letter) - 1)
        return value

    last = number(page_last)
    end = len(digits) ** width if until is None else number(until)
    split = min((last + end) // 2, last + _PAGES_SPLIT_OFF * (last - number(page_first)))
    spelled = []
    for _ in range(width):
        split, digit = divmod(split, len(digits))
        spelled.append(digits[digit])
    key = prefix + "".join(reversed(spelled))
    return key if page_last < key and (until is None or key < until) else None


def _source(fs: fsspec.AbstractFileSystem, info: dict) -> Source:
    return Source(uri=fs.unstrip_protocol(info["name"]), size=int(info["size"]), version=_version(info))


def _processed(sources: list[Source], processed: ProcessedSources) -> tuple[list[bool], int]:
    """Which of ``sources`` ``processed`` holds, and how many images those held. The keys become
    Arrow strings :data:`_KEYS_AT_ONCE` at a time: a nightly run over millions of files, most of
    them processed, would otherwise hold them all as Python strings at once, and a set of the
    processed ones (200 MiB per million)."""
    chunks = []
    for start in range(0, len(sources), _KEYS_AT_ONCE):
        chunks.append(pa.array([source.key for source in sources[start : start + _KEYS_AT_ONCE]], pa.string()))
    where = pc.index_in(pa.chunked_array(chunks, pa.string()), value_set=processed.keys)  # the first of a key's repeats
    return pc.is_valid(where).to_pylist(), pc.sum(pc.take(processed.images, where.drop_null())).as_py() or 0


def _shard(kind: ShardKind, sources: list[Source], max_images: int | None = None) -> Shard:
    identity = "\n".join([kind, str(max_images), *(f"{s.uri}\t{s.size}\t{s.version}" for s in sources)])
    shard_id = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
    return Shard(shard_id=shard_id, kind=kind, sources=tuple(sources), max_images=max_images)


def _limit(fs: fsspec.AbstractFileSystem, shards: list[Shard], limit: int) -> list[Shard]:
    limited: list[Shard] = []
    remaining = limit
    for shard in shards:
        if remaining <= 0:
            break
        count = len(shard.sources) if shard.kind == "files" else _count_images(fs, shard)
        if count <= remaining:
            limited.append(shard)
        elif shard.kind == "files":
            limited.append(_shard("files", list(shard.sources[:remaining])))
        else:
            limited.append(_shard(shard.kind, list(shard.sources), max_images=remaining))
        remaining -= count
    return limited


def _count_images(fs: fsspec.AbstractFileSystem, shard: Shard) -> int:
    """About the rows that the read stage will give ``shard`` (a tar or Parquet file), from its
    tar headers or Parquet footer, without reading images: a cut or damaged container's images
    before the damage and its ``unreadable_archive`` row, one ``read_error`` row for a container
    that cannot be opened. A damaged member header ends the count quietly (one row short), and a
    Parquet file whose pages are damaged counts the rows its footer names."""
    path = fs._strip_protocol(shard.sources[0].uri)

    def count() -> int:
        counted = 0
        try:
            with fs.open(path, "rb") as file:
                if shard.kind == "parquet":
                    return pq.ParquetFile(file).metadata.num_rows
                with tarfile.open(fileobj=file, mode="r:") as tar:
                    for member in tar:
                        if member.offset_data + member.size > shard.sources[0].size:
                            raise tarfile.ReadError("the archive is cut off within a member")
                        counted += image_member(member)
            return counted
        except Exception as error:  # noqa: BLE001 - whatever a damaged container makes its parser raise
            if is_transient(error):
                raise
            return counted + 1

    return retrying(count, f"counting the images in {shard.sources[0].uri}")


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""
