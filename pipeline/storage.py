"""Storage primitives every stage and job uses: absolute URIs, URIs as shown to people, whole-object writes, and retries.

Object stores fail transiently: connections refused or reset while a server restarts, timeouts,
``503 SlowDown``. :func:`retrying` repeats an operation through such errors with exponential
backoff and jitter for up to ``RETRY_SECONDS`` (two minutes, or ``SEGPIPE_STORAGE_RETRY_SECONDS``),
then raises :class:`StorageUnavailable`;
a missing object or a refused permission is an answer, not a transient error, and is raised
at once. Unless fsspec's configuration says otherwise, S3 connections time out after
``S3_CONNECT_TIMEOUT`` seconds instead of botocore's 60 and botocore retries a request once
rather than four times with its own backoff, so that this schedule, not three stacked ones,
decides how long an outage is waited out. An S3 client keeps up to ``S3_CONNECTIONS`` requests
in flight instead of botocore's 10: a read task fetches a shard's files at once, and each
request waits a round trip. The driver lists through a client of its own (:func:`listing_filesystem`)
whose listings cost a third of botocore's CPU time per key.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import random
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError, StorageUnavailable


def _retry_seconds_from_environment() -> float:
    value = os.environ.get("SEGPIPE_STORAGE_RETRY_SECONDS", "120")
    try:
        return float(value)
    except ValueError:
        raise InputError(f"SEGPIPE_STORAGE_RETRY_SECONDS must be a number of seconds, not {value!r}") from None


RETRY_SECONDS = _retry_seconds_from_environment()
"""How long one operation rides out an outage; set the variable on every node to change it."""
S3_CONNECT_TIMEOUT = 10
S3_CONNECTIONS = 64
"""Requests one S3 client has in flight at most (botocore's ``max_pool_connections``): a shard of
256 photos behind 100 ms per request read in 1.1 s against 5.6 s with botocore's 10 (``benchmarks.storage``)."""
_FIRST_DELAY = 0.5
_LONGEST_DELAY = 15.0
_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
     errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}
)  # fmt: skip

Result = TypeVar("Result")
logger = logging.getLogger("segpipe.storage")


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import botocore.exceptions

        types += [botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()
# user settings (FSSPEC_S3 or fsspec's config files) win over this default
fsspec.config.conf.setdefault("s3", {}).setdefault(
    "config_kwargs",
    {"connect_timeout": S3_CONNECT_TIMEOUT, "retries": {"mode": "standard", "max_attempts": 2}, "max_pool_connections": S3_CONNECTIONS},
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may go away if the same request is made again later."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, _TRANSIENT_TYPES):
        return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def retrying(operation: Callable[[], Result], what: str) -> Result:
    """``operation()``, repeated through transient storage errors for up to ``RETRY_SECONDS``."""
    started = time.monotonic()
    delay = _FIRST_DELAY
    while True:
        try:
            return operation()
        except Exception as error:
            if not is_transient(error):
                raise
            waited = time.monotonic() - started
            if waited + delay > RETRY_SECONDS:
                raise StorageUnavailable(
                    f"{what}: object storage still failing after {waited:.0f} s of retries "
                    f"({type(error).__name__}: {error}); rerun the same command to resume"
                ) from error
            logger.warning("segpipe: %s: %s: %s; retrying in %.1f s", what, type(error).__name__, error, delay)
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(2 * delay, _LONGEST_DELAY)


def listing_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs(uri)`` for listing many objects. On S3, a client of its own with the
    same settings and credentials, which keeps no listings cache (s3fs's would keep every key
    listed, as an info dict of about 1 KB, for as long as the client lives) and reads listings
    with a third of the CPU time, to the same results: 200,000 keys cost a driver that has
    imported torch and Ray 48 -> 16 us per key on this repository's CPU. Botocore spent half
    of its time on the timestamps (dateutil's parser) and most of the rest walking its service
    model for every XML element, after parsing each answer twice (once to see whether S3
    answered 200 with an error in the body); this client parses each answer once
    (:func:`_read_listing`), and its timestamps with ``datetime.fromisoformat``. A client on a
    session of the user's own (fsspec's ``session`` setting) is left as it is."""
    fs, path = fsspec.core.url_to_fs(uri)
    if "s3" not in fs.protocol or fs.storage_options.get("session") is not None:
        return fs, path
    import aiobotocore.hooks
    import aiobotocore.session

    events = aiobotocore.hooks.AioHierarchicalEmitter()
    # before botocore's own handlers for the same events, which the session adds: its check for an error in a 200's body would parse it
    events.register_first("before-parse.s3.*", _read_listing)
    session = aiobotocore.session.AioSession(**fs.kwargs, event_hooks=events)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_iso_timestamp)
    options = {**fs.storage_options, "session": session, "skip_instance_cache": True, "use_listings_cache": False}
    return type(fs)(**options), path


def _read_listing(operation_model: Any, response_dict: dict, customized_response_dict: dict, **_: Any) -> None:
    """Botocore's ``before-parse`` handler for S3's ListObjectsV2: where the answer is a listing,
    its fields as botocore's parser would give them go to ``customized_response_dict`` and the
    body is emptied, which leaves botocore nothing to parse. Anything else (an error, a body cut
    short) is left to botocore, which retries it. (:func:`pipeline.listing.files_under`, which
    makes every listing, leaves Python's garbage collector only young passes meanwhile.)"""
    if operation_model.name != "ListObjectsV2" or response_dict["status_code"] != 200 or not response_dict["body"]:
        return
    try:
        root = ElementTree.fromstring(response_dict["body"])
    except ElementTree.ParseError:
        return
    read = _xml_reader(operation_model.output_shape)
    if _local_name(root) == "ListBucketResult" and read is not None:
        customized_response_dict.update(read(root))
        response_dict["body"] = b""


_XmlReader = Callable[[ElementTree.Element], Any]


def _read_integer(node: ElementTree.Element) -> int:
    return int(node.text or "")


_SCALAR_READERS: dict[str, _XmlReader] = {
    "string": lambda node: node.text or "",
    "integer": _read_integer,
    "long": _read_integer,
    "boolean": lambda node: node.text == "true",
    "timestamp": lambda node: _iso_timestamp(node.text or ""),
}


def _xml_reader(shape: Any) -> _XmlReader | None:
    """A function from an XML element to what botocore's rest-xml parser makes of it as ``shape``
    (a botocore ``Shape``; a flattened list's reader reads one of its items), or ``None`` where
    ``shape`` holds a kind this does not read as botocore does (maps, blobs, wrapped lists, XML attributes).
    Elements are known by their names without namespaces, as botocore knows them."""
    if shape.type_name in _SCALAR_READERS:
        return _SCALAR_READERS[shape.type_name]
    if shape.type_name == "list":  # a flattened list's items stand side by side in its structure (S3's lists all are)
        return _xml_reader(shape.member) if shape.serialization.get("flattened") else None
    if shape.type_name != "structure" or shape.metadata.get("exception") or shape.is_tagged_union or shape.is_document_type:
        return None
    members: dict[str, tuple[str, _XmlReader, bool]] = {}  # by tag: member name, reader, whether a flattened list's item
    for name, member in shape.members.items():
        if member.serialization.get("location"):  # a header, read by botocore
            continue
        flattened = member.type_name == "list" and bool(member.serialization.get("flattened"))
        tag = (flattened and member.member.serialization.get("name")) or member.serialization.get("name", name)
        read = _xml_reader(member)
        if read is None or member.serialization.get("xmlAttribute"):
            return None
        members[tag] = (name, read, flattened)

    by_tag: dict[str, tuple[str, _XmlReader, bool]] = {}  # the members by ElementTree's tags, namespaces and all, as met

    def structure(node: ElementTree.Element) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for child in node:
            if (member := by_tag.get(child.tag)) is None:
                if (member := members.get(_local_name(child))) is None:
                    continue
                by_tag[child.tag] = member
            name, read, flattened = member
            if flattened:
                fields.setdefault(name, []).append(read(child))
            else:
                fields.setdefault(name, read(child))
        return fields

    return structure


def _local_name(element: ElementTree.Element) -> str:
    """``element``'s name without its namespace (ElementTree's ``{namespace}name``)."""
    return element.tag.rpartition("}")[2]


def _iso_timestamp(value: str) -> datetime.datetime:
    """An S3 listing's ``LastModified`` (ISO 8601, ``2026-11-28T04:54:08.000Z``), as botocore parses
    it; other forms by botocore's own parser."""
    try:
        return datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        from botocore.utils import parse_timestamp

        return parse_timestamp(value)


def absolute_uri(uri: str) -> str:
    """``uri`` with its protocol, local paths made absolute: what every Ray worker can open."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.unstrip_protocol(path).rstrip("/")


def display_uri(uri: str) -> str:
    """``uri`` as shown to people: local files as plain paths; no user info or query string,
    which may carry credentials or signatures."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive letter)
        return uri
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def write_object(uri: str, data: bytes) -> int:
    """Write ``data`` to ``uri`` as one complete object, through transient errors; returns the bytes written."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    else:
        retrying(lambda: fs.pipe_file(path, data), f"writing {uri}")
    return len(data)


def read_object(uri: str) -> bytes:
    """The bytes of the object ``uri``, through transient errors."""
    fs, path = fsspec.core.url_to_fs(uri)
    return retrying(lambda: fs.cat_file(path), f"reading {uri}")
