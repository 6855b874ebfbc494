"""Read stage (CPU tasks): one shard descriptor -> one shard row of compressed image bytes.

Bytes stay compressed: they, not decoded pixels, cross the object store to the model actors.
Each image gets its ``uri`` (for a tar or Parquet member, ``CONTAINER_URI#MEMBER`` where MEMBER
is the tar member name, ``NAME#N`` for the Nth member of a name that repeats, or the Parquet
row index) and ``image_id``, a stable hash of that uri.
What cannot be read becomes an image row with an ``error_type`` instead of bytes: a missing or
forbidden object (``read_error``), an unreadable archive (``unreadable_archive``), a Parquet
file without the image column (``missing_image_column``), a null cell (``empty_file``) or a
file or tar member larger than any image within ``--max-pixels`` (``file_too_large``).
Transient storage errors are retried (:func:`pipeline.storage.retrying`), never turned into rows.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.listing import Shard, image_member
from pipeline.schema import ENCODED_IMAGE_SCHEMA, nest, rows_to_table, single_array
from pipeline.storage import is_transient, retrying

_PARQUET_READ_ROWS = 64
_Member = tuple[str, bytes | None, tuple[str, str] | None]
"""A container's member: its name, its bytes or ``None``, and its ``(error_type, message)`` or ``None``."""


def image_id(uri: str) -> str:
    """Stable 16-hex-digit id of an image, from its uri (member key included)."""
    return hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()


def read_shards(batch: pa.Table, *, image_column: str, max_file_bytes: int | None = None) -> pa.Table:
    """Ray Data batch function: column ``shard`` (JSON descriptors) -> ``shard_id``, ``images``.
    A file or tar member above ``max_file_bytes`` (:func:`largest_image_bytes`) is not read."""
    shards = [Shard.from_json(text) for text in batch.column("shard").to_pylist()]
    images = [nest(rows_to_table(_read_shard(shard, image_column, max_file_bytes), ENCODED_IMAGE_SCHEMA)) for shard in shards]
    return pa.table({"shard_id": [shard.shard_id for shard in shards], "images": single_array(images)})


def largest_image_bytes(max_pixels: int) -> int:
    """The most bytes that a file of an image within ``max_pixels`` can take: uncompressed 16-bit
    RGBA (8 bytes per pixel) and 16 MiB of metadata. A larger file (a video, a disk image, a
    multi-page scan named like an image) is a ``file_too_large`` row, never read: reading it
    whole could take more memory than the read task has, and fail the run."""
    return max_pixels * 8 + 16 * 2**20


def _too_large(size: int, max_file_bytes: int | None) -> tuple[str, str] | None:
    if max_file_bytes is None or size <= max_file_bytes:
        return None
    return "file_too_large", f"{size} bytes, more than an image within --max-pixels can take ({max_file_bytes}); not read"


def read_image_bytes(uri: str, *, image_column: str = "image") -> bytes:
    """The encoded bytes of one image by its ``images.uri``: a file, or ``CONTAINER#MEMBER`` of a
    tar (member name, ``NAME#N`` for the Nth of a name) or Parquet file (row index). For looking
    at a few images, not for bulk reads."""
    container, member = _container_and_member(uri)
    if not member:
        fs, path = fsspec.core.url_to_fs(uri)
        return retrying(lambda: fs.cat_file(path), f"reading {uri}")
    fs, path = fsspec.core.url_to_fs(container)

    def find_member() -> bytes:
        with fs.open(path, "rb") as file:
            if container.lower().endswith(".tar"):
                members = _tar_members(file, fs.size(path))
            else:
                members = _parquet_members(file, image_column)
            for key, data, _ in _keyed(members):
                if key == member and data is not None:
                    return data
        raise FileNotFoundError(uri)

    return retrying(find_member, f"reading {uri}")


def _container_and_member(uri: str) -> tuple[str, str]:
    """``uri`` split at the first "#" that ends a tar's or Parquet file's name (paths and member
    names may hold "#" too); ``(uri, "")`` for an image file of its own."""
    for index, character in enumerate(uri):
        if character == "#" and uri[:index].lower().endswith((".tar", ".parquet")):
            return uri[:index], uri[index + 1 :]
    return uri, ""


def _read_shard(shard: Shard, image_column: str, max_file_bytes: int | None) -> list[dict]:
    if shard.kind == "files":
        return _read_files(shard, max_file_bytes)
    return retrying(lambda: _read_container(shard, image_column, max_file_bytes), f"reading {shard.sources[0].uri}")


def _read_container(shard: Shard, image_column: str, max_file_bytes: int | None) -> list[dict]:
    """Rows of a tar or Parquet shard; a transient error is raised, so the whole container is read again."""
    source = shard.sources[0]
    fs, path = fsspec.core.url_to_fs(source.uri)
    try:
        file = fs.open(path, "rb")
    except OSError as failure:  # missing or forbidden
        if is_transient(failure):
            raise
        return [_row(source.uri, None, ("read_error", f"{type(failure).__name__}: {failure}"))]
    rows: list[dict] = []
    with file:
        try:
            if shard.kind == "tar":
                members = _tar_members(file, source.size, max_file_bytes)
            else:
                members = _parquet_members(file, image_column)
            for member, data, error in _keyed(members):
                if shard.max_images is not None and len(rows) >= shard.max_images:
                    break
                rows.append(_row(f"{source.uri}#{member}", data, error))
        except Exception as failure:  # noqa: BLE001 - whatever a damaged container makes its parser raise
            if is_transient(failure):
                raise
            message = f"after {len(rows)} images: {type(failure).__name__}: {failure}"
            rows.append(_row(source.uri, None, ("unreadable_archive", message)))
    return rows


def _read_files(shard: Shard, max_file_bytes: int | None) -> list[dict]:
    """Rows of a shard of loose files, in listing order; files that failed transiently are fetched again."""
    fs, _ = fsspec.core.url_to_fs(shard.sources[0].uri)
    paths = {fsspec.core.url_to_fs(source.uri)[1]: source.uri for source in shard.sources}
    refused = {path: error for path, source in zip(paths, shard.sources) if (error := _too_large(source.size, max_file_bytes))}
    contents: dict[str, bytes | BaseException] = {}

    def fetch_the_rest() -> None:
        remaining = [path for path in paths if path not in contents and path not in refused]
        if not remaining:
            return
        # cat_ranges, not cat: cat takes "[r].jpg" for a glob pattern and reads "r.jpg"
        fetched = fs.cat_ranges(remaining, None, None, on_error="return")
        failures = []
        for path, data in zip(remaining, fetched):
            if isinstance(data, BaseException) and is_transient(data):
                failures.append(data)
            else:
                contents[path] = data
        if failures:
            raise failures[0]

    retrying(fetch_the_rest, f"reading {len(paths)} files from {shard.sources[0].uri}")
    rows = []
    for path, uri in paths.items():
        data = contents.get(path)
        if path in refused:
            rows.append(_row(uri, None, refused[path]))
        elif isinstance(data, BaseException):
            rows.append(_row(uri, None, ("read_error", f"{type(data).__name__}: {data}")))
        else:
            rows.append(_row(uri, data, None))
    return rows


def _keyed(members: Iterator[_Member]) -> Iterator[_Member]:
    """``members`` with the key that their uris end with: the member's name, and for a later
    member of the same name (``tar -r`` appends a new version under the old one) the name and
    ``#N`` for its Nth occurrence, so that each image has a uri and an ``image_id`` of its own."""
    seen: Counter[str] = Counter()
    for name, data, error in members:
        seen[name] += 1
        yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), data, error


def _tar_members(file, size: int, max_file_bytes: int | None = None) -> Iterator[_Member]:
    with tarfile.open(fileobj=file, mode="r|") as tar:
        for member in tar:
            if image_member(member):
                if (too_large := _too_large(member.size, max_file_bytes)) is not None:
                    yield member.name, None, too_large  # the stream skips its data
                else:
                    yield member.name, tar.extractfile(member).read(), None
        end = tar.offset
    # tarfile ends quietly at a header it cannot read, cut off or damaged, as at the end of the archive,
    # which is zero blocks after the last member: anything else there holds members that were not read.
    if size < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the archive ends at byte {size} without its end-of-archive blocks (truncated?)")
    file.seek(end)
    while rest := file.read(1 << 20):
        if rest.strip(b"\0"):
            raise tarfile.ReadError(f"the member header at byte {end} is damaged: the members from there on cannot be read")


def _parquet_members(file, image_column: str) -> Iterator[_Member]:
    parquet = pq.ParquetFile(file)
    schema = parquet.schema_arrow
    problem = _image_column_problem(schema, image_column)
    if problem is not None:
        columns = ", ".join(f"{field.name}: {field.type}" for field in schema)
        error = ("missing_image_column", f"{problem} (columns: {columns}); see --image-column")
        for row in range(parquet.metadata.num_rows):
            yield str(row), None, error
        return
    column_type = schema.field(image_column).type
    with_path = pa.types.is_struct(column_type) and column_type.get_field_index("path") >= 0
    row = 0
    for record_batch in parquet.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=[image_column]):
        column = record_batch.column(0)  # struct_field, unlike StructArray.field, keeps a null struct null
        values = (pc.struct_field(column, "bytes") if pa.types.is_struct(column_type) else column).to_pylist()
        paths = pc.struct_field(column, "path").to_pylist() if with_path else [None] * len(values)
        for value, path in zip(values, paths):
            error = None
            if value is None:  # Hugging Face datasets may keep an image's path instead of its bytes
                error = ("empty_file", f"row {row} has no image bytes (null)" + (f"; its path: {path}" if path else ""))
            yield str(row), value, error
            row += 1


def _image_column_problem(schema: pa.Schema, image_column: str) -> str | None:
    """Why ``image_column`` holds no image bytes, or ``None``: it must be binary, or a struct with a
    binary ``bytes`` field (Hugging Face datasets' Image feature: ``struct<bytes, path>``)."""
    if image_column not in schema.names:
        return f"no column {image_column!r}"
    column_type = schema.field(image_column).type
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        column_type = column_type.field("bytes").type
    if not (pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type) or pa.types.is_binary_view(column_type)):
        return f"column {image_column!r} holds {schema.field(image_column).type}, not image bytes"
    return None


def _row(uri: str, data: bytes | None, error: tuple[str, str] | None) -> dict:
    error_type, error_message = error or (None, None)
    return {
        "image_id": image_id(uri),
        "uri": uri,
        "size_bytes": None if data is None else len(data),
        "data": data,
        "error_type": error_type,
        "error_message": error_message,
    }
