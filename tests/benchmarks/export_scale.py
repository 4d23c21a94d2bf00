"""Export at scale: a synthetic run of N images (10 labels, 3 methods' 14x14 maps each), exported; prints JSON.

    python tests/benchmarks/export_scale.py [--images 10000] [--formats coco labelstudio fiftyone yolo]
        [--refine pamr guided]

It builds the run with ``report_scale.make_run`` plus each image's ``surgery/<id>.npz`` and the
size, methods and ranges of ``surgery/<id>.json``, then times what the export stage does:
reading every image's labels and maps, building the regions (``pipeline.labels.regions``, at 640x480),
and writing ``regions.json`` and each format. No model runs.

With ``--refine``, every image is a hard link to one 640x480 JPEG, and the whole export (reading, regions and
every format) is timed again with each ``export.refine`` given (each picture read, every map refined, and each
region's mask written where the formats hold masks), after the plain export, in the same run: ``refined``
holds each one's times and its ratio to the plain export's total.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The rest is imported in main(): the export's worker processes are spawned, and each imports this
# script as its main module, as they import runall.py in a real run, which imports no torch.
METHODS = ("raw", "surgery", "single")
FORMATS = ("coco", "labelstudio", "fiftyone", "yolo")


def add_maps(run, seed: int = 0) -> None:

    """Each image's maps: a blob somewhere on a 14x14 grid per label and method, as the surgery stage stores them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:14, 0:14]
    for path in sorted(run.file("surgery").glob("*.json")):
        doc = json.loads(path.read_text())
        arrays = {}
        for d in doc["labels"]:
            for m in METHODS:
                cy, cx, r = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(1.5, 4)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.uniform(0, 0.2, (14, 14))
                arrays[f"{m}/{d['word']}"] = ((blob - blob.min()) / np.ptp(blob)).astype(np.float16)
            d["range"] = {m: [0.1, 0.3] for m in METHODS}
        arrays["image_size"] = np.asarray([480, 640], dtype=np.int32)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        run.maps(doc.get("image") or path.stem).write_bytes(buf.getvalue())
        doc["methods"] = list(METHODS)
        path.write_text(json.dumps(doc))


def main() -> None:
    from dataclasses import replace

    from pipeline.labels.refine import REFINERS
    from pipeline.run.rundir import RunDir
    from stages.export import ExportConfig
    from tests.benchmarks.jsonout import emit
    from tests.benchmarks.report_scale import make_run

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--workers", type=int, default=None, help="reading processes (default: one per core)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--refine", nargs="*", default=[], choices=list(REFINERS),
                    help="also time the whole export with each of these export.refine settings")
    args = ap.parse_args()
    out_workers = args.workers
    out: dict = {"images": args.images, "formats": args.formats, "workers": out_workers or "one per core",
                 "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        make_run(Path(tmp) / "run", args.images)
        run = RunDir(Path(tmp) / "run")
        for path in run.file("surgery").glob("*.json"):  # make_run's docs name no image; the npz needs the id
            doc = json.loads(path.read_text())
            doc["image"] = path.stem
            path.write_text(json.dumps(doc))
        add_maps(run)
        if args.refine:
            pictures(run, Path(tmp) / "photos")
        out["build_seconds"] = round(time.time() - t, 1)
        os.sync()  # the build's hundreds of MB of dirty pages would otherwise throttle the timed export's writes
        for refine in ("none", *args.refine):
            timed = export_once(run, replace(ExportConfig(formats=tuple(args.formats)), refine=refine), args.workers)
            if refine == "none":
                out.update(timed)
            else:
                timed["vs_plain_total"] = round(timed["total_seconds"] / out["total_seconds"], 3)
                out.setdefault("refined", {})[refine] = timed
    emit(out, args.out)


def export_once(run, cfg, workers: int | None) -> dict:
    """One whole export of ``run`` with ``cfg``, timed: reading and regions, then each format and regions.json."""
    from pipeline.labels.autolabels import LabelMap
    from pipeline.labels.exports import run_key
    from pipeline.run.provenance import Status
    from pipeline.run.rundir import atomic_write_text
    from stages.export import ExportConfig, read_exports, regions_document, write_formats

    out: dict = {}
    t = time.time()
    images, left_out, _ = read_exports(run, cfg, LabelMap(), lambda i, s, latest: Status("done"), workers)
    out["read_and_regions_seconds"] = round(time.time() - t, 2)
    files, out["write_seconds_by_format"] = [], {}
    for fmt in cfg.formats:
        t = time.time()
        files += write_formats(run, images, ExportConfig(formats=(fmt,)), run_key("bench", "x"), "bench")
        out["write_seconds_by_format"][fmt] = round(time.time() - t, 2)
    t = time.time()
    atomic_write_text(run.file("export", "regions.json"), json.dumps(regions_document(images, "x")))
    out["write_seconds_by_format"]["regions.json"] = round(time.time() - t, 2)
    out["write_seconds"] = round(sum(out["write_seconds_by_format"].values()), 2)
    out["total_seconds"] = round(out["read_and_regions_seconds"] + out["write_seconds"], 2)
    out["regions"] = sum(len(lab.regions) for im in images for lab in im.labels)
    out["masks"] = sum(r.mask is not None for im in images for lab in im.labels for r in lab.regions)
    out["left_out"] = len(left_out)
    out["files"] = len(files)
    out["export_mib"] = round(sum(p.stat().st_size for p in run.file("export").rglob("*") if p.is_file()) / 2**20, 1)
    return out


def pictures(run, folder: Path) -> None:
    """Every image of ``run`` a hard link to one 640x480 JPEG under ``folder`` (the refiner reads each): smooth
    colour fields with soft edges, as photographs have, so the refined masks are as ragged as a photo's would be."""
    from PIL import Image

    folder.mkdir(parents=True)
    one = folder / "one.jpg"
    import cv2  # a photograph's smooth regions and edges, not pixel noise: blurred noise, in colour

    noise = np.random.default_rng(0).uniform(0, 255, (480, 640, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 12)
    smooth = (smooth - smooth.min()) / np.ptp(smooth) * 255
    Image.fromarray(smooth.astype(np.uint8)).save(one, quality=90)
    lines = []
    for line in run.file("images.jsonl").read_text().splitlines():
        d = json.loads(line)
        os.link(one, folder / d["rel"])
        lines.append(json.dumps({**d, "path": str(folder / d["rel"]), "root": str(folder)}))
    run.file("images.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
