"""Two runs side by side: what two models (or two settings) see in the same images.

Images are matched by their stable id. Per image: the labels both runs found, those
only one found, and their Jaccard overlap; per word: how many images each run gave
it, and the words most particular to each run; overall: agreement figures, and the
images where the runs disagree most, first. Images that only one run labelled are
listed with the reason, never dropped.

``compare_labels`` is the pure core; ``read_side`` and ``write_comparison`` are the I/O:
``compare.json``, and ``compare.html`` with the two runs' maps of the shared labels side
by side (one map method, as PNGs under ``maps/``).
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image

from pipeline.heatmaps.draw import fit_side, label_slug, overlay_heatmap, upsample_map
from pipeline.run.images import ImageError, ImageRef, load_image
from pipeline.run.provenance import Status
from pipeline.run.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_output

COMPARE_JSON = "compare.json"  # in the --out folder: the two runs' labels, matched, and the maps drawn
COMPARE_HTML = "compare.html"  # the page

PARTICULAR = 20  # words listed as most particular to each run

StateOf = Callable[[str, str, Mapping], Status]  # (image id, stage, latest records) -> that output's status


@dataclass
class RunSide:
    """What a comparison reads of one run: its images, each labelled image's words in rank order, and why the
    others have none."""

    root: Path
    model: str
    images: dict[str, ImageRef]
    labels: dict[str, list[str]]
    unlabelled: dict[str, str] = field(default_factory=dict)  # image id -> why it has no labels here
    no_maps: dict[str, str] = field(default_factory=dict)  # image id -> why its maps are not drawn (surgery not done)


NO_LABELS = "no labels (decode did not finish this image)"


def _not_done(stage: str, st: Status, pending: str) -> str:
    """Why an output that is not done cannot be used: ``pending`` when it was never finished, else its state."""
    head = pending if st.state == "pending" else f"{stage} {st.state}"
    return head + (f": {st.reason}" if st.reason else "")


def read_side(root: Path, state: StateOf | None = None) -> RunSide:
    """A run's images and labels (``labels/<id>.json``); an image without a readable labels file is unlabelled.

    With ``state`` (the run's own settings' status of an output, as ``status`` shows it), an image whose
    decode output is not done (stale, damaged, failed, pending) is unlabelled too, with that reason, and
    one whose surgery output is not done has its maps left undrawn, so nothing out of date is compared.
    """
    run = RunDir(root)
    config = run.load_config() if run.has_config() else {}
    images = {r.id: r for r in run.load_images()}
    latest = run.latest() if state is not None else {}
    labels, unlabelled, no_maps = {}, {}, {}
    for image_id in images:
        if state is not None:
            st = state(image_id, "surgery", latest)
            if st.state != "done":
                no_maps[image_id] = _not_done("surgery", st, "no maps (surgery did not finish this image)")
            st = state(image_id, "decode", latest)
            if st.state != "done":
                unlabelled[image_id] = _not_done("decode", st, NO_LABELS)
                continue
        path = run.labels(image_id)
        if not path.is_file():
            unlabelled[image_id] = NO_LABELS
            continue
        doc, why = read_output(path, root)
        if isinstance(doc, dict) and isinstance(doc.get("labels"), list):
            labels[image_id] = [d["word"] for d in doc["labels"] if isinstance(d, dict) and "word" in d]
        else:
            unlabelled[image_id] = why or f"labels/{image_id}.json: not a decode output"
    return RunSide(root=root, model=str(config.get("model", "?")), images=images, labels=labels, unlabelled=unlabelled,
                   no_maps=no_maps)


def jaccard(a: set[str], b: set[str]) -> float:
    """``|a ∩ b| / |a ∪ b|``; two empty sets agree fully."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def compare_labels(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict:
    """The comparison of two runs' labels over the images both labelled.

    Args:
        a, b: image id -> that run's labels of the image.

    Returns:
        ``images`` (per image, most disagreeing first: ``both``, ``only_a``, ``only_b``, ``jaccard``),
        ``words`` (per word: ``images_a``, ``images_b``), ``particular`` (``a`` and ``b``: the words
        whose share of images most exceeds the other run's) and ``overall`` agreement figures.
    """
    shared = sorted(set(a) & set(b))
    rows = []
    for image_id in shared:
        sa, sb = set(a[image_id]), set(b[image_id])
        rows.append({"image": image_id, "jaccard": round(jaccard(sa, sb), 4),
                     "both": [w for w in a[image_id] if w in sb], "only_a": [w for w in a[image_id] if w not in sb],
                     "only_b": [w for w in b[image_id] if w not in sa]})
    rows.sort(key=lambda r: (r["jaccard"], -len(r["only_a"]) - len(r["only_b"]), r["image"]))
    counts: dict[str, list[int]] = {}
    for image_id in shared:
        for side, words in ((0, a[image_id]), (1, b[image_id])):
            for w in set(words):
                counts.setdefault(w, [0, 0])[side] += 1
    n = max(len(shared), 1)
    words = [{"word": w, "images_a": ca, "images_b": cb} for w, (ca, cb) in counts.items()]
    words.sort(key=lambda d: (-(d["images_a"] + d["images_b"]), d["word"]))

    def particular(mine: str, other: str) -> list[dict]:
        # the share of images a word labels in one run beyond the other, with the counts behind it
        rows_ = [{**d, "margin": round((d[mine] - d[other]) / n, 4)} for d in words if d[mine] > d[other]]
        return sorted(rows_, key=lambda d: (-d["margin"], -d[mine], d["word"]))[:PARTICULAR]

    inter = sum(len(r["both"]) for r in rows)
    total_a = sum(len(set(a[i])) for i in shared)
    total_b = sum(len(set(b[i])) for i in shared)
    union = inter + sum(len(r["only_a"]) + len(r["only_b"]) for r in rows)
    overall = {
        "images_compared": len(shared),
        "mean_jaccard": round(float(np.mean([r["jaccard"] for r in rows])), 4) if rows else None,
        "median_jaccard": round(float(np.median([r["jaccard"] for r in rows])), 4) if rows else None,
        "pooled_jaccard": round(inter / union, 4) if union else None,  # every image's labels pooled
        "identical_images": sum(r["jaccard"] == 1.0 for r in rows),
        "disjoint_images": sum(r["jaccard"] == 0.0 and bool(r["only_a"] or r["only_b"]) for r in rows),
        "a_labels_b_found": round(inter / total_a, 4) if total_a else None,  # of A's labels, the share B found too
        "b_labels_a_found": round(inter / total_b, 4) if total_b else None,
        "labels_a": total_a,
        "labels_b": total_b,
        "words_a": sum(d["images_a"] > 0 for d in words),
        "words_b": sum(d["images_b"] > 0 for d in words),
    }
    return {"overall": overall, "images": rows, "words": words,
            "particular": {"a": particular("images_a", "images_b"), "b": particular("images_b", "images_a")}}


def _missing(a: RunSide, b: RunSide) -> dict[str, list[dict]]:
    """Images that cannot be compared, each with the reason, so that none is dropped silently."""
    out: dict[str, list[dict]] = {"only_in_a": [], "only_in_b": [], "unlabelled_in_a": [], "unlabelled_in_b": []}
    for mine, other, key in ((a, b, "a"), (b, a, "b")):
        for image_id, ref in mine.images.items():
            if image_id not in other.images:
                out[f"only_in_{key}"].append({"image": image_id, "rel": ref.rel})
            elif image_id in mine.unlabelled:
                out[f"unlabelled_in_{key}"].append({"image": image_id, "rel": ref.rel, "reason": mine.unlabelled[image_id]})
    return out


def _common_method(a: Path, b: Path, image_id: str, preferred: str | None) -> str | None:
    methods = []
    for root in (a, b):
        doc, _ = read_output(RunDir(root).heatmaps(image_id), root)
        methods.append(doc.get("methods", []) if isinstance(doc, dict) else [])
    both = [m for m in methods[0] if m in methods[1]]
    if preferred is not None:
        return preferred if preferred in both else None
    return next((m for m in ("surgery", *both) if m in both), None)


def _map_pngs(side: RunSide, image_id: str, method: str, words: list[str], picture: np.ndarray, out: Path,
              tag: str) -> dict[str, str]:
    """Each word's map (``method``) of this run over ``picture``, as PNGs under ``out``; word -> relative path."""
    path = RunDir(side.root).maps(image_id)
    written = {}
    try:
        with np.load(path) as npz:
            for w in words:
                key = f"{method}/{w}"
                if key not in npz.files:
                    continue
                grid = npz[key].astype(np.float32)
                rel = f"maps/{image_id}/{label_slug(w)}__{tag}.png"
                drawn = overlay_heatmap(picture, upsample_map(grid, picture.shape[:2]))
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(drawn).save(buf, format="PNG")
                atomic_write_bytes(out / rel, buf.getvalue())
                written[w] = rel
    except (OSError, ValueError):  # no maps for this image in this run: the page says so
        return {}
    return written


def write_comparison(a_root: Path, b_root: Path, out: Path, maps: int = 200, maps_per_image: int = 4,
                     method: str | None = None, side: int = 160,
                     states: tuple[StateOf, StateOf] | None = None) -> dict:
    """Compare two runs and write ``compare.json`` and ``compare.html`` (and the map PNGs) into ``out``.

    Args:
        maps: how many images (the most disagreeing first) get their shared labels' maps drawn; 0 for none.
        maps_per_image: shared labels drawn per image, in run A's rank order.
        method: the map method to draw (default: ``surgery`` when both runs drew it, else the first both drew).
        side: the drawn pictures' longest side in pixels.
        states: each run's status of an output under its own settings (see ``read_side``); without them
            every labels file found is believed.
    """
    a, b = read_side(a_root, states[0] if states else None), read_side(b_root, states[1] if states else None)
    doc = compare_labels(a.labels, b.labels)
    doc = {"run_a": {"path": str(a_root), "model": a.model, "images": len(a.images), "labelled": len(a.labels)},
           "run_b": {"path": str(b_root), "model": b.model, "images": len(b.images), "labelled": len(b.labels)},
           **doc, "missing": _missing(a, b)}
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, dict] = {}
    for row in doc["images"][:maps]:
        image_id, shared = row["image"], row["both"][:maps_per_image]
        why = [f"run {k}: {s.no_maps[image_id]}" for k, s in (("A", a), ("B", b)) if image_id in s.no_maps]
        if shared and why:
            row["no_maps"] = "; ".join(why)
            continue
        m = _common_method(a_root, b_root, image_id, method) if shared else None
        if m is None:
            continue
        try:
            picture = fit_side(np.asarray(load_image(a.images[image_id].path)), side)
        except (ImageError, OSError) as err:
            row["picture_error"] = str(err)
            continue
        pa = _map_pngs(a, image_id, m, shared, picture, out, "a")
        pb = _map_pngs(b, image_id, m, shared, picture, out, "b")
        drawn[image_id] = {"method": m, "a": pa, "b": pb}
    for row in doc["images"]:
        if row["image"] in drawn:
            row["maps"] = drawn[row["image"]]
    atomic_write_json(out / COMPARE_JSON, doc)
    atomic_write_text(out / COMPARE_HTML, render_comparison(doc, a, b, out))
    return doc


def _chips(words: list[str], kind: str) -> str:
    return "".join(f'<span class="chip {kind}">{html.escape(w)}</span>' for w in words) or '<span class="none">none</span>'


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.3f}" if isinstance(x, float) else str(x))


def render_comparison(doc: dict, a: RunSide, b: RunSide, out: Path) -> str:
    """The comparison as one static page (no script): figures, particular words, missing images, then the images."""
    e = html.escape
    ov = doc["overall"]
    names = {"a": f"A: {a.root.name} ({a.model})", "b": f"B: {b.root.name} ({b.model})"}
    figures = [("images compared", ov["images_compared"]), ("mean Jaccard of the labels", ov["mean_jaccard"]),
               ("median Jaccard", ov["median_jaccard"]), ("pooled Jaccard (all labels)", ov["pooled_jaccard"]),
               ("images with identical labels", ov["identical_images"]), ("images with no label in common", ov["disjoint_images"]),
               ("of A's labels, found by B", ov["a_labels_b_found"]), ("of B's labels, found by A", ov["b_labels_a_found"]),
               ("labels (A / B)", f"{ov['labels_a']} / {ov['labels_b']}"), ("distinct words (A / B)", f"{ov['words_a']} / {ov['words_b']}")]
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clipsight: {e(a.root.name)} vs {e(b.root.name)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}}
table{{border-collapse:collapse;margin:8px 0 20px}}td,th{{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}}
.chip{{display:inline-block;border-radius:10px;padding:1px 8px;margin:2px;font-size:13px}}
.both{{background:#d8f0d8}}.a{{background:#dde8ff}}.b{{background:#ffe2cc}}.none{{color:#999}}
.card{{border:1px solid #ddd;border-radius:6px;padding:10px;margin:10px 0;display:flex;gap:14px}}
.maps{{display:flex;flex-wrap:wrap;gap:10px}}.pair{{text-align:center;font-size:12px}}.pair img{{display:block}}
.cols{{display:flex;gap:30px;flex-wrap:wrap}}h2{{margin-top:28px}}
</style></head><body>
<h1>What two runs see</h1>
<p><span class="chip a">{e(names['a'])}</span> <span class="chip b">{e(names['b'])}</span></p>
<h2>Agreement</h2><table>""" + "".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in figures) + "</table>"]
    parts.append('<h2>Words most particular to each run</h2><div class="cols">')
    for key in ("a", "b"):
        rows = "".join(f"<tr><td>{e(d['word'])}</td><td>{d['images_a']}</td><td>{d['images_b']}</td></tr>"
                       for d in doc["particular"][key]) or '<tr><td colspan="3" class="none">none</td></tr>'
        parts.append(f'<div><h3>{e(names[key])}</h3><table><tr><th>word</th><th>images A</th><th>images B</th></tr>{rows}</table></div>')
    parts.append("</div>")
    missing = doc["missing"]
    if any(missing.values()):
        parts.append("<h2>Images not compared</h2><table><tr><th>image</th><th>why</th></tr>")
        for key, why in (("only_in_a", "only in run A"), ("only_in_b", "only in run B"),
                         ("unlabelled_in_a", "run A"), ("unlabelled_in_b", "run B")):
            for m in missing[key]:
                reason = f"{why}: {m['reason']}" if "reason" in m else why
                parts.append(f"<tr><td>{e(m['rel'])}</td><td>{e(reason)}</td></tr>")
        parts.append("</table>")
    parts.append(f"<h2>Images, most disagreeing first ({len(doc['images'])})</h2>")
    for row in doc["images"]:
        ref = a.images[row["image"]]
        maps = row.get("maps")
        pairs = ""
        if maps:
            for w in row["both"]:
                if w in maps["a"] or w in maps["b"]:
                    cells = "".join(f'<img src="{e(maps[k][w])}" alt="{e(k.upper())}: {e(w)}" loading="lazy">' if w in maps[k]
                                    else f'<span class="none">no {k.upper()} map</span>' for k in ("a", "b"))
                    pairs += f'<div class="pair"><div style="display:flex;gap:4px">{cells}</div>{e(w)} (A | B, {e(maps["method"])})</div>'
        if not pairs and "no_maps" in row:
            pairs = f'<span class="none">no maps: {e(row["no_maps"])}</span>'
        parts.append(f"""<div class="card"><div><b>{e(ref.rel)}</b><br>Jaccard {row['jaccard']:.3f}
<p>both: {_chips(row['both'], 'both')}</p><p>only A: {_chips(row['only_a'], 'a')}</p><p>only B: {_chips(row['only_b'], 'b')}</p></div>
<div class="maps">{pairs}</div></div>""")
    parts.append("</body></html>")
    return "\n".join(parts)
