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

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError
from pipeline.storage import display_uri, is_transient, listing_filesystem, retrying

PREFIXES_LISTED_APART = 64
"""The most prefixes under an input that are listed in threads of their own (see :func:`files_under`)."""
_LISTING_THREADS = 16
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Windows saves JPEGs from browsers as ``.jfif``; what a file holds is decided by its bytes, not its name."""
ShardKind = Literal["files", "tar", "parquet"]


@dataclass(frozen=True)
class Source:
    """One listed object: its full URI, size in bytes and version (ETag or mtime)."""

    uri: str
    size: int
    version: str

    @property
    def key(self) -> str:
        """What identifies this exact content for ``--incremental``: ``uri<TAB>size<TAB>version``."""
        return f"{self.uri}\t{self.size}\t{self.version}"


@dataclass(frozen=True)
class Shard:
    shard_id: str
    kind: ShardKind
    sources: tuple[Source, ...]
    max_images: int | None = None

    def to_json(self) -> str:
        # vars, not dataclasses.asdict, which deep-copies every source: three times as fast over a long listing
        return json.dumps({**vars(self), "sources": [vars(source) for source in self.sources]}, sort_keys=True)

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
    number of ``images`` each held, from the runs ``run_ids``."""

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


def image_extension(name: str) -> str | None:
    extension = posixpath.splitext(name)[1].lower()
    return extension if extension in IMAGE_EXTENSIONS else None


def image_member(member: tarfile.TarInfo) -> bool:
    """Whether a tar member is an image to segment: a file with an image extension, not hidden.
    A tar made on macOS holds an AppleDouble file (``._photo.jpg``, the attributes of
    ``photo.jpg``) beside each image; as images they would each be a ``not_an_image`` row."""
    return member.isfile() and image_extension(member.name) is not None and "/." not in "/" + member.name


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
        name = posixpath.basename(source.uri)
        if _hidden(source.uri, root_uri):
            ignored += 1
        elif name.lower().endswith(".tar"):
            containers.append(("tar", source))
        elif name.lower().endswith(".parquet"):
            containers.append(("parquet", source))
        elif image_extension(name):
            loose.append(source)
        else:
            ignored += 1
    skipped: set[str] = set()
    skipped_images = 0
    if processed is not None:
        skipped, skipped_images = _processed_keys(loose + [source for _, source in containers], processed)
        loose = [source for source in loose if source.key not in skipped]
        containers = [(kind, source) for kind, source in containers if source.key not in skipped]
    groups: list[tuple[ShardKind, list[Source]]] = [
        ("files", loose[start : start + files_per_shard]) for start in range(0, len(loose), files_per_shard)
    ]
    groups += [(kind, [source]) for kind, source in containers]
    shards = [_shard(kind, sources) for kind, sources in groups]
    if limit is not None:
        shards = _limit(fs, shards, limit)
    return Listing(shards=shards, ignored_files=ignored, skipped_files=len(skipped), skipped_images=skipped_images)


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
    most would be listed in a request or two, so ``root`` is listed as one. The file systems'
    infos (a dict of about 1 KB per file) are made :class:`Source` records as each prefix (each
    folder on disk) is listed, so that they are not all held at once; ``progress`` counts them."""
    progress = progress or ListingProgress()
    progress.files = progress.prefixes = progress.prefixes_listed = 0  # a retried listing starts over

    def sources(infos: Iterable[dict]) -> list[Source]:
        return [_source(fs, info) for info in infos if info.get("type") != "directory"]

    def tree(prefix: str) -> list[Source]:
        return sources(fs.find(prefix, detail=True, withdirs=False).values())

    def level(prefix: str) -> list[dict]:
        fs.invalidate_cache(prefix)  # an earlier listing in this process may be cached, and stale
        return fs.ls(prefix, detail=True)

    def prefixes_in(infos: Iterable[dict], parent: str) -> list[str]:  # a store may list a prefix's marker in it
        names = [info["name"] for info in infos if info.get("type") == "directory"]
        return [name for name in names if name.rstrip("/") != parent.rstrip("/")]

    def counted(listed: list[Source]) -> list[Source]:
        progress.files += len(listed)
        return listed

    if isinstance(fs, LocalFileSystem):
        return [source for _, _, files in fs.walk(root, detail=True) for source in counted(sources(files.values()))]
    top = level(root)
    prefixes = prefixes_in(top, root)
    if len(prefixes) > PREFIXES_LISTED_APART:
        return counted(tree(root))
    found = counted(sources(top))
    with ThreadPoolExecutor(max_workers=_LISTING_THREADS) as pool:
        while 0 < len(prefixes) < _LISTING_THREADS:
            levels = list(pool.map(level, prefixes))
            deeper = [prefix for parent, infos in zip(prefixes, levels) for prefix in prefixes_in(infos, parent)]
            if len(deeper) > PREFIXES_LISTED_APART:
                break
            found += [source for infos in levels for source in counted(sources(infos))]
            prefixes = deeper
        progress.prefixes = len(prefixes)
        for listed in as_completed([pool.submit(tree, prefix) for prefix in prefixes]):
            found += counted(listed.result())
            progress.prefixes_listed += 1
        return found


def _source(fs: fsspec.AbstractFileSystem, info: dict) -> Source:
    return Source(uri=fs.unstrip_protocol(info["name"]), size=int(info["size"]), version=_version(info))


def _processed_keys(sources: list[Source], processed: ProcessedSources) -> tuple[set[str], int]:
    """The keys of ``sources`` that ``processed`` holds, and how many images those held."""
    keys = pa.array([source.key for source in sources], pa.string())
    done = pc.filter(keys, pc.is_in(keys, value_set=processed.keys))
    images = pc.sum(pc.filter(processed.images, pc.is_in(processed.keys, value_set=done))).as_py()
    return set(done.to_pylist()), images or 0


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
