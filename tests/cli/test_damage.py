"""Outputs damaged outside the program: checksums in the manifest, `status --verify`, and exactly the right work redone."""

import json

import pytest
from typer.testing import CliRunner

from runall import app
from tests.conftest import copy_run, fast_args

FAST = fast_args()


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def _manifest(run):
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("damage")
    from pipeline.toy.world import write_scenes

    write_scenes(root / "imgs", 0, 3)
    r = _run("--input", str(root / "imgs"), "--model", "random:tiny", "--output", str(root / "out"), "--run-name", "r",
             "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def run(finished, tmp_path):
    return copy_run(finished / "imgs", finished / "out" / "r", tmp_path)  # it reads its images from the copy


def _ids(run):
    return [json.loads(x)["id"] for x in (run / "images.jsonl").read_text().splitlines()]


def _rerun(run):
    n = len(_manifest(run))
    r = _run("--input", str(run.parent / "imgs"), "--model", "random:tiny", "--output", str(run.parent), "--run-name",
             run.name, "--quiet", *FAST)
    new = [x for x in _manifest(run)[n:] if x["image"] is not None]
    return r, sorted((x["stage"], x["image"]) for x in new)


def _flip(path, old: bytes, new: bytes):
    """Change bytes in place, keeping the file's size, as bit rot or a stray edit would."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))


def test_every_done_record_carries_each_outputs_size_and_checksum(run):
    from pipeline.run.rundir import checksum

    done = [x for x in _manifest(run) if x["status"] == "done"]
    assert {x["stage"] for x in done} >= {"ascend", "decode", "surgery", "rank", "export", "report"}
    for rec in done:
        assert set(rec["sums"]) == set(rec["outputs"]) and rec["outputs"]
        for rel, (size, digest) in rec["sums"].items():
            assert (run / rel).stat().st_size == size and checksum(run / rel) == digest
    assert _run("status", "--run", str(run), "--verify").exit_code == 0


def test_a_truncated_output_is_not_done_and_only_its_image_is_redone(run):
    victim = _ids(run)[1]
    labels = run / "labels" / f"{victim}.json"
    labels.write_bytes(labels.read_bytes()[:20])  # a full disk, a bad copy
    r = _run("status", "--run", str(run))
    assert "decode damaged" in r.stdout and f"labels/{victim}.json: 20 bytes" in r.stdout
    rows = {d["id"]: d for d in _csv(run)}
    r, redone = _rerun(run)
    assert r.exit_code == 0, r.output
    assert redone == [("decode", victim), ("surgery", victim)]  # nothing else, and not ascend
    assert json.loads(labels.read_text())["labels"] is not None
    assert all(d["status"] == "done" for d in _csv(run)) and rows


def _csv(run):
    import csv

    with open(run / "images.csv") as f:
        return list(csv.DictReader(f))


def test_verify_finds_a_bit_flip_that_keeps_the_size_and_the_next_run_redoes_what_depends_on_it(run):
    victim = _ids(run)[0]
    opinion = run / "ascend" / f"{victim}.json"
    text = opinion.read_text()
    i = next(k for k, c in enumerate(text) if c.isdigit())
    _flip(opinion, text[i].encode(), str((int(text[i]) + 1) % 10).encode())
    assert "ascend damaged" not in _run("status", "--run", str(run)).stdout  # its size is right: only a re-read can tell
    r = _run("status", "--run", str(run), "--verify")
    assert r.exit_code == 1
    assert f"damaged: ascend {victim}: ascend/{victim}.json: content changed" in r.stdout
    assert "ascend damaged" in r.stdout  # recorded: the status table counts it
    r, redone = _rerun(run)
    assert r.exit_code == 0, r.output
    assert redone == [("ascend", victim), ("decode", victim), ("surgery", victim)]
    assert _run("status", "--run", str(run), "--verify").exit_code == 0


def test_output_that_does_not_parse_is_an_error_never_an_empty_result(run):
    victim = _ids(run)[2]
    labels = run / "labels" / f"{victim}.json"
    _flip(labels, b"{", b"X")  # same size, not JSON: only a reader can tell without --verify
    r = _run("rank", "--run", str(run))
    assert r.exit_code == 0, r.output
    row = next(d for d in _csv(run) if d["id"] == victim)
    assert row["status"] == "damaged" and f"labels/{victim}.json: not valid JSON" in row["reason"] and row["labels"] == ""
    r = _run("report", "--run", str(run))
    data = (run / "report.html").read_text()
    assert f"labels/{victim}.json: not valid JSON" in data
    r, redone = _rerun(run)
    assert redone == [("decode", victim), ("surgery", victim)]
    assert next(d for d in _csv(run) if d["id"] == victim)["status"] == "done"


def test_damage_to_each_stage_is_named_by_verify(run):
    a, b, c = _ids(run)
    (run / "surgery" / f"{a}.npz").write_bytes((run / "surgery" / f"{a}.npz").read_bytes()[:-7])  # cut
    sheet = run / "surgery" / f"{b}__sheet.png"
    data = bytearray(sheet.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    sheet.write_bytes(bytes(data))
    (run / "ascend" / f"{c}.csv").unlink()  # deleted
    r = _run("status", "--run", str(run), "--verify", "--json")
    found = {(d["stage"], d["image"]): d["reason"] for d in json.loads(r.stdout)["verify"]["damaged"]}
    assert found == {("surgery", a): f"surgery/{a}.npz: {(run / 'surgery' / f'{a}.npz').stat().st_size} bytes, "
                                     f"{(run / 'surgery' / f'{a}.npz').stat().st_size + 7} when written",
                     ("surgery", b): f"surgery/{b}__sheet.png: content changed since written (checksum mismatch)",
                     ("ascend", c): f"ascend/{c}.csv: missing"}
    r, redone = _rerun(run)
    assert r.exit_code == 0, r.output
    assert redone == sorted([("surgery", a), ("surgery", b), ("ascend", c), ("decode", c), ("surgery", c)])


def test_records_from_before_checksums_stay_valid_and_are_counted(run):
    lines = _manifest(run)
    (run / "manifest.jsonl").write_text("".join(json.dumps({k: v for k, v in x.items() if k not in ("sums", "rid", "upstream")})
                                                + "\n" for x in lines))
    r = _run("status", "--run", str(run), "--verify", "--json")
    v = json.loads(r.stdout)["verify"]
    assert r.exit_code == 0 and v["damaged"] == [] and v["existence_only"] == v["records"] > 0
    r, redone = _rerun(run)
    assert r.exit_code == 0 and redone == []  # still done: nothing redone
