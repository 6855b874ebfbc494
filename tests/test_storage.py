"""Retries: transient object-store failures are retried with backoff, answers are not, and a
store that stays down ends in one clear StorageUnavailable error."""

from __future__ import annotations

import socket

import botocore.model
import botocore.parsers
import botocore.session
import fsspec
import pytest
import s3fs

from pipeline import storage
from pipeline.errors import StorageUnavailable


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_store_that_stays_down_ends_in_storage_unavailable(monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRY_SECONDS", 8.0)
    fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{_closed_port()}", key="k", secret="not-for-logs",
                           skip_instance_cache=True)  # fmt: skip
    attempts = []

    def read() -> bytes:
        attempts.append(1)
        return fs.cat_file("bucket/image.jpg")

    with pytest.raises(StorageUnavailable, match="object storage still failing after .* rerun the same command") as caught:
        storage.retrying(read, "reading s3://bucket/image.jpg")
    assert len(attempts) >= 2
    assert "not-for-logs" not in str(caught.value)


def test_a_missing_object_is_an_answer_not_retried(s3, bucket: str) -> None:
    attempts = []

    def read() -> bytes:
        attempts.append(1)
        return s3.cat_file(f"{bucket}/missing.jpg")

    with pytest.raises(FileNotFoundError):
        storage.retrying(read, "reading")
    assert len(attempts) == 1


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(16, "SlowDown"), True),  # s3fs: 503 / SlowDown -> EBUSY
        (OSError(121, "InternalError"), True),  # s3fs: 500 -> EREMOTEIO
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (OSError(22, "InvalidArgument"), False),
        (ValueError(), False),
    ],
)
def test_which_errors_are_transient(error: BaseException, transient: bool) -> None:
    assert storage.is_transient(error) is transient


def test_the_cli_reports_a_store_that_stays_down_in_one_line(monkeypatch, capsys, tmp_path) -> None:
    from jobs.cli import main

    monkeypatch.setattr(storage, "RETRY_SECONDS", 8.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-logs")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code = main(["run", "--input", "s3://archive/photos", "--output", str(tmp_path / "out"),
                     "--model", "lraspp_mobilenet_v3_large", "--weights", "random"])  # fmt: skip
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 3
    *retries, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("segpipe: error: listing s3://archive/photos: object storage still failing after")
    assert retries and all("retrying in" in line for line in retries)
    assert "not-for-logs" not in error + "".join(retries)


_AWKWARD_KEYS = ["a.jpg", "b/c.jpg", "b/d e+f%20.jpg", "g&h<i>.jpg", "jé 日本.jpg", "k 🙂.jpg", "l/m/n.jpg", "o'p\"q.jpg"]


def test_the_listing_client_gives_the_same_infos_and_keeps_the_settings(s3, bucket: str, monkeypatch) -> None:
    s3.pipe({f"{bucket}/in/{key}": key.encode() for key in _AWKWARD_KEYS})
    read_here = []  # whether each listing was read by segpipe's reader, not left to botocore's parser

    def reading(**answer) -> None:
        storage._read_listing(**answer)
        read_here.append(answer["response_dict"]["body"] == b"")

    monkeypatch.setattr(storage, "_read_listing", reading)
    fs, path = storage.listing_filesystem(f"s3://{bucket}/in")
    monkeypatch.undo()
    assert path == f"{bucket}/in" and fs is not s3
    assert fs.find(path, detail=True) == s3.find(path, detail=True)  # LastModified: the same datetimes as botocore's
    assert len(fs.find(path)) == len(_AWKWARD_KEYS)
    for delimiter in ({}, {"Delimiter": "/"}):  # pages of 3, as segpipe's own listing asks for them
        start: dict = {}
        while True:
            ask = {"Bucket": bucket, "Prefix": "in/", "MaxKeys": 3, **delimiter, **start}
            page, expected = fs.call_s3("list_objects_v2", **ask), s3.call_s3("list_objects_v2", **ask)
            assert {**page, "ResponseMetadata": None} == {**expected, "ResponseMetadata": None}
            if not page["IsTruncated"]:
                break
            start = {"ContinuationToken": page["NextContinuationToken"]} if start or delimiter else {"StartAfter": page["Contents"][-1]["Key"]}
    assert len(read_here) >= 8 and all(read_here)
    assert storage._iso_timestamp("Sat, 28 Nov 2026 04:54:08 GMT") == storage._iso_timestamp("2026-11-28T04:54:08.000Z")
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "key": "wrong", "secret": "wrong"})
    fs, _ = storage.listing_filesystem(f"s3://{bucket}/in")  # fsspec's settings, credentials included, still apply
    with pytest.raises(PermissionError):
        fs.find(path)


def _s3_operation(name: str) -> botocore.model.OperationModel:
    """Botocore's model of the S3 operation ``name``, from the files botocore ships."""
    return botocore.session.get_session().get_service_model("s3").operation_model(name)


_LISTING = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>archive</Name><Prefix>in/</Prefix>
<ContinuationToken>one</ContinuationToken><NextContinuationToken>two</NextContinuationToken><StartAfter>in/a</StartAfter>
<KeyCount>3</KeyCount><MaxKeys>3</MaxKeys><Delimiter>/</Delimiter><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
<Contents><Key>in/d+e%25f%2B%F0%9F%99%82.jpg</Key><LastModified>2026-11-28T04:54:08.000Z</LastModified>
<ETag>&quot;9dd4e461268c8034f5c8564e155c67a6-2&quot;</ETag><ChecksumAlgorithm>CRC32</ChecksumAlgorithm>
<ChecksumAlgorithm>SHA256</ChecksumAlgorithm><ChecksumType>FULL_OBJECT</ChecksumType><Size>5368709120</Size>
<StorageClass>GLACIER</StorageClass><Owner><DisplayName>night</DisplayName><ID>75aa57f09aa0c8caeab4f8c24e99d10f</ID></Owner>
<RestoreStatus><IsRestoreInProgress>false</IsRestoreInProgress><RestoreExpiryDate>2026-12-01T00:00:00.000Z</RestoreExpiryDate>
</RestoreStatus><Unknown>a field of a later API</Unknown></Contents>
<Contents><Key>in/empty.jpg</Key><LastModified>2026-11-28T04:54:09Z</LastModified><ETag></ETag><Size>0</Size></Contents>
<CommonPrefixes><Prefix>in/b/</Prefix></CommonPrefixes><CommonPrefixes><Prefix>in/c%20d/</Prefix></CommonPrefixes>
</ListBucketResult>"""


@pytest.mark.parametrize(
    "body",
    [
        _LISTING,
        _LISTING.replace(b"<Contents>", b"<Other>").replace(b"</Contents>", b"</Other>"),
        _LISTING.replace(b' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', b""),  # stores that name no namespace
        _LISTING.replace(b"<Contents>", b'<Contents xmlns="urn:another">'),  # nor always the same one
    ],
)
def test_the_listing_client_reads_every_field_of_a_listing_as_botocore_does(body: bytes) -> None:
    operation = _s3_operation("ListObjectsV2")
    parser = botocore.parsers.RestXMLParser(timestamp_parser=storage._iso_timestamp)
    answer = {"status_code": 200, "headers": {"x-amz-request-charged": "requester"}, "body": body}
    expected = parser.parse(dict(answer), operation.output_shape)
    fields: dict = {}
    storage._read_listing(operation_model=operation, response_dict=answer, customized_response_dict=fields)
    assert answer["body"] == b""  # nothing left for botocore to parse but the headers
    assert {**parser.parse(answer, operation.output_shape), **fields} == expected
    assert expected["RequestCharged"] == "requester" and expected["IsTruncated"] is True and expected["MaxKeys"] == 3


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"),
        (200, _LISTING[: len(_LISTING) // 2]),  # cut short: botocore's own check makes it a 500, retried
        (503, b"<Error><Code>SlowDown</Code></Error>"),
        (200, b""),
    ],
)
def test_the_listing_client_leaves_anything_but_a_listing_to_botocore(status: int, body: bytes) -> None:
    operation = _s3_operation("ListObjectsV2")
    answer, fields = {"status_code": status, "headers": {}, "body": body}, {}
    storage._read_listing(operation_model=operation, response_dict=answer, customized_response_dict=fields)
    assert answer == {"status_code": status, "headers": {}, "body": body} and fields == {}


def test_the_listing_reader_declines_what_it_does_not_read_as_botocore_does() -> None:
    assert storage._xml_reader(_s3_operation("ListObjectsV2").output_shape) is not None
    assert storage._xml_reader(_s3_operation("ListBuckets").output_shape) is None  # a wrapped list: botocore's
