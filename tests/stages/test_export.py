"""export and eval: each format read back by its own library, on a toy run whose truth is known."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.run.config import ConfigError
from pipeline.labels.autolabels import ExportImage, ExportLabel, load_label_map
from pipeline.labels.exports import write_coco, write_fiftyone, write_labelstudio
from pipeline.labels.regions import Region
from pipeline.toy.world import TRUTH_COCO, write_scenes
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
    """A stand-in for the fiftyone package, recording what the loader builds, for a machine without the fiftyone
    extra; the test below uses the real package where it is installed (CI installs it)."""
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


def _fiftyone_loader(folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"clipsight_fo_loader_{abs(hash(str(folder)))}", folder / "load.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    return loader


def test_fiftyone_loader_builds_labels_boxes_and_a_heatmap_per_label_rank(run, monkeypatch):
    folder = run / "export" / "fiftyone"
    doc = json.loads((folder / "samples.json").read_text())
    for s in doc["samples"]:
        for h in s["heatmaps"]:
            assert (folder / h["map"]).is_file() and run.name in h["map"]  # names unique to the run
    try:
        import fiftyone  # noqa: F401
    except ImportError:
        _fake_fiftyone(monkeypatch)
    name, samples = _fiftyone_loader(folder).samples()
    assert name.startswith("clipsight-") and len(samples) == 4
    for s, d in zip(samples, doc["samples"]):
        labels = [c.label for c in s["clip_labels"].classifications]
        assert labels == [c["label"] for c in d["classifications"]] and labels
        heat = [s[f"heatmap_{k}"] for k in range(1, len(labels) + 1)]  # one per label, by rank, with its label
        assert [h.label for h in heat] == labels and all(os.path.isfile(h.map_path) for h in heat)
        dets = s["clip_regions"].detections
        assert len(dets) == len(d["detections"]) > 0
        assert all(0 <= v <= 1 for det in dets for v in det.bounding_box) and {det.box_source for det in dets} == {"single"}


def test_fiftyone_dataset_round_trips_with_a_bounded_schema(run, fiftyone, tmp_path):
    folder = run / "export" / "fiftyone"
    doc = json.loads((folder / "samples.json").read_text())
    ds = _fiftyone_loader(folder).build(f"clipsight-test-{tmp_path.name}")
    try:
        most = max(len(s["classifications"]) for s in doc["samples"])
        fields = sorted(f for f in ds.get_field_schema() if f.startswith("heatmap"))
        assert fields == sorted(f"heatmap_{k}" for k in range(1, most + 1))  # never a field per word
        assert len(ds) == 4
        for sample, d in zip(ds.iter_samples(), doc["samples"]):  # read back from the database
            assert sample.filepath == d["filepath"] and sample.clipsight_id == d["id"]
            labels = [(c.label, c.confidence) for c in sample.clip_labels.classifications]
            assert labels == [(c["label"], c["confidence"]) for c in d["classifications"]]
            boxes = [(det.label, det.bounding_box, det.tau) for det in sample.clip_regions.detections]
            assert boxes == [(x["label"], pytest.approx(x["bounding_box"]), x["tau"]) for x in d["detections"]]
            for h in d["heatmaps"]:
                heat = sample[h["field"]]
                assert heat.label == h["label"] and heat.map_path == str(folder / h["map"]) and heat.range == [0, 255]
    finally:
        ds.delete()
    write_fiftyone(tmp_path / "fo", [_masked_image()], "k", "")  # a SAM mask, cropped to its box
    mask = _masked_image().labels[0].regions[0].mask
    (png,) = (tmp_path / "fo" / "masks").glob("*.png")
    assert np.asarray(Image.open(png)).shape == (22, 32)  # only the box's crop is written
    for earlier in (False, True):  # this export's PNG, then an earlier export's, of the whole picture
        if earlier:
            Image.fromarray(mask.astype(np.uint8) * 255).save(png)
        masked = _fiftyone_loader(tmp_path / "fo").build(f"clipsight-mask-{tmp_path.name}")
        try:
            det = masked.first().clip_regions.detections[0]
            assert det.mask.shape == (22, 32) and (det.mask == mask[4:26, 6:38]).all()
        finally:
            masked.delete()


def test_fiftyone_evaluate_detections_agrees_with_eval(run, toy_run, fiftyone, tmp_path):
    truth_path = toy_run / "imgs" / TRUTH_COCO
    truth = json.loads(truth_path.read_text())
    r = _run("eval", "--run", str(run), "--truth", str(truth_path), "--json")
    assert r.exit_code == 0, r.output
    det = json.loads(r.stdout[r.stdout.index("{"):])["detection"]
    names = {c["id"]: c["name"] for c in truth["categories"]}
    images = {im["file_name"]: im for im in truth["images"]}
    ds = _fiftyone_loader(run / "export" / "fiftyone").build(f"clipsight-eval-{tmp_path.name}")
    try:
        for sample in ds.iter_samples(autosave=True):
            im = images[Path(sample.filepath).name]
            sample["ground_truth"] = fiftyone.Detections(detections=[
                fiftyone.Detection(label=names[a["category_id"]], bounding_box=[
                    a["bbox"][0] / im["width"], a["bbox"][1] / im["height"], a["bbox"][2] / im["width"],
                    a["bbox"][3] / im["height"]])
                for a in truth["annotations"] if a["image_id"] == im["id"]])
        ds.evaluate_detections("clip_regions", gt_field="ground_truth", eval_key="ev", iou=0.5)
        theirs = {k: sum(ds.values(f"ev_{k}")) for k in ("tp", "fp", "fn")}
    finally:
        ds.delete()
    assert theirs["tp"] > 0 and theirs == {k: det[k] for k in ("tp", "fp", "fn")}
    assert det["precision"] == pytest.approx(theirs["tp"] / (theirs["tp"] + theirs["fp"]), abs=1e-4)
    assert det["recall"] == pytest.approx(theirs["tp"] / (theirs["tp"] + theirs["fn"]), abs=1e-4)


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
    copied = json.loads(stamp.read_text())["stamp"]
    assert _run("export", "--run", str(run), "--to", FORMATS, "-q").exit_code == 0
    before = (stamp.stat().st_mtime_ns, json.loads(stamp.read_text())["stamp"])
    assert before[1] != copied  # a run copied elsewhere exports anew: data.yaml holds the folder
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
    from pipeline.labels.autolabels import LabelMap
    from pipeline.run.provenance import Status

    done = lambda image, stage, latest: Status("done")  # noqa: E731
    from pipeline.run.rundir import RunDir

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


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_yolo_folder_is_a_dataset_by_the_formats_rules(run, toy_run):
    folder = run / "export" / "yolo"
    r = _run("export", "--run", str(run), "--to", FORMATS)  # a copied run: data.yaml's absolute path is redone
    assert r.exit_code == 0 and "yolo:" in r.output
    data = _yaml(folder / "data.yaml")
    root = Path(data["path"])
    assert root.is_absolute() and root == folder.resolve() and data["train"] == data["val"] == "images"
    images = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    assert [p.name for p in images] == sorted(p.name for p in (toy_run / "imgs").glob("*.png"))
    for p in images:  # each image has its label file where the format looks for it: /images/ -> /labels/, .txt
        assert p.is_symlink() and p.read_bytes() == (toy_run / "imgs" / p.name).read_bytes()
        assert (root / "labels" / p.relative_to(root / "images")).with_suffix(".txt").is_file()


_ULTRALYTICS_CHECK = """
import json, sys
from ultralytics.data import YOLODataset
from ultralytics.data.utils import check_det_dataset

data = check_det_dataset(sys.argv[1])
ds = YOLODataset(img_path=data["train"], data=data, task="detect", augment=False, imgsz=64, cache=False)
items = [ds[i] for i in range(len(ds))]  # every image and its boxes, through the loader training uses
print(json.dumps({"nc": data["nc"], "images": len(ds.im_files), "boxes": sum(len(lab["cls"]) for lab in ds.labels),
                  "shapes_agree": all(it["img"].shape[0] == 3 and it["cls"].shape[0] == it["bboxes"].shape[0]
                                      for it in items)}))
"""


def test_yolo_dataset_loads_in_ultralytics_from_another_folder(run, tmp_path):
    """In its own process: importing ultralytics patches ``PIL.Image.open`` and ``torch.save`` for the whole
    interpreter, which would change what every later test sees."""
    if importlib.util.find_spec("ultralytics") is None:  # found, not imported here
        pytest.skip("ultralytics is not installed (pip install -e '.[dev]')")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics"), "YOLO_OFFLINE": "1"}  # its settings file
    done = subprocess.run([sys.executable, "-c", _ULTRALYTICS_CHECK, str(run / "export" / "yolo" / "data.yaml")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    coco = _coco(run)
    assert got["nc"] == len(coco["categories"]) and got["images"] == len(coco["images"]) == 4
    assert got["boxes"] == len(coco["annotations"]) > 0 and got["shapes_agree"]


def test_yolo_split_is_seeded_and_an_earlier_layout_is_removed(run, toy_run):
    from pipeline.labels.exports import yolo_split

    folder = run / "export" / "yolo"
    assert _run("export", "--run", str(run), "--to", "yolo", "--val", "0.5", "-q").exit_code == 0
    data = _yaml(folder / "data.yaml")
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    split = {p.name: p.parent.name for p in (folder / "images").rglob("*.png")}
    assert sorted(split.values()) == ["train", "train", "val", "val"] and len(split) == 4  # the flat images/ are gone
    labels = {p.with_suffix(".png").name: p.parent.name for p in (folder / "labels").rglob("*.txt")}
    assert labels == split
    assert _run("export", "--run", str(run), "--to", "yolo", "--val", "0.5", "--set", "export.yolo_images=copy",
                "-q").exit_code == 0
    again = {p.name: p.parent.name for p in (folder / "images").rglob("*.png")}
    assert again == split and not any(p.is_symlink() for p in (folder / "images").rglob("*.png"))
    ims = [ExportImage(str(i), f"d/{i}.png", f"/x/{i}.png", 8, 8) for i in range(20)]
    a, b = yolo_split(ims, 0.25, 0), yolo_split(list(reversed(ims)), 0.25, 0)
    assert a == b and sum(v == "val" for v in a.values()) == 5  # the same seed splits alike, whatever the order
    assert yolo_split(ims, 0.25, 1) != a and set(yolo_split(ims, 0.0, 0).values()) == {""}


def test_yolo_finds_the_labels_of_images_in_a_folder_named_images(tmp_path):
    from pipeline.labels.exports import write_yolo

    src = tmp_path / "in" / "images" / "a.png"
    src.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(src)
    box = Region(box=(4.0, 3.0, 8.0, 6.0), area=48.0, source="single", tau=0.5, peak=1.0)
    im = ExportImage("a-1", "images/a.png", str(src), 40, 30, [ExportLabel("cat", 0.3, ("cat",), (box,))])
    write_yolo(tmp_path / "yolo", [im], False)
    (image,) = [p for p in (tmp_path / "yolo" / "images").rglob("*.png")]
    label = Path("/labels/".join(str(image).rsplit("/images/", 1))).with_suffix(".txt")  # YOLO's own rule
    assert label.read_text().split() == ["0", "0.200000", "0.200000", "0.200000", "0.200000"]


def test_categories_take_the_users_ids_and_cocoeval_of_results_gives_evals_ap(run, toy_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth_path = toy_run / "imgs" / TRUTH_COCO
    truth = json.loads(truth_path.read_text())
    theirs = {c["name"]: c["id"] for c in truth["categories"]}
    r = _run("export", "--run", str(run), "--to", "coco,yolo", "--categories", str(truth_path))
    assert r.exit_code == 0, r.output
    doc = _coco(run)
    assert {c["name"]: c["id"] for c in doc["categories"]} == theirs  # every one of theirs; words not in it dropped
    assert {im["file_name"]: im["id"] for im in doc["images"]} == {im["file_name"]: im["id"] for im in truth["images"]}
    assert list(_yaml(run / "export" / "yolo" / "data.yaml")["names"].values()) == sorted(theirs, key=theirs.get)
    gt = COCO(str(truth_path))
    ev = COCOeval(gt, gt.loadRes(str(run / "export" / "coco" / "results.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    r = _run("eval", "--run", str(run), "--truth", str(truth_path))
    assert r.exit_code == 0, r.output
    result = json.loads((run / "export" / "eval.json").read_text())
    det = result["detection"]
    assert det["ap50"] > 0  # the toy's boxes find some of its objects
    assert det["ap"] == pytest.approx(ev.stats[0], abs=1e-4) and det["ap50"] == pytest.approx(ev.stats[1], abs=1e-4)
    assert f"AP {det['ap']}, AP50 {det['ap50']}" in r.output
    assert _run("export", "--run", str(run), "--to", "coco", "--categories", str(truth_path),
                "--new-categories", "keep", "-q").exit_code == 0
    kept = {c["name"]: c["id"] for c in _coco(run)["categories"]}
    new = {n: i for n, i in kept.items() if n not in theirs}
    assert {n: kept[n] for n in theirs} == theirs and all(i > max(theirs.values()) for i in new.values())
    assert new or all(lab["name"] in theirs for t in json.loads((run / "export" / "coco" / "labels.json").read_text())["images"]
                      for lab in t["labels"])


def test_bad_categories_file_exits_2_naming_it(run, tmp_path):
    bad = tmp_path / "cats.json"
    bad.write_text('{"categories": [{"name": "cat"}]}')
    r = _run("export", "--run", str(run), "--to", "coco", "--categories", str(bad))
    assert r.exit_code == 2 and "cats.json" in r.output and "'id'" in r.output
    r = _run("export", "--run", str(run), "--to", "coco", "--categories", str(tmp_path / "none.json"))
    assert r.exit_code == 2 and "none.json" in r.output


def _flat_case(grid):
    from pipeline.labels.autolabels import LabelRules, LabelMap, export_image
    from pipeline.run.images import ImageRef

    ref = ImageRef(id="a-1", path="/x/a.png", rel="a.png", root="/x")
    return export_image(ref, (64, 64), [{"word": "cat", "score": 0.3}], {"labels": [{"word": "cat"}]},
                        {"cat": grid}, {}, LabelRules(min_contrast=0.25, max_box_area=0.9), LabelMap()).labels[0]


def test_a_flat_map_or_a_box_over_nearly_all_the_image_gives_no_box_and_says_why():
    from pipeline.labels.regions import map_contrast

    spot = np.zeros((16, 16))
    spot[4:7, 9:12] = 1.0
    noise = np.random.default_rng(0).random((16, 16))
    assert map_contrast(spot) > 0.9 and 0.4 < map_contrast(noise) < 0.6 and map_contrast(np.ones((4, 4))) == 0
    hot = _flat_case(spot)
    assert len(hot.regions) == 1 and hot.no_region == ""
    x, y, w, h = hot.regions[0].box
    assert w * h < 0.2 * 64 * 64
    plateau = 1.0 - 0.2 * spot  # the peak barely above the mean: high everywhere but one shallow dip
    assert map_contrast(plateau) < 0.25
    flat = _flat_case(plateau)
    assert flat.regions == () and flat.no_region.startswith("flat map")
    frame = np.zeros((16, 16))
    frame[[0, -1], :] = frame[:, [0, -1]] = 1.0  # peaked enough, but its one component spans the image
    assert map_contrast(frame) > 0.25
    whole = _flat_case(frame)
    assert whole.regions == () and "max_box_area" in whole.no_region


def test_no_exported_box_covers_more_than_90_percent_of_its_image(run):
    doc = _coco(run)
    size = {im["id"]: im["width"] * im["height"] for im in doc["images"]}
    assert doc["annotations"] and all(a["bbox"][2] * a["bbox"][3] <= 0.9 * size[a["image_id"]] for a in doc["annotations"])
    assert _run("export", "--run", str(run), "--to", "coco", "--set", "export.max_box_area=0.001", "-q").exit_code == 0
    stamp = json.loads((run / "export" / "export.json").read_text())
    assert _coco(run)["annotations"] == [] and stamp["labels_without_region"] == stamp["labels"] > 0


def test_label_studio_local_preset_warning_and_an_image_outside_the_root(run, toy_run, monkeypatch):
    r = _run("export", "--run", str(run), "--to", "labelstudio")
    assert r.exit_code == 0 and "warning: Label Studio tasks hold bare relative image names" in r.output
    r = _run("export", "--run", str(run), "--to", "labelstudio", "--path-prefix", f"local:{toy_run}")
    assert r.exit_code == 0 and "warning" not in r.output
    tasks = json.loads((run / "export" / "labelstudio" / "tasks.json").read_text())
    assert all(t["data"]["image"].startswith("/data/local-files/?d=imgs/scene_") for t in tasks)
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    r = _run("export", "--run", str(run), "--to", "labelstudio", "--path-prefix", "local")
    assert r.exit_code == 2 and "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT" in r.output
    r = _run("export", "--run", str(run), "--to", "labelstudio", "--path-prefix", f"local:{toy_run / 'elsewhere'}")
    assert r.exit_code == 1 and "is not under Label Studio's document root" in r.output


def test_a_labels_tile_evidence_is_its_prior_and_an_attribute_of_its_region():
    from pipeline.labels.autolabels import LabelMap, LabelRules, export_image
    from pipeline.labels.exports import coco_documents
    from pipeline.run.images import ImageRef

    grid = np.zeros((8, 8))
    grid[1:3, 1:3] = 1.0  # the map's peak, top left
    grid[5:7, 5:7] = 0.7  # the word's tile is the bottom right
    labels = [{"word": "cat", "score": 0.3, "evidence": [{"kind": "tile", "box": [0.5, 0.5, 0.5, 0.5]},
                                                         {"kind": "image", "box": [0, 0, 1, 1]}]}]
    ref = ImageRef(id="a-1", path="/x/a.png", rel="a.png", root="/x")
    held = export_image(ref, (64, 64), labels, {"labels": []}, {"cat": grid}, {}, LabelRules(evidence_prior=True),
                        LabelMap()).labels[0]
    free = export_image(ref, (64, 64), labels, {"labels": []}, {"cat": grid}, {}, LabelRules(), LabelMap()).labels[0]
    assert held.evidence == free.evidence == ((32.0, 32.0, 32.0, 32.0),) and free.regions[0].box[0] < 16
    assert held.regions[0].box[0] >= 32 and held.regions[0].box[1] >= 32
    doc, _, _ = coco_documents([ExportImage("a-1", "a.png", "/x/a.png", 64, 64, [held])], "t")
    assert doc["annotations"][0]["evidence"] == [[32.0, 32.0, 32.0, 32.0]]


def test_refined_regions_read_each_picture_and_differ_from_the_coarse_ones(run):
    before = json.loads((run / "export" / "regions.json").read_text())
    r = _run("export", "--run", str(run), "--set", "export.refine=pamr", "--set", "export.tau=0.8", "--quiet")
    assert r.exit_code == 0, r.output
    after = json.loads((run / "export" / "regions.json").read_text())
    assert after["stamp"] != before["stamp"]  # a new setting: a new export
    boxes = [(im, reg["box"]) for im, labels in after["images"].items() for lab in labels for reg in lab["regions"]]
    assert boxes and all(0 <= x and 0 <= y and x + w <= after["size"][im][0] + 0.5 and y + h <= after["size"][im][1] + 0.5
                         for im, (x, y, w, h) in boxes)
    coarse = _run("export", "--run", str(run), "--set", "export.tau=0.8", "--set", "export.refine=none", "--quiet")
    assert coarse.exit_code == 0
    plain = json.loads((run / "export" / "regions.json").read_text())
    assert [b for _, b in boxes] != [reg["box"] for labels in plain["images"].values() for lab in labels
                                     for reg in lab["regions"]]  # the pictures changed the boxes
