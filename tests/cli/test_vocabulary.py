"""Your words beside CLIP's: ``--words``, ``--no-ascent``, and a reviewer's labels coming back in."""

import json

from typer.testing import CliRunner

from pipeline.toy.world import COLOURS, SHAPES, write_scenes
from runall import app
from tests.conftest import fast_args

TOY_WORDS = ",".join([*SHAPES, *COLOURS])


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _labels(run):
    return {p.stem: json.loads(p.read_text())["labels"] for p in (run / "labels").glob("*.json")}


def test_no_ascent_labels_with_the_vocabulary_alone_and_maps_every_label(tmp_path):
    truth = json.loads(write_scenes(tmp_path / "imgs", seed=8, count=3).read_text())
    r = _run("--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--run-name", "r",
             "--quiet", "--no-ascent", "--words", TOY_WORDS, *fast_args())
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    opinions = [json.loads(p.read_text()) for p in (run / "ascend").glob("*.json")]
    assert len(opinions) == 3 and all(op["candidates"] == [] and op["words"] == {} for op in opinions)  # no ascent
    labels = _labels(run)
    assert all(d["source"] == "vocabulary" and "z" in d for ls in labels.values() for d in ls)
    found = hits = 0
    for scene in truth["scenes"]:
        image = next(i for i in labels if i.startswith(scene["file"]))
        words = {d["word"] for d in labels[image]}
        colours = {o["colour"] for o in scene["objects"]}
        found += len(words & colours)
        hits += len(colours)
        heat = json.loads((run / "surgery" / f"{image}.json").read_text())
        assert [e["word"] for e in heat["labels"]] == [d["word"] for d in labels[image]]  # maps for every label
    assert found >= hits - 1  # the toy's colours stand out on its own scenes
    regions = json.loads((run / "export" / "regions.json").read_text())["images"]
    assert any(lab["source"] == "vocabulary" for labels in regions.values() for lab in labels)


def test_words_from_a_file_with_synonyms_join_the_opinion(tmp_path):
    write_scenes(tmp_path / "imgs", seed=9, count=2)
    (tmp_path / "words.txt").write_text("# toy colours\nred: crimson, scarlet\n\ngreen\nblue\nyellow\npurple\norange\n")
    r = _run("--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--run-name", "r",
             "--quiet", "--words", tmp_path / "words.txt", *fast_args())
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    saved = (run / "run.yaml").read_text()
    assert "red: crimson, scarlet" in saved and "purple" in saved
    sources = {d["source"] for ls in _labels(run).values() for d in ls}
    assert "opinion" in sources and sources & {"vocabulary", "both"}


def test_no_ascent_without_words_and_a_missing_words_file_are_clear_errors(tmp_path):
    write_scenes(tmp_path / "imgs", seed=9, count=1)
    r = _run("--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--no-ascent")
    assert r.exit_code == 2 and "--words" in r.output and "decode.words" in r.output, r.output
    r = _run("--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--words", "nope/words.txt")
    assert r.exit_code == 2 and "nope/words.txt: no such file" in r.output, r.output


def test_a_run_round_trips_through_label_studio_review(tmp_path):
    write_scenes(tmp_path / "imgs", seed=10, count=3)
    args = ["--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--run-name", "r", "--quiet",
            *fast_args(), "--set", "export.formats=[coco, labelstudio]"]
    assert _run(*args).exit_code == 0
    run = tmp_path / "out" / "r"
    tasks = json.loads((run / "export" / "labelstudio" / "tasks.json").read_text())
    config = (run / "export" / "labelstudio" / "label_config.xml").read_text()
    before = _labels(run)
    # the reviewer: on the first task drops a label, adds one the config lists, moves a box; the rest untouched
    task = next(t for t in tasks if len(t["predictions"][0]["result"][0]["value"]["choices"]) >= 2)
    image = task["data"]["clipsight_id"]
    result = task["predictions"][0]["result"]
    choices = result[0]["value"]["choices"]
    dropped = choices.pop()
    added = next(w for w in [*SHAPES, *COLOURS] if f'value="{w}"' in config and w not in choices and w != dropped)
    choices.append(added)
    rect = next(item for item in result if item["type"] == "rectanglelabels")
    rect["value"].update(x=10.0, y=20.0, width=30.0, height=25.0)
    moved = rect["value"]["rectanglelabels"][0]
    rect["value"]["rectanglelabels"] = [moved]  # a region may carry several labels of one object: keep one
    result[:] = [item for item in result if item["type"] != "rectanglelabels" or item is rect]
    if moved not in choices:
        choices.append(moved)
    task["annotations"] = [{"id": 7, "result": result, "was_cancelled": False}]  # as Label Studio exports it
    tasks.append({"id": 99, "data": {"image": "/data/local-files/?d=elsewhere/missing.png"}, "annotations": []})
    reviewed = tmp_path / "reviewed.json"
    reviewed.write_text(json.dumps(tasks))

    r = _run("import", "--run", run, "--labelstudio", reviewed)
    assert r.exit_code == 1 and "task 99" in r.output and "not in this run" in r.output, r.output  # named, skipped
    human = json.loads((run / "labels" / f"{image}.json").read_text())["labels"]
    assert [d["word"] for d in human] == choices and all(d["source"] == "human" for d in human)
    assert dropped not in {d["word"] for d in human} and added in {d["word"] for d in human}
    status = _run("status", "--run", run)
    assert "human-labelled images: 1" in " ".join(status.output.split())  # tasks not annotated were not reviewed

    n = len((run / "manifest.jsonl").read_text().splitlines())
    assert _run(*args, "--set", "decode.min_frequency=2").exit_code == 0  # a decode setting changed, too
    new = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()[n:]]
    assert not [x for x in new if x["stage"] == "decode" and x["image"] == image]  # decode left the human labels alone
    assert [d["word"] for d in _labels(run)[image]] == choices
    heat = json.loads((run / "surgery" / f"{image}.json").read_text())
    assert added in [e["word"] for e in heat["labels"]] and dropped not in [e["word"] for e in heat["labels"]]
    regions = json.loads((run / "export" / "regions.json").read_text())["images"][image]
    box = next(lab for lab in regions if lab["label"] == moved)
    assert box["source"] == "human" and box["regions"][0]["source"] == "human"
    w, h = rect["original_width"], rect["original_height"]
    assert box["regions"][0]["box"] == [round(v, 1) for v in (0.1 * w, 0.2 * h, 0.3 * w, 0.25 * h)]
    coco = json.loads((run / "export" / "coco" / "instances.json").read_text())
    assert any(a["label_source"] == "human" and a["box_source"] == "human" for a in coco["annotations"])
    from pycocotools.coco import COCO

    loaded = COCO(str(run / "export" / "coco" / "instances.json"))  # the tool's own reader takes the human boxes
    assert any(loaded.anns[k]["box_source"] == "human" for k in loaded.getAnnIds())
    assert before.keys() == _labels(run).keys()  # nothing else in the run was lost

    tasks = {t["data"]["clipsight_id"]: t for t in
             json.loads((run / "export" / "labelstudio" / "tasks.json").read_text())}
    marked = tasks[image]["predictions"][0]["result"]  # Label Studio's mark of a person's regions
    assert marked and all(item.get("origin") == "manual" for item in marked)
    from label_studio_sdk.label_interface import LabelInterface

    li = LabelInterface((run / "export" / "labelstudio" / "label_config.xml").read_text())
    assert li.validate_prediction(tasks[image]["predictions"][0], return_errors=True) == []
    assert not any(item.get("origin") for i, t in tasks.items() if i != image for item in t["predictions"][0]["result"])
    # the human labels as the truth: this run's own labels of the reviewed image match them exactly
    r = _run("eval", "--run", run, "--human-truth", run, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["overall"]["images"] == 1 and result["overall"]["pairs"] == len(choices)
    assert result["overall"]["precision"] == result["overall"]["recall"] == 1.0
    assert result["overall"]["corloc"] == 1.0 and result["overall"]["corloc_pairs"] == 1  # the one drawn box
    assert result["truth"] == f"the human labels of {run}" and len(result["not_in_truth"]) == 2


def test_importing_a_broken_file_changes_nothing(tmp_path):
    write_scenes(tmp_path / "imgs", seed=9, count=1)
    assert _run("--input", tmp_path / "imgs", "--model", "random:tiny", "--output", tmp_path / "out", "--run-name", "r",
                "--quiet", *fast_args()).exit_code == 0
    run = tmp_path / "out" / "r"
    manifest = (run / "manifest.jsonl").read_text()
    (tmp_path / "bad.json").write_text("[{")
    r = _run("import", "--run", run, "--labelstudio", tmp_path / "bad.json")
    assert r.exit_code == 2 and "bad.json: cannot read it as JSON" in r.output and "nothing was imported" in r.output
    assert (run / "manifest.jsonl").read_text() == manifest and not (run / "human").exists()
