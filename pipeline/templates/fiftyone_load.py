"""Build a FiftyOne dataset from this clipsight export: python load.py [--name NAME] [--launch]

Each sample gets ``clip_labels`` (Classifications with CLIP's scores), ``clip_regions``
(Detections: boxes, and masks where SAM made them) and ``heatmap_1``, ``heatmap_2``, ...
(Heatmap): the map of its best-scored label, its second, ..., each carrying its ``label``
and ``confidence``, read from the PNGs beside this file. Classes are label values, never
field names, so the schema does not grow with the vocabulary.
"""

import argparse
import json
from pathlib import Path

import fiftyone as fo

HERE = Path(__file__).resolve().parent


def samples():
    """Every sample with its labels, in memory (no database needed)."""
    doc = json.loads((HERE / "samples.json").read_text(encoding="utf-8"))
    out = []
    for s in doc["samples"]:
        sample = fo.Sample(filepath=s["filepath"], clipsight_id=s["id"])
        sample["clip_labels"] = fo.Classifications(classifications=[
            fo.Classification(label=c["label"], confidence=c["confidence"]) for c in s["classifications"]])
        detections = []
        for d in s["detections"]:
            mask = None
            if d.get("mask"):
                import numpy as np
                from PIL import Image
                mask = np.asarray(Image.open(HERE / d["mask"])) > 0  # the box's crop of the mask
                x, y, w, h = d["box_pixels"]
                if mask.shape != (h, w):  # an export before 0.6.2 wrote the whole picture's mask
                    mask = mask[y : y + h, x : x + w]
            detections.append(fo.Detection(label=d["label"], bounding_box=d["bounding_box"], mask=mask,
                                           confidence=d["confidence"], box_source=d["box_source"], tau=d["tau"],
                                           label_source=d.get("label_source", "opinion"),
                                           evidence=d.get("evidence", []), index=d.get("index")))
        sample["clip_regions"] = fo.Detections(detections=detections)
        for h in s["heatmaps"]:
            sample[h["field"]] = fo.Heatmap(map_path=str(HERE / h["map"]), range=[0, 255], label=h["label"],
                                            confidence=h["confidence"])
        out.append(sample)
    return doc["name"], out


def build(name=None, overwrite=True):
    """The dataset, in FiftyOne's database."""
    default, items = samples()
    dataset = fo.Dataset(name or default, overwrite=overwrite)
    dataset.add_samples(items)
    return dataset


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", default=None)
    ap.add_argument("--launch", action="store_true")
    args = ap.parse_args()
    ds = build(args.name)
    print(ds)
    if args.launch:
        fo.launch_app(ds).wait()
