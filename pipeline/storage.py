"""Storage primitives every stage and job uses: absolute URIs and whole-object writes."""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def absolute_uri(uri: str) -> str:
    """``uri`` with its protocol, local paths made absolute: what every Ray worker can open."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.unstrip_protocol(path).rstrip("/")


def write_object(uri: str, data: bytes) -> int:
    """Write ``data`` to ``uri`` as one complete object; returns the bytes written."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)
    return len(data)
