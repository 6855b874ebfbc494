"""``segpipe report OUTPUT [--run-date D] [--model M] --out report.html``: one run, one HTML file.

The file is self-contained (styles, charts as inline SVG, images as data URIs; nothing is
fetched when it opens): the run summary (inputs, ok, errors by type, duration, images/s, model
and weights checksum), each class's share of the image pixels and its instance count as bar
charts, a grid of sample images with their masks drawn over them (semantic classes as colour
washes with a legend; instances as washes with outlines, boxes and labels; detections as boxes
and labels), and the failed images with their errors. Without ``--run-date``/``--model`` it
reports the latest committed run.
"""

from __future__ import annotations

import base64
import html
import io

import fsspec
import numpy as np
import pycocotools.mask as coco_mask
from PIL import Image, ImageDraw
from scipy import ndimage

from jobs.query import connect
from jobs.summary import before_the_pipeline, stage_line
from pipeline.decode import DecodeError, decode_image
from pipeline.commit import read_manifests
from pipeline.errors import InputError
from pipeline.read import read_image_bytes
from pipeline.storage import absolute_uri

SAMPLES = 12
THUMBNAIL_SIDE = 360
FAILED_SHOWN = 200
_WASH_ALPHA = 0.45
_BACKGROUND_LABELS = frozenset({"__background__", "background"})


def write_report(output: str, out: str, *, run_date: str | None = None, model: str | None = None) -> dict:
    """Write the report of the matching run to ``out``; returns that run's manifest."""
    manifest = select_run(output, run_date=run_date, model=model)
    with fsspec.open(out, "w", encoding="utf-8") as file:
        file.write(render_report(output, manifest))
    return manifest


def select_run(output: str, *, run_date: str | None, model: str | None) -> dict:
    """The latest committed run under ``output`` with this run date and model (when given)."""
    runs = read_manifests(absolute_uri(output))
    matching = [
        manifest
        for manifest in runs
        if (run_date is None or manifest["config"]["run_date"] == run_date)
        and (model is None or manifest["model"]["name"] == model)
    ]
    if not matching:
        available = ", ".join(f"{m['config']['run_date']} {m['model']['name']}" for m in runs) or "none"
        raise InputError(f"no committed run matches under {output} (committed runs: {available})")
    return matching[-1]


def render_report(output: str, manifest: dict) -> str:
    connection = connect(output)
    run_id, config = manifest["run_id"], manifest["config"]
    model = config["model"].replace("'", "''")
    # the run's partition as constants: DuckDB then opens no file of another night's or model's partition
    in_run = f"run_date = DATE '{config['run_date']}' AND model = '{model}' AND run_id = ?"

    def rows(sql: str, *parameters: object) -> list[tuple]:
        return connection.execute(sql, [run_id, *parameters]).fetchall()

    classes = rows(
        "SELECT class_id, label, sum(pixel_count) AS pixels, sum(coalesce(instance_count, 0)) AS instances "
        f"FROM class_stats WHERE {in_run} GROUP BY class_id, label ORDER BY pixels DESC"
    )
    ((total_pixels,),) = rows(f"SELECT coalesce(sum(width::BIGINT * height), 0) FROM images WHERE {in_run} AND status = 'ok'")
    samples = rows(f"SELECT image_id, uri, n_masks FROM images WHERE {in_run} AND status = 'ok' "
                   f"ORDER BY n_masks > 0 DESC, image_id LIMIT {SAMPLES}")  # fmt: skip
    mask_columns = ["image_id", "kind", "class_id", "label", "score", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "height", "width", "mask_rle"]
    masks = [
        dict(zip(mask_columns, row))
        for row in rows(f"SELECT {', '.join(mask_columns)} FROM masks WHERE {in_run} AND image_id IN (SELECT unnest(?::VARCHAR[]))",
                        [image_id for image_id, _, _ in samples])  # fmt: skip
    ]
    ((failed_count,),) = rows(f"SELECT count(*) FROM images WHERE {in_run} AND status = 'error'")
    failed = rows(f"SELECT uri, error_type, error_message FROM images WHERE {in_run} AND status = 'error' "
                  f"ORDER BY error_type, uri LIMIT {FAILED_SHOWN}")  # fmt: skip
    by_image: dict[str, list[dict]] = {}
    for row in masks:
        by_image.setdefault(row["image_id"], []).append(row)
    figures = [_figure(uri, n_masks, by_image.get(image_id, []), manifest) for image_id, uri, n_masks in samples]
    legend = sorted({(row["class_id"], row["label"]) for row in masks if row["label"] not in _BACKGROUND_LABELS})
    return _page(manifest, classes, total_pixels, figures, legend, failed, failed_count)


def colour(class_id: int) -> tuple[int, int, int]:
    """The PASCAL VOC palette: distinct, stable colours by class id (bits spread over R, G, B)."""
    red = green = blue = 0
    for bit in range(8):
        red |= ((class_id >> 0) & 1) << (7 - bit)
        green |= ((class_id >> 1) & 1) << (7 - bit)
        blue |= ((class_id >> 2) & 1) << (7 - bit)
        class_id >>= 3
    return red, green, blue


def overlay(pixels: np.ndarray, masks: list[dict], task: str) -> Image.Image:
    """``pixels`` (RGB, original size) shrunk to a thumbnail with ``masks`` drawn over it."""
    height, width = pixels.shape[:2]
    scale = min(1.0, THUMBNAIL_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    outlines = []
    for row in masks:
        if row["mask_rle"] is None or row["label"] in _BACKGROUND_LABELS:
            continue
        mask = coco_mask.decode({"size": [row["height"], row["width"]], "counts": row["mask_rle"].encode()})
        small = np.asarray(Image.fromarray(mask * 255).resize(size, Image.Resampling.NEAREST)) > 0
        canvas[small] = (1 - _WASH_ALPHA) * canvas[small] + _WASH_ALPHA * np.array(colour(row["class_id"]), np.float32)
        if row["kind"] == "instance":
            outlines.append((small & ~ndimage.binary_erosion(small, iterations=2), row["class_id"]))
    for outline, class_id in outlines:
        canvas[outline] = colour(class_id)
    image = Image.fromarray(canvas.astype(np.uint8))
    if task != "semantic":
        draw = ImageDraw.Draw(image)
        for row in masks:
            box = [row["bbox_x1"] * scale, row["bbox_y1"] * scale, row["bbox_x2"] * scale, row["bbox_y2"] * scale]
            draw.rectangle(box, outline=colour(row["class_id"]), width=2)
            caption = f"{row['label']} {row['score']:.2f}"
            left, top = box[0], max(0.0, box[1] - 12)
            draw.rectangle(draw.textbbox((left, top), caption), fill=colour(row["class_id"]))
            draw.text((left, top), caption, fill=(255, 255, 255))
    return image


def _figure(uri: str, n_masks: int, masks: list[dict], manifest: dict) -> str:
    name = html.escape(uri.rsplit("/", 1)[-1])
    try:
        pixels = decode_image(read_image_bytes(uri, image_column=manifest["config"]["image_column"]),
                              max_pixels=manifest["config"]["max_pixels"])  # fmt: skip
    except (OSError, DecodeError) as error:  # changed or gone since the run
        return f'<figure class="missing"><div>{html.escape(str(error))}</div><figcaption>{name}</figcaption></figure>'
    buffer = io.BytesIO()
    overlay(pixels, masks, manifest["model"]["task"]).save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (
        f'<figure><img class="sample" alt="{name}" src="data:image/jpeg;base64,{data}">'
        f'<figcaption title="{html.escape(uri)}">{name} · {n_masks} mask{"s" if n_masks != 1 else ""}</figcaption></figure>'
    )


def _bars(title: str, rows: list[tuple[str, float, str]], unit_colour: dict[str, tuple[int, int, int]]) -> str:
    """A horizontal bar chart as inline SVG: (label, value, value text) per bar."""
    if not rows:
        return f"<section><h2>{html.escape(title)}</h2><p>None.</p></section>"
    bar_height, label_width, chart_width = 22, 170, 420
    largest = max(value for _, value, _ in rows) or 1.0
    parts = []
    for index, (label, value, text) in enumerate(rows):
        y = index * bar_height
        red, green, blue = unit_colour.get(label, (90, 110, 140))
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{max(1.0, chart_width * value / largest):.1f}" height="{bar_height - 6}" '
            f'fill="rgb({red},{green},{blue})"><title>{html.escape(label)}: {html.escape(text)}</title></rect>'
            f'<text x="{label_width + 6 + chart_width * value / largest:.1f}" y="{y + 15}">{html.escape(text)}</text>'
        )
    svg_height = bar_height * len(rows)
    return (
        f'<section><h2>{html.escape(title)}</h2><svg class="chart" width="{label_width + chart_width + 90}" '
        f'height="{svg_height}" role="img" aria-label="{html.escape(title)}">{"".join(parts)}</svg></section>'
    )


def _page(
    manifest: dict,
    classes: list[tuple],
    total_pixels: int,
    figures: list[str],
    legend: list[tuple[int, str]],
    failed: list[tuple],
    failed_count: int,
) -> str:
    counts, config, timings = manifest["counts"], manifest["config"], manifest["timings"]
    seconds = timings["seconds"]
    colours = {label: colour(class_id) for class_id, label, _, _ in classes}
    share = [(label, pixels / total_pixels, f"{pixels / total_pixels:.1%}") for _, label, pixels, _ in classes if total_pixels]
    instances = [(label, float(n), str(n)) for _, label, _, n in sorted(classes, key=lambda row: -row[3]) if n]
    errors = ", ".join(f"{html.escape(kind)} {n}" for kind, n in counts["errors_by_type"].items()) or "none"
    summary = [
        ("run", manifest["run_id"]),
        ("run date", config["run_date"]),
        ("input", config["input"]),
        ("images", f"{counts['images']} in: {counts['ok']} ok, {counts['error']} failed"),
        ("errors by type", errors),
        ("masks", str(counts["masks"])),
        ("duration", f"{seconds:.1f} s (plus {before_the_pipeline(timings)})"),
        ("throughput", f"{counts['images'] / seconds if seconds else 0:.2f} images/s"),
        *([("stages", stage_line(timings))] if timings.get("stage_seconds") else []),
        ("model", f"{manifest['model']['name']} ({manifest['model']['task']})"),
        ("weights", f"{manifest['weights']['source']}, sha256 {manifest['weights']['sha256']}"),
    ]
    summary_rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>" for key, value in summary)
    legend_items = "".join(
        f'<li><span class="swatch" style="background:rgb{colour(class_id)}"></span>{html.escape(label)}</li>'
        for class_id, label in legend
    )
    failed_rows = "".join(
        f"<tr><td>{html.escape(uri)}</td><td>{html.escape(kind or '')}</td><td>{html.escape(message or '')}</td></tr>"
        for uri, kind, message in failed
    )
    more = f"<p>{failed_count - len(failed)} more; <code>segpipe query</code> lists them all.</p>" if failed_count > len(failed) else ""
    title = f"segpipe run {manifest['run_id']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }}
.summary th {{ color: #555; font-weight: normal; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 2em; }} .chart text {{ font-size: 12px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({THUMBNAIL_SIDE}px, 1fr)); gap: 12px; }}
figure {{ margin: 0; }} figure img {{ max-width: 100%; display: block; }} figcaption {{ color: #555; font-size: 12px; }}
.legend {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 12px; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
.failed td {{ font-size: 12px; border-top: 1px solid #eee; }}
</style></head>
<body data-run-id="{html.escape(manifest['run_id'])}">
<h1>{html.escape(title)}</h1>
<table class="summary">{summary_rows}</table>
<div class="charts">
{_bars("Share of image pixels by class", share, colours)}
{_bars("Instances by class", instances, colours)}
</div>
<section><h2>Sample images ({len(figures)})</h2>
<ul class="legend">{legend_items}</ul>
<div class="grid">{"".join(figures)}</div></section>
<section><h2>Failed images ({failed_count})</h2>
<table class="failed"><tr><th>uri</th><th>error_type</th><th>error_message</th></tr>{failed_rows}</table>{more}</section>
<script>
window.addEventListener("load", () => {{
  const samples = [...document.querySelectorAll("img.sample")];
  const drawn = samples.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.samplesRendered = `${{drawn}}/${{samples.length}}`;
}});
</script>
</body></html>
"""
