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
