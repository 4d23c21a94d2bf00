"""``compare``: two runs over the same images, matched by id; nothing missing is dropped silently."""

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.labels.compare import compare_labels, jaccard
from pipeline.toy.world import make_scenes
from runall import app
from tests.conftest import fast_args


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A on three toy scenes; run B, with another seed, on the same three plus one more; A's labels of one
    image then removed (decode unfinished there)."""
    from pipeline.toy.world import write_scenes

    root = tmp_path_factory.mktemp("compare")
    write_scenes(root / "a_imgs", 0, 3)
    shutil.copytree(root / "a_imgs", root / "b_imgs")
    Image.fromarray(make_scenes(9, 1)[0].image).save(root / "b_imgs" / "extra.png")
    for name, seed in (("a", 0), ("b", 3)):
        r = _run("--input", str(root / f"{name}_imgs"), "--model", "toy", "--output", str(root / "out"), "--run-name",
                 name, "--quiet", *fast_args(ascend__iterations=12), "--set", f"seed={seed}")
        assert r.exit_code == 0, r.output
    labels = sorted((root / "out" / "a" / "labels").glob("*.json"))
    labels[0].unlink()
    return root / "out" / "a", root / "out" / "b", labels[0].stem


def _words(run, image_id):
    return [d["word"] for d in json.loads((run / "labels" / f"{image_id}.json").read_text())["labels"]]


def test_compare_writes_both_files_with_every_image_accounted_for(two_runs, tmp_path):
    a, b, unlabelled = two_runs
    r = _run("compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert r.exit_code == 0, r.output
    assert "1 images only in B" in r.output and "1 images without labels in A" in r.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [m["rel"] for m in doc["missing"]["only_in_b"]] == ["extra.png"]
    assert [m["image"] for m in doc["missing"]["unlabelled_in_a"]] == [unlabelled]
    assert doc["missing"]["only_in_a"] == [] and doc["overall"]["images_compared"] == 2
    assert doc["run_a"]["model"] == doc["run_b"]["model"] == "toy"
    for row in doc["images"]:  # each figure recomputed from the two runs' label files
        wa, wb = _words(a, row["image"]), _words(b, row["image"])
        assert set(row["both"]) == set(wa) & set(wb) and set(row["only_a"]) == set(wa) - set(wb)
        assert set(row["only_b"]) == set(wb) - set(wa)
        assert row["jaccard"] == pytest.approx(len(set(wa) & set(wb)) / len(set(wa) | set(wb)), abs=1e-4)
    assert [r["jaccard"] for r in doc["images"]] == sorted(r["jaccard"] for r in doc["images"])  # most disagreeing first
    drawn = [r for r in doc["images"] if r["both"]]
    assert drawn, "the toy's two runs share no label: the maps would go untested"
    for row in drawn:
        assert row["maps"]["method"] == "surgery"
        for side in ("a", "b"):
            assert set(row["maps"][side]) == set(row["both"][:4])
            assert all((tmp_path / "cmp" / p).is_file() for p in row["maps"][side].values())
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "extra.png" in page and "only in run B" in page and "decode did not finish" in page


def test_compare_refuses_a_folder_that_is_not_a_run_and_says_when_it_drew_no_map(two_runs, tmp_path):
    a, b, _ = two_runs
    r = _run("compare", str(a), str(tmp_path), "--out", str(tmp_path / "cmp"))
    assert r.exit_code == 2 and "not a run directory" in r.output
    r = _run("compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--method", "naclip")  # neither run drew it
    assert r.exit_code == 0 and "the page has no maps" in " ".join(r.output.split())
    assert not (tmp_path / "cmp" / "maps").exists()


def test_compare_labels_core():
    doc = compare_labels({"x": ["cat", "dog"], "y": ["sun"], "z": []}, {"x": ["dog", "cow"], "y": ["sun"], "z": [], "w": ["a"]})
    rows = {r["image"]: r for r in doc["images"]}
    assert set(rows) == {"x", "y", "z"}  # images labelled by both only; the caller lists the rest
    assert rows["x"]["both"] == ["dog"] and rows["x"]["only_a"] == ["cat"] and rows["x"]["only_b"] == ["cow"]
    assert rows["x"]["jaccard"] == pytest.approx(1 / 3, abs=1e-4) and rows["y"]["jaccard"] == 1.0 and jaccard(set(), set()) == 1.0
    assert doc["images"][0]["image"] == "x"
    ov = doc["overall"]
    assert ov["pooled_jaccard"] == pytest.approx(2 / 4, abs=1e-4) and ov["identical_images"] == 2 and ov["a_labels_b_found"] == pytest.approx(2 / 3, abs=1e-4)
    assert [d["word"] for d in doc["particular"]["a"]] == ["cat"] and [d["word"] for d in doc["particular"]["b"]] == ["cow"]


def test_compare_leaves_out_damaged_labels_and_undrawn_maps_with_the_reason(two_runs, tmp_path):
    """Outputs changed outside the program are not compared: a cut-short labels file in A and a damaged surgery
    output in B, each named with its reason, while the other images compare as before."""
    a, b, unlabelled = two_runs
    a2, b2 = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, a2)
    shutil.copytree(b, b2)
    ids = sorted(p.stem for p in (a2 / "labels").glob("*.json"))
    cut, no_maps = ids[0], ids[-1]
    labels = a2 / "labels" / f"{cut}.json"
    labels.write_bytes(labels.read_bytes()[:20])  # a bad copy: the size no longer matches the record
    surgery = b2 / "surgery" / f"{no_maps}.json"
    surgery.write_bytes(surgery.read_bytes() + b" ")
    r = _run("compare", str(a2), str(b2), "--out", str(tmp_path / "cmp"))
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    why = {m["image"]: m["reason"] for m in doc["missing"]["unlabelled_in_a"]}
    assert set(why) == {unlabelled, cut}
    assert why[cut].startswith("decode damaged") and f"labels/{cut}.json" in why[cut]
    assert doc["overall"]["images_compared"] == 1
    row = next(r for r in doc["images"] if r["image"] == no_maps)
    assert row["both"], "the two runs share no label there: no map would have been drawn anyway"
    assert "maps" not in row and row["no_maps"].startswith("run B: surgery damaged")
    assert "no maps: run B: surgery damaged" in (tmp_path / "cmp" / "compare.html").read_text()
    assert not list((tmp_path / "cmp").glob(f"maps/{no_maps}/*"))
