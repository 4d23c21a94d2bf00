"""A reviewer's corrections coming back: Label Studio tasks read as each image's ``human`` labels.

``read_review`` is the pure core. It takes Label Studio's JSON export (tasks with ``annotations``), or
the ``tasks.json`` clipsight wrote, edited (its ``predictions`` changed by hand), and gives each
image's labels: the image-level choices and every rectangle's label, with the rectangles as boxes in
pixels. An image is found by the ``clipsight_id`` its task carries, else by its file name. What cannot be
read is a problem that names the task, and the rest goes on: a task for an image not in the run, a
label the run's label config does not list, a result that is not what Label Studio writes.

A human label has ``source: "human"``, ``score: 1.0`` (a reviewer's word is not a guess) and
``boxes``, so exports give the drawn boxes as its regions. Brush masks are read as labels, not masks.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse
from xml.sax.saxutils import unescape

from pipeline.run.images import ImageRef
from pipeline.run.rundir import RunDir, atomic_write_json, read_output

HUMAN = "human"


@dataclass
class Review:
    """One image's corrected labels, and which task and annotation they came from."""

    image: str
    labels: list[dict]  # {"word", "score", "frequency", "source": "human", "rank", "boxes": [[x, y, w, h] px]}
    task: str
    annotation: str | None  # the annotation's id; None for an edited prediction


def config_labels(xml: str) -> set[str]:
    """The label values a Label Studio labeling config lists (``<Choice value=..>``, ``<Label value=..>``), as
    ``exports.labelstudio_config`` writes them (``quoteattr``)."""
    return {unescape(v, {"&quot;": '"'}) for v in re.findall(r'<(?:Choice|Label)\s+value="([^"]*)"', xml)}


def _result_of(task: dict, annotated: bool) -> tuple[list | None, str | None]:
    """The result a task's reviewer left: its last annotation that was not cancelled, or, in an edited tasks
    file (no task ``annotated``), its first prediction's; and that annotation's id."""
    kept = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if kept:
        return kept[-1].get("result"), str(kept[-1].get("id", len(kept) - 1))
    preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    return (preds[0].get("result"), None) if preds and not annotated else (None, None)


def _image_of(task: dict, by_id: dict[str, ImageRef], by_name: dict[str, list[ImageRef]]) -> ImageRef | None:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    if data.get("clipsight_id") in by_id:
        return by_id[data["clipsight_id"]]
    url = data.get("image")
    if isinstance(url, str) and url:
        parsed = urlparse(url)
        path = unquote(parsed.query.removeprefix("d=") if parsed.query.startswith("d=") else parsed.path)
        refs = by_name.get(PurePosixPath(path).name, [])
        if len(refs) == 1:
            return refs[0]
    return None


def read_review(tasks: object, refs: list[ImageRef], sizes: dict[str, tuple[int, int]],
                known: set[str] | None = None) -> tuple[list[Review], list[str]]:
    """Each reviewed image's human labels, and the problems met, each naming its task.

    Args:
        tasks: the parsed JSON: a list of Label Studio tasks.
        refs: the run's images.
        sizes: ``{image id: (width, height)}`` for rectangles that do not carry their image's size.
        known: the labels the run's label config lists; ``None`` accepts every label.
    """
    if not isinstance(tasks, list):
        return [], ["not a list of Label Studio tasks (export the project as JSON, or give the run's tasks.json)"]
    by_id = {r.id: r for r in refs}
    by_name: dict[str, list[ImageRef]] = {}
    for r in refs:
        by_name.setdefault(PurePosixPath(r.rel.replace("\\", "/")).name, []).append(r)
    reviews, problems, seen = [], [], {}
    # Label Studio's export: only the annotated tasks were reviewed; the run's tasks file, edited: every task was
    annotated = any(isinstance(t, dict) and t.get("annotations") for t in tasks)
    for k, task in enumerate(tasks):
        name = f"task {task.get('id', k + 1) if isinstance(task, dict) else k + 1}"
        if not isinstance(task, dict):
            problems.append(f"{name}: not a task (a JSON object); skipped")
            continue
        ref = _image_of(task, by_id, by_name)
        if ref is None:
            image = (task.get("data") or {}).get("image") if isinstance(task.get("data"), dict) else None
            problems.append(f"{name}: its image {image!r} is not in this run; skipped")
            continue
        result, annotation = _result_of(task, annotated)
        if result is None and annotated and not task.get("annotations"):
            continue  # not reviewed yet: its image keeps what it has
        if not isinstance(result, list):
            problems.append(f"{name} ({ref.rel}): no annotation or prediction result to read; skipped")
            continue
        review = Review(ref.id, [], str(task.get("id", k + 1)), annotation)
        words: dict[str, list[list[float]]] = {}
        for item in result:
            value = item.get("value") if isinstance(item, dict) else None
            if not isinstance(value, dict):
                problems.append(f"{name} ({ref.rel}): a result item without a value; left out")
                continue
            names = value.get("choices") or value.get("rectanglelabels") or value.get("brushlabels") or \
                value.get("labels") or []
            for label in names if isinstance(names, list) else []:
                if known is not None and label not in known:
                    problems.append(f"{name} ({ref.rel}): label {label!r} is not in the run's label config; "
                                           "left out")
                    continue
                boxes = words.setdefault(str(label), [])
                if item.get("type") == "rectanglelabels":
                    box = _pixels(value, item, sizes.get(ref.id))
                    if box is None:
                        problems.append(f"{name} ({ref.rel}): a {label!r} rectangle without a size; "
                                               "kept as a label")
                    else:
                        boxes.append(box)
        review.labels = [{"word": w, "score": 1.0, "frequency": 0, "source": HUMAN, "rank": i, "boxes": b}
                         for i, (w, b) in enumerate(words.items(), 1)]
        if ref.id in seen:
            problems.append(f"{name} ({ref.rel}): a second task for the image; it replaces task {seen[ref.id]}")
            reviews = [r for r in reviews if r.image != ref.id]
        seen[ref.id] = review.task
        reviews.append(review)
    return reviews, problems


def _pixels(value: dict, item: dict, size: tuple[int, int] | None) -> list[float] | None:
    """A rectangle's ``[x, y, w, h]`` in pixels from Label Studio's percent."""
    w, h = item.get("original_width") or (size or (None, None))[0], item.get("original_height") or (size or (None, None))[1]
    try:
        x, y, bw, bh = (float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        return None
    if not w or not h:
        return None
    return [round(x * w / 100, 2), round(y * h / 100, 2), round(bw * w / 100, 2), round(bh * h / 100, 2)]


def write_reviews(run: RunDir, reviews: list[Review], fingerprint: str, source: str, session: str) -> list[dict]:
    """Each review as the image's decode output: ``human/<id>.json`` (kept, so decode keeps it however often
    it runs) and ``labels/<id>.json``, recorded as done and ``human`` in the manifest, so the next run
    leaves decode alone for the image and redraws what depends on its labels. Returns the records."""
    latest = run.latest()
    paths = {r.id: r.path for r in run.load_images()}
    records = []
    for review in reviews:
        doc = {"image": review.image, "labels": review.labels, "prompts": [],
               "review": {"file": source, "task": review.task, "annotation": review.annotation}}
        atomic_write_json(run.human(review.image), doc)
        atomic_write_json(run.labels(review.image), doc)
        outputs = [run.rel(run.labels(review.image)), run.rel(run.human(review.image))]
        upstream = (latest.get((review.image, "ascend")) or {}).get("rid")
        records.append({"image": review.image, "path": paths.get(review.image), "stage": "decode", "status": "done",
                        "error": None, "seconds": 0.0, "outputs": outputs, "sums": run.output_sums(outputs),
                        "rid": uuid.uuid4().hex[:16], **({"upstream": {"ascend": upstream}} if upstream else {}),
                        "provenance": fingerprint, "human": True, "session": session})
    run.append_manifest(records)
    return records


def human_truth(run: RunDir) -> dict:
    """A run's human labels as a COCO truth document for ``eval``: each reviewed image, each drawn box an
    object, and each label without a box an annotation without ``bbox`` (present, not localised)."""
    images, annotations, names = [], [], {}
    for k, ref in enumerate(r for r in run.load_images() if run.human(r.id).is_file()):
        doc, _ = read_output(run.human(ref.id), run.root)
        if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list):
            continue
        images.append({"id": k + 1, "file_name": ref.rel.replace("\\", "/")})
        for d in doc["labels"]:
            cat = names.setdefault(d["word"], len(names) + 1)
            for box in d.get("boxes") or [None]:
                annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": cat, "iscrowd": 0,
                                    **({"bbox": box, "area": box[2] * box[3]} if box else {})})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in names.items()]}
