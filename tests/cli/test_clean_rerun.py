"""A rerun of a run that finished clean holds no manifest, yet still notices damage, and only a clean finish is
remembered (``pipeline.run.clean``)."""

import base64
import json
import zlib

import pytest
from typer.testing import CliRunner

from runall import app
from tests.conftest import copy_run, fast_args

FAST = fast_args()


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    from pipeline.toy.world import write_scenes

    write_scenes(root / "imgs", 0, 3)
    assert _rerun(root / "out" / "r", root / "imgs").exit_code == 0
    return root


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run: copying gives its files new identities, so one rerun makes it clean again."""
    copied = copy_run(finished / "imgs", finished / "out" / "r", tmp_path)
    assert _rerun(copied).exit_code == 0
    return copied


def _rerun(run, images=None, *extra):
    return _run("--input", str(images or run.parent / "imgs"), "--model", "random:tiny", "--output", str(run.parent),
                "--run-name", run.name, "--quiet", *FAST, *extra)


def _manifest(run):
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


def _unchanged(run):
    return (run / "run.log").read_text().splitlines()[-4:]


def _no_manifest(*args, **kwargs):
    raise AssertionError("the rerun read the manifest's records")


def test_an_unchanged_rerun_reads_no_record_and_rewrites_nothing(run, monkeypatch):
    assert (run / "clean.json").is_file()
    made = {p: p.stat().st_mtime_ns for p in [*run.glob("*.csv"), run / "report.html", *run.glob("export/**/*.*")]}
    n = len(_manifest(run))
    with monkeypatch.context() as m:
        m.setattr("pipeline.run.rundir.RunDir.latest", _no_manifest)
        m.setattr("pipeline.run.rundir.RunDir.load_images", _no_manifest)
        r = _rerun(run)
    assert r.exit_code == 0, r.output
    assert any("unchanged since its last clean finish" in line for line in _unchanged(run))
    assert {p: p.stat().st_mtime_ns for p in made} == made
    new = _manifest(run)[n:]
    assert sorted(x["stage"] for x in new) == ["export", "rank", "report"] and all(x["image"] is None for x in new)
    # and again: the whole-run records it wrote keep it clean
    with monkeypatch.context() as m:
        m.setattr("pipeline.run.rundir.RunDir.latest", _no_manifest)
        assert _rerun(run).exit_code == 0


def test_damage_after_a_clean_finish_redoes_exactly_that_image(run):
    victim = json.loads((run / "images.jsonl").read_text().splitlines()[2])["id"]
    labels = run / "labels" / f"{victim}.json"
    labels.write_bytes(labels.read_bytes()[:20])
    n = len(_manifest(run))
    assert _rerun(run).exit_code == 0
    log = (run / "run.log").read_text()
    assert f"labels/{victim}.json: 20 bytes" in log and "checking every image" in log
    redone = sorted((x["stage"], x["image"]) for x in _manifest(run)[n:] if x["image"] is not None)
    assert redone == [("decode", victim), ("surgery", victim)]


def test_the_clean_record_marks_only_the_latest_done_records(run):
    victim = json.loads((run / "images.jsonl").read_text().splitlines()[0])["id"]
    assert _run("decode", "--run", str(run), "--force", "--quiet").exit_code == 0  # every decode record superseded
    assert _rerun(run).exit_code == 0  # surgery is redone from the new labels, and the finish is clean
    saved = json.loads((run / "clean.json").read_text())
    bits = zlib.decompress(base64.b64decode(saved["lines"]))
    recs = _manifest(run)
    marked = [i for i in range(len(recs)) if i >> 3 < len(bits) and bits[i >> 3] >> (i & 7) & 1]
    latest = {}
    for i, rec in enumerate(recs):
        latest[(rec["image"], rec["stage"])] = i
    assert marked == sorted(i for (image, _), i in latest.items() if image is not None)
    assert sum(x["stage"] == "decode" and x["image"] == victim for x in recs) == 2  # the superseded one is still kept
    assert _rerun(run).exit_code == 0
    assert any("unchanged since its last clean finish" in line for line in _unchanged(run))


def test_a_changed_setting_or_a_failed_image_takes_the_usual_path(run):
    n = len(_manifest(run))
    assert _rerun(run, None, "--set", "rank.min_length=2").exit_code == 0
    assert not any("unchanged since" in line for line in _unchanged(run))
    assert (run / "clean.json").is_file()  # the new settings' finish is clean too
    (run.parent / "imgs" / "broken.png").write_bytes(b"not a png")
    assert _rerun(run, None, "--set", "rank.min_length=2").exit_code == 1
    assert not (run / "clean.json").exists()  # a finish with a failure is not remembered
    assert any(x["status"] == "failed" for x in _manifest(run)[n:])


def _status(run, *extra):
    r = _run("status", "--run", str(run), "--json", *extra)
    doc = json.loads(r.stdout)
    if doc["verify"]:
        doc["verify"].pop("seconds")
    return r.exit_code, doc


def test_status_and_verify_of_a_clean_run_read_no_record_and_agree_with_the_usual_path(run, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr("pipeline.run.rundir.RunDir.latest", _no_manifest)
        clean_status, clean_verify = _status(run), _status(run, "--verify")
    (run / "clean.json").rename(run / "kept.json")
    usual_status, usual_verify = _status(run), _status(run, "--verify")
    assert clean_status == usual_status and clean_verify == usual_verify
    code, doc = clean_status
    assert code == 0 and {s: list(by) for s, by in doc["stages"].items()} == {s: ["done"] for s in
                                                                              ("ascend", "decode", "surgery")}
    assert len(doc["stages"]["decode"]["done"]) == 3 and clean_verify[1]["verify"]["records"] == 3 * 3 + 3

    (run / "kept.json").rename(run / "clean.json")
    victim = json.loads((run / "images.jsonl").read_text().splitlines()[1])["id"]
    labels = run / "labels" / f"{victim}.json"
    data = labels.read_bytes()
    labels.write_bytes(data[:-2] + (b"x" if data[-2:-1] != b"x" else b"y") + data[-1:])  # same size, other bytes
    code, doc = _status(run, "--verify")  # found from the clean record's stream; the status after it, the usual way
    assert code == 1 and [(d["stage"], d["image"]) for d in doc["verify"]["damaged"]] == [("decode", victim)]
    assert "checksum mismatch" in doc["verify"]["damaged"][0]["reason"]
    assert [rel for rel, _ in doc["stages"]["decode"]["damaged"]] == [json.loads(
        (run / "images.jsonl").read_text().splitlines()[1])["rel"]]
