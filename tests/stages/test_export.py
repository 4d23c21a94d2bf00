"""export and eval: each format read back by its own library, on a toy run whose truth is known."""

import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import ConfigError
from pipeline.autolabels import ExportImage, ExportLabel, load_label_map
from pipeline.exports import write_coco, write_labelstudio
from pipeline.regions import Region
from pipeline.toyworld import TRUTH_COCO, write_scenes
from runall import app
from tests.conftest import fast_args

# Enough ascent for the toy to name its scenes' words; every label is mapped. No score floor: these tests read
# the formats, and a scene whose words all score below decode's default floor (0) would export no labels.
FAST = fast_args(ascend__iterations=30, ascend__candidates=6, decode__min_score="null")
FORMATS = "coco,labelstudio,fiftyone,yolo"


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished toy run of four scenes with truth, exported to every format; copied per test."""
    root = tmp_path_factory.mktemp("export")
    write_scenes(root / "imgs", 3, 4)
    r = _run("--input", str(root / "imgs"), "--model", "toy", "--output", str(root / "out"), "--run-name", "r",
             "--quiet", *FAST, "--set", "surgery.surgery_depth=3")
    assert r.exit_code == 0, r.output
    r = _run("export", "--run", str(root / "out" / "r"), "--to", FORMATS, "--quiet")
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def run(toy_run, tmp_path):
    shutil.copytree(toy_run / "out" / "r", tmp_path / "r")
    return tmp_path / "r"


def _coco(run):
    return json.loads((run / "export" / "coco" / "instances.json").read_text())


def test_coco_loads_in_pycocotools_and_scores_ap_1_against_itself(run, toy_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    doc = _coco(run)
    assert doc["annotations"], "the toy run has regions"
    assert [c["id"] for c in doc["categories"]] == list(range(1, len(doc["categories"]) + 1))
    names = [c["name"] for c in doc["categories"]]
    assert names == sorted(names)
    for im in doc["images"]:
        path = toy_run / "imgs" / im["file_name"]
        assert path.is_file() and Image.open(path).size == (im["width"], im["height"])
    for a in doc["annotations"]:
        assert a["iscrowd"] == 0 and a["box_source"] == "single" and a["tau"] == 0.5 and "score" in a
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x + w <= 64 and y + h <= 64
    gt = COCO(str(run / "export" / "coco" / "instances.json"))
    dt = gt.loadRes(str(run / "export" / "coco" / "results.json"))
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    tags = json.loads((run / "export" / "coco" / "labels.json").read_text())
    assert len(tags["images"]) == len(doc["images"]) and all(t["labels"] for t in tags["images"])


def _masked_image() -> ExportImage:
    mask = np.zeros((30, 40), bool)
    mask[4:20, 6:15] = True
    mask[22:26, 30:38] = True
    region = Region(box=(6.0, 4.0, 32.0, 22.0), area=float(mask.sum()), source="sam", tau=None, peak=1.0, mask=mask)
    boxed = Region(box=(1.0, 2.0, 3.0, 4.0), area=12.0, source="single", tau=0.5, peak=1.0)
    return ExportImage("a-1", "sub/a.png", "/x/sub/a.png", 40, 30,
                       [ExportLabel("cat", 0.31, ("cat", "kitten"), (region,)), ExportLabel("dog", -0.02, ("dog",), (boxed,))])


def test_masks_decode_to_their_image_in_coco_and_label_studio(tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from pycocotools import mask as mask_utils

    im = _masked_image()
    write_coco(tmp_path / "coco", [im], "test")
    doc = json.loads((tmp_path / "coco" / "instances.json").read_text())
    seg = doc["annotations"][0]["segmentation"]
    assert isinstance(seg["counts"], str)
    decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    assert decoded.shape == (30, 40) and (decoded.astype(bool) == im.labels[0].regions[0].mask).all()
    assert "segmentation" not in doc["annotations"][1]  # a heatmap box has no mask
    write_labelstudio(tmp_path / "ls", [im], "v", "")
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    brush = next(r for r in task["predictions"][0]["result"] if r["type"] == "brushlabels")
    rgba = np.reshape(decode_rle(brush["value"]["rle"]), (30, 40, 4))
    assert ((rgba[..., 3] > 0) == im.labels[0].regions[0].mask).all()
    assert task["predictions"][0]["score"] == 0.31
    assert next(r for r in task["predictions"][0]["result"] if r["type"] == "rectanglelabels" and
                r["value"]["rectanglelabels"] == ["dog"])["score"] == 0.0  # a negative cosine, clipped for Label Studio


def test_label_studio_tasks_validate_offline_least_certain_first(run):
    from label_studio_sdk.label_interface import LabelInterface

    folder = run / "export" / "labelstudio"
    li = LabelInterface((folder / "label_config.xml").read_text())
    tasks = json.loads((folder / "tasks.json").read_text())
    assert len(tasks) == 4
    scores = [t["predictions"][0]["score"] for t in tasks]
    assert scores == sorted(scores)
    kinds = set()
    for t in tasks:
        pred = t["predictions"][0]
        assert li.validate_prediction(pred, return_errors=True) == []
        kinds |= {r["type"] for r in pred["result"]}
        assert t["data"]["image"].startswith("scene_")
    assert kinds == {"choices", "rectanglelabels"}
    bad = json.loads(json.dumps(tasks[0]["predictions"][0]))
    bad["result"][0]["value"]["choices"] = ["not-a-label-of-this-run"]
    assert li.validate_prediction(bad, return_errors=True)  # the check can fail


def test_yolo_files_and_the_confidence_column(run):
    folder = run / "export" / "yolo"
    import yaml

    data = yaml.safe_load((folder / "data.yaml").read_text())
    coco = _coco(run)
    assert list(data["names"].values()) == [c["name"] for c in coco["categories"]]
    rows = [line.split() for p in sorted((folder / "labels").glob("*.txt")) for line in p.read_text().splitlines()]
    assert len(list((folder / "labels").glob("*.txt"))) == 4 and len(rows) == len(coco["annotations"])
    assert all(len(r) == 5 and 0 <= int(r[0]) < len(data["names"]) and all(0 <= float(v) <= 1 for v in r[1:]) for r in rows)
    assert _run("export", "--run", str(run), "--to", "yolo", "--set", "export.yolo_confidence=true", "-q").exit_code == 0
    rows = [line.split() for p in (folder / "labels").glob("*.txt") for line in p.read_text().splitlines()]
    assert rows and all(len(r) == 6 for r in rows)


def _fake_fiftyone(monkeypatch):
    """A stand-in for the fiftyone package, recording what the loader builds: CI does not install fiftyone (a large
    optional extra). With the real package installed, the test below uses it instead."""
    fo = types.ModuleType("fiftyone")

    class Label:
        def __init__(self, **kw):
            self.__dict__.update(kw)

        def __setitem__(self, k, v):
            setattr(self, k, v)

        def __getitem__(self, k):
            return getattr(self, k)

    for name in ("Sample", "Classifications", "Classification", "Detections", "Detection", "Heatmap"):
        setattr(fo, name, type(name, (Label,), {}))
    monkeypatch.setitem(sys.modules, "fiftyone", fo)


def test_fiftyone_loader_builds_labels_boxes_and_a_heatmap_per_label(run, monkeypatch):
    import importlib.util

    folder = run / "export" / "fiftyone"
    doc = json.loads((folder / "samples.json").read_text())
    for s in doc["samples"]:
        for path in s["heatmaps"].values():
            assert (folder / path).is_file() and run.name in path  # names unique to the run
    try:
        import fiftyone  # noqa: F401
    except ImportError:
        _fake_fiftyone(monkeypatch)
    spec = importlib.util.spec_from_file_location("clipsight_fo_loader", folder / "load.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    name, samples = loader.samples()
    assert name.startswith("clipsight-") and len(samples) == 4
    for s, d in zip(samples, doc["samples"]):
        labels = [c.label for c in s["clip_labels"].classifications]
        assert labels == [c["label"] for c in d["classifications"]] and labels
        heat = [s[k] for k in d["heatmaps"]]
        assert len(heat) == len(labels) and all(os.path.isfile(h.map_path) for h in heat)
        dets = s["clip_regions"].detections
        assert len(dets) == len(d["detections"]) > 0
        assert all(0 <= v <= 1 for det in dets for v in det.bounding_box) and {det.box_source for det in dets} == {"single"}


def test_eval_corloc_matches_an_independent_computation_from_the_coco_files(run, toy_run):
    r = _run("eval", "--run", str(run), "--truth", str(toy_run / "imgs" / TRUTH_COCO), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert (run / "export" / "eval.json").is_file()
    truth = json.loads((toy_run / "imgs" / TRUTH_COCO).read_text())
    pred = _coco(run)
    tags = json.loads((run / "export" / "coco" / "labels.json").read_text())
    cat_t = {c["id"]: c["name"] for c in truth["categories"]}
    cat_p = {c["id"]: c["name"] for c in pred["categories"]}
    file_t = {im["id"]: im["file_name"] for im in truth["images"]}
    file_p = {im["id"]: im["file_name"] for im in pred["images"]}
    gt, dt = {}, {}
    for a in truth["annotations"]:
        gt.setdefault((file_t[a["image_id"]], cat_t[a["category_id"]]), []).append(a["bbox"])
    for a in pred["annotations"]:
        dt.setdefault((file_p[a["image_id"]], cat_p[a["category_id"]]), []).append(a["bbox"])
    named = {(t["file_name"], lab["name"]) for t in tags["images"] for lab in t["labels"]}

    def iou(a, b):
        ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)

    hits = [any(iou(p, g) >= 0.5 for p in dt.get(key, []) for g in gt[key]) for key in gt if key in named]
    assert hits, "CLIP named some true categories"
    assert result["overall"]["corloc"] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    assert result["overall"]["corloc_pairs"] == len(hits)
    recall = sum(1 for key in gt if key in named) / len(gt)
    assert result["overall"]["recall"] == pytest.approx(recall, abs=1e-4)
    single = result["overall"]["methods"]["single"]
    assert single["pointing"] is not None and single["best_tau"] in result["taus"]
    assert 0 <= single["maxboxacc_v2"] <= 1
    assert set(result["categories"]) <= {c["name"] for c in truth["categories"]}


def test_export_is_redone_only_when_something_changed(run):
    stamp = run / "export" / "export.json"
    before = (stamp.stat().st_mtime_ns, json.loads(stamp.read_text())["stamp"])
    assert _run("export", "--run", str(run), "--to", FORMATS, "-q").exit_code == 0
    assert (stamp.stat().st_mtime_ns, json.loads(stamp.read_text())["stamp"]) == before  # nothing changed
    assert _run("export", "--run", str(run), "--to", "coco", "--set", "export.tau=0.2", "-q").exit_code == 0
    after = json.loads(stamp.read_text())
    assert after["stamp"] != before[1]
    boxes = {a["tau"] for a in _coco(run)["annotations"]}
    assert boxes == {0.2}


def test_stale_surgery_exports_labels_and_says_what_it_left_out(run):
    r = _run("export", "--run", str(run), "--to", "coco", "--set", "surgery.surgery_depth=2")
    assert r.exit_code == 0, r.output
    stamp = json.loads((run / "export" / "export.json").read_text())
    assert len(stamp["left_out"]) == 4 and all(d["what"] == "regions" and "surgery stale" in d["reason"]
                                               for d in stamp["left_out"])
    assert "left out 4" in r.output
    assert _coco(run)["annotations"] == [] and stamp["images"] == 4
    tags = json.loads((run / "export" / "coco" / "labels.json").read_text())
    assert all(t["labels"] for t in tags["images"])


def test_label_map_merges_and_drops_words(run, tmp_path):
    coco = _coco(run)
    words = [c["name"] for c in coco["categories"]]
    lm = tmp_path / "map.yaml"
    lm.write_text(f"map: {{{words[0]}: thing, {words[1]}: thing}}\ndrop: [{words[2]}]\n")
    assert _run("export", "--run", str(run), "--to", "coco", "--label-map", str(lm), "-q").exit_code == 0
    names = [c["name"] for c in _coco(run)["categories"]]
    assert "thing" in names and words[0] not in names and words[1] not in names and words[2] not in names


def test_bad_label_map_and_unknown_format_exit_2_naming_the_key(run, tmp_path):
    lm = tmp_path / "map.yaml"
    lm.write_text("maps: {a: b}\n")
    r = _run("export", "--run", str(run), "--to", "coco", "--label-map", str(lm))
    assert r.exit_code == 2 and "'maps'" in r.output and "map.yaml" in r.output
    lm.write_text("map: {a: [b]}\n")
    r = _run("export", "--run", str(run), "--to", "coco", "--label-map", str(lm))
    assert r.exit_code == 2 and "'map'" in r.output
    r = _run("export", "--run", str(run), "--to", "coco,pascal")
    assert r.exit_code == 2 and "export.formats" in r.output and "'pascal'" in r.output
    with pytest.raises(ConfigError, match="only_mapped"):
        lm.write_text("only_mapped: 3\n")
        load_label_map(lm)


def test_worker_processes_build_the_same_regions_and_name_an_unreadable_file(run, monkeypatch):
    import stages.export as export
    from pipeline.autolabels import LabelMap
    from pipeline.provenance import Status

    done = lambda image, stage, latest: Status("done")  # noqa: E731
    from pipeline.rundir import RunDir

    rd = RunDir(run)
    serial, _, _ = export.read_exports(rd, export.ExportConfig(), LabelMap(), done, workers=1)
    monkeypatch.setattr(export, "PARALLEL_FROM", 1)
    parallel, _, _ = export.read_exports(rd, export.ExportConfig(), LabelMap(), done, workers=2)
    key = lambda images: [(im.id, [(lab.name, lab.score, [r.box for r in lab.regions]) for lab in im.labels])  # noqa: E731
                          for im in images]
    assert key(parallel) == key(serial) and any(lab.regions for im in serial for lab in im.labels)
    victim = serial[0]
    (run / "labels" / f"{victim.id}.json").write_text('{"labels": [')  # cut short, as a full disk leaves it
    images, left_out, _ = export.read_exports(rd, export.ExportConfig(), LabelMap(), done, workers=1)
    assert victim.id not in {im.id for im in images} and len(images) == len(serial) - 1
    assert any(d["what"] == "image" and d["reason"].startswith(f"labels/{victim.id}.json: not valid JSON") for d in left_out)
