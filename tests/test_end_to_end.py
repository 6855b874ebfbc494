"""End to end on a real S3 server and a real local Ray: inputs in, tables read back by DuckDB.

One semantic and one instance model, each with random weights and with a state_dict loaded
from S3. The crafted weights give varied, confident predictions, so comparing with a direct
torchvision call on the same pixels and weights means something.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as coco_mask
import pytest
import torch
import torch.nn.functional as F

from jobs.query import query
from jobs.run import run
from jobs.sample import awkward_images, encode, photos, truncated_jpeg
from models import get_model_spec
from pipeline.config import RunConfig
from pipeline.decode import decode_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

RUN_DATE = dt.date(2026, 11, 24)
BROKEN = {
    "broken/truncated.jpg": ("truncated_image", truncated_jpeg()),
    "broken/empty.jpg": ("empty_file", b""),
    "broken/random.jpg": ("not_an_image", np.random.default_rng(1).bytes(4096)),
    "broken/error-page.jpg": ("not_an_image", b"<html><head><title>403 Forbidden</title></head></html>"),
}


def _upload_corpus(s3, prefix: str, *, awkward: bool = True, photo_names: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Write an archive under ``prefix``; returns every input image's uri -> expected error_type."""
    jpegs = {name: encode(pixels, "JPEG", quality=90) for name, pixels in photos().items() if name in photo_names}
    expected: dict[str, str | None] = {}
    files = {f"photos/{name}.jpg": data for name, data in jpegs.items()}
    if awkward:
        files.update({f"awkward/{name}": data for name, data in awkward_images().items()})
    for path, data in files.items():
        s3.pipe(f"{prefix}/{path}", data)
        expected[f"s3://{prefix}/{path}"] = None
    for path, (error_type, data) in BROKEN.items():
        s3.pipe(f"{prefix}/{path}", data)
        expected[f"s3://{prefix}/{path}"] = error_type
    s3.pipe(f"{prefix}/photos/README.txt", b"not an image: ignored")
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w") as tar:
        for name, data in jpegs.items():
            for path in (f"{name}.jpg", f"{name}.json"):
                member = tarfile.TarInfo(path)
                payload = data if path.endswith(".jpg") else b"{}"
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    s3.pipe(f"{prefix}/shards/000000.tar", tar_buffer.getvalue())
    expected.update({f"s3://{prefix}/shards/000000.tar#{name}.jpg": None for name in jpegs})
    parquet_buffer = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(list(jpegs.values()), type=pa.binary())}), parquet_buffer)
    s3.pipe(f"{prefix}/shards/000001.parquet", parquet_buffer.getvalue())
    expected.update({f"s3://{prefix}/shards/000001.parquet#{row}": None for row in range(len(jpegs))})
    return expected


def _query(s3, sql: str) -> list[dict]:
    connection = duckdb.connect()
    connection.register_filesystem(s3)
    return connection.sql(sql).fetch_arrow_table().to_pylist()


def _table(s3, output: str, table: str) -> list[dict]:
    return _query(s3, f"SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', hive_partitioning=true)")


def _check_tables(s3, output: str, manifest: dict, expected: dict[str, str | None]) -> dict[str, list[dict]]:
    """What a user relies on in every run's tables; returns the tables for further checks."""
    tables = {name: _table(s3, output, name) for name in ("images", "masks", "class_stats")}
    images, masks, stats = tables["images"], tables["masks"], tables["class_stats"]
    # every input image exactly once, ok + error == inputs, each failure with its specific type
    assert sorted(row["uri"] for row in images) == sorted(expected)
    assert {row["uri"]: row["error_type"] for row in images} == expected
    assert all((row["status"] == "ok") == (row["error_type"] is None) for row in images)
    assert all(row["error_message"] for row in images if row["status"] == "error")
    assert manifest["counts"]["images"] == len(expected)
    assert manifest["counts"]["ok"] == sum(error is None for error in expected.values())
    assert all(row["run_id"] == manifest["run_id"] for table in tables.values() for row in table)
    assert {(row["run_date"], row["model"]) for row in images} == {(RUN_DATE, manifest["config"]["model"])}
    by_image = {row["image_id"]: row for row in images}
    masks_of: dict[str, list[dict]] = {}
    for mask in masks:
        masks_of.setdefault(mask["image_id"], []).append(mask)
    for image_id, image in by_image.items():
        image_masks = masks_of.get(image_id, [])
        assert image["n_masks"] == len(image_masks)
        decoded = [
            coco_mask.decode({"size": [m["height"], m["width"]], "counts": m["mask_rle"]}) for m in image_masks
        ]
        assert all(d.shape == (image["height"], image["width"]) for d in decoded)
        assert [int(d.sum()) for d in decoded] == [m["area"] for m in image_masks]
        image_stats = [row for row in stats if row["image_id"] == image_id]
        if manifest["model"]["task"] == "semantic" and image["status"] == "ok":
            assert all(m["kind"] == "class" and m["score"] is None for m in image_masks)
            assert (np.sum(decoded, axis=0) == 1).all()  # the class masks partition the image
            assert sum(row["pixel_count"] for row in image_stats) == image["width"] * image["height"]
            assert sum(row["pixel_fraction"] for row in image_stats) == pytest.approx(1.0)
        if manifest["model"]["task"] == "instance":
            assert all(m["kind"] == "instance" and m["score"] >= 0.5 for m in image_masks)
            assert sum(row["instance_count"] for row in image_stats) == len(image_masks)
    assert s3.exists(manifest["manifest_uri"])
    committed = json.loads(s3.cat(manifest["manifest_uri"]))
    assert committed["counts"] == manifest["counts"] and len(committed["shards"]) == len(manifest["shards"])
    return tables


def _config(input_uri: str, output_uri: str, model: str, weights: str, **overrides) -> RunConfig:
    return RunConfig(input=input_uri, output=output_uri, model=model, weights=weights, run_date=RUN_DATE,
                     files_per_shard=6, batch_size=4, **overrides)  # fmt: skip


def _save_to_s3(s3, uri: str, state_dict: dict[str, torch.Tensor]) -> str:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    s3.pipe(uri, buffer.getvalue())
    return f"{uri}#sha256={hashlib.sha256(buffer.getvalue()).hexdigest()}"


def _crafted_semantic(model: str) -> torch.nn.Module:
    """Random weights with strong classifier heads: many classes per photo, not one."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module = get_model_spec(model).build()
        for name in ("low_classifier", "high_classifier"):
            torch.nn.init.normal_(getattr(module.classifier, name).weight, std=3.0)
    return module


def _crafted_instance(model: str) -> torch.nn.Module:
    """Random weights whose box classifier strongly favours two classes: confident detections."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module = get_model_spec(model).build()
    with torch.no_grad():
        module.roi_heads.box_predictor.cls_score.bias[1] = 6.0
        module.roi_heads.box_predictor.cls_score.bias[18] = 5.0
    return module


SEMANTIC = "lraspp_mobilenet_v3_large"
INSTANCE = "maskrcnn_resnet50_fpn"


def test_semantic_random_weights(s3, bucket: str, capfd: pytest.CaptureFixture[str]) -> None:
    expected = _upload_corpus(s3, f"{bucket}/archive", photo_names=("astronaut", "chelsea"))
    output = f"s3://{bucket}/tables"
    manifest = run(_config(f"s3://{bucket}/archive", output, SEMANTIC, "random"))
    _check_tables(s3, output, manifest, expected)
    assert manifest["weights"]["source"] == "random (seed 0)"
    assert manifest["ignored_files"] == 1
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    logs = capfd.readouterr()
    assert secret not in logs.out + logs.err
    assert secret not in s3.cat(manifest["manifest_uri"]).decode()
    _assert_not_in_ray(secret)
    # segpipe query reads an s3:// output through fsspec, with no DuckDB extension
    result = query(output, "SELECT r.images AS listed, count(*) AS rows FROM images i JOIN runs r USING (run_id) GROUP BY ALL")
    assert result.to_pylist() == [{"listed": len(expected), "rows": len(expected)}]


def _assert_not_in_ray(secret: str) -> None:
    """Neither the job's runtime_env nor any file Ray wrote for this session (logs, the
    runtime_env agent's records) holds ``secret``."""
    import ray

    assert secret not in json.dumps(ray.get_runtime_context().runtime_env)
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    files = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]
    assert files, session
    leaking = [str(path) for path in files if secret.encode() in path.read_bytes()]
    assert not leaking


def test_semantic_state_dict_from_s3_equals_torchvision(s3, bucket: str) -> None:
    expected = _upload_corpus(s3, f"{bucket}/archive", photo_names=("astronaut", "chelsea", "coffee"))
    module = _crafted_semantic(SEMANTIC).eval()
    weights = _save_to_s3(s3, f"s3://{bucket}/weights/lraspp.pt", module.state_dict())
    output = f"s3://{bucket}/tables"
    manifest = run(_config(f"s3://{bucket}/archive", output, SEMANTIC, weights))
    tables = _check_tables(s3, output, manifest, expected)
    assert manifest["weights"]["sha256"] == weights.rsplit("=", 1)[1]
    transforms = get_model_spec(SEMANTIC).torchvision_weights.DEFAULT.transforms()
    labels_seen = set()
    for image in tables["images"]:
        if image["status"] != "ok":
            continue
        pixels = decode_image(_image_bytes(s3, image["uri"]), max_pixels=10**8)
        with torch.inference_mode():
            logits = module(transforms(torch.from_numpy(pixels).permute(2, 0, 1))[None])["out"]
            reference = F.interpolate(logits, size=pixels.shape[:2], mode="bilinear", align_corners=False).argmax(1)[0]
        class_map = np.full(pixels.shape[:2], -1)
        for mask in (m for m in tables["masks"] if m["image_id"] == image["image_id"]):
            decoded = coco_mask.decode({"size": [mask["height"], mask["width"]], "counts": mask["mask_rle"]})
            class_map[decoded.astype(bool)] = mask["class_id"]
            labels_seen.add(mask["label"])
        assert np.array_equal(class_map, reference.numpy()), image["uri"]
    assert len(labels_seen) > 3


def _image_bytes(s3, uri: str) -> bytes:
    """The bytes of an image, a tar member or a Parquet row (``CONTAINER#MEMBER``)."""
    container, _, member = uri.partition("#")
    data = s3.cat(container)
    if not member:
        return data
    if container.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return tar.extractfile(member).read()
    return pq.read_table(io.BytesIO(data)).column("image")[int(member)].as_py()


def test_instance_state_dict_from_s3_equals_torchvision(s3, bucket: str) -> None:
    expected = _upload_corpus(s3, f"{bucket}/archive", awkward=False, photo_names=("chelsea",))
    module = _crafted_instance(INSTANCE).eval()
    weights = _save_to_s3(s3, f"s3://{bucket}/weights/maskrcnn.pt", module.state_dict())
    output = f"s3://{bucket}/tables"
    manifest = run(_config(f"s3://{bucket}/archive", output, INSTANCE, weights))
    tables = _check_tables(s3, output, manifest, expected)
    photo = photos()["chelsea"]
    pixels = decode_image(encode(photo, "JPEG", quality=90), max_pixels=10**8)
    with torch.inference_mode():
        reference = module([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
    keep = reference["scores"] >= 0.5
    assert keep.sum() > 10
    for image in (row for row in tables["images"] if row["status"] == "ok"):
        masks = sorted((m for m in tables["masks"] if m["image_id"] == image["image_id"]), key=lambda m: m["mask_index"])
        assert len(masks) == int(keep.sum())
        boxes = np.array([[m["bbox_x1"], m["bbox_y1"], m["bbox_x2"], m["bbox_y2"]] for m in masks])
        np.testing.assert_allclose(boxes, reference["boxes"][keep].numpy(), atol=1e-3)
        np.testing.assert_allclose([m["score"] for m in masks], reference["scores"][keep].numpy(), atol=1e-5)
        assert [m["class_id"] for m in masks] == reference["labels"][keep].tolist()
        assert {m["label"] for m in masks} <= {"person", "dog"}
        for mask, expected_mask in zip(masks, reference["masks"][keep, 0] > 0.5):
            decoded = coco_mask.decode({"size": [mask["height"], mask["width"]], "counts": mask["mask_rle"]})
            assert np.array_equal(decoded.astype(bool), expected_mask.numpy())


def test_instance_random_weights_with_limit(s3, bucket: str) -> None:
    expected = _upload_corpus(s3, f"{bucket}/archive", awkward=False, photo_names=("chelsea",))
    output = f"s3://{bucket}/tables"
    manifest = run(_config(f"s3://{bucket}/archive", output, INSTANCE, "random", limit=3))
    first_three = dict(sorted(expected.items())[:3])  # loose files, in listing order
    _check_tables(s3, output, manifest, first_three)
