"""Retries: transient object-store failures are retried with backoff, answers are not, and a
store that stays down ends in one clear StorageUnavailable error."""

from __future__ import annotations

import socket

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


def test_the_listing_client_gives_the_same_infos_and_keeps_the_settings(s3, bucket: str, monkeypatch) -> None:
    s3.pipe({f"{bucket}/in/a.jpg": b"a", f"{bucket}/in/b/c.jpg": b"bc"})
    fs, path = storage.listing_filesystem(f"s3://{bucket}/in")
    assert path == f"{bucket}/in" and fs is not s3
    assert fs.find(path, detail=True) == s3.find(path, detail=True)  # LastModified: the same datetimes as botocore's
    assert storage._iso_timestamp("Sat, 28 Nov 2026 04:54:08 GMT") == storage._iso_timestamp("2026-11-28T04:54:08.000Z")
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "key": "wrong", "secret": "wrong"})
    fs, _ = storage.listing_filesystem(f"s3://{bucket}/in")  # fsspec's settings, credentials included, still apply
    with pytest.raises(PermissionError):
        fs.find(path)
